"""PaTH attention: the reference against explicit Householder products, the CPU kernel (forward, key cache)
against the reference, decoding, float64 (reference to 1e-10, gradcheck), opcheck, torch.compile and the error
paths."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from blockops.ops.path_attention import PathCache, path_attention, path_decode_step
from blockops.reference import ref_path_attention, ref_path_decode_step, ref_path_key_cache
from helpers import assert_compiles, kernel_ran, opcheck, run_with_cpu_isa

# flash-linear-attention's relative RMS tolerances (rms(ref - out) / rms(ref))
O_TOL = 0.005
GRAD_TOL = {"q": 0.008, "k": 0.008, "v": 0.008, "w": 0.015, "beta": 0.02, "g": 0.02}
NAMES = ("q", "k", "v", "w", "beta", "g")


def rel_rms(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def make_inputs(B, T, HQ, H, D, Dv, gate=True, dtype=torch.float32, aux_dtype=torch.float32, seed=0):
    """Inputs as the PaTH layer makes them: w L2-normalised, beta = 2 * sigmoid (in (0, 2)), g = logsigmoid."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, HQ, D, generator=gen).to(dtype)
    k = torch.randn(B, T, H, D, generator=gen).to(dtype)
    v = torch.randn(B, T, H, Dv, generator=gen).to(dtype)
    w = F.normalize(torch.randn(B, T, H, D, generator=gen), dim=-1).to(aux_dtype)
    beta = (2 * torch.sigmoid(2 * torch.randn(B, T, H, generator=gen))).to(aux_dtype)
    g = F.logsigmoid(torch.randn(B, T, HQ, generator=gen) + 2).to(aux_dtype) if gate else None
    return q, k, v, w, beta, g


def fp64(*ts):
    return [None if t is None else t.double() for t in ts]


def brute_force(q, k, v, w, beta, g, scale):
    """Explicit D x D Householder products per (query, key) pair: fp64, tiny T only."""
    B, T, HQ, D = q.shape
    rep = HQ // k.shape[2]
    eye = torch.eye(D, dtype=q.dtype)
    o = torch.zeros(B, T, HQ, v.shape[-1], dtype=q.dtype)
    for b in range(B):
        for hq in range(HQ):
            h = hq // rep
            Hs = [eye - beta[b, t, h] * torch.outer(w[b, t, h], w[b, t, h]) for t in range(T)]
            G = g[b, :, hq].cumsum(0) if g is not None else torch.zeros(T, dtype=q.dtype)
            for i in range(T):
                s = torch.full((i + 1,), 0.0, dtype=q.dtype)
                M = eye.clone()                       # H_i ... H_{j+1}, built right to left
                for j in range(i, -1, -1):
                    s[j] = scale * (q[b, i, hq] @ M @ k[b, j, h] + G[i] - G[j])
                    M = M @ Hs[j]
                o[b, i, hq] = torch.softmax(s, 0) @ v[b, :i + 1, h]
    return o


