"""Vector-quantized weights (VQ4DiT; AQLM with ``out_group_size = 1``): typed op wrappers, fake tensors,
autograd and k-means.

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

_ops = torch.ops.blockops
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CODE_DTYPES = (torch.uint8, torch.int16)


# ---------------------------------------------------------------------------------------------------------
# Ops
# ---------------------------------------------------------------------------------------------------------

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
    bias. CPU kernels: up to 8 rows a lookup-table GEMV or a direct dequantize-dot kernel (chosen per call,
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
    torch._check(codebooks.dtype in _FLOAT_DTYPES,
                 lambda: f"{op}: codebooks must be fp16/bf16/fp32, got {codebooks.dtype}")
    torch._check(codebooks.dim() == 3, lambda: f"{op}: codebooks must be [K, k, d], got {tuple(codebooks.shape)}")
    K, k, d = codebooks.shape
    torch._check(K in (1, 2), lambda: f"{op}: codebooks.size(0) (K) must be 1 or 2, got {K}")
    torch._check(d in (2, 4, 8), lambda: f"{op}: codebooks.size(2) (d) must be 2, 4 or 8, got {d}")
    torch._check(16 <= k <= 65536, lambda: f"{op}: codebooks.size(1) (k) must be in [16, 65536], got {k}")
    torch._check((codes.dim() == 3 and codes.shape[2] == K) or (codes.dim() == 2 and K == 1),
                 lambda: f"{op}: codes must be [out, in/d, {K}], got {tuple(codes.shape)}")
    out = codes.shape[0]
    if scales is not None:
        torch._check(scales.dtype in _FLOAT_DTYPES and scales.dim() == 1 and scales.shape[0] == out,
                     lambda: f"{op}: scales must be a float [{out}], got {scales.dtype} {tuple(scales.shape)}")
    return codes.shape[1] * d, out


def _check_features(op, arg, t, features):
    torch._check(t.dtype in _FLOAT_DTYPES, lambda: f"{op}: {arg} must be fp16/bf16/fp32, got {t.dtype}")
    torch._check(t.dim() >= 1 and t.shape[-1] == features,
                 lambda: f"{op}: {arg} must have {features} features in its last dim, got {tuple(t.shape)}")


def _check_t(op, t, in_features, out_features):
    torch._check(t.dtype == torch.float32 and tuple(t.shape) == (out_features, in_features),
                 lambda: f"{op}: t must be fp32 [{out_features}, {in_features}], got {t.dtype} {tuple(t.shape)}")


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
    sum_i W_unscaled[n, i] t[n, i]; bias: grad_out summed over rows."""
    x, codes, codebooks, scales = ctx.saved_tensors
    need_x, _, need_codebooks, need_scales, need_bias = (*ctx.needs_input_grad, False, False)[:5]
    grad_out = grad_out.contiguous()
    gy2 = grad_out.reshape(-1, grad_out.shape[-1])
    grad_x = grad_codebooks = grad_scales = grad_bias = None
    if need_x:
        grad_x = _ops.vq_linear_grad_input(grad_out, codes, codebooks, scales)
    if need_codebooks or need_scales:
        t = (gy2.float().t() @ x.reshape(-1, x.shape[-1]).float()).contiguous()
        if need_codebooks:
            grad_codebooks = _ops.vq_grad_codebooks(t, codes, codebooks, scales).to(codebooks.dtype)
        if need_scales:
            grad_scales = _ops.vq_grad_scales(t, codes, codebooks).to(scales.dtype)
    if need_bias:
        grad_bias = gy2.float().sum(0).to(ctx.bias_dtype)
    return (grad_x, None, grad_codebooks, grad_scales, grad_bias)[: ctx.num_inputs]


torch.library.register_autograd("blockops::vq_linear", _vq_linear_backward, setup_context=_vq_linear_setup_context)


# ---------------------------------------------------------------------------------------------------------
# k-means
# ---------------------------------------------------------------------------------------------------------

def _squared_distances(vectors, centroids, centroid_norms):
    """``[N, k]`` squared Euclidean distances through one matmul (``|v|^2 - 2 v.c + |c|^2``; may round slightly
    below zero). ``centroid_norms``: ``(centroids ** 2).sum(1)``, computed once by callers that loop over chunks."""
    return (vectors * vectors).sum(1, keepdim=True) - 2 * vectors @ centroids.t() + centroid_norms


