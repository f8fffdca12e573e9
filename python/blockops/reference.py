"""Pure-PyTorch references (``ref_*``) for every blockops op, and :data:`OP_REFERENCES`, which names the reference
of each op registered in csrc/ops.cpp (tests/test_architecture.py checks that none is missing).

Written for clarity, not speed: tests compare the kernels against them, and benchmarks use them as the
"plain PyTorch" baseline where PyTorch has no op of its own. A backward op's reference is its forward op's: the
tests compare the backward kernels with autograd through the forward reference.
"""
from __future__ import annotations

import torch


def ref_pack_bits(values: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Reference for ``blockops.pack_bits``: LSB-first, ``32 // bits`` values per int32 word along ``dim``."""
    per = 32 // bits
    v = values.movedim(dim, -1).to(torch.int64)
    n = v.shape[-1]
    words = -(-n // per)
    v = torch.nn.functional.pad(v, (0, words * per - n))
    v = v.reshape(*v.shape[:-1], words, per)
    shifts = torch.arange(per, device=v.device, dtype=torch.int64) * bits
    packed = (v << shifts).sum(-1)  # fields do not overlap, so the sum is the bitwise OR
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return packed.movedim(-1, dim).contiguous()


def ref_unpack_bits(packed: torch.Tensor, bits: int, size: int, dim: int = -1) -> torch.Tensor:
    """Reference for ``blockops.unpack_bits``."""
    per = 32 // bits
    p = packed.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per, device=p.device, dtype=torch.int64) * bits
    v = (p.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    v = v.reshape(*v.shape[:-2], v.shape[-2] * per)[..., :size]   # not -1: ambiguous for 0 elements
    return v.to(torch.uint8).movedim(-1, dim).contiguous()


def ref_quant_dequantize(qweight, scales, zeros, bits: int, group_size: int) -> torch.Tensor:
    """Reference for ``blockops.ops.quant_dequantize``, in fp32: ``W_hat [out, in]``."""
    in_features = scales.shape[0] * group_size
    q = ref_unpack_bits(qweight, bits, in_features, 0).float()          # [in, out]
    s = scales.float().repeat_interleave(group_size, 0)
    z = zeros.float().repeat_interleave(group_size, 0)
    return ((q - z) * s).t().contiguous()


def ref_quant_linear(x, qweight, scales, zeros, bits: int, group_size: int, bias=None) -> torch.Tensor:
    """Reference for ``blockops.ops.quant_linear``: dequantize, then an fp32 matmul."""
    y = x.float() @ ref_quant_dequantize(qweight, scales, zeros, bits, group_size).t()
    return y if bias is None else y + bias.float()


def ref_masked_attention(q, k, v, dense_mask, scale=None):
    """Reference for block-sparse attention: softmax over the visible keys only, computed in q's dtype (pass
    fp64 for an exact reference).

    Args:
        q: ``[B, H, Tq, D]``; k: ``[B, Hk, Tk, D]``; v: ``[B, Hk, Tk, Dv]`` (``H`` a multiple of ``Hk``: GQA).
        dense_mask: bool, broadcastable to ``[B, H, Tq, Tk]`` (True = visible), e.g. ``BlockMask.to_dense()``.
        scale: score scale, default ``D ** -0.5``.

    Returns:
        ``(out [B, H, Tq, Dv], lse [B, H, Tq])`` with ``lse`` the natural log-sum-exp of the scaled visible scores.
        Rows with no visible key give ``out = 0`` and ``lse = -inf`` (not NaN).
    """
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2).to(q.dtype)) * scale
    s = s.masked_fill(~dense_mask.to(torch.bool), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse).unsqueeze(-1))
    out = p @ v.to(q.dtype)
    return out, lse


