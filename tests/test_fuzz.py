"""Property-based fuzzing of every op family (issue 17; promises in docs/reliability.md).

1. Valid inputs drawn by hypothesis (awkward and zero sizes, strided views where an op takes them, every dtype,
   random masks from the builders and random block lists, random codes) against the pure-PyTorch references in
   blockops.reference, with the tolerances of each family's own tests.
2. Bad inputs (tests/fuzz_probes.py): each family's probes run in a child process, so a crash fails the probe
   that caused it; the test names it, and the remaining probes still run.

Budget: fixed seeds (``derandomize``), a CI-sized number of examples per test by default (the file takes well under
90 s on 2 cores). Longer runs: ``BLOCKOPS_FUZZ_EXAMPLES=2000`` (examples per test) and ``BLOCKOPS_FUZZ_SEED=<int>``
(a different, still reproducible, stream of examples instead of the derandomized one).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from blockops.attention import BLOCK_SIZES, BlockMask, block_sparse_attention, masks  # noqa: E402
from blockops.ops import bitpack, block_cache as bc, dllm, lowbit, ptq161, vq  # noqa: E402
from blockops.ops.path_attention import path_attention  # noqa: E402
from blockops.reference import (ref_apply_residual, ref_cache_update, ref_dllm_candidates,  # noqa: E402
                                ref_dllm_kv_overwrite, ref_dllm_select, ref_dllm_unmask, ref_masked_attention,
                                ref_pack_bits, ref_path_attention, ref_path_key_cache, ref_ptq161_dequantize,
                                ref_ptq161_linear, ref_quant_dequantize, ref_quant_linear, ref_relative_l1,
                                ref_relative_l1_residual, ref_unpack_bits, ref_vq_dequantize, ref_vq_linear)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fuzz_probes  # noqa: E402
from test_path_attention import make_inputs as make_path_inputs  # noqa: E402

FLOATS = [torch.float32, torch.float16, torch.bfloat16]
_EXAMPLES = int(os.environ.get("BLOCKOPS_FUZZ_EXAMPLES", "0"))
_SEED = os.environ.get("BLOCKOPS_FUZZ_SEED")


def fuzz(examples: int, shrink: bool = True):
    """hypothesis settings: `examples` per test in CI (BLOCKOPS_FUZZ_EXAMPLES overrides), a fixed example
    stream, no example database (the runs do not depend on what an earlier run found), no deadline (a shared
    2-core CI machine has slow moments). shrink=False for tests marked xfail (shrinking a known failure costs
    CI time for nothing)."""
    phases = [Phase.explicit, Phase.reuse, Phase.generate] + ([Phase.shrink] if shrink else [])

    def wrap(fn):
        fn = settings(max_examples=_EXAMPLES or examples, derandomize=_SEED is None, deadline=None, database=None,
                      print_blob=True, phases=phases, suppress_health_check=list(HealthCheck))(fn)
        return hypothesis.seed(int(_SEED))(fn) if _SEED is not None else fn
    return wrap


def _gen(seed):
    return torch.Generator().manual_seed(seed)


seeds = st.integers(0, 2**31 - 1)


def _max_rel(out, ref, floor=1e-2):
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(floor)).item()


def _scaled_mean_error(y, ref, x, w):
    """Mean |error| relative to the mean of |x| @ |W|^T (the size of the terms summed): the measure of the
    lowbit / vq / ptq161 tests, meaningful where outputs cancel."""
    denom = (x.double().abs().reshape(-1, x.shape[-1]) @ w.double().abs().t()).mean().clamp_min(1e-30)
    return ((y.double() - ref.double()).abs().mean() / denom).item()


# ================================================================================================ bitpack
@fuzz(40)
@given(bits=st.integers(1, 8), shape=st.lists(st.integers(0, 37), min_size=1, max_size=3), data=st.data(),
       dtype=st.sampled_from([torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]), seed=seeds)
def test_bitpack_round_trip(bits, shape, data, dtype, seed):
    if dtype == torch.int8 and bits == 8:
        dtype = torch.int16   # int8 cannot hold 255
    dim = data.draw(st.integers(-len(shape), len(shape) - 1), label="dim")
    values = torch.randint(0, 2**bits, shape, generator=_gen(seed)).to(dtype)
    packed = bitpack.pack_bits(values, bits, dim)
    assert torch.equal(packed, ref_pack_bits(values, bits, dim))
    n = shape[dim]
    unpacked = bitpack.unpack_bits(packed, bits, n, dim)
    assert torch.equal(unpacked, ref_unpack_bits(packed, bits, n, dim))
    assert torch.equal(unpacked.long(), values.long())


@fuzz(25)
@given(bits=st.integers(1, 8), words=st.integers(0, 9), rows=st.integers(1, 5), seed=seeds)
def test_bitpack_unpack_any_bit_pattern(bits, words, rows, seed):
    """Every int32 bit pattern is a valid packed word (padding bits included)."""
    packed = torch.randint(-2**31, 2**31, (rows, words), generator=_gen(seed), dtype=torch.int64).to(torch.int32)
    per = 32 // bits
    size = max(0, words * per - (seed % per if words else 0))
    assert torch.equal(bitpack.unpack_bits(packed, bits, size), ref_unpack_bits(packed, bits, size))


# ================================================================================================= lowbit
LOWBIT_REL = {torch.float32: 2e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}   # tests/test_lowbit.py MAX_REL


@fuzz(30)
@given(bits=st.sampled_from([2, 3, 4]), group_size=st.sampled_from([16, 32, 48, 64, 128]),
       groups=st.integers(1, 4), out=st.integers(1, 70), lead=st.lists(st.integers(0, 19), min_size=1, max_size=2),
       x_dtype=st.sampled_from(FLOATS), s_dtype=st.sampled_from(FLOATS), bias=st.booleans(), seed=seeds)
def test_lowbit_quant_linear(bits, group_size, groups, out, lead, x_dtype, s_dtype, bias, seed):
    g = _gen(seed)
    inn = groups * group_size
    q = torch.randint(0, 2**bits, (inn, out), generator=g, dtype=torch.int32)
    scales = (torch.rand(groups, out, generator=g) * 0.02 + 0.005).to(s_dtype)
    zeros = (torch.randint(0, 2**bits, (groups, out), generator=g) + torch.rand(groups, out, generator=g) - 0.5)
    zeros = zeros.to(s_dtype)
    qweight = bitpack.pack_bits(q, bits, 0)
    x = torch.randn(*lead, inn, generator=g).to(x_dtype)
    b = torch.randn(out, generator=g).to(x_dtype) if bias else None
    y = lowbit.quant_linear(x, qweight, scales, zeros, bits, group_size, b)
    ref = ref_quant_linear(x, qweight, scales, zeros, bits, group_size, b)
    assert y.dtype == x_dtype and y.shape == ref.shape
    assert torch.isfinite(y).all()
    if y.numel():
        w = ref_quant_dequantize(qweight, scales, zeros, bits, group_size)
        assert _scaled_mean_error(y, ref, x, w) <= LOWBIT_REL[x_dtype]
    assert torch.equal(lowbit.quant_dequantize(qweight, scales, zeros, bits, group_size).float(),
                       ref_quant_dequantize(qweight, scales, zeros, bits, group_size).to(s_dtype).float())


@fuzz(15)
@given(bits=st.sampled_from([2, 3, 4]), groups=st.integers(1, 3), out=st.integers(1, 40), rows=st.integers(1, 20),
       seed=seeds)
def test_lowbit_gradients(bits, groups, out, rows, seed):
    """dx, dscales through quant_linear's autograd vs autograd through the reference (fp32)."""
    g = _gen(seed)
    inn = groups * 32
    qweight = bitpack.pack_bits(torch.randint(0, 2**bits, (inn, out), generator=g, dtype=torch.int32), bits, 0)
    scales = (torch.rand(groups, out, generator=g) * 0.02 + 0.005).requires_grad_()
    zeros = torch.randint(0, 2**bits, (groups, out), generator=g).float()
    x = torch.randn(rows, inn, generator=g, requires_grad=True)
    grad = torch.randn(rows, out, generator=g)
    lowbit.quant_linear(x, qweight, scales, zeros, bits, 32).backward(grad)
    xr, sr = x.detach().double().requires_grad_(), scales.detach().double().requires_grad_()
    ref_quant_linear(xr, qweight, sr, zeros.double(), bits, 32).double().backward(grad.double())
    assert _max_rel(x.grad, xr.grad) < 1e-4
    assert _max_rel(scales.grad, sr.grad) < 1e-4


