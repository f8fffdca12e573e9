"""1.61-bit weights (PTQ1.61): typed op wrappers, fake tensors, autograd and the packed format's bit count.

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

_ops = torch.ops.blockops
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

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
    and bias (mu and the salient scale and zero are fixed, as in PTQ1.61).
    """
    return _ops.ptq161_linear(x, perm, qsalient, salient_scale, salient_zero, signs, zero_signs, alpha, mu, r1, r2,
                              num_salient, bias)


def ptq161_dequantize(perm, qsalient, salient_scale, salient_zero, signs, zero_signs, alpha, mu, r1, r2,
                      num_salient: int) -> torch.Tensor:
    """``W_hat [out, in]`` fp32 in the original channel order (arguments as in :func:`ptq161_linear`)."""
    return _ops.ptq161_dequantize(perm, qsalient, salient_scale, salient_zero, signs, zero_signs, alpha, mu, r1, r2,
                                  num_salient)


def bits_per_weight(tensors: dict, bias: torch.Tensor | None = None) -> float:
    """Stored bits per weight, every tensor of the format counted at its storage width (codes with their padding,
    perm, the sign(0) list, every factor, and the bias when given), over ``out * in`` weights."""
    out_features, in_features = tensors["alpha"].numel(), tensors["perm"].numel()
    stored = [tensors[name] for name in FIELDS] + ([bias] if bias is not None else [])
    bits = sum(t.numel() * t.element_size() * 8 for t in stored)
    return bits / max(out_features * in_features, 1)


def salient_count(in_features: int, salient_ratio: float, salient_align: int = SALIENT_ALIGN) -> int:
    """``S``: ``salient_ratio * in`` rounded to the nearest multiple of ``salient_align`` (so that no code padding
    is stored; 1 gives the exact ratio), within ``[0, in]``."""
    if not 0.0 <= salient_ratio <= 1.0:
        raise ValueError(f"salient_ratio must be in [0, 1], got {salient_ratio}")
    if salient_align < 1:
        raise ValueError(f"salient_align must be >= 1, got {salient_align}")
    return min(in_features, max(0, round(salient_ratio * in_features / salient_align) * salient_align))


def quantize_weight(weight: torch.Tensor, act_scales: torch.Tensor, salient_ratio: float = 0.2,
                    salient_align: int = SALIENT_ALIGN, factor_dtype: torch.dtype = torch.float16) -> tuple[dict, int]:
    """PTQ1.61's initial quantization of ``weight [out, in]``, packed. Returns ``(tensors, num_salient)`` with
    ``tensors`` the :data:`FIELDS` of the format.

    1. The ``S`` (:func:`salient_count`) input channels with the largest ``act_scales [in]`` (max |x| per channel)
       are salient; ``perm`` lists them, then the others, each part ascending (ties: the lower channel first).
    2. Salient columns: 4-bit per row, asymmetric min-max with the range widened to include 0:
       ``s = (max(w_max, 0) - min(w_min, 0)) / 15``, ``z = round(-min(w_min, 0) / s)``,
       ``q = clamp(round(W / s) + z, 0, 15)`` (an all-zero row gets ``s = 1``, ``z = 0``).
    3. The others: ``mu`` = the row's mean, ``alpha`` = mean ``|W - mu|``, ``b = sign(W - mu)`` with
       ``sign(0) = 0`` recorded in ``zero_signs``; ``r1 = r2 = 1``.
    Factors are stored in ``factor_dtype``; codes and signs are computed from the stored (rounded) ``s``, ``z``
    and ``mu``, so :func:`blockops.reference.ref_ptq161_weight` on the stored factors reproduces the packed weight.
    """
    from blockops.ops import pack_bits

    if weight.dim() != 2:
        raise ValueError(f"quantize_weight: weight must be [out, in], got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if act_scales.shape != (in_features,):
        raise ValueError(f"quantize_weight: act_scales must be [{in_features}], got {tuple(act_scales.shape)}")
    if factor_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"quantize_weight: factor_dtype must be fp16, bf16 or fp32, got {factor_dtype}")
    w = weight.detach().float()
    dev = w.device
    num_salient = salient_count(in_features, salient_ratio, salient_align)
    order = torch.sort(act_scales.detach().float().to(dev), descending=True, stable=True).indices
    salient = order[:num_salient].sort().values
    plain = order[num_salient:].sort().values
    perm = torch.cat([salient, plain]).to(torch.int32)

    w_sal = w[:, salient]
    lo = w_sal.amin(1).clamp_max(0) if num_salient else torch.zeros(out_features, device=dev)
    hi = w_sal.amax(1).clamp_min(0) if num_salient else torch.zeros(out_features, device=dev)
    scale = ((hi - lo) / 15).to(factor_dtype).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / scale).clamp(0, 15)
    q = torch.clamp(torch.round(w_sal / scale[:, None]) + zero[:, None], 0, 15).to(torch.int32)   # [out, S]
    q = torch.nn.functional.pad(q, (0, salient_padded(num_salient) - num_salient))

    w_plain = w[:, plain]
    n_plain = w_plain.shape[1]
    mu = (w_plain.mean(1) if n_plain else torch.zeros(out_features, device=dev)).to(factor_dtype).float()
    centered = w_plain - mu[:, None]
    alpha = centered.abs().mean(1) if n_plain else torch.zeros(out_features, device=dev)
    sign = torch.sign(centered).t().contiguous()                                                   # [N, out]
    tensors = {
        "perm": perm,
        "qsalient": pack_bits(q.t().contiguous(), 4, 0),
        "salient_scale": scale.to(factor_dtype),
        "salient_zero": zero.to(factor_dtype),
        "signs": pack_bits((sign > 0).to(torch.uint8), 1, 0),
        "zero_signs": torch.nonzero(sign.reshape(-1) == 0).reshape(-1),
        "alpha": alpha.to(factor_dtype),
        "mu": mu.to(factor_dtype),
        "r1": torch.ones(out_features, dtype=factor_dtype, device=dev),
        "r2": torch.ones(in_features, dtype=factor_dtype, device=dev),
    }
    return tensors, num_salient


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
        torch._check(t.dtype in _FLOAT_DTYPES and tuple(t.shape) == (size,),
                     lambda: f"{op}: {name} must be a float [{size}], got {t.dtype} {tuple(t.shape)}")
    return in_features, out_features


def _check_features(op, arg, t, features):
    torch._check(t.dtype in _FLOAT_DTYPES, lambda: f"{op}: {arg} must be fp16/bf16/fp32, got {t.dtype}")
    torch._check(t.dim() >= 1 and t.shape[-1] == features,
                 lambda: f"{op}: {arg} must have {features} features in its last dim, got {tuple(t.shape)}")


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
    return alpha.new_empty((out_features, in_features), dtype=torch.float32)


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
    """x, alpha, r1, r2 from the backward kernel (one call); bias: grad_out summed over rows."""
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
        grads[_BIAS] = grad_out.reshape(-1, grad_out.shape[-1]).float().sum(0).to(ctx.bias_dtype)
    return tuple(grads)


torch.library.register_autograd("blockops::ptq161_linear", _ptq161_linear_backward,
                                setup_context=_ptq161_linear_setup_context)

__all__ = ["FIELDS", "bits_per_weight", "ptq161_dequantize", "ptq161_linear", "quantize_weight", "salient_count",
           "salient_padded"]
