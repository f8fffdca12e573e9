"""PTQ161Linear: an nn.Linear whose weight is stored in blockops' packed PTQ1.61 format (4-bit salient input
channels, binarized others with row/column factors; layout in blockops/ops/ptq161.py and csrc/ptq161.h) and
multiplied by the ptq161 kernels."""
from __future__ import annotations

import torch
from torch import nn

from blockops.ops import ptq161


class PTQ161Linear(nn.Module):
    """``y = x @ W_hat^T + bias``, ``W_hat = mask * W_high + (1 - mask) * W_low`` (PTQ1.61).

    Buffers: ``perm``, ``qsalient``, ``salient_scale``, ``salient_zero``, ``signs``, ``zero_signs``, ``mu``.
    Parameters: ``alpha``, ``r1`` ``[out]`` and ``r2`` ``[in]`` (trained by
    :func:`blockops.quant.ptq161.optimize_block` through the kernels' backward), ``bias`` or None.
    """

    def __init__(self, in_features: int, out_features: int, num_salient: int, bias: bool = True,
                 factor_dtype: torch.dtype = torch.float16, device=None):
        super().__init__()
        if not 0 <= num_salient <= in_features:
            raise ValueError(f"PTQ161Linear: num_salient must be in [0, {in_features}], got {num_salient}")
        if factor_dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"PTQ161Linear: factor_dtype must be fp16, bf16 or fp32, got {factor_dtype}")
        self.in_features, self.out_features, self.num_salient = in_features, out_features, num_salient
        plain = in_features - num_salient
        i32 = dict(dtype=torch.int32, device=device)
        f = dict(dtype=factor_dtype, device=device)
        self.register_buffer("perm", torch.arange(in_features, **i32))
        self.register_buffer("qsalient", torch.zeros(ptq161.salient_padded(num_salient) // 8, out_features, **i32))
        self.register_buffer("salient_scale", torch.ones(out_features, **f))
        self.register_buffer("salient_zero", torch.zeros(out_features, **f))
        self.register_buffer("signs", torch.zeros(-(-plain // 32), out_features, **i32))
        self.register_buffer("zero_signs", torch.zeros(0, dtype=torch.int64, device=device))
        self.register_buffer("mu", torch.zeros(out_features, **f))
        self.alpha = nn.Parameter(torch.zeros(out_features, **f))
        self.r1 = nn.Parameter(torch.ones(out_features, **f))
        self.r2 = nn.Parameter(torch.ones(in_features, **f))
        self.bias = nn.Parameter(torch.zeros(out_features, **f)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, act_scales: torch.Tensor, salient_ratio: float = 0.2,
                    salient_align: int = ptq161.SALIENT_ALIGN, factor_dtype: torch.dtype = torch.float16):
        """PTQ1.61's initial quantization (:func:`blockops.quant.ptq161.quantize_weight`): salient channels by
        ``act_scales [in]`` (max |x| per input channel, e.g. from :func:`blockops.quant.ptq161.collect_act_scales`),
        alpha and mu from the weights, ``r1 = r2 = 1``. The bias is kept in ``factor_dtype``."""
        from blockops.quant.ptq161 import quantize_weight   # the algorithm layer imports this module

        tensors, num_salient = quantize_weight(linear.weight, act_scales, salient_ratio, salient_align, factor_dtype)
        module = cls(linear.in_features, linear.out_features, num_salient, linear.bias is not None, factor_dtype,
                     linear.weight.device)
        module.zero_signs = tensors["zero_signs"]  # its length is the weight's (usually 0)
        with torch.no_grad():
            for name in ptq161.FIELDS:
                if name != "zero_signs":
                    getattr(module, name).copy_(tensors[name])
            if linear.bias is not None:
                module.bias.copy_(linear.bias.detach())
        return module

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # zero_signs has one entry per sign(0) weight: take the checkpoint's length instead of refusing it.
        key = prefix + "zero_signs"
        if key in state_dict:
            self.zero_signs = torch.empty_like(state_dict[key], device=self.zero_signs.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def packed(self) -> dict:
        """The format's tensors by name (:data:`blockops.ops.ptq161.FIELDS`)."""
        return {name: getattr(self, name) for name in ptq161.FIELDS}

    def _args(self):
        return [getattr(self, name) for name in ptq161.FIELDS] + [self.num_salient]

    def dequantize(self) -> torch.Tensor:
        """``W_hat [out, in]`` fp32."""
        return ptq161.ptq161_dequantize(*self._args())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ptq161.ptq161_linear(x.contiguous(), *self._args(), self.bias)

    def bits_per_weight(self, with_bias: bool = False) -> float:
        """Stored bits per weight, every tensor of the format counted (the bias too with ``with_bias``)."""
        return ptq161.bits_per_weight(self.packed(), self.bias if with_bias else None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, num_salient={self.num_salient}, "
                f"zero_signs={self.zero_signs.numel()}, factors={str(self.alpha.dtype).replace('torch.', '')}, "
                f"bias={self.bias is not None}, bits_per_weight={self.bits_per_weight():.4f}")
