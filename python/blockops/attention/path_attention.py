"""PaTH attention (data-dependent position encoding by accumulated Householder-like transforms), with the optional
PaTH-FoX forget gate: prefill/training forward and incremental decoding.

With ``H_t = I - beta_t w_t w_t^T``, the logit of query i and key j <= i is ``q_i^T H_i H_{i-1} ... H_{j+1} k_j``
(the diagonal is untransformed); with a forget gate g, ``G = cumsum(g)`` and ``s_ij = scale * (logit_ij + G_i -
G_j)``; then a causal softmax. Arguments follow flash-linear-attention's ``parallel_path_attn`` so code can switch
between the two.

Kernels (CPU and CUDA): ``torch.ops.blockops.path_attention`` (the chunked UT-transform algorithm of
csrc/path_attention.h), ``torch.ops.blockops.path_attention_backward`` (gradients for q, k, v, w, beta and g through
the same chunked algorithm; registered as the op's autograd), ``torch.ops.blockops.path_key_cache`` (keys carried to
the last position, for decoding) and ``torch.ops.blockops.path_decode_step`` (one fused decoding step over a batched
cache). The CUDA kernels are the simple CUDA-core versions, checked in the CPU emulator (tools/cuda_emu), not yet
measured on a GPU. Typed wrappers, fake implementations and autograd of these ops: blockops/ops/path_attention.py.

Quick start::

    o, k_cache = path_attention(q, k, v, w, beta, g, use_cache=True)   # q [B, T, HQ, D], ...
    cache = PathCache.from_prefill(k_cache, v, g)
    o_t = path_decode_step(q_t, k_t, v_t, w_t, beta_t, g_t, cache)      # q_t [B, HQ, D], ...; cache updated
"""
from __future__ import annotations

import torch

from blockops.ops.path_attention import path_attention_op, path_decode_step_op, path_key_cache

__all__ = ["PathCache", "path_attention", "path_decode_step"]


