"""Masked diffusion LM decoding benchmark, all shapes: `python bench/bench_dllm.py [--device cuda] [--json PATH]`.
The fused unmasking op vs the eager softmax/max/threshold/top-k expression at V = 32000 and 126464 (fp32, bf16;
B = 1, 8; a 32-token block), and blockops.dllm.generate on a tiny random-weight model for no / prefix / dual cache x
decoding rules, with the baseline (no cache, one token per step) in the same run."""
from blockops.bench import family_main

if __name__ == "__main__":
    family_main("dllm")
