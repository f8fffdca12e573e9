"""Cached-block skipping (family "block_cache"): the kernels against the pure-PyTorch references, opcheck,
torch.compile and error paths; then the Python API (policies on small models), the BAC scheduler against brute
force, the Bubbling Union, CFG branches, the reset context and compiled skip decisions."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import blockops.block_cache as bc
from blockops.reference import ref_apply_residual, ref_cache_update, ref_relative_l1, ref_relative_l1_residual
from helpers import DEVICES, assert_compiles, kernel_ran, opcheck, run_with_cpu_isa

_ops = torch.ops.blockops
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# [B, T, ...]: single elements, channel counts below / around / above the 16-lane body, several chunks per sample
# (16384 elements per chunk), trailing dims folded into C.
SHAPES = [(1, 1), (1, 1, 1), (3, 37, 19), (2, 97, 40), (4, 5, 3, 7), (2, 1025, 72), (1, 300, 1152), (5, 2, 16)]


def _rand(shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device=device, dtype=dtype)


# ---- kernels ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_relative_l1_matches_reference(device, dtype, shape):
    a, b = _rand(shape, dtype, device, 0), _rand(shape, dtype, device, 1)
    for stride, per_sample in itertools.product((1, 2, 7), (False, True)):
        with kernel_ran("relative_l1", device):
            got = bc.relative_l1(a, b, stride, per_sample)
        want = ref_relative_l1(a, b, stride, per_sample)
        assert got.dtype == torch.float32 and got.shape == want.shape and got.device == a.device
        torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES[2:], ids=lambda s: "x".join(map(str, s)))
def test_relative_l1_residual_matches_reference(device, dtype, shape):
    out, x, ref = (_rand(shape, dtype, device, s) for s in (2, 3, 4))
    for stride, per_sample, compare in itertools.product((1, 3), (False, True), (False, True)):
        residual = torch.full_like(out, 123.0)
        with kernel_ran("relative_l1_residual", device):
            got = bc.relative_l1_residual(out, x, ref, residual, stride, per_sample, compare)
        want, want_residual = ref_relative_l1_residual(out, x, ref, stride, per_sample, compare)
        assert torch.equal(residual, want_residual), "the residual of every token (strided or not) is out - in"
        torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=0)


def test_indicator_edge_values():
    z = torch.zeros(2, 3, 4)
    one = torch.ones(2, 3, 4)
    assert bc.relative_l1(z, z).item() == 0.0
    assert bc.relative_l1(one, z).item() == float("inf")
    nan = one.clone()
    nan[1, 2, 3] = float("nan")
    assert torch.isnan(bc.relative_l1(nan, one, per_sample=True)[1]) and bc.relative_l1(nan, one, per_sample=True)[0] == 0
    assert bc.relative_l1(torch.zeros(0, 3, 4), torch.zeros(0, 3, 4), per_sample=True).shape == (0,)
    assert bc.relative_l1(torch.zeros(2, 0, 4), torch.zeros(2, 0, 4)).item() == 0.0
    # stride beyond the token count: only token 0 counts
    a, b = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    torch.testing.assert_close(bc.relative_l1(a, b, stride=100).double(), ref_relative_l1(a[:, :1], b[:, :1]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stride", [5, 6, 2**31, 2**32 + 1, 2**49, 2**50, 2**62, 2**63 - 1])
def test_indicator_huge_stride_matches_reference(device, stride):
    """issue 17: a stride >= T visits token 0 only. The chunk size (16384 / C) * stride overflowed int64 for huge
    strides: SIGFPE at 2**50, an indicator of 0 for different tensors at 2**49 / 2**63 - 1."""
    for shape in [(2, 5, 8), (3, 37, 19), (1, 6, 1)]:
        a, b, c = (_rand(shape, torch.float32, device, s) for s in (7, 8, 9))
        for per_sample in (False, True):
            with kernel_ran("relative_l1", device):
                got = bc.relative_l1(a, b, stride, per_sample)
            want = ref_relative_l1(a, b, stride, per_sample)
            assert (got != 0).all()
            torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=0)
            for compare in (False, True):
                residual = torch.full_like(a, 123.0)
                with kernel_ran("relative_l1_residual", device):
                    got = bc.relative_l1_residual(a, b, c, residual, stride, per_sample, compare)
                want, want_residual = ref_relative_l1_residual(a, b, c, stride, per_sample, compare)
                assert torch.equal(residual, want_residual), "every token's residual, whatever the stride"
                torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=0)


def test_indicator_deterministic_across_threads_and_runs():
    a, b = _rand((3, 2000, 72), torch.float32, "cpu", 5), _rand((3, 2000, 72), torch.float32, "cpu", 6)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = bc.relative_l1(a, b, per_sample=True)
        torch.set_num_threads(max(2, threads))
        many = [bc.relative_l1(a, b, per_sample=True) for _ in range(3)]
    finally:
        torch.set_num_threads(threads)
    for m in many:
        assert torch.equal(m, one)


def test_portable_kernels_bit_identical(tmp_path):
    """BLOCKOPS_CPU_ISA=portable runs the same lane structure on 8-float structs: bit-identical indicators and
    residuals to the AVX2 kernels."""
    tensors = {f"t{i}": _rand((2, 301, 37), dt, "cpu", i) for i, dt in enumerate(DTYPES * 3)}
    path = tmp_path / "in.pt"
    torch.save(tensors, path)

    def compute(t):
        out = {}
        for k, dt in enumerate(DTYPES):
            a, b, c = t[f"t{k}"], t[f"t{k + 3}"], t[f"t{k + 6}"]
            r = torch.empty_like(a)
            out[f"ind{k}"] = bc.relative_l1_residual(a, b, c, r, 2, True, True)
            out[f"res{k}"], out[f"add{k}"] = r, bc.apply_residual(a, b)
        return out

    code = ("import sys, torch, blockops, blockops.block_cache as bc\n"
            "assert blockops.build_info()['cpu_families']['block_cache'] == 'portable'\n"
            "t = torch.load(sys.argv[1])\nDT = [torch.float32, torch.float16, torch.bfloat16]\nout = {}\n"
            "for k in range(3):\n"
            "    a, b, c = t[f't{k}'], t[f't{k + 3}'], t[f't{k + 6}']\n    r = torch.empty_like(a)\n"
            "    out[f'ind{k}'] = bc.relative_l1_residual(a, b, c, r, 2, True, True)\n"
            "    out[f'res{k}'], out[f'add{k}'] = r, bc.apply_residual(a, b)\n"
            "torch.save(out, sys.argv[2])\n")
    run_with_cpu_isa("portable", code, str(path), str(tmp_path / "out.pt"))
    portable = torch.load(tmp_path / "out.pt")
    for k, v in compute(tensors).items():
        assert torch.equal(v, portable[k]), k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_residual(device, dtype):
    for shape in [(1, 1), (3, 37, 19), (2, 1025, 72), (1, 70000, 3)]:
        x, r = _rand(shape, dtype, device, 7), _rand(shape, dtype, device, 8)
        with kernel_ran("apply_residual", device):
            got = bc.apply_residual(x, r)
        assert torch.equal(got, ref_apply_residual(x, r))
    x = _rand((2, 5, 3), dtype, device, 9).requires_grad_()
    r = _rand((2, 5, 3), dtype, device, 10).requires_grad_()
    g = _rand((2, 5, 3), dtype, device, 11)
    bc.apply_residual(x, r).backward(g)
    assert torch.equal(x.grad, g) and torch.equal(r.grad, g)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cache_update(device, dtype):
    value = _rand((3, 333, 17), dtype, device, 12)
    for gate, copied in [(None, True), (torch.tensor(True), True), (torch.tensor(False), False),
                         (torch.tensor(1.0), True), (torch.tensor(0.0), False), (torch.tensor([0.5]), True)]:
        cache = torch.zeros_like(value)
        with kernel_ran("cache_update", device):
            bc.cache_update(cache, value, None if gate is None else gate.to(device))
        assert torch.equal(cache, value if copied else torch.zeros_like(value))
        assert torch.equal(cache, ref_cache_update(torch.zeros_like(value), value, gate))


def test_opcheck():
    a, b, c = (_rand((2, 37, 19), torch.float32, "cpu", s) for s in (0, 1, 2))
    with kernel_ran("relative_l1", "cpu"):
        opcheck(_ops.relative_l1, (a, b, 2, True))
        opcheck(_ops.relative_l1, (a.half(), b.half()))
    with kernel_ran("relative_l1_residual", "cpu"):
        opcheck(_ops.relative_l1_residual, (a, b, c, torch.empty_like(a), 3, False, True))
        opcheck(_ops.relative_l1_residual, (a.bfloat16(), b.bfloat16(), c.bfloat16(), torch.empty_like(a).bfloat16()))
    with kernel_ran("apply_residual", "cpu"):
        opcheck(_ops.apply_residual, (a, b))
        opcheck(_ops.apply_residual, (a.clone().requires_grad_(), b.clone().requires_grad_()))
    with kernel_ran("cache_update", "cpu"):
        opcheck(_ops.cache_update, (torch.zeros_like(a), b, torch.tensor(True)))
        opcheck(_ops.cache_update, (torch.zeros_like(a), b))


@pytest.mark.filterwarnings("ignore:Input #")
def test_apply_residual_fp64_gradcheck_and_opcheck():
    """apply_residual is the family's one op with a backward: fp64 on the CPU so that gradcheck and gradgradcheck
    (its backward passes the gradient through, itself differentiable) run at fp64 tolerances."""
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    with kernel_ran("apply_residual", "cpu"):
        assert torch.equal(bc.apply_residual(x, r), x + r)
    assert torch.autograd.gradcheck(bc.apply_residual, (x, r))
    assert torch.autograd.gradgradcheck(bc.apply_residual, (x, r))
    opcheck(_ops.apply_residual, (x, r))
    cache = torch.zeros(2, 5, 3, dtype=torch.float64)
    bc.cache_update(cache, x.detach())  # shares the layout check: a byte copy, fp64 too
    assert torch.equal(cache, x.detach())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp64_is_cpu_only_on_cuda():
    a = torch.randn(2, 5, 3, dtype=torch.float64, device="cuda")
    with pytest.raises(RuntimeError, match="input is float64 on cuda.*float64 is CPU-only"):
        bc.apply_residual(a, a)


def test_ops_compile_without_graph_break():
    """A whole skip decision built from the ops stays in one graph: indicator, threshold, gated update, blend."""
    def step(out, x, cached_out, residual, cache):
        ind = bc.relative_l1_residual(out, x, cached_out, residual, 1, True, False)
        skip = ind.max() < 0.5
        bc.cache_update(cache, out, ~skip)
        return torch.where(skip, bc.apply_residual(x, residual), out), ind

    args = [_rand((2, 37, 19), torch.float32, "cpu", s) for s in (0, 1, 2)]
    with kernel_ran("relative_l1_residual", "cpu"), kernel_ran("cache_update", "cpu"):
        eager_cache, compiled_cache = torch.zeros(2, 37, 19), torch.zeros(2, 37, 19)
        torch._dynamo.reset()
        eager = step(*args, torch.empty_like(args[0]), eager_cache)
        compiled = torch.compile(step, fullgraph=True)(*args, torch.empty_like(args[0]), compiled_cache)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e)
    assert torch.equal(eager_cache, compiled_cache)
    assert_compiles(lambda a, b: bc.relative_l1(a, b, 3), args[0], args[1])


def test_kernel_argument_errors():
    a = torch.randn(2, 5, 8)
    cases = [
        (lambda: bc.relative_l1(a, a.double()), "reference has dtype Double|reference must have dtype"),
        (lambda: bc.relative_l1(a.double(), a.double()), "current must have dtype in"),
        (lambda: bc.relative_l1(a, torch.randn(2, 5, 9)), r"reference has shape \[2, 5, 9\] but current has \[2, 5, 8\]"),
        (lambda: bc.relative_l1(a, a.transpose(1, 2).contiguous().transpose(1, 2)), "reference must be contiguous"),
        (lambda: bc.relative_l1(torch.randn(8), torch.randn(8)), "at least 2 dimension"),
        (lambda: bc.relative_l1(a, a, stride=0), "stride must be at least 1, got 0"),
        (lambda: bc.relative_l1_residual(a, a, a, torch.empty(2, 5, 8, dtype=torch.half)), "residual has dtype Half"),
        (lambda: bc.apply_residual(a, torch.randn(2, 5)), r"residual has shape \[2, 5\] but input has \[2, 5, 8\]"),
        (lambda: bc.apply_residual(a.half(), a), "residual has dtype Float but input has Half"),
        (lambda: bc.cache_update(torch.zeros(2, 5, 8), a, torch.tensor([True, False])), "gate must have exactly one"),
        (lambda: bc.cache_update(torch.zeros(2, 5, 8), a, torch.tensor(1)), "gate must be bool or floating"),
        (lambda: bc.cache_update(torch.zeros(2, 5, 8)[:, ::2], a[:, ::2]), "cache must be contiguous"),
    ]
    for fn, pattern in cases:
        with pytest.raises(RuntimeError, match=pattern):
            fn()


# ---- API: small models ------------------------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, d, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.lin = nn.Linear(d, d)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(d, d, generator=g) / d ** 0.5)
            self.lin.bias.copy_(torch.randn(d, generator=g) * 0.1)

    def forward(self, x, c):
        return x + torch.tanh(self.lin(x) + c[:, None])


class Model(nn.Module):
    def __init__(self, d=16, depth=4):
        super().__init__()
        self.embed = nn.Linear(d, d)
        self.blocks = nn.ModuleList(Block(d, s) for s in range(depth))

    def forward(self, x, t):
        c = torch.full((x.shape[0], x.shape[-1]), float(t), device=x.device) if not torch.is_tensor(t) else t
        for b in self.blocks:
            x = b(x, c)
        return x


def _sample(model, x, steps, per_step=None):
    """A toy sampler: x <- x - 0.1 * model(x, t) for t going 1 -> 0; per_step(step) is called after each step."""
    outs = []
    with torch.no_grad():
        for i in range(steps):
            t = torch.full((x.shape[0], x.shape[-1]), 1 - i / steps)
            y = model(x, t)
            outs.append(y)
            x = x - 0.1 * y
            if per_step:
                per_step(i)
    return x, outs


def _skipped_per_step(model, x, steps, num_steps=None):
    """Run a generation step by step: the blocks skipped at each step (from the counters)."""
    cache = bc.get_block_cache(model)
    history, last = [], [0] * cache.num_blocks

    def record(_):
        now = cache.counters()["skipped"]
        history.append([i for i in range(cache.num_blocks) if now[i] > last[i]])
        last[:] = now

    with bc.cache_context(model, num_steps=num_steps or steps):
        final, outs = _sample(model, x, steps, record)
    return history, final, outs


X = torch.randn(2, 12, 16, generator=torch.Generator().manual_seed(42))


@pytest.mark.parametrize("policy", [bc.Never(), bc.FirstBlockCache(0.0), bc.TeaCache(0.0), bc.BWCache(0.0)],
                         ids=lambda p: type(p).__name__)
def test_never_and_threshold_zero_equal_uncached(policy):
    model = Model()
    want, _ = _sample(model, X, 10)
    cache = bc.enable_block_cache(model, policy)
    history, got, _ = _skipped_per_step(model, X, 10)
    assert torch.equal(got, want)
    assert all(not h for h in history)
    assert cache.counters() == {"computed": [10] * 4, "skipped": [0] * 4}
    bc.disable_block_cache(model)
    again, _ = _sample(model, X, 10)
    assert torch.equal(again, want)


def test_always_reuses_after_warmup():
    model = Model()
    cache = bc.enable_block_cache(model, bc.Always(warmup_steps=2))
    history, _, outs = _skipped_per_step(model, X, 6)
    assert history == [[], [], [0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3]]
    assert cache.counters() == {"computed": [2] * 4, "skipped": [4] * 4}
    # Step >= 2: every block returns its input plus its residual from step 1.
    bc.disable_block_cache(model)
    x = X.clone()
    residuals = []
    with torch.no_grad():
        for i in range(2):
            t = torch.full((2, 16), 1 - i / 6)
            h, residuals = x, []
            for b in model.blocks:
                out = b(h, t)
                residuals.append(out - h)
                h = out
            x = x - 0.1 * h
        for i in range(2, 6):
            h = x
            for r in residuals:
                h = bc.apply_residual(h, r)
            assert torch.equal(outs[i], h)
            x = x - 0.1 * h


def test_first_block_cache():
    model = Model()
    cache = bc.enable_block_cache(model, bc.FirstBlockCache(threshold=1e9))
    history, _, outs = _skipped_per_step(model, X, 5)
    assert history == [[], [1, 2, 3], [1, 2, 3], [1, 2, 3], [1, 2, 3]]
    assert cache.counters() == {"computed": [5, 1, 1, 1], "skipped": [0, 4, 4, 4]}
    # A skipped step: block 0 runs, then the stack residual of step 0 (output - block 0's output) is added.
    bc.disable_block_cache(model)
    with torch.no_grad():
        t0 = torch.full((2, 16), 1.0)
        h0 = model.blocks[0](X, t0)
        stack = outs[0] - h0
        x1 = X - 0.1 * outs[0]
        t1 = torch.full((2, 16), 1 - 1 / 5)
        assert torch.equal(outs[1], bc.apply_residual(model.blocks[0](x1, t1), stack))


def test_first_block_cache_threshold_decides():
    """The decision follows the indicator: with the threshold between the measured changes of the block-0
    residual, exactly the steps below it are skipped."""
    model = Model()
    changes = []
    bc.enable_block_cache(model, bc.Never())
    with torch.no_grad():
        x = X.clone()
        prev = None
        for i in range(6):
            t = torch.full((2, 16), 1 - i / 6)
            r0 = model.blocks[0](x, t) - x
            if prev is not None:
                changes.append(float(bc.relative_l1(r0, prev)))
            prev = r0
            x = x - 0.1 * model(x, t)
    bc.disable_block_cache(model)
    threshold = sorted(changes)[len(changes) // 2]
    bc.enable_block_cache(model, bc.FirstBlockCache(threshold))
    history, _, _ = _skipped_per_step(model, X, 6)
    assert history[0] == [] and any(history) and not all(history[1:])


def test_teacache_accumulates_and_resets():
    """poly(x) = 0.4 (a constant): the accumulator reaches 0.4, 0.8, 1.2 -> compute and reset; the first and the
    last step always compute."""
    model = Model()
    cache = bc.enable_block_cache(model, bc.TeaCache(1.0, coefficients=[0.0, 0.4]))
    history, _, _ = _skipped_per_step(model, X, 9)
    all_blocks = [0, 1, 2, 3]
    assert history == [[], all_blocks, all_blocks, [], all_blocks, all_blocks, [], all_blocks, []]
    assert cache.counters()["skipped"] == [5] * 4


def test_teacache_calibration_and_fit():
    model = Model()
    calib = bc.TeaCacheCalibration()
    bc.enable_block_cache(model, calib)
    with bc.cache_context(model, num_steps=12):
        _sample(model, X, 12)
    assert len(calib.input_changes) == len(calib.output_changes) == 11
    coeffs = bc.fit_teacache_coefficients(calib.input_changes, calib.output_changes)
    assert len(coeffs) == 5
    x = torch.tensor(calib.input_changes, dtype=torch.float64)
    fitted = sum(c * x ** (4 - k) for k, c in enumerate(coeffs))
    resid = (fitted - torch.tensor(calib.output_changes, dtype=torch.float64)).abs().mean()
    assert resid <= (torch.tensor(calib.output_changes) - torch.tensor(calib.output_changes).mean()).abs().mean() + 1e-9
    with pytest.raises(ValueError, match="needs more than 4 points"):
        bc.fit_teacache_coefficients([0.1, 0.2], [0.1, 0.2])


def test_bwcache_schedule():
    """Threshold huge: the trigger fires at step 1 (the first step with an indicator). N = 20, R = 2: reuse in
    steps 2..10 (first half of the 18 steps after 1), recomputing every third step after the trigger."""
    model = Model()
    cache = bc.enable_block_cache(model, bc.BWCache(threshold=1e9, reuse_steps=2))
    history, _, _ = _skipped_per_step(model, X, 20)
    skipped_steps = [t for t, h in enumerate(history) if h]
    assert skipped_steps == [2, 3, 5, 6, 8, 9]
    assert all(h == [0, 1, 2, 3] for h in history if h)
    assert cache.counters()["skipped"] == [6] * 4


def test_bwcache_indicator_subset_and_default_reuse():
    model = Model()
    bc.enable_block_cache(model, bc.BWCache(threshold=1e9, indicator_blocks=2))
    history, _, _ = _skipped_per_step(model, X, 30)   # R = 3: reuse 3, recompute 1, in steps 2..15
    assert [t for t, h in enumerate(history) if h] == [2, 3, 4, 6, 7, 8, 10, 11, 12, 14, 15]


def test_bwcache_never_triggers_above_threshold():
    model = Model()
    bc.enable_block_cache(model, bc.BWCache(threshold=1e-12))
    history, _, _ = _skipped_per_step(model, X, 12)
    assert not any(history)


# ---- BAC ---------------------------------------------------------------------------------------------------------

def _random_sims(n, seed):
    g = torch.Generator().manual_seed(seed)
    f = torch.nn.functional.normalize(torch.randn(n, 6, generator=g).cumsum(0), dim=1)
    return f @ f.t()


def test_bac_dp_equals_brute_force():
    for seed, n in itertools.product(range(6), range(1, 8)):
        sim = _random_sims(n, seed)
        for m in range(0, n + 1):
            steps = bc.optimal_update_steps(sim, m)
            assert steps[0] == 0 and len(steps) == min(m, n - 1) + 1 and steps == sorted(set(steps))
            best = max((bc.schedule_value(sim, (0,) + c) for c in itertools.combinations(range(1, n), min(m, n - 1))),
                       default=bc.schedule_value(sim, (0,)))
            assert abs(bc.schedule_value(sim, steps) - best) < 1e-9, (seed, n, m)


def test_bac_dp_spreads_updates_where_similarity_drops():
    sim = torch.ones(8, 8)
    sim[:4, 4:] = 0.0  # features change completely at step 4
    assert bc.optimal_update_steps(sim, 1) == [0, 4]


def test_bubbling_union():
    nb, n = 4, 8
    sims = torch.stack([_random_sims(n, s) for s in range(nb)])
    sims[3] = sims[3] ** 9   # block 3 (an FFN) loses the most when cached
    fitted = bc.BACSchedule.fit(sims, 2, ffn_blocks=[1, 3], bubble=1)
    plain = bc.BACSchedule.fit(sims, 2, ffn_blocks=[1, 3], bubble=0)
    own = torch.zeros(nb, n, dtype=torch.bool)
    for b in range(nb):
        own[b, bc.optimal_update_steps(sims[b], 2)] = True
    assert torch.equal(plain.update, own)
    errors = {b: bc.caching_error(sims[b], own[b]) for b in (1, 3)}
    assert errors[3] > errors[1]
    for b in range(3):  # upstream of block 3: its update steps are added
        assert torch.equal(fitted.update[b], own[b] | own[3])
    assert torch.equal(fitted.update[3], own[3])
    both = bc.BACSchedule.fit(sims, 2, ffn_blocks=[1, 3], bubble=2)
    assert torch.equal(both.update[0], own[0] | own[3] | own[1])
    assert torch.equal(both.update[2], own[2] | own[3])


def test_bac_schedule_applied_per_block():
    model = Model()
    update = torch.ones(4, 6, dtype=torch.bool)
    update[1, 2:] = False
    update[3, [1, 3, 4]] = False
    cache = bc.enable_block_cache(model, bc.BACSchedule(update))
    history, _, _ = _skipped_per_step(model, X, 6)
    assert history == [[], [3], [1], [1, 3], [1, 3], [1]]
    assert cache.counters()["skipped"] == [0, 4, 0, 3]


def test_record_features_and_fit():
    model = Model()
    rec = bc.RecordFeatures()
    bc.enable_block_cache(model, rec)
    with bc.cache_context(model, num_steps=6):
        _sample(model, X, 6)
    sims = rec.similarities()
    assert sims.shape == (4, 6, 6)
    torch.testing.assert_close(sims.diagonal(dim1=1, dim2=2), torch.ones(4, 6, dtype=torch.float64))
    sched = bc.BACSchedule.fit(sims, 2)
    assert sched.update.sum(1).tolist() == [3] * 4


# ---- CFG branches, reset, compile ---------------------------------------------------------------------------------

def test_cfg_branches_kept_apart():
    """Two branches with different inputs, called alternately: with branch keys each branch reuses its own
    residuals (as if it ran alone); without them, the second branch would reuse the first one's."""
    model = Model()
    xa, xb = X, X.flip(1) * 3

    def run_alone(x):
        bc.enable_block_cache(model, bc.Always())
        with bc.cache_context(model):
            _, outs = _sample(model, x, 3)
        bc.disable_block_cache(model)
        return outs

    alone_a, alone_b = run_alone(xa), run_alone(xb)
    cache = bc.enable_block_cache(model, bc.Always())
    outs = {"a": [], "b": []}
    with bc.cache_context(model), torch.no_grad():
        x = {"a": xa, "b": xb}
        for i in range(3):
            t = torch.full((2, 16), 1 - i / 3)
            for key in ("a", "b"):
                with cache.branch(key):
                    y = model(x[key], t)
                outs[key].append(y)
                x[key] = x[key] - 0.1 * y
    for i in range(3):
        assert torch.equal(outs["a"][i], alone_a[i]) and torch.equal(outs["b"][i], alone_b[i])
    assert cache.counters()["computed"] == [2] * 4  # step 0 of each branch
    # The same calls without keys mix the branches (the test can fail).
    with bc.cache_context(model), torch.no_grad():
        model(xa, torch.ones(2, 16))
        mixed = model(xb, torch.ones(2, 16))
    assert not torch.equal(mixed, alone_b[0])


