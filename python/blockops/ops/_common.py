"""Validation helpers shared by the op families' fake implementations (private)."""
from __future__ import annotations

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


def _cdiv(a, b):
    return (a + b - 1) // b
