"""Context-parallel block-sparse attention over ``torch.distributed``: `ring_attention` and its byte accounting.

Schedule (world ``W``, this rank ``r``; docs/context-parallel.md has the pictures)::

    step 0        r attends its own keys                                           (no communication)
    step j >= 1   r sends to r + j the key/value blocks of its shard that r + j's queries can see,
                  receives from r - j the blocks of r - j's shard that r's queries can see,
                  attends them                                                     (mod W)

Every (query shard, key shard) pair meets exactly once in ``W`` steps, directly, not forwarded through a ring: a
rank receives only blocks it uses, and nothing when a pair has no visible tile. Which blocks a pair needs is a
function of the GLOBAL BlockMask, which every rank holds, so message sizes need no handshake. Step j + 1's
send/recv is posted before step j's kernel runs (on gloo: isend/irecv, which never wait for each other; on NCCL:
one ``batch_isend_irecv`` per step).

Each step runs the blockops kernel on (the local query blocks) x (the received key blocks) with the sub-mask of the
global mask for that pair: rows = the local query blocks' rows of the global block structure, columns = the received
key blocks' columns, bit tiles shared with the global mask. No token-level mask is ever built: a plan costs
O(QB * KB) block-level tensor work (QB, KB: global block counts), done once per (mask, world, rank, layout) and
cached on the mask.

Partial (out, lse) pairs are merged by log-sum-exp in fp32 (fp64 for fp64 inputs) in step order. The backward runs
the blockops backward kernel per step with the MERGED out / lse (so each step's dq, dk, dv are the exact
contributions of its tiles), sums dq in fp32, and returns each step's dk / dv (fp32) to the rank owning those keys,
which adds them in step order: the result is bitwise the same run to run.
"""
from __future__ import annotations

import dataclasses

import torch

from blockops.attention.block_mask import BlockMask, _cdiv, _pack_rows
from blockops.attention.sparse_attention import _ensure_valid
from blockops.distributed import layout as _layout
from blockops.ops._common import _default_scale
from blockops.ops.attention import MASK_FIELDS

__all__ = ["RingStats", "causal_mask", "full_mask", "last_call_stats", "plan_stats", "ring_attention"]

_ops = torch.ops.blockops


# --------------------------------------------------------------------------------------------------------- stats
@dataclasses.dataclass
class RingStats:
    """What one call (forward or backward) of :func:`ring_attention` did on this rank.

    Attributes:
        phase: ``"forward"`` or ``"backward"``.
        world, rank: of the group.
        bytes_sent, bytes_received: payload bytes of the point-to-point messages (forward: key/value blocks;
            backward: key/value blocks again plus the fp32 dK/dV of the received blocks going back).
        messages_sent: number of non-empty sends.
        tiles_computed: (query block, key block) tiles the kernels visited, counted per (batch, head) of the
            inputs (full plus partial tiles of every step's sub-mask).
        dense_ring_bytes_sent: what a dense ring (every rank receiving every other shard's keys and values) sends
            in the same phase, for comparison.
        steps_with_compute: steps whose pair had at least one visible tile.
    """
    phase: str
    world: int
    rank: int
    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    tiles_computed: int = 0
    dense_ring_bytes_sent: int = 0
    steps_with_compute: int = 0


_LAST: dict[str, RingStats] = {}


def last_call_stats(phase: str = "forward") -> RingStats | None:
    """The :class:`RingStats` of this process's latest :func:`ring_attention` forward (``phase="forward"``) or
    backward (``"backward"``); None before the first. Per process, i.e. per rank."""
    if phase not in ("forward", "backward"):
        raise ValueError(f"last_call_stats: phase must be 'forward' or 'backward', got {phase!r}")
    return _LAST.get(phase)


# --------------------------------------------------------------------------------------------------------- masks
def _check_square_block(block: int, what: str) -> None:
    if block not in (16, 32, 64, 128):
        raise ValueError(f"{what}: block must be one of (16, 32, 64, 128), got {block!r}")


