"""Validation helpers shared by the op families' fake implementations (private)."""
from __future__ import annotations

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_features(op, arg, t, features):
    torch._check(t.dtype in _FLOAT_DTYPES, lambda: f"{op}: {arg} must be fp16/bf16/fp32, got {t.dtype}")
    torch._check(t.dim() >= 1 and t.shape[-1] == features,
                 lambda: f"{op}: {arg} must have {features} features in its last dim, got {tuple(t.shape)}")


def _cdiv(a, b):
    return (a + b - 1) // b
