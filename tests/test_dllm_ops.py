"""dllm ops (csrc/dllm.h): confidence-aware unmasking and the per-row KV slot overwrite against the PyTorch
references, awkward sizes, every dtype, ties, both rules, both CPU ISAs, opcheck, torch.compile and error paths."""
import sys

import pytest
import torch

from blockops.ops.dllm import kv_overwrite, kv_overwrite_range, unmask
from blockops.reference import (ref_dllm_candidates, ref_dllm_kv_overwrite, ref_dllm_select, ref_dllm_unmask)
from helpers import DEVICES, assert_compiles, kernel_ran, opcheck, run_with_cpu_isa

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_case(B, L, V, seed, device="cpu", dtype=torch.float32, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, L, V, generator=g) * scale).to(dtype)
    masked = torch.rand(B, L, generator=g) < 0.7
    lo = torch.randint(0, L, (B,), generator=g)
    hi = lo + torch.randint(1, L + 1, (B,), generator=g)      # hi may run past L: only l < L exist
    bounds = torch.stack([lo, hi], 1)
    return logits.to(device), masked.to(device), bounds.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,L,V", [(1, 1, 1), (3, 37, 1000), (2, 64, 4099), (5, 13, 32000)])
def test_unmask_statistics_match_reference(device, dtype, B, L, V):
    logits, masked, bounds = make_case(B, L, V, seed=B * L + V, device=device, dtype=dtype)
    with kernel_ran("dllm_unmask", device):
        r = unmask(logits, masked, bounds, threshold=0.5)
    tokens, _, conf = ref_dllm_unmask(logits, masked, bounds, 0.5)
    assert torch.equal(r.tokens, tokens)                      # exact: the argmax is a comparison of the same values
    torch.testing.assert_close(r.confidence, conf, rtol=2e-6, atol=1e-7)
    # the selection is exactly the rule applied to the kernel's own fp32 confidences
    cand = ref_dllm_candidates(masked, bounds)
    assert torch.equal(r.unmask, ref_dllm_select(r.confidence, cand, 0.5))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rule", [dict(threshold=0.9), dict(threshold=0.3), dict(threshold=-1.0), dict(factor=1.0),
                                  dict(factor=0.2), dict(factor=4.0)])
def test_unmask_rules_match_reference(device, rule):
    for seed in range(4):
        # peaked logits so that confidences spread over (0, 1) and several pass each rule
        logits, masked, bounds = make_case(4, 50, 300, seed=seed, device=device, scale=6.0)
        min_tokens = torch.tensor([0, 1, 3, 100], device=device)
        r = unmask(logits, masked, bounds, min_tokens=min_tokens, **rule)
        tokens, un, conf = ref_dllm_unmask(logits, masked, bounds, min_tokens=min_tokens, **rule)
        cand = ref_dllm_candidates(masked, bounds)
        assert torch.equal(r.unmask, ref_dllm_select(r.confidence, cand, min_tokens=min_tokens, **rule))
        # against the fp64 reference: equal unless a confidence sits within rounding of a decision boundary
        fragile = (conf - r.confidence).abs().max().item() > 1e-6
        if not fragile:
            assert torch.equal(r.unmask, un)
        assert torch.equal(r.tokens, tokens)
        # at least min(max(1, k), #candidates) per row, never a non-candidate
        need = torch.minimum(min_tokens.clamp_min(1), cand.sum(1))
        assert (r.unmask.sum(1) >= need).all() and not (r.unmask & ~cand).any()


def test_threshold_above_one_unmasks_exactly_one_per_row():
    logits, masked, bounds = make_case(6, 40, 100, seed=3, scale=50.0)   # confidences round to 1.0 in fp32
    r = unmask(logits, masked, bounds, threshold=1.0)
    cand = ref_dllm_candidates(masked, bounds)
    assert torch.equal(r.unmask.sum(1), (cand.sum(1) > 0).long())
    # the one chosen is the most confident, the first position among equals
    for b in range(6):
        if cand[b].any():
            conf = torch.where(cand[b], r.confidence[b], -1.0)
            assert r.unmask[b].nonzero()[0, 0] == int((conf == conf.max()).nonzero()[0, 0])