def test_batched_cfg_rows_use_their_own_residuals():
    """Both branches in one batch: residuals are per row; per_sample decides on the worst row."""
    model = Model()
    xb = torch.cat([X, X * 5])
    bc.enable_block_cache(model, bc.FirstBlockCache(0.5, per_sample=True))
    hist_joint, _, _ = _skipped_per_step(model, xb, 6)
    bc.disable_block_cache(model)
    bc.enable_block_cache(model, bc.FirstBlockCache(0.5))
    hist_batch, _, _ = _skipped_per_step(model, xb, 6)
    assert sum(map(len, hist_joint)) <= sum(map(len, hist_batch))


def test_cache_context_resets():
    model = Model()
    cache = bc.enable_block_cache(model, bc.Always())
    first, _, _ = _skipped_per_step(model, X, 3)
    second, _, outs = _skipped_per_step(model, X * 2, 3)
    assert first == second == [[], [0, 1, 2, 3], [0, 1, 2, 3]]
    assert cache.counters()["computed"] == [1] * 4
    bc.disable_block_cache(model)
    want, want_outs = _sample(model, X * 2, 1)
    assert torch.equal(outs[0], want_outs[0])  # step 0 of the second generation computed afresh
    assert "4 block calls computed, 8 skipped (skip ratio 66.7%)" in cache.summary()