# ============================================================================================== attention
ATTN_TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}   # tests/test_attention.py TOL


@st.composite
def attention_cases(draw):
    bq, bkv = draw(st.sampled_from(BLOCK_SIZES)), draw(st.sampled_from(BLOCK_SIZES))
    tq = draw(st.integers(1, 150))
    tk = draw(st.integers(1, 150))
    hk = draw(st.integers(1, 2))
    h = hk * draw(st.integers(1, 2))
    b = draw(st.integers(1, 2))
    kind = draw(st.sampled_from(["causal", "causal_br", "window", "documents", "dense", "blocks", "per_head",
                                 "and_or", "empty"]))
    seed = draw(seeds)
    g = _gen(seed)
    kw = dict(block_q=bq, block_kv=bkv)
    if kind == "causal":
        mask = masks.causal(tq, tk, **kw)
    elif kind == "causal_br":
        mask = masks.causal(tq, tk, bottom_right=True, **kw)
    elif kind == "window":
        mask = masks.sliding_window(tq, draw(st.integers(1, 60)), draw(st.booleans()), kv_len=tk, **kw)
    elif kind == "documents":
        t = tq
        tk = tq
        cuts = sorted(draw(st.lists(st.integers(1, max(1, t - 1)), max_size=3, unique=True))) if t > 1 else []
        lens = [e - s for s, e in zip([0] + cuts, cuts + [t])]
        mask = masks.documents(lens, causal=draw(st.booleans()), **kw)
    elif kind == "dense":
        p = draw(st.sampled_from([0.05, 0.3, 0.8]))
        shape = (draw(st.sampled_from([1, b])), draw(st.sampled_from([1, h])), tq, tk)
        mask = BlockMask.from_dense(torch.rand(shape, generator=g) < p, bq, bkv)
    elif kind == "blocks":
        qb, kb = -(-tq // bq), -(-tk // bkv)
        shape = (draw(st.sampled_from([1, b])), draw(st.sampled_from([1, h])), qb, kb)
        mask = BlockMask.from_blocks(torch.rand(shape, generator=g) < 0.5, tq, tk, bq, bkv)
    elif kind == "per_head":
        mask = masks.per_head(*[BlockMask.from_dense(torch.rand(tq, tk, generator=g) < 0.3, bq, bkv)
                                for _ in range(h)])
    elif kind == "and_or":
        a = masks.causal(tq, tk, **kw)
        c = BlockMask.from_dense(torch.rand(tq, tk, generator=g) < 0.5, bq, bkv)
        mask = masks.and_masks(a, c) if draw(st.booleans()) else masks.or_masks(a, c)
    else:
        mask = BlockMask.from_dense(torch.zeros(tq, tk, dtype=torch.bool), bq, bkv)
    d = draw(st.sampled_from([8, 16, 40, 64]))
    dv = draw(st.sampled_from([d, 8, 24]))
    dtype = draw(st.sampled_from(FLOATS))
    layout = draw(st.sampled_from(["contiguous", "bthd", "sliced"]))
    scale = draw(st.sampled_from([None, 0.3]))
    return dict(b=b, h=h, hk=hk, tq=tq, tk=tk, d=d, dv=dv, dtype=dtype, mask=mask, layout=layout, scale=scale,
                seed=seed)


def _attention_inputs(c):
    g = _gen(c["seed"])
    b, h, hk, tq, tk, d, dv = (c[n] for n in ("b", "h", "hk", "tq", "tk", "d", "dv"))

    def make(heads, t, dim):
        if c["layout"] == "bthd":        # a view of a [B, T, H, D] projection: only the last dim contiguous
            return torch.randn(b, t, heads, dim, generator=g).to(c["dtype"]).transpose(1, 2)
        if c["layout"] == "sliced":      # the heads' slice of a wider tensor
            return torch.randn(b, heads + 1, t, dim, generator=g).to(c["dtype"])[:, 1:]
        return torch.randn(b, heads, t, dim, generator=g).to(c["dtype"])
    return make(h, tq, d), make(hk, tk, d), make(hk, tk, dv)


@fuzz(30)
@given(c=attention_cases(), backward=st.booleans())
def test_attention_matches_reference(c, backward):
    q, k, v = _attention_inputs(c)
    backward = backward and c["dtype"] == torch.float32
    q, k, v = (t.detach().requires_grad_(backward) for t in (q, k, v))
    mask = c["mask"]
    out, lse = block_sparse_attention(q, k, v, mask, scale=c["scale"], return_lse=True)
    qr, kr, vr = (t.detach().double().requires_grad_(backward) for t in (q, k, v))
    ref, ref_lse = ref_masked_attention(qr, kr, vr, mask.to_dense(), scale=c["scale"])
    tol = ATTN_TOL[c["dtype"]]
    assert out.shape == ref.shape and out.dtype == q.dtype and torch.isfinite(out).all()
    assert _max_rel(out, ref) <= tol
    empty = torch.isinf(ref_lse).expand_as(lse)
    assert torch.equal(torch.isneginf(lse), empty), "exactly the rows without a visible key have lse = -inf"
    assert (out[empty] == 0).all()
    if (~empty).any():
        assert (lse.double() - ref_lse)[~empty].abs().max() <= (1e-4 if c["dtype"] == torch.float32 else 2e-2)
    if backward:
        grad = torch.randn(out.shape, generator=_gen(c["seed"] + 1))
        out.backward(grad)
        ref.backward(grad.double())
        for name, got, want in (("dq", q.grad, qr.grad), ("dk", k.grad, kr.grad), ("dv", v.grad, vr.grad)):
            assert torch.isfinite(got).all(), name
            assert _max_rel(got, want) <= 2 * tol, name


# ========================================================================================= path_attention
PATH_O_TOL = 0.005                                                                  # tests/test_path_attention.py
PATH_GRAD_TOL = {"q": 0.008, "k": 0.008, "v": 0.008, "w": 0.015, "beta": 0.02, "g": 0.02}


def _rel_rms(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-12)).item()


