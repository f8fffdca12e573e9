"""QuantLinear: an nn.Linear whose weight is stored as 2/3/4-bit group-wise asymmetric codes (EfficientQAT /
GPTQ-v2 layout, see csrc/lowbit.h) and multiplied by blockops' fused kernels."""
from __future__ import annotations

import torch
from torch import nn

from blockops.ops import bitpack, lowbit

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


def _check_format(checkpoint_format: str) -> None:
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}")


class QuantLinear(nn.Module):
    """``y = x @ W_hat^T + bias`` with ``W_hat[n, k] = (q[k, n] - zeros[k // g, n]) * scales[k // g, n]``.

    Buffers: ``qweight`` int32 ``[ceil(in / (32 // bits)), out]`` (codes packed along ``in``, GPTQ layout),
    ``zeros`` ``[in / g, out]`` (float zero points, integral after quantization). Parameters: ``scales``
    ``[in / g, out]`` (trainable: EfficientQAT's E2E-QP trains only these), ``bias`` ``[out]`` or None.
    Set ``train_zeros=True`` to make ``zeros`` a parameter as well.
    """

    def __init__(self, in_features: int, out_features: int, bits: int = 2, group_size: int = 64, bias: bool = True,
                 dtype: torch.dtype = torch.float16, device=None, train_zeros: bool = False):
        super().__init__()
        if bits not in (2, 3, 4):
            raise ValueError(f"QuantLinear: bits must be 2, 3 or 4, got {bits}")
        if group_size < 16 or group_size % 16:
            raise ValueError(f"QuantLinear: group_size must be a positive multiple of 16, got {group_size}")
        if in_features % group_size:
            raise ValueError(f"QuantLinear: in_features={in_features} is not divisible by group_size={group_size}")
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"QuantLinear: scales dtype must be fp16, bf16 or fp32, got {dtype}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(bitpack.packed_length(in_features, bits), out_features,
                                                    dtype=torch.int32, device=device))
        self.scales = nn.Parameter(torch.ones(groups, out_features, dtype=dtype, device=device))
        zeros = torch.zeros(groups, out_features, dtype=dtype, device=device)
        if train_zeros:
            self.zeros = nn.Parameter(zeros)
        else:
            self.register_buffer("zeros", zeros)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    # ---- construction ---------------------------------------------------------------------------------------

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 2, group_size: int = 64, dtype: torch.dtype | None = None):
        """Min-max round-to-nearest quantization of ``linear.weight`` (EfficientQAT's initialisation):
        ``s = (max - min) / qmax`` clamped to [1e-4, 1e4], ``z = clamp(round(-min / s), 0, qmax)``,
        ``q = clamp(round(W / s) + z, 0, qmax)`` per group of ``group_size`` input channels."""
        from blockops.quant.rtn import quantize_rtn   # the algorithm layer imports this module

        weight = linear.weight.detach()
        dtype = dtype or (weight.dtype if weight.dtype in (torch.float16, torch.bfloat16) else torch.float16)
        q, scales, zeros = quantize_rtn(weight.float(), bits, group_size)
        return cls.from_codes(q, scales, zeros, linear.bias, bits=bits, group_size=group_size, dtype=dtype)

    @classmethod
    def from_codes(cls, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bias=None, *, bits: int,
                   group_size: int, dtype: torch.dtype | None = None):
        """From integer codes ``q [out, in]`` in [0, 2**bits), ``scales`` and integral ``zeros``
        ``[in / group_size, out]`` (stored in ``dtype``, default the scales' dtype) and an optional ``bias``:
        ``dequantize()`` is then ``(q - zeros) * scales`` exactly, up to the rounding of scales to ``dtype``."""
        if q.dim() != 2:
            raise ValueError(f"from_codes: q must be 2-D [out, in], got {tuple(q.shape)}")
        out_features, in_features = q.shape
        qmax = (1 << bits) - 1
        if q.numel() and (q.min() < 0 or q.max() > qmax):
            raise ValueError(f"from_codes: codes must lie in [0, {qmax}] for {bits}-bit, got "
                             f"[{int(q.min())}, {int(q.max())}]")
        groups = in_features // group_size if group_size else 0
        for name, t in (("scales", scales), ("zeros", zeros)):
            if tuple(t.shape) != (groups, out_features):
                raise ValueError(f"from_codes: {name} must be [{groups}, {out_features}] for q {tuple(q.shape)} and "
                                 f"group_size={group_size}, got {tuple(t.shape)}")
        dtype = dtype or scales.dtype
        module = cls(in_features, out_features, bits, group_size, bias is not None, dtype, q.device)
        with torch.no_grad():
            module.qweight.copy_(bitpack.pack_bits(q.to(torch.int32).t().contiguous(), bits, 0))
            module.scales.copy_(scales.to(dtype))
            module.zeros.copy_(zeros.to(dtype))
            if bias is not None:
                module.bias.copy_(bias.detach().to(dtype))
        return module

    @classmethod
    def from_gptq(cls, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, bias=None, *, bits: int,
                  group_size: int, checkpoint_format: str = "gptq_v2", g_idx: torch.Tensor | None = None):
        """From GPTQ-style tensors: ``qweight`` int32 ``[ceil(in / p), out]``, ``qzeros`` int32
        ``[in / g, ceil(out / p)]`` (packed along ``out``), ``scales`` ``[in / g, out]``, optional ``bias``
        ``[out]`` and ``g_idx`` ``[in]`` (must be ``k // g``: act-order is not supported).
        ``checkpoint_format="gptq_v2"`` (EfficientQAT, GPTQModel v2) stores zero points as they are;
        ``"gptq"`` (AutoGPTQ v1) stores ``z - 1`` (modulo 2**bits). 3-bit uses 10 codes per word."""
        _check_format(checkpoint_format)
        if bits not in (2, 3, 4):
            raise ValueError(f"from_gptq: bits must be 2, 3 or 4, got {bits}")
        for name, t in (("qweight", qweight), ("qzeros", qzeros)):
            if t.dtype != torch.int32 or t.dim() != 2:
                raise ValueError(f"from_gptq: {name} must be a 2-D int32 tensor, got {t.dtype} {tuple(t.shape)}")
        if scales.dim() != 2:
            raise ValueError(f"from_gptq: scales must be 2-D [in / group_size, out], got {tuple(scales.shape)}")
        groups, out_features = scales.shape
        in_features = groups * group_size
        if qweight.shape != (bitpack.packed_length(in_features, bits), out_features):
            raise ValueError(
                f"from_gptq: qweight shape {tuple(qweight.shape)} does not match scales {tuple(scales.shape)} with "
                f"bits={bits}, group_size={group_size}: expected ({bitpack.packed_length(in_features, bits)}, "
                f"{out_features})")
        if qzeros.shape != (groups, bitpack.packed_length(out_features, bits)):
            raise ValueError(f"from_gptq: qzeros shape {tuple(qzeros.shape)} must be "
                             f"({groups}, {bitpack.packed_length(out_features, bits)})")
        if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (out_features,)
                                 or not bias.is_floating_point()):
            # copy_ into the [out] parameter would broadcast a [1] bias to every output without a word.
            got = f"{bias.dtype} {tuple(bias.shape)}" if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"from_gptq: bias must be a floating [out_features] = [{out_features}] tensor (out "
                             f"from scales {tuple(scales.shape)}), got {got}")
        if g_idx is not None:
            expected = torch.arange(in_features, device=g_idx.device) // group_size
            if g_idx.shape != expected.shape or not torch.equal(g_idx.to(expected.dtype), expected):
                raise ValueError("from_gptq: g_idx is not k // group_size (act-order checkpoints are not supported)")
        zeros = bitpack.unpack_bits(qzeros.contiguous(), bits, out_features, 1).to(torch.int32)
        if checkpoint_format == "gptq":
            zeros = (zeros + 1) & ((1 << bits) - 1)
        dtype = scales.dtype if scales.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float16
        module = cls(in_features, out_features, bits, group_size, bias is not None, dtype, scales.device)
        with torch.no_grad():
            module.qweight.copy_(qweight)
            module.scales.copy_(scales)
            module.zeros.copy_(zeros.to(dtype))
            if bias is not None:
                module.bias.copy_(bias)
        return module

    def to_gptq(self, checkpoint_format: str = "gptq_v2") -> dict[str, torch.Tensor]:
        """The GPTQ-style tensors (``qweight``, ``qzeros``, ``scales``, ``g_idx``, and ``bias`` if present),
        exact inverses of :meth:`from_gptq`. Requires integral zero points in [0, 2**bits)."""
        _check_format(checkpoint_format)
        qmax = (1 << self.bits) - 1
        zeros = self.zeros.detach().float()
        if not torch.equal(zeros, zeros.round()) or zeros.min() < 0 or zeros.max() > qmax:
            raise ValueError(f"to_gptq: zero points must be integers in [0, {qmax}] (trained fractional zeros "
                             "cannot be stored in the GPTQ format)")
        z = zeros.to(torch.int32)
        if checkpoint_format == "gptq":
            z = (z - 1) & qmax
        out = {
            "qweight": self.qweight.detach().clone(),
            "qzeros": bitpack.pack_bits(z.contiguous(), self.bits, 1),
            "scales": self.scales.detach().clone(),
            "g_idx": torch.arange(self.in_features, dtype=torch.int32, device=self.qweight.device) // self.group_size,
        }
        if self.bias is not None:
            out["bias"] = self.bias.detach().clone()
        return out

    # ---- use ------------------------------------------------------------------------------------------------

    def dequantize(self) -> torch.Tensor:
        """``W_hat [out, in]`` in the scales' dtype."""
        return lowbit.quant_dequantize(self.qweight, self.scales, self.zeros, self.bits, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lowbit.quant_linear(x.contiguous(), self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                                   self.bias)

    @property
    def bits_per_weight(self) -> float:
        """Storage per weight in the GPTQ format: b-bit code, plus per group one scale and one b-bit zero."""
        scale_bits = torch.finfo(self.scales.dtype).bits
        return self.bits + (scale_bits + self.bits) / self.group_size

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bits_per_weight={self.bits_per_weight:.3f}, "
                f"bias={self.bias is not None}")


def __getattr__(name: str):
    # quantize_rtn used to live here; it is blockops.quant.rtn's (imported on first use: that module imports this one).
    if name == "quantize_rtn":
        from blockops.quant.rtn import quantize_rtn

        return quantize_rtn
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
