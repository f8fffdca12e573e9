"""EfficientQAT (Chen et al., 2024) on blockops' QuantLinear.

Block-AP (`block_ap`): block by block, every linear weight is trained together with its group-wise scales and
zero points through a straight-through-estimator fake quantizer, on the MSE between the full-precision block's
output and the quantized block's output (the quantized block sees the previous quantized block's output); the
trained block is then packed into `QuantLinear`s. E2E-QP (`e2e_qp`): with integer codes and zero points frozen,
only the scales of every `QuantLinear` are trained end to end, through the fused kernels' backward.

The numerics of the fake quantizer (`fake_quant_codes`) are the ones `QuantLinear` stores, so packing is exact.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from blockops import checkpoint
from blockops.nn.quant_linear import QuantLinear
from blockops.quant.rtn import quantize_rtn

SCALE_MIN, SCALE_MAX = 1e-4, 1e4      # EfficientQAT's clamp of the scales
FINAL_LR_FRACTION = 1 / 20            # cosine decay down to lr / 20 (EfficientQAT's schedule)
CHECKPOINT_VERSION = 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (the straight-through estimator)."""
    return x + (x.round() - x).detach()


def fake_quant_codes(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int):
    """Codes and dequantized weight of ``weight [out, in]`` for per-(row, group) ``scale`` and ``zero``
    ``[out, in / g]`` (fp32): ``q = clamp(round(W / s) + round(z), 0, qmax)``, ``W_hat = (q - round(z)) * s``.
    Differentiable w.r.t. all three through the straight-through estimator. Returns ``(q, z, W_hat)``."""
    out_features, in_features = weight.shape
    groups = scale.shape[1]
    qmax = (1 << bits) - 1
    s = scale.clamp(SCALE_MIN, SCALE_MAX).unsqueeze(-1)
    z = round_ste(zero.clamp(0, qmax)).unsqueeze(-1)
    w = weight.reshape(out_features, groups, in_features // groups)
    q = (round_ste(w / s) + z).clamp(0, qmax)
    return q, z, ((q - z) * s).reshape(out_features, in_features)


class FakeQuantLinear(nn.Module):
    """Block-AP's training view of an ``nn.Linear``: trainable fp32 ``weight [out, in]``, ``scale`` and
    ``zero`` ``[out, in / group_size]`` (min-max round-to-nearest initialisation, as `QuantLinear.from_linear`);
    the forward multiplies by the fake-quantized weight. ``bias`` is kept as it is (frozen)."""

    def __init__(self, linear: nn.Linear, bits: int, group_size: int):
        super().__init__()
        if linear.in_features % group_size:
            raise ValueError(f"FakeQuantLinear: in_features={linear.in_features} is not divisible by "
                             f"group_size={group_size}")
        self.bits, self.group_size = bits, group_size
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        _, scales, zeros = quantize_rtn(weight, bits, group_size)
        self.weight = nn.Parameter(weight.clone())
        self.scale = nn.Parameter(scales.t().contiguous())
        self.zero = nn.Parameter(zeros.t().contiguous())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def quantized_weight(self) -> torch.Tensor:
        return fake_quant_codes(self.weight, self.scale, self.zero, self.bits)[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.quantized_weight().to(x.dtype), bias)

    @torch.no_grad()
    def snap_scales(self, dtype: torch.dtype) -> None:
        """Round the scales to their storage dtype (clamped as in the forward), so that the fake-quantized
        weight is exactly what `to_quant_linear` stores."""
        self.scale.copy_(self.scale.clamp(SCALE_MIN, SCALE_MAX).to(dtype).float())

    @torch.no_grad()
    def to_quant_linear(self, dtype: torch.dtype = torch.float16) -> QuantLinear:
        """The packed layer, scales stored in ``dtype``. After ``snap_scales(dtype)`` its ``dequantize()``
        equals ``quantized_weight()`` rounded to ``dtype`` (bit for bit)."""
        q, z, _ = fake_quant_codes(self.weight, self.scale, self.zero, self.bits)
        scales = self.scale.clamp(SCALE_MIN, SCALE_MAX)
        return QuantLinear.from_codes(q.reshape(self.out_features, self.in_features).to(torch.int32),
                                      scales.t().contiguous(), z.squeeze(-1).t().contiguous(), self.bias,
                                      bits=self.bits, group_size=self.group_size, dtype=dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}")


# ---- model structure ----------------------------------------------------------------------------------------

def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks: the ``nn.ModuleList`` holding the most linear-layer parameters (BERT's
    ``encoder.layer``, Llama's ``model.layers``, a plain stack's list)."""
    best, best_size = None, 0
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module):
            size = sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))
            if size > best_size:
                best, best_size = module, size
    if best is None:
        raise ValueError("find_blocks: the model has no nn.ModuleList of blocks with linear layers; pass blocks=")
    return best


def _linears(block: nn.Module, types, filter_fn) -> dict[str, nn.Module]:
    return {name: m for name, m in block.named_modules()
            if isinstance(m, types) and (filter_fn is None or filter_fn(m, name))}


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


# ---- capturing and replaying block inputs ---------------------------------------------------------------------

class _ReachedFirstBlock(Exception):
    """Raised by the capture hook to stop the forward pass once the first block's inputs are known."""


def _to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def default_forward(model: nn.Module, batch) -> object:
    return model(**batch) if isinstance(batch, dict) else model(batch)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, first_block: nn.Module, batches, forward_fn=default_forward):
    """Run ``forward_fn(model, batch)`` up to ``first_block`` for every batch. Returns ``(hidden, extras)``:
    the hidden states the block receives and the rest of its call (positional args after the hidden states,
    keyword args such as the attention mask) per batch."""
    hidden, extras = [], []

    def hook(_module, args, kwargs):
        if args:
            hidden.append(args[0])
            extras.append((args[1:], kwargs))
        else:
            kwargs = dict(kwargs)
            hidden.append(kwargs.pop("hidden_states"))
            extras.append(((), kwargs))
        raise _ReachedFirstBlock

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                forward_fn(model, batch)
            except _ReachedFirstBlock:
                continue
            raise RuntimeError("capture_block_inputs: the forward pass never called the first block")
    finally:
        handle.remove()
    return hidden, extras


