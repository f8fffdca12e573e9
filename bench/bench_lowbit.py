"""Low-bit GEMM benchmark, all shapes (Llama-2/3 layers, batch 1..512): `python bench/bench_lowbit.py
[--device cuda] [--json PATH]`. Baselines in the same run: F.linear fp32/bf16 and torch's int4 kernel (CPU),
fp16 cuBLAS (GPU). Also quant_dequantize on the layer shapes (against the reference dequantize) and E2E-QP training
steps, forward + backward with x and the scales requiring grad (against dense fp32 F.linear forward + backward)."""
from blockops.bench import family_main

if __name__ == "__main__":
    family_main("lowbit")
