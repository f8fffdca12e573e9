"""Block-sparse attention (family "attention"; csrc/attention.h): the typed wrapper, fake (meta) implementations
and autograd of ``block_sparse_attention``, and ``MASK_FIELDS``, the order in which the ops take a
:class:`blockops.attention.BlockMask`'s tensors. The user API over ``BlockMask`` is
:func:`blockops.attention.block_sparse_attention` (blockops/attention/sparse_attention.py).

The schemas live in csrc/ops.cpp; the CPU and CUDA kernels register themselves from the C++ library. Each
wrapper's docstring gives every argument's dtype, shape and layout. Fake implementations only check what
the shapes alone can tell and allocate the output, so the ops trace under torch.compile and FakeTensor.
"""
from __future__ import annotations

import torch

from blockops.ops._common import _cdiv

_ops = torch.ops.blockops

# The mask tensors in the ops' argument order (after q, k, v): forward lists, transposed lists, bit tiles.
MASK_FIELDS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "kv_tile_ids",
               "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices", "q_tile_ids", "tiles")


def block_sparse_attention_op(q, k, v, mask_tensors, block_q: int, block_kv: int, scale: float):
    """``torch.ops.blockops.block_sparse_attention`` with the mask tensors of a BlockMask in `MASK_FIELDS` order.

    Args:
        q: ``[B, H, Tq, D]``; k: ``[B, Hk, Tk, D]``; v: ``[B, Hk, Tk, Dv]``; fp16, bf16 or fp32 (one dtype; fp64
            too on the CPU, for gradcheck), last
            dim contiguous, ``H`` a multiple of ``Hk``, ``D`` and ``Dv`` multiples of 8 up to 256.
        mask_tensors: the 11 int32 tensors of a :class:`blockops.attention.BlockMask` (``MASK_FIELDS``).
        block_q, block_kv: the mask's block sizes; scale: score scale.

    Returns:
        ``(out [B, H, Tq, Dv] in q's dtype, lse [B, H, Tq] fp32, fp64 for fp64 q)``; differentiable in q, k, v
        (once: the backward is a kernel, so no double backward / gradgradcheck).
    """
    return _ops.block_sparse_attention(q, k, v, *mask_tensors, block_q, block_kv, scale)


def _check_attention_shapes(op, q, k, v, kv_num_blocks, block_q, block_kv):
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4,
                 lambda: f"{op}: q, k, v must be [B, H, T, D], got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    torch._check(q.dtype == k.dtype == v.dtype
                 and q.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64),
                 lambda: f"{op}: q, k, v must share one dtype in fp16/bf16/fp32 (fp64 on the CPU), got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    torch._check(k.shape[0] == q.shape[0] and v.shape[:3] == k.shape[:3] and k.shape[3] == q.shape[3],
                 lambda: f"{op}: incompatible q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    torch._check(block_q in (16, 32, 64, 128) and block_kv in (16, 32, 64, 128),
                 lambda: f"{op}: block sizes must be in (16, 32, 64, 128), got {block_q}, {block_kv}")
    torch._check(tuple(kv_num_blocks.shape[2:]) == (_cdiv(q.shape[2], block_q),),
                 lambda: f"{op}: kv_num_blocks {tuple(kv_num_blocks.shape)} does not match q length {q.shape[2]} "
                         f"in blocks of {block_q}")


def _lse_dtype(dtype):
    """lse's dtype (csrc/attention_op.h lse_dtype): fp32, fp64 for fp64 operands."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("blockops::block_sparse_attention")
def _block_sparse_attention_fake(q, k, v, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
                                 kv_tile_ids, q_num_blocks, q_indices, full_q_num_blocks, full_q_indices,
                                 q_tile_ids, tiles, block_q, block_kv, scale):
    _check_attention_shapes("blockops.block_sparse_attention", q, k, v, kv_num_blocks, block_q, block_kv)
    b, h, tq, _ = q.shape
    return q.new_empty((b, h, tq, v.shape[3])), q.new_empty((b, h, tq), dtype=_lse_dtype(q.dtype))


@torch.library.register_fake("blockops::block_sparse_attention_backward")
def _block_sparse_attention_backward_fake(grad_out, q, k, v, out, lse, grad_lse, kv_num_blocks, kv_indices, full_kv_num_blocks,
                                          full_kv_indices, kv_tile_ids, q_num_blocks, q_indices, full_q_num_blocks,
                                          full_q_indices, q_tile_ids, tiles, block_q, block_kv, scale):
    _check_attention_shapes("blockops.block_sparse_attention_backward", q, k, v, kv_num_blocks, block_q, block_kv)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _block_sparse_attention_setup_context(ctx, inputs, output):
    q, k, v, *mask_and_args = inputs
    ctx.mask_args = mask_and_args            # 11 int32 tensors, block_q, block_kv, scale
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)


def _block_sparse_attention_backward(ctx, grad_out, grad_lse):
    """dq, dk, dv from the block-sparse backward kernels, including the gradient arriving at lse."""
    q, k, v, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    if grad_lse is not None:
        grad_lse = grad_lse.to(lse.dtype).contiguous()
    gq, gk, gv = _ops.block_sparse_attention_backward(grad_out.contiguous(), q, k, v, out, lse, grad_lse,
                                                      *ctx.mask_args)
    return (gq, gk, gv) + (None,) * len(ctx.mask_args)


torch.library.register_autograd(
    "blockops::block_sparse_attention", _block_sparse_attention_backward,
    setup_context=_block_sparse_attention_setup_context,
)

__all__ = ["MASK_FIELDS", "block_sparse_attention_op"]