@pytest.mark.parametrize("policy", [bc.Always(), bc.FirstBlockCache(0.3), bc.TeaCache(0.3),
                                    bc.BWCache(1e9, reuse_steps=1), bc.BACSchedule(torch.tensor([[1, 0, 1, 0]] * 4))],
                         ids=lambda p: type(p).__name__)
def test_compiled_cached_model_matches_eager_without_graph_breaks(policy):
    """fullgraph=True: the skip decisions are torch.cond on device tensors, cache writes gated cache_update."""
    model = Model()
    steps = 4

    def run(fn):
        cache = bc.enable_block_cache(model, policy)
        outs = []
        with bc.cache_context(model, num_steps=steps), torch.no_grad():
            x = X.clone()
            for i in range(steps):
                y = fn(x, torch.full((2, 16), 1 - i / steps))
                outs.append(y)
                x = x - 0.1 * y
        counters = cache.counters()
        bc.disable_block_cache(model)
        return outs, counters

    eager, eager_counts = run(model)
    torch._dynamo.reset()
    compiled_model = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled, compiled_counts = run(compiled_model)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)
    assert compiled_counts == eager_counts and sum(eager_counts["skipped"]) > 0


def test_compile_explain_reports_no_graph_break():
    model = Model()
    bc.enable_block_cache(model, bc.FirstBlockCache(0.3))
    with bc.cache_context(model, num_steps=3), torch.no_grad():
        model(X, torch.ones(2, 16))  # caches exist: the decision is on device from here on
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(model)(X, torch.ones(2, 16))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


