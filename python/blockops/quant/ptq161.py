"""PTQ1.61 (1.61-bit post-training quantization) on blockops' packed format and kernels.

Pipeline (the paper's, per decoder block): :func:`collect_act_scales` on calibration data ->
:func:`quantize_linears` (every ``nn.Linear`` of a block -> :class:`blockops.nn.PTQ161Linear`, salient channels by
activation magnitude) -> :func:`optimize_block` (alpha, r1, r2 trained against the full-precision block through the
kernels' backward). :func:`quantization_preprocessing` is the paper's optional first pass (LoRA on the quantized
model merged into the full-precision weights before quantizing again).

:func:`quantize_weight` is the initial quantization of one weight into the packed format (layout in
blockops/ops/ptq161.py and csrc/ptq161.h), behind :meth:`blockops.nn.PTQ161Linear.from_linear`.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from blockops.nn.ptq161_linear import PTQ161Linear
from blockops.ops._common import _FLOAT_DTYPES
from blockops.ops.bitpack import pack_bits
from blockops.ops.ptq161 import SALIENT_ALIGN, salient_padded

_TRAINABLE_LR = {"alpha": "lr_alpha", "r1": "lr_r", "r2": "lr_r"}


def salient_count(in_features: int, salient_ratio: float, salient_align: int = SALIENT_ALIGN) -> int:
    """``S``: ``salient_ratio * in`` rounded to the nearest multiple of ``salient_align`` (so that no code padding
    is stored; 1 gives the exact ratio), within ``[0, in]``."""
    if not 0.0 <= salient_ratio <= 1.0:
        raise ValueError(f"salient_ratio must be in [0, 1], got {salient_ratio}")
    if salient_align < 1:
        raise ValueError(f"salient_align must be >= 1, got {salient_align}")
    return min(in_features, max(0, round(salient_ratio * in_features / salient_align) * salient_align))


def quantize_weight(weight: torch.Tensor, act_scales: torch.Tensor, salient_ratio: float = 0.2,
                    salient_align: int = SALIENT_ALIGN, factor_dtype: torch.dtype = torch.float16) -> tuple[dict, int]:
    """PTQ1.61's initial quantization of ``weight [out, in]``, packed. Returns ``(tensors, num_salient)`` with
    ``tensors`` the :data:`~blockops.ops.ptq161.FIELDS` of the format.

    1. The ``S`` (:func:`salient_count`) input channels with the largest ``act_scales [in]`` (max |x| per channel)
       are salient; ``perm`` lists them, then the others, each part ascending (ties: the lower channel first).
    2. Salient columns: 4-bit per row, asymmetric min-max with the range widened to include 0:
       ``s = (max(w_max, 0) - min(w_min, 0)) / 15``, ``z = round(-min(w_min, 0) / s)``,
       ``q = clamp(round(W / s) + z, 0, 15)`` (an all-zero row gets ``s = 1``, ``z = 0``).
    3. The others: ``mu`` = the row's mean, ``alpha`` = mean ``|W - mu|``, ``b = sign(W - mu)`` with
       ``sign(0) = 0`` recorded in ``zero_signs``; ``r1 = r2 = 1``.
    Factors are stored in ``factor_dtype``; codes and signs are computed from the stored (rounded) ``s``, ``z``
    and ``mu``, so :func:`blockops.reference.ref_ptq161_weight` on the stored factors reproduces the packed weight.
    """
    if weight.dim() != 2:
        raise ValueError(f"quantize_weight: weight must be [out, in], got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if act_scales.shape != (in_features,):
        raise ValueError(f"quantize_weight: act_scales must be [{in_features}], got {tuple(act_scales.shape)}")
    if factor_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"quantize_weight: factor_dtype must be fp16, bf16 or fp32, got {factor_dtype}")
    w = weight.detach().float()
    dev = w.device
    num_salient = salient_count(in_features, salient_ratio, salient_align)
    order = torch.sort(act_scales.detach().float().to(dev), descending=True, stable=True).indices
    salient = order[:num_salient].sort().values
    plain = order[num_salient:].sort().values
    perm = torch.cat([salient, plain]).to(torch.int32)

    w_sal = w[:, salient]
    lo = w_sal.amin(1).clamp_max(0) if num_salient else torch.zeros(out_features, device=dev)
    hi = w_sal.amax(1).clamp_min(0) if num_salient else torch.zeros(out_features, device=dev)
    scale = ((hi - lo) / 15).to(factor_dtype).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / scale).clamp(0, 15)
    q = torch.clamp(torch.round(w_sal / scale[:, None]) + zero[:, None], 0, 15).to(torch.int32)   # [out, S]
    q = torch.nn.functional.pad(q, (0, salient_padded(num_salient) - num_salient))

    w_plain = w[:, plain]
    n_plain = w_plain.shape[1]
    mu = (w_plain.mean(1) if n_plain else torch.zeros(out_features, device=dev)).to(factor_dtype).float()
    centered = w_plain - mu[:, None]
    alpha = centered.abs().mean(1) if n_plain else torch.zeros(out_features, device=dev)
    sign = torch.sign(centered).t().contiguous()                                                   # [N, out]
    tensors = {
        "perm": perm,
        "qsalient": pack_bits(q.t().contiguous(), 4, 0),
        "salient_scale": scale.to(factor_dtype),
        "salient_zero": zero.to(factor_dtype),
        "signs": pack_bits((sign > 0).to(torch.uint8), 1, 0),
        "zero_signs": torch.nonzero(sign.reshape(-1) == 0).reshape(-1),
        "alpha": alpha.to(factor_dtype),
        "mu": mu.to(factor_dtype),
        "r1": torch.ones(out_features, dtype=factor_dtype, device=dev),
        "r2": torch.ones(in_features, dtype=factor_dtype, device=dev),
    }
    return tensors, num_salient


def _call(model, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def collect_act_scales(model: nn.Module, batches: Iterable) -> dict[str, torch.Tensor]:
    """Per-input-channel ``max |x|`` over ``batches`` for every ``nn.Linear`` of ``model`` (forward hooks), keyed
    by module name: fp32 ``[in_features]`` on the layer's device. A batch is a tensor, a tuple (positional
    arguments) or a dict (keyword arguments) for ``model``."""
    scales: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args):
            x = args[0].detach()
            peak = x.reshape(-1, x.shape[-1]).abs().float().amax(0)
            scales[name] = peak if name not in scales else torch.maximum(scales[name], peak)
        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        for batch in batches:
            _call(model, batch)
    finally:
        for h in handles:
            h.remove()
    return scales


def quantize_linears(module: nn.Module, act_scales: dict[str, torch.Tensor], salient_ratio: float = 0.2,
                     prefix: str = "", **kwargs) -> nn.Module:
    """Replaces, in place, every ``nn.Linear`` of ``module`` by :meth:`PTQ161Linear.from_linear` with its
    ``act_scales[prefix + name]`` (names as :func:`collect_act_scales` gives them for the model that ``module`` is
    part of: pass that ``prefix``, e.g. ``"layers.3."``); returns ``module``. ``kwargs`` go to ``from_linear``."""
    for name, child in list(module.named_modules()):
        if isinstance(child, nn.Linear):
            key = prefix + name
            if key not in act_scales:
                raise KeyError(f"quantize_linears: no activation scales for {key!r}; run collect_act_scales first")
            q = PTQ161Linear.from_linear(child, act_scales[key], salient_ratio, **kwargs)
            parent_name, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent_name) if parent_name else module, attr, q)
    return module


def _neg_log_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """-log |cos(a, b)|, cosine per token over the last (hidden) dim, averaged over tokens."""
    cos = F.cosine_similarity(a.float().flatten(0, -2), b.float().flatten(0, -2), dim=-1)
    return -torch.log(cos.abs().mean().clamp_min(1e-12))


def block_loss(q_out: torch.Tensor, fp_out: torch.Tensor, fp_on_q_in: torch.Tensor) -> torch.Tensor:
    """PTQ1.61's block objective: ``MSE(fp_out, q_out) + MSE(fp_block(q_in), q_out) - log|cos(q_out, fp_out)|
    - log|cos(fp_block(q_in), q_out)|`` (``fp_out``: the full-precision block on the full-precision inputs)."""
    q = q_out.float()
    return (F.mse_loss(q, fp_out.float()) + F.mse_loss(q, fp_on_q_in.float())
            + _neg_log_cos(q, fp_out) + _neg_log_cos(fp_on_q_in, q))


def optimize_block(fp_block: nn.Module, q_block: nn.Module, inputs: torch.Tensor, epochs: int = 20,
                   fp_inputs: torch.Tensor | None = None, lr_alpha: float = 5e-4, lr_r: float = 1e-3,
                   batch_size: int = 1, seed: int = 0, progress: bool = True) -> list[float]:
    """PTQ1.61's block-wise optimisation: trains the ``alpha``, ``r1`` and ``r2`` of every
    :class:`PTQ161Linear` in ``q_block`` (AdamW, no weight decay, lr ``lr_alpha`` for alpha and ``lr_r`` for r1/r2;
    everything else frozen) to minimise :func:`block_loss` over ``epochs`` passes.

    Args:
        fp_block: the full-precision block (frozen).  q_block: its quantized copy (its PTQ161Linear layers).
        inputs: the quantized model's inputs to this block ``[samples, ...]`` (the previous quantized block's
            outputs; the paper uses 128 calibration samples).
        fp_inputs: the full-precision model's inputs to this block (default: ``inputs``).
        batch_size: samples per step; seed: the order of samples in each epoch (a private generator).
        progress: show a tqdm bar (loss per epoch as postfix).

    The factors train in fp32 and are stored back in their own dtype at the end. Returns the mean loss of each
    epoch. The block must map a tensor to a tensor (or a tuple whose first element is the hidden state).
    """
    from tqdm import tqdm

    fp_inputs = inputs if fp_inputs is None else fp_inputs
    if fp_inputs.shape[0] != inputs.shape[0]:
        raise ValueError(f"optimize_block: inputs ({inputs.shape[0]}) and fp_inputs ({fp_inputs.shape[0]}) "
                         "need the same number of samples")
    layers = [m for m in q_block.modules() if isinstance(m, PTQ161Linear)]
    if not layers:
        raise ValueError("optimize_block: q_block has no PTQ161Linear layer; quantize it first (quantize_linears)")
    with torch.no_grad():
        fp_out = torch.cat([_first(fp_block(fp_inputs[s:s + batch_size])) for s in range(0, len(inputs), batch_size)])
        fp_on_q = torch.cat([_first(fp_block(inputs[s:s + batch_size])) for s in range(0, len(inputs), batch_size)])
    frozen = [p for p in q_block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    stored = {}
    groups = {"lr_alpha": [], "lr_r": []}
    for layer in layers:
        for name, group in _TRAINABLE_LR.items():
            param = getattr(layer, name)
            stored[(layer, name)] = param.dtype
            param.data = param.data.float()
            param.requires_grad_(True)
            groups[group].append(param)
    optimizer = torch.optim.AdamW([{"params": groups["lr_alpha"], "lr": lr_alpha},
                                   {"params": groups["lr_r"], "lr": lr_r}], weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    history = []
    bar = tqdm(range(epochs), desc="PTQ1.61 block", disable=not progress)
    try:
        for _ in bar:
            total, steps = 0.0, 0
            order = torch.randperm(len(inputs), generator=gen)
            for s in range(0, len(inputs), batch_size):
                idx = order[s:s + batch_size].to(inputs.device)
                loss = block_loss(_first(q_block(inputs[idx])), fp_out[idx], fp_on_q[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total, steps = total + loss.item(), steps + 1
            history.append(total / max(steps, 1))
            bar.set_postfix(loss=f"{history[-1]:.4g}")
    finally:
        for (layer, name), dtype in stored.items():
            param = getattr(layer, name)
            param.requires_grad_(False)
            param.data = param.data.to(dtype)
        for p in frozen:
            p.requires_grad_(True)
    return history


class _LoRA(nn.Module):
    """A quantized layer plus a trainable low-rank update ``x A^T B^T * (alpha / rank)`` (B starts at 0)."""

    def __init__(self, base: PTQ161Linear, rank: int, scaling: float):
        super().__init__()
        self.base, self.scaling = base, scaling
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features, device=base.alpha.device) / math.sqrt(base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.alpha.device))

    def forward(self, x):
        y = self.base(x)
        return y + ((x.float() @ self.lora_a.t()) @ self.lora_b.t() * self.scaling).to(y.dtype)


def quantization_preprocessing(model: nn.Module, batches: list, loss_fn: Callable[[nn.Module, object], torch.Tensor],
                               salient_ratio: float = 0.2, rank: int = 8, lora_alpha: float = 16.0, steps: int = 100,
                               lr: float = 1e-4, seed: int = 0, progress: bool = True) -> nn.Module:
    """PTQ1.61's "quantization preprocessing": quantize once, train a LoRA on the quantized model, merge it into the
    full-precision weights; run the PTQ pipeline again on the returned model.

    1. :func:`collect_act_scales` on ``batches`` and a quantized copy of ``model`` (every ``nn.Linear`` ->
       PTQ161Linear, initial quantization, no block optimisation).
    2. A LoRA of ``rank`` (scaling ``lora_alpha / rank``) on every quantized layer, trained alone (AdamW, ``lr``)
       for ``steps`` steps of ``loss_fn(quantized_model, batch)`` cycling over ``batches``.
    3. ``W += (lora_alpha / rank) B A`` on the matching ``nn.Linear`` of ``model`` (in place); returns ``model``.
    """
    from tqdm import tqdm

    torch.manual_seed(seed)
    scales = collect_act_scales(model, batches)
    q_model = quantize_linears(copy.deepcopy(model), scales, salient_ratio)
    for p in q_model.parameters():
        p.requires_grad_(False)
    adapters = {}
    for name, layer in list(q_model.named_modules()):
        if isinstance(layer, PTQ161Linear):
            adapter = _LoRA(layer, rank, lora_alpha / rank)
            parent_name, _, attr = name.rpartition(".")
            setattr(q_model.get_submodule(parent_name) if parent_name else q_model, attr, adapter)
            adapters[name] = adapter
    params = [p for a in adapters.values() for p in (a.lora_a, a.lora_b)]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for step in tqdm(range(steps), desc="PTQ1.61 preprocessing (LoRA)", disable=not progress):
        loss = loss_fn(q_model, batches[step % len(batches)])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        for name, adapter in adapters.items():
            linear = model.get_submodule(name)
            delta = (adapter.lora_b @ adapter.lora_a) * adapter.scaling
            linear.weight.add_(delta.to(linear.weight.dtype))
    return model


__all__ = ["block_loss", "collect_act_scales", "optimize_block", "quantization_preprocessing", "quantize_linears",
           "quantize_weight", "salient_count"]
