"""Context-parallel benchmark (blockops.distributed): ring attention on several ranks against one process running
blockops at the same global shape, bytes sent per rank against the dense ring, causal load balance, peak memory per
rank; BPT's blockwise feed-forward and LM head + cross-entropy against the plain modules (time and memory).

How it runs: under ``torchrun --nproc-per-node=N -m blockops bench --family context_parallel`` (``WORLD_SIZE`` set)
the ranks of the launched group run the ring rows in place (NCCL on CUDA, gloo on CPU; rank 0 returns the rows);
otherwise (``python -m blockops bench``) 2 gloo ranks are spawned on the CPU, one thread each, and the one-process
baseline runs in this process on one thread too, so the comparison is 2 cores against 1.

Memory: "saved for backward" is what autograd keeps between forward and backward (every tensor saved for backward,
counted once per storage, through ``torch.autograd.graph.saved_tensors_hooks``): per rank for the ring rows (the
transient receive buffers of a step, at most two steps' key/value blocks, are not in it), against the one process.

Rows' errors: the ring output against the one-process blockops output on the same inputs (fp32: the max relative
error, tolerance 1e-5); BPT rows: the input gradient against the plain module's (max relative error, 1e-5).
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import time

import torch
import torch.nn.functional as F

from blockops.bench.harness import Result, forward_backward, max_rel_error, smoke_mode, time_ms

OPS: tuple[str, ...] = ()          # no op of its own: the rows run the attention family's kernels

WORLD = 2


@dataclasses.dataclass(frozen=True)
class RingConfig:
    pattern: str          # "causal" or "longgen" (sink + window + strided, as the attention bench)
    layout: str
    t: int                # global length
    heads: int = 4
    kv_heads: int = 4
    head_dim: int = 64
    block: int = 64


@dataclasses.dataclass(frozen=True)
class BPTConfig:
    what: str             # "ffn" or "lm_head"
    t: int
    dim: int
    hidden: int           # d_ff (ffn) or vocab (lm_head)
    chunk: int


QUICK_RING = [RingConfig("causal", "zigzag", 1024), RingConfig("longgen", "contiguous", 1024)]
FULL_RING = [RingConfig("causal", "zigzag", 8192), RingConfig("causal", "contiguous", 8192),
             RingConfig("longgen", "contiguous", 8192), RingConfig("causal", "zigzag", 16384)]
QUICK_BPT = [BPTConfig("ffn", 1024, 256, 1024, 256), BPTConfig("lm_head", 1024, 256, 8192, 256)]
FULL_BPT = [BPTConfig("ffn", 16384, 1024, 4096, 1024), BPTConfig("lm_head", 16384, 1024, 32000, 1024)]


def _mask(c: RingConfig):
    from blockops.attention import masks
    from blockops.distributed import causal_mask

    if c.pattern == "causal":
        return causal_mask(c.t, c.block)
    return masks.sink_window_strided(c.t, sink=c.block, window=c.t // 16, stride=6, block_q=c.block,
                                     block_kv=c.block)


def _inputs(c: RingConfig):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, c.heads, c.t, c.head_dim, generator=g)
    k = torch.randn(1, c.kv_heads, c.t, c.head_dim, generator=g)
    v = torch.randn(1, c.kv_heads, c.t, c.head_dim, generator=g)
    go = torch.randn(1, c.heads, c.t, c.head_dim, generator=g)
    return q, k, v, go


def _rank_rows(rank: int, world: int, configs, smoke: bool, group=None, device="cpu"):
    """Per config on this rank: median fwd+bwd ms (each repeat between barriers, so it is the slowest rank's),
    forward/backward stats, the local output, peak RSS growth."""
    import torch.distributed as dist
    from blockops.distributed import last_call_stats, ring_attention, shard

    out = []
    for c in configs:
        mask = _mask(c).to(device)
        q, k, v, go = (shard(x.to(device), group, c.layout, 2) for x in _inputs(c))
        q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
        saved = _saved_mb(lambda: ring_attention(q, k, v, mask, group=group, layout=c.layout))

        def step():
            for x in (q, k, v):
                x.grad = None
            ring_attention(q, k, v, mask, group=group, layout=c.layout).backward(go)

        repeats, warmup = (1, 0) if smoke else (3, 1)
        for _ in range(warmup):
            step()
        times = []
        for _ in range(repeats):
            dist.barrier(group)
            t0 = time.perf_counter()
            step()
            if device != "cpu":
                torch.cuda.synchronize()
            dist.barrier(group)
            times.append((time.perf_counter() - t0) * 1e3)
        fwd, bwd = last_call_stats("forward"), last_call_stats("backward")
        with torch.no_grad():
            local = ring_attention(q, k, v, mask, group=group, layout=c.layout).cpu()
        out.append({"ms": statistics.median(times), "fwd": dataclasses.asdict(fwd), "bwd": dataclasses.asdict(bwd),
                    "out": local, "saved_mb": saved})
    return out


def _spawned_rank(rank, world, configs, smoke):
    return _rank_rows(rank, world, configs, smoke)


def _saved_mb(fn) -> float:
    """MB of tensors autograd saves for backward while fn() runs (each storage once)."""
    seen = {}

    def pack(t):
        try:
            key = t.untyped_storage().data_ptr()
            seen[key] = t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values()) / 1e6


def _ring_rows(device: str, quick: bool) -> list[Result]:
    import torch.distributed as dist
    from blockops.attention import block_sparse_attention
    from blockops.distributed import plan_stats, positions
    from blockops.distributed._spawn import spawn

    configs = QUICK_RING if quick else FULL_RING
    smoke = smoke_mode()
    launched = dist.is_available() and dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) > 1
    if launched:                      # torchrun: this process is one rank of the group
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")
        world, rank = dist.get_world_size(), dist.get_rank()
        if torch.device(device).type == "cuda":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
            torch.cuda.set_device(device)
        per_rank = [_rank_rows(rank, world, configs, smoke, device=device)]
        gathered = [None] * world
        dist.all_gather_object(gathered, per_rank[0])
        if rank != 0:
            return []
        per_rank, where = gathered, device
    else:
        world, where = WORLD, "cpu"
        per_rank = spawn(_spawned_rank, world, configs, smoke, timeout=3600)
    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # the one-process baseline on one core, as each rank has
    try:
        for i, c in enumerate(configs):
            mask = _mask(c).to(where)
            q, k, v, go = (x.to(where) for x in _inputs(c))
            leaves = [x.requires_grad_() for x in (q, k, v)]
            single_ms = time_ms(forward_backward(lambda: block_sparse_attention(q, k, v, mask), leaves, go), where,
                                warmup=0 if smoke else 1, min_repeats=1 if smoke else 3, min_seconds=0.0)
            with torch.no_grad():
                ref = block_sparse_attention(q, k, v, mask).cpu()
            saved_single = _saved_mb(lambda: block_sparse_attention(q, k, v, mask))
            got = torch.empty_like(ref)
            for r in range(world):
                got[:, :, positions(c.t, world, r, c.layout)] = per_rank[r][i]["out"]
            ms = max(p[i]["ms"] for p in per_rank)
            sent = [p[i]["fwd"]["bytes_sent"] for p in per_rank]
            dense = per_rank[0][i]["fwd"]["dense_ring_bytes_sent"]
            tiles = [p[i]["fwd"]["tiles_computed"] for p in per_rank]
            balance = max(tiles) / (sum(tiles) / len(tiles))
            planned = plan_stats(mask.to("cpu"), world, c.layout)
            saved = max(p[i]["saved_mb"] for p in per_rank)
            bwd = [p[i]["bwd"]["bytes_sent"] for p in per_rank]
            bwd_dense = per_rank[0][i]["bwd"]["dense_ring_bytes_sent"]
            received = sum(p["blocks_received"] for p in planned)
            note = (f"fwd sent {sum(sent) / (world * dense):.3f} of the dense ring (mean over ranks; max rank "
                    f"{max(sent) / 1e6:.2f} of {dense / 1e6:.2f} MB); bwd {sum(bwd) / (world * bwd_dense):.3f}; "
                    f"remote key blocks used {received}/{sum(p['blocks_received_dense'] for p in planned)}; tiles "
                    f"max/mean {balance:.3f}; saved for backward/rank {saved:.1f} MB vs {saved_single:.1f} MB")
            shape = f"T={c.t} H={c.heads}/{c.kv_heads} D={c.head_dim} blk={c.block} {c.layout} x{world} ranks"
            rows.append(Result("context_parallel", f"ring_attention fwd+bwd {c.pattern}", shape, where, ms,
                               "1-process blockops (1 thread)", single_ms, max_error=max_rel_error(got, ref),
                               tolerance=1e-5, note=note))
    finally:
        torch.set_num_threads(threads)
    return rows


class _SwiGLU(torch.nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w13 = torch.nn.Linear(dim, 2 * hidden, bias=False)
        self.w2 = torch.nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        a, b = self.w13(x).chunk(2, -1)
        return self.w2(F.silu(a) * b)


def _bpt_rows(device: str, quick: bool) -> list[Result]:
    from blockops.distributed import blockwise_cross_entropy, blockwise_feed_forward

    rows = []
    timing = dict(warmup=1, min_repeats=3, min_seconds=0.0)
    for c in QUICK_BPT if quick else FULL_BPT:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, c.t, c.dim, generator=g).to(device).requires_grad_()
        if c.what == "ffn":
            torch.manual_seed(0)
            ffn = _SwiGLU(c.dim, c.hidden).to(device)
            grad = torch.randn(1, c.t, c.dim, generator=g).to(device)
            plain = lambda: ffn(x)                                               # noqa: E731
            ours = lambda: blockwise_feed_forward(ffn, x, c.chunk)               # noqa: E731
            op, baseline = f"blockwise_feed_forward chunk={c.chunk}", "plain SwiGLU"
        else:
            w = (torch.randn(c.hidden, c.dim, generator=g) * c.dim ** -0.5).to(device).requires_grad_()
            tgt = torch.randint(0, c.hidden, (1, c.t), generator=g).to(device)
            grad = torch.tensor(1.0, device=device)
            plain = lambda: F.cross_entropy((x @ w.t()).view(-1, c.hidden), tgt.view(-1))   # noqa: E731
            ours = lambda: blockwise_cross_entropy(x, w, tgt, c.chunk)                    # noqa: E731
            op, baseline = f"blockwise_cross_entropy chunk={c.chunk}", "plain LM head + F.cross_entropy"
        saved_plain, saved_ours = _saved_mb(plain), _saved_mb(ours)
        x.grad = None
        plain().backward(grad)
        ref = x.grad.clone()
        x.grad = None
        ours().backward(grad)
        err = max_rel_error(x.grad, ref)
        plain_ms = time_ms(forward_backward(plain, [x], grad), device, **timing)
        ours_ms = time_ms(forward_backward(ours, [x], grad), device, **timing)
        big = c.t * c.hidden * 4 / 1e6
        note = (f"saved for backward {saved_ours:.1f} MB vs {saved_plain:.1f} MB ({saved_ours / saved_plain:.3f}); "
                f"one full [T, {'d_ff' if c.what == 'ffn' else 'vocab'}] fp32 tensor = {big:.0f} MB")
        rows.append(Result("context_parallel", op, f"T={c.t} E={c.dim} {'F' if c.what == 'ffn' else 'V'}={c.hidden}",
                           device, ours_ms, baseline, plain_ms, max_error=err, tolerance=1e-5, note=note))
    return rows


def run(device: str, quick: bool = True) -> list[Result]:
    """Ring rows (spawned gloo ranks on the CPU unless launched by torchrun) and BPT rows on `device`."""
    rows = _ring_rows(device, quick)
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return rows
    return rows + _bpt_rows(device, quick)
