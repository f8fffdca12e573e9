"""PaTH attention (family "path_attention"; numerics and the chunked UT-transform algorithm in
csrc/path_attention.h): typed wrappers, fake (meta) implementations and the autograd of ``path_attention``,
``path_key_cache`` and ``path_decode_step``. The user API (flash-linear-attention's argument layout with defaults,
the key cache, :class:`PathCache` decoding) is blockops/attention/path_attention.py.

The schemas live in csrc/ops.cpp; the CPU and CUDA kernels register themselves from the C++ library. Each
wrapper's docstring gives every argument's dtype, shape and layout. Fake implementations only check what
the shapes alone can tell and allocate the output, so the ops trace under torch.compile and FakeTensor.
"""
from __future__ import annotations

import torch

from blockops.ops._common import _FLOAT_DTYPES

_ops = torch.ops.blockops


def path_attention_op(q, k, v, w, beta, g, cu_seqlens, scale: float):
    """``torch.ops.blockops.path_attention``: PaTH attention forward, every argument explicit.

    Args:
        q: ``[B, T, HQ, D]``; k, w: ``[B, T, H, D]``; v: ``[B, T, H, Dv]``; beta: ``[B, T, H]``; g: forget-gate log
            values ``[B, T, HQ]`` or None (``G = cumsum(g)`` per sequence). q, k, v one of fp16/bf16/fp32; w, beta,
            g fp32 or q's dtype; all contiguous. ``HQ`` a multiple of ``H``; ``D``, ``Dv`` multiples of 8 up to 256.
        cu_seqlens: int32/int64 ``[N + 1]`` boundaries of packed sequences (``B`` must be 1), or None.
        scale: score scale (multiplies the gate term too).

    Returns:
        ``(o [B, T, HQ, Dv] in q's dtype, lse [B, HQ, T] fp32)`` (natural log); differentiable in q, k, v, w, beta
        and g (``torch.ops.blockops.path_attention_backward``).
    """
    return _ops.path_attention(q, k, v, w, beta, g, cu_seqlens, scale)


def path_key_cache(k, w, beta, cu_seqlens) -> torch.Tensor:
    """``torch.ops.blockops.path_key_cache``: the keys carried to the last position of their sequence,
    ``k_cache[j] = H_last ... H_{j+1} k_j``, ``[B, T, H, D]`` in k's dtype (arguments as in
    :func:`path_attention_op`). Not differentiable (it is for decoding)."""
    return _ops.path_key_cache(k, w, beta, cu_seqlens)


def path_decode_step_op(q_t, k_t, v_t, w_t, beta_t, g_t, keys, values, lengths, gates, g_last,
                        scale: float) -> torch.Tensor:
    """``torch.ops.blockops.path_decode_step``: one decoding step for every row of a batched cache.

    Args:
        q_t: ``[B, HQ, D]``; k_t, w_t: ``[B, H, D]``; v_t: ``[B, H, Dv]``; beta_t: ``[B, H]``; g_t: ``[B, HQ]`` or
            None. q_t, k_t, v_t share one of fp16/bf16/fp32; w_t, beta_t, g_t fp32 or that dtype; contiguous.
        keys: fp32 ``[B, H, L, D]``; values: fp32 ``[B, H, L, Dv]``; gates: fp32 ``[B, HQ, L]`` or None; g_last:
            fp32 ``[B, HQ]`` or None (both present exactly with g_t). Updated in place: the rank-1 update
            ``k_j <- k_j - beta_t (k_j . w_t) w_t`` of the cached keys ``j < lengths[b]``, then ``k_t`` / ``v_t``
            (and ``G_last += g_t`` into gates) appended at ``lengths[b]``.
        lengths: int64 ``[B]``, each below ``L``; read only.
        scale: score scale.

    Returns:
        ``o_t [B, HQ, Dv]`` in q_t's dtype.
    """
    return _ops.path_decode_step(q_t, k_t, v_t, w_t, beta_t, g_t, keys, values, lengths, gates, g_last, scale)


# ---------------------------------------------------------------------------------------------------------
# Fake implementations (shapes only; the C++ kernels check the values, e.g. of cu_seqlens)
# ---------------------------------------------------------------------------------------------------------

def _check_keys(op, k, w, beta, cu_seqlens):
    torch._check(k.dim() == 4, lambda: f"{op}: k must be [B, T, H, D], got shape {tuple(k.shape)}")
    torch._check(k.dtype in _FLOAT_DTYPES, lambda: f"{op}: k must be fp16/bf16/fp32, got {k.dtype}")
    d = k.shape[3]
    torch._check(d % 8 == 0 and 8 <= d <= 256,
                 lambda: f"{op}: k head dim must be a multiple of 8 in [8, 256], got {d}")
    torch._check(w.shape == k.shape, lambda: f"{op}: w must have shape {tuple(k.shape)}, got {tuple(w.shape)}")
    torch._check(beta.shape == k.shape[:3],
                 lambda: f"{op}: beta must have shape {tuple(k.shape[:3])}, got {tuple(beta.shape)}")
    for arg, t in (("w", w), ("beta", beta)):
        torch._check(t.dtype in (torch.float32, k.dtype), lambda: f"{op}: {arg} must be fp32 or {k.dtype}, got {t.dtype}")
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
        torch._check(g.shape == q.shape[:3] and g.dtype in (torch.float32, q.dtype),
                     lambda: f"{op}: g must be [B, T, HQ] fp32 or q's dtype, got {g.dtype} {tuple(g.shape)}")
    return q.new_empty((B, T, HQ, v.shape[3])), q.new_empty((B, HQ, T), dtype=torch.float32)


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
    for arg, t in (("lse", lse), ("grad_lse", grad_lse)):
        torch._check(t is None or (t.shape == lse_shape and t.dtype == torch.float32),
                     lambda: f"{op}: {arg} must be fp32 {lse_shape}, got {t.dtype} {tuple(t.shape)}")
    dg = q.new_empty(q.shape[:3], dtype=torch.float32 if g is None else g.dtype)
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
    torch._check(keys.dim() == 4 and keys.dtype == torch.float32 and values.dtype == torch.float32,
                 lambda: f"{op}: keys [B, H, L, D] and values [B, H, L, Dv] must be fp32")
    torch._check(q_t.dtype in _FLOAT_DTYPES and k_t.dtype == q_t.dtype and v_t.dtype == q_t.dtype,
                 lambda: f"{op}: q_t, k_t and v_t must share one of fp16/bf16/fp32")
    return q_t.new_empty((q_t.shape[0], q_t.shape[1], v_t.shape[2]))

__all__ = ["path_attention_op", "path_decode_step_op", "path_key_cache"]
