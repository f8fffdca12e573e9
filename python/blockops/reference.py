"""Pure-PyTorch references (``ref_*``) for every blockops op.

Written for clarity, not speed: tests compare the kernels against them, and benchmarks use them as the
"plain PyTorch" baseline where PyTorch has no op of its own.
"""
from __future__ import annotations

import torch


def ref_pack_bits(values: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Reference for ``blockops.pack_bits``: LSB-first, ``32 // bits`` values per int32 word along ``dim``."""
    per = 32 // bits
    v = values.movedim(dim, -1).to(torch.int64)
    n = v.shape[-1]
    words = -(-n // per)
    v = torch.nn.functional.pad(v, (0, words * per - n))
    v = v.reshape(*v.shape[:-1], words, per)
    shifts = torch.arange(per, device=v.device, dtype=torch.int64) * bits
    packed = (v << shifts).sum(-1)  # fields do not overlap, so the sum is the bitwise OR
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return packed.movedim(-1, dim).contiguous()


def ref_unpack_bits(packed: torch.Tensor, bits: int, size: int, dim: int = -1) -> torch.Tensor:
    """Reference for ``blockops.unpack_bits``."""
    per = 32 // bits
    p = packed.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per, device=p.device, dtype=torch.int64) * bits
    v = (p.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    v = v.reshape(*v.shape[:-2], -1)[..., :size]
    return v.to(torch.uint8).movedim(-1, dim).contiguous()


def ref_quant_dequantize(qweight, scales, zeros, bits: int, group_size: int) -> torch.Tensor:
    """Reference for ``blockops.ops.quant_dequantize``, in fp32: ``W_hat [out, in]``."""
    in_features = scales.shape[0] * group_size
    q = ref_unpack_bits(qweight, bits, in_features, 0).float()          # [in, out]
    s = scales.float().repeat_interleave(group_size, 0)
    z = zeros.float().repeat_interleave(group_size, 0)
    return ((q - z) * s).t().contiguous()


def ref_quant_linear(x, qweight, scales, zeros, bits: int, group_size: int, bias=None) -> torch.Tensor:
    """Reference for ``blockops.ops.quant_linear``: dequantize, then an fp32 matmul."""
    y = x.float() @ ref_quant_dequantize(qweight, scales, zeros, bits, group_size).t()
    return y if bias is None else y + bias.float()


def ref_masked_attention(q, k, v, dense_mask, scale=None):
    """Reference for block-sparse attention: softmax over the visible keys only, computed in q's dtype (pass
    fp64 for an exact reference).

    Args:
        q: ``[B, H, Tq, D]``; k: ``[B, Hk, Tk, D]``; v: ``[B, Hk, Tk, Dv]`` (``H`` a multiple of ``Hk``: GQA).
        dense_mask: bool, broadcastable to ``[B, H, Tq, Tk]`` (True = visible), e.g. ``BlockMask.to_dense()``.
        scale: score scale, default ``D ** -0.5``.

    Returns:
        ``(out [B, H, Tq, Dv], lse [B, H, Tq])`` with ``lse`` the natural log-sum-exp of the scaled visible scores.
        Rows with no visible key give ``out = 0`` and ``lse = -inf`` (not NaN).
    """
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2).to(q.dtype)) * scale
    s = s.masked_fill(~dense_mask.to(torch.bool), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse).unsqueeze(-1))
    out = p @ v.to(q.dtype)
    return out, lse
