"""blockops in HuggingFace transformers (5.x), through its public extension points only.

**Quantizer** (``register_quantization_config`` / ``register_quantizer``, ``quant_method: "blockops"``). A model
quantized by blockops (`blockops.quantize_`, the ``python -m blockops quantize`` drivers, or by hand followed by
`attach_quantizer`) carries a `BlockopsHfQuantizer`; ``model.save_pretrained(dir)`` then writes every tensor under
its state-dict name (blockops' own format, `blockops.quant.formats`) and, in ``config.json``, a
``quantization_config``::

    {"quant_method": "blockops", "method": "rtn", "bits": 2, "group_size": 64, "settings": {...},
     "layers": {"encoder.layer.0.attention.self.query": {"type": "QuantLinear", "bits": 2, ...}, ...}}

``AutoModel.from_pretrained(dir)`` (blockops imported first) rebuilds each listed layer empty before the weights
load, so they load by name, exactly. Loading with ``device_map`` runs the same code (layers are rebuilt on the meta
device and materialised by transformers where the map says).

**Attention backend** ``attn_implementation="blockops"`` (``AttentionInterface`` + ``AttentionMaskInterface``):
block-sparse attention (`blockops.attention.block_sparse_attention`) over a `BlockMask` given as

* ``model(..., blockops_mask=mask)``: a per-call keyword (forwarded by transformers to the attention function);
* ``model.config.blockops_attention = {"mask": "blockbert", "num_blocks": 2}``: a builder of
  `blockops.attention.masks` and its arguments (the sequence length, and ``heads`` when the builder needs it, are
  filled in; built once per length and device);
* ``model(input_ids, attention_mask=mask)`` with a blockops `BlockMask` as the mask.

The BlockMask is the whole attention pattern: it replaces the model's own causal / bidirectional mask (a decoder
needs a causal BlockMask, e.g. ``masks.causal`` or ``masks.sink_window_strided``). transformers' 2-D padding mask is
combined with it (`blockops.attention.masks.key_padding`): padded keys are never attended. Without a BlockMask
the backend runs transformers' SDPA attention with transformers' own mask.

Under ``torch.compile``: building a mask (and combining padding) reads the mask's values on the host, which breaks
the graph. Build it outside and pass it in::

    mask = masks.key_padding(masks.blockbert(T, 2, heads), batch["attention_mask"])   # eager
    out = torch.compile(model, fullgraph=True)(input_ids, blockops_mask=mask)        # no attention_mask
"""
from __future__ import annotations

import inspect
from collections import OrderedDict

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, prepare_padding_mask, sdpa_mask
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from blockops.attention import BlockMask, block_sparse_attention, masks
from blockops.attention.block_mask import expected_block_mask
from blockops.quant import formats

QUANT_METHOD = "blockops"
ATTN_IMPLEMENTATION = "blockops"
# What a blockops quantization_config may name as its method: the pipeline's drivers.
METHODS = ("rtn", "efficientqat", "ptq161", "vq")
CHECKPOINT_FORMATS = ("blockops", "gptq_v2")


# ---- quantizer --------------------------------------------------------------------------------------------------

class BlockopsConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a blockops-quantized model.

    Args:
        method: one of `METHODS` (how the layers were made; loading does not depend on it, but an unknown name is
            refused so a misspelt or foreign config is not read as blockops').
        bits, group_size: the method's headline settings (informational; each layer's own are in ``layers``).
        layers: ``{module name: formats.layer_spec}``, the layers to rebuild before the weights load.
        settings: any other JSON-able settings of the run (recorded, not used to load).
        checkpoint_format: ``"blockops"`` (every tensor under its state-dict name: what ``save_pretrained``
            writes) or ``"gptq_v2"`` (`QuantLinear` layers stored as GPTQ-v2 ``qweight`` / ``qzeros`` / ``scales``
            / ``g_idx``: the folders of ``python -m blockops quantize`` for rtn / efficientqat).
    """

    def __init__(self, method: str, bits: int | None = None, group_size: int | None = None,
                 layers: dict | None = None, settings: dict | None = None, checkpoint_format: str = "blockops",
                 **kwargs):
        self.quant_method = QUANT_METHOD
        if method not in METHODS:
            raise ValueError(f"blockops quantization_config: unknown method {method!r}; known: {list(METHODS)}")
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(f"blockops quantization_config: unknown checkpoint_format {checkpoint_format!r}; "
                             f"known: {list(CHECKPOINT_FORMATS)}")
        self.method, self.bits, self.group_size = method, bits, group_size
        self.checkpoint_format = checkpoint_format
        self.layers = dict(layers or {})
        self.settings = dict(settings or {})
        for name, spec in self.layers.items():
            if not isinstance(spec, dict) or spec.get("type") not in {c.__name__ for c in formats.QUANTIZED_LAYERS}:
                raise ValueError(f"blockops quantization_config: layer {name!r} has spec {spec!r}; its 'type' must be "
                                 f"one of {[c.__name__ for c in formats.QUANTIZED_LAYERS]}")


class BlockopsHfQuantizer(HfQuantizer):
    """Loads (and saves) models whose linear layers are blockops' `QuantLinear` / `VQLinear` / `PTQ161Linear`:
    the layers named in the config are rebuilt empty before the weights load by state-dict name. Only
    pre-quantized checkpoints: quantize with blockops (`blockops.quantize_`, the pipeline) first."""

    requires_calibration = True

    def _process_model_before_weight_loading(self, model, **kwargs):
        who = f"from_pretrained (quant_method {QUANT_METHOD!r})"
        for name, spec in self.quantization_config.layers.items():
            try:
                old = model.get_submodule(name)
            except AttributeError as e:
                raise ValueError(f"{who}: the config lists layer {name!r}, which this model does not have") from e
            weight = getattr(old, "weight", None)
            device = weight.device if isinstance(weight, torch.Tensor) else None
            if self.quantization_config.checkpoint_format == "gptq_v2" and spec.get("type") == "QuantLinear":
                layer = _GPTQTensors(spec, device)
            else:
                layer = formats.empty_layer(spec, device=device, who=who)
            formats.set_submodule(model, name, layer)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        gptq = [(name, m) for name, m in model.named_modules() if isinstance(m, _GPTQTensors)]
        for name, m in gptq:
            formats.set_submodule(model, name, m.to_quant_linear())
        self.quantization_config.checkpoint_format = "blockops"   # what the model's state_dict now is
        return model

    def get_state_dict_and_metadata(self, model):
        # Called by save_pretrained before the config is written: the layer list follows the model as it is now
        # (layers swapped after attach_quantizer are included), stored under state-dict names.
        self.quantization_config.layers = formats.layer_specs(model)
        self.quantization_config.checkpoint_format = "blockops"
        return None, {}

    def update_dtype(self, dtype):
        return dtype

    @property
    def is_trainable(self) -> bool:
        return True   # the layers' scales / codebooks / factors have gradients (the kernels' backward ops)

    @property
    def is_compileable(self) -> bool:
        return True

    def is_serializable(self):
        return True


class _GPTQTensors(nn.Module):
    """Holds one `QuantLinear`'s GPTQ-v2 tensors (names and shapes of `QuantLinear.to_gptq`) while transformers
    loads a ``checkpoint_format: "gptq_v2"`` folder; replaced by ``QuantLinear.from_gptq`` after loading."""

    def __init__(self, spec: dict, device):
        super().__init__()
        from blockops.ops.bitpack import packed_length

        self.bits, self.group_size = spec["bits"], spec["group_size"]
        n_in, n_out, groups = spec["in_features"], spec["out_features"], spec["in_features"] // spec["group_size"]
        i32 = dict(dtype=torch.int32, device=device)
        self.register_buffer("qweight", torch.zeros(packed_length(n_in, self.bits), n_out, **i32))
        self.register_buffer("qzeros", torch.zeros(groups, packed_length(n_out, self.bits), **i32))
        dtype = formats._dtype(spec["dtype"], "from_pretrained")
        self.register_buffer("scales", torch.zeros(groups, n_out, dtype=dtype, device=device))
        self.register_buffer("g_idx", torch.zeros(n_in, **i32))
        self.register_buffer("bias", torch.zeros(n_out, dtype=dtype, device=device) if spec["bias"] else None)

    def to_quant_linear(self) -> nn.Module:
        from blockops.nn import QuantLinear

        return QuantLinear.from_gptq(self.qweight, self.qzeros, self.scales, self.bias, bits=self.bits,
                                     group_size=self.group_size, checkpoint_format="gptq_v2", g_idx=self.g_idx)


def attach_quantizer(model: nn.Module, method: str, bits: int | None = None, group_size: int | None = None,
                     settings: dict | None = None, checkpoint_format: str = "blockops") -> nn.Module:
    """Mark a transformers model whose layers blockops quantized (in place) as a blockops-quantized model, so that
    ``save_pretrained`` writes the ``quantization_config`` that ``from_pretrained`` needs. `blockops.quantize_` and
    the pipeline's ``quantize_model`` call it; call it yourself after swapping layers by hand. Not a transformers
    model (no ``config``): returned unchanged. Returns ``model``."""
    if not isinstance(model, PreTrainedModel):
        return model
    config = BlockopsConfig(method, bits, group_size, formats.layer_specs(model), settings, checkpoint_format)
    model.config.quantization_config = config
    model.hf_quantizer = BlockopsHfQuantizer(config, pre_quantized=True)
    return model


# ---- attention backend ------------------------------------------------------------------------------------------

class BlockopsMaskInputs:
    """What the ``"blockops"`` mask function hands the attention function (once per forward, shared by the layers):
    the BlockMask from the config or from ``attention_mask`` (``pattern``, or None), the 2-D padding mask
    (``padding``, True = real token, or None when nothing is padded) and, for the SDPA fallback, transformers' own
    dense mask (``dense()``). Combinations with padding are cached here, so each layer reuses them."""

    def __init__(self, pattern, padding, dense_kwargs):
        self.pattern, self.padding = pattern, padding
        self._dense_kwargs, self._dense, self._combined = dense_kwargs, None, {}

    def dense(self):
        if self._dense is None and self._dense_kwargs is not None:
            self._dense = sdpa_mask(**self._dense_kwargs)
            self._dense_kwargs = None
        return self._dense

    def combined(self, pattern: BlockMask) -> BlockMask:
        if self.padding is None:
            return pattern
        key = id(pattern)
        if key not in self._combined:
            self._combined[key] = (pattern, masks.key_padding(pattern, self.padding))
        return self._combined[key][1]


# (spec, q_len, kv_len, heads, device) -> BlockMask: config patterns built once per length, the most recent
# _PATTERNS_KEPT kept (inference with varying lengths would otherwise keep one mask per length forever).
_PATTERNS: OrderedDict = OrderedDict()
_PATTERNS_KEPT = 32


def mask_from_spec(spec: dict, q_len: int, kv_len: int, heads: int, device) -> BlockMask:
    """The BlockMask of ``config.blockops_attention`` = ``{"mask": builder name in blockops.attention.masks,
    **arguments}`` for these lengths: the builder gets ``q_len`` first, ``kv_len`` when it differs (and the builder
    takes it), ``heads`` when the builder requires it, and ``device``."""
    if not isinstance(spec, dict) or "mask" not in spec:
        raise ValueError(f"config.blockops_attention must be a dict {{'mask': builder name, **arguments}}, got {spec!r}")
    args = {k: v for k, v in spec.items() if k != "mask"}
    builder = getattr(masks, spec["mask"], None) if spec["mask"] in masks.__all__ else None
    if builder is None:
        raise ValueError(f"config.blockops_attention: unknown mask builder {spec['mask']!r}; known: {masks.__all__}")
    params = inspect.signature(builder).parameters
    if "heads" in params and params["heads"].default is inspect.Parameter.empty and "heads" not in args:
        args["heads"] = heads
    if kv_len != q_len:
        if "kv_len" not in params:
            raise ValueError(f"config.blockops_attention: {spec['mask']!r} builds square masks, but the keys "
                             f"({kv_len}) outnumber the queries ({q_len}); pass blockops_mask= instead")
        args["kv_len"] = kv_len
    key = (repr(sorted(spec.items())), q_len, kv_len, heads, str(device))
    if key not in _PATTERNS:
        _PATTERNS[key] = builder(q_len, **args, device=device)
        while len(_PATTERNS) > _PATTERNS_KEPT:
            _PATTERNS.popitem(last=False)
    _PATTERNS.move_to_end(key)
    return _PATTERNS[key]


def blockops_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                  mask_function=None, attention_mask=None, device="cpu", config=None, **kwargs):
    """transformers' mask function for ``attn_implementation="blockops"`` (see `BlockopsMaskInputs`)."""
    pattern, padding = None, None
    if isinstance(attention_mask, BlockMask):
        pattern = attention_mask
    else:
        padding = attention_mask
        if padding is not None:
            # The keys of this call, as transformers' own mask functions read them (padded when a cache is longer).
            padding = prepare_padding_mask(padding, kv_length, kv_offset)[:, kv_offset:kv_offset + kv_length]
            if not torch.compiler.is_compiling() and bool(padding.all()):
                padding = None   # nothing padded: no combination needed
    spec = getattr(config, "blockops_attention", None) if config is not None else None
    if pattern is None and spec is not None:
        heads = getattr(config, "num_attention_heads", 1)
        pattern = mask_from_spec(spec, q_length, kv_length, heads, device)
    dense_kwargs = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                        kv_offset=kv_offset, attention_mask=None if isinstance(attention_mask, BlockMask)
                        else attention_mask, device=device, allow_is_causal_skip=False,
                        allow_is_bidirectional_skip=False, **({"mask_function": mask_function} if mask_function else {}))
    return BlockopsMaskInputs(pattern, padding, dense_kwargs)


