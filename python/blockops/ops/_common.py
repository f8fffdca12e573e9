"""Validation helpers shared by the op families' fake implementations, and the shape helpers of their autograd
(private)."""
from __future__ import annotations

import math

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_features(op, arg, t, features):
    torch._check(t.dtype in _FLOAT_DTYPES, lambda: f"{op}: {arg} must be fp16/bf16/fp32, got {t.dtype}")
    torch._check(t.dim() >= 1 and t.shape[-1] == features,
                 lambda: f"{op}: {arg} must have {features} features in its last dim, got {tuple(t.shape)}")


def _rows_2d(t, *last):
    """``t`` [..., n] as [rows, n] (or [rows, *last] when given): the leading dims counted explicitly, because
    ``reshape(-1, n)`` fails on a tensor with no elements (in or out features 0: a bias-only layer)."""
    return t.reshape(math.prod(t.shape[:-1]), *(last or (t.shape[-1],)))


def _cdiv(a, b):
    return (a + b - 1) // b