def _run_block(block: nn.Module, hidden: torch.Tensor, extra, device) -> torch.Tensor:
    args, kwargs = _to_device(extra, device)
    out = block(hidden.to(device), *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _masked_mse(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """MSE over the tokens that ``mask [batch, tokens]`` marks valid (padding does not reach the output)."""
    if mask is None or mask.shape != out.shape[:2]:
        return F.mse_loss(out.float(), target.float())
    per_token = (out.float() - target.float()).pow(2).mean(-1)
    weights = mask.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp_min(1)


def _token_masks(batches, key: str | None):
    return [batch.get(key) if key and isinstance(batch, dict) else None for batch in batches]


# ---- Block-AP -------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class BlockReport:
    """Per-block outcome of Block-AP; losses are token-averaged MSE against the full-precision block output."""
    index: int
    train_loss: float                # mean over the last epoch
    val_loss_rtn: float | None       # validation loss of min-max round-to-nearest (the starting point)
    val_loss: float | None           # validation loss of the packed block
    seconds: float
    resumed: bool = False            # loaded from a checkpoint rather than trained in this run


def _cosine_with_warmup(step: int, total: int, warmup: int, final_fraction: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def _eval_loss(block, inputs, extras, targets, masks, device) -> float:
    total = 0.0
    for hidden, extra, target, mask in zip(inputs, extras, targets, masks):
        out = _run_block(block, hidden, extra, device)
        total += _masked_mse(out, target.to(device), None if mask is None else mask.to(device)).item()
    return total / max(1, len(inputs))


def block_ap(model: nn.Module, calib_batches: list, bits: int = 2, group_size: int = 64, epochs: int = 2,
             weight_lr: float | None = None, quant_lr: float = 1e-4, *, val_batches: list | None = None,
             blocks: nn.ModuleList | None = None, forward_fn: Callable = default_forward,
             filter_fn: Callable[[nn.Module, str], bool] | None = None, scales_dtype: torch.dtype = torch.float16,
             device: torch.device | str | None = None, checkpoint_dir: str | None = None, seed: int = 0,
             mask_key: str | None = "attention_mask", progress: bool = True) -> list[BlockReport]:
    """EfficientQAT's block-wise training of all parameters, in place: every ``nn.Linear`` inside each block
    of ``blocks`` (default `find_blocks(model)`) becomes a trained `QuantLinear` (``bits``, ``group_size``,
    scales and bias stored in ``scales_dtype``). Returns one `BlockReport` per block.

    Args:
        calib_batches: inputs for ``forward_fn(model, batch)`` (default ``model(**batch)``); the forward is
            stopped at the first block, whose inputs are captured. With ``mask_key`` (default
            ``"attention_mask"``), padded tokens are left out of the loss.
        epochs, weight_lr, quant_lr: passes over the calibration batches (one optimizer step per batch,
            visited in a seeded random order), AdamW learning rates of the weights (default EfficientQAT's
            2e-5 for 2-bit, 1e-5 otherwise) and of the scales and zero points; weight decay 0, cosine decay
            to lr / 20.
        val_batches: held-out batches; their loss is reported before training (round-to-nearest) and after
            packing.
        filter_fn: ``filter_fn(linear, name_in_block)`` selects the linears to quantize (default all).
        device: where each block is trained (default the model's device); the block moves there and back, so
            device memory holds one block and one batch at a time. Activations stay on the model's device.
        checkpoint_dir: after each block, its packed state is written there atomically; a later call with the
            same arguments and data skips the finished blocks (a killed run loses at most the block it was
            training). A checkpoint written with other arguments or data is refused.
        seed: each block seeds its own random state with ``seed + index``, so a resumed run is identical to an
            uninterrupted one.
    """
    from tqdm.auto import tqdm

    if bits not in (2, 3, 4):
        raise ValueError(f"block_ap: bits must be 2, 3 or 4, got {bits}")
    if epochs < 1 or not calib_batches:
        raise ValueError("block_ap: needs at least one epoch and one calibration batch")
    weight_lr = weight_lr if weight_lr is not None else (2e-5 if bits == 2 else 1e-5)
    blocks = find_blocks(model) if blocks is None else blocks
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    val_batches = list(val_batches or [])
    model.eval()   # dropout off: the targets and the trained block must see the same function

    meta = dict(version=CHECKPOINT_VERSION, bits=bits, group_size=group_size, epochs=epochs, weight_lr=weight_lr,
                quant_lr=quant_lr, scales_dtype=str(scales_dtype), seed=seed, num_blocks=len(blocks),
                data=checkpoint.fingerprint(list(calib_batches) + val_batches))
    if checkpoint_dir:
        os.makedirs(checkpoint_dir, exist_ok=True)

    fp_in, extras = capture_block_inputs(model, blocks[0], calib_batches, forward_fn)
    fp_in_val, extras_val = capture_block_inputs(model, blocks[0], val_batches, forward_fn)
    masks, masks_val = _token_masks(calib_batches, mask_key), _token_masks(val_batches, mask_key)
    q_in, q_in_val = list(fp_in), list(fp_in_val)
    reports = []
    for index, block in enumerate(blocks):
        start = time.perf_counter()
        block.to(device)
        with torch.no_grad():   # targets: the full-precision block on full-precision inputs
            fp_out = [_run_block(block, h, e, device).to(home) for h, e in zip(fp_in, extras)]
            fp_out_val = [_run_block(block, h, e, device).to(home) for h, e in zip(fp_in_val, extras_val)]
        path = checkpoint.block_path(checkpoint_dir, index) if checkpoint_dir else None
        if path and os.path.exists(path):
            report = _load_block(block, path, meta, filter_fn, device)
        else:
            report = _train_block(index, len(blocks), block, q_in, extras, fp_out, masks, q_in_val, extras_val,
                                  fp_out_val, masks_val, bits, group_size, epochs, weight_lr, quant_lr, filter_fn,
                                  scales_dtype, device, seed, progress, tqdm)
            report.seconds = time.perf_counter() - start
            if path:
                saved = {"meta": meta, "state": block.state_dict(), "report": dataclasses.asdict(report)}
                checkpoint.atomic_save(saved, path)
        with torch.no_grad():   # the next block's inputs: this quantized block on quantized inputs
            q_in = [_run_block(block, h, e, device).to(home) for h, e in zip(q_in, extras)]
            q_in_val = [_run_block(block, h, e, device).to(home) for h, e in zip(q_in_val, extras_val)]
        block.to(home)
        fp_in, fp_in_val = fp_out, fp_out_val
        reports.append(report)
        if progress:
            tqdm.write(_format_report(report, len(blocks)))
    return reports


def _format_report(r: BlockReport, num_blocks: int) -> str:
    val = "" if r.val_loss is None else f", val {r.val_loss_rtn:.4g} (RTN) -> {r.val_loss:.4g}"
    how = "resumed from checkpoint" if r.resumed else f"{r.seconds:.1f} s"
    return f"block-ap block {r.index + 1}/{num_blocks}: train {r.train_loss:.4g}{val} ({how})"


def _train_block(index, num_blocks, block, q_in, extras, fp_out, masks, q_in_val, extras_val, fp_out_val, masks_val,
                 bits, group_size, epochs, weight_lr, quant_lr, filter_fn, scales_dtype, device, seed, progress, tqdm):
    torch.manual_seed(seed + index)
    order_rng = torch.Generator().manual_seed(seed + index)
    linears = _linears(block, nn.Linear, filter_fn)
    if not linears:
        raise ValueError(f"block_ap: block {index} has no linear layer to quantize")
    fakes = {}
    for name, linear in linears.items():
        fakes[name] = FakeQuantLinear(linear, bits, group_size).to(device)
        _set_submodule(block, name, fakes[name])
    frozen = {p: p.requires_grad for p in block.parameters()}
    for p in block.parameters():
        p.requires_grad_(False)
    weights = [f.weight for f in fakes.values()]
    quant_params = [p for f in fakes.values() for p in (f.scale, f.zero)]
    for p in weights + quant_params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW([{"params": weights, "lr": weight_lr}, {"params": quant_params, "lr": quant_lr}],
                                  weight_decay=0.0)
    total = epochs * len(q_in)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _cosine_with_warmup(step, total, 0, FINAL_LR_FRACTION))
    val_rtn = _eval_loss(block, q_in_val, extras_val, fp_out_val, masks_val, device) if q_in_val else None

    bar = tqdm(total=total, desc=f"block-ap {index + 1}/{num_blocks}", disable=not progress, leave=False)
    epoch_loss = 0.0
    for _ in range(epochs):
        epoch_loss = 0.0
        for j in torch.randperm(len(q_in), generator=order_rng).tolist():
            out = _run_block(block, q_in[j], extras[j], device)
            mask = None if masks[j] is None else masks[j].to(device)
            loss = _masked_mse(out, fp_out[j].to(device), mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            epoch_loss += loss.item()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4g}")
        epoch_loss /= len(q_in)
    bar.close()

    for p, requires_grad in frozen.items():
        p.requires_grad_(requires_grad)
    for name, fake in fakes.items():
        fake.snap_scales(scales_dtype)
        _set_submodule(block, name, fake.to_quant_linear(scales_dtype))
    val = _eval_loss(block, q_in_val, extras_val, fp_out_val, masks_val, device) if q_in_val else None
    return BlockReport(index, epoch_loss, val_rtn, val, 0.0)


def _load_block(block, path, meta, filter_fn, device) -> BlockReport:
    saved = checkpoint.load_block(path, meta, "block_ap", map_location=device)
    for name, linear in _linears(block, nn.Linear, filter_fn).items():
        layer = QuantLinear(linear.in_features, linear.out_features, meta["bits"], meta["group_size"],
                            linear.bias is not None, getattr(torch, meta["scales_dtype"].split(".")[-1]), device)
        _set_submodule(block, name, layer)
    block.load_state_dict(saved["state"], strict=True)
    return dataclasses.replace(BlockReport(**saved["report"]), resumed=True)


# ---- E2E-QP ---------------------------------------------------------------------------------------------------

def e2e_qp(model: nn.Module, train_batches: list, loss_fn: Callable[[nn.Module, object], torch.Tensor],
           lr: float = 2e-5, steps: int | None = None, *, epochs: int = 1, warmup_ratio: float = 0.03,
           max_grad_norm: float | None = 0.3, seed: int = 0, train_dtype: torch.dtype = torch.float32,
           keep_train_dtype: bool = False, progress: bool = True) -> list[float]:
    """EfficientQAT's end-to-end training of the quantization parameters, in place: only the ``scales`` of every
    `QuantLinear` in ``model`` train (codes, zero points and every other parameter are frozen), through the
    fused kernels' backward (``blockops.quant_grad_scales``).

    ``loss_fn(model, batch)`` returns the scalar loss of one batch (e.g. distillation against the
    full-precision model). ``steps`` optimizer steps (default ``epochs * len(train_batches)``), batches in a
    seeded random order; AdamW (weight decay 0) with ``warmup_ratio`` linear warm-up then cosine decay to
    lr / 20, gradient norm clipped at ``max_grad_norm``. Scales train in ``train_dtype`` (fp32, as EfficientQAT)
    and are rounded back to their storage dtype at the end unless ``keep_train_dtype``. Returns the losses."""
    from tqdm.auto import tqdm

    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not layers:
        raise ValueError("e2e_qp: the model has no QuantLinear layers (quantize it first)")
    if not train_batches:
        raise ValueError("e2e_qp: needs at least one training batch")
    steps = steps if steps is not None else epochs * len(train_batches)
    torch.manual_seed(seed)
    order_rng = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    storage = [(layer.scales.dtype, layer.scales.requires_grad) for layer in layers]
    frozen = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers:
        _retype_quant_params(layer, train_dtype)
        layer.scales.requires_grad_(True)
    scales = [layer.scales for layer in layers]
    optimizer = torch.optim.AdamW(scales, lr=lr, weight_decay=0.0)
    warmup = int(round(warmup_ratio * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _cosine_with_warmup(step, steps, warmup, FINAL_LR_FRACTION))
    losses = []
    order: list[int] = []
    with tqdm(total=steps, desc="e2e-qp", disable=not progress, leave=False) as bar:
        for _ in range(steps):
            if not order:
                order = torch.randperm(len(train_batches), generator=order_rng).tolist()
            loss = loss_fn(model, train_batches[order.pop()])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(scales, max_grad_norm)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.4g}")
    for p, requires_grad in frozen.items():
        p.requires_grad_(requires_grad)
    for layer, (dtype, requires_grad) in zip(layers, storage):
        if not keep_train_dtype:
            _retype_quant_params(layer, dtype)
        layer.scales.requires_grad_(requires_grad)
    model.train(was_training)
    return losses


def _retype_quant_params(layer: QuantLinear, dtype: torch.dtype) -> None:
    """Scales (and the zero points, which the kernels take in the scales' dtype; integral values convert
    exactly) in ``dtype``, as fresh frozen tensors of the same kind (parameter or buffer)."""
    with torch.no_grad():
        layer.scales = nn.Parameter(layer.scales.detach().to(dtype), requires_grad=False)
        zeros = layer.zeros.detach().to(dtype)
        layer.zeros = nn.Parameter(zeros, requires_grad=False) if isinstance(layer.zeros, nn.Parameter) else zeros
