"""Typed wrappers, fake (meta) implementations and autograd of the cached-block skipping ops (family
"block_cache"; schemas in csrc/ops.cpp, numerics in csrc/block_cache.h). The caches and policies that use them are in
blockops/block_cache/.

Layout shared by every op: tensors of one call have one shape, one dtype (fp16, bf16 or fp32) and one device,
are contiguous, and have at least two dims; they are seen as ``[B, T, C]`` (``B = size(0)``, ``T = size(1)``,
``C`` the product of the rest). The indicator reads only the tokens ``t % stride == 0``.

The indicators are returned as device tensors (fp32 ``[B]`` or ``[]``): a skip decision built from them with
tensor ops never synchronises with the host, so it can stay inside a compiled graph.
"""
from __future__ import annotations

import torch

from blockops.ops._common import _FLOAT_DTYPES, _is_float

_ops = torch.ops.blockops


def relative_l1(current: torch.Tensor, reference: torch.Tensor, stride: int = 1,
                per_sample: bool = False) -> torch.Tensor:
    """``sum|current - reference| / sum|reference|`` over the tokens ``t % stride == 0``.

    Args:
        current, reference: fp16/bf16/fp32 ``[B, T, ...]``, same shape, dtype and device, contiguous.
        stride: token (dim 1) downsampling, >= 1 (any int64: a stride >= T reads token 0 only).
        per_sample: one indicator per sample (``[B]``) instead of one over the batch (``[]``).

    Returns fp32 ``[B]`` or ``[]`` on the inputs' device: 0 when both sums are 0, inf when only the reference
    is all zero. fp32 partial sums per fixed chunk, fp64 across chunks: bit-identical from run to run.
    Not differentiable (it feeds decisions).
    """
    return _ops.relative_l1(current, reference, stride, per_sample)


def relative_l1_residual(output: torch.Tensor, input: torch.Tensor, reference: torch.Tensor,
                         residual: torch.Tensor, stride: int = 1, per_sample: bool = False,
                         compare_residual: bool = False) -> torch.Tensor:
    """One pass: writes ``residual = output - input`` (every token) and returns the relative L1 indicator of
    ``x`` against ``reference`` (as :func:`relative_l1`), ``x = output - input`` (in fp32, before rounding) when
    ``compare_residual`` (first-block cache: the block-0 residual against the cached one), else ``output``
    (BWCache: a block's output against the cached output).

    Args:
        output, input, reference: fp16/bf16/fp32 ``[B, T, ...]``, same shape, dtype, device; contiguous.
        residual: preallocated tensor of the same layout, overwritten.
    """
    return _ops.relative_l1_residual(output, input, reference, residual, stride, per_sample, compare_residual)


def apply_residual(input: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``input + residual`` (a skipped block's output): same shape and dtype, fp32 add, one rounding.
    Differentiable with respect to both."""
    return _ops.apply_residual(input, residual)


def cache_update(cache: torch.Tensor, value: torch.Tensor, gate: torch.Tensor | None = None) -> None:
    """``cache.copy_(value)`` (same shape and dtype, contiguous), only where ``gate`` (a one-element bool or
    float tensor on the cache's device) is non-zero; the kernel reads the gate on the device, so a gated
    update costs no host synchronisation."""
    _ops.cache_update(cache, value, gate)


# ---------------------------------------------------------------------------------------------------------
# Fake implementations: the checks the shapes alone allow, then allocation.
# ---------------------------------------------------------------------------------------------------------

def _check_indicator_args(op, stride, **tensors):
    torch._check(stride >= 1, lambda: f"{op}: stride must be at least 1, got {stride}")
    (first_name, first), *_ = tensors.items()
    for name, t in tensors.items():
        torch._check(t.dtype in _FLOAT_DTYPES, lambda: f"{op}: {name} must be fp16/bf16/fp32, got {t.dtype}")
        torch._check(t.dim() >= 2, lambda: f"{op}: {name} must have at least 2 dimension(s), got {tuple(t.shape)}")
        torch._check(t.dtype == first.dtype, lambda: f"{op}: {name} has dtype {t.dtype} but {first_name} has {first.dtype}")
        torch._check(t.shape == first.shape,
                     lambda: f"{op}: {name} has shape {tuple(t.shape)} but {first_name} has {tuple(first.shape)}")
    return first


@torch.library.register_fake("blockops::relative_l1")
def _relative_l1_fake(current, reference, stride=1, per_sample=False):
    first = _check_indicator_args("blockops.relative_l1", stride, current=current, reference=reference)
    return first.new_empty((first.shape[0],) if per_sample else (), dtype=torch.float32)


@torch.library.register_fake("blockops::relative_l1_residual")
def _relative_l1_residual_fake(output, input, reference, residual, stride=1, per_sample=False,
                               compare_residual=False):
    first = _check_indicator_args("blockops.relative_l1_residual", stride, output=output, input=input,
                                  reference=reference, residual=residual)
    return first.new_empty((first.shape[0],) if per_sample else (), dtype=torch.float32)


def _check_same_layout(op, a_name, a, b_name, b):
    torch._check(_is_float(a), lambda: f"{op}: {a_name} must be fp16/bf16/fp32 (or fp64 on the CPU), got {a.dtype}")
    torch._check(a.dtype == b.dtype and a.shape == b.shape,
                 lambda: f"{op}: {b_name} ({b.dtype} {tuple(b.shape)}) must match {a_name} ({a.dtype} {tuple(a.shape)})")


@torch.library.register_fake("blockops::apply_residual")
def _apply_residual_fake(input, residual):
    _check_same_layout("blockops.apply_residual", "input", input, "residual", residual)
    return torch.empty_like(input, memory_format=torch.contiguous_format)


@torch.library.register_fake("blockops::cache_update")
def _cache_update_fake(cache, value, gate=None):
    _check_same_layout("blockops.cache_update", "cache", cache, "value", value)
    if gate is not None:
        torch._check(gate.numel() == 1, lambda: f"blockops.cache_update: gate must have one element, got {tuple(gate.shape)}")


# ---------------------------------------------------------------------------------------------------------
# Autograd: apply_residual passes the gradient to both operands.
# ---------------------------------------------------------------------------------------------------------

def _apply_residual_setup_context(ctx, inputs, output):
    pass


def _apply_residual_backward(ctx, grad):
    return grad, grad


torch.library.register_autograd("blockops::apply_residual", _apply_residual_backward,
                                setup_context=_apply_residual_setup_context)

__all__ = ["apply_residual", "cache_update", "relative_l1", "relative_l1_residual"]
