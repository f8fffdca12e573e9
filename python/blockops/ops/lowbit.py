"""Low-bit GEMM (family "lowbit": 2/3/4-bit group-wise asymmetric weights, GPTQ-v2 / EfficientQAT layout;
csrc/lowbit.h): typed wrappers, fake (meta) implementations and the autograd of ``quant_linear``.

The schemas live in csrc/ops.cpp; the CPU and CUDA kernels register themselves from the C++ library. Each
wrapper's docstring gives every argument's dtype, shape and layout. Fake implementations only check what
the shapes alone can tell and allocate the output, so the ops trace under torch.compile and FakeTensor.
"""
from __future__ import annotations

import torch

from blockops.ops._common import _check_features, _check_float, _compute_dtype, _rows_2d
from blockops.ops.bitpack import packed_length

_ops = torch.ops.blockops


def quant_linear(x, qweight, scales, zeros, bits: int, group_size: int, bias=None) -> torch.Tensor:
    """``y = x @ W_hat^T + bias`` with ``W_hat[n, k] = (q[k, n] - zeros[k // g, n]) * scales[k // g, n]``.

    Args:
        x: fp16, bf16 or fp32 ``[..., in]``, contiguous.
        qweight: int32 ``[ceil(in / p), out]``, ``p = 32 // bits``: code ``q[k, n]`` at bits
            ``[bits * (k % p), bits * (k % p) + bits)`` of ``qweight[k // p, n]`` (GPTQ ``qweight``; 3-bit
            is EfficientQAT's 10 codes per word). Equal to ``pack_bits(q.T, bits, dim=0)``.
        scales: fp16, bf16 or fp32 ``[in / group_size, out]``.
        zeros: ``scales``' dtype and shape; zero points as floats (integral for RTN/GPTQ weights).
        bits: 2, 3 or 4.  group_size: a multiple of 16; ``in = scales.shape[0] * group_size``.
        bias: optional ``[out]``, any float dtype.

    fp64 x / scales / zeros / bias are accepted on the CPU (a portable fp64 path, for ``gradcheck``; CUDA refuses
    fp64). Returns ``[..., out]`` in x's dtype. Differentiable w.r.t. x, scales, zeros and bias (qweight is integer),
    once: the backward ops have no autograd of their own.
    Kernels: CPU, a fused decode kernel up to 64 rows, dequantized blocks + GEMM above; CUDA, a fused GEMV up to 8
    rows, a tensor-core kernel (weights dequantized in registers) for 9..64 rows of fp16/bf16 x, dequantize +
    cuBLAS above.
    """
    return _ops.quant_linear(x, qweight, scales, zeros, bits, group_size, bias)


def quant_dequantize(qweight, scales, zeros, bits: int, group_size: int) -> torch.Tensor:
    """``W_hat [out, in]`` in the scales' dtype (arguments as in :func:`quant_linear`)."""
    return _ops.quant_dequantize(qweight, scales, zeros, bits, group_size)


def _check_lowbit_weight(op, qweight, scales, zeros, bits, group_size):
    torch._check(bits in (2, 3, 4), lambda: f"{op}: bits must be 2, 3 or 4, got {bits}")
    torch._check(group_size >= 16 and group_size % 16 == 0,
                 lambda: f"{op}: group_size must be a positive multiple of 16, got {group_size}")
    torch._check(group_size <= 2**31 - 1, lambda: f"{op}: group_size must be in [16, 2147483647], got {group_size}")
    torch._check(qweight.dtype == torch.int32, lambda: f"{op}: qweight must be int32, got {qweight.dtype}")
    _check_float(op, "scales", scales)
    torch._check(zeros.dtype == scales.dtype, lambda: f"{op}: zeros must have the scales' dtype")
    torch._check(qweight.dim() == 2 and scales.dim() == 2 and zeros.shape == scales.shape,
                 lambda: f"{op}: bad weight shapes {tuple(qweight.shape)}, {tuple(scales.shape)}, {tuple(zeros.shape)}")
    in_features, out_features = scales.shape[0] * group_size, scales.shape[1]
    torch._check(qweight.shape[0] == packed_length(in_features, bits) and qweight.shape[1] == out_features,
                 lambda: f"{op}: qweight shape {tuple(qweight.shape)} does not match in={in_features}, out={out_features}")
    return in_features, out_features


