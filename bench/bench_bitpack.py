"""Bit packing benchmark, all shapes: `python bench/bench_bitpack.py [--device cuda] [--json PATH]`.
Baseline in the same run: the same packing written with PyTorch tensor ops."""
from blockops.bench import family_main

if __name__ == "__main__":
    family_main("bitpack")