# ---- errors -------------------------------------------------------------------------------------------------------

def test_api_errors():
    with pytest.raises(ValueError, match="has no nn.ModuleList of blocks"):
        bc.enable_block_cache(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), bc.Never())

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.ModuleList(nn.Linear(2, 2) for _ in range(2))
            self.dec = nn.ModuleList(nn.Linear(2, 2) for _ in range(2))

    with pytest.raises(ValueError, match=r"several block lists \['enc', 'dec'\]"):
        bc.enable_block_cache(Two(), bc.Never())
    two = Two()
    bc.enable_block_cache(two, bc.Never(), blocks_attr="dec")
    with pytest.raises(RuntimeError, match="already enabled"):
        bc.enable_block_cache(two, bc.Never(), blocks_attr="dec")
    bc.disable_block_cache(two)
    with pytest.raises(RuntimeError, match="no block cache is enabled"):
        bc.disable_block_cache(two)
    with pytest.raises(ValueError, match="has no attribute path 'nope'"):
        bc.enable_block_cache(two, bc.Never(), blocks_attr="nope")
    with pytest.raises(TypeError, match="policy must be a blockops.block_cache policy"):
        bc.enable_block_cache(two, "fast", blocks_attr="dec")
    with pytest.raises(ValueError, match="needs at least two blocks"):
        bc.enable_block_cache(nn.ModuleList([Block(4, 0)]), bc.FirstBlockCache(0.1))
    with pytest.raises(ValueError, match="schedule has 4 blocks, the block list 2"):
        bc.enable_block_cache(two, bc.BACSchedule(torch.ones(4, 3)), blocks_attr="dec")
    with pytest.raises(ValueError, match="every block must be updated at step 0"):
        bc.BACSchedule(torch.zeros(2, 3))

    model = Model()
    bc.enable_block_cache(model, bc.BWCache())
    with pytest.raises(ValueError, match="BWCache needs the sampler's step count"):
        model(X, 1.0)
    bc.disable_block_cache(model)

    class TupleBlock(nn.Module):
        def forward(self, x):
            return x, x

    lst = nn.ModuleList([TupleBlock(), TupleBlock()])
    bc.enable_block_cache(lst, bc.Never())
    with pytest.raises(TypeError, match=r"block 0's outputs all match \['x', 'x'\] by shape; pass outputs="):
        lst[0](torch.ones(2, 3))
    bc.disable_block_cache(lst)

    class StrBlock(nn.Module):
        def forward(self, x):
            return "x"

    lst = nn.ModuleList([StrBlock(), StrBlock()])
    bc.enable_block_cache(lst, bc.Never())
    with pytest.raises(TypeError, match="block 0 returned str; a cached block must return a tensor or a tuple"):
        lst[0](torch.ones(2, 3))
    bc.disable_block_cache(lst)
    for bad in (dict(warmup_steps=-1), dict(max_consecutive=-2), dict(forecast_order=3)):
        with pytest.raises(ValueError, match="must be"):
            bc.FirstBlockCache(0.1, **bad)
    with pytest.raises(ValueError, match="interval must be >= 1"):
        bc.TaylorSeer(interval=0)

    model = Model()
    bc.enable_block_cache(model, bc.BACSchedule(torch.ones(4, 2, dtype=torch.bool)))
    with pytest.raises(ValueError, match="past the schedule's 2 steps"):
        for _ in range(3):
            model(X, 1.0)


