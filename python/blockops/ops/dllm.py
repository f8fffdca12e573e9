"""Typed wrappers and fake (meta) implementations of the dllm ops (family "dllm": masked diffusion LM decoding;
schemas in csrc/ops.cpp, numerics and the exact unmasking rules in csrc/dllm.h). The generation loops that use them
are in blockops/dllm/generate.py."""
from __future__ import annotations

from typing import NamedTuple

import torch

from blockops.ops._common import _FLOAT_DTYPES

_ops = torch.ops.blockops


class Unmasked(NamedTuple):
    tokens: torch.Tensor       # int64 [B, L]: argmax token at candidates, -1 elsewhere
    unmask: torch.Tensor       # bool [B, L]: positions to unmask now
    confidence: torch.Tensor   # fp32 [B, L]: softmax probability of the argmax at candidates, -inf elsewhere


def unmask(logits: torch.Tensor, masked: torch.Tensor, block_bounds: torch.Tensor | None = None, *,
           threshold: float = 0.9, factor: float | None = None,
           min_tokens: torch.Tensor | None = None) -> Unmasked:
    """Confidence-aware parallel unmasking (Fast-dLLM), one pass over the logits, no host sync.

    Args:
        logits: fp16, bf16 or fp32 ``[B, L, V]``, contiguous in V (a slice such as ``logits[:, a:b]`` is fine).
        masked: bool ``[B, L]``, contiguous: positions still holding the mask token.
        block_bounds: int64 ``[B, 2]`` = ``(lo, hi)`` per row, contiguous (rows may differ): only masked positions
            with ``lo <= l < hi`` are candidates. Default: the whole row.
        threshold: threshold rule (used when ``factor`` is None): unmask every candidate with confidence
            ``> threshold``. ``threshold >= 1`` unmasks exactly ``min_tokens`` (default one) per row.
        factor: factor rule: with the candidates' confidences sorted descending ``c_1 >= c_2 >= ...``, unmask the
            top ``n`` while ``(n + 1) * (1 - c_n) < factor`` (caching.md; Fast-dLLM v1's factor-based decoding).
        min_tokens: int64 ``[B]``: unmask at least the ``max(1, min_tokens[b])`` most confident candidates of row
            ``b`` whatever the rule (default 1: "at least one"; a LLaDA step schedule passes its step's count).

    Confidence is the softmax probability of the argmax token. The argmax takes the first index among equal
    maxima (as ``torch.argmax``); candidates of equal confidence rank by position (lower first); NaN confidences
    rank last. Logits must be finite or -inf (a row of only -inf gives confidence NaN, token 0).

    Returns :class:`Unmasked` ``(tokens, unmask, confidence)``.
    """
    if block_bounds is None:
        # The default bounds need B and L: the op's own rank check, first (same message and type as
        # csrc/dllm_op.cpp's; a plain raise, not torch._check, whose tensor-reading message breaks a compiled graph).
        if logits.dim() != 3:
            raise RuntimeError(f"blockops.dllm_unmask: logits must be [B, L, V], got shape {tuple(logits.shape)}")
        B, L = logits.shape[0], logits.shape[1]
        block_bounds = torch.tensor([0, L], dtype=torch.long, device=logits.device).expand(B, 2).contiguous()
    return Unmasked(*_ops.dllm_unmask(logits, masked, block_bounds, min_tokens, float(threshold),
                                      None if factor is None else float(factor)))


def kv_overwrite(cache: torch.Tensor, new: torch.Tensor, positions: torch.Tensor, check_indices: bool = True) -> None:
    """In place: ``cache[b, h, positions[b, j], :] = new[b, h, j, :]`` (the dual cache's slot replacement, per row).

    Args:
        cache: fp16, bf16 or fp32 ``[B, H, S, D]``, contiguous.
        new: ``[B, H, n, D]``, the cache's dtype, contiguous in D (e.g. ``k.view(B, n, H, D).transpose(1, 2)``).
        positions: int64 ``[B, n]``, contiguous; each row strictly increasing, in ``[0, S)``; rows may differ.
        check_indices: raise a clear error on a bad position (on CUDA this reads a flag back: a host sync).
            With False, out-of-range entries are skipped (never an out-of-bounds write) and duplicates in a row
            leave one of their values.
    """
    _ops.dllm_kv_overwrite(cache, new, positions, check_indices)


