"""Vector-quantized weights (family "vq": VQ4DiT; AQLM with ``out_group_size = 1``): typed op wrappers, fake
tensors, autograd and the format's bit count. k-means lives in blockops/quant/kmeans.py, VQ4DiT calibration in
blockops/quant/vq4dit.py.

Layout (csrc/vq.h): ``codes [out, in/d, K]`` uint8 or int16 (``[out, in/d]`` also accepted for ``K = 1``),
``codebooks [K, k, d]`` fp16/bf16/fp32 (``K`` in {1, 2} additive codebooks, ``k`` in [16, 65536], ``d`` in
{2, 4, 8}), optional ``scales [out]``:

    W_hat[n, j*d:(j+1)*d] = scales[n] * sum_K codebooks[K, codes[n, j, K]]

int16 codes are read as uint16 (``value mod 65536``, how AQLM stores 16-bit codes): store a code ``c >= 32768``
as ``c - 65536``, e.g. with ``torch.tensor(c, dtype=torch.int32).to(torch.int16)``. Codes ``>= k`` are an
error on the CPU; the CUDA kernels (csrc/kernels/vq.cu) do not check them, which would cost a device-to-host sync
per call, and read such a code as ``k - 1`` instead (never past the codebook).
"""
from __future__ import annotations

import math

import torch

from blockops.ops._common import _check_features, _check_float, _compute_dtype, _is_float, _rows_2d

_ops = torch.ops.blockops
_CODE_DTYPES = (torch.uint8, torch.int16)


def vq_linear(x, codes, codebooks, scales=None, bias=None) -> torch.Tensor:
    """``y = x @ W_hat^T + bias``.

    Args:
        x: fp16, bf16 or fp32 ``[..., in]``, ``in = codes.shape[1] * d``.
        codes: uint8 or int16 ``[out, in/d, K]`` (or ``[out, in/d]`` when K = 1), contiguous; int16 read as
            uint16. Each code must be below k.
        codebooks: fp16, bf16 or fp32 ``[K, k, d]``, contiguous.
        scales: optional fp16/bf16/fp32 ``[out]``, per output row.
        bias: optional fp16/bf16/fp32 ``[out]``.

    Returns ``[..., out]`` in x's dtype, accumulated in fp32. Differentiable w.r.t. x, codebooks, scales and
    bias, once (the backward ops have no autograd of their own). fp64 x / codebooks / scales / bias are accepted on
    the CPU: a portable fp64 path (blocked GEMM in fp64), for ``gradcheck``; CUDA refuses fp64. CPU kernels: up to 8 rows a lookup-table GEMV or a direct dequantize-dot kernel (chosen per call,
    csrc/vq.h ``use_lookup_table``), dequantized blocks + GEMM above (in bf16 for bf16 x). With uint8 codes on an
    AVX-512 VBMI CPU the table kernel looks tables up 64 output rows per byte permute ("byte planes"): exact fp32
    tables for fp32 x (up to 8 rows); for fp16 / bf16 x (up to 8 rows, up to 32 for layers of >= 256 outputs)
    int16 tables, each entry ``x_group . codeword`` rounded to one of 65535 steps of its 16-position chunk's
    largest entry: at most about 3e-5 of ``|x| @ |W_hat|^T`` per output (measured), well below the fp16 / bf16
    rounding of x itself; there a NaN or infinite x makes its row of y NaN. CUDA kernels: up to 8 rows a GEMV with
    the codebook replicated in shared memory; above, W_hat tiles dequantized into shared memory feeding
    ``mma.sync`` tensor cores (fp16/bf16 x, ``in % 8 == 0``; W_hat rounded once to x's dtype) or CUDA-core tiles.
    """
    return _ops.vq_linear(x, codes, codebooks, scales, bias)


def vq_dequantize(codes, codebooks, scales=None) -> torch.Tensor:
    """``W_hat [out, in]`` in the codebooks' dtype (arguments as in :func:`vq_linear`)."""
    return _ops.vq_dequantize(codes, codebooks, scales)


def bits_per_weight(out_features: int, in_features: int, codebook_size: int, vector_dim: int,
                    num_codebooks: int = 1, codebook_bits: int = 16, scale_bits: int = 0) -> tuple[float, float]:
    """``(code bits, total bits)`` per weight: ``K * log2(k) / d``, and that plus the codebooks
    (``codebook_bits`` per entry) and the scales (``scale_bits`` per row) spread over ``out * in`` weights."""
    code = num_codebooks * math.log2(codebook_size) / vector_dim
    extra = num_codebooks * codebook_size * vector_dim * codebook_bits + out_features * scale_bits
    return code, code + extra / max(out_features * in_features, 1)