# ---- several streams, per-step statistics, warm-up and caps, forecasting ----------------------------------------------

class DualBlock(nn.Module):
    """A dual-stream block (Flux / SD3 style): joint over [text; image], returns (encoder_hidden_states,
    hidden_states)."""

    def __init__(self, d, seed):
        super().__init__()
        self.inner = Block(d, seed)

    def forward(self, hidden_states, encoder_hidden_states, temb):
        n = encoder_hidden_states.shape[1]
        joint = self.inner(torch.cat([encoder_hidden_states, hidden_states], 1), temb)
        return joint[:, :n], joint[:, n:]


class DualModel(nn.Module):
    def __init__(self, d=16, depth=4, positional=False):
        super().__init__()
        self.blocks = nn.ModuleList(DualBlock(d, s) for s in range(depth))
        self.positional = positional

    def forward(self, x, t):
        enc, hid = x[:, :5], x[:, 5:]
        for b in self.blocks:
            if self.positional:   # as diffusers' gradient-checkpointing path calls them
                enc, hid = b(hid, enc, t)
            else:
                enc, hid = b(hidden_states=hid, encoder_hidden_states=enc, temb=t)
        return torch.cat([enc, hid], 1)


@pytest.mark.parametrize("positional", [False, True])
def test_dual_stream_blocks_cache_each_stream(positional):
    """Always(warmup 1): from step 1 on every dual-stream block returns each stream plus that stream's own
    residual from step 0 (learnt layout: the tuple's elements matched to the inputs by shape)."""
    model = DualModel(positional=positional)
    cache = bc.enable_block_cache(model, bc.Always(warmup_steps=1))
    history, _, outs = _skipped_per_step(model, X, 3)
    assert history == [[], [0, 1, 2, 3], [0, 1, 2, 3]]
    assert cache.layouts[0].outputs == ("encoder_hidden_states", "hidden_states")
    bc.disable_block_cache(model)
    with torch.no_grad():
        t0 = torch.full((2, 16), 1.0)
        enc, hid = X[:, :5], X[:, 5:]
        res = []
        for b in model.blocks:
            e2, h2 = b(hid, enc, t0)
            res.append((e2 - enc, h2 - hid))
            enc, hid = e2, h2
        x1 = X - 0.1 * outs[0]
        enc, hid = x1[:, :5].contiguous(), x1[:, 5:].contiguous()
        for re, rh in res:
            enc, hid = bc.apply_residual(enc, re), bc.apply_residual(hid, rh)
        assert torch.equal(outs[1], torch.cat([enc, hid], 1))