@fuzz(20)
@given(b=st.integers(1, 2), t=st.integers(1, 40), h=st.integers(1, 2), rep=st.integers(1, 2),
       d=st.sampled_from([8, 16, 24, 40]), dv=st.sampled_from([8, 16, 32]), gate=st.booleans(),
       dtype=st.sampled_from(FLOATS), aux32=st.booleans(), packed=st.booleans(), scale=st.sampled_from([None, 0.2]),
       backward=st.booleans(), seed=seeds)
def test_path_attention_matches_reference(b, t, h, rep, d, dv, gate, dtype, aux32, packed, scale, backward, seed):
    g = _gen(seed)
    hq = h * rep
    aux = torch.float32 if aux32 else dtype
    q, k, v, w, beta, gg = make_path_inputs(b, t, hq, h, d, dv, gate, dtype, aux, seed=seed)
    cu = None
    if packed:
        q, k, v, w, beta = (x.reshape(1, b * t, *x.shape[2:]) for x in (q, k, v, w, beta))
        gg = None if gg is None else gg.reshape(1, b * t, hq)
        cuts = sorted(set(torch.randint(0, b * t + 1, (3,), generator=g).tolist()) | {0, b * t})
        cu = torch.tensor(cuts, dtype=torch.int32 if seed % 2 else torch.int64)
    backward = backward and dtype == torch.float32
    inputs = [x if x is None else x.detach().requires_grad_(backward) for x in (q, k, v, w, beta, gg)]
    o, k_cache = path_attention(*inputs, scale=scale, cu_seqlens=cu, use_cache=True)
    refs = [x if x is None else x.detach().double().requires_grad_(backward) for x in inputs]
    ref = ref_path_attention(*refs, scale=scale, cu_seqlens=cu)
    assert o.shape == ref.shape and o.dtype == dtype and torch.isfinite(o).all()
    assert _rel_rms(o, ref) < (1e-5 if dtype == torch.float32 else PATH_O_TOL)
    if cu is None:
        want = ref_path_key_cache(k.double(), w.double(), beta.double())
        tol = 1e-5 if dtype == torch.float32 and aux32 else 2e-2
        assert _rel_rms(k_cache, want) < tol
    if backward:
        grad = torch.randn(o.shape, generator=g)
        o.backward(grad)
        ref.backward(grad.double())
        for name, got, want in zip(("q", "k", "v", "w", "beta", "g"), inputs, refs):
            if got is not None:
                assert _rel_rms(got.grad, want.grad) < 1e-4, f"d{name}"


