"""Blockwise Parallel Transformer (BPT) pieces: the feed-forward and the LM head + cross-entropy computed chunk by
chunk along the sequence, so the ``[T, d_ff]`` hidden activation and the ``[T, vocab]`` logits never exist whole
(in the forward or the backward). Plain PyTorch; they run on each rank of a context-parallel model on its shard, or
on one device.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ["blockwise_cross_entropy", "blockwise_feed_forward"]


def _check_chunk(chunk_size, what: str) -> int:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"{what}: chunk_size must be a positive int, got {chunk_size!r}")
    return chunk_size


def blockwise_feed_forward(ffn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk_size: int,
                           dim: int = -2) -> torch.Tensor:
    """``ffn(x)`` computed ``chunk_size`` positions at a time along ``dim`` (BPT's blockwise feed-forward).

    ``ffn`` is any position-wise callable (e.g. a SwiGLU MLP module): applied to each chunk under
    ``torch.utils.checkpoint`` (non-reentrant, RNG state preserved), so autograd keeps only each chunk's input (a
    view of ``x``) and recomputes the chunk's hidden activation in the backward: live hidden memory is one chunk's
    ``[chunk_size, d_ff]``, not ``[T, d_ff]``. Gradients equal those of ``ffn(x)`` exactly (same ops on the same
    rows, recomputed). Without autograd it is a plain loop. ``ffn`` must act on each position independently.
    """
    _check_chunk(chunk_size, "blockwise_feed_forward")
    if not callable(ffn):
        raise TypeError(f"blockwise_feed_forward: ffn must be callable, got {type(ffn).__name__}")
    if x.dim() == 0:
        raise ValueError("blockwise_feed_forward: x must have a sequence dimension")
    pieces = x.split(chunk_size, dim=dim)
    # Checkpoint whenever autograd records: ffn may hold trainable tensors even when x needs no gradient.
    if torch.is_grad_enabled():
        outs = [checkpoint(ffn, p, use_reentrant=False) for p in pieces]
    else:
        outs = [ffn(p) for p in pieces]
    return torch.cat(outs, dim=dim)


class _BlockwiseCrossEntropy(torch.autograd.Function):
    """Forward keeps only the per-row log-sum-exp; backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, ignore_index):
        n = hidden.shape[0]
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        picked = torch.empty(n, dtype=acc, device=hidden.device)
        valid = targets != ignore_index
        safe_t = torch.where(valid, targets, torch.zeros_like(targets))
        for s in range(0, n, chunk_size):
            logits = (hidden[s:s + chunk_size] @ weight.t()).to(acc)          # [chunk, vocab], the only one alive
            lse[s:s + chunk_size] = torch.logsumexp(logits, dim=-1)
            picked[s:s + chunk_size] = logits.gather(1, safe_t[s:s + chunk_size, None]).squeeze(1)
        count = valid.sum()
        losses = torch.where(valid, lse - picked, torch.zeros_like(lse))
        loss = losses.sum() / count.to(acc)      # mean over non-ignored rows, as F.cross_entropy (NaN if none)
        ctx.save_for_backward(hidden, weight, safe_t, valid, lse, count)
        ctx.chunk_size = chunk_size
        return loss.to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, safe_t, valid, lse, count = ctx.saved_tensors
        acc = lse.dtype
        row_scale = valid.to(acc) * (grad_loss.to(acc) / count.to(acc))      # d loss / d loss_row
        dh = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) \
            if ctx.needs_input_grad[0] else None
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if ctx.needs_input_grad[1] else None
        cs = ctx.chunk_size
        for s in range(0, hidden.shape[0], cs):
            h = hidden[s:s + cs]
            p = torch.exp((h @ weight.t()).to(acc) - lse[s:s + cs, None])      # softmax, recomputed
            p.scatter_add_(1, safe_t[s:s + cs, None], -torch.ones_like(p[:, :1]))
            p.mul_(row_scale[s:s + cs, None])                                  # d loss / d logits
            if dh is not None:
                dh[s:s + cs] = (p @ weight.to(acc)).to(hidden.dtype)
            if dw is not None:
                dw.add_(p.t() @ h.to(acc))
        return dh, None if dw is None else dw.to(weight.dtype), None, None, None


def blockwise_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                            ignore_index: int = -100) -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T, targets, ignore_index=ignore_index)`` (mean over non-ignored rows)
    without the full ``[N, vocab]`` logits: ``chunk_size`` rows at a time in the forward (keeping only each row's
    log-sum-exp) and again in the backward (recomputing the chunk's logits and softmax).

    Args:
        hidden: ``[..., E]`` float (the leading dims are flattened to rows); weight: ``[vocab, E]`` (the LM head,
            no bias); targets: int64 ``[...]`` matching hidden's leading dims, class ids or ``ignore_index``.
        chunk_size: rows per chunk; peak extra memory is about ``chunk_size * vocab`` fp32 numbers.

    Returns the scalar mean loss in hidden's dtype; differentiable in hidden and weight (softmax and dW summed in
    fp32, fp64 for fp64 inputs).
    """
    _check_chunk(chunk_size, "blockwise_cross_entropy")
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"blockwise_cross_entropy: hidden [..., E] and weight [vocab, E] must share E, got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"blockwise_cross_entropy: targets {tuple(targets.shape)} must match hidden's leading "
                         f"dims {tuple(hidden.shape[:-1])}")
    if targets.dtype != torch.int64:
        raise ValueError(f"blockwise_cross_entropy: targets must be int64 class ids, got {targets.dtype}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"blockwise_cross_entropy: hidden ({hidden.dtype}) and weight ({weight.dtype}) must share "
                         f"a dtype")
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    bad = (t != ignore_index) & ((t < 0) | (t >= weight.shape[0]))
    if bool(bad.any()):
        raise ValueError(f"blockwise_cross_entropy: targets must be in [0, {weight.shape[0]}) or ignore_index="
                         f"{ignore_index}")
    return _BlockwiseCrossEntropy.apply(h, weight, t, chunk_size, ignore_index)