def test_dual_stream_first_block_cache_and_never():
    model = DualModel()
    want, _ = _sample(model, X, 5)
    bc.enable_block_cache(model, bc.Never())
    _, got, _ = _skipped_per_step(model, X, 5)
    assert torch.equal(got, want)
    bc.disable_block_cache(model)
    cache = bc.enable_block_cache(model, bc.FirstBlockCache(1e9), outputs=("encoder_hidden_states", "hidden_states"))
    history, _, outs = _skipped_per_step(model, X, 3)
    assert history == [[], [1, 2, 3], [1, 2, 3]]
    bc.disable_block_cache(model)
    with torch.no_grad():   # step 1: block 0 runs, then each stream gets its run residual of step 0
        t0, t1 = torch.full((2, 16), 1.0), torch.full((2, 16), 1 - 1 / 3)
        e0, h0 = model.blocks[0](X[:, 5:], X[:, :5], t0)
        run_e, run_h = outs[0][:, :5] - e0, outs[0][:, 5:] - h0
        x1 = X - 0.1 * outs[0]
        e1, h1 = model.blocks[0](x1[:, 5:], x1[:, :5], t1)
        e1, h1 = e1.contiguous(), h1.contiguous()
        assert torch.equal(outs[1], torch.cat([bc.apply_residual(e1, run_e), bc.apply_residual(h1, run_h)], 1))
    assert cache.counters()["skipped"] == [0, 2, 2, 2]