# ===================================================================================================== vq
VQ_TOL = {torch.float32: 2e-7, torch.float16: 2e-4, torch.bfloat16: 2e-3}   # tests/test_vq.py TOL


@fuzz(30)
@given(out=st.integers(0, 40), groups=st.integers(1, 20), K=st.integers(1, 2), k=st.sampled_from([16, 17, 256, 300,
       4096]), d=st.sampled_from([2, 4, 8]), rows=st.integers(0, 40), two_d=st.booleans(),
       x_dtype=st.sampled_from(FLOATS), cb_dtype=st.sampled_from(FLOATS), scales=st.booleans(),
       bias=st.booleans(), backward=st.booleans(), seed=seeds)
def test_vq_matches_reference(out, groups, K, k, d, rows, two_d, x_dtype, cb_dtype, scales, bias, backward, seed):
    g = _gen(seed)
    code_dtype = torch.uint8 if k <= 256 and seed % 3 else torch.int16
    codes = torch.randint(0, k, (out, groups, K), generator=g, dtype=torch.int32).to(code_dtype)
    if K == 1 and two_d:
        codes = codes[..., 0].contiguous()
    codebooks = torch.randn(K, k, d, generator=g).to(cb_dtype)
    s = (torch.rand(out, generator=g) + 0.5).to(cb_dtype) if scales else None
    b = torch.randn(out, generator=g).to(cb_dtype) if bias else None
    backward = backward and x_dtype == torch.float32 and cb_dtype == torch.float32
    x = torch.randn(rows, groups * d, generator=g).to(x_dtype).requires_grad_(backward)
    cbr = codebooks.detach().requires_grad_(backward)
    y = vq.vq_linear(x, codes, cbr, s, b)
    ref = ref_vq_linear(x.detach(), codes, codebooks, s, b).float()
    w = ref_vq_dequantize(codes, codebooks, s)
    assert y.dtype == x_dtype and y.shape == (rows, out)
    if y.numel():
        assert _scaled_mean_error(y, ref, x.detach(), w) <= VQ_TOL[x_dtype]
    assert torch.equal(vq.vq_dequantize(codes, codebooks, s).float(), w.to(cb_dtype).float())
    if backward and y.numel():
        grad = torch.randn(y.shape, generator=g)
        y.backward(grad)
        xr, cr = x.detach().double().requires_grad_(), codebooks.double().requires_grad_()
        yr = xr @ ref_vq_dequantize_double(codes, cr, s).t()
        yr.backward(grad.double())
        assert _max_rel(x.grad, xr.grad) < 1e-4
        assert _max_rel(cbr.grad, cr.grad) < 1e-4


def ref_vq_dequantize_double(codes, codebooks, scales):
    """ref_vq_dequantize in fp64 (it computes in fp32), differentiable in the codebooks."""
    if codes.dim() == 2:
        codes = codes.unsqueeze(-1)
    idx = codes.long() % 65536 if codes.dtype == torch.int16 else codes.long()
    w = sum(codebooks[c][idx[:, :, c]] for c in range(codebooks.shape[0]))
    w = w.reshape(idx.shape[0], -1)
    return w if scales is None else w * scales.double()[:, None]


# ================================================================================================= ptq161
PTQ_TOL = {torch.float32: 5e-5, torch.float16: 5e-4, torch.bfloat16: 4e-3}   # tests/test_ptq161.py TOL


@fuzz(30)
@given(out=st.integers(1, 40), inn=st.integers(1, 100), frac=st.floats(0, 1), zeros=st.integers(0, 6),
       rows=st.integers(0, 40), x_dtype=st.sampled_from(FLOATS), f_dtype=st.sampled_from(FLOATS), bias=st.booleans(),
       backward=st.booleans(), seed=seeds)
