"""Vector-quantized GEMM benchmark, all shapes (an LLM layer at batch 1..16 and DiT-XL/2 layers at 256..4096
tokens; 2-bit, 3-bit and AQLM 2x8): `python bench/bench_vq.py [--json PATH]`. Baselines in the same run: F.linear
fp32/bf16 and decode-then-linear. CPU only for now (no CUDA kernel yet)."""
from blockops.bench import family_main

if __name__ == "__main__":
    family_main("vq")