def _nearest(vectors, centroids, chunk_size, accumulate=False):
    """Nearest centroid per vector (and, with accumulate, per-centroid sums and counts), ``chunk_size`` vectors
    at a time so that the [chunk, k] distance matrix bounds memory. Sums go through a one-hot matmul, which
    is deterministic on every device (index_add_ uses atomics on CUDA)."""
    k = centroids.shape[0]
    c_norm = (centroids * centroids).sum(1)
    codes = torch.empty(vectors.shape[0], dtype=torch.long, device=vectors.device)
    err = torch.zeros((), dtype=torch.float64, device=vectors.device)
    sums = torch.zeros_like(centroids) if accumulate else None
    counts = torch.zeros(k, dtype=vectors.dtype, device=vectors.device) if accumulate else None
    for s in range(0, vectors.shape[0], chunk_size):
        v = vectors[s:s + chunk_size]
        dist = _squared_distances(v, centroids, c_norm)
        best, idx = dist.min(1)
        codes[s:s + chunk_size] = idx
        err += best.clamp_min(0).double().sum()
        if accumulate:
            onehot = torch.nn.functional.one_hot(idx, k).to(v.dtype)
            sums += onehot.t() @ v
            counts += onehot.sum(0)
    return codes, err, sums, counts


def kmeans(vectors: torch.Tensor, k: int, iters: int = 25, seed: int = 0, chunk_size: int = 16384):
    """Lloyd's k-means with k-means++ initialisation on ``vectors [N, d]`` (any float dtype; computed in fp32
    on the input's device), deterministic for a given seed.

    Returns ``(centroids [k, d] fp32, codes [N] int64, sse)``: codes are each vector's nearest centroid and
    ``sse`` (a float) the sum of squared distances to them. Empty clusters keep their centroid. Distances are
    computed ``chunk_size`` vectors at a time. Lloyd's iterations never increase ``sse``. The k-means++ seeding
    picks the k centres one after another (k passes of O(N d)), which dominates for k in the tens of thousands.
    """
    if vectors.dim() != 2:
        raise ValueError(f"kmeans: vectors must be [N, d], got shape {tuple(vectors.shape)}")
    n = vectors.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"kmeans: need 1 <= k <= N = {n}, got k = {k}")
    v = vectors.detach().float().contiguous()
    gen = torch.Generator(device=v.device)
    gen.manual_seed(seed)
    # k-means++: each next centre drawn with probability proportional to the squared distance to the nearest
    # centre chosen so far (inverse-CDF sampling in fp64: multinomial is limited to 2^24 categories).
    centroids = torch.empty(k, v.shape[1], device=v.device)
    first = torch.randint(n, (1,), generator=gen, device=v.device)
    centroids[0] = v[first[0]]
    min_d = ((v - centroids[0]) ** 2).sum(1).double()
    for i in range(1, k):
        cdf = min_d.cumsum(0)
        u = torch.rand(1, generator=gen, device=v.device, dtype=torch.float64) * cdf[-1]
        pick = torch.searchsorted(cdf, u).clamp_max(n - 1)
        centroids[i] = v[pick[0]]
        min_d = torch.minimum(min_d, ((v - centroids[i]) ** 2).sum(1).double())
    for _ in range(iters):
        _, _, sums, counts = _nearest(v, centroids, chunk_size, accumulate=True)
        filled = counts > 0
        centroids = torch.where(filled[:, None], sums / counts.clamp_min(1)[:, None], centroids)
    codes, err, _, _ = _nearest(v, centroids, chunk_size)
    return centroids, codes, err.item()


# VQ4DiT calibration builds on the ops and k-means above (imported last: it imports them back).
from blockops.vq_calibration import (  # noqa: E402
    CalibrationResult, SoftVQLinear, blockwise_mse, calibrate_blockwise, candidate_sets, quantize_blocks)

__all__ = ["CalibrationResult", "SoftVQLinear", "bits_per_weight", "blockwise_mse", "calibrate_blockwise",
           "candidate_sets", "kmeans", "quantize_blocks", "vq_dequantize", "vq_linear"]
