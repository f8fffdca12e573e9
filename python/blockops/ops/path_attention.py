"""PaTH attention (family "path_attention"; numerics and the chunked UT-transform algorithm in csrc/path_attention.h):
the typed wrappers (flash-linear-attention's argument layout, the key cache, :class:`PathCache` decoding), fake
(meta) implementations and the autograd of ``torch.ops.blockops.path_attention``, ``path_key_cache``,
``path_attention_backward`` and ``path_decode_step``. Users reach them as ``blockops.attention.path_attention``,
``blockops.attention.PathCache`` and ``blockops.attention.path_decode_step``.

PaTH attention is a data-dependent position encoding by accumulated Householder-like transforms, with the optional
PaTH-FoX forget gate. With ``H_t = I - beta_t w_t w_t^T``, the logit of query i and key j <= i is
``q_i^T H_i H_{i-1} ... H_{j+1} k_j`` (the diagonal is untransformed); with a forget gate g, ``G = cumsum(g)`` and
``s_ij = scale * (logit_ij + G_i - G_j)``; then a causal softmax. Arguments follow flash-linear-attention's
``parallel_path_attn`` so code can switch between the two.

Kernels (CPU and CUDA): ``path_attention`` (the chunked UT-transform algorithm), ``path_attention_backward``
(gradients for q, k, v, w, beta and g through the same chunked algorithm; registered as the op's autograd),
``path_key_cache`` (keys carried to the last position, for decoding) and ``path_decode_step`` (one fused decoding
step over a batched cache). The CUDA kernels are CUDA-core versions with the forward's products on tensor cores,
checked in the CPU emulator (tools/cuda_emu), not yet measured on a GPU. Schemas: csrc/ops.cpp. Fake
implementations only check what the shapes alone can tell and allocate the output, so the ops trace under
torch.compile and FakeTensor.

Quick start::

    o, k_cache = path_attention(q, k, v, w, beta, g, use_cache=True)   # q [B, T, HQ, D], ...
    cache = PathCache.from_prefill(k_cache, v, g)
    o_t = path_decode_step(q_t, k_t, v_t, w_t, beta_t, g_t, cache)      # q_t [B, HQ, D], ...; cache updated
"""
from __future__ import annotations

import torch

from blockops.ops._common import _compute_dtype, _default_scale, _is_float

_ops = torch.ops.blockops


def path_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, beta: torch.Tensor,
                   g: torch.Tensor | None = None, scale: float | None = None, cu_seqlens: torch.Tensor | None = None,
                   use_cache: bool = False):
    """PaTH attention forward (``fla.ops.path_attn.parallel_path_attn`` conventions).

    Args:
        q: ``[B, T, HQ, D]``, fp16/bf16/fp32, or fp64 on the CPU (then k, v, w, beta and g fp64 too; computed in fp64
            throughout, for ``torch.autograd.gradcheck``).
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
        ``(o, k_cache)``: ``o [B, T, HQ, Dv]`` in q's dtype (fp32 accumulation; fp64 for fp64), differentiable in
        q, k, v, w, beta and g; ``k_cache [B, T, H, D]`` in k's dtype (``k_cache[j] = H_last ... H_{j+1} k_j``, not
        differentiable: it is for decoding) when ``use_cache``, else None.

    Raises:
        RuntimeError naming the argument and sizes for bad shapes, dtypes or head dims.
    """
    scale = _default_scale(scale, q)
    q, k, v, w, beta = (t.contiguous() for t in (q, k, v, w, beta))
    g = None if g is None else g.contiguous()
    o, _ = _ops.path_attention(q, k, v, w, beta, g, cu_seqlens, scale)
    k_cache = None
    if use_cache:
        with torch.no_grad():
            k_cache = _ops.path_key_cache(k, w, beta, cu_seqlens)
    return o, k_cache


def path_key_cache(k, w, beta, cu_seqlens=None) -> torch.Tensor:
    """``torch.ops.blockops.path_key_cache``: the keys carried to the last position of their sequence,
    ``k_cache[j] = H_last ... H_{j+1} k_j``, ``[B, T, H, D]`` in k's dtype (arguments as in :func:`path_attention`,
    contiguous). Not differentiable (it is for decoding); ``path_attention(..., use_cache=True)`` returns it too."""
    return _ops.path_key_cache(k, w, beta, cu_seqlens)


