"""blockops.distributed: ring attention on 2, 3 and 4 gloo ranks (spawned CPU processes, one thread each) against
single-device block_sparse_attention and the dense PyTorch reference, values and gradients of q, k, v; bytes and
tiles against the analytic figures; errors; BPT against the plain modules.

Every world size is spawned once (a module fixture) and runs all its checks; each check does its communication
before it asserts, so one failing check cannot leave a peer waiting. Every spawn has a deadline and every
collective a timeout: a failing or hanging rank fails the test, it never hangs CI.
"""
from __future__ import annotations

import functools
import traceback

import pytest
import torch
import torch.nn.functional as F

from blockops.attention import BlockMask, block_sparse_attention, masks
from blockops.distributed import (blockwise_cross_entropy, blockwise_feed_forward, causal_mask, last_call_stats,
                                  plan_stats, positions, ring_attention, shard, unshard)
from blockops.distributed._spawn import SpawnError, spawn
from blockops.reference import ref_masked_attention

WORLDS = (2, 3, 4)
BLOCK = 16
D = 16


def _length(world: int) -> int:
    return 128 * world          # fits every layout's rule at block 16 (striped: world * 128)


# ------------------------------------------------------------------------------------------------ rank helpers
def _inputs(t, dtype, b=1, h=2, hk=2, seed=0, dv=D):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, D, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(b, hk, t, D, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(b, hk, t, dv, generator=g, dtype=torch.float64).to(dtype)
    go = torch.randn(b, h, t, dv, generator=g, dtype=torch.float64).to(dtype)
    gl = torch.randn(b, h, t, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v, go, gl


def _ring(group, q, k, v, go, gl, mask, layout, causal=False, with_lse=True):
    """Run ring attention on this rank's shards; return the global out, lse, dq, dk, dv (unsharded)."""
    ql, kl, vl = (shard(x, group, layout, 2).requires_grad_() for x in (q, k, v))
    out, lse = ring_attention(ql, kl, vl, mask, causal=causal, group=group, layout=layout, return_lse=True)
    loss = (out * shard(go, group, layout, 2)).sum()
    if with_lse:
        gll = shard(gl, group, layout, 2).to(lse.dtype)
        loss = loss + torch.where(torch.isfinite(lse), lse * gll, torch.zeros_like(lse)).sum()
    loss.backward()
    return [unshard(x.detach(), group, layout, 2) for x in (out, lse, ql.grad, kl.grad, vl.grad)]


def _single(q, k, v, go, gl, mask, with_lse=True):
    """The same on one device with block_sparse_attention."""
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out, lse = block_sparse_attention(q, k, v, mask, return_lse=True)
    loss = (out * go).sum()
    if with_lse:
        loss = loss + torch.where(torch.isfinite(lse), lse * gl.to(lse.dtype), torch.zeros_like(lse)).sum()
    loss.backward()
    return [x.detach() for x in (out, lse, q.grad, k.grad, v.grad)]


def _dense(q, k, v, go, gl, mask, with_lse=True):
    """The dense PyTorch reference in fp64, autograd for the gradients."""
    q, k, v = (x.double().clone().requires_grad_() for x in (q, k, v))
    out, lse = ref_masked_attention(q, k, v, mask.to_dense())
    loss = (out * go.double()).sum()
    if with_lse:
        loss = loss + torch.where(torch.isfinite(lse), lse * gl.double(), torch.zeros_like(lse)).sum()
    loss.backward()
    return [x.detach() for x in (out, lse, q.grad, k.grad, v.grad)]


_NAMES = ("out", "lse", "dq", "dk", "dv")


def _compare(got, want, atol, rtol, what):
    for name, a, b in zip(_NAMES, got, want):
        a, b = a.double(), b.double()
        fin = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), fin), f"{what}: {name} finiteness differs"
        if name == "lse":
            assert torch.equal(a[~fin], b[~fin]), f"{what}: lse of rows without keys must be -inf"
        err = (a[fin] - b[fin]).abs().max().item() if fin.any() else 0.0
        bound = atol + rtol * b[fin].abs().max().item() if fin.any() else atol
        assert err <= bound, f"{what}: {name} max error {err:.3g} > {bound:.3g}"


