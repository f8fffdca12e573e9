"""block_sparse_attention: forward, lse and gradients against a dense-mask fp64 reference for every mask builder,
random / per-head / empty-row masks, GQA, ragged lengths, odd head dims and every block size; opcheck,
torch.compile, every CPU ISA path and error paths."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import blockops
from blockops.attention import BlockMask, block_sparse_attention, masks
from blockops.ops.attention import MASK_FIELDS
from blockops.reference import ref_masked_attention

from helpers import DEVICES, assert_compiles, env_var, kernel_ran, needs_hopper_kernels, opcheck, run_with_cpu_isa

# Max |error| / max |reference| allowed per dtype (fp32: accumulation-order noise; fp16/bf16: one rounding of
# the inputs and outputs, same order as SDPA's own error in that dtype).
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}


def _inputs(b, h, hk, tq, tk, d, dv, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, tq, d, generator=g).to(device, dtype)
    k = torch.randn(b, hk, tk, d, generator=g).to(device, dtype)
    v = torch.randn(b, hk, tk, dv, generator=g).to(device, dtype)
    return q, k, v


def _max_rel(out, ref):
    """max |out - ref| / max |ref|; the floor keeps an all-zero reference (e.g. dq of a 1-token sequence, where
    every softmax gradient cancels) from turning fp32 rounding noise into an infinite relative error."""
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-2)).item()


def check_against_reference(q, k, v, mask: BlockMask, scale=None, backward=True, tol=None):
    """out, lse and (optionally) dq, dk, dv of the kernel vs ref_masked_attention in fp64 on the dense mask."""
    tol = TOL[q.dtype] if tol is None else tol
    device = q.device.type
    q, k, v = (t.detach().clone().requires_grad_(backward) for t in (q, k, v))
    with kernel_ran("block_sparse_attention", device):
        out, lse = block_sparse_attention(q, k, v, mask, scale=scale, return_lse=True)
    dense = mask.to_dense()
    qr, kr, vr = (t.detach().double().requires_grad_(backward) for t in (q, k, v))
    ref, ref_lse = ref_masked_attention(qr, kr, vr, dense, scale=scale)
    assert out.dtype == q.dtype and lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    assert torch.isfinite(out).all()
    assert _max_rel(out, ref) <= tol, f"out error {_max_rel(out, ref):.3g}"
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty), "rows without a visible key must have lse = -inf, others finite"
    assert (lse[empty] < 0).all()
    assert (out[empty.expand_as(out[..., 0])] == 0).all(), "rows without a visible key must give 0"
    if (~empty).any():
        lse_err = (lse.double() - ref_lse)[~empty.expand_as(lse)].abs().max().item()
        lse_tol = {torch.float64: 1e-10, torch.float32: 1e-4}.get(q.dtype, 2e-2)
        assert lse_err <= lse_tol, f"lse error {lse_err:.3g}"
    if not backward:
        return
    g = torch.Generator().manual_seed(1)
    grad = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    with kernel_ran("block_sparse_attention_backward", device):
        out.backward(grad)
    ref.backward(grad.double())
    for name, got, want in (("dq", q.grad, qr.grad), ("dk", k.grad, kr.grad), ("dv", v.grad, vr.grad)):
        assert got.shape == want.shape and got.dtype == q.dtype
        assert torch.isfinite(got).all(), f"{name} has non-finite values"
        err = _max_rel(got, want)
        assert err <= 2 * tol, f"{name} error {err:.3g}"


# ------------------------------------------------------------------------------------------- every builder
def _builders(t, bq, bkv):
    kw = dict(block_q=bq, block_kv=bkv)
    return {
        "causal": masks.causal(t, **kw),
        "sliding_window": masks.sliding_window(t, 37, **kw),
        "sliding_window_bidirectional": masks.sliding_window(t, 29, causal=False, **kw),
        "longgen": masks.sink_window_strided(t, 8, 40, 3, **kw),
        "documents": masks.documents([t // 3, t // 2, t - t // 3 - t // 2], causal=True, **kw),
        "block_diffusion": masks.block_diffusion(16, t, **kw),
        "blockrank": masks.blockrank(t // 5, [t // 5] * 3, t - 4 * (t // 5), **kw),
        "or_and": masks.and_masks(masks.or_masks(masks.sliding_window(t, 16, **kw),
                                                 masks.documents([t // 2, t - t // 2], **kw)),
                                  masks.causal(t, **kw)),
        "from_dense": masks.from_dense(torch.rand(t, t, generator=torch.Generator().manual_seed(7)) < 0.4,
                                       (bq, bkv)),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pattern", ["causal", "sliding_window", "sliding_window_bidirectional", "longgen",
                                     "documents", "block_diffusion", "blockrank", "or_and", "from_dense"])
def test_every_builder(device, pattern):
    t = 97
    mask = _builders(t, 32, 16)[pattern].to(device)
    q, k, v = _inputs(2, 2, 2, t, t, 40, 40, torch.float32, device)
    check_against_reference(q, k, v, mask)


@pytest.mark.parametrize("device", DEVICES)
def test_block_diffusion_training_doubled_sequence(device):
    n = 80
    mask = masks.block_diffusion(16, n, training=True, block_q=32, block_kv=32).to(device)
    q, k, v = _inputs(1, 2, 1, 2 * n, 2 * n, 64, 64, torch.float32, device)
    check_against_reference(q, k, v, mask)


@pytest.mark.parametrize("device", DEVICES)
def test_topk_blocks_jenga(device):
    q, k, v = _inputs(2, 2, 2, 200, 200, 64, 64, torch.float32, device)
    mask = masks.topk_blocks(q, k, keep_ratio=0.3, min_blocks=1, block_size=32)
    check_against_reference(q, k, v, mask)


# ------------------------------------------------------------------------------------ geometry and dtypes
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bq,bkv", [(16, 16), (16, 128), (128, 16), (32, 64), (64, 32), (128, 128)])
def test_block_sizes_random_masks(device, bq, bkv):
    g = torch.Generator().manual_seed(bq * 1000 + bkv)
    dense = torch.rand(2, 1, 150, 170, generator=g) < 0.3
    dense[:, :, :40, :64] = True                        # some full tiles too
    dense[0, 0, 7] = False                              # an empty row
    mask = BlockMask.from_dense(dense, bq, bkv).to(device)
    q, k, v = _inputs(2, 3, 3, 150, 170, 32, 32, torch.float32, device)
    check_against_reference(q, k, v, mask)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d,dv", [(40, 40), (72, 72), (8, 16), (64, 128), (128, 64), (256, 256)])
def test_head_dims(device, d, dv):
    mask = masks.causal(70, 90, block_q=16, block_kv=32).to(device)
    q, k, v = _inputs(1, 2, 1, 70, 90, d, dv, torch.float32, device)
    check_against_reference(q, k, v, mask)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("t", [1, 97, 1025])
def test_ragged_lengths_causal(device, t):
    """mask == causal, lengths that are not multiples of the block: where a known sparse backward went wrong."""
    mask = masks.causal(t, block_q=64, block_kv=64).to(device)
    q, k, v = _inputs(1, 2, 2, t, t, 64, 64, torch.float32, device)
    check_against_reference(q, k, v, mask)


@pytest.mark.parametrize("device", DEVICES)
def test_gqa_and_per_head_masks(device):
    t = 130
    heads = [masks.causal(t, block_q=32, block_kv=32), masks.sliding_window(t, 20, block_q=32, block_kv=32),
             masks.documents([30, 100], block_q=32, block_kv=32), masks.sink_window_strided(t, 4, 16, 2, block_q=32,
                                                                                           block_kv=32)]
    mask = masks.per_head(*heads).to(device)
    q, k, v = _inputs(2, 4, 2, t, t, 64, 64, torch.float32, device)
    check_against_reference(q, k, v, mask)


@pytest.mark.parametrize("device", DEVICES)
def test_per_batch_masks_and_cross_attention(device):
    dense = torch.rand(3, 1, 50, 300, generator=torch.Generator().manual_seed(3)) < 0.2
    mask = BlockMask.from_dense(dense, 16, 64).to(device)
    q, k, v = _inputs(3, 2, 1, 50, 300, 24, 48, torch.float32, device)
    check_against_reference(q, k, v, mask, scale=0.3)


@pytest.mark.parametrize("device", DEVICES)
def test_all_rows_empty(device):
    mask = BlockMask.from_dense(torch.zeros(40, 40, dtype=torch.bool), 16, 16).to(device)
    q, k, v = _inputs(1, 1, 1, 40, 40, 16, 16, torch.float32, device)
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    out, lse = block_sparse_attention(q, k, v, mask, return_lse=True)
    assert (out == 0).all() and torch.isneginf(lse).all()
    out.sum().backward()
    for t in (q, k, v):
        assert (t.grad == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(device, dtype):
    mask = masks.sink_window_strided(200, 16, 48, 2, block_q=64, block_kv=32).to(device)
    q, k, v = _inputs(2, 4, 2, 200, 200, 64, 64, dtype, device)
    check_against_reference(q, k, v, mask)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs(device):
    """q, k, v as views of [B, T, H, D] projections: only the last dim is contiguous."""
    b, t, h, d = 2, 77, 4, 32
    qkv = torch.randn(b, t, 3, h, d, device=device)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    check_against_reference(q, k, v, masks.causal(t, block_q=16, block_kv=16).to(device))


@pytest.mark.parametrize("device", DEVICES)
def test_lse_gradient(device):
    """Gradients flowing into the returned lse (used to merge partial attentions) match the reference."""
    mask = masks.sliding_window(90, 30, block_q=32, block_kv=32).to(device)
    q, k, v = (t.requires_grad_() for t in _inputs(1, 2, 2, 90, 90, 32, 32, torch.float32, device))
    out, lse = block_sparse_attention(q, k, v, mask, return_lse=True)
    (out.square().sum() + (lse * torch.linspace(-1, 1, 90, device=device)).sum()).backward()
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = ref_masked_attention(qr, kr, vr, mask.to_dense())
    (ref.square().sum() + (ref_lse * torch.linspace(-1, 1, 90, device=device).double()).sum()).backward()
    for got, want in ((q.grad, qr.grad), (k.grad, kr.grad), (v.grad, vr.grad)):
        assert _max_rel(got, want) < 1e-4


@pytest.mark.parametrize("device", DEVICES)
def test_unlisted_blocks_are_never_read(device):
    """Two packed documents in separate 64-blocks; document B's keys and values are NaN. Document A's outputs and
    gradients stay finite and exact only if no kernel touches B's blocks (even a masked read would give
    NaN * 0 = NaN)."""
    mask = masks.documents([64, 64], block_q=64, block_kv=64).to(device)
    q, k, v = _inputs(1, 2, 1, 128, 128, 32, 32, torch.float32, device)
    k[:, :, 64:] = float("nan")
    v[:, :, 64:] = float("nan")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = block_sparse_attention(q, k, v, mask)
    ref = F.scaled_dot_product_attention(q[:, :, :64], k[:, :, :64], v[:, :, :64])
    torch.testing.assert_close(out[:, :, :64], ref, atol=2e-5, rtol=2e-5)
    out[:, :, :64].sum().backward()
    assert torch.isfinite(q.grad[:, :, :64]).all() and torch.isfinite(k.grad[:, :, :64]).all()
    assert torch.isfinite(v.grad[:, :, :64]).all()


@needs_hopper_kernels("attention")
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pattern", ["causal", "longgen", "jenga"])
def test_hopper_forward(d, dtype, pattern):
    """The Hopper forward (attention_wgmma.cu: TMA + wgmma) on an H100 / H200: against the fp64 reference on ragged
    lengths, GQA and partial blocks, and BLOCKOPS_ATTENTION_WGMMA=0 sends the same call to the mma.sync kernel."""
    T, H, HK, block = 333, 4, 2, 128
    q, k, v = _inputs(1, H, HK, T, T, d, d, dtype, "cuda")
    if pattern == "causal":
        mask = masks.causal(T, block_q=block, block_kv=block, device="cuda")
    elif pattern == "longgen":
        mask = masks.sink_window_strided(T, sink=block, window=T // 3, stride=2, block_q=block, block_kv=block,
                                         device="cuda")
    else:
        mask = masks.topk_blocks(q, k, keep_ratio=0.5, block_size=block)
    with kernel_ran("block_sparse_attention_wgmma", "cuda"):
        check_against_reference(q, k, v, mask, backward=False)
    with env_var("BLOCKOPS_ATTENTION_WGMMA", "0"), kernel_ran("block_sparse_attention_mma", "cuda"):
        check_against_reference(q, k, v, mask, backward=False)


def test_matches_sdpa_dense_mask():
    """The comparison users make: SDPA with the equivalent boolean attn_mask."""
    mask = masks.sink_window_strided(256, 8, 64, 2, block_q=32, block_kv=32)
    q, k, v = _inputs(2, 4, 4, 256, 256, 64, 64, torch.float32, "cpu")
    out = block_sparse_attention(q, k, v, mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to_dense())
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    causal = block_sparse_attention(q, k, v, masks.causal(256))
    torch.testing.assert_close(causal, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=2e-5, rtol=2e-5)


# ------------------------------------------------------------------------------------------------ NaN / Inf
def _poison(t, index, value):
    t = t.clone()
    t[index] = value
    return t


def check_nan_inf_like_sdpa():
    """NaN / Inf in visible entries propagate as in F.scaled_dot_product_attention (fp32, CPU) and the fp64
    reference, forward and backward; rows that are not affected stay exact. A dense mask (every block full) so
    that SDPA without a mask is the same computation. Run on each CPU ISA path by test_cpu_isa_paths."""
    t = 40
    mask = BlockMask.from_dense(torch.ones(t, t, dtype=torch.bool), 16, 16)
    q, k, v = _inputs(1, 2, 1, t, t, 16, 16, torch.float32, "cpu", seed=3)
    k = k.abs() + 0.1                                   # q_i . k_j = +inf for the +inf entry of q below
    nan, inf = float("nan"), float("inf")
    cases = {
        "nan_k": (q, _poison(k, (0, 0, 5, 3), nan), v),
        "nan_v": (q, k, _poison(v, (0, 0, 7, 2), nan)),
        "nan_q": (_poison(q, (0, 1, 9, 0), nan), k, v),
        "inf_q": (_poison(q, (0, 0, 11, 0), inf), k, v),
        "inf_v": (q, k, _poison(v, (0, 0, 3, 4), inf)),
    }
    for name, (qc, kc, vc) in cases.items():
        qc, kc, vc = (x.detach().clone().requires_grad_() for x in (qc, kc, vc))
        out, lse = block_sparse_attention(qc, kc, vc, mask, return_lse=True)
        qs, ks, vs = (x.detach().clone().requires_grad_() for x in (qc, kc, vc))
        sdpa = F.scaled_dot_product_attention(qs, ks, vs, enable_gqa=True)
        qr, kr, vr = (x.detach().double().requires_grad_() for x in (qc, kc, vc))
        ref, ref_lse = ref_masked_attention(qr, kr, vr, mask.to_dense())
        for want in (sdpa, ref):
            assert torch.equal(out.isnan(), want.isnan()), f"{name}: NaN pattern of out differs"
            torch.testing.assert_close(out, want.to(out.dtype), atol=2e-5, rtol=2e-5, equal_nan=True)
        row_nan = ref.isnan().all(-1)                   # NaN / +inf score: the whole row is NaN, lse too
        assert torch.equal(lse.isnan(), row_nan), f"{name}: NaN pattern of lse differs"
        assert torch.isfinite(lse[~row_nan]).all(), f"{name}: lse not finite on the unaffected rows"
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
        out.backward(grad)
        sdpa.backward(grad)
        ref.backward(grad.double())
        for g_name, got, want, want64 in (("dq", qc.grad, qs.grad, qr.grad), ("dk", kc.grad, ks.grad, kr.grad),
                                          ("dv", vc.grad, vs.grad, vr.grad)):
            assert torch.equal(got.isnan(), want.isnan()), f"{name}: NaN pattern of {g_name} differs from SDPA"
            # ref_masked_attention's lse-based formula turns some of those NaN into +-inf: compare finiteness
            assert torch.equal(got.isfinite(), want64.isfinite()), f"{name}: {g_name} finiteness differs (fp64)"


def check_masked_nan_does_not_leak():
    """NaN in keys / values hidden from a row (by a bit tile of a listed block, or in an unlisted block) never
    reaches that row: causal, NaN k and v at keys 20 (partial diagonal block 1) and 35 (block 2, never listed for
    query blocks 0 and 1)."""
    t = 40
    mask = masks.causal(t, block_q=16, block_kv=16)
    q, k, v = _inputs(1, 2, 1, t, t, 16, 16, torch.float32, "cpu", seed=4)
    clean = block_sparse_attention(q, k, v, mask, return_lse=True)
    kn, vn = k.clone(), v.clone()
    for key in (20, 35):
        kn[:, :, key] = float("nan")
        vn[:, :, key] = float("nan")
    out, lse = block_sparse_attention(q, kn, vn, mask, return_lse=True)
    # (rows 16-19 take the per-pair path for block 1, whose V is not finite: same sums, another order)
    torch.testing.assert_close(out[:, :, :20], clean[0][:, :, :20], atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(lse[:, :, :20], clean[1][:, :, :20], atol=2e-6, rtol=2e-6)
    assert out[:, :, 20:].isnan().all() and lse[:, :, 20:].isnan().all()


def test_nan_inf_like_sdpa():
    check_nan_inf_like_sdpa()


def test_masked_nan_does_not_leak():
    check_masked_nan_does_not_leak()


def test_nan_row_is_not_an_empty_row():
    """A row whose only visible keys have NaN scores was reported as empty (out 0, lse -inf): the `l > 0` test."""
    mask = masks.causal(32, block_q=16, block_kv=16)
    q, k, v = _inputs(1, 1, 1, 32, 32, 8, 8, torch.float32, "cpu")
    k = _poison(k, (0, 0, 0, 0), float("nan"))        # row 0 sees key 0 only
    out, lse = block_sparse_attention(q, k, v, mask, return_lse=True)
    assert out.isnan().all() and lse.isnan().all()    # every row sees key 0


# ------------------------------------------------------------------------------------------------------ fp64
def test_fp64_against_reference():
    mask = masks.sink_window_strided(70, 4, 20, 3, block_q=16, block_kv=32)
    q, k, v = _inputs(1, 4, 2, 70, 70, 24, 16, torch.float64, "cpu")
    check_against_reference(q, k, v, mask)


def test_gradcheck_fp64():
    """fp64 runs the portable path in fp64 throughout, so gradcheck runs with its default tolerances, through out and
    lse. No gradgradcheck: the backward is a kernel (block_sparse_attention_backward) with no derivative."""
    mask = BlockMask.from_dense(torch.rand(20, 24, generator=torch.Generator().manual_seed(5)) < 0.5, 16, 16)
    q, k, v = (t.requires_grad_() for t in _inputs(1, 2, 1, 20, 24, 8, 8, torch.float64, "cpu"))
    fn = lambda a, b, c: block_sparse_attention(a, b, c, mask, return_lse=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_fp64_opcheck():
    mask = masks.sliding_window(40, 20, block_q=16, block_kv=16)
    q, k, v = (t.requires_grad_() for t in _inputs(1, 2, 1, 40, 40, 8, 8, torch.float64, "cpu"))
    opcheck(torch.ops.blockops.block_sparse_attention.default, _op_args(q, k, v, mask))


@pytest.mark.filterwarnings("ignore:Input #:UserWarning")
def test_gradcheck_small():
    mask = BlockMask.from_dense(torch.rand(20, 24, generator=torch.Generator().manual_seed(5)) < 0.5, 16, 16)
    q, k, v = (t.double() for t in _inputs(1, 2, 1, 20, 24, 8, 8, torch.float32, "cpu"))
    # The kernels compute in fp32: gradcheck with fp32-sized tolerances on fp32 inputs.
    q, k, v = (t.float().requires_grad_() for t in (q, k, v))
    fn = lambda a, b, c: block_sparse_attention(a, b, c, mask)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-2, atol=5e-3, rtol=5e-3)


def test_deterministic_backward():
    mask = masks.documents([100, 60, 96], causal=True, block_q=32, block_kv=32)
    q, k, v = (t.requires_grad_() for t in _inputs(1, 8, 2, 256, 256, 64, 64, torch.float32, "cpu"))
    grads = []
    for _ in range(2):
        for t in (q, k, v):
            t.grad = None
        block_sparse_attention(q, k, v, mask).sum().backward()
        grads.append([t.grad.clone() for t in (q, k, v)])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("isa", ["portable", "avx2"])
def test_cpu_isa_paths(isa):
    """Each CPU code path (forced with BLOCKOPS_CPU_ISA) against the reference, in a fresh process."""
    code = (
        "import torch, sys\n"
        "sys.path.insert(0, 'tests')\n"
        "import test_attention as t\n"
        "from blockops.attention import masks\n"
        "m = masks.sink_window_strided(130, 8, 40, 3, block_q=32, block_kv=64)\n"
        "q, k, v = t._inputs(1, 4, 2, 130, 130, 72, 40, torch.float32, 'cpu')\n"
        "t.check_against_reference(q, k, v, m)\n"
        "q, k, v = t._inputs(1, 2, 2, 130, 130, 64, 64, torch.bfloat16, 'cpu')\n"
        "t.check_against_reference(q, k, v, m)\n"
        "t.check_nan_inf_like_sdpa()\n"
        "t.check_masked_nan_does_not_leak()\n"
        "import blockops; print(blockops.build_info()['cpu_families']['attention'])\n"
    )
    res = run_with_cpu_isa(isa, code)
    assert ("portable" in res.stdout) == (isa == "portable")


# ------------------------------------------------------------------------------------- torch integration
def _op_args(q, k, v, mask, scale=0.125):
    return (q, k, v, *[getattr(mask, f) for f in MASK_FIELDS], mask.block_q, mask.block_kv, scale)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    mask = masks.sliding_window(50, 20, block_q=16, block_kv=32).to(device)
    q, k, v = (t.requires_grad_() for t in _inputs(1, 2, 1, 50, 50, 16, 24, torch.float32, device))
    opcheck(torch.ops.blockops.block_sparse_attention.default, _op_args(q, k, v, mask))
    out, lse = torch.ops.blockops.block_sparse_attention(*_op_args(q, k, v, mask))
    grad = torch.randn_like(out)
    opcheck(torch.ops.blockops.block_sparse_attention_backward.default,
            (grad, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), None,
             *_op_args(q, k, v, mask)[3:]))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile(device):
    mask = masks.causal(64, block_q=16, block_kv=16).to(device)
    q, k, v = _inputs(1, 2, 2, 64, 64, 32, 32, torch.float32, device)

    def fn(q, k, v):
        return block_sparse_attention(q, k, v, mask) * 2

    with kernel_ran("block_sparse_attention", device):
        assert_compiles(fn, q, k, v)
    # The mask as a graph input: a second mask of the same geometry reuses the graph and gives its own result.
    torch._dynamo.reset()
    compiled = torch.compile(block_sparse_attention, fullgraph=True)
    for m in (mask, masks.sliding_window(64, 10, block_q=16, block_kv=16).to(device)):
        torch.testing.assert_close(compiled(q, k, v, m), block_sparse_attention(q, k, v, m))


def test_torch_compile_backward():
    mask = masks.causal(64, block_q=16, block_kv=16)
    q, k, v = (t.requires_grad_() for t in _inputs(1, 2, 2, 64, 64, 32, 32, torch.float32, "cpu"))
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b, c: block_sparse_attention(a, b, c, mask).square().sum(), fullgraph=True)
    with kernel_ran("block_sparse_attention_backward", "cpu"):
        compiled(q, k, v).backward()
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
    F.scaled_dot_product_attention(qr, kr, vr, is_causal=True).square().sum().backward()
    for got, want in ((q.grad, qr.grad), (k.grad, kr.grad), (v.grad, vr.grad)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_sdpa_drop_in():
    mask = masks.causal(40, block_q=16, block_kv=16)
    q, k, v = _inputs(1, 4, 2, 40, 40, 16, 16, torch.float32, "cpu")
    ours = blockops.attention.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=2e-5)
    dense = blockops.attention.scaled_dot_product_attention(q, k[:, :1].expand(1, 4, 40, 16).contiguous(),
                                                            v[:, :1].expand(1, 4, 40, 16).contiguous(),
                                                            is_causal=True)
    assert dense.shape == (1, 4, 40, 16)
    with pytest.raises(ValueError, match="dropout_p"):
        blockops.attention.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.1)


# ------------------------------------------------------------------------------------------- error paths
def test_errors_shapes_and_types():
    q, k, v = _inputs(1, 2, 2, 64, 64, 32, 32, torch.float32, "cpu")
    mask = masks.causal(64, block_q=16, block_kv=16)
    with pytest.raises(ValueError, match="q_len=64"):
        block_sparse_attention(q[:, :, :50], k, v, mask)
    with pytest.raises(TypeError, match="BlockMask"):
        block_sparse_attention(q, k, v, mask.to_dense())
    with pytest.raises(RuntimeError, match="multiple of 8"):
        block_sparse_attention(q[..., :30], k[..., :30], v, mask)
    with pytest.raises(RuntimeError, match="share one dtype"):
        block_sparse_attention(q, k.half(), v, mask)
    with pytest.raises(RuntimeError, match="multiple of k's heads"):
        block_sparse_attention(q, k.repeat(1, 3, 1, 1)[:, :3], v.repeat(1, 3, 1, 1)[:, :3], mask)
    with pytest.raises(RuntimeError, match="contiguous in its last"):
        block_sparse_attention(q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v, mask)
    with pytest.raises(RuntimeError, match="dtype"):
        block_sparse_attention(q.long(), k.long(), v.long(), mask)
    args = list(_op_args(q, k, v, mask))
    args[-3] = 48                                            # block_q not in {16, 32, 64, 128}
    with pytest.raises(RuntimeError, match="block_q must be one of"):
        torch.ops.blockops.block_sparse_attention(*args)
    args = list(_op_args(q, k, v, mask))
    args[-2] = 32                                            # lists were built for block_kv = 16
    with pytest.raises(RuntimeError, match="kv_indices must have shape"):
        torch.ops.blockops.block_sparse_attention(*args)
    wide = masks.causal(64, block_q=16, block_kv=16).expand(3, 2)
    with pytest.raises(RuntimeError, match="mask's batch dim is 3"):
        block_sparse_attention(q, k, v, wide)


def test_errors_before_computing():
    """issue 17: head dim 0 raised ZeroDivisionError from the default scale D ** -0.5 before any check; a scale
    beyond fp32's range passed the finiteness check as a double and became inf in the kernels."""
    q, k, v = _inputs(1, 2, 2, 64, 64, 32, 32, torch.float32, "cpu")
    mask = masks.causal(64, block_q=16, block_kv=16)
    for scale in (None, 0.5):
        with pytest.raises(RuntimeError, match=r"head dim must be a multiple of 8 in \[8, 256\], got 0"):
            block_sparse_attention(q[..., :0], k[..., :0], v, mask, scale=scale)
    for scale in (1e300, -1e39, float("inf"), float("nan")):
        with pytest.raises(RuntimeError, match="scale must be finite and within fp32's range"):
            block_sparse_attention(q, k, v, mask, scale=scale)
    args = list(_op_args(q, k, v, mask))
    args[-1] = 1e300
    with pytest.raises(RuntimeError, match="scale must be finite and within fp32's range"):
        torch.ops.blockops.block_sparse_attention(*args)