# ---------------------------------------------------------------------------------------------------------
# Fake implementations (shapes only; the C++ kernels check the values, e.g. of cu_seqlens)
# ---------------------------------------------------------------------------------------------------------

def _aux_dtypes(ref):
    """The dtypes w, beta and g may have (path_attention_op.cpp check_tensor): fp32 or ref's dtype, only fp64 when
    ref is fp64 (the fp64 path computes in fp64 throughout)."""
    return (ref.dtype,) if ref.dtype == torch.float64 else (torch.float32, ref.dtype)


def _check_keys(op, k, w, beta, cu_seqlens):
    torch._check(k.dim() == 4, lambda: f"{op}: k must be [B, T, H, D], got shape {tuple(k.shape)}")
    torch._check(_is_float(k), lambda: f"{op}: k must be fp16/bf16/fp32 (or fp64 on the CPU), got {k.dtype} on "
                                       f"{k.device}")
    d = k.shape[3]
    torch._check(d % 8 == 0 and 8 <= d <= 256,
                 lambda: f"{op}: k head dim must be a multiple of 8 in [8, 256], got {d}")
    torch._check(w.shape == k.shape, lambda: f"{op}: w must have shape {tuple(k.shape)}, got {tuple(w.shape)}")
    torch._check(beta.shape == k.shape[:3],
                 lambda: f"{op}: beta must have shape {tuple(k.shape[:3])}, got {tuple(beta.shape)}")
    for arg, t in (("w", w), ("beta", beta)):
        torch._check(t.dtype in _aux_dtypes(k), lambda: f"{op}: {arg} must be {' or '.join(map(str, _aux_dtypes(k)))}, "
                                                        f"got {t.dtype}")
    if cu_seqlens is not None:
        torch._check(cu_seqlens.dim() == 1 and cu_seqlens.dtype in (torch.int32, torch.int64),
                     lambda: f"{op}: cu_seqlens must be a 1-d int32/int64 tensor, got {cu_seqlens.dtype} "
                             f"{tuple(cu_seqlens.shape)}")
        torch._check(k.shape[0] == 1, lambda: f"{op}: cu_seqlens needs batch size 1, got B = {k.shape[0]}")


@torch.library.register_fake("blockops::path_attention")
def _path_attention_fake(q, k, v, w, beta, g, cu_seqlens, scale):
    op = "blockops.path_attention"
    torch._check(q.dim() == 4 and v.dim() == 4, lambda: f"{op}: q and v must be 4-d, got {tuple(q.shape)} and {tuple(v.shape)}")
    _check_keys(op, k, w, beta, cu_seqlens)
    torch._check(q.dtype == k.dtype == v.dtype, lambda: f"{op}: q, k and v must share one dtype")
    B, T, HQ, D = q.shape
    torch._check(tuple(k.shape[:2]) == (B, T) and k.shape[3] == D,
                 lambda: f"{op}: k must be [B, T, H, D] with q's B, T and D, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    torch._check(HQ % k.shape[2] == 0, lambda: f"{op}: q's heads ({HQ}) must be a multiple of k's heads ({k.shape[2]})")
    torch._check(v.shape[:3] == k.shape[:3] and v.shape[3] % 8 == 0 and 8 <= v.shape[3] <= 256,
                 lambda: f"{op}: v must be [B, T, H, Dv] with Dv a multiple of 8 up to 256, got {tuple(v.shape)}")
    if g is not None:
        torch._check(g.shape == q.shape[:3] and g.dtype in _aux_dtypes(q),
                     lambda: f"{op}: g must be [B, T, HQ] in {_aux_dtypes(q)}, got {g.dtype} {tuple(g.shape)}")
    # lse in the compute dtype (path_attention_op.h kComputeDtype): fp32, fp64 for fp64 inputs
    return q.new_empty((B, T, HQ, v.shape[3])), q.new_empty((B, HQ, T), dtype=_compute_dtype(q))


@torch.library.register_fake("blockops::path_key_cache")
def _path_key_cache_fake(k, w, beta, cu_seqlens):
    _check_keys("blockops.path_key_cache", k, w, beta, cu_seqlens)
    return k.new_empty(k.shape)


@torch.library.register_fake("blockops::path_attention_backward")
def _path_attention_backward_fake(grad_o, q, k, v, w, beta, g, cu_seqlens, o, lse, grad_lse, scale):
    op = "blockops.path_attention_backward"
    _path_attention_fake(q, k, v, w, beta, g, cu_seqlens, scale)
    for arg, t in (("grad_o", grad_o), ("o", o)):
        torch._check(t.shape == (*q.shape[:3], v.shape[3]) and t.dtype == q.dtype,
                     lambda: f"{op}: {arg} must be [B, T, HQ, Dv] in q's dtype, got {t.dtype} {tuple(t.shape)}")
    lse_shape = (q.shape[0], q.shape[2], q.shape[1])
    stat = _compute_dtype(q)
    for arg, t in (("lse", lse), ("grad_lse", grad_lse)):
        torch._check(t is None or (t.shape == lse_shape and t.dtype == stat),
                     lambda: f"{op}: {arg} must be {stat} {lse_shape}, got {t.dtype} {tuple(t.shape)}")
    dg = q.new_empty(q.shape[:3], dtype=stat if g is None else g.dtype)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), w.new_empty(w.shape),
            beta.new_empty(beta.shape), dg)