# ---------------------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("T,HQ,H", [(1, 1, 1), (7, 2, 2), (12, 4, 2)])
def test_reference_matches_brute_force(T, HQ, H, gate):
    q, k, v, w, beta, g = fp64(*make_inputs(2, T, HQ, H, 8, 16, gate))
    ref = ref_path_attention(q, k, v, w, beta, g, scale=0.3)
    torch.testing.assert_close(ref, brute_force(q, k, v, w, beta, g, 0.3), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# Forward kernel
# ---------------------------------------------------------------------------------------------------------

# (B, T, HQ, H, D, Dv, gate): lengths around the 64-token chunk, awkward head dims, Dv != D, GQA.
FORWARD_CASES = [
    (1, 1, 2, 1, 16, 16, False),
    (2, 17, 2, 2, 16, 24, True),
    (1, 64, 2, 1, 40, 40, True),
    (1, 100, 4, 2, 64, 72, False),
    (1, 130, 2, 1, 72, 64, True),
    (2, 130, 2, 2, 16, 16, False),
    (1, 65, 1, 1, 256, 8, True),
    # Either side of carry_by_matrix's bound (d < 2 * 64): queries carried by P_c [d, d] or by two rank-64 products.
    (1, 130, 2, 1, 120, 24, True),
    (1, 130, 2, 1, 128, 16, False),
]


@pytest.mark.parametrize("B,T,HQ,H,D,Dv,gate", FORWARD_CASES)
def test_forward_matches_reference(B, T, HQ, H, D, Dv, gate):
    q, k, v, w, beta, g = make_inputs(B, T, HQ, H, D, Dv, gate)
    with kernel_ran("path_attention", "cpu"):
        o, k_cache = path_attention(q, k, v, w, beta, g)
    assert k_cache is None and o.shape == (B, T, HQ, Dv) and o.dtype == torch.float32
    ref, ref_lse = ref_path_attention(*fp64(q, k, v, w, beta, g), return_lse=True)
    assert rel_rms(o, ref) < 1e-5   # fp32 throughout: far inside O_TOL
    _, lse = torch.ops.blockops.path_attention(q, k, v, w, beta, g, None, D ** -0.5)
    torch.testing.assert_close(lse.transpose(1, 2).double(), ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", [0.25, 4.0])
def test_forward_scale_and_extreme_beta(scale):
    """Non-default scales (4.0: peaked rows, most probabilities underflow); beta near 0 and near 2 (H_t close to I
    and to a reflection)."""
    q, k, v, w, beta, g = make_inputs(1, 90, 2, 1, 32, 32, True)
    beta = torch.where(torch.rand(beta.shape, generator=torch.Generator().manual_seed(1)) < 0.5, 1e-3, 1.999)
    o, _ = path_attention(q, k, v, w, beta, g, scale=scale)
    assert rel_rms(o, ref_path_attention(*fp64(q, k, v, w, beta, g), scale=scale)) < 1e-5


def test_nan_propagates_like_softmax():
    """A NaN in a visible q / k / v entry gives NaN exactly where the fp64 reference (softmax) has it: the query's
    row, every row that sees the key (output and lse), the value's column of those rows; other rows unchanged. The
    AVX2 exponential dropped NaN (0), and a block whose scores were all NaN was skipped as "no visible key"."""
    T = 80   # two 64-query chunks: the NaN crosses the carried-query step
    clean = make_inputs(1, T, 2, 1, 16, 16, True)
    o0, lse0 = torch.ops.blockops.path_attention(*clean, None, 0.25)
    for name, index in (("q", (0, 10, 1, 3)), ("k", (0, 70, 0, 1)), ("k", (0, 5, 0, 0)), ("v", (0, 30, 0, 2))):
        inputs = list(clean)
        t = inputs[NAMES.index(name)].clone()
        t[index] = float("nan")
        inputs[NAMES.index(name)] = t
        o, lse = torch.ops.blockops.path_attention(*inputs, None, 0.25)
        ref, ref_lse = ref_path_attention(*fp64(*inputs), scale=0.25, return_lse=True)
        assert torch.equal(o.isnan(), ref.isnan()), f"NaN in {name}{index}: NaN pattern of o"
        assert torch.equal(lse.transpose(1, 2).isnan(), ref_lse.isnan()), f"NaN in {name}{index}: lse"
        assert ref.isnan().any()
        torch.testing.assert_close(o[~o.isnan()], o0[~o.isnan()], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(lse[~lse.isnan()], lse0[~lse.isnan()], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("isa", ["portable", "avx2"])
def test_cpu_isa_paths(isa):
    """Each CPU code path (forced with BLOCKOPS_CPU_ISA, in a fresh process): forward and backward."""
    code = (
        "import sys, torch\n"
        "sys.path.insert(0, 'tests')\n"
        "import test_path_attention as t\n"
        "t.test_backward_matches_reference(*t.BACKWARD_CASES[-1])\n"
        "t.test_forward_varlen(True)\n"
        "t.test_nan_propagates_like_softmax()\n"
        "import blockops; print(blockops.build_info()['cpu_families']['path_attention'])\n"
    )
    res = run_with_cpu_isa(isa, code)
    assert ("portable" in res.stdout) == (isa == "portable")


@pytest.mark.parametrize("gate", [False, True])
def test_forward_varlen(gate):
    """Three packed sequences (one shorter than a chunk, one crossing a chunk boundary): each attends to itself
    only and its transforms and gate restart at its first token."""
    lens = [30, 70, 9]
    q, k, v, w, beta, g = make_inputs(1, sum(lens), 4, 2, 40, 32, gate)
    cu = torch.tensor([0, 30, 100, 109], dtype=torch.int32)
    o, k_cache = path_attention(q, k, v, w, beta, g, cu_seqlens=cu, use_cache=True)
    assert rel_rms(o, ref_path_attention(*fp64(q, k, v, w, beta, g), cu_seqlens=cu)) < 1e-5
    for s, e in [(0, 30), (30, 100), (100, 109)]:
        sl = slice(s, e)
        ref = ref_path_attention(*fp64(q[:, sl], k[:, sl], v[:, sl], w[:, sl], beta[:, sl], None if g is None else g[:, sl]))
        assert rel_rms(o[:, sl], ref) < 1e-5
        torch.testing.assert_close(k_cache[:, sl].double(), ref_path_key_cache(*fp64(k[:, sl], w[:, sl], beta[:, sl])),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("aux_fp32", [True, False])
def test_forward_low_precision(dtype, aux_fp32):
    """fp16/bf16 q, k, v with w/beta/g in fp32 or the activation dtype, against the fp64 reference on the same
    (rounded) inputs: within the reference implementation's output tolerance."""
    q, k, v, w, beta, g = make_inputs(1, 100, 4, 2, 64, 64, True, dtype=dtype,
                                      aux_dtype=torch.float32 if aux_fp32 else dtype)
    o, k_cache = path_attention(q, k, v, w, beta, g, use_cache=True)
    assert o.dtype == dtype and k_cache.dtype == dtype
    err = rel_rms(o, ref_path_attention(*fp64(q, k, v, w, beta, g)))
    assert err < O_TOL, f"relative RMS error {err:.3g}"


def test_key_cache_matches_brute_force():
    q, k, v, w, beta, _ = make_inputs(2, 150, 2, 2, 16, 16, False)
    with kernel_ran("path_key_cache", "cpu"):
        _, k_cache = path_attention(q, k, v, w, beta, use_cache=True)
    torch.testing.assert_close(k_cache.double(), ref_path_key_cache(*fp64(k, w, beta)), rtol=1e-5, atol=1e-5)


def test_empty_sequence():
    q, k, v, w, beta, g = make_inputs(2, 0, 2, 1, 16, 8, True)
    o, k_cache = path_attention(q, k, v, w, beta, g, use_cache=True)
    assert o.shape == (2, 0, 2, 8) and k_cache.shape == k.shape


# ---------------------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------------------

def grads(fn, inputs, grad_o, grad_lse=None):
    """Gradients of sum(o * grad_o) (+ sum(lse * grad_lse)) for every non-None input, by name."""
    leaves = {n: t.detach().clone().requires_grad_() for n, t in zip(NAMES, inputs) if t is not None}
    out = fn(*(leaves.get(n) for n in NAMES))
    loss = (out[0].double() * grad_o.double()).sum()
    if grad_lse is not None:
        loss = loss + (out[1].double() * grad_lse.double()).sum()
    return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))


# (B, T, HQ, H, D, Dv, gate, cu_seqlens)
BACKWARD_CASES = [
    (1, 17, 2, 1, 16, 24, True, None),
    (2, 70, 4, 2, 40, 32, True, None),
    (1, 130, 2, 2, 72, 64, False, None),
    # d >= 128: the carried queries' two rank-64 products instead of P_c (path_attention_cpu.h carry_by_matrix).
    (1, 140, 2, 1, 128, 16, True, [0, 3, 140]),
    (1, 109, 4, 2, 64, 16, True, [0, 30, 100, 109]),   # last: test_cpu_isa_paths runs it on every ISA path
]


@pytest.mark.parametrize("B,T,HQ,H,D,Dv,gate,cu", BACKWARD_CASES)
def test_backward_matches_reference(B, T, HQ, H, D, Dv, gate, cu):
    inputs = make_inputs(B, T, HQ, H, D, Dv, gate)
    cu = None if cu is None else torch.tensor(cu)
    grad_o = torch.randn(B, T, HQ, Dv, generator=torch.Generator().manual_seed(5))
    with kernel_ran("path_attention_backward", "cpu"):
        ours = grads(lambda *a: path_attention(*a, cu_seqlens=cu), inputs, grad_o)
    ref = grads(lambda *a: (ref_path_attention(*a, cu_seqlens=cu),), fp64(*inputs), grad_o)
    for name, r in ref.items():
        assert ours[name].dtype == inputs[NAMES.index(name)].dtype
        err = rel_rms(ours[name], r)
        assert err < 1e-5, f"d{name}: relative RMS error {err:.3g}"   # fp32: far inside GRAD_TOL


def test_backward_through_lse():
    """A gradient arriving at the op's lse output (as a training loss on the log-normaliser would send)."""
    inputs = make_inputs(1, 80, 2, 1, 16, 16, True)
    gen = torch.Generator().manual_seed(6)
    grad_o, grad_lse = torch.randn(1, 80, 2, 16, generator=gen), torch.randn(1, 2, 80, generator=gen)
    ours = grads(lambda *a: torch.ops.blockops.path_attention(*a, None, 0.25), inputs, grad_o, grad_lse)
    ref = grads(lambda *a: (lambda o, lse: (o, lse.transpose(1, 2)))(*ref_path_attention(*a, scale=0.25,
                                                                                          return_lse=True)),
                fp64(*inputs), grad_o, grad_lse)
    for name, r in ref.items():
        assert rel_rms(ours[name], r) < 1e-5, name


def test_backward_bf16():
    """bf16 activations, fp32 w/beta/g: every gradient within the reference implementation's tolerance."""
    inputs = make_inputs(1, 100, 4, 2, 64, 64, True, dtype=torch.bfloat16)
    grad_o = torch.randn(1, 100, 4, 64, generator=torch.Generator().manual_seed(7)).bfloat16()
    ours = grads(lambda *a: path_attention(*a), inputs, grad_o)
    ref = grads(lambda *a: (ref_path_attention(*a),), fp64(*inputs), grad_o)
    for name, r in ref.items():
        err = rel_rms(ours[name], r)
        assert err < GRAD_TOL[name], f"d{name}: relative RMS error {err:.3g} > {GRAD_TOL[name]}"


# ---------------------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gate", [False, True])
def test_decode_matches_full_forward(gate):
    """Prefill 70 tokens (across a chunk boundary), then 6 decode steps: each step's output equals the last row
    of the full computation over all tokens so far."""
    T0, steps = 70, 6
    q, k, v, w, beta, g = make_inputs(2, T0 + steps, 4, 2, 16, 24, gate)
    _, k_cache = path_attention(q[:, :T0], k[:, :T0], v[:, :T0], w[:, :T0], beta[:, :T0],
                                None if g is None else g[:, :T0], use_cache=True)
    cache = PathCache.from_prefill(k_cache, v[:, :T0], None if g is None else g[:, :T0])
    full = ref_path_attention(*fp64(q, k, v, w, beta, g))
    for t in range(T0, T0 + steps):
        o_t = path_decode_step(q[:, t], k[:, t], v[:, t], w[:, t], beta[:, t], None if g is None else g[:, t], cache)
        assert rel_rms(o_t, full[:, t]) < 1e-5, f"step {t}"
    assert cache.lengths.tolist() == [T0 + steps] * 2


def test_decode_batched_rows_of_different_lengths():
    """Packed prefill of three sequences -> one cache row each (lengths 5, 66, 1), grown past its capacity by
    decoding; every row matches its own full forward."""
    lens, steps = [5, 66, 1], 3
    total = [n + steps for n in lens]
    seqs = [make_inputs(1, n, 2, 1, 16, 16, True, seed=i) for i, n in enumerate(total)]
    packed = [torch.cat([s[j][:, :n] for s, n in zip(seqs, lens)], 1) for j in range(6)]
    cu = torch.tensor([0, 5, 71, 72])
    _, k_cache = path_attention(*packed[:5], packed[5], cu_seqlens=cu, use_cache=True)
    cache = PathCache.from_prefill(k_cache, packed[2], packed[5], cu_seqlens=cu)
    fulls = [ref_path_attention(*fp64(*s)) for s in seqs]
    for step in range(steps):
        step_in = [torch.cat([s[j][:, n + step] for s, n in zip(seqs, lens)], 0) for j in range(6)]
        o_t = path_decode_step(*step_in, cache)
        for r, n in enumerate(lens):
            assert rel_rms(o_t[r], fulls[r][0, n + step]) < 1e-5, f"row {r} step {step}"
    assert cache.lengths.tolist() == total


def random_cache(B, HQ, H, D, Dv, L, lengths, gate, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(B, H, L, D, generator=gen)
    values = torch.randn(B, H, L, Dv, generator=gen)
    gates = -torch.rand(B, HQ, L, generator=gen).cumsum(-1) if gate else None
    g_last = gates[:, :, 0].clone() if gate else None
    to = (lambda t: None if t is None else t.to(device))
    return (to(keys), to(values), torch.tensor(lengths, device=device), to(gates), to(g_last))


@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("dtype,aux", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                       (torch.float16, torch.float16)])
def test_decode_step_kernel_vs_torch(gate, dtype, aux):
    """The fused op on rows of lengths 0, 1, 37, 70 (capacity 80), GQA 4/2, D 40, Dv 24: outputs and every cache
    tensor against plain PyTorch; entries beyond each row's new length are untouched."""
    B, HQ, H, D, Dv, L = 4, 4, 2, 40, 24, 80
    lengths = [0, 1, 37, 70]
    q, k, v, w, beta, g = (t[:, 0] if t is not None else None for t in make_inputs(B, 1, HQ, H, D, Dv, gate, dtype, aux))
    keys, values, lens, gates, g_last = random_cache(B, HQ, H, D, Dv, L, lengths, gate)
    ref = ref_path_decode_step(q, k, v, w, beta, g, keys, values, lens, gates, g_last, 0.3)
    with kernel_ran("path_decode_step", "cpu"):
        o = torch.ops.blockops.path_decode_step(q, k, v, w, beta, g, keys, values, lens, gates, g_last, 0.3)
    assert o.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_rms(o, ref[0]) < tol
    for got, want in zip((keys, values, gates, g_last), ref[1:]):
        if got is not None:
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_decode_step_errors():
    B, HQ, H, D, Dv, L = 2, 2, 1, 16, 16, 8
    q, k, v, w, beta, g = (t[:, 0] for t in make_inputs(B, 1, HQ, H, D, Dv, True))
    keys, values, lens, gates, g_last = random_cache(B, HQ, H, D, Dv, L, [3, 7], True)
    op = torch.ops.blockops.path_decode_step
    with pytest.raises(RuntimeError, match="leaves no room"):
        op(q, k, v, w, beta, g, keys, values, torch.tensor([3, 8]), gates, g_last, 0.25)
    with pytest.raises(RuntimeError, match="together"):
        op(q, k, v, w, beta, None, keys, values, lens, gates, g_last, 0.25)
    with pytest.raises(RuntimeError, match="keys must have dtype"):
        op(q, k, v, w, beta, g, keys.half(), values, lens, gates, g_last, 0.25)
    with pytest.raises(RuntimeError, match="values must have shape"):
        op(q, k, v, w, beta, g, keys, values[:, :, :4], lens, gates, g_last, 0.25)
    with pytest.raises(RuntimeError, match="lengths must have dtype"):
        op(q, k, v, w, beta, g, keys, values, lens.int(), gates, g_last, 0.25)
    with pytest.raises(RuntimeError, match="multiple of k_t's heads"):
        op(q[:, :1].expand(B, 3, D).contiguous(), torch.cat([k, k], 1), v, w, beta, g, keys, values, lens, gates,
           g_last, 0.25)
    with pytest.raises(ValueError, match="forget gate"):
        path_decode_step(q, k, v, w, beta, None, PathCache(keys, values, lens, gates, g_last))


def test_errors_before_computing():
    """issue 17: head dim 0 raised ZeroDivisionError from the default scale D ** -0.5, a 2-D q_t a tuple-unpacking
    ValueError, before any check; a scale beyond fp32's range became inf in the kernels."""
    q, k, v, w, beta, g = make_inputs(1, 10, 2, 1, 16, 16, True)
    for scale in (None, 0.5):
        with pytest.raises(RuntimeError, match=r"q head dim must be a multiple of 8 in \[8, 256\], got 0"):
            path_attention(q[..., :0], k[..., :0], v, w[..., :0], beta, g, scale=scale)
    with pytest.raises(RuntimeError, match="scale must be finite and within fp32's range"):
        path_attention(q, k, v, w, beta, g, scale=1e300)
    B, HQ, H, D, Dv, L = 2, 2, 1, 16, 16, 8
    q, k, v, w, beta, g = (t[:, 0] for t in make_inputs(B, 1, HQ, H, D, Dv, True))
    cache = PathCache(*random_cache(B, HQ, H, D, Dv, L, [3, 5], True))
    with pytest.raises(ValueError, match=r"q_t must be \[B, HQ, D\] and k_t \[B, H, D\], got \(2, 32\)"):
        path_decode_step(q.reshape(B, HQ * D), k, v, w, beta, g, cache)
    with pytest.raises(ValueError, match=r"q_t must be \[B, HQ, D\] and k_t \[B, H, D\], got \(2, 2, 16\) and \(2, 16\)"):
        path_decode_step(q, k[:, 0], v, w, beta, g, cache)
    empty = PathCache(*random_cache(B, HQ, H, 0, Dv, L, [3, 5], True))
    with pytest.raises(RuntimeError, match=r"q_t head dim must be a multiple of 8 in \[8, 256\], got 0"):
        path_decode_step(q[..., :0], k[..., :0], v, w[..., :0], beta, g, empty)
    with pytest.raises(RuntimeError, match="scale must be finite and within fp32's range"):
        path_decode_step(q, k, v, w, beta, g, cache, scale=-1e300)
    assert cache.lengths.tolist() == [3, 5], "a refused step leaves the cache as it was"
    none = PathCache(torch.zeros(0, H, L, D), torch.zeros(0, H, L, Dv), torch.zeros(0, dtype=torch.long))
    o = path_decode_step(q[:0], k[:0], v[:0], w[:0], beta[:0], None, none)   # no rows: max() of no lengths raised
    assert o.shape == (0, HQ, Dv) and none.lengths.shape == (0,)
    with pytest.raises(ValueError, match=r"from_prefill: k_cache must be \[B, T, H, D\], v \[B, T, H, Dv\]"):
        PathCache.from_prefill(torch.zeros(1, 4, 16), torch.zeros(1, 4, 1, 16))
    with pytest.raises(ValueError, match=r"from_prefill: .* got \(1, 4, 1, 16\), \(1, 3, 1, 16\) and None"):
        PathCache.from_prefill(torch.zeros(1, 4, 1, 16), torch.zeros(1, 3, 1, 16))
    with pytest.raises(ValueError, match=r"from_prefill: .* and \(1, 4\)"):
        PathCache.from_prefill(torch.zeros(1, 4, 1, 16), torch.zeros(1, 4, 1, 16), torch.zeros(1, 4))


def test_decode_step_opcheck_and_compile():
    B, HQ, H, D, Dv, L = 2, 2, 1, 16, 8, 8
    q, k, v, w, beta, g = (t[:, 0] for t in make_inputs(B, 1, HQ, H, D, Dv, True))
    op = torch.ops.blockops.path_decode_step.default
    opcheck(op, (q, k, v, w, beta, g, *random_cache(B, HQ, H, D, Dv, L, [2, 5], True), 0.25))
    opcheck(op, (q, k, v, w, beta, None, *random_cache(B, HQ, H, D, Dv, L, [0, 7], False), 0.25))

    def step(q, k, v, w, beta, g, keys, values, lens, gates, g_last):
        return torch.ops.blockops.path_decode_step(q, k, v, w, beta, g, keys, values, lens, gates, g_last, 0.25)

    eager_cache = random_cache(B, HQ, H, D, Dv, L, [2, 5], True)
    compiled_cache = [t.clone() for t in eager_cache]
    eager = step(q, k, v, w, beta, g, *eager_cache)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)(q, k, v, w, beta, g, *compiled_cache)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(compiled_cache, eager_cache):
        torch.testing.assert_close(a, b)   # the cache mutations survive compilation


# ---------------------------------------------------------------------------------------------------------
# opcheck, torch.compile
# ---------------------------------------------------------------------------------------------------------

def test_opcheck():
    q, k, v, w, beta, g = make_inputs(1, 70, 2, 1, 16, 8, True)
    cu = torch.tensor([0, 20, 70], dtype=torch.int32)
    op = torch.ops.blockops.path_attention.default
    opcheck(op, (q, k, v, w, beta, g, None, 0.25))
    opcheck(op, (q, k, v, w, beta, None, cu, 0.25))
    opcheck(op, tuple(t.clone().requires_grad_() for t in (q, k, v, w, beta, g)) + (cu, 0.25))
    opcheck(torch.ops.blockops.path_key_cache.default, (k, w, beta, None))
    o, lse = op(q, k, v, w, beta, g, cu, 0.25)
    opcheck(torch.ops.blockops.path_attention_backward.default,
            (torch.randn_like(o), q, k, v, w, beta, g, cu, o, lse, torch.randn_like(lse), 0.25))


def test_compile():
    q, k, v, w, beta, g = make_inputs(1, 40, 2, 1, 16, 16, True)
    assert_compiles(lambda *a: path_attention(*a, use_cache=True), q, k, v, w, beta, g)


def test_compile_backward():
    inputs = make_inputs(1, 40, 2, 1, 16, 16, True)
    grad_o = torch.randn(1, 40, 2, 16)
    eager = grads(lambda *a: path_attention(*a), inputs, grad_o)
    torch._dynamo.reset()
    compiled = grads(torch.compile(lambda *a: path_attention(*a), fullgraph=True), inputs, grad_o)
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name])


# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case,match", [
    ("k_len", "k must be"),
    ("v_heads", "v must have shape"),
    ("beta_shape", "beta must have shape"),
    ("g_shape", "g must have shape"),
    ("gqa", "multiple of k's heads"),
    ("head_dim", "multiple of 8"),
    ("v_dim", "multiple of 8"),
    ("big_head_dim", "multiple of 8"),
    ("kv_dtype", "share one dtype"),
    ("w_dtype", "w must have dtype"),
    ("int_q", "q must have dtype"),
    ("cu_batch", "batch size 1"),
    ("cu_end", "end at T"),
    ("cu_order", "non-decreasing"),
    ("cu_dtype", "cu_seqlens must have dtype"),
])
def test_errors(case, match):
    q, k, v, w, beta, g = make_inputs(1, 10, 2, 1, 16, 16, True)
    cu = None
    if case == "k_len":
        k = k[:, :9]
    elif case == "v_heads":
        v = torch.randn(1, 10, 2, 16)
    elif case == "beta_shape":
        beta = beta[:, :, None]
    elif case == "g_shape":
        g = g[:, :, :1]
    elif case == "gqa":
        q = torch.randn(1, 10, 3, 16)
        k, w, v, beta = (torch.cat([t, t], 2) for t in (k, w, v, beta))
    elif case == "head_dim":
        q, k, w = q[..., :12], k[..., :12], w[..., :12]
    elif case == "v_dim":
        v = v[..., :12].contiguous()
    elif case == "big_head_dim":
        q, k, w = torch.randn(1, 10, 2, 264), torch.randn(1, 10, 1, 264), torch.randn(1, 10, 1, 264)
    elif case == "kv_dtype":
        k = k.half()
    elif case == "w_dtype":
        w = w.double()
    elif case == "int_q":
        q = q.int()
    elif case == "cu_batch":
        q, k, v, w, beta, g = (torch.cat([t, t], 0) for t in (q, k, v, w, beta, g))
        cu = torch.tensor([0, 4, 10])
    elif case == "cu_end":
        cu = torch.tensor([0, 4, 9])
    elif case == "cu_order":
        cu = torch.tensor([0, 6, 4, 10])
    elif case == "cu_dtype":
        cu = torch.tensor([0.0, 10.0])
    with pytest.raises(RuntimeError, match=match):
        torch.ops.blockops.path_attention(q.contiguous(), k.contiguous(), v.contiguous(), w.contiguous(), beta, g,
                                          cu, 0.25)


