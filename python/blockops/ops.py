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


# ---------------------------------------------------------------------------------------------------------
# Block-sparse attention
# ---------------------------------------------------------------------------------------------------------

# The mask tensors in the ops' argument order (after q, k, v): forward lists, transposed lists, bit tiles.
MASK_FIELDS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "kv_tile_ids",
               "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices", "q_tile_ids", "tiles")


def block_sparse_attention_op(q, k, v, mask_tensors, block_q: int, block_kv: int, scale: float):
    """``torch.ops.blockops.block_sparse_attention`` with the mask tensors of a BlockMask in `MASK_FIELDS` order.

    Args:
        q: ``[B, H, Tq, D]``; k: ``[B, Hk, Tk, D]``; v: ``[B, Hk, Tk, Dv]``; fp16, bf16 or fp32 (one dtype), last
            dim contiguous, ``H`` a multiple of ``Hk``, ``D`` and ``Dv`` multiples of 8 up to 256.
        mask_tensors: the 11 int32 tensors of a :class:`blockops.attention.BlockMask` (``MASK_FIELDS``).
        block_q, block_kv: the mask's block sizes; scale: score scale.

    Returns:
        ``(out [B, H, Tq, Dv] in q's dtype, lse [B, H, Tq] fp32)``; differentiable in q, k, v.
    """
    return _ops.block_sparse_attention(q, k, v, *mask_tensors, block_q, block_kv, scale)


def _cdiv(a, b):
    return (a + b - 1) // b


def _check_attention_shapes(op, q, k, v, kv_num_blocks, block_q, block_kv):
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4,
                 lambda: f"{op}: q, k, v must be [B, H, T, D], got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    torch._check(q.dtype == k.dtype == v.dtype and q.dtype in (torch.float16, torch.bfloat16, torch.float32),
                 lambda: f"{op}: q, k, v must share one dtype in fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    torch._check(k.shape[0] == q.shape[0] and v.shape[:3] == k.shape[:3] and k.shape[3] == q.shape[3],
                 lambda: f"{op}: incompatible q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    torch._check(block_q in (16, 32, 64, 128) and block_kv in (16, 32, 64, 128),
                 lambda: f"{op}: block sizes must be in (16, 32, 64, 128), got {block_q}, {block_kv}")
    torch._check(tuple(kv_num_blocks.shape[2:]) == (_cdiv(q.shape[2], block_q),),
                 lambda: f"{op}: kv_num_blocks {tuple(kv_num_blocks.shape)} does not match q length {q.shape[2]} "
                         f"in blocks of {block_q}")


@torch.library.register_fake("blockops::block_sparse_attention")
def _block_sparse_attention_fake(q, k, v, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
                                 kv_tile_ids, q_num_blocks, q_indices, full_q_num_blocks, full_q_indices,
                                 q_tile_ids, tiles, block_q, block_kv, scale):
    _check_attention_shapes("blockops.block_sparse_attention", q, k, v, kv_num_blocks, block_q, block_kv)
    b, h, tq, _ = q.shape
    return q.new_empty((b, h, tq, v.shape[3])), q.new_empty((b, h, tq), dtype=torch.float32)


@torch.library.register_fake("blockops::block_sparse_attention_backward")
def _block_sparse_attention_backward_fake(grad_out, q, k, v, out, lse, grad_lse, kv_num_blocks, kv_indices, full_kv_num_blocks,
                                          full_kv_indices, kv_tile_ids, q_num_blocks, q_indices, full_q_num_blocks,
                                          full_q_indices, q_tile_ids, tiles, block_q, block_kv, scale):
    _check_attention_shapes("blockops.block_sparse_attention_backward", q, k, v, kv_num_blocks, block_q, block_kv)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _block_sparse_attention_setup_context(ctx, inputs, output):
    q, k, v, *mask_and_args = inputs
    ctx.mask_args = mask_and_args            # 11 int32 tensors, block_q, block_kv, scale
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)


def _block_sparse_attention_backward(ctx, grad_out, grad_lse):
    """dq, dk, dv from the block-sparse backward kernels, including the gradient arriving at lse."""
    q, k, v, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    if grad_lse is not None:
        grad_lse = grad_lse.float().contiguous()
    gq, gk, gv = _ops.block_sparse_attention_backward(grad_out.contiguous(), q, k, v, out, lse, grad_lse,
                                                      *ctx.mask_args)
    return (gq, gk, gv) + (None,) * len(ctx.mask_args)


torch.library.register_autograd(
    "blockops::block_sparse_attention", _block_sparse_attention_backward,
    setup_context=_block_sparse_attention_setup_context,
)
