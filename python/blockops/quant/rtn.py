"""Uniform 2/3/4-bit round-to-nearest quantization: the min-max quantizer of one weight (`quantize_rtn`, behind
``QuantLinear.from_linear`` and EfficientQAT's initialisation) and the model-level swap of nn.Linear layers for
QuantLinear (`quantize_`, `QuantConfig`). Loading EfficientQAT / GPTQ checkpoints: blockops/quant/gptq.py."""
from __future__ import annotations

import dataclasses
import sys
from typing import Callable

import torch
from torch import nn

from blockops.nn.quant_linear import QuantLinear


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Uniform group-wise quantization: ``bits`` in {2, 3, 4}, ``group_size`` a multiple of 16, scales dtype
    (None: the layer's fp16/bf16 dtype, fp16 for fp32 layers)."""

    bits: int = 2
    group_size: int = 64
    dtype: torch.dtype | None = None


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def quantize_(model: nn.Module, config: QuantConfig = QuantConfig(),
              filter_fn: Callable[[nn.Module, str], bool] | None = None) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` of ``model`` (for which ``filter_fn(module, name)`` is true, if
    given) by ``QuantLinear.from_linear(linear, config.bits, config.group_size)``. Raises if a selected layer's
    in_features is not divisible by the group size (exclude it with ``filter_fn``). A transformers model is also
    marked as blockops-quantized (`blockops.integrations.transformers.attach_quantizer`, method ``"rtn"``), so
    ``save_pretrained`` / ``from_pretrained`` round-trip it. Returns ``model``."""
    selected = [(name, m) for name, m in model.named_modules()
                if isinstance(m, nn.Linear) and (filter_fn is None or filter_fn(m, name))]
    for name, linear in selected:
        if linear.in_features % config.group_size:
            raise ValueError(f"quantize_: layer {name!r} has in_features={linear.in_features}, not divisible by "
                             f"group_size={config.group_size}; exclude it with filter_fn")
    for name, linear in selected:
        _set_submodule(model, name, QuantLinear.from_linear(linear, config.bits, config.group_size, config.dtype))
    if "transformers" in sys.modules:   # a transformers model: record the quantization for save_pretrained
        from blockops.integrations.transformers import attach_quantizer

        attach_quantizer(model, "rtn", config.bits, config.group_size)
    return model


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int):
    """Min-max round-to-nearest: returns integer codes ``q [out, in]`` (int32) and fp32 ``scales``, ``zeros``
    ``[in / group_size, out]`` (see :meth:`QuantLinear.from_linear`)."""
    out_features, in_features = weight.shape
    if in_features % group_size:
        raise ValueError(f"quantize_rtn: in_features={in_features} is not divisible by group_size={group_size}")
    qmax = (1 << bits) - 1
    w = weight.float().reshape(out_features, in_features // group_size, group_size)
    wmin, wmax = w.amin(-1), w.amax(-1)
    scales = ((wmax - wmin) / qmax).clamp(1e-4, 1e4)
    zeros = (-wmin / scales).round().clamp(0, qmax)
    q = (w / scales.unsqueeze(-1)).round().add(zeros.unsqueeze(-1)).clamp(0, qmax)
    return q.reshape(out_features, in_features).to(torch.int32), scales.t().contiguous(), zeros.t().contiguous()


__all__ = ["QuantConfig", "quantize_", "quantize_rtn"]