def _check_weights(op, codes, codebooks, scales):
    torch._check(codes.dtype in _CODE_DTYPES, lambda: f"{op}: codes must be uint8 or int16, got {codes.dtype}")
    _check_float(op, "codebooks", codebooks)
    torch._check(codebooks.dim() == 3, lambda: f"{op}: codebooks must be [K, k, d], got {tuple(codebooks.shape)}")
    K, k, d = codebooks.shape
    torch._check(K in (1, 2), lambda: f"{op}: codebooks.size(0) (K) must be 1 or 2, got {K}")
    torch._check(d in (2, 4, 8), lambda: f"{op}: codebooks.size(2) (d) must be 2, 4 or 8, got {d}")
    torch._check(16 <= k <= 65536, lambda: f"{op}: codebooks.size(1) (k) must be in [16, 65536], got {k}")
    torch._check((codes.dim() == 3 and codes.shape[2] == K) or (codes.dim() == 2 and K == 1),
                 lambda: f"{op}: codes must be [out, in/d, {K}], got {tuple(codes.shape)}")
    out = codes.shape[0]
    if scales is not None:
        torch._check(_is_float(scales) and scales.dim() == 1 and scales.shape[0] == out,
                     lambda: f"{op}: scales must be a float [{out}], got {scales.dtype} {tuple(scales.shape)}")
    return codes.shape[1] * d, out


def _check_t(op, t, in_features, out_features):
    torch._check((t.dtype == torch.float32 or (t.dtype == torch.float64 and t.device.type == "cpu"))
                 and tuple(t.shape) == (out_features, in_features),
                 lambda: f"{op}: t must be fp32 (or fp64 on the CPU) [{out_features}, {in_features}], "
                         f"got {t.dtype} {tuple(t.shape)}")


@torch.library.register_fake("blockops::vq_linear")
def _vq_linear_fake(x, codes, codebooks, scales=None, bias=None):
    in_features, out_features = _check_weights("blockops.vq_linear", codes, codebooks, scales)
    _check_features("blockops.vq_linear", "x", x, in_features)
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.register_fake("blockops::vq_dequantize")
def _vq_dequantize_fake(codes, codebooks, scales=None):
    in_features, out_features = _check_weights("blockops.vq_dequantize", codes, codebooks, scales)
    return codebooks.new_empty((out_features, in_features))


@torch.library.register_fake("blockops::vq_linear_grad_input")
def _vq_linear_grad_input_fake(grad_out, codes, codebooks, scales=None):
    in_features, out_features = _check_weights("blockops.vq_linear_grad_input", codes, codebooks, scales)
    _check_features("blockops.vq_linear_grad_input", "grad_out", grad_out, out_features)
    return grad_out.new_empty((*grad_out.shape[:-1], in_features))


@torch.library.register_fake("blockops::vq_grad_codebooks")
def _vq_grad_codebooks_fake(t, codes, codebooks, scales=None):
    in_features, out_features = _check_weights("blockops.vq_grad_codebooks", codes, codebooks, scales)
    _check_t("blockops.vq_grad_codebooks", t, in_features, out_features)
    return t.new_empty(codebooks.shape)


@torch.library.register_fake("blockops::vq_grad_scales")
def _vq_grad_scales_fake(t, codes, codebooks):
    in_features, out_features = _check_weights("blockops.vq_grad_scales", codes, codebooks, None)
    _check_t("blockops.vq_grad_scales", t, in_features, out_features)
    return t.new_empty((out_features,))


def _vq_linear_setup_context(ctx, inputs, output):
    # Defaulted trailing arguments may be missing from `inputs`: remember how many gradients to return.
    x, codes, codebooks, *rest = inputs
    scales = rest[0] if rest else None
    bias = rest[1] if len(rest) > 1 else None
    ctx.num_inputs = len(inputs)
    ctx.save_for_backward(x, codes, codebooks, scales)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _vq_linear_backward(ctx, grad_out):
    """x: grad_out @ W_hat (blocked kernel); codebooks and scales from t = grad_out^T x [out, in] (fp32):
    codebooks by a deterministic scatter-add of scales[n] * t[n, group] per code, scales by
    sum_i W_unscaled[n, i] t[n, i]; bias: grad_out summed over rows. In fp32, or fp64 when x, the codebooks, the
    scales or grad_out is (the CPU's fp64 path, for gradcheck). The backward ops have no autograd of their own, so
    there is no double backward (gradgradcheck does not apply)."""
    x, codes, codebooks, scales = ctx.saved_tensors
    need_x, _, need_codebooks, need_scales, need_bias = (*ctx.needs_input_grad, False, False)[:5]
    grad_out = grad_out.contiguous()
    gy2 = _rows_2d(grad_out)
    grad_x = grad_codebooks = grad_scales = grad_bias = None
    ct = _compute_dtype(x, codebooks, scales, grad_out)
    if need_x:
        grad_x = _ops.vq_linear_grad_input(grad_out, codes, codebooks, scales)
    if need_codebooks or need_scales:
        t = (gy2.to(ct).t() @ _rows_2d(x).to(ct)).contiguous()
        if need_codebooks:
            grad_codebooks = _ops.vq_grad_codebooks(t, codes, codebooks, scales).to(codebooks.dtype)
        if need_scales:
            grad_scales = _ops.vq_grad_scales(t, codes, codebooks).to(scales.dtype)
    if need_bias:
        grad_bias = gy2.to(ct).sum(0).to(ctx.bias_dtype)
    return (grad_x, None, grad_codebooks, grad_scales, grad_bias)[: ctx.num_inputs]


torch.library.register_autograd("blockops::vq_linear", _vq_linear_backward, setup_context=_vq_linear_setup_context)

__all__ = ["bits_per_weight", "vq_dequantize", "vq_linear"]