def _corrupt(mask: BlockMask, field: str, value: int) -> BlockMask:
    t = getattr(mask, field).clone()
    t.view(-1)[0] = value
    return BlockMask(**{**{f.name: getattr(mask, f.name) for f in mask.__dataclass_fields__.values()}, field: t})


@pytest.mark.parametrize("field,value,python_message,op_message", [
    ("kv_indices", 99, "index out of range", "kv_indices index 99"),
    ("kv_num_blocks", 77, "counts outside", "count 77"),
    ("kv_tile_ids", 5, "tile id out of range", "tile id 5"),
    ("full_kv_indices", -1, "index out of range", "full_kv_indices index -1"),
])
def test_hand_built_mask_out_of_range(field, value, python_message, op_message):
    """A wrong index in a hand-built mask is a clear error before any kernel reads with it: from the Python API
    (BlockMask.validate, any device) and from the op itself on the CPU (bypassing the Python validation)."""
    mask = masks.causal(64, block_q=16, block_kv=16)
    bad = _corrupt(mask, field, value)
    if field == "full_kv_indices":                      # make the corrupted entry a listed one
        bad.full_kv_num_blocks.view(-1)[0] = 1
    q, k, v = _inputs(1, 1, 1, 64, 64, 16, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match=python_message):
        block_sparse_attention(q, k, v, bad)
    with pytest.raises(RuntimeError, match=op_message):
        torch.ops.blockops.block_sparse_attention(*_op_args(q, k, v, bad))