def test_factor_rule_is_a_prefix_of_the_ranking():
    conf = torch.tensor([[0.99, 0.95, 0.9, 0.7, 0.6, 0.97]])
    cand = torch.ones(1, 6, dtype=torch.bool)
    # sorted: .99 .97 .95 .9 .7 .6; (n+1)(1-c_n): .02 .09 .2 .5 1.8 2.8
    for f, expect in [(0.01, 1), (0.1, 2), (0.3, 3), (1.0, 4), (2.0, 5), (3.0, 6)]:
        assert ref_dllm_select(conf, cand, factor=f).sum().item() == expect
        logits = torch.log(torch.stack([conf[0], 1 - conf[0]], -1))[None]   # 2-token vocabulary with these probs
        assert unmask(logits, cand, factor=f).unmask.sum().item() == expect


def test_ties_first_index_and_equal_confidence_by_position():
    logits = torch.zeros(1, 4, 7)
    logits[0, :, 2] = logits[0, :, 5] = 3.0           # two equal maxima: torch.argmax takes index 2
    masked = torch.ones(1, 4, dtype=torch.bool)
    r = unmask(logits, masked, threshold=2.0)
    assert torch.equal(r.tokens, torch.full((1, 4), 2)) and torch.equal(r.tokens, logits.argmax(-1))
    assert r.unmask.tolist() == [[True, False, False, False]]   # equal confidences: the lowest position first
    # a tie spanning chunk boundaries of the CPU kernel (2048 logits per chunk)
    big = torch.zeros(1, 1, 5000)
    big[0, 0, [4097, 100, 2048]] = 1.0
    assert unmask(big, torch.ones(1, 1, dtype=torch.bool)).tokens.item() == 100


def test_minus_inf_logits():
    logits = torch.full((1, 3, 10), float("-inf"))
    logits[0, 0, 4] = 0.0                              # one finite logit: probability 1
    logits[0, 1, 3:5] = 1.0
    r = unmask(logits, torch.ones(1, 3, dtype=torch.bool), threshold=0.99)
    assert r.tokens.tolist() == [[4, 3, 0]]
    assert r.confidence[0, 0] == 1.0 and abs(r.confidence[0, 1].item() - 0.5) < 1e-7
    assert torch.isnan(r.confidence[0, 2])
    assert r.unmask.tolist() == [[True, False, False]]


def check_nan_logits_like_argmax_and_softmax(device="cpu"):
    """A NaN logit decides its row as torch.argmax / softmax do: tokens = the first NaN, confidence NaN (ranked
    last); +inf gives its first index and a NaN confidence (inf - inf). Positions chosen to fall in the first and
    later chunks of the CPU kernel (2048 logits), behind -inf chunks, and in every dtype."""
    V = 6000
    for dtype in DTYPES:
        x = (torch.randn(1, 8, V, generator=torch.Generator().manual_seed(3)) * 4).to(dtype)
        x[0, 0, 3000] = float("nan")                       # after the finite maximum's chunk
        x[0, 1, 7] = float("nan")                          # first chunk
        x[0, 1, 5000] = float("nan")                       # a second NaN: the first one wins
        x[0, 2, :] = float("nan")                          # only NaN
        x[0, 3, 100] = float("inf")
        x[0, 4, :4500] = float("-inf")
        x[0, 4, 4400] = float("nan")                       # NaN in a chunk with no finite logit
        x[0, 5, 2047] = float("nan")                       # last of a chunk, with +inf later
        x[0, 5, 4000] = float("inf")
        x[0, 6, 5999] = float("nan")                       # the very last logit (scalar tail)
        masked = torch.ones(1, 8, dtype=torch.bool)
        bounds = torch.tensor([[0, 8]])
        r = unmask(x.to(device), masked.to(device), bounds.to(device), min_tokens=torch.tensor([8], device=device))
        tok, _, conf = ref_dllm_unmask(x, masked, bounds, min_tokens=torch.tensor([8]))
        assert r.tokens.cpu().tolist() == tok.tolist(), dtype
        assert r.tokens[0, :7].cpu().tolist() == [3000, 7, 0, 100, 4400, 2047, 5999]
        torch.testing.assert_close(r.confidence.cpu(), conf, rtol=1e-5, atol=0, equal_nan=True)   # fp32 sums
        assert torch.isnan(r.confidence[0, :7]).all() and not torch.isnan(r.confidence[0, 7])


