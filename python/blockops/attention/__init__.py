"""Block-sparse attention: the block mask (`BlockMask`), its builders for the seed papers' patterns
(`blockops.attention.masks`) and the generalized Hilbert token order for video latents
(`blockops.attention.hilbert`).

Quick start::

    from blockops.attention import masks
    m = masks.causal(1000, block_q=64, block_kv=64)      # BlockMask, [B'=1, H'=1]
    print(m)                                             # shape, block sizes, density, partial/full counts
    print(masks.sliding_window(256, 64, block_q=32, block_kv=32).to_ascii())
    dense = m.to_dense()                                 # bool [1, 1, 1000, 1000], exact

Attention over a mask::

    out = block_sparse_attention(q, k, v, m)             # q, k, v [B, H, T, D]; differentiable
    out, lse = block_sparse_attention(q, k, v, m, return_lse=True)

The kernels read the lists and bit tiles described in `blockops.attention.block_mask`.
"""
from blockops.attention import hilbert, masks
from blockops.attention.block_mask import BLOCK_SIZES, BlockMask, Density
from blockops.attention.hilbert import hilbert_order, inverse_permutation, reorder, restore
from blockops.attention.masks import and_masks, or_masks, per_head
from blockops.ops.path_attention import PathCache, path_attention, path_decode_step
from blockops.attention.sparse_attention import block_sparse_attention, scaled_dot_product_attention

__all__ = ["BLOCK_SIZES", "BlockMask", "Density", "PathCache", "and_masks", "block_sparse_attention", "hilbert",
           "hilbert_order", "inverse_permutation", "masks", "or_masks", "path_attention", "path_decode_step",
           "per_head", "reorder", "restore", "scaled_dot_product_attention"]