def test_ptq161_matches_reference(out, inn, frac, zeros, rows, x_dtype, f_dtype, bias, backward, seed):
    g = _gen(seed)
    S = round(frac * inn)
    N = inn - S
    padded = ptq161.salient_padded(S)
    q = torch.randint(0, 16, (padded, out), generator=g, dtype=torch.int32)
    bits = torch.randint(0, 2, (-(-N // 32) * 32, out), generator=g, dtype=torch.int32)
    zs = torch.randperm(N * out, generator=g)[:zeros].sort().values if N * out else torch.zeros(0, dtype=torch.int64)
    t = {"perm": torch.randperm(inn, generator=g).int(), "qsalient": bitpack.pack_bits(q, 4, 0),
         "salient_scale": (torch.rand(out, generator=g) * 0.1 + 0.01).to(f_dtype),
         "salient_zero": (torch.rand(out, generator=g) * 15).to(f_dtype), "signs": bitpack.pack_bits(bits, 1, 0),
         "zero_signs": zs.long(), "alpha": (torch.rand(out, generator=g) * 0.1).to(f_dtype),
         "mu": (torch.randn(out, generator=g) * 0.01).to(f_dtype),
         "r1": (torch.rand(out, generator=g) + 0.5).to(f_dtype), "r2": (torch.rand(inn, generator=g) + 0.5).to(f_dtype)}
    args = [t[f] for f in ptq161.FIELDS]
    b = torch.randn(out, generator=g).to(x_dtype) if bias else None
    backward = backward and x_dtype == torch.float32 and f_dtype == torch.float32
    x = torch.randn(rows, inn, generator=g).to(x_dtype)
    dense = ref_ptq161_dequantize(*args, S)
    assert torch.allclose(ptq161.ptq161_dequantize(*args, S), dense, rtol=1e-6, atol=1e-6)
    y = ptq161.ptq161_linear(x.requires_grad_(backward), *args, S, b)
    ref = ref_ptq161_linear(x.detach(), *args, S, b)
    assert y.dtype == x_dtype and y.shape == (rows, out)
    if y.numel():
        assert _scaled_mean_error(y, ref, x.detach(), dense) <= PTQ_TOL[x_dtype]
    if backward and y.numel():
        grad = torch.randn(y.shape, generator=g)
        y.backward(grad)
        xr = x.detach().double().requires_grad_()
        (xr @ dense.double().t()).backward(grad.double())
        assert _max_rel(x.grad, xr.grad) < 1e-4


# =================================================================================================== dllm
@fuzz(30)
@given(b=st.integers(0, 4), l=st.integers(0, 40), v=st.integers(1, 300), dtype=st.sampled_from(FLOATS),
       ties=st.booleans(), rule=st.sampled_from(["threshold", "factor"]), threshold=st.floats(0, 1.2),
       factor=st.floats(0.01, 3), min_tokens=st.booleans(), sliced=st.booleans(), seed=seeds)
def test_dllm_unmask_matches_reference(b, l, v, dtype, ties, rule, threshold, factor, min_tokens, sliced, seed):
    g = _gen(seed)
    logits = torch.randn(b, l + (2 if sliced else 0), v, generator=g) * 4
    if ties:                                      # equal maxima and equal confidences
        logits = logits.round()
    # Fresh strides: an empty op result's can be 0, which unmask refuses for V == 1 (a known-failing probe).
    logits = torch.empty(logits.shape, dtype=dtype).copy_(logits)
    if sliced:                                    # a [:, a:b] slice: contiguous in V only
        logits = logits[:, 1:l + 1]
    masked = torch.rand(b, l, generator=g) < 0.7
    lo = torch.randint(0, max(l, 1), (b,), generator=g)
    bounds = torch.stack([lo, lo + torch.randint(0, l + 2, (b,), generator=g)], 1)
    mt = torch.randint(-1, 4, (b,), generator=g) if min_tokens else None
    kw = dict(threshold=threshold) if rule == "threshold" else dict(factor=factor)
    r = dllm.unmask(logits, masked, bounds, min_tokens=mt, **kw)
    tokens, _, conf = ref_dllm_unmask(logits, masked, bounds, threshold, None if rule == "threshold" else factor, mt)
    assert torch.equal(r.tokens, tokens)
    torch.testing.assert_close(r.confidence, conf, rtol=2e-6, atol=1e-7)
    cand = ref_dllm_candidates(masked, bounds)
    assert torch.equal(r.unmask, ref_dllm_select(r.confidence, cand, threshold,
                                                 None if rule == "threshold" else factor, mt))


@fuzz(30)
@given(b=st.integers(0, 3), h=st.integers(1, 3), s=st.integers(1, 30), d=st.integers(1, 40),
       dtype=st.sampled_from(FLOATS), strided_new=st.booleans(), data=st.data(), seed=seeds)
def test_dllm_kv_overwrite_matches_reference(b, h, s, d, dtype, strided_new, data, seed):
    g = _gen(seed)
    n = data.draw(st.integers(0, s), label="n")
    cache = torch.randn(b, h, s, d, generator=g).to(dtype)
    if strided_new:                               # [B, n, H, D] transposed: contiguous in D only
        new = torch.randn(b, n, h, d, generator=g).to(dtype).transpose(1, 2)
    else:
        new = torch.randn(b, h, n, d, generator=g).to(dtype)
    positions = torch.stack([torch.randperm(s, generator=g)[:n].sort().values for _ in range(b)]) if b else \
        torch.zeros(0, n, dtype=torch.int64)
    want = ref_dllm_kv_overwrite(cache, new, positions)
    dllm.kv_overwrite(cache, new, positions.contiguous())
    assert torch.equal(cache, want)


# ============================================================================================ block_cache
@fuzz(40)
@given(shape=st.lists(st.integers(0, 19), min_size=2, max_size=4), dtype=st.sampled_from(FLOATS),
       stride=st.one_of(st.integers(1, 12), st.integers(13, 2**31)), per_sample=st.booleans(),
       compare=st.booleans(), equal=st.booleans(), seed=seeds)
def test_block_cache_matches_reference(shape, dtype, stride, per_sample, compare, equal, seed):
    g = _gen(seed)
    out, inp, ref = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
    if equal:
        ref = out.clone()
    got = bc.relative_l1(out, ref, stride, per_sample)
    want = ref_relative_l1(out, ref, stride, per_sample)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=0, equal_nan=True)
    residual = torch.full_like(out, 7.0)
    got = bc.relative_l1_residual(out, inp, ref, residual, stride, per_sample, compare)
    want, want_residual = ref_relative_l1_residual(out, inp, ref, stride, per_sample, compare)
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=0, equal_nan=True)
    assert torch.equal(residual, want_residual)
    assert torch.equal(bc.apply_residual(inp, residual), ref_apply_residual(inp, residual))
    for gate in (None, torch.tensor(True), torch.tensor([0.0]), torch.tensor([[2.5]])):
        cache = inp.clone()
        want = ref_cache_update(cache, out, gate)
        bc.cache_update(cache, out, gate)
        assert torch.equal(cache, want)


# ================================================================================ bad inputs, in children
ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ["bitpack", "lowbit", "attention", "path_attention", "vq", "ptq161", "dllm", "block_cache"]
_RESULTS: dict[str, tuple[bool, str]] = {}


PROBE_SCRIPT = Path(__file__).resolve().parent / "fuzz_probes.py"


def _run_children(names: list[str], script: Path = PROBE_SCRIPT) -> dict[str, tuple[bool, str]]:
    """Runs the probes `names` in child processes: one for all of them; when one dies, the probe it had started
    is failed with the signal and the end of its stderr, and a new child runs the probes after it."""
    results: dict[str, tuple[bool, str]] = {}
    todo = list(names)
    while todo:
        try:
            proc = subprocess.run([sys.executable, str(script), *todo], cwd=ROOT, capture_output=True, text=True,
                                  timeout=300)
            stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
            rc = "timeout (300 s)"
        started = None
        for line in stdout.splitlines():
            if not line.startswith("{"):
                continue
            rec = json.loads(line)
            if "start" in rec:
                started = rec["start"]
            else:
                results[rec["name"]] = (rec["ok"], rec["detail"])
                started = None
        done = [n for n in todo if n in results]
        if started is None and len(done) == len(todo):
            break
        if started is None:        # died before the first probe: the library or an import, not a probe
            for n in todo:
                results.setdefault(n, (False, f"child exited ({rc}) before running it:\n{stderr[-3000:]}"))
            break
        how = f"signal {-rc}" if isinstance(rc, int) and rc < 0 else f"exit status {rc}"
        results[started] = (False, f"crashed the process ({how}); {_crash_report(stderr)}")
        todo = todo[todo.index(started) + 1:]
    return results


def _crash_report(stderr: str) -> str:
    """The lines of a child's stderr that say what happened (a sanitizer's finding and the first frames in
    blockops) followed by its last lines."""
    lines = stderr.splitlines()
    key = [i for i, line in enumerate(lines) if "runtime error:" in line or "ERROR: AddressSanitizer" in line]
    head = "\n".join(lines[key[0]:key[0] + 12]) + "\n...\n" if key else ""
    return f"stderr:\n{head}{stderr[-2000:]}"


def _probe_result(name: str) -> tuple[bool, str]:
    """All probes run once, in one child (importing torch dominates a child's cost), the first time any is asked."""
    if not _RESULTS:
        _RESULTS.update(_run_children(list(fuzz_probes.PROBES)))
    return _RESULTS[name]


def _probe_params():
    return [pytest.param(name, id=name, marks=[pytest.mark.xfail(strict=False, reason=p.xfail)] if p.xfail else [])
            for name, p in fuzz_probes.PROBES.items()]


def test_every_family_has_probes():
    assert {p.family for p in fuzz_probes.PROBES.values()} == set(FAMILIES)


@pytest.mark.parametrize("name", _probe_params())
def test_bad_input_probe(name):
    """Each probe of tests/fuzz_probes.py: a clean error naming the problem, or (documented-valid input) the
    reference's result; never a crash (the probes run in a child process; a crash fails the probe it was in)."""
    ok, detail = _probe_result(name)
    assert ok, f"{name}: {detail}"


def test_probe_runner_blames_the_crashing_probe(tmp_path):
    """The runner blames the probe that killed its child and runs the ones after it in a fresh child."""
    script = tmp_path / "crashing_probes.py"
    script.write_text(
        "import json, os, signal, sys\n"
        "for name in sys.argv[1:]:\n"
        "    print(json.dumps({'start': name}), flush=True)\n"
        "    if name == 'crash':\n"
        "        os.kill(os.getpid(), signal.SIGSEGV)\n"
        "    print(json.dumps({'name': name, 'ok': True, 'detail': ''}), flush=True)\n")
    res = _run_children(["before", "crash", "after"], script)
    assert res["before"][0] and res["after"][0], res
    # (signal 11, or 6 under tools/sanitize.sh: ASan reports the SIGSEGV and aborts)
    assert not res["crash"][0] and "crashed the process" in res["crash"][1], res["crash"]


# ===================================================================================== NaN / Inf propagation


def _plant_non_finite(ts, g, count, values=(float("nan"), float("inf"), float("-inf"))):
    """Writes `count` of `values` at random positions of random tensors of `ts` (in place)."""
    for _ in range(count):
        t = ts[int(torch.randint(0, len(ts), (1,), generator=g))]
        if t.numel():
            flat = t.view(-1)
            flat[int(torch.randint(0, flat.numel(), (1,), generator=g))] = \
                values[int(torch.randint(0, len(values), (1,), generator=g))]


def _same_non_finite_rows(out, ref, what):
    """Rows (last dim) with a non-finite value in the reference are exactly those with one in the output, and
    elsewhere the values agree (fp32 tolerance). Whether an Inf value gives Inf or NaN is left open: it depends on
    the order of the sum (an online softmax rescales by exp(m_old - m_new), which can be 0)."""
    bad_ref, bad_out = ~torch.isfinite(ref).all(-1), ~torch.isfinite(out).all(-1)
    assert torch.equal(bad_out, bad_ref), f"{what}: non-finite rows {bad_out.nonzero().tolist()[:5]} != " \
                                          f"reference {bad_ref.nonzero().tolist()[:5]}"
    ok = ~bad_ref
    torch.testing.assert_close(out[ok].double(), ref[ok].double(), rtol=1e-4, atol=1e-4, msg=what)


def _visible_only_pv(q, k, v, dense, lse, scale):
    """The attention output in fp64 with every masked-out (query, key) pair left out of the sum P V (the
    reference's P V multiplies them by 0, which turns a masked-out Inf / NaN value into NaN: a leak)."""
    rep = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(rep, 1) for t in (k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q.double() @ k.transpose(-1, -2)) * scale
    visible = dense.expand_as(s)
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse).unsqueeze(-1))
    terms = (p.unsqueeze(-1) * v.unsqueeze(2)).masked_fill(~visible.unsqueeze(-1), 0)   # [B, H, Tq, Tk, Dv]
    return terms.sum(-2)