def kv_overwrite_range(cache: torch.Tensor, new: torch.Tensor, start: torch.Tensor, check_indices: bool = True) -> None:
    """:func:`kv_overwrite` of the contiguous slots ``[start[b], start[b] + n)`` of each row (``start`` int64 [B])."""
    # n comes from new's shape: the op's rank check first (as in unmask).
    if new.dim() != 4:
        raise RuntimeError(f"blockops.dllm_kv_overwrite: new must be [B, H, n, D], got shape {tuple(new.shape)}")
    n = new.shape[2]
    positions = (start.to(torch.long).view(-1, 1) + torch.arange(n, device=start.device)).contiguous()
    kv_overwrite(cache, new, positions, check_indices)


def _unmask_checks(logits, masked, block_bounds, min_tokens, factor):
    op = "blockops.dllm_unmask"
    torch._check(logits.dtype in _FLOAT_DTYPES, lambda: f"{op}: logits must be fp16/bf16/fp32, got {logits.dtype}")
    torch._check(logits.dim() == 3, lambda: f"{op}: logits must be [B, L, V], got {tuple(logits.shape)}")
    B, L = logits.shape[0], logits.shape[1]
    torch._check(masked.dtype == torch.bool and tuple(masked.shape) == (B, L),
                 lambda: f"{op}: masked must be bool [{B}, {L}], got {masked.dtype} {tuple(masked.shape)}")
    torch._check(block_bounds.dtype == torch.long and tuple(block_bounds.shape) == (B, 2),
                 lambda: f"{op}: block_bounds must be int64 [{B}, 2], got {block_bounds.dtype} "
                         f"{tuple(block_bounds.shape)}")
    if min_tokens is not None:
        torch._check(min_tokens.dtype == torch.long and tuple(min_tokens.shape) == (B,),
                     lambda: f"{op}: min_tokens must be int64 [{B}], got {min_tokens.dtype} {tuple(min_tokens.shape)}")
    if factor is not None:
        torch._check(factor > 0, lambda: f"{op}: factor must be positive, got {factor}")


@torch.library.register_fake("blockops::dllm_unmask")
def _dllm_unmask_fake(logits, masked, block_bounds, min_tokens, threshold, factor):
    _unmask_checks(logits, masked, block_bounds, min_tokens, factor)
    B, L = logits.shape[0], logits.shape[1]
    return (logits.new_empty((B, L), dtype=torch.long), logits.new_empty((B, L), dtype=torch.bool),
            logits.new_empty((B, L), dtype=torch.float32))


@torch.library.register_fake("blockops::dllm_kv_overwrite")
def _dllm_kv_overwrite_fake(cache, new, positions, check_indices=True):
    op = "blockops.dllm_kv_overwrite"
    torch._check(cache.dim() == 4 and new.dim() == 4,
                 lambda: f"{op}: cache and new must be [B, H, S, D] and [B, H, n, D], got {tuple(cache.shape)} and "
                         f"{tuple(new.shape)}")
    torch._check(new.dtype == cache.dtype, lambda: f"{op}: new must have the cache's dtype {cache.dtype}")
    torch._check(positions.dtype == torch.long and tuple(positions.shape) == (cache.shape[0], new.shape[2]),
                 lambda: f"{op}: positions must be int64 [{cache.shape[0]}, {new.shape[2]}], got "
                         f"{positions.dtype} {tuple(positions.shape)}")
    return None


__all__ = ["Unmasked", "kv_overwrite", "kv_overwrite_range", "unmask"]