# ---------------------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------------------

def _path_attention_setup_context(ctx, inputs, output):
    q, k, v, w, beta, g, cu_seqlens, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, w, beta, g, cu_seqlens, o, lse)
    ctx.scale = scale


def _path_attention_backward(ctx, grad_o, grad_lse):
    q, k, v, w, beta, g, cu_seqlens, o, lse = ctx.saved_tensors
    dq, dk, dv, dw, dbeta, dg = _ops.path_attention_backward(grad_o.contiguous(), q, k, v, w, beta, g, cu_seqlens, o,
                                                             lse, None if grad_lse is None else grad_lse.contiguous(),
                                                             ctx.scale)
    return dq, dk, dv, dw, dbeta, (dg if g is not None else None), None, None


torch.library.register_autograd("blockops::path_attention", _path_attention_backward,
                                setup_context=_path_attention_setup_context)


@torch.library.register_fake("blockops::path_decode_step")
def _path_decode_step_fake(q_t, k_t, v_t, w_t, beta_t, g_t, keys, values, lengths, gates, g_last, scale):
    op = "blockops.path_decode_step"
    torch._check(q_t.dim() == 3 and k_t.dim() == 3 and v_t.dim() == 3,
                 lambda: f"{op}: q_t, k_t, v_t must be 3-d, got {tuple(q_t.shape)}, {tuple(k_t.shape)}, {tuple(v_t.shape)}")
    torch._check(_is_float(q_t) and k_t.dtype == q_t.dtype and v_t.dtype == q_t.dtype,
                 lambda: f"{op}: q_t, k_t and v_t must share one of fp16/bf16/fp32 (or fp64 on the CPU)")
    cache = _compute_dtype(q_t)
    torch._check(keys.dim() == 4 and keys.dtype == cache and values.dtype == cache,
                 lambda: f"{op}: keys [B, H, L, D] and values [B, H, L, Dv] must be {cache} (for {q_t.dtype} inputs)")
    return q_t.new_empty((q_t.shape[0], q_t.shape[1], v_t.shape[2]))



# ---------------------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------------------