@fuzz(20, shrink=False)
@given(c=attention_cases(), count=st.integers(1, 3))
def test_attention_non_finite_inputs_propagate(c, count):
    """NaN / Inf in q, k or v propagate as in the fp64 reference (softmax over the visible keys, as
    F.scaled_dot_product_attention): a row seeing one is NaN, a masked-out one never leaks in; lse agrees."""
    c = dict(c, dtype=torch.float32)
    q, k, v = (t.contiguous() for t in _attention_inputs(c))
    _plant_non_finite([q, k, v], _gen(c["seed"] + 2), count)
    out, lse = block_sparse_attention(q, k, v, c["mask"], scale=c["scale"], return_lse=True)
    dense = c["mask"].to_dense()
    _, ref_lse = ref_masked_attention(q.double(), k.double(), v.double(), dense, scale=c["scale"])
    _same_non_finite_rows(out, _visible_only_pv(q, k, v, dense, ref_lse, c["scale"]), "out")
    ref_lse = ref_lse.expand_as(lse)
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse)), "lse: non-finite rows differ"
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), "lse = -inf must mean no visible key"


@fuzz(15, shrink=False)
@given(t=st.integers(1, 24), h=st.integers(1, 2), d=st.sampled_from([8, 16]), gate=st.booleans(),
       count=st.integers(1, 3), seed=seeds)