def ref_path_attention(q, k, v, w, beta, g=None, scale=None, cu_seqlens=None, return_lse: bool = False):
    """Reference for ``blockops.attention.path_attention`` (PaTH, with the optional PaTH-FoX forget gate),
    computed in q's dtype (pass fp64 for an exact reference); differentiable by autograd, so it is also the
    gradient reference. O(T^2 D) per head: meant for T up to a few hundred.

    With ``H_t = I - beta_t w_t w_t^T``, the logit of query i and key j <= i is
    ``q_i^T H_i H_{i-1} ... H_{j+1} k_j`` (no transform on the diagonal); ``G = cumsum(g)`` per sequence and query
    head; ``s_ij = scale * (logit_ij + G_i - G_j)`` (the gate term is scaled too, as in flash-linear-attention);
    causal softmax; ``o = softmax(s) V``.

    Args:
        q: ``[B, T, HQ, D]``; k, w: ``[B, T, H, D]``; v: ``[B, T, H, Dv]``; beta: ``[B, T, H]``; g: ``[B, T, HQ]``
            or None. ``HQ`` a multiple of ``H`` (query head h reads key head ``h // (HQ // H)``).
        scale: default ``D ** -0.5``.
        cu_seqlens: int tensor ``[N + 1]`` of sequence boundaries for packed sequences (B must be 1).
        return_lse: also return the natural log-sum-exp of each row's scores, ``[B, T, HQ]``.

    Returns:
        ``o [B, T, HQ, Dv]`` (or ``(o, lse)``).
    """
    if cu_seqlens is not None:
        assert q.shape[0] == 1, "cu_seqlens needs B = 1"
        bounds = [int(x) for x in cu_seqlens.tolist()]
        parts = [ref_path_attention(q[:, s:e], k[:, s:e], v[:, s:e], w[:, s:e], beta[:, s:e],
                                    None if g is None else g[:, s:e], scale, None, True)
                 for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
        o, lse = torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)
        return (o, lse) if return_lse else o
    B, T, HQ, D = q.shape
    rep = HQ // k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    dt = q.dtype
    # [B, HQ, T, *] per query head (key-head tensors repeated for GQA)
    kt, vt, wt = (x.to(dt).repeat_interleave(rep, 2).transpose(1, 2) for x in (k, v, w))
    bt = beta.to(dt).repeat_interleave(rep, 2).transpose(1, 2)
    # Walk the diagonals: after s steps, cur[:, :, i - s] = H_{i-s+1} ... H_i q_i for the queries i >= s (each H
    # is symmetric, so transforming the query is transforming the key from the other side), and
    # diag[s][i - s] = logit(i, i - s).
    cur = q.transpose(1, 2)
    diags = []
    for s in range(T):
        kj, wj, bj = kt[:, :, :T - s], wt[:, :, :T - s], bt[:, :, :T - s]
        diags.append(torch.nn.functional.pad((cur * kj).sum(-1), (s, 0)))   # indexed by i
        cur = cur - (bj * (cur * wj).sum(-1)).unsqueeze(-1) * wj            # apply H_{i-s}
        cur = cur[:, :, 1:]
    by_offset = torch.stack(diags, 2)                                      # [B, HQ, s, i]
    i = torch.arange(T, device=q.device)
    offset = (i[:, None] - i[None, :]).clamp_min(0)                        # [i, j] -> s = i - j
    logits = by_offset.gather(2, offset.T.expand(B, HQ, T, T)).transpose(2, 3)  # [B, HQ, i, j]
    if g is not None:
        G = g.to(dt).cumsum(1).transpose(1, 2)                             # [B, HQ, T]
        logits = logits + G[..., :, None] - G[..., None, :]
    s_ij = (logits * scale).masked_fill(i[None, :] > i[:, None], float("-inf"))
    lse = torch.logsumexp(s_ij, -1)
    o = (torch.softmax(s_ij, -1) @ vt).transpose(1, 2)
    return (o, lse.transpose(1, 2)) if return_lse else o


def ref_path_key_cache(k, w, beta):
    """Reference for ``path_key_cache`` (one sequence per batch row; ``[B, T, H, D]``): by brute force, each key
    pushed through every later token's transform, ``k_cache[j] = H_last ... H_{j+1} k_j``."""
    out = k.clone()
    for j in range(k.shape[1]):
        x = k[:, j].clone()
        for t in range(j + 1, k.shape[1]):
            x = x - beta[:, t, :, None] * (x * w[:, t]).sum(-1, keepdim=True) * w[:, t]
        out[:, j] = x
    return out


