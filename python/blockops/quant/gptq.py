"""Loading EfficientQAT / GPTQ-format checkpoints (``qweight``, ``qzeros``, ``scales``, optional ``g_idx`` and
``bias`` per layer) into a model: each named layer becomes a :class:`blockops.nn.QuantLinear`
(`load_gptq_checkpoint`)."""
from __future__ import annotations

import json
import os

from torch import nn

from blockops.checkpoint import load_safetensors
from blockops.nn.quant_linear import QuantLinear
from blockops.quant.rtn import _set_submodule


def _read_quantize_config(path: str) -> dict:
    for candidate in ("quantize_config.json", "quant_config.json"):
        file = os.path.join(path, candidate)
        if os.path.exists(file):
            with open(file) as f:
                return json.load(f)
    config = os.path.join(path, "config.json")
    if os.path.exists(config):
        with open(config) as f:
            return json.load(f).get("quantization_config", {})
    return {}


def load_gptq_checkpoint(model: nn.Module, path_or_state_dict, *, bits: int | None = None,
                         group_size: int | None = None, checkpoint_format: str | None = None) -> nn.Module:
    """Load an EfficientQAT / GPTQ-format state dict (tensors ``<layer>.qweight``, ``.qzeros``, ``.scales``,
    optional ``.g_idx`` and ``.bias``) into ``model``, replacing each named layer by a ``QuantLinear``.

    ``path_or_state_dict``: a dict of tensors, a ``.safetensors`` file, or a folder of ``*.safetensors``
    files (whose ``quantize_config.json`` or ``config.json["quantization_config"]`` supplies ``bits``,
    ``group_size`` and the format when they are not given: ``checkpoint_format`` or ``sym``-less GPTQ v1
    defaults to ``"gptq_v2"`` for EfficientQAT). Other tensors are loaded into the model's matching
    parameters and buffers."""
    config: dict = {}
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        path = os.fspath(path_or_state_dict)
        if os.path.isdir(path):
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if not files:
                raise FileNotFoundError(f"load_gptq_checkpoint: no .safetensors files in {path}")
            state = {}
            for f in files:
                state.update(load_safetensors(os.path.join(path, f), "load_gptq_checkpoint"))
            config = _read_quantize_config(path)
        else:
            state = load_safetensors(path, "load_gptq_checkpoint")
    else:
        state = dict(path_or_state_dict)
    bits = bits or config.get("bits") or config.get("w_bit")
    group_size = group_size or config.get("group_size")
    checkpoint_format = checkpoint_format or config.get("checkpoint_format", "gptq_v2")
    if bits is None or group_size is None:
        raise ValueError("load_gptq_checkpoint: bits and group_size are needed (not found in a quantize config)")

    layers = sorted({k[: -len(".qweight")] for k in state if k.endswith(".qweight")})
    if not layers:
        raise ValueError("load_gptq_checkpoint: the checkpoint has no '*.qweight' tensors")
    used = set()
    for name in layers:
        for part in ("qzeros", "scales"):
            if f"{name}.{part}" not in state:
                raise KeyError(f"load_gptq_checkpoint: the checkpoint is missing {name}.{part}")
        try:
            target = model.get_submodule(name)
        except AttributeError as e:
            raise KeyError(f"load_gptq_checkpoint: the model has no layer {name!r}") from e
        if not isinstance(target, (nn.Linear, QuantLinear)):
            raise TypeError(f"load_gptq_checkpoint: {name!r} is a {type(target).__name__}, not a linear layer")
        try:
            layer = QuantLinear.from_gptq(
                state[f"{name}.qweight"], state[f"{name}.qzeros"], state[f"{name}.scales"], state.get(f"{name}.bias"),
                bits=bits, group_size=group_size, checkpoint_format=checkpoint_format, g_idx=state.get(f"{name}.g_idx"))
        except ValueError as e:
            # from_gptq names the tensor; only this loop knows the layer.
            raise ValueError(f"load_gptq_checkpoint: layer {name!r}: {e}") from e
        if (layer.in_features, layer.out_features) != (target.in_features, target.out_features):
            raise ValueError(f"load_gptq_checkpoint: {name!r} is {target.in_features}->{target.out_features} in the "
                             f"model but {layer.in_features}->{layer.out_features} in the checkpoint")
        device = next(target.parameters(), layer.qweight).device
        _set_submodule(model, name, layer.to(device))
        used.update(f"{name}.{p}" for p in ("qweight", "qzeros", "scales", "g_idx", "bias"))
    rest = {k: v for k, v in state.items() if k not in used}
    if rest:
        model.load_state_dict(rest, strict=False)
    return model


__all__ = ["load_gptq_checkpoint"]