def test_path_attention_non_finite_inputs_propagate(t, h, d, gate, count, seed):
    g = _gen(seed)
    q, k, v = (torch.randn(1, t, h, d, generator=g) for _ in range(3))
    w = F.normalize(torch.randn(1, t, h, d, generator=g), dim=-1)
    beta = torch.rand(1, t, h, generator=g) * 2
    gg = F.logsigmoid(torch.randn(1, t, h, generator=g)) if gate else None
    # NaN only, in q and k: an Inf key carried through the Householder transforms becomes NaN (inf - inf) where the
    # reference, transforming the query instead, gets a -inf score (weight 0); and the reference's P V would
    # turn a future position's Inf value into NaN (0 * inf).
    _plant_non_finite([q, k], g, count, values=(float("nan"),))
    o, _ = path_attention(q, k, v, w, beta, gg)
    ref = ref_path_attention(*(None if x is None else x.double() for x in (q, k, v, w, beta, gg)))
    _same_non_finite_rows(o, ref, "o")


@fuzz(20)
@given(family=st.sampled_from(["lowbit2", "lowbit3", "lowbit4", "vq", "ptq161"]), rows=st.integers(1, 40),
       value=st.sampled_from([float("nan"), float("inf"), float("-inf")]), dtype=st.sampled_from(FLOATS),
       seed=seeds)
def test_linear_non_finite_activation_stays_in_its_row(family, rows, value, dtype, seed):
    """As F.linear: a NaN / Inf in row r of x makes row r of y non-finite (every output, the weights being
    non-zero) and leaves the other rows exactly as without it."""
    g = _gen(seed)
    x = torch.randn(rows, 64, generator=g).to(dtype)
    if family.startswith("lowbit"):
        bits = int(family[-1])
        qw = bitpack.pack_bits(torch.randint(0, 2**bits, (64, 24), generator=g, dtype=torch.int32), bits, 0)
        sc = torch.rand(2, 24, generator=g) * 0.02 + 0.005
        zs = torch.randint(0, 2**bits, (2, 24), generator=g).float() + 0.5   # q - z never 0: no zero weights
        fn = (lambda x: lowbit.quant_linear(x, qw, sc, zs, bits, 32))
    elif family == "vq":
        codes = torch.randint(0, 16, (24, 16, 1), generator=g, dtype=torch.int32).to(torch.uint8)
        cb = torch.rand(1, 16, 4, generator=g) + 0.5                          # no zero weights
        fn = (lambda x: vq.vq_linear(x, codes, cb))
    else:
        t, S = fuzz_probes._ptq(24, 64, 16, seed=seed % 1000, zero=())
        t["salient_zero"] = t["salient_zero"].round() + 0.5                 # q - z never 0
        t["alpha"], t["mu"] = t["alpha"] + 0.5, torch.zeros(24)             # +-alpha, never 0
        fn = (lambda x: fuzz_probes._ptq_linear(x, t, S))
    clean = fn(x)
    r = int(torch.randint(0, rows, (1,), generator=g))
    x[r, int(torch.randint(0, 64, (1,), generator=g))] = value
    y = fn(x)
    assert (~torch.isfinite(y[r])).all(), "the row with a non-finite activation must be non-finite"
    others = torch.arange(rows) != r
    assert torch.equal(y[others], clean[others]), "other rows must not change"


