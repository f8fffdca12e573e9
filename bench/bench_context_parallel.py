"""Context-parallel benchmark, all shapes (ring attention T 8192/16384 causal zigzag / contiguous and LongGen on 2 gloo
ranks vs one process, bytes vs the dense ring, balance, peak RSS; BPT feed-forward and LM head at T=16384):
`python bench/bench_context_parallel.py [--json PATH]`, or on N GPUs
`torchrun --nproc-per-node=N bench/bench_context_parallel.py --device cuda`."""
from blockops.bench import family_main

if __name__ == "__main__":
    family_main("context_parallel")