def causal_mask(total: int, block: int = 64, device=None) -> BlockMask:
    """The causal mask (``kv <= q``) for ``total`` positions built at block level (strictly lower blocks full, the
    diagonal one shared bit tile): O((total / block)^2) work, no token-level mask, so it scales to long contexts.
    ``total`` must be a multiple of ``block``. Equal to ``masks.causal(total, block_q=block, block_kv=block)``."""
    _check_square_block(block, "causal_mask")
    if total < 1 or total % block:
        raise ValueError(f"causal_mask: total={total} must be a positive multiple of block={block}")
    device = torch.device("cpu") if device is None else torch.device(device)
    n = total // block
    ones = torch.ones(n, n, dtype=torch.bool, device=device)
    full = torch.tril(ones, -1)[None, None]
    partial = torch.eye(n, dtype=torch.bool, device=device)[None, None]
    tile = _pack_rows(torch.tril(torch.ones(block, block, dtype=torch.bool, device=device))[None])
    return BlockMask._assemble(partial, full, torch.zeros(1, 1, n, n, dtype=torch.int32, device=device), tile,
                               total, total, block, block)


def full_mask(total: int, block: int = 64, device=None) -> BlockMask:
    """Every pair visible (no mask), at block level."""
    _check_square_block(block, "full_mask")
    n = _cdiv(total, block)
    return BlockMask.from_blocks(torch.ones(n, n, dtype=torch.bool, device=device), total, total, block, block)


# ---------------------------------------------------------------------------------------------------------- plan
@dataclasses.dataclass
class _Step:
    """Step j of rank r: the pair (queries of r, keys of src = r - j) and what r sends to dst = r + j."""
    src: int
    dst: int
    recv_blocks: torch.Tensor            # int64 local key-block indices of src's shard that r receives (CPU)
    send_blocks: torch.Tensor            # int64 local key-block indices of r's shard that dst needs (CPU)
    send_tokens: torch.Tensor | None     # int64 token indices of send_blocks, on the mask's device
    mask: BlockMask | None               # sub-mask (r's query blocks x recv_blocks of src); None: nothing visible
    mask_tensors: list | None
    tiles: int                           # tiles of the sub-mask, summed over the mask's [B', H']


@dataclasses.dataclass
class _Plan:
    world: int
    rank: int
    layout: str
    steps: list


def _needed(vis_any: torch.Tensor, q_ids: torch.Tensor, k_ids: torch.Tensor) -> torch.Tensor:
    """Local key-block indices (ascending) of the key shard ``k_ids`` that some query block of ``q_ids`` sees."""
    return vis_any[q_ids][:, k_ids].any(0).nonzero().flatten().cpu()


def _build_plan(mask: BlockMask, world: int, rank: int, layout: str) -> _Plan:
    total, bq, bkv = mask.q_len, mask.block_q, mask.block_kv
    full, tob = mask._block_classes()                                   # [B', H', QB, KB] block level
    vis_any = (full | (tob >= 0)).flatten(0, 1).any(0)                  # [QB, KB]: visible for some (b, h)
    dev = mask.device
    q_ids = {a: _layout.block_ids(total, world, a, layout, bq).to(dev) for a in range(world)}
    k_ids = {b: _layout.block_ids(total, world, b, layout, bkv).to(dev) for b in range(world)}
    steps = []
    for j in range(world):
        src, dst = (rank - j) % world, (rank + j) % world
        if j == 0:        # own keys: every local block (the kernel skips the empty tiles), no gather, no message
            recv = torch.arange(k_ids[rank].numel())
            send = torch.zeros(0, dtype=torch.int64)
        else:
            recv = _needed(vis_any, q_ids[rank], k_ids[src])
            send = _needed(vis_any, q_ids[dst], k_ids[rank])
        send_tokens = None
        if send.numel():
            send_tokens = (send.to(dev)[:, None] * bkv + torch.arange(bkv, device=dev)).flatten()
        sub, tensors, tiles = None, None, 0
        if recv.numel():
            cols = k_ids[src][recv.to(dev)]
            f = full[:, :, q_ids[rank]][:, :, :, cols]
            t = tob[:, :, q_ids[rank]][:, :, :, cols]
            tiles = int((f | (t >= 0)).sum())
            if tiles:
                sub = BlockMask._assemble(t >= 0, f, t.clamp_min(0), mask.tiles, q_ids[rank].numel() * bq,
                                          recv.numel() * bkv, bq, bkv)
                tensors = [getattr(sub, n) for n in MASK_FIELDS]
            elif j:
                recv = torch.zeros(0, dtype=torch.int64)
        steps.append(_Step(src, dst, recv, send, send_tokens, sub, tensors, tiles))
    return _Plan(world, rank, layout, steps)


