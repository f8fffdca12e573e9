"""Cached-block skipping benchmark, all settings: `python bench/bench_block_cache.py [--device cuda] [--json PATH]`.
The fused indicators against the eager PyTorch expressions on large tensors, BWCache's overhead per computed DiT-XL
block, and a small DiT sampler (classifier-free guidance) under every policy and several thresholds: blocks skipped,
speed-up over the uncached model, the ideal the skip ratio implies, and the relative L2 error of the final latent."""
from blockops.bench import family_main

if __name__ == "__main__":
    family_main("block_cache")
