"""Masked diffusion LM decoding (Fast-dLLM v1 / v2): the confidence-aware unmasking and dual-cache slot overwrite
kernels (op wrappers in :mod:`blockops.ops.dllm`), and generation loops with prefix, dual, block-level and sub-block
KV caches (:mod:`blockops.dllm.generate`)."""
from blockops.dllm.generate import (DiffusionKVCache, GenerateOutput, GenerationStats, generate,
                                    generate_block_diffusion)
from blockops.ops.dllm import Unmasked, kv_overwrite, kv_overwrite_range, unmask

__all__ = ["DiffusionKVCache", "GenerateOutput", "GenerationStats", "Unmasked", "generate", "generate_block_diffusion",
           "kv_overwrite", "kv_overwrite_range", "unmask"]
