"""Vector-quantized GEMM benchmark, all shapes: `python bench/bench_vq.py [--device cuda] [--json PATH]`.
CPU: an LLM layer (4096x11008) at batch 1..16 in the three formats (2-bit, 3-bit, AQLM 2x8), its down projection
at batch 1 and 4, and DiT-XL/2 layers at 256..4096 tokens (2-bit), each with fp32 and bf16 activations; baselines in
the same run: F.linear fp32/bf16 and decode-then-linear. CUDA (fp16): LLM layers at batch 1..16 in the three formats
and DiT-XL/2 layers at 256..4096 tokens (2-bit, 3-bit); baselines: fp16 F.linear (cuBLAS), vq_dequantize + cuBLAS
and decode-then-linear. The CUDA kernels (a GEMV up to 8 rows, mma.sync tiles above) are compiled for sm_80/sm_90a
and checked in a CPU emulator; they have not yet run on a GPU. Both devices also: vq_dequantize in the three formats
(against the reference decode) and VQ4DiT fine-tuning steps on DiT-XL/2 layers, forward + backward with x, the
codebooks and the scales requiring grad (against dense fp32 F.linear forward + backward)."""
from blockops.bench import family_main

if __name__ == "__main__":
    family_main("vq")