def test_dual_stream_compiles_without_graph_breaks():
    """fullgraph=True on dual-stream blocks: torch.cond over both streams (returned in another order than they
    are passed) gives the eager decisions and outputs."""
    model = DualModel()

    def run(fn):
        cache = bc.enable_block_cache(model, bc.FirstBlockCache(0.3))
        outs = []
        with bc.cache_context(model, num_steps=5), torch.no_grad():
            x = X.clone()
            for i in range(5):
                outs.append(fn(x, torch.full((2, 16), 1 - i / 5)))
                x = x - 0.1 * outs[-1]
        counts = cache.counters()
        bc.disable_block_cache(model)
        return outs, counts

    eager, eager_counts = run(model)
    torch._dynamo.reset()
    compiled, compiled_counts = run(torch.compile(model, fullgraph=True, backend="aot_eager"))
    assert compiled_counts == eager_counts and sum(eager_counts["skipped"]) > 0
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)


def test_dual_stream_none_output_stays_none():
    """SD3's last block drops the text stream (returns (None, hidden)): skipped, it still returns None there."""

    class Last(DualBlock):
        def forward(self, hidden_states, encoder_hidden_states, temb):
            _, h = super().forward(hidden_states, encoder_hidden_states, temb)
            return None, h

    blocks = nn.ModuleList([DualBlock(16, 0), Last(16, 1)])
    bc.enable_block_cache(blocks, bc.Always(), outputs=("encoder_hidden_states", "hidden_states"))
    with bc.cache_context(blocks), torch.no_grad():
        for _ in range(2):
            enc, hid = blocks[0](X[:, 5:], X[:, :5], torch.ones(2, 16))
            enc2, hid2 = blocks[1](hid, enc, torch.ones(2, 16))
            assert enc2 is None and hid2.shape == (2, 7, 16)
    assert bc.get_block_cache(blocks).counters()["skipped"] == [1, 1]


def test_ambiguous_tuple_needs_outputs():
    blocks = nn.ModuleList([DualBlock(16, 0), DualBlock(16, 1)])
    bc.enable_block_cache(blocks, bc.Never())
    with pytest.raises(TypeError, match="matches 2 of its tensor inputs .* pass|name what each element continues"):
        blocks[0](X[:, :6], X[:, 6:], torch.ones(2, 16))   # 6 tokens each: shapes do not tell the streams apart
    bc.disable_block_cache(blocks)


def _block0_residual_changes(model, steps):
    """The relative L1 change of block 0's residual between consecutive steps of an uncached run."""
    changes, prev = [], None
    with torch.no_grad():
        x = X.clone()
        for i in range(steps):
            t = torch.full((2, 16), 1 - i / steps)
            r0 = model.blocks[0](x, t) - x
            changes.append(None if prev is None else float(bc.relative_l1(r0, prev)))
            prev = r0
            x = x - 0.1 * model(x, t)
    return changes


def test_step_stats_record_decisions_and_indicators():
    """Never skips, so FirstBlockCache(0.0) compares each step's block-0 residual with the previous step's: the
    recorded indicators are exactly the uncached run's changes; a threshold between them decides as recorded."""
    model = Model()
    changes = _block0_residual_changes(model, 6)
    cache = bc.enable_block_cache(model, bc.FirstBlockCache(0.0))
    _skipped_per_step(model, X, 6)
    stats = cache.stats()
    assert [r["step"] for r in stats] == list(range(6)) and not any(r["cached"] for r in stats)
    assert stats[0]["indicator"] is None
    assert [r["indicator"] for r in stats[1:]] == changes[1:]
    bc.disable_block_cache(model)
    threshold = sorted(changes[1:])[2]
    cache = bc.enable_block_cache(model, bc.FirstBlockCache(threshold))
    history, _, _ = _skipped_per_step(model, X, 6)
    stats = cache.stats()
    assert [r["skipped_blocks"] for r in stats] == history
    for r in stats[1:]:
        assert r["cached"] == (r["indicator"] < threshold)
    assert cache.cached_steps() == [r["step"] for r in stats if r["cached"]]
    assert f"cached steps: {cache.cached_steps()}" in cache.summary()