@pytest.mark.parametrize("device", DEVICES)
def test_nan_logits_like_argmax_and_softmax(device):
    with kernel_ran("dllm_unmask", device):
        check_nan_logits_like_argmax_and_softmax(device)


@pytest.mark.skipif(sys.platform != "linux", reason="ISA switch by environment")
def test_nan_logits_on_the_portable_path():
    run_with_cpu_isa("portable", "import sys; sys.path.insert(0, 'tests'); import test_dllm_ops as t; "
                     "t.check_nan_logits_like_argmax_and_softmax()")


def test_strided_logits_slice():
    logits, masked, bounds = make_case(3, 40, 257, seed=5)
    window = logits[:, 8:24]                          # strided in B, contiguous in V
    r = unmask(window, masked[:, 8:24].contiguous(), bounds.clamp(0, 16).contiguous(), threshold=0.4)
    e = unmask(window.contiguous(), masked[:, 8:24].contiguous(), bounds.clamp(0, 16).contiguous(), threshold=0.4)
    assert all(torch.equal(a, b) for a, b in zip(r, e))


@pytest.mark.skipif(sys.platform != "linux", reason="ISA switch by environment")
def test_portable_path_agrees():
    code = ("import torch; from blockops.ops.dllm import unmask; g = torch.Generator().manual_seed(1);"
            "x = torch.randn(2, 9, 7001, generator=g).half(); m = torch.ones(2, 9, dtype=torch.bool);"
            "r = unmask(x, m, threshold=0.01); print([r.tokens.tolist(), r.confidence.tolist()])")
    outs = []
    for isa in ("portable", ""):
        outs.append(run_with_cpu_isa(isa, code))
    tok_p, conf_p = eval(outs[0].stdout)
    tok_a, conf_a = eval(outs[1].stdout)
    assert tok_p == tok_a
    torch.testing.assert_close(torch.tensor(conf_p), torch.tensor(conf_a), rtol=2e-6, atol=0)


# ---- KV overwrite ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kv_overwrite_matches_reference(device, dtype):
    g = torch.Generator().manual_seed(0)
    B, H, S, D, n = 3, 5, 41, 72, 7
    cache = torch.randn(B, H, S, D, generator=g).to(dtype).to(device)
    new = torch.randn(B, n, H, D, generator=g).to(dtype).to(device).transpose(1, 2)   # strided like a model's k
    positions = torch.stack([torch.randperm(S, generator=g)[:n].sort().values for _ in range(B)]).to(device)
    expect = ref_dllm_kv_overwrite(cache, new, positions)
    with kernel_ran("dllm_kv_overwrite", device):
        kv_overwrite(cache, new, positions)
    assert torch.equal(cache, expect)
    start = torch.tensor([0, 17, S - n], device=device)
    expect = ref_dllm_kv_overwrite(cache, new, start[:, None] + torch.arange(n, device=device))
    kv_overwrite_range(cache, new, start)
    assert torch.equal(cache, expect)


def test_kv_overwrite_bounds_errors_and_unchecked_skip():
    cache, new = torch.zeros(2, 1, 8, 8), torch.ones(2, 1, 3, 8)
    with pytest.raises(RuntimeError, match=r"positions\[1, 2\] = 8 is outside the cache's slots \[0, 8\)"):
        kv_overwrite(cache, new, torch.tensor([[0, 1, 2], [5, 6, 8]]))
    with pytest.raises(RuntimeError, match=r"positions\[0, 0\] = -1 is outside"):
        kv_overwrite(cache, new, torch.tensor([[-1, 1, 2], [5, 6, 7]]))
    with pytest.raises(RuntimeError, match="strictly increasing"):
        kv_overwrite(cache, new, torch.tensor([[0, 2, 2], [5, 6, 7]]))
    assert cache.abs().sum() == 0                       # a refused call writes nothing
    kv_overwrite(cache, new, torch.tensor([[0, 1, 100], [-3, 6, 7]]), check_indices=False)
    assert cache.sum(-1)[:, 0].tolist() == [[8, 8, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 8, 8]]
    with pytest.raises(RuntimeError, match="do not fit a cache of 8 slots"):
        kv_overwrite(cache, torch.ones(2, 1, 9, 8), torch.zeros(2, 9, dtype=torch.long), check_indices=False)


