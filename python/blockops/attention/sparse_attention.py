"""`block_sparse_attention`: attention computed only on the tiles a :class:`BlockMask` lists, forward and backward.

Kernels: ``torch.ops.blockops.block_sparse_attention`` (+ ``_backward``), CPU (tiled flash-style, AVX2) and CUDA
(FlashAttention-2-style tensor-core kernels for fp16/bf16, CUDA-core kernels for fp32). See csrc/attention.h.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from blockops.attention.block_mask import BlockMask, expected_block_mask
from blockops.ops._common import _default_scale
from blockops.ops.attention import MASK_FIELDS, block_sparse_attention_op

__all__ = ["block_sparse_attention", "scaled_dot_product_attention"]


def _ensure_valid(mask: BlockMask) -> None:
    """Masks from blockops' constructors are valid by construction; a hand-built one is validated (one host sync)
    before its first use, so a wrong index is a clear error on every device, not a skipped block. A mask whose
    tensors were written in place since (their version counters moved) is validated again: no sync per call while
    it is unchanged. Skipped while torch.compile traces (the check runs in eager calls; reading `_version` would
    break the graph)."""
    if torch.compiler.is_compiling() or mask._is_marked_valid():
        return
    mask.validate()
    mask._mark_valid()


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask,
                           scale: float | None = None, return_lse: bool = False):
    """Attention over the visible (query, key) pairs of `block_mask`, visiting only its listed tiles.

    Args:
        q: ``[B, H, Tq, D]``; k: ``[B, Hk, Tk, D]``; v: ``[B, Hk, Tk, Dv]`` (as ``F.scaled_dot_product_attention``
            and ``flex_attention``); fp16, bf16 or fp32, one dtype (fp64 too on the CPU, for gradcheck); ``H`` a
            multiple of ``Hk`` (grouped-query
            attention); ``D``, ``Dv`` multiples of 8 up to 256; the last dim contiguous (other strides free).
        block_mask: a :class:`BlockMask` built for ``q_len = Tq``, ``kv_len = Tk``, on q's device, with batch and
            head dims of 1 (broadcast) or ``B`` / ``H``.
        scale: score scale, default ``D ** -0.5``.
        return_lse: also return the log-sum-exp of the scaled visible scores.

    Returns:
        ``out [B, H, Tq, Dv]`` in q's dtype, or ``(out, lse)`` with ``lse [B, H, Tq]`` fp32 (natural log; fp64
        for fp64 q). NaN / Inf propagate as in ``F.scaled_dot_product_attention`` over the visible keys: a NaN
        visible score (NaN in q or a visible k) or a +inf one makes the row's output and lse NaN, a NaN in a
        visible v makes those columns NaN; NaN / Inf of hidden keys (unlisted blocks or bits cleared in a tile)
        never reach the output.
        Rows with no visible key give ``out = 0`` and ``lse = -inf`` and zero gradients. Differentiable in q, k
        and v (and through lse).
    """
    if not isinstance(block_mask, BlockMask):
        raise expected_block_mask(block_mask, "block_sparse_attention: block_mask")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"block_sparse_attention: q and k must be [B, H, T, D], got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    if (block_mask.q_len, block_mask.kv_len) != (q.shape[2], k.shape[2]):
        raise ValueError(f"block_sparse_attention: the mask was built for q_len={block_mask.q_len}, "
                         f"kv_len={block_mask.kv_len} but q has {q.shape[2]} and k has {k.shape[2]} positions")
    if block_mask.device != q.device:
        raise ValueError(f"block_sparse_attention: the mask is on {block_mask.device} but q is on {q.device}; "
                         f"use block_mask.to(q.device)")
    _ensure_valid(block_mask)
    scale = _default_scale(scale, q)
    out, lse = block_sparse_attention_op(q, k, v, [getattr(block_mask, f) for f in MASK_FIELDS],
                                         block_mask.block_q, block_mask.block_kv, scale)
    return (out, lse) if return_lse else out


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
                                 scale: float | None = None, enable_gqa: bool = False):
    """Drop-in for ``F.scaled_dot_product_attention``: a :class:`BlockMask` ``attn_mask`` runs
    :func:`block_sparse_attention` (GQA always allowed); anything else goes to PyTorch unchanged.

    Monkey-patch-friendly: ``F.scaled_dot_product_attention = blockops.attention.scaled_dot_product_attention``
    lets models that call SDPA take block masks without edits.
    """
    if isinstance(attn_mask, BlockMask):
        if dropout_p != 0.0 or is_causal:
            raise ValueError("scaled_dot_product_attention: with a BlockMask, dropout_p must be 0 and is_causal "
                             "False (put causality in the mask, e.g. masks.causal)")
        return block_sparse_attention(query, key, value, attn_mask, scale=scale)
    return _torch_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                       scale=scale, enable_gqa=enable_gqa)


_torch_sdpa = F.scaled_dot_product_attention   # kept before anyone patches F