def test_mask_edited_in_place_is_validated_again(monkeypatch):
    """A mask edited in place after its first use was never validated again: a duplicated full-block index gave a
    result off by 0.14 with no error. Its tensors' version counters now tell that it changed."""
    mask = masks.causal(64, block_q=16, block_kv=16)
    q, k, v = _inputs(1, 1, 1, 64, 64, 16, 16, torch.float32, "cpu")
    calls = []
    validate = BlockMask.validate
    monkeypatch.setattr(BlockMask, "validate", lambda self: calls.append(1) or validate(self))
    block_sparse_attention(q, k, v, mask)
    block_sparse_attention(q, k, v, mask)
    assert calls == [], "an unchanged mask from a constructor is not validated (no host sync per call)"
    assert mask.full_kv_num_blocks[0, 0, 3] == 3
    mask.full_kv_indices[0, 0, 3, 1] = 0                 # query block 3 now lists key block 0 twice
    with pytest.raises(ValueError, match="not strictly ascending"):
        block_sparse_attention(q, k, v, mask)
    assert calls == [1]
    mask.full_kv_indices[0, 0, 3, 1] = 1                 # repaired: validated once more, then trusted again
    block_sparse_attention(q, k, v, mask)
    block_sparse_attention(q, k, v, mask)
    assert calls == [1, 1]
    torch.testing.assert_close(block_sparse_attention(q, k, v, mask),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=2e-5, rtol=2e-5)


def test_mask_edited_through_a_view_is_validated_again():
    """Views share their base's version counter: an edit through a view (or of the base) is seen too."""
    mask = masks.causal(64, block_q=16, block_kv=16)
    q, k, v = _inputs(1, 1, 1, 64, 64, 16, 16, torch.float32, "cpu")
    block_sparse_attention(q, k, v, mask)
    mask.kv_num_blocks.view(-1)[2] = 9                   # a count beyond KB = 4
    with pytest.raises(ValueError, match="counts outside"):
        block_sparse_attention(q, k, v, mask)


def test_mask_built_in_inference_mode():
    """Inference tensors have no version counter: such masks are trusted once validated (the previous rule)."""
    with torch.inference_mode():
        mask = masks.causal(64, block_q=16, block_kv=16)
        q, k, v = _inputs(1, 1, 1, 64, 64, 16, 16, torch.float32, "cpu")
        out = block_sparse_attention(q, k, v, mask)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=2e-5, rtol=2e-5)