class PathCache:
    """Decoding state of PaTH attention for a batch of rows, each with its own length.

    Attributes (fp32, or fp64 for a cache of fp64 inputs, decoded by the fp64 CPU path):
        keys: ``[B, H, L, D]``; row b's first ``lengths[b]`` keys, carried to the row's newest position.
        values: ``[B, H, L, Dv]``.
        lengths: ``[B]`` int64.
        gates: ``[B, HQ, L]`` ``G_j`` of every cached key (forget gate), or None without a gate.
        g_last: ``[B, HQ]`` ``G`` at each row's newest position, or None.
    ``L`` is the capacity; it doubles when a row fills it. Entries beyond a row's length are zero and ignored.
    """

    def __init__(self, keys, values, lengths, gates=None, g_last=None):
        self.keys, self.values, self.lengths, self.gates, self.g_last = keys, values, lengths, gates, g_last

    @classmethod
    def from_prefill(cls, k_cache: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None = None,
                     cu_seqlens: torch.Tensor | None = None) -> "PathCache":
        """The cache after ``path_attention(..., use_cache=True)`` on the same ``v`` (and ``g``, ``cu_seqlens``):
        one row per batch row, or per packed sequence with ``cu_seqlens`` (rows then have their own lengths)."""
        # The shapes are unpacked below: checked first, so a wrong one is named rather than an IndexError.
        if (k_cache.dim() != 4 or v.dim() != 4 or v.shape[:3] != k_cache.shape[:3]
                or (g is not None and (g.dim() != 3 or g.shape[:2] != k_cache.shape[:2]))):
            raise ValueError(f"PathCache.from_prefill: k_cache must be [B, T, H, D], v [B, T, H, Dv] and g [B, T, HQ] "
                             f"(one B, T and H), got {tuple(k_cache.shape)}, {tuple(v.shape)} and "
                             f"{None if g is None else tuple(g.shape)}")
        if cu_seqlens is None:
            rows = [(b, 0, k_cache.shape[1]) for b in range(k_cache.shape[0])]
        else:
            bounds = cu_seqlens.tolist()
            rows = [(0, s, e) for s, e in zip(bounds[:-1], bounds[1:])]
        B, L = len(rows), max([e - s for _, s, e in rows] + [1])
        H, D, Dv = k_cache.shape[2], k_cache.shape[3], v.shape[3]
        dt = _compute_dtype(k_cache)   # fp32, fp64 for fp64 inputs (the decode step's cache dtype)
        keys = k_cache.new_zeros((B, H, L, D), dtype=dt)
        values = v.new_zeros((B, H, L, Dv), dtype=dt)
        lengths = torch.tensor([e - s for _, s, e in rows], dtype=torch.int64, device=k_cache.device)
        gates = g_last = None
        if g is not None:
            gates = g.new_zeros((B, g.shape[2], L), dtype=dt)
            g_last = g.new_zeros((B, g.shape[2]), dtype=dt)
        for r, (b, s, e) in enumerate(rows):
            keys[r, :, :e - s] = k_cache[b, s:e].transpose(0, 1).to(dt)
            values[r, :, :e - s] = v[b, s:e].transpose(0, 1).to(dt)
            if g is not None and e > s:
                G = g[b, s:e].double().cumsum(0).to(dt).transpose(0, 1)   # [HQ, len]
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
    own key and value, then attends over each row's keys; one fused kernel (CPU or CUDA), fp32 cache (fp64 for
    fp64 inputs, CPU only).

    Args:
        q_t: ``[B, HQ, D]``; k_t, w_t: ``[B, H, D]``; v_t: ``[B, H, Dv]``; beta_t: ``[B, H]``; g_t: ``[B, HQ]`` or
            None (must match whether the cache was built with a forget gate). q_t, k_t, v_t share one dtype;
            w_t, beta_t, g_t are fp32 or that dtype (fp64 when it is fp64).
        cache: a :class:`PathCache`, updated in place (grown first when a row is full).
        scale: default ``D ** -0.5``.

    Returns:
        ``o_t [B, HQ, Dv]`` in q_t's dtype.
    """
    if q_t.dim() != 3 or k_t.dim() != 3:
        # Checked before the shapes are unpacked to compare them with the cache's.
        raise ValueError(f"path_decode_step: q_t must be [B, HQ, D] and k_t [B, H, D], got {tuple(q_t.shape)} and "
                         f"{tuple(k_t.shape)}")
    B, HQ, D = q_t.shape
    H = k_t.shape[1]
    if cache.keys.shape[0] != B or cache.keys.shape[1] != H or cache.keys.shape[3] != D or HQ % H:
        raise ValueError(f"path_decode_step: q_t {tuple(q_t.shape)} / k_t {tuple(k_t.shape)} do not match the cache "
                         f"keys {tuple(cache.keys.shape)} [B, H, L, D] (HQ must be a multiple of H)")
    if (g_t is None) != (cache.gates is None):
        raise ValueError("path_decode_step: pass g_t exactly when the cache was built with a forget gate")
    scale = _default_scale(scale, q_t)
    cache._reserve(int(cache.lengths.max()) + 1 if cache.lengths.numel() else 0)  # max() of no rows raises
    q_t, k_t, v_t, w_t, beta_t = (t.contiguous() for t in (q_t, k_t, v_t, w_t, beta_t))
    o = _ops.path_decode_step(q_t, k_t, v_t, w_t, beta_t, None if g_t is None else g_t.contiguous(), cache.keys,
                              cache.values, cache.lengths, cache.gates, cache.g_last, scale)
    cache.lengths = cache.lengths + 1
    return o


__all__ = ["PathCache", "path_attention", "path_decode_step", "path_key_cache"]