def test_errors():
    logits, masked, bounds = make_case(2, 5, 11, seed=0)
    with pytest.raises(RuntimeError, match="logits must have dtype in"):
        unmask(logits.double(), masked, bounds)
    with pytest.raises(RuntimeError, match=r"masked must be \[2, 5\]"):
        unmask(logits, masked[:, :4].contiguous(), bounds)
    with pytest.raises(RuntimeError, match="masked must have dtype"):
        unmask(logits, masked.long(), bounds)
    with pytest.raises(RuntimeError, match=r"block_bounds must be \[2, 2\]"):
        unmask(logits, masked, bounds[:, :1].contiguous())
    with pytest.raises(RuntimeError, match="contiguous in the vocabulary dim"):
        unmask(logits.transpose(1, 2).contiguous().transpose(1, 2), masked, bounds)
    with pytest.raises(RuntimeError, match="factor must be positive"):
        unmask(logits, masked, bounds, factor=0.0)
    with pytest.raises(RuntimeError, match=r"min_tokens must be \[2\]"):
        unmask(logits, masked, bounds, min_tokens=torch.ones(3, dtype=torch.long))
    with pytest.raises(RuntimeError, match="new must have the cache's dtype"):
        kv_overwrite(torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 1, 8).half(), torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(RuntimeError, match=r"new must be \[1, 2, n, 8\]"):
        kv_overwrite(torch.zeros(1, 2, 4, 8), torch.zeros(1, 3, 1, 8), torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(RuntimeError, match="cache must be contiguous"):
        kv_overwrite(torch.zeros(1, 4, 2, 8).transpose(1, 2), torch.zeros(1, 2, 1, 8), torch.zeros(1, 1, dtype=torch.long))


def test_errors_before_computing():
    """issue 17: 1-D logits without block_bounds raised IndexError (tuple index out of range) from the default
    bounds' B, L before the op's checks; kv_overwrite_range read new.shape[2] before them."""
    logits, masked, bounds = make_case(2, 5, 11, seed=0)
    for bad in (logits[0, 0], logits[0], logits[None]):
        with pytest.raises(RuntimeError, match=rf"logits must be \[B, L, V\], got shape \({bad.shape[0]},"):
            unmask(bad, masked)
        with pytest.raises(RuntimeError, match=r"logits must be \[B, L, V\]"):
            unmask(bad, masked, bounds)
    with pytest.raises(RuntimeError, match=r"new must be \[B, H, n, D\], got shape \(8,\)"):
        kv_overwrite_range(torch.zeros(1, 2, 4, 8), torch.zeros(8), torch.zeros(1, dtype=torch.long))


def test_opcheck():
    logits, masked, bounds = make_case(3, 9, 70, seed=1)
    with kernel_ran("dllm_unmask", "cpu"):
        opcheck(torch.ops.blockops.dllm_unmask.default, (logits, masked, bounds, None, 0.5, None))
    opcheck(torch.ops.blockops.dllm_unmask.default,
            (logits.half(), masked, bounds, torch.tensor([1, 2, 0]), 0.5, 1.5))
    cache, new = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 4, 8)
    with kernel_ran("dllm_kv_overwrite", "cpu"):
        opcheck(torch.ops.blockops.dllm_kv_overwrite.default,
                (cache, new, torch.tensor([[0, 1, 2, 3], [3, 5, 7, 9]]), True))


def test_compile():
    logits, masked, bounds = make_case(3, 9, 70, seed=2)

    def step(logits, masked, bounds, x):                 # one decoding step, no host sync
        r = unmask(logits, masked, bounds, threshold=0.3)
        return torch.where(r.unmask, r.tokens, x), masked & ~r.unmask

    with kernel_ran("dllm_unmask", "cpu"):
        assert_compiles(step, logits, masked, bounds, torch.zeros(3, 9, dtype=torch.long))

    def write(cache, new, start):
        cache = cache.clone()
        kv_overwrite_range(cache, new, start)
        return cache

    with kernel_ran("dllm_kv_overwrite", "cpu"):
        assert_compiles(write, torch.randn(2, 3, 10, 8), torch.randn(2, 3, 4, 8), torch.tensor([1, 6]))
