"""1.61-bit GEMM benchmark, all shapes (Llama-2/3 layers, batch 1..512): `python bench/bench_ptq161.py [--json PATH]`.
Baselines in the same run: F.linear fp32/bf16 and blockops' 2-bit quant_linear (CPU)."""
from blockops.bench import family_main

if __name__ == "__main__":
    family_main("ptq161")
