"""blockops' own checkpoint format for quantized layers, shared by the pipeline's folders
(`blockops.quant.pipeline.save_quantized` / `load_quantized`) and the transformers quantizer
(`blockops.integrations.transformers`): each layer's tensors are stored under their state-dict names, and a JSON
"spec" per layer (its class and constructor arguments, `layer_spec`) is enough to rebuild an empty layer of the same
shape (`empty_layer`) into which those tensors then load by name."""
from __future__ import annotations

import torch
from torch import nn

from blockops.nn.ptq161_linear import PTQ161Linear
from blockops.nn.quant_linear import QuantLinear
from blockops.nn.vq_linear import VQLinear

QUANTIZED_LAYERS = (QuantLinear, PTQ161Linear, VQLinear)
_DTYPES = {str(d): d for d in (torch.float16, torch.bfloat16, torch.float32)}


def _dtype(name: str, who: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"{who}: unknown dtype {name!r} in a layer spec; known: {sorted(_DTYPES)}")
    return _DTYPES[name]


def layer_spec(layer: nn.Module) -> dict:
    """The JSON-able description of a quantized layer: ``{"type": class name, constructor arguments...}``."""
    if isinstance(layer, QuantLinear):
        return {"type": "QuantLinear", "in_features": layer.in_features, "out_features": layer.out_features,
                "bits": layer.bits, "group_size": layer.group_size, "bias": layer.bias is not None,
                "dtype": str(layer.scales.dtype), "train_zeros": isinstance(layer.zeros, nn.Parameter)}
    if isinstance(layer, PTQ161Linear):
        # zero_signs has one entry per sign(0) weight (usually none): its length is part of the shape.
        return {"type": "PTQ161Linear", "in_features": layer.in_features, "out_features": layer.out_features,
                "num_salient": layer.num_salient, "bias": layer.bias is not None,
                "factor_dtype": str(layer.alpha.dtype), "zero_signs": layer.zero_signs.numel()}
    if isinstance(layer, VQLinear):
        return {"type": "VQLinear", "in_features": layer.in_features, "out_features": layer.out_features,
                "codebook_size": layer.codebook_size, "vector_dim": layer.vector_dim,
                "num_codebooks": layer.num_codebooks, "bias": layer.bias is not None,
                "scales": layer.scales is not None, "dtype": str(layer.codebooks.dtype)}
    raise TypeError(f"layer_spec: {type(layer).__name__} is not a blockops quantized layer "
                    f"({', '.join(c.__name__ for c in QUANTIZED_LAYERS)})")


def empty_layer(spec: dict, device=None, who: str = "empty_layer") -> nn.Module:
    """A layer of ``spec``'s class and shape (values to be loaded by state-dict name)."""
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind == "QuantLinear":
        return QuantLinear(dtype=_dtype(spec.pop("dtype"), who), device=device, **spec)
    if kind == "PTQ161Linear":
        zero_signs = spec.pop("zero_signs", 0)
        layer = PTQ161Linear(factor_dtype=_dtype(spec.pop("factor_dtype"), who), device=device, **spec)
        layer.zero_signs = torch.zeros(zero_signs, dtype=torch.int64, device=layer.alpha.device)
        return layer
    if kind == "VQLinear":
        return VQLinear(dtype=_dtype(spec.pop("dtype"), who), device=device, **spec)
    raise ValueError(f"{who}: unknown layer type {kind!r}; known: {[c.__name__ for c in QUANTIZED_LAYERS]}")


def layer_specs(model: nn.Module, types=QUANTIZED_LAYERS) -> dict[str, dict]:
    """``{module name: layer_spec}`` for every quantized layer of ``model`` of one of ``types``."""
    return {name: layer_spec(m) for name, m in model.named_modules() if isinstance(m, types)}


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


__all__ = ["QUANTIZED_LAYERS", "empty_layer", "layer_spec", "layer_specs", "set_submodule"]
