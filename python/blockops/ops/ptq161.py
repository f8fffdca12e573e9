"""1.61-bit weights (family "ptq161": PTQ1.61): typed op wrappers, fake tensors, autograd and the packed format's
constants and bit count. The quantizer that produces the format (``quantize_weight``, ``salient_count``) and the
PTQ1.61 pipeline live in blockops/quant/ptq161.py.

Packed format (csrc/ptq161.h), for ``W [out, in]`` with ``S`` salient input channels and ``N = in - S`` others:

==============  =========================  ======  =============================================================
tensor          shape                      dtype   meaning
==============  =========================  ======  =============================================================
perm            ``[in]``                   int32   ``perm[:S]`` salient channels, ``perm[S:]`` the others
qsalient        ``[S_pad / 8, out]``       int32   4-bit codes, ``pack_bits(q, 4, dim=0)``, ``q [S_pad, out]`` in
                                                   perm order, ``S_pad`` = S rounded up to 16 (padding ignored)
salient_scale   ``[out]``                  float   ``W_high[i, perm[k]] = s_i (q[k, i] - z_i)``
salient_zero    ``[out]``                  float
signs           ``[ceil(N / 32), out]``    int32   ``pack_bits(b, 1, dim=0)``, ``b [N, out]`` in perm order, 1 = +1
zero_signs      ``[Z]``                    int64   strictly increasing ``j * out + i`` where sign = 0 (see below)
alpha, mu, r1   ``[out]``                  float   ``W_low[i, c] = r1_i r2_c (alpha_i b + mu_i)``, ``c = perm[S+j]``
r2              ``[in]``                   float   (entries of salient channels unused)
==============  =========================  ======  =============================================================

``sign(0) = 0``, as ``torch.sign`` in the reference: a non-salient weight equal to its row's ``mu`` gets
``W_low = r1 r2 mu``. One bit cannot hold three values, so those (rare) entries are listed in ``zero_signs``
and the kernels take them out of the +-1 sums; their stored bit is ignored.
"""
from __future__ import annotations

import torch

from blockops.ops._common import _check_features, _compute_dtype, _is_float, _rows_2d

_ops = torch.ops.blockops

SALIENT_ALIGN = 16  # S_pad granularity (the lowbit 4-bit kernels' group unit)
FIELDS = ("perm", "qsalient", "salient_scale", "salient_zero", "signs", "zero_signs", "alpha", "mu", "r1", "r2")


