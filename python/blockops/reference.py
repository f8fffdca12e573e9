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