def blockops_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """transformers' attention function for ``attn_implementation="blockops"``: ``query [B, H, Tq, D]``,
    ``key`` / ``value`` ``[B, Hk, Tk, D]``; returns ``(out [B, Tq, H, D], None)``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    pattern = kwargs.pop("blockops_mask", None)
    if pattern is not None and not isinstance(pattern, BlockMask):
        raise expected_block_mask(pattern, "blockops attention: blockops_mask")
    inputs = attention_mask if isinstance(attention_mask, BlockopsMaskInputs) else None
    if pattern is None and inputs is not None:
        pattern = inputs.pattern
    if pattern is None:
        dense = inputs.dense() if inputs is not None else attention_mask
        return sdpa_attention_forward(module, query, key, value, dense, dropout=dropout, scaling=scaling, **kwargs)
    if inputs is None and attention_mask is not None:
        raise ValueError("blockops attention: got both a BlockMask and a prepared attention_mask tensor "
                         f"{tuple(attention_mask.shape)}; give the padding as transformers' 2-D attention_mask")
    if dropout:
        raise ValueError(f"blockops attention: attention dropout is not supported (got p={dropout}); "
                         "call model.eval() or set the config's attention dropout to 0")
    if kwargs.get("output_attentions"):
        raise ValueError("blockops attention: output_attentions=True is not supported (no weights are formed)")
    mask = inputs.combined(pattern) if inputs is not None else pattern
    out = block_sparse_attention(query, key, value, mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


# ---- registration -----------------------------------------------------------------------------------------------

def register() -> None:
    """Register the quantizer and the attention backend with transformers (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(BlockopsConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(BlockopsHfQuantizer)
    AttentionInterface.register(ATTN_IMPLEMENTATION, blockops_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, blockops_mask)


__all__ = ["ATTN_IMPLEMENTATION", "BlockopsConfig", "BlockopsHfQuantizer", "BlockopsMaskInputs", "METHODS",
           "QUANT_METHOD", "attach_quantizer", "blockops_attention_forward", "blockops_mask", "mask_from_spec",
           "register"]