def salient_padded(num_salient: int) -> int:
    return -(-num_salient // SALIENT_ALIGN) * SALIENT_ALIGN


def ptq161_linear(x, perm, qsalient, salient_scale, salient_zero, signs, zero_signs, alpha, mu, r1, r2,
                  num_salient: int, bias=None) -> torch.Tensor:
    """``y = x @ W_hat^T + bias`` for PTQ1.61 weights (layout in the module docstring).

    Args:
        x: fp16, bf16 or fp32 ``[..., in]``, contiguous.
        perm, qsalient, signs, zero_signs: the packed integer tensors (int32, int32, int32, int64), contiguous.
        salient_scale, salient_zero, alpha, mu, r1: ``[out]``; r2: ``[in]``; each fp16, bf16 or fp32.
        num_salient: S.  bias: optional ``[out]``.

    Returns ``[..., out]`` in x's dtype, accumulated in fp32, computed as the 4-bit part on the salient channels
    plus ``r1 (alpha U + mu V)`` with ``U`` the +-1 product on ``r2 * x``. Differentiable w.r.t. x, alpha, r1, r2
    and bias (mu and the salient scale and zero are fixed, as in PTQ1.61), once (the backward op has no autograd of
    its own). fp64 x / factors / bias are accepted on the CPU: a portable fp64 path (W_hat dequantized in fp64, dense
    products), for ``gradcheck``; CUDA refuses fp64.
    """
    return _ops.ptq161_linear(x, perm, qsalient, salient_scale, salient_zero, signs, zero_signs, alpha, mu, r1, r2,
                              num_salient, bias)


def ptq161_dequantize(perm, qsalient, salient_scale, salient_zero, signs, zero_signs, alpha, mu, r1, r2,
                      num_salient: int) -> torch.Tensor:
    """``W_hat [out, in]`` fp32 (fp64 when a factor is fp64, CPU only) in the original channel order (arguments as
    in :func:`ptq161_linear`)."""
    return _ops.ptq161_dequantize(perm, qsalient, salient_scale, salient_zero, signs, zero_signs, alpha, mu, r1, r2,
                                  num_salient)


def bits_per_weight(tensors: dict, bias: torch.Tensor | None = None) -> float:
    """Stored bits per weight, every tensor of the format counted at its storage width (codes with their padding,
    perm, the sign(0) list, every factor, and the bias when given), over ``out * in`` weights."""
    out_features, in_features = tensors["alpha"].numel(), tensors["perm"].numel()
    stored = [tensors[name] for name in FIELDS] + ([bias] if bias is not None else [])
    bits = sum(t.numel() * t.element_size() * 8 for t in stored)
    return bits / max(out_features * in_features, 1)


# ---------------------------------------------------------------------------------------------------------
# Fake tensors and autograd
# ---------------------------------------------------------------------------------------------------------

def _check_weight(op, perm, qsalient, salient_scale, salient_zero, signs, zero_signs, alpha, mu, r1, r2, num_salient):
    torch._check(perm.dtype == torch.int32 and qsalient.dtype == torch.int32 and signs.dtype == torch.int32,
                 lambda: f"{op}: perm, qsalient and signs must be int32")
    torch._check(zero_signs.dtype == torch.int64, lambda: f"{op}: zero_signs must be int64, got {zero_signs.dtype}")
    torch._check(perm.dim() == 1 and alpha.dim() == 1, lambda: f"{op}: perm and alpha must be 1-D")
    in_features, out_features = perm.shape[0], alpha.shape[0]
    torch._check(0 <= num_salient <= in_features, lambda: f"{op}: num_salient must be in [0, {in_features}]")
    plain = in_features - num_salient
    torch._check(tuple(qsalient.shape) == (salient_padded(num_salient) // 8, out_features),
                 lambda: f"{op}: qsalient shape {tuple(qsalient.shape)} does not match S={num_salient}, out={out_features}")
    torch._check(tuple(signs.shape) == (-(-plain // 32), out_features),
                 lambda: f"{op}: signs shape {tuple(signs.shape)} does not match N={plain}, out={out_features}")
    for name, t, size in (("salient_scale", salient_scale, out_features), ("salient_zero", salient_zero, out_features),
                          ("alpha", alpha, out_features), ("mu", mu, out_features), ("r1", r1, out_features),
                          ("r2", r2, in_features)):
        torch._check(_is_float(t) and tuple(t.shape) == (size,),
                     lambda: f"{op}: {name} must be a float [{size}], got {t.dtype} {tuple(t.shape)}")
    return in_features, out_features


@torch.library.register_fake("blockops::ptq161_linear")
def _ptq161_linear_fake(x, perm, qsalient, salient_scale, salient_zero, signs, zero_signs, alpha, mu, r1, r2,
                        num_salient, bias=None):
    op = "blockops.ptq161_linear"
    in_features, out_features = _check_weight(op, perm, qsalient, salient_scale, salient_zero, signs, zero_signs,
                                              alpha, mu, r1, r2, num_salient)
    _check_features(op, "x", x, in_features)
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.register_fake("blockops::ptq161_dequantize")
def _ptq161_dequantize_fake(perm, qsalient, salient_scale, salient_zero, signs, zero_signs, alpha, mu, r1, r2,
                            num_salient):
    in_features, out_features = _check_weight("blockops.ptq161_dequantize", perm, qsalient, salient_scale,
                                              salient_zero, signs, zero_signs, alpha, mu, r1, r2, num_salient)
    # fp32, or fp64 when a factor is (the CPU's fp64 path).
    dtype = _compute_dtype(salient_scale, salient_zero, alpha, mu, r1, r2)
    return alpha.new_empty((out_features, in_features), dtype=dtype)


@torch.library.register_fake("blockops::ptq161_linear_backward")
def _ptq161_linear_backward_fake(grad_out, x, perm, qsalient, salient_scale, salient_zero, signs, zero_signs, alpha,
                                 mu, r1, r2, num_salient, need_input, need_factors):
    op = "blockops.ptq161_linear_backward"
    in_features, out_features = _check_weight(op, perm, qsalient, salient_scale, salient_zero, signs, zero_signs,
                                              alpha, mu, r1, r2, num_salient)
    _check_features(op, "x", x, in_features)
    _check_features(op, "grad_out", grad_out, out_features)
    grad_x = x.new_empty(x.shape) if need_input else x.new_empty((0,))
    if need_factors:
        return grad_x, alpha.new_empty(alpha.shape), r1.new_empty(r1.shape), r2.new_empty(r2.shape)
    return grad_x, alpha.new_empty((0,)), r1.new_empty((0,)), r2.new_empty((0,))


_X, _ALPHA, _R1, _R2, _BIAS = 0, 7, 9, 10, 12  # argument positions of the differentiable inputs


def _ptq161_linear_setup_context(ctx, inputs, output):
    # A defaulted trailing bias=None is not part of `inputs`: remember how many gradients to return.
    ctx.num_inputs = len(inputs)
    ctx.save_for_backward(*inputs[:11])
    ctx.num_salient = inputs[11]
    ctx.bias_dtype = inputs[_BIAS].dtype if len(inputs) > _BIAS and inputs[_BIAS] is not None else None


def _ptq161_linear_backward(ctx, grad_out):
    """x, alpha, r1, r2 from the backward kernel (one call); bias: grad_out summed over rows. fp64 inputs take the
    CPU's fp64 path (for gradcheck). ptq161_linear_backward has no autograd of its own, so there is no double
    backward (gradgradcheck does not apply)."""
    x, *weights = ctx.saved_tensors
    needs = (*ctx.needs_input_grad, False)
    need_input, need_factors = needs[_X], needs[_ALPHA] or needs[_R1] or needs[_R2]
    grads = [None] * ctx.num_inputs
    if need_input or need_factors:
        gx, ga, gr1, gr2 = _ops.ptq161_linear_backward(grad_out.contiguous(), x, *weights, ctx.num_salient,
                                                       need_input, need_factors)
        grads[_X] = gx if need_input else None
        if need_factors:
            grads[_ALPHA], grads[_R1], grads[_R2] = ga, gr1, gr2
    if needs[_BIAS] and ctx.bias_dtype is not None:
        ct = _compute_dtype(grad_out, x)
        grads[_BIAS] = _rows_2d(grad_out).to(ct).sum(0).to(ctx.bias_dtype)
    return tuple(grads)


torch.library.register_autograd("blockops::ptq161_linear", _ptq161_linear_backward,
                                setup_context=_ptq161_linear_setup_context)

__all__ = ["FIELDS", "SALIENT_ALIGN", "bits_per_weight", "ptq161_dequantize", "ptq161_linear", "salient_padded"]
