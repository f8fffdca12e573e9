"""Validation helpers shared by the op families' fake implementations, and the shape helpers of their autograd
(private)."""
from __future__ import annotations

import math

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _is_float(t):
    """fp16/bf16/fp32 anywhere, or fp64 on the CPU: the dtypes the GEMM families (lowbit, vq, ptq161) accept. Their
    CPU kernels have a portable fp64 path (for ``torch.autograd.gradcheck``); CUDA refuses fp64 ("CPU-only")."""
    return t.dtype in _FLOAT_DTYPES or (t.dtype == torch.float64 and t.device.type == "cpu")


def _check_float(op, arg, t):
    torch._check(_is_float(t),
                 lambda: f"{op}: {arg} must be fp16/bf16/fp32 (or fp64 on the CPU), got {t.dtype} on {t.device}")


def _compute_dtype(*tensors):
    """fp64 when any of the (non-None) tensors is: the GEMM families' fp64 path; fp32 otherwise."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_features(op, arg, t, features):
    _check_float(op, arg, t)
    torch._check(t.dim() >= 1 and t.shape[-1] == features,
                 lambda: f"{op}: {arg} must have {features} features in its last dim, got {tuple(t.shape)}")


def _rows_2d(t, *last):
    """``t`` [..., n] as [rows, n] (or [rows, *last] when given): the leading dims counted explicitly, because
    ``reshape(-1, n)`` fails on a tensor with no elements (in or out features 0: a bias-only layer)."""
    return t.reshape(math.prod(t.shape[:-1]), *(last or (t.shape[-1],)))


def _default_scale(scale, q):
    """``float(scale)``, or ``D ** -0.5`` for q's head dim ``D`` (last dim) when None. Without a head dim (D = 0, or
    a 0-d q) it is 1.0, a placeholder: the op's own checks then refuse q with a message naming the head dim, rather
    than a ZeroDivisionError or IndexError here."""
    if scale is not None:
        return float(scale)
    head_dim = q.shape[-1] if q.dim() > 0 else 0
    return head_dim ** -0.5 if head_dim > 0 else 1.0


def _cdiv(a, b):
    return (a + b - 1) // b