# ====================================================================================== float64 on the CPU
@pytest.mark.parametrize("family", ["lowbit", "vq", "ptq161", "apply_residual", "attention", "path_attention"])
@fuzz(4, shrink=False)
@given(seed=seeds)
def test_float64_matches_reference_and_gradcheck(family, seed):
    """Every op with a backward takes float64 on the CPU: the result is the fp64 reference's (1e-10) and
    torch.autograd.gradcheck passes at a tiny size, as PyTorch's own ops are tested."""
    g = _gen(seed)
    dd = dict(dtype=torch.float64)
    if family == "lowbit":
        qweight = bitpack.pack_bits(torch.randint(0, 16, (32, 5), generator=g, dtype=torch.int32), 4, 0)
        scales = (torch.rand(2, 5, generator=g, **dd) * 0.1).requires_grad_()
        zeros = torch.randint(0, 16, (2, 5), generator=g).double()
        x = torch.randn(3, 32, generator=g, **dd).requires_grad_()
        fn = (lambda x, s: lowbit.quant_linear(x, qweight, s, zeros, 4, 16))
        ref = (lambda x, s: x @ ((bitpack.unpack_bits(qweight, 4, 32, 0).double() - zeros.repeat_interleave(16, 0))
                                 * s.repeat_interleave(16, 0)))
        inputs = (x, scales)
    elif family == "vq":
        codes = torch.randint(0, 16, (5, 4, 1), generator=g, dtype=torch.int32).to(torch.uint8)
        cb = torch.randn(1, 16, 2, generator=g, **dd).requires_grad_()
        x = torch.randn(3, 8, generator=g, **dd).requires_grad_()
        fn = (lambda x, cb: vq.vq_linear(x, codes, cb))
        ref = (lambda x, cb: x @ ref_vq_dequantize_double(codes, cb, None).t())
        inputs = (x, cb)
    elif family == "ptq161":
        out, inn, S = 4, 20, 4
        t = {"perm": torch.randperm(inn, generator=g).int(),
             "qsalient": bitpack.pack_bits(torch.randint(0, 16, (16, out), generator=g, dtype=torch.int32), 4, 0),
             "salient_scale": torch.rand(out, generator=g, **dd), "salient_zero": torch.rand(out, generator=g, **dd),
             "signs": bitpack.pack_bits(torch.randint(0, 2, (32, out), generator=g, dtype=torch.int32), 1, 0),
             "zero_signs": torch.tensor([1, 5], dtype=torch.int64), "alpha": torch.rand(out, generator=g, **dd),
             "mu": torch.randn(out, generator=g, **dd), "r1": torch.rand(out, generator=g, **dd) + 0.5,
             "r2": torch.rand(inn, generator=g, **dd) + 0.5}
        x = torch.randn(3, inn, generator=g, **dd).requires_grad_()
        alpha = t["alpha"].requires_grad_()
        fn = (lambda x, a: ptq161.ptq161_linear(x, *[a if f == "alpha" else t[f] for f in ptq161.FIELDS], S))
        ref = None
        inputs = (x, alpha)
    elif family == "attention":
        q, k, v = (torch.randn(1, 2, 20, 8, generator=g, **dd).requires_grad_() for _ in range(3))
        mask = masks.sliding_window(20, 7, block_q=16, block_kv=16)
        fn = (lambda q, k, v: block_sparse_attention(q, k, v, mask))
        ref = (lambda q, k, v: ref_masked_attention(q, k, v, mask.to_dense())[0])
        inputs = (q, k, v)
    elif family == "path_attention":
        q, k, v = (torch.randn(1, 6, 1, 8, generator=g, **dd).requires_grad_() for _ in range(3))
        w = F.normalize(torch.randn(1, 6, 1, 8, generator=g, **dd), dim=-1).requires_grad_()
        beta = (torch.rand(1, 6, 1, generator=g, **dd) * 2).requires_grad_()
        fn = (lambda q, k, v, w, b: path_attention(q, k, v, w, b)[0])
        ref = (lambda q, k, v, w, b: ref_path_attention(q, k, v, w, b))
        inputs = (q, k, v, w, beta)
    else:
        a, b = (torch.randn(2, 3, 4, generator=g, **dd).requires_grad_() for _ in range(2))
        fn, ref, inputs = bc.apply_residual, (lambda a, b: a + b), (a, b)
    y = fn(*inputs)
    assert y.dtype == torch.float64
    if ref is not None:
        torch.testing.assert_close(y, ref(*inputs).to(torch.float64), rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


# ============================================================================================ determinism
def _determinism_cases():
    g = _gen(0)

    def rand(*s):
        return torch.randn(*s, generator=g)
    qw = bitpack.pack_bits(torch.randint(0, 16, (512, 300), generator=g, dtype=torch.int32), 4, 0)
    s, z = rand(4, 300).abs() * 0.01, torch.randint(0, 16, (4, 300), generator=g).float()
    codes, cb = torch.randint(0, 256, (300, 64, 1), generator=g, dtype=torch.int32).to(torch.uint8), rand(1, 256, 8)
    q, k, v = (rand(2, 4, 300, 64) for _ in range(3))
    pq, pk, pv = (rand(1, 100, 2, 32) for _ in range(3))
    pw, pb = F.normalize(rand(1, 100, 2, 32), dim=-1), torch.rand(1, 100, 2, generator=g)
    a, b = rand(4, 4096, 64), rand(4, 4096, 64)
    logits = rand(4, 64, 5000)
    xs = (rand(1, 512), rand(64, 512))   # the small-batch kernels and the blocked / GEMM paths

    def with_grads(fn, *inputs):
        inputs = [t.detach().requires_grad_() for t in inputs]
        out = fn(*inputs)
        out.square().sum().backward()
        return [out.detach()] + [t.grad for t in inputs]
    return {
        "quant_linear": lambda: [lowbit.quant_linear(x, qw, s, z, 4, 128) for x in xs],
        "vq_linear": lambda: [vq.vq_linear(x, codes, cb) for x in xs],
        "attention": lambda: with_grads(lambda q, k, v: block_sparse_attention(q, k, v, masks.causal(300, block_q=64,
                                                                                                     block_kv=64)),
                                        q, k, v),
        "path_attention": lambda: with_grads(lambda q, k, v: path_attention(q, k, v, pw, pb)[0], pq, pk, pv),
        "relative_l1": lambda: [bc.relative_l1(a, b, 1, True), bc.relative_l1(a, b, 3, False)],
        "dllm_unmask": lambda: list(dllm.unmask(logits, torch.ones(4, 64, dtype=torch.bool))),
    }


@pytest.mark.parametrize("op", sorted(_determinism_cases()))
def test_cpu_results_are_bitwise_deterministic(op):
    """The same inputs give bitwise the same results run to run and with 1, 2 or 4 intra-op threads (no atomics
    in the CPU reductions; work split in fixed chunks): the determinism docs/reliability.md promises."""
    fn = _determinism_cases()[op]
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 2, 4):
            torch.set_num_threads(n)
            results.append(fn())
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for x, y in zip(results[0], other):
            assert torch.equal(x, y), op