def _fingerprint(mask: BlockMask) -> list[int]:
    """Cheap ints identifying the mask's block structure (compared across ranks); cached like the plans (one host
    sync per mask, not per call)."""
    key = mask._versions()
    cached = getattr(mask, "_ring_fingerprint", None)
    if cached is not None and key is not None and cached[0] == key:
        return cached[1]
    fp = [int(mask.kv_num_blocks.sum()), int(mask.full_kv_num_blocks.sum()), int(mask.kv_indices.sum()),
          int(mask.full_kv_indices.sum())]
    object.__setattr__(mask, "_ring_fingerprint", (key, fp))
    return fp


def _plan_for(mask: BlockMask, world: int, rank: int, layout: str) -> _Plan:
    """The cached plan (kept on the mask, keyed by its tensors' version counters like its validity)."""
    cache = getattr(mask, "_ring_plans", None)
    if cache is None:
        cache = {}
        object.__setattr__(mask, "_ring_plans", cache)
    key = (world, rank, layout, mask._versions())
    plan = cache.get(key) if key[-1] is not None else None
    if plan is None:
        plan = _build_plan(mask, world, rank, layout)
        if key[-1] is not None:
            cache[key] = plan
    return plan


def plan_stats(mask: BlockMask, world: int, layout: str = "zigzag") -> list[dict]:
    """Per rank, without running anything: ``tiles`` (summed over the mask's [B', H']), ``blocks_received``
    (key blocks received over all steps) and ``blocks_received_dense`` (what a dense ring receives). For load
    balance and communication figures (bench, docs)."""
    block = max(mask.block_q, mask.block_kv)
    _layout.check_length(mask.q_len, world, layout, block, "plan_stats")
    out = []
    for r in range(world):
        p = _build_plan(mask, world, r, layout)
        local = mask.q_len // world // mask.block_kv
        out.append({"rank": r, "tiles": sum(s.tiles for s in p.steps),
                    "blocks_received": sum(s.recv_blocks.numel() for s in p.steps[1:]),
                    "blocks_received_dense": (world - 1) * local})
    return out


# ------------------------------------------------------------------------------------------------ communication
class _Comm:
    """Point-to-point exchanges on `group`: one message each way per exchange. NCCL gets one batch_isend_irecv;
    other backends (gloo) ordered isend then irecv, both non-blocking, so no pair of ranks waits on each other
    (batch_isend_irecv can hang on gloo, pytorch PR #152938). Tags keep the kinds of message apart."""

    def __init__(self, group, stats: RingStats):
        import torch.distributed as dist
        self.dist, self.group, self.stats = dist, group, stats
        self.nccl = dist.get_backend(group) == "nccl"

    def exchange(self, send: torch.Tensor | None, dst: int, recv: torch.Tensor | None, src: int, tag: int):
        dist, works = self.dist, []
        if send is not None:
            self.stats.bytes_sent += send.numel() * send.element_size()
            self.stats.messages_sent += 1
        if recv is not None:
            self.stats.bytes_received += recv.numel() * recv.element_size()
        if self.nccl:
            ops = []
            if send is not None:
                ops.append(dist.P2POp(dist.isend, send, group=self.group, tag=tag, group_peer=dst))
            if recv is not None:
                ops.append(dist.P2POp(dist.irecv, recv, group=self.group, tag=tag, group_peer=src))
            return dist.batch_isend_irecv(ops) if ops else []
        if send is not None:
            works.append(dist.isend(send, group=self.group, tag=tag, group_dst=dst))
        if recv is not None:
            works.append(dist.irecv(recv, group=self.group, tag=tag, group_src=src))
        return works