@pytest.mark.parametrize("limits, want", [
    (dict(), [1, 2, 3, 4, 5, 6, 7, 8]),
    (dict(warmup_steps=2), [2, 3, 4, 5, 6, 7, 8]),
    (dict(warmup_steps=2, max_consecutive=2), [2, 3, 5, 6, 8]),
    (dict(max_consecutive=1), [1, 3, 5, 7]),
    (dict(warmup_steps=2, max_consecutive=2, max_cached=3), [2, 3, 5]),
    (dict(max_consecutive=0), []),
])
def test_warmup_and_caps(limits, want):
    model = Model()
    cache = bc.enable_block_cache(model, bc.FirstBlockCache(1e9, **limits))
    _skipped_per_step(model, X, 9)
    assert cache.cached_steps() == want
    bc.disable_block_cache(model)
    cache = bc.enable_block_cache(model, bc.TeaCache(1e9, **limits))
    _skipped_per_step(model, X, 10, num_steps=100)   # last step far away: only the limits decide
    assert cache.cached_steps()[:len(want)] == want


def test_limits_compile_with_device_counters():
    """The limit counters are device tensors: compiled (fullgraph) decisions equal eager ones."""
    model = Model()
    policy = bc.FirstBlockCache(1e9, warmup_steps=1, max_consecutive=2)

    def run(fn):
        cache = bc.enable_block_cache(model, policy)
        with bc.cache_context(model, num_steps=6), torch.no_grad():
            x = X.clone()
            for i in range(6):
                x = x - 0.1 * fn(x, torch.full((2, 16), 1 - i / 6))
        counts = cache.counters()
        bc.disable_block_cache(model)
        return x, counts

    eager, eager_counts = run(model)
    torch._dynamo.reset()
    compiled, compiled_counts = run(torch.compile(model, fullgraph=True, backend="aot_eager"))
    assert compiled_counts == eager_counts == {"computed": [6, 2, 2, 2], "skipped": [0, 4, 4, 4]}   # 1, 2, 4, 5
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


class LinearBlock(nn.Module):
    """Residual independent of x: ``w * c`` (c = the timestep row), so the stack residual is a known function of t."""

    def __init__(self, d, seed):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, generator=torch.Generator().manual_seed(seed)))

    def forward(self, x, c):
        return x + self.w * c[:, None] ** self.power

    power = 1


def _stack_residual(model, t):
    return sum(b.w * t ** b.power for b in model.blocks)


@pytest.mark.parametrize("order", [1, 2])
def test_taylorseer_forecast_is_the_divided_difference_formula(order):
    """Computed steps 0, 1, 4, 7 (warm-up 2, interval 3); at a skipped step t the stack residual is
    sum_k f_k (t - c)^k / k! with f_0 = R_c, f_{j+1} = (f_j(c) - f_j(c')) / (c - c'), computed here in fp64 from
    the true residuals of the computed steps. A quadratic residual makes the second-order term matter."""
    model = Model()
    model.blocks = nn.ModuleList(LinearBlock(16, s) for s in range(4))
    for b in model.blocks:
        b.power = 2
    steps = 9
    cache = bc.enable_block_cache(model, bc.TaylorSeer(interval=3, order=order, warmup_steps=2))
    _, _, outs = _skipped_per_step(model, X, steps)
    stats = cache.stats()
    assert [r["step"] for r in stats if not r["cached"]] == [0, 1, 4, 7]
    assert all(r["forecast"] == r["cached"] for r in stats)
    tval = [1 - i / steps for i in range(steps)]
    true = {i: _stack_residual(model, torch.tensor(tval[i], dtype=torch.float64)).detach().double() for i in range(steps)}
    factors, last = None, None
    x = X.double()
    for i in range(steps):
        if not stats[i]["cached"]:
            new = [true[i]]
            if factors is not None:
                for j in range(min(order, len(factors))):
                    new.append((new[j] - factors[j]) / (i - last))
            factors, last = new, i
            want = x + true[i]
        else:
            d = i - last
            want = x + sum(f * d ** k / math.factorial(k) for k, f in enumerate(factors))
        torch.testing.assert_close(outs[i].double(), want, rtol=0, atol=2e-5)
        x = x - 0.1 * outs[i].double()


def test_taylorseer_order1_exact_on_a_linear_residual():
    """A stack residual linear in the step (whatever the spacing of the computed steps): once two steps are
    computed the first-order forecast is the true residual, so the cached generation equals the uncached one up
    to rounding; plain reuse (Always) is far off."""
    model = Model()
    model.blocks = nn.ModuleList(LinearBlock(16, s) for s in range(4))
    want, _ = _sample(model, X, 10)
    cache = bc.enable_block_cache(model, bc.TaylorSeer(interval=3, order=1, warmup_steps=2))
    _, got, _ = _skipped_per_step(model, X, 10)
    assert cache.cached_steps() == [2, 3, 5, 6, 8, 9]   # computed 0, 1, 4, 7
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    bc.disable_block_cache(model)
    bc.enable_block_cache(model, bc.Always())
    _, reused, _ = _skipped_per_step(model, X, 10)
    assert (reused - want).abs().max() > 100 * (got - want).abs().max()


def test_first_block_cache_forecast_order():
    """FirstBlockCache(forecast_order=1) forecasts the run residual on skipped steps (eager only)."""
    model = Model()
    cache = bc.enable_block_cache(model, bc.FirstBlockCache(1e9, forecast_order=1, max_consecutive=1))
    _skipped_per_step(model, X, 6)
    stats = cache.stats()
    assert [r["forecast"] for r in stats] == [False, False, False, True, False, True]   # two computed steps first
    bc.disable_block_cache(model)
    bc.enable_block_cache(model, bc.FirstBlockCache(1e9, forecast_order=1))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch._dynamo.reset()
    with bc.cache_context(model, num_steps=3), torch.no_grad():
        model(X, torch.ones(2, 16))
        with pytest.raises(Exception, match="forecast_order > 0 runs in eager mode only"):
            compiled(X, torch.ones(2, 16))