@torch.library.register_fake("blockops::quant_linear")
def _quant_linear_fake(x, qweight, scales, zeros, bits, group_size, bias=None):
    in_features, out_features = _check_lowbit_weight("blockops.quant_linear", qweight, scales, zeros, bits, group_size)
    _check_features("blockops.quant_linear", "x", x, in_features)
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.register_fake("blockops::quant_dequantize")
def _quant_dequantize_fake(qweight, scales, zeros, bits, group_size):
    in_features, out_features = _check_lowbit_weight("blockops.quant_dequantize", qweight, scales, zeros, bits,
                                                     group_size)
    return scales.new_empty((out_features, in_features))


@torch.library.register_fake("blockops::quant_linear_grad_input")
def _quant_linear_grad_input_fake(grad_out, qweight, scales, zeros, bits, group_size):
    op = "blockops.quant_linear_grad_input"
    in_features, out_features = _check_lowbit_weight(op, qweight, scales, zeros, bits, group_size)
    _check_features(op, "grad_out", grad_out, out_features)
    return grad_out.new_empty((*grad_out.shape[:-1], in_features))


@torch.library.register_fake("blockops::quant_grad_scales")
def _quant_grad_scales_fake(t, qweight, zeros, bits, group_size):
    op = "blockops.quant_grad_scales"
    in_features, out_features = _check_lowbit_weight(op, qweight, zeros, zeros, bits, group_size)
    torch._check((t.dtype == torch.float32 or (t.dtype == torch.float64 and t.device.type == "cpu"))
                 and tuple(t.shape) == (out_features, in_features),
                 lambda: f"{op}: t must be fp32 (or fp64 on the CPU) [{out_features}, {in_features}], "
                         f"got {t.dtype} {tuple(t.shape)}")
    return t.new_empty((zeros.shape[0], out_features))


def _quant_linear_setup_context(ctx, inputs, output):
    # A defaulted trailing bias=None is not part of `inputs`: remember how many gradients to return.
    x, qweight, scales, zeros, bits, group_size, *rest = inputs
    bias = rest[0] if rest else None
    ctx.num_inputs = len(inputs)
    ctx.save_for_backward(x, qweight, scales, zeros)
    ctx.bits, ctx.group_size = bits, group_size
    ctx.bias_dtype = None if bias is None else bias.dtype


def _quant_linear_backward(ctx, grad_out):
    """Gradients without materialising W_hat beyond the kernels' blocks:
    x:      grad_out @ W_hat                                   (quant_linear_grad_input)
    scales: per group, sum_k (q - z) * (grad_out^T x)[n, k]     (quant_grad_scales; E2E-QP)
    zeros:  -scales * (per-group sums of x)^T @ grad_out
    bias:   grad_out summed over rows.
    In fp32, or fp64 when x, scales or grad_out is (the CPU's fp64 path, for gradcheck). The backward ops have no
    autograd of their own, so there is no double backward (gradgradcheck does not apply)."""
    x, qweight, scales, zeros = ctx.saved_tensors
    bits, group_size = ctx.bits, ctx.group_size
    need_x, _, need_scales, need_zeros, _, _, need_bias = (*ctx.needs_input_grad, False)[:7]
    grad_out = grad_out.contiguous()
    gy2 = _rows_2d(grad_out)
    grad_x = grad_scales = grad_zeros = grad_bias = None
    ct = _compute_dtype(x, scales, grad_out)
    if need_x:
        grad_x = _ops.quant_linear_grad_input(grad_out, qweight, scales, zeros, bits, group_size)
    if need_scales:
        t = gy2.to(ct).t() @ _rows_2d(x).to(ct)
        grad_scales = _ops.quant_grad_scales(t.contiguous(), qweight, zeros, bits, group_size).to(scales.dtype)
    if need_zeros:
        xsum = _rows_2d(x, scales.shape[0], group_size).to(ct).sum(-1)
        grad_zeros = (-(xsum.t() @ gy2.to(ct)) * scales.to(ct)).to(zeros.dtype)
    if need_bias:
        grad_bias = gy2.to(ct).sum(0).to(ctx.bias_dtype)
    return (grad_x, None, grad_scales, grad_zeros, None, None, grad_bias)[: ctx.num_inputs]


torch.library.register_autograd(
    "blockops::quant_linear", _quant_linear_backward, setup_context=_quant_linear_setup_context
)

__all__ = ["quant_dequantize", "quant_linear"]