def ref_path_decode_step(q_t, k_t, v_t, w_t, beta_t, g_t, keys, values, lengths, gates, g_last, scale):
    """Reference for ``path_decode_step``: the step in plain fp64 PyTorch ops, on copies of the cache (arguments as
    the op's; see ``blockops.attention.path_decode_step``). Returns ``(o_t, keys, values, gates, g_last)``."""
    keys, values = keys.double().clone(), values.double().clone()
    B, HQ, D = q_t.shape
    H, L = keys.shape[1], keys.shape[2]
    pos = torch.arange(L)
    old = (pos[None, :] < lengths[:, None])[:, None, :, None]   # cached keys j < len
    w = w_t.double()[:, :, None, :]
    upd = keys - beta_t.double()[:, :, None, None] * (keys * w).sum(-1, keepdim=True) * w
    keys = torch.where(old, upd, keys)
    rows = torch.arange(B)
    keys[rows, :, lengths] = k_t.double()
    values[rows, :, lengths] = v_t.double()
    if g_t is not None:
        gates, g_last = gates.double().clone(), g_last.double() + g_t.double()
        gates[rows, :, lengths] = g_last
    q = q_t.double().view(B, H, HQ // H, D)
    s = torch.einsum("bhgd,bhld->bhgl", q, keys)
    if g_t is not None:
        s = s + (g_last[:, :, None] - gates).view(B, H, HQ // H, L)
    hidden = pos[None, :] > lengths[:, None]
    s = (s * scale).masked_fill(hidden[:, None, None, :], float("-inf"))
    o = torch.einsum("bhgl,bhlv->bhgv", torch.softmax(s, -1), values).reshape(B, HQ, -1)
    return o, keys, values, gates, g_last


def ref_vq_dequantize(codes, codebooks, scales=None) -> torch.Tensor:
    """VQ weights (blockops.vq layout) decoded in fp32: ``W_hat [out, in]`` with
    ``W_hat[n, j*d:(j+1)*d] = scales[n] * sum_K codebooks[K, codes[n, j, K]]``.

    codes: uint8 or int16 ``[out, in/d, K]`` (or ``[out, in/d]`` when K = 1); int16 codes are read as
    uint16 (``value mod 65536``). codebooks: ``[K, k, d]``. scales: ``[out]`` or None."""
    if codes.dim() == 2:
        codes = codes.unsqueeze(-1)
    idx = codes.long() % 65536 if codes.dtype == torch.int16 else codes.long()
    cb = codebooks.float()
    out, groups, num_codebooks = idx.shape
    w = sum(cb[c][idx[:, :, c]] for c in range(num_codebooks))        # [out, in/d, d]
    w = w.reshape(out, groups * cb.shape[-1])
    return w if scales is None else w * scales.float()[:, None]


def ref_vq_linear(x, codes, codebooks, scales=None, bias=None) -> torch.Tensor:
    """``y = x @ W_hat^T + bias`` in fp32 (``W_hat`` from :func:`ref_vq_dequantize`), returned in x's dtype."""
    y = x.float() @ ref_vq_dequantize(codes, codebooks, scales).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def ref_ptq161_weight(weight, mask, salient_scale, salient_zero, alpha, mu, r1, r2) -> torch.Tensor:
    """PTQ1.61's dense fake-quantized weight, straight from the full-precision ``weight [out, in]`` (fp32):
    ``W_hat = mask * W_high + (1 - mask) * W_low`` with ``mask [in]`` (1 = salient channel),
    ``W_high = s (clamp(round(W / s) + z, 0, 15) - z)`` per row and
    ``W_low = r1 r2 (alpha sign(W - mu) + mu)`` (``torch.sign``: ``sign(0) = 0``). Differentiable in the factors."""
    w = weight.float()
    s, z = salient_scale.float()[:, None], salient_zero.float()[:, None]
    w_high = s * (torch.clamp(torch.round(w / s) + z, 0, 15) - z)
    a, m = alpha.float()[:, None], mu.float()[:, None]
    w_low = r1.float()[:, None] * r2.float()[None, :] * (a * torch.sign(w - m) + m)
    mask = mask.float()[None, :]
    return mask * w_high + (1 - mask) * w_low


def ref_ptq161_dequantize(perm, qsalient, salient_scale, salient_zero, signs, zero_signs, alpha, mu, r1, r2,
                          num_salient: int) -> torch.Tensor:
    """Reference for ``blockops.ptq161.ptq161_dequantize`` (format in blockops/ops/ptq161.py), in fp32, from the
    packed tensors: codes and sign bits unpacked, ``mask * W_high + (1 - mask) * W_low`` assembled in the original
    channel order. Differentiable in alpha, mu, r1 and r2 (the gradient reference)."""
    in_features, out_features = perm.numel(), alpha.numel()
    plain = in_features - num_salient
    q = ref_unpack_bits(qsalient, 4, qsalient.shape[0] * 8, 0)[:num_salient].float()      # [S, out]
    b = ref_unpack_bits(signs, 1, signs.shape[0] * 32, 0)[:plain].float() * 2 - 1          # [N, out]
    flat = b.reshape(-1).clone()
    flat[zero_signs.long()] = 0                                                           # sign(0) = 0
    b = flat.view(plain, out_features)
    perm, dev = perm.long(), alpha.device
    mask = torch.zeros(in_features, device=dev)
    mask[perm[:num_salient]] = 1
    w_high = torch.zeros(out_features, in_features, device=dev)
    w_high[:, perm[:num_salient]] = salient_scale.float()[:, None] * (q.t() - salient_zero.float()[:, None])
    b_full = torch.zeros(out_features, in_features, device=dev)
    b_full[:, perm[num_salient:]] = b.t()
    w_low = r1.float()[:, None] * r2.float()[None, :] * (alpha.float()[:, None] * b_full + mu.float()[:, None])
    return mask * w_high + (1 - mask) * w_low


def ref_ptq161_linear(x, perm, qsalient, salient_scale, salient_zero, signs, zero_signs, alpha, mu, r1, r2,
                      num_salient: int, bias=None) -> torch.Tensor:
    """Reference for ``blockops.ptq161.ptq161_linear``: dequantize, then an fp32 matmul (returned in fp32)."""
    w = ref_ptq161_dequantize(perm, qsalient, salient_scale, salient_zero, signs, zero_signs, alpha, mu, r1, r2,
                              num_salient)
    y = x.float() @ w.t()
    return y if bias is None else y + bias.float()
def ref_dllm_candidates(masked: torch.Tensor, block_bounds: torch.Tensor) -> torch.Tensor:
    """Bool [B, L]: masked positions l with lo <= l < hi of their row (``blockops.dllm.unmask``'s candidates)."""
    pos = torch.arange(masked.shape[1], device=masked.device)
    return masked & (pos >= block_bounds[:, :1]) & (pos < block_bounds[:, 1:])


def ref_dllm_select(confidence: torch.Tensor, candidates: torch.Tensor, threshold: float = 0.9,
                    factor: float | None = None, min_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """The selection rule of ``blockops.dllm.unmask`` on given fp32 confidences [B, L]: rank the candidates by
    (confidence descending, position ascending; NaN last), accept rank r if r < max(1, min_tokens) or, threshold
    rule, conf > threshold, or, factor rule, (r + 2)(1 - conf) < factor. Compared in fp32, as the kernels do."""
    conf = confidence.float()
    key = torch.where(candidates, conf.nan_to_num(nan=float("-inf")), float("-inf"))
    pos = torch.arange(conf.shape[1], device=conf.device)
    before = (key[:, None, :] > key[:, :, None]) | ((key[:, None, :] == key[:, :, None]) & (pos[None, :] < pos[:, None]))
    rank = (before & candidates[:, None, :]).sum(-1)          # candidates ranked before each position
    k = torch.ones(conf.shape[0], dtype=torch.long, device=conf.device) if min_tokens is None else min_tokens.clamp_min(1)
    if factor is None:
        rule = conf > torch.tensor(threshold, dtype=torch.float32)
    else:
        rule = (rank + 2).float() * (1 - conf) < torch.tensor(factor, dtype=torch.float32)
    return candidates & ((rank < k[:, None]) | rule)


def ref_dllm_unmask(logits: torch.Tensor, masked: torch.Tensor, block_bounds: torch.Tensor, threshold: float = 0.9,
                    factor: float | None = None, min_tokens: torch.Tensor | None = None):
    """Reference for ``blockops.dllm.unmask`` (the eager expression: softmax, max, threshold / sorted factor rule),
    statistics in fp64: returns (tokens, unmask, confidence) with the kernel's conventions off the candidates."""
    x = logits.double()
    tokens = x.argmax(-1)                                     # first index among equal maxima
    conf = torch.softmax(x, -1).gather(-1, tokens[..., None])[..., 0].float()
    cand = ref_dllm_candidates(masked, block_bounds)
    unmask = ref_dllm_select(conf, cand, threshold, factor, min_tokens)
    return (torch.where(cand, tokens, -1), unmask, torch.where(cand, conf, float("-inf")))


def ref_dllm_kv_overwrite(cache: torch.Tensor, new: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Reference for ``blockops.dllm.kv_overwrite`` (out of place): ``cache[b, h, positions[b, j]] = new[b, h, j]``."""
    out = cache.clone()
    idx = positions[:, None, :, None].expand(-1, cache.shape[1], -1, cache.shape[3])
    return out.scatter(2, idx, new.to(cache.dtype))
def ref_relative_l1(current, reference, stride: int = 1, per_sample: bool = False) -> torch.Tensor:
    """Reference for ``blockops.block_cache.relative_l1``, in fp64: ``sum|current - reference| / sum|reference|``
    over the tokens (dim 1) ``t % stride == 0``, per sample or over the batch; 0 when both sums are 0."""
    # A stride >= T takes token 0 only, as T does; slicing with a huge step would overflow torch's own strides.
    step = min(stride, max(current.shape[1], 1))
    x = current.double()[:, ::step].flatten(1)   # not reshape(B, -1): ambiguous when B = 0
    r = reference.double()[:, ::step].flatten(1)
    num, den = (x - r).abs().sum(1), r.abs().sum(1)
    if not per_sample:
        num, den = num.sum(), den.sum()
    return torch.where((num == 0) & (den == 0), torch.zeros_like(num), num / den)


def ref_relative_l1_residual(output, input, reference, stride: int = 1, per_sample: bool = False,
                             compare_residual: bool = False):
    """Reference for ``blockops.block_cache.relative_l1_residual``: ``(indicator fp64, residual)``, the residual
    ``output - input`` computed in fp32 and rounded to the inputs' dtype; the indicator compares that fp32
    difference (``compare_residual``) or ``output`` against ``reference``."""
    diff = output.float() - input.float()
    compared = diff if compare_residual else output
    return ref_relative_l1(compared, reference, stride, per_sample), diff.to(output.dtype)


def ref_apply_residual(input, residual) -> torch.Tensor:
    """Reference for ``blockops.block_cache.apply_residual``: fp32 sum rounded once to the input's dtype."""
    return (input.float() + residual.float()).to(input.dtype)


def ref_cache_update(cache, value, gate=None) -> torch.Tensor:
    """Reference for ``blockops.block_cache.cache_update`` (out of place): ``value`` where the one-element ``gate`` is
    absent or non-zero, else ``cache``."""
    keep = gate is not None and not bool(gate.reshape(()) != 0)
    return cache.clone() if keep else value.clone()


# op (torch.ops.blockops.<op>) -> its reference. Backward ops map to their forward op's reference (gradients are
# checked against autograd through it); path_attention's reference computes lse too (return_lse=True).
OP_REFERENCES = {
    "pack_bits": ref_pack_bits,
    "unpack_bits": ref_unpack_bits,
    "quant_linear": ref_quant_linear,
    "quant_dequantize": ref_quant_dequantize,
    "quant_linear_grad_input": ref_quant_linear,
    "quant_grad_scales": ref_quant_linear,
    "block_sparse_attention": ref_masked_attention,
    "block_sparse_attention_backward": ref_masked_attention,
    "path_attention": ref_path_attention,
    "path_attention_backward": ref_path_attention,
    "path_key_cache": ref_path_key_cache,
    "path_decode_step": ref_path_decode_step,
    "vq_linear": ref_vq_linear,
    "vq_dequantize": ref_vq_dequantize,
    "vq_linear_grad_input": ref_vq_linear,
    "vq_grad_codebooks": ref_vq_linear,
    "vq_grad_scales": ref_vq_linear,
    "ptq161_linear": ref_ptq161_linear,
    "ptq161_dequantize": ref_ptq161_dequantize,
    "ptq161_linear_backward": ref_ptq161_linear,
    "dllm_unmask": ref_dllm_unmask,
    "dllm_kv_overwrite": ref_dllm_kv_overwrite,
    "relative_l1": ref_relative_l1,
    "relative_l1_residual": ref_relative_l1_residual,
    "apply_residual": ref_apply_residual,
    "cache_update": ref_cache_update,
}