def path_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, beta: torch.Tensor,
                   g: torch.Tensor | None = None, scale: float | None = None, cu_seqlens: torch.Tensor | None = None,
                   use_cache: bool = False):
    """PaTH attention forward (``fla.ops.path_attn.parallel_path_attn`` conventions).

    Args:
        q: ``[B, T, HQ, D]``, fp16/bf16/fp32.
        k: ``[B, T, H, D]``, q's dtype; ``HQ`` a multiple of ``H`` (query head h reads key head ``h // (HQ // H)``).
        v: ``[B, T, H, Dv]``, q's dtype. ``D`` and ``Dv`` are multiples of 8 up to 256 (they may differ).
        w: ``[B, T, H, D]``, fp32 or q's dtype; meant to be L2-normalised per token (not enforced: the formula is
            applied to w as given).
        beta: ``[B, T, H]``, fp32 or q's dtype; ``(0, 2)`` in the PaTH layer (``2 * sigmoid``).
        g: optional forget gate ``[B, T, HQ]`` (log values, e.g. ``logsigmoid``), fp32 or q's dtype.
        scale: default ``D ** -0.5``; multiplies the gate term too.
        cu_seqlens: int32/int64 ``[N + 1]`` boundaries of packed sequences (``B`` must be 1), on q's device.
        use_cache: also return the keys carried to the last position of their sequence, for decoding.

    Returns:
        ``(o, k_cache)``: ``o [B, T, HQ, Dv]`` in q's dtype (fp32 accumulation), differentiable in q, k, v, w, beta
        and g; ``k_cache [B, T, H, D]`` in k's dtype (``k_cache[j] = H_last ... H_{j+1} k_j``, not differentiable:
        it is for decoding) when ``use_cache``, else None.

    Raises:
        RuntimeError naming the argument and sizes for bad shapes, dtypes or head dims.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, k, v, w, beta = (t.contiguous() for t in (q, k, v, w, beta))
    g = None if g is None else g.contiguous()
    o, _ = path_attention_op(q, k, v, w, beta, g, cu_seqlens, scale)
    k_cache = None
    if use_cache:
        with torch.no_grad():
            k_cache = path_key_cache(k, w, beta, cu_seqlens)
    return o, k_cache


# ---------------------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------------------

class PathCache:
    """Decoding state of PaTH attention for a batch of rows, each with its own length.

    Attributes:
        keys: ``[B, H, L, D]`` fp32; row b's first ``lengths[b]`` keys, carried to the row's newest position.
        values: ``[B, H, L, Dv]`` fp32.
        lengths: ``[B]`` int64.
        gates: ``[B, HQ, L]`` fp32 ``G_j`` of every cached key (forget gate), or None without a gate.
        g_last: ``[B, HQ]`` fp32 ``G`` at each row's newest position, or None.
    ``L`` is the capacity; it doubles when a row fills it. Entries beyond a row's length are zero and ignored.
    """

    def __init__(self, keys, values, lengths, gates=None, g_last=None):
        self.keys, self.values, self.lengths, self.gates, self.g_last = keys, values, lengths, gates, g_last

    @classmethod
    def from_prefill(cls, k_cache: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None = None,
                     cu_seqlens: torch.Tensor | None = None) -> "PathCache":
        """The cache after ``path_attention(..., use_cache=True)`` on the same ``v`` (and ``g``, ``cu_seqlens``):
        one row per batch row, or per packed sequence with ``cu_seqlens`` (rows then have their own lengths)."""
        if cu_seqlens is None:
            rows = [(b, 0, k_cache.shape[1]) for b in range(k_cache.shape[0])]
        else:
            bounds = cu_seqlens.tolist()
            rows = [(0, s, e) for s, e in zip(bounds[:-1], bounds[1:])]
        B, L = len(rows), max([e - s for _, s, e in rows] + [1])
        H, D, Dv = k_cache.shape[2], k_cache.shape[3], v.shape[3]
        keys = k_cache.new_zeros((B, H, L, D), dtype=torch.float32)
        values = v.new_zeros((B, H, L, Dv), dtype=torch.float32)
        lengths = torch.tensor([e - s for _, s, e in rows], dtype=torch.int64, device=k_cache.device)
        gates = g_last = None
        if g is not None:
            gates = g.new_zeros((B, g.shape[2], L), dtype=torch.float32)
            g_last = g.new_zeros((B, g.shape[2]), dtype=torch.float32)
        for r, (b, s, e) in enumerate(rows):
            keys[r, :, :e - s] = k_cache[b, s:e].transpose(0, 1).float()
            values[r, :, :e - s] = v[b, s:e].transpose(0, 1).float()
            if g is not None and e > s:
                G = g[b, s:e].double().cumsum(0).float().transpose(0, 1)   # [HQ, len]
                gates[r, :, :e - s] = G
                g_last[r] = G[:, -1]
        return cls(keys, values, lengths, gates, g_last)

    def _reserve(self, length: int) -> None:
        capacity = self.keys.shape[2]
        if length <= capacity:
            return
        extra = max(length, 2 * capacity) - capacity
        self.keys = torch.nn.functional.pad(self.keys, (0, 0, 0, extra))
        self.values = torch.nn.functional.pad(self.values, (0, 0, 0, extra))
        if self.gates is not None:
            self.gates = torch.nn.functional.pad(self.gates, (0, extra))


def path_decode_step(q_t: torch.Tensor, k_t: torch.Tensor, v_t: torch.Tensor, w_t: torch.Tensor,
                     beta_t: torch.Tensor, g_t: torch.Tensor | None, cache: PathCache,
                     scale: float | None = None) -> torch.Tensor:
    """One decoding step of PaTH attention for every row of `cache` (``torch.ops.blockops.path_decode_step``).

    Applies the new token's transform to every cached key (``k <- k - beta (k . w) w``), appends the token's
    own key and value, then attends over each row's keys; one fused kernel (CPU or CUDA), fp32 cache.

    Args:
        q_t: ``[B, HQ, D]``; k_t, w_t: ``[B, H, D]``; v_t: ``[B, H, Dv]``; beta_t: ``[B, H]``; g_t: ``[B, HQ]`` or
            None (must match whether the cache was built with a forget gate). q_t, k_t, v_t share one dtype;
            w_t, beta_t, g_t are fp32 or that dtype.
        cache: a :class:`PathCache`, updated in place (grown first when a row is full).
        scale: default ``D ** -0.5``.

    Returns:
        ``o_t [B, HQ, Dv]`` in q_t's dtype.
    """
    B, HQ, D = q_t.shape
    H = k_t.shape[1]
    if cache.keys.shape[0] != B or cache.keys.shape[1] != H or cache.keys.shape[3] != D or HQ % H:
        raise ValueError(f"path_decode_step: q_t {tuple(q_t.shape)} / k_t {tuple(k_t.shape)} do not match the cache "
                         f"keys {tuple(cache.keys.shape)} [B, H, L, D] (HQ must be a multiple of H)")
    if (g_t is None) != (cache.gates is None):
        raise ValueError("path_decode_step: pass g_t exactly when the cache was built with a forget gate")
    scale = D ** -0.5 if scale is None else float(scale)
    cache._reserve(int(cache.lengths.max()) + 1)
    q_t, k_t, v_t, w_t, beta_t = (t.contiguous() for t in (q_t, k_t, v_t, w_t, beta_t))
    o = path_decode_step_op(q_t, k_t, v_t, w_t, beta_t, None if g_t is None else g_t.contiguous(), cache.keys,
                            cache.values, cache.lengths, cache.gates, cache.g_last, scale)
    cache.lengths = cache.lengths + 1
    return o