def _check_mask(group, mask, t, layout, dtype=torch.float64, h=2, hk=2, b=1, tol=None):
    q, k, v, go, gl = _inputs(t, dtype, b=b, h=h, hk=hk)
    got = _ring(group, q, k, v, go, gl, mask, layout)
    single = _single(q, k, v, go, gl, mask)
    dense = _dense(q, k, v, go, gl, mask)
    atol, rtol = tol or ((1e-10, 1e-10) if dtype == torch.float64 else (2e-5, 2e-5))
    _compare(got, single, atol, rtol, f"{layout} vs single device")
    _compare(got, dense, atol, rtol if dtype == torch.float64 else 1e-4, f"{layout} vs dense reference")


def _random_mask(t, h, seed):
    g = torch.Generator().manual_seed(seed)
    dense = torch.rand(1, h, t, t, generator=g) < 0.15
    dense[:, :, : t // 2:t // 2 + 5] = False          # fully masked rows (0 / -inf, zero gradients)
    dense[:, 0, 3] = False
    blocks = torch.rand(1, h, t // BLOCK, t // BLOCK, generator=g) < 0.3   # some whole visible blocks
    dense |= blocks.repeat_interleave(BLOCK, 2).repeat_interleave(BLOCK, 3)
    return BlockMask.from_dense(dense, BLOCK, BLOCK)


# ------------------------------------------------------------------------------------------------------ checks
def check_causal_layouts(rank, world, group):
    t = _length(world)
    for layout in ("zigzag", "contiguous", "striped"):
        _check_mask(group, masks.causal(t, block_q=BLOCK, block_kv=BLOCK), t, layout)
    # causal=True (block-level mask) equals the builder's mask
    q, k, v, go, gl = _inputs(t, torch.float64)
    got = _ring(group, q, k, v, go, gl, None, "zigzag", causal=True)
    _compare(got, _single(q, k, v, go, gl, masks.causal(t, block_q=64, block_kv=64)), 1e-10, 1e-10, "causal=True")


def check_fp32(rank, world, group):
    t = _length(world)
    _check_mask(group, masks.causal(t, block_q=BLOCK, block_kv=BLOCK), t, "zigzag", dtype=torch.float32)
    _check_mask(group, masks.sink_window_strided(t, 16, 40, 4, block_q=BLOCK, block_kv=BLOCK), t, "contiguous",
                dtype=torch.float32)
    # bf16: each step's output is rounded to bf16 once before the fp32 merge; the error against the fp64 reference
    # stays within twice the single-device kernel's (flash-attention's rule), at every world size.
    mask = masks.causal(t, block_q=BLOCK, block_kv=BLOCK)
    q, k, v, go, gl = _inputs(t, torch.bfloat16, seed=11)
    got = _ring(group, q, k, v, go, gl, mask, "zigzag", with_lse=False)
    single = _single(q, k, v, go, gl, mask, with_lse=False)
    dense = _dense(q, k, v, go, gl, mask, with_lse=False)
    for name, a, b, r in zip(_NAMES, got, single, dense):
        ours, theirs = (a.double() - r).abs().max().item(), (b.double() - r).abs().max().item()
        assert ours <= 2 * theirs + 1e-2, f"bf16 {name}: error {ours:.3g} > 2 x single device's {theirs:.3g}"


def check_builders(rank, world, group):
    t = _length(world)
    kw = dict(block_q=BLOCK, block_kv=BLOCK)
    cases = {
        "sliding_window causal": masks.sliding_window(t, 40, **kw),
        "sliding_window bidirectional": masks.sliding_window(t, 24, causal=False, **kw),
        "sink_window_strided": masks.sink_window_strided(t, 16, 40, 4, **kw),
        "documents": masks.documents([t // 3, 7, t - t // 3 - 7], causal=True, **kw),
        "block_diffusion training": masks.block_diffusion(16, t // 2, training=True, **kw),
        "block_diffusion": masks.block_diffusion(24, t, **kw),
        "blockrank": masks.blockrank(20, [t // 4, t // 4 + 3], t - 20 - 2 * (t // 4) - 3, **kw),
        "causal 16x32 blocks": masks.causal(t, block_q=16, block_kv=32),
        "full (None)": None,
    }
    errors = []
    for name, mask in cases.items():
        layout = ("zigzag", "contiguous", "striped")[len(errors) % 3]
        try:
            if mask is None:
                q, k, v, go, gl = _inputs(t, torch.float64)
                got = _ring(group, q, k, v, go, gl, None, layout)
                full = BlockMask.from_blocks(torch.ones(t // 64, t // 64, dtype=torch.bool), t, t, 64, 64)
                _compare(got, _single(q, k, v, go, gl, full), 1e-10, 1e-10, name)
                _compare(got, _dense(q, k, v, go, gl, full), 1e-10, 1e-10, name)
            else:
                _check_mask(group, mask, t, layout)
        except AssertionError as e:
            errors.append(f"{name} ({layout}): {e}")
    assert not errors, "\n".join(errors)


def check_topk_random_gqa(rank, world, group):
    t = _length(world)
    q, k, v, go, gl = _inputs(t, torch.float64, h=4, hk=2, seed=3)
    topk = masks.topk_blocks(q, k, keep_ratio=0.3, block_size=BLOCK)          # per-head [B, H] mask
    _check_mask(group, topk, t, "zigzag", h=4, hk=2)
    _check_mask(group, _random_mask(t, 4, seed=5), t, "striped", h=4, hk=2)          # fully masked rows inside
    _check_mask(group, masks.causal(t, block_q=BLOCK, block_kv=BLOCK, batch=2), t, "contiguous", b=2, h=4, hk=1)


def check_determinism(rank, world, group):
    t = _length(world)
    mask = _random_mask(t, 2, seed=7)
    q, k, v, go, gl = _inputs(t, torch.float32, seed=9)
    a = _ring(group, q, k, v, go, gl, mask, "zigzag")
    b = _ring(group, q, k, v, go, gl, mask, "zigzag")
    for name, x, y in zip(_NAMES, a, b):
        assert torch.equal(x, y), f"{name} differs between two identical runs"


def _analytic_bytes(mask, world, rank, layout, b, hk, d, dv, elsize):
    """Bytes rank sends in the forward, from the dense mask: for each other rank, the key blocks of this rank's
    shard that any of that rank's queries sees."""
    dense = mask.to_dense().any(0).any(0)                                 # [T, T]
    t = mask.q_len
    mine = positions(t, world, rank, layout)
    total = 0
    for j in range(1, world):
        dst = positions(t, world, (rank + j) % world, layout)
        seen = dense[dst][:, mine].any(0).view(-1, mask.block_kv).any(1)   # per key block of my shard
        total += int(seen.sum()) * mask.block_kv * b * hk * (d + dv) * elsize
    return total


def check_bytes_and_balance(rank, world, group):
    import torch.distributed as dist
    t = 256 * world
    mask = masks.sink_window_strided(t, 16, 48, 8, block_q=BLOCK, block_kv=BLOCK)
    q, k, v, go, gl = _inputs(t, torch.float32, b=1, h=2, hk=1)
    for layout in ("contiguous", "zigzag"):
        ql, kl, vl = (shard(x, group, layout, 2).requires_grad_() for x in (q, k, v))
        out = ring_attention(ql, kl, vl, mask, group=group, layout=layout)
        fwd = last_call_stats()
        out.sum().backward()
        bwd = last_call_stats("backward")
        want = _analytic_bytes(mask, world, rank, layout, 1, 1, D, D, 4)
        assert fwd.bytes_sent == want, f"{layout}: forward sent {fwd.bytes_sent} bytes, analytic {want}"
        assert fwd.bytes_sent < fwd.dense_ring_bytes_sent
        # backward: the key/value blocks again, plus their fp32 dK/dV going back the other way
        sent = torch.tensor([fwd.bytes_sent, fwd.bytes_received, bwd.bytes_sent, bwd.bytes_received])
        all_sent = [torch.empty_like(sent) for _ in range(world)]
        dist.all_gather(all_sent, sent, group=group)
        s = torch.stack(all_sent)
        assert s[:, 0].sum() == s[:, 1].sum(), "forward bytes sent != received over the group"
        assert s[:, 2].sum() == s[:, 3].sum(), "backward bytes sent != received over the group"
        assert s[:, 2].sum() == 2 * s[:, 0].sum(), "backward moves the blocks and their fp32 grads (2x here)"
    # causal balance: tiles per rank, measured in a run and from the plan
    t = 128 * 2 * world
    cmask = causal_mask(t, BLOCK)
    q, k, v, _go, _gl = _inputs(t, torch.float32, b=1, h=1, hk=1)
    ring_attention(*(shard(x, group, "zigzag", 2) for x in (q, k, v)), cmask, group=group)
    tiles = torch.tensor([last_call_stats().tiles_computed])
    all_tiles = [torch.empty_like(tiles) for _ in range(world)]
    dist.all_gather(all_tiles, tiles, group=group)
    counts = torch.cat(all_tiles).double()
    assert counts.max() / counts.mean() <= 1.05, f"zigzag causal tiles per rank {counts.tolist()}"
    planned = [s["tiles"] for s in plan_stats(cmask, world, "zigzag")]
    assert planned == counts.long().tolist(), f"tiles run {counts.tolist()} != planned {planned}"
    contiguous = torch.tensor([s["tiles"] for s in plan_stats(cmask, world, "contiguous")], dtype=torch.float64)
    assert contiguous.max() / contiguous.mean() > 1.3, "contiguous causal should be unbalanced (sanity)"


def _expect_error(fn, match):
    try:
        fn()
    except ValueError as e:
        assert match in str(e), f"error {str(e)!r} does not mention {match!r}"
        return str(e)
    raise AssertionError(f"no ValueError (expected one mentioning {match!r})")


def check_errors(rank, world, group):
    t = _length(world)
    q, k, v, _go, _gl = _inputs(t, torch.float32)
    ql, kl, vl = (shard(x, group, "zigzag", 2) for x in (q, k, v))
    ring = functools.partial(ring_attention, group=group)
    # length not cut into whole blocks per chunk: T_local = 24 -> zigzag chunks of 12 positions
    short = [x[:, :, :24] for x in (ql, kl, vl)]
    _expect_error(lambda: ring(*short, causal=True), "2 * world * block")
    m24 = masks.causal(24 * world, block_q=BLOCK, block_kv=BLOCK)
    _expect_error(lambda: ring(*short, m24, layout="contiguous"), "world * block")
    # a mask on local positions
    local = masks.causal(t // world, block_q=BLOCK, block_kv=BLOCK)
    _expect_error(lambda: ring(ql, kl, vl, local), "GLOBAL")
    _expect_error(lambda: ring(ql, kl, vl, None, layout="diagonal"), "layout")
    _expect_error(lambda: ring(ql, kl, vl, local, causal=True), "block_mask")
    # shapes that differ across ranks: caught by every rank, no hang
    h_mine = ql if rank else ql[:, :1]
    _expect_error(lambda: ring(h_mine, kl[:, :1], vl[:, :1], causal=True), "ranks disagree")
    t_mine = [x[:, :, :32 if rank else 64] for x in (ql, kl, vl)]
    _expect_error(lambda: ring(*t_mine, causal=True), "T_local")
    other = masks.sliding_window(t, 40, block_q=BLOCK, block_kv=BLOCK) if rank == 0 else \
        masks.causal(t, block_q=BLOCK, block_kv=BLOCK)
    _expect_error(lambda: ring(ql, kl, vl, other), "ranks disagree")
    # shard / unshard round trip
    assert torch.equal(unshard(ql, group, "zigzag", 2), q)


def check_module(rank, world, group):
    """BlockSparseAttention(group=...) on shards equals the single-device module on the whole sequence, outputs and
    (summed over ranks) weight gradients."""
    import torch.distributed as dist
    from blockops.nn import BlockSparseAttention
    t = _length(world)
    builder = lambda q, kv, dev: masks.sliding_window(q, 40, block_q=BLOCK, block_kv=BLOCK, device=dev)  # noqa: E731
    torch.manual_seed(0)
    single = BlockSparseAttention(32, 2, num_kv_heads=1, mask=builder, dtype=torch.float64)
    cp = BlockSparseAttention(32, 2, num_kv_heads=1, mask=builder, dtype=torch.float64,
                              group=dist.group.WORLD if group is None else group, layout="striped")
    cp.load_state_dict(single.state_dict())
    x = torch.randn(2, t, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = single(x)
    y.square().sum().backward()
    y_local = cp(shard(x, group, "striped", 1))
    y_local.square().sum().backward()
    grads = [p.grad.clone() for p in cp.parameters()]
    for g in grads:
        dist.all_reduce(g, group=group)
    y_cp = unshard(y_local.detach(), group, "striped", 1)
    torch.testing.assert_close(y_cp, y.detach(), atol=1e-10, rtol=1e-10)
    for g, p in zip(grads, single.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-10, rtol=1e-10)
    assert "context parallel" in repr(cp)


CHECKS = {f.__name__: f for f in (check_causal_layouts, check_fp32, check_builders, check_topk_random_gqa,
                                  check_determinism, check_bytes_and_balance, check_errors, check_module)}
# Which checks run at which world size: everything at 2 and 3; the core set at 4 (the slowest, with 4 processes on
# a 2-core machine), keeping the file fast.
SUITES = {2: tuple(CHECKS), 3: tuple(CHECKS), 4: ("check_causal_layouts", "check_builders", "check_topk_random_gqa",
                                                  "check_bytes_and_balance", "check_errors", "check_module")}


def _suite(rank, world, suites):
    """One spawn of max(WORLDS) ranks runs every world size: sizes below it on the subgroup of the first ranks
    (``new_group``, exercising ``group=``), the largest on the default group (``group=None``)."""
    import torch.distributed as dist
    results = {}
    for w, names in suites.items():
        group = None if w == world else dist.new_group(list(range(w)))   # every rank takes part in new_group
        if rank >= w:
            continue
        for name in names:
            try:
                CHECKS[name](dist.get_rank(group), w, group)
                results[(w, name)] = None
            except Exception:
                results[(w, name)] = traceback.format_exc()
    return results


@pytest.fixture(scope="module")
def world_results():
    try:
        return spawn(_suite, max(WORLDS), SUITES, timeout=170)
    except SpawnError as e:
        return e


@pytest.mark.timeout(200)
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("check", tuple(CHECKS))
def test_ring_attention(world_results, world, check):
    if check not in SUITES[world]:
        pytest.skip(f"{check} runs at world sizes {[w for w in WORLDS if check in SUITES[w]]} only")
    if isinstance(world_results, Exception):
        raise world_results
    failures = [f"rank {r}:\n{res[(world, check)]}" for r, res in enumerate(world_results[:world])
                if res[(world, check)]]
    assert not failures, "\n".join(failures)


# -------------------------------------------------------------------------------------------- harness behaviour
def _rank0_raises(rank, world):
    q = torch.randn(1, 1, 64, D)
    if rank == 0:
        raise RuntimeError("rank 0 fails before the collective")
    ring_attention(q, q, q, causal=True)      # would wait for rank 0 forever without the harness


@pytest.mark.timeout(150)
def test_failing_rank_fails_fast():
    # Rank 1 blocks in ring_attention's first collective; the run must end with rank 0's error as soon as rank 0
    # exits, not by the deadline or the collective timeout (both far away), which would give another message.
    with pytest.raises(SpawnError, match="rank 0 fails before the collective"):
        spawn(_rank0_raises, 2, timeout=120, dist_timeout=120)


# ---------------------------------------------------------------------------------------------------- BPT (1 proc)
class _SwiGLU(torch.nn.Module):
    def __init__(self, e, f, dtype):
        super().__init__()
        self.w1 = torch.nn.Linear(e, 2 * f, bias=False, dtype=dtype)
        self.w2 = torch.nn.Linear(f, e, bias=False, dtype=dtype)

    def forward(self, x):
        a, b = self.w1(x).chunk(2, -1)
        return self.w2(F.silu(a) * b)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blockwise_feed_forward(dtype):
    torch.manual_seed(0)
    ffn = _SwiGLU(24, 40, dtype)
    x = torch.randn(2, 97, 24, dtype=dtype, requires_grad=True)
    ref = ffn(x)
    gy = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, [x, *ffn.parameters()], gy)
    out = blockwise_feed_forward(ffn, x, 16)
    grads = torch.autograd.grad(out, [x, *ffn.parameters()], gy)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=tol, rtol=tol)
    with torch.no_grad():
        torch.testing.assert_close(blockwise_feed_forward(ffn, x, 1000), ref, atol=tol, rtol=tol)
    with pytest.raises(ValueError, match="chunk_size"):
        blockwise_feed_forward(ffn, x, 0)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blockwise_cross_entropy(dtype):
    torch.manual_seed(0)
    h = torch.randn(3, 41, 32, dtype=dtype, requires_grad=True)
    w = torch.randn(203, 32, dtype=dtype, requires_grad=True)
    t = torch.randint(0, 203, (3, 41))
    t[0, :5] = -100
    ref = F.cross_entropy((h @ w.t()).reshape(-1, 203), t.reshape(-1))
    ref_grads = torch.autograd.grad(ref, [h, w])
    loss = blockwise_cross_entropy(h, w, t, 16)
    grads = torch.autograd.grad(loss * 1.0, [h, w])
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(loss, ref, atol=tol, rtol=tol)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=tol, rtol=tol)
    with pytest.raises(ValueError, match="targets must be in"):
        blockwise_cross_entropy(h, w, torch.full((3, 41), 203), 16)
    with pytest.raises(ValueError, match="share E"):
        blockwise_cross_entropy(h, w[:, :8], t, 16)


@pytest.mark.timeout(60)
def test_causal_mask_matches_builder():
    for t, block in ((128, 16), (192, 64)):
        assert torch.equal(causal_mask(t, block).to_dense(), masks.causal(t, block_q=block, block_kv=block).to_dense())
    with pytest.raises(ValueError, match="multiple of block"):
        causal_mask(100, 16)


@pytest.mark.timeout(60)
def test_world_size_one_in_process(tmp_path):
    """One rank (what a single GPU runs): the plain kernels, no message, same result as block_sparse_attention."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        mask = masks.sliding_window(64, 20, block_q=BLOCK, block_kv=BLOCK)
        q, k, v, go, gl = _inputs(64, torch.float64)
        got = _ring(None, q, k, v, go, gl, mask, "zigzag")
        stats = last_call_stats()
    finally:
        dist.destroy_process_group()
    _compare(got, _single(q, k, v, go, gl, mask), 1e-12, 1e-12, "world 1")
    assert stats.bytes_sent == stats.bytes_received == stats.dense_ring_bytes_sent == 0


@pytest.mark.timeout(120)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the NCCL path; bench/gpu_check.sh runs it)")
def test_world_size_one_nccl_cuda(tmp_path):
    """The CUDA path of ring_attention on one GPU: NCCL with CUDA tensors, the CUDA kernels, the same result as
    block_sparse_attention (what bench/gpu_check.sh can run on a single-GPU machine)."""
    import torch.distributed as dist
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        mask = masks.sliding_window(64, 20, block_q=BLOCK, block_kv=BLOCK, device="cuda")
        q, k, v, go, gl = (t.cuda() for t in _inputs(64, torch.float32))
        got = _ring(None, q, k, v, go, gl, mask, "zigzag")
    finally:
        dist.destroy_process_group()
    _compare(got, _single(q, k, v, go, gl, mask), 1e-5, 1e-5, "world 1, NCCL")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_plan_balance_and_blocks(world):
    """Without processes: zigzag balances causal tiles exactly, and the key blocks a plan moves are those the dense
    sink + window mask needs (block level), fewer than the dense ring's."""
    t = 2 * world * BLOCK * 4
    tiles = [s["tiles"] for s in plan_stats(causal_mask(t, BLOCK), world, "zigzag")]
    assert max(tiles) / (sum(tiles) / world) <= 1.05
    mask = masks.sink_window_strided(t, 16, 40, 5, block_q=BLOCK, block_kv=BLOCK)
    dense = mask.to_dense()[0, 0]
    for layout in ("contiguous", "zigzag"):
        stats = plan_stats(mask, world, layout)
        for r, s in enumerate(stats):
            mine = positions(t, world, r, layout)
            want = 0
            for src in range(world):
                if src != r:
                    theirs = positions(t, world, src, layout)
                    want += int(dense[mine][:, theirs].any(0).view(-1, BLOCK).any(1).sum())
            assert s["blocks_received"] == want, (layout, r)
        assert sum(s["blocks_received"] for s in stats) < sum(s["blocks_received_dense"] for s in stats)
    with pytest.raises(ValueError, match="2 \\* world \\* block"):
        plan_stats(causal_mask(t + BLOCK, BLOCK), world, "zigzag")