def _wait(works) -> None:
    for w in works:
        w.wait()


def _gather_blocks(x: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
    return x if tokens is None else x.index_select(2, tokens)


def _pack(*xs: torch.Tensor) -> torch.Tensor:
    return torch.cat([x.reshape(-1) for x in xs])


def _unpack(buf: torch.Tensor, *shapes) -> list[torch.Tensor]:
    out, o = [], 0
    for s in shapes:
        n = 1
        for d in s:
            n *= d
        out.append(buf[o:o + n].view(s))
        o += n
    return out


class _KVExchange:
    """Posts step j's key/value exchange: send my blocks that dst needs, receive src's blocks that I need."""

    def __init__(self, comm: _Comm, plan: _Plan, k: torch.Tensor, v: torch.Tensor, kind: int):
        self.comm, self.plan, self.k, self.v, self.kind = comm, plan, k, v, kind

    def shapes(self, nblocks: int, bkv: int):
        b, hk, _, d = self.k.shape
        return (b, hk, nblocks * bkv, d), (b, hk, nblocks * bkv, self.v.shape[3])

    def post(self, j: int, bkv: int):
        st = self.plan.steps[j]
        send = None
        if st.send_blocks.numel():
            send = _pack(_gather_blocks(self.k, st.send_tokens), _gather_blocks(self.v, st.send_tokens))
        recv = None
        if st.recv_blocks.numel():
            ks, vs = self.shapes(st.recv_blocks.numel(), bkv)
            recv = self.k.new_empty(ks[0] * ks[1] * ks[2] * ks[3] + vs[0] * vs[1] * vs[2] * vs[3])
        works = self.comm.exchange(send, st.dst, recv, st.src, tag=4 * j + self.kind)
        return works, recv, send

    def take(self, j: int, posted, bkv: int):
        works, recv, _send = posted
        _wait(works)
        st = self.plan.steps[j]
        if recv is None:
            return None, None
        return _unpack(recv, *self.shapes(st.recv_blocks.numel(), bkv))

    def steps(self, world: int, bkv: int):
        """Yields (j, plan step, visiting k, visiting v) for j = 0 .. world - 1 (my own k, v at j = 0), posting step
        j + 1's exchange as soon as step j's has landed, before the caller computes step j."""
        posted = self.post(1, bkv) if world > 1 else None
        for j in range(world):
            if j == 0:
                kj, vj = self.k, self.v
            else:
                kj, vj = self.take(j, posted, bkv)
                posted = self.post(j + 1, bkv) if j + 1 < world else None   # next exchange before compute
            yield j, self.plan.steps[j], kj, vj


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _merge(acc_out, acc_lse, out, lse):
    """In place: (acc_out, acc_lse) <- log-sum-exp merge with a step's (out, lse) in the accumulators' dtype. Rows
    where both are -inf (nothing visible yet) stay 0 / -inf instead of 0 * NaN."""
    out, lse = out.to(acc_out.dtype), lse.to(acc_lse.dtype)
    new = torch.logaddexp(acc_lse, lse)
    empty = new == float("-inf")
    safe = torch.where(empty, torch.zeros_like(new), new)
    w_old = torch.exp(acc_lse - safe).unsqueeze(-1)
    w_new = torch.exp(lse - safe).unsqueeze(-1)
    acc_out.mul_(w_old).add_(out * w_new)
    acc_lse.copy_(new)


# -------------------------------------------------------------------------------------------------- autograd
class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, group, scale, block_q, block_kv):
        world, rank = plan.world, plan.rank
        stats = RingStats("forward", world, rank)
        stats.dense_ring_bytes_sent = (world - 1) * (k.numel() * k.element_size() + v.numel() * v.element_size())
        comm = _Comm(group, stats)
        kvx = _KVExchange(comm, plan, k, v, kind=0)
        acc = _acc_dtype(q.dtype)
        b, h, tl, _ = q.shape
        acc_out = torch.zeros(b, h, tl, v.shape[3], dtype=acc, device=q.device)
        acc_lse = torch.full((b, h, tl), float("-inf"), dtype=acc, device=q.device)
        for j, st, kj, vj in kvx.steps(world, block_kv):
            if st.mask is None:
                continue
            o, l = _ops.block_sparse_attention(q, kj, vj, *st.mask_tensors, block_q, block_kv, scale)
            _merge(acc_out, acc_lse, o, l)
            mb, mh = st.mask.kv_num_blocks.shape[:2]
            stats.tiles_computed += st.tiles * (b // mb) * (h // mh)
            stats.steps_with_compute += 1
        out = acc_out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, acc_lse)
        ctx.plan, ctx.group, ctx.scale, ctx.blocks = plan, group, scale, (block_q, block_kv)
        _LAST["forward"] = stats
        return out, acc_lse

    @staticmethod
    @torch.autograd.function.once_differentiable      # the backward is kernels and messages: no double backward
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        plan, group, scale = ctx.plan, ctx.group, ctx.scale
        block_q, block_kv = ctx.blocks
        world, rank = plan.world, plan.rank
        stats = RingStats("backward", world, rank)
        kv_bytes = k.numel() * k.element_size() + v.numel() * v.element_size()
        stats.dense_ring_bytes_sent = (world - 1) * (kv_bytes + (k.numel() + v.numel()) * 4)
        comm = _Comm(group, stats)
        kvx = _KVExchange(comm, plan, k, v, kind=1)
        acc = _acc_dtype(q.dtype)
        grad_out = torch.zeros_like(out) if grad_out is None else grad_out.contiguous()
        if grad_lse is not None:
            grad_lse = grad_lse.to(lse.dtype).contiguous()
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        b, hk, _, d = k.shape
        dv_dim = v.shape[3]
        pending_grads = []          # (j, works, recv buffer) of posted dK/dV exchanges, added in step order

        def add_grads(j, works, recv):
            _wait(works)
            if recv is None:
                return
            # what rank + j computed for my blocks plan.steps[j].send_blocks
            st = plan.steps[j]
            n = st.send_blocks.numel() * block_kv
            gk, gv = _unpack(recv, (b, hk, n, d), (b, hk, n, dv_dim))
            dk.index_add_(2, st.send_tokens, gk)
            dv.index_add_(2, st.send_tokens, gv)

        for j, st, kj, vj in kvx.steps(world, block_kv):
            gk = gv = None
            if st.mask is not None:
                gq, gk, gv = _ops.block_sparse_attention_backward(grad_out, q, kj, vj, out, lse, grad_lse,
                                                                  *st.mask_tensors, block_q, block_kv, scale)
                dq.add_(gq)
                mb, mh = st.mask.kv_num_blocks.shape[:2]
                stats.tiles_computed += st.tiles * (q.shape[0] // mb) * (q.shape[1] // mh)
                stats.steps_with_compute += 1
            if j == 0:
                if gk is not None:
                    dk.add_(gk)
                    dv.add_(gv)
                continue
            # dK/dV of src's blocks go back to src; mine computed by dst come from dst.
            send = None
            if st.recv_blocks.numel():
                if gk is None:       # received blocks but no visible tile cannot happen (plan drops them)
                    raise AssertionError("ring_attention: received key blocks without a visible tile")
                send = _pack(gk.to(acc), gv.to(acc))
            recv = None
            if st.send_blocks.numel():
                n = st.send_blocks.numel() * block_kv
                recv = torch.empty(b * hk * n * (d + dv_dim), dtype=acc, device=k.device)
            works = comm.exchange(send, st.src, recv, st.dst, tag=4 * j + 2)
            pending_grads.append((j, works, recv, send))
            if len(pending_grads) > 1:          # bound memory: one grad exchange in flight besides this one
                pj, pw, pr, _ps = pending_grads.pop(0)
                add_grads(pj, pw, pr)
        for pj, pw, pr, _ps in pending_grads:
            add_grads(pj, pw, pr)
        _LAST["backward"] = stats
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


# ------------------------------------------------------------------------------------------------------ public
_DTYPE_IDS = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}