# ---------------------------------------------------------------------------------------------------------
# float64 on the CPU (issue 17): the compiled kernels in fp64 throughout, so gradcheck runs as for PyTorch's ops
# ---------------------------------------------------------------------------------------------------------

def fp64_op(cu=None, scale=0.3):
    """The forward op on fp64 inputs as a function of (q, k, v, w, beta[, g]) -> (o, lse [B, T, HQ])."""
    def fn(q, k, v, w, beta, g=None):
        o, lse = torch.ops.blockops.path_attention(q, k, v, w, beta, g, cu, scale)
        return o, lse.transpose(1, 2)
    return fn


def fp64_ref(cu=None, scale=0.3):
    def fn(q, k, v, w, beta, g=None):
        return ref_path_attention(q, k, v, w, beta, g, scale=scale, cu_seqlens=cu, return_lse=True)
    return fn


# (B, T, HQ, H, gate, cu_seqlens): T = 70 crosses the 64-token chunk (carried queries, two key chunks), GQA 2/1 and
# 4/2, packed sequences (the second one crossing the boundary). scale 0.3 is not an fp32 number: the fp64 path must
# use the caller's value, not the fp32 one the float kernels take.
FP64_CASES = [
    (2, 70, 2, 2, False, None),
    (1, 70, 2, 1, True, None),
    (1, 79, 4, 2, True, [0, 9, 79]),
]


