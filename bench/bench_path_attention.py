"""PaTH attention benchmark, all shapes (CPU, fp32: B 1 and 8, T 512/2048/4096, H=16 with 16 or 4 key/value heads,
D 64/128, plus the issue's target shape B=1, H=8, T=4096, D=64):
`python bench/bench_path_attention.py [--device cuda] [--json PATH]`. Baselines in the same run: causal SDPA and,
where affordable, the naive reference. Long (minutes per shape at B=8, T=4096). On a CUDA device: the CUDA kernels
on a small bf16 grid (blockops/bench/path_attention.py FULL_GPU). Both devices also: the key cache (against the same
computation in PyTorch ops) and decoding steps over caches of 4096 and 16384 tokens (against the rank-1 key update +
SDPA in PyTorch ops), fp32."""
from blockops.bench import family_main

if __name__ == "__main__":
    family_main("path_attention")
