"""1.61-bit GEMM benchmark, all shapes (Llama-2/3 layers, batch 1..512 on CPU, 1..64 on GPU):
`python bench/bench_ptq161.py [--device cuda] [--json PATH]`. Baselines in the same run: F.linear fp32/bf16 (CPU) or
fp16 cuBLAS (GPU), and blockops' 2-bit quant_linear. Also ptq161_dequantize on the layer shapes (against the
reference dequantize) and training steps of the factors, forward + backward with x, alpha, r1 and r2 requiring grad
(against dense fp32 F.linear forward + backward)."""
from blockops.bench import family_main

if __name__ == "__main__":
    family_main("ptq161")