@pytest.mark.parametrize("B,T,HQ,H,gate,cu", FP64_CASES)
def test_float64_forward_matches_reference(B, T, HQ, H, gate, cu):
    """o and lse come back fp64 and equal the fp64 reference to 1e-10: one fp32 step anywhere (pass 1, the gate
    prefix, the online softmax, the scale) would leave errors near 1e-7."""
    inputs = fp64(*make_inputs(B, T, HQ, H, 16, 8, gate))
    cu = None if cu is None else torch.tensor(cu)
    with kernel_ran("path_attention", "cpu"):
        o, lse = fp64_op(cu)(*inputs)
    assert o.dtype == lse.dtype == torch.float64
    ref, ref_lse = fp64_ref(cu)(*inputs)
    torch.testing.assert_close(o, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("B,T,HQ,H,gate,cu", FP64_CASES)
def test_float64_backward_matches_reference(B, T, HQ, H, gate, cu):
    """Every gradient (through o and lse) in fp64, equal to autograd through the fp64 reference to 1e-10."""
    inputs = fp64(*make_inputs(B, T, HQ, H, 16, 8, gate))
    cu = None if cu is None else torch.tensor(cu)
    gen = torch.Generator().manual_seed(8)
    grad_o, grad_lse = torch.randn(B, T, HQ, 8, generator=gen).double(), torch.randn(B, T, HQ, generator=gen).double()
    with kernel_ran("path_attention_backward", "cpu"):
        ours = grads(fp64_op(cu), inputs, grad_o, grad_lse)
    ref = grads(fp64_ref(cu), inputs, grad_o, grad_lse)
    assert set(ours) == set(ref) == set(NAMES[:6 if gate else 5])
    for name, r in ref.items():
        assert ours[name].dtype == torch.float64, name
        torch.testing.assert_close(ours[name], r, rtol=1e-10, atol=1e-10, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("T,HQ,H,gate,cu", [(66, 1, 1, True, None), (20, 2, 1, False, [0, 7, 20])])
def test_float64_gradcheck(T, HQ, H, gate, cu):
    """torch.autograd.gradcheck of (o, lse) w.r.t. q, k, v, w, beta and g: finite differences of the forward kernel
    against the backward kernel. T = 66 crosses the chunk boundary (the carried queries' and the UT transform's
    backward of a full chunk and a 2-token one); the second case packs two sequences, GQA 2/1. Sizes keep each
    case to a few seconds (the cost grows with the inputs x outputs; the 1e-10 comparisons above cover the larger
    GQA and gated shapes). (No gradgradcheck: the backward op has no derivative of its own.)"""
    inputs = [t.requires_grad_() for t in fp64(*make_inputs(1, T, HQ, H, 8, 8, gate)) if t is not None]
    cu = None if cu is None else torch.tensor(cu)
    assert torch.autograd.gradcheck(fp64_op(cu), inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("gate", [False, True])
def test_float64_key_cache_and_decode(gate):
    """fp64 key cache (1e-10 from the reference), an fp64 PathCache, and fp64 decode steps equal to the last row of
    the full fp64 reference over all tokens so far (1e-10)."""
    T0, steps = 70, 3
    q, k, v, w, beta, g = fp64(*make_inputs(2, T0 + steps, 4, 2, 16, 8, gate))
    pre = [None if t is None else t[:, :T0] for t in (q, k, v, w, beta, g)]
    with kernel_ran("path_key_cache", "cpu"):
        _, k_cache = path_attention(*pre, use_cache=True)
    assert k_cache.dtype == torch.float64
    torch.testing.assert_close(k_cache, ref_path_key_cache(*pre[1:2], *pre[3:5]), rtol=1e-10, atol=1e-10)
    cache = PathCache.from_prefill(k_cache, pre[2], pre[5])
    assert all(t is None or t.dtype == torch.float64 for t in (cache.keys, cache.values, cache.gates, cache.g_last))
    full = ref_path_attention(q, k, v, w, beta, g)
    for t in range(T0, T0 + steps):
        with kernel_ran("path_decode_step", "cpu"):
            o_t = path_decode_step(q[:, t], k[:, t], v[:, t], w[:, t], beta[:, t], None if g is None else g[:, t],
                                   cache)
        assert o_t.dtype == torch.float64
        torch.testing.assert_close(o_t, full[:, t], rtol=1e-10, atol=1e-10, msg=lambda m: f"step {t}: {m}")


@pytest.mark.parametrize("arg,other", [("k", "q"), ("v", "q"), ("w", "k"), ("beta", "k"), ("g", "q")])
def test_float64_mixed_dtypes_refused(arg, other):
    """fp64 inputs compute in fp64 throughout: an fp32 argument next to fp64 q is refused, naming it (w, beta and g
    may be fp32 next to fp16/bf16/fp32 q, not next to fp64)."""
    inputs = dict(zip(NAMES, fp64(*make_inputs(1, 10, 2, 1, 16, 16, True))))
    inputs[arg] = inputs[arg].float()
    with pytest.raises(RuntimeError, match=f"path_attention: {arg} has dtype Float but {other} has Double"):
        torch.ops.blockops.path_attention(*inputs.values(), None, 0.25)
    if arg in ("w", "beta"):
        with pytest.raises(RuntimeError, match=f"path_key_cache: {arg} has dtype Float but k has Double"):
            torch.ops.blockops.path_key_cache(inputs["k"], inputs["w"], inputs["beta"], None)
    # and the other way round: fp64 next to fp32 q
    inputs = dict(zip(NAMES, make_inputs(1, 10, 2, 1, 16, 16, True)))
    inputs[arg] = inputs[arg].double()
    with pytest.raises(RuntimeError, match=f"path_attention: {arg} (has dtype Double but {other} has Float|must have "
                                           "dtype in .*, got Double)"):
        torch.ops.blockops.path_attention(*inputs.values(), None, 0.25)


def test_float64_backward_and_decode_dtype_errors():
    """The backward wants lse (and grad_lse) in fp64 for fp64 inputs; the decode step an fp64 cache."""
    q, k, v, w, beta, g = fp64(*make_inputs(1, 10, 2, 1, 16, 16, True))
    o, lse = torch.ops.blockops.path_attention(q, k, v, w, beta, g, None, 0.25)
    with pytest.raises(RuntimeError, match=r"lse must have dtype in \{Double\}, got Float"):
        torch.ops.blockops.path_attention_backward(o, q, k, v, w, beta, g, None, o, lse.float(), None, 0.25)
    with pytest.raises(RuntimeError, match=r"grad_lse must have dtype in \{Double\}, got Float"):
        torch.ops.blockops.path_attention_backward(o, q, k, v, w, beta, g, None, o, lse, lse.float(), 0.25)
    B, HQ, H, D, Dv, L = 2, 2, 1, 16, 16, 8
    q, k, v, w, beta, g = (t[:, 0] for t in fp64(*make_inputs(B, 1, HQ, H, D, Dv, True)))
    keys, values, lens, gates, g_last = random_cache(B, HQ, H, D, Dv, L, [3, 7], True)
    with pytest.raises(RuntimeError, match=r"keys must have dtype in \{Double\}, got Float"):
        torch.ops.blockops.path_decode_step(q, k, v, w, beta, g, keys, values, lens, gates, g_last, 0.25)
    with pytest.raises(RuntimeError, match="w_t has dtype Float but q_t has Double"):
        torch.ops.blockops.path_decode_step(q, k, v, w.float(), beta, g, keys.double(), values.double(), lens,
                                            gates.double(), g_last.double(), 0.25)


def test_float64_opcheck():
    """The fake implementations agree with the kernels on fp64 (lse and the decode cache in fp64)."""
    q, k, v, w, beta, g = fp64(*make_inputs(1, 70, 2, 1, 8, 8, True))
    cu = torch.tensor([0, 20, 70], dtype=torch.int32)
    op = torch.ops.blockops.path_attention.default
    opcheck(op, (q, k, v, w, beta, None, None, 0.25))
    opcheck(op, tuple(t.clone().requires_grad_() for t in (q, k, v, w, beta, g)) + (cu, 0.25))
    opcheck(torch.ops.blockops.path_key_cache.default, (k, w, beta, cu))
    o, lse = op(q, k, v, w, beta, g, cu, 0.25)
    opcheck(torch.ops.blockops.path_attention_backward.default,
            (torch.randn_like(o), q, k, v, w, beta, g, cu, o, lse, torch.randn_like(lse), 0.25))
    opcheck(torch.ops.blockops.path_attention_backward.default,
            (torch.randn_like(o), q, k, v, w, beta, None, None, o, op(q, k, v, w, beta, None, None, 0.25)[1], None,
             0.25))
    B, HQ, H, D, Dv, L = 2, 2, 1, 16, 8, 8
    step = [t[:, 0] for t in fp64(*make_inputs(B, 1, HQ, H, D, Dv, True))]
    cache = [t.double() if t.is_floating_point() else t for t in random_cache(B, HQ, H, D, Dv, L, [2, 5], True)]
    opcheck(torch.ops.blockops.path_decode_step.default, (*step, *cache, 0.25))


# ---------------------------------------------------------------------------------------------------------
# CUDA kernels against the CPU kernels (run where a GPU is present)
# ---------------------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def to_cuda(*ts):
    return [None if t is None else t.cuda() for t in ts]


@cuda
@pytest.mark.parametrize("T,HQ,H,D,Dv,gate,dtype", [
    (1, 1, 1, 64, 64, False, torch.float32),
    (63, 4, 2, 40, 40, True, torch.float16),
    (65, 2, 1, 72, 64, True, torch.bfloat16),
    (200, 4, 4, 128, 128, False, torch.bfloat16),
    (130, 2, 1, 256, 256, True, torch.float32),
])
def test_cuda_forward_and_key_cache_match_cpu(T, HQ, H, D, Dv, gate, dtype):
    inputs = make_inputs(2, T, HQ, H, D, Dv, gate, dtype)
    o_cpu, k_cpu = path_attention(*inputs, use_cache=True)
    with kernel_ran("path_attention", "cuda"), kernel_ran("path_key_cache", "cuda"):
        o_gpu, k_gpu = path_attention(*to_cuda(*inputs), use_cache=True)
    tol = 1e-5 if dtype == torch.float32 else 0.005
    assert rel_rms(o_gpu.cpu(), o_cpu) < tol
    assert rel_rms(k_gpu.cpu(), k_cpu) < tol


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_tensor_core_forward_long_sequence(dtype):
    """The tensor-core forward (fp16/bf16 operands, fp32 accumulation) over 32 chunks: the carried queries pass
    through 31 rounded rank-64 corrections; flash-linear-attention's bf16 tolerance against an fp32 computation on
    the same inputs."""
    inputs = make_inputs(1, 2048, 2, 1, 64, 64, True, dtype)
    ref, _ = path_attention(*(None if t is None else t.float() for t in inputs))
    o, _ = path_attention(*to_cuda(*inputs))
    assert rel_rms(o.cpu(), ref) < O_TOL


@cuda
def test_cuda_varlen_matches_cpu():
    inputs = make_inputs(1, 200, 4, 2, 64, 64, True, torch.bfloat16)
    cu = torch.tensor([0, 1, 65, 65, 200], dtype=torch.int32)
    o_cpu, k_cpu = path_attention(*inputs, cu_seqlens=cu, use_cache=True)
    o_gpu, k_gpu = path_attention(*to_cuda(*inputs), cu_seqlens=cu.cuda(), use_cache=True)
    assert rel_rms(o_gpu.cpu(), o_cpu) < 0.005
    assert rel_rms(k_gpu.cpu(), k_cpu) < 0.005


@cuda
@pytest.mark.parametrize("gate,dtype,cu", [(True, torch.float32, None), (False, torch.bfloat16, None),
                                           (True, torch.float16, [0, 70, 130])])
def test_cuda_backward_matches_cpu(gate, dtype, cu):
    inputs = make_inputs(1, 130, 4, 2, 72, 64, gate, dtype)
    cu = None if cu is None else torch.tensor(cu)
    grad_o = torch.randn(1, 130, 4, 64, generator=torch.Generator().manual_seed(3)).to(dtype)
    ours = grads(lambda *a: path_attention(*a, cu_seqlens=None if cu is None else cu.to(a[0].device)),
                 to_cuda(*inputs), grad_o.cuda())
    ref = grads(lambda *a: path_attention(*a, cu_seqlens=cu), inputs, grad_o)
    tol = 1e-4 if dtype == torch.float32 else 0.01
    for name, r in ref.items():
        assert rel_rms(ours[name].cpu(), r) < tol, name


@cuda
@pytest.mark.parametrize("gate", [False, True])
def test_cuda_decode_step_matches_cpu(gate):
    B, HQ, H, D, Dv, L = 4, 4, 2, 40, 24, 80
    q, k, v, w, beta, g = (t[:, 0] if t is not None else None for t in make_inputs(B, 1, HQ, H, D, Dv, gate))
    cpu_cache = random_cache(B, HQ, H, D, Dv, L, [0, 1, 37, 70], gate)
    gpu_cache = [None if t is None else t.cuda() for t in cpu_cache]
    o_cpu = torch.ops.blockops.path_decode_step(q, k, v, w, beta, g, *cpu_cache, 0.3)
    with kernel_ran("path_decode_step", "cuda"):
        o_gpu = torch.ops.blockops.path_decode_step(*to_cuda(q, k, v, w, beta, g), *gpu_cache, 0.3)
    assert rel_rms(o_gpu.cpu(), o_cpu) < 1e-5
    for a, b in zip(gpu_cache, cpu_cache):
        if a is not None:
            torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-5)
