"""Typed wrappers, fake (meta) implementations and autograd registrations of the `torch.ops.blockops` ops.

The schemas live in csrc/ops.cpp; the CPU and CUDA kernels register themselves from the C++ library. Each
wrapper's docstring gives every argument's dtype, shape and layout. Fake implementations only check what
the shapes alone can tell and allocate the output, so the ops trace under torch.compile and FakeTensor.
"""
from __future__ import annotations

import torch

_ops = torch.ops.blockops

# ---------------------------------------------------------------------------------------------------------
# Bit packing
# ---------------------------------------------------------------------------------------------------------

_PACKABLE_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def values_per_word(bits: int) -> int:
    """How many `bits`-bit values one int32 word holds (3 bits: 10, the two high bits unused)."""
    return 32 // bits


def packed_length(length, bits: int):
    """Words needed along the packed dim for `length` values of `bits` bits."""
    per = values_per_word(bits)
    return (length + per - 1) // per


def pack_bits(values: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Pack small unsigned integers into int32 words, LSB-first, along `dim`.

    Args:
        values: uint8, int8, int16, int32 or int64, any shape, contiguous; every value in [0, 2**bits).
        bits: 1..8.
        dim: the dimension to pack along (negative counts from the end).

    Returns:
        int32 tensor, same shape except ``ceil(n / p)`` along ``dim`` where ``p = 32 // bits``. Value ``j``
        of a lane is stored in word ``j // p`` at bits ``[bits * (j % p), bits * (j % p) + bits)``; the
        last word is zero-padded. Packing ``[in, out]`` integer weights along dim 0 gives GPTQ's
        ``qweight`` (EfficientQAT's 10-per-word layout for 3 bits).

    Raises:
        RuntimeError naming the problem for out-of-range values, bad bits/dim/dtype or a non-contiguous input.
    """
    return _ops.pack_bits(values, bits, dim)


def unpack_bits(packed: torch.Tensor, bits: int, size: int, dim: int = -1) -> torch.Tensor:
    """Inverse of :func:`pack_bits`.

    Args:
        packed: int32, contiguous, as produced by ``pack_bits(values, bits, dim)``.
        bits: 1..8, as used for packing.
        size: the unpacked length along ``dim``; ``ceil(size / (32 // bits))`` must equal ``packed.shape[dim]``.
        dim: the packed dimension.

    Returns:
        uint8 tensor with ``size`` along ``dim``. Padding bits are ignored.
    """
    return _ops.unpack_bits(packed, bits, size, dim)


def _check_bits(bits: int, op: str) -> None:
    torch._check(1 <= bits <= 8, lambda: f"{op}: bits must be in [1, 8], got {bits}")


def _wrap_dim(dim: int, ndim: int, op: str) -> int:
    torch._check(-ndim <= dim < ndim, lambda: f"{op}: dim {dim} is out of range for {ndim} dimension(s)")
    return dim % ndim


@torch.library.register_fake("blockops::pack_bits")
def _pack_bits_fake(values, bits, dim=-1):
    op = "blockops.pack_bits"
    _check_bits(bits, op)
    torch._check(values.dtype in _PACKABLE_DTYPES, lambda: f"{op}: unsupported dtype {values.dtype}")
    torch._check(values.dim() >= 1, lambda: f"{op}: values must have at least 1 dimension")
    dim = _wrap_dim(dim, values.dim(), op)
    shape = list(values.shape)
    shape[dim] = packed_length(shape[dim], bits)
    return values.new_empty(shape, dtype=torch.int32)


@torch.library.register_fake("blockops::unpack_bits")
def _unpack_bits_fake(packed, bits, size, dim=-1):
    op = "blockops.unpack_bits"
    _check_bits(bits, op)
    torch._check(packed.dtype == torch.int32, lambda: f"{op}: packed must be int32, got {packed.dtype}")
    torch._check(packed.dim() >= 1, lambda: f"{op}: packed must have at least 1 dimension")
    dim = _wrap_dim(dim, packed.dim(), op)
    torch._check(
        packed_length(size, bits) == packed.shape[dim],
        lambda: f"{op}: {size} values of {bits} bits do not fit the packed length {packed.shape[dim]}",
    )
    shape = list(packed.shape)
    shape[dim] = size
    return packed.new_empty(shape, dtype=torch.uint8)


# ---------------------------------------------------------------------------------------------------------
# Low-bit GEMM (2/3/4-bit group-wise asymmetric weights, GPTQ-v2 / EfficientQAT layout; csrc/lowbit.h)
# ---------------------------------------------------------------------------------------------------------

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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

    Returns ``[..., out]`` in x's dtype. Differentiable w.r.t. x, scales, zeros and bias (qweight is integer).
    Kernels: a fused unpack-in-register GEMV for up to 8 rows, dequantized tiles + GEMM above that.
    """
    return _ops.quant_linear(x, qweight, scales, zeros, bits, group_size, bias)


def quant_dequantize(qweight, scales, zeros, bits: int, group_size: int) -> torch.Tensor:
    """``W_hat [out, in]`` in the scales' dtype (arguments as in :func:`quant_linear`)."""
    return _ops.quant_dequantize(qweight, scales, zeros, bits, group_size)


def _check_lowbit_weight(op, qweight, scales, zeros, bits, group_size):
    torch._check(bits in (2, 3, 4), lambda: f"{op}: bits must be 2, 3 or 4, got {bits}")
    torch._check(group_size >= 16 and group_size % 16 == 0,
                 lambda: f"{op}: group_size must be a positive multiple of 16, got {group_size}")
    torch._check(qweight.dtype == torch.int32, lambda: f"{op}: qweight must be int32, got {qweight.dtype}")
    torch._check(scales.dtype in _FLOAT_DTYPES, lambda: f"{op}: scales must be fp16/bf16/fp32, got {scales.dtype}")
    torch._check(zeros.dtype == scales.dtype, lambda: f"{op}: zeros must have the scales' dtype")
    torch._check(qweight.dim() == 2 and scales.dim() == 2 and zeros.shape == scales.shape,
                 lambda: f"{op}: bad weight shapes {tuple(qweight.shape)}, {tuple(scales.shape)}, {tuple(zeros.shape)}")
    in_features, out_features = scales.shape[0] * group_size, scales.shape[1]
    torch._check(qweight.shape[0] == packed_length(in_features, bits) and qweight.shape[1] == out_features,
                 lambda: f"{op}: qweight shape {tuple(qweight.shape)} does not match in={in_features}, out={out_features}")
    return in_features, out_features


def _check_features(op, arg, t, features):
    torch._check(t.dtype in _FLOAT_DTYPES, lambda: f"{op}: {arg} must be fp16/bf16/fp32, got {t.dtype}")
    torch._check(t.dim() >= 1 and t.shape[-1] == features,
                 lambda: f"{op}: {arg} must have {features} features in its last dim, got {tuple(t.shape)}")


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
    torch._check(t.dtype == torch.float32 and tuple(t.shape) == (out_features, in_features),
                 lambda: f"{op}: t must be fp32 [{out_features}, {in_features}], got {t.dtype} {tuple(t.shape)}")
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
    bias:   grad_out summed over rows."""
    x, qweight, scales, zeros = ctx.saved_tensors
    bits, group_size = ctx.bits, ctx.group_size
    need_x, _, need_scales, need_zeros, _, _, need_bias = (*ctx.needs_input_grad, False)[:7]
    grad_out = grad_out.contiguous()
    gy2 = grad_out.reshape(-1, grad_out.shape[-1])
    grad_x = grad_scales = grad_zeros = grad_bias = None
    if need_x:
        grad_x = _ops.quant_linear_grad_input(grad_out, qweight, scales, zeros, bits, group_size)
    if need_scales:
        t = gy2.float().t() @ x.reshape(-1, x.shape[-1]).float()
        grad_scales = _ops.quant_grad_scales(t.contiguous(), qweight, zeros, bits, group_size).to(scales.dtype)
    if need_zeros:
        xsum = x.reshape(-1, scales.shape[0], group_size).float().sum(-1)
        grad_zeros = (-(xsum.t() @ gy2.float()) * scales.float()).to(zeros.dtype)
    if need_bias:
        grad_bias = gy2.float().sum(0).to(ctx.bias_dtype)
    return (grad_x, None, grad_scales, grad_zeros, None, None, grad_bias)[: ctx.num_inputs]


torch.library.register_autograd(
    "blockops::quant_linear", _quant_linear_backward, setup_context=_quant_linear_setup_context
)