def _check_across_ranks(sig: list[int], names: list[str], group, device) -> None:
    """One small all_gather: every rank compares every rank's shapes and mask fingerprint, so a mismatch is a
    ValueError on all ranks instead of a hang or a wrong message size."""
    import torch.distributed as dist
    world = dist.get_world_size(group)
    mine = torch.tensor(sig, dtype=torch.int64, device=device)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    rows = torch.stack(parts).cpu().tolist()
    for r, row in enumerate(rows):
        if row != rows[0]:
            diff = [f"{n}: rank 0 has {a}, rank {r} has {c}" for n, a, c in zip(names, rows[0], row) if a != c]
            raise ValueError("ring_attention: ranks disagree on " + "; ".join(diff))


def _default_block(total: int, world: int, layout: str) -> int:
    for block in (64, 32, 16):
        if total % _layout.length_rule(layout, world, block) == 0:
            return block
    _layout.check_length(total, world, layout, 16, "ring_attention")   # raises, naming the rule
    raise AssertionError


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask | None = None, *,
                   causal: bool = False, group=None, layout: str = "zigzag", scale: float | None = None,
                   return_lse: bool = False):
    """Context-parallel block-sparse attention: this rank's queries against the whole sequence's keys.

    Args:
        q: ``[B, H, T_local, D]``; k: ``[B, Hk, T_local, D]``; v: ``[B, Hk, T_local, Dv]``: this rank's shards
            (``shard(x, group, layout, seq_dim=2)``) of a global sequence of ``T = world * T_local`` positions.
            Dtypes, head dims and GQA as :func:`blockops.attention.block_sparse_attention`. Every rank passes the
            same shapes (checked with one small all_gather per call).
        block_mask: a BlockMask on GLOBAL positions (``q_len = kv_len = T``), the same on every rank, on q's
            device; None with ``causal=False``: full attention; with ``causal=True``: the causal mask (built at
            block level, block 64, or 32 / 16 when the length needs it).
        causal: shorthand for the causal mask (do not pass both).
        group: the process group (default: the world).
        layout: ``"zigzag"`` (default: causal load balance), ``"contiguous"`` or ``"striped"``; how the shards were
            cut (see :mod:`blockops.distributed.layout`). ``T`` must be a multiple of ``2 * world * block``
            (zigzag), ``world * block`` (contiguous) or ``world * 128`` (striped), ``block = max(block_q, block_kv)``.
        scale: score scale, default ``D ** -0.5``.
        return_lse: also return the log-sum-exp (fp32; fp64 for fp64 inputs) of this rank's rows.

    Returns ``out [B, H, T_local, Dv]`` in q's dtype (or ``(out, lse)``), equal to this rank's rows of the
    single-device ``block_sparse_attention`` on the global tensors (to rounding: partial results are merged in
    fp32). Differentiable in q, k and v. Rows with no visible key give 0 / -inf. :func:`last_call_stats` reports
    bytes and tiles of the call.
    """
    import torch.distributed as dist
    world, rank = _layout._group_info(group)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"ring_attention: {name} must be a [B, H, T_local, D] tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if k.shape[2] != q.shape[2] or v.shape[2] != q.shape[2]:
        raise ValueError(f"ring_attention: q, k, v must hold the same local positions, got lengths {q.shape[2]}, "
                         f"{k.shape[2]}, {v.shape[2]}")
    if block_mask is not None and not isinstance(block_mask, BlockMask):
        raise TypeError(f"ring_attention: block_mask must be a blockops.attention.BlockMask or None, got "
                        f"{type(block_mask).__name__}")
    # First, one small all_gather of every rank's shapes and mask fingerprint: the checks below then fail on every
    # rank alike (a check failing on one rank only would leave the others waiting for its messages).
    if block_mask is None:
        mask_sig = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    else:
        mask_sig = [block_mask.q_len, block_mask.kv_len, block_mask.block_q, block_mask.block_kv,
                    *block_mask.kv_num_blocks.shape[:2], *_fingerprint(block_mask)]
    names = ["B", "H", "Hk", "T_local (q)", "T_local (k)", "T_local (v)", "D", "Dv", "dtype", "layout", "causal",
             "mask q_len", "mask kv_len", "mask block_q", "mask block_kv", "mask B'", "mask H'",
             "mask partial blocks", "mask full blocks", "mask partial index sum", "mask full index sum"]
    sig = [q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], v.shape[2], q.shape[3], v.shape[3],
           _DTYPE_IDS.get(q.dtype, 0), _layout.LAYOUTS.index(layout) if layout in _layout.LAYOUTS else -1,
           int(bool(causal)), *mask_sig]
    dev = q.device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    _check_across_ranks(sig, names, group, dev)

    if layout not in _layout.LAYOUTS:
        raise ValueError(f"ring_attention: layout must be one of {_layout.LAYOUTS}, got {layout!r}")
    if k.shape[2] != q.shape[2] or v.shape[2] != q.shape[2]:
        raise ValueError(f"ring_attention: q, k, v must hold the same local positions, got lengths {q.shape[2]}, "
                         f"{k.shape[2]}, {v.shape[2]}")
    if q.dtype != k.dtype or q.dtype != v.dtype or q.dtype not in _DTYPE_IDS:
        raise ValueError(f"ring_attention: q, k, v must share one dtype in fp16/bf16/fp32 (fp64 on the CPU), got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[0] != k.shape[0] or k.shape[:3] != v.shape[:3] or q.shape[3] != k.shape[3] or q.shape[1] % k.shape[1]:
        raise ValueError(f"ring_attention: incompatible q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         f"(same batch and length, q heads a multiple of k heads, same head dim for q and k)")
    total = world * q.shape[2]
    if block_mask is not None and causal:
        raise ValueError("ring_attention: give block_mask or causal=True, not both (put causality in the mask)")
    if block_mask is None:
        block = _default_block(total, world, layout)
        block_mask = (causal_mask if causal else full_mask)(total, block, q.device)
    if block_mask.q_len != total or block_mask.kv_len != total:
        hint = (" (it looks like a mask on local positions: build it for the global sequence)"
                if block_mask.q_len == q.shape[2] else "")
        raise ValueError(f"ring_attention: block_mask must cover the GLOBAL sequence, q_len = kv_len = world * "
                         f"T_local = {world} * {q.shape[2]} = {total}; got q_len={block_mask.q_len}, "
                         f"kv_len={block_mask.kv_len}{hint}")
    if block_mask.device != q.device:
        raise ValueError(f"ring_attention: the mask is on {block_mask.device} but q is on {q.device}; use "
                         f"block_mask.to(q.device)")
    mb, mh = block_mask.kv_num_blocks.shape[:2]
    if mb not in (1, q.shape[0]) or mh not in (1, q.shape[1]):
        raise ValueError(f"ring_attention: the mask's [B', H'] = [{mb}, {mh}] must be 1 or [B, H] = "
                         f"[{q.shape[0]}, {q.shape[1]}]")
    _layout.check_length(total, world, layout, max(block_mask.block_q, block_mask.block_kv), "ring_attention")
    _ensure_valid(block_mask)
    scale = _default_scale(scale, q)
    plan = _plan_for(block_mask, world, rank, layout)
    out, lse = _RingAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), plan, group, scale,
                                    block_mask.block_q, block_mask.block_kv)
    return (out, lse) if return_lse else out
