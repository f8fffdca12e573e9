"""Block-sparse attention benchmark, all shapes (T 1024/4096 on CPU in fp32 and bf16, 16384/65536 on GPU in bf16;
H=16 and GQA 16/4; D 64/128; causal, LongGen, documents, block diffusion, Jenga top-k 0.1-0.3):
`python bench/bench_attention.py [--device cuda] [--json PATH]`. Baselines in the same run: dense SDPA and compiled
FlexAttention with the same mask (forward only on CPU)."""
from blockops.bench import family_main

if __name__ == "__main__":
    family_main("attention")
