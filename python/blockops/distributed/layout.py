"""Sequence layouts for context parallelism: which global positions each rank holds, and `shard` / `unshard`.

A layout cuts the global sequence of ``T`` positions into equal chunks and deals them to ``world`` ranks; a rank's
shard is the concatenation of its chunks in ascending global order::

    contiguous  world chunks of T / world            rank r: chunk r
    zigzag      2 * world chunks of T / (2 * world)  rank r: chunks r and 2 * world - 1 - r   (causal balance)
    striped     T / STRIPE chunks of STRIPE = 128    rank r: chunks r, r + world, r + 2 * world, ...

Chunks are whole attention blocks (every block size of a BlockMask divides 128 and, by the rule checked in
`check_length`, the chunk length), so a rank's shard is a list of whole global query / key blocks: the
distributed code works on block indices and never on token positions.
"""
from __future__ import annotations

import torch

__all__ = ["LAYOUTS", "STRIPE", "check_length", "positions", "shard", "unshard"]

LAYOUTS = ("contiguous", "zigzag", "striped")

# Stripe width of the "striped" layout: the largest BlockMask block size, so every mask's blocks tile a stripe.
STRIPE = 128


def _check_layout(layout: str, what: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"{what}: layout must be one of {LAYOUTS}, got {layout!r}")


def length_rule(layout: str, world: int, block: int) -> int:
    """The number the global length must be a multiple of: chunks of whole ``block``-sized blocks."""
    if layout == "contiguous":
        return world * block
    if layout == "zigzag":
        return 2 * world * block
    return world * STRIPE


def check_length(total: int, world: int, layout: str, block: int, what: str) -> None:
    """ValueError naming the layout's rule when ``total`` positions cannot be cut into its chunks of whole blocks."""
    _check_layout(layout, what)
    m = length_rule(layout, world, block)
    if total % m:
        rule = {"contiguous": f"world * block = {world} * {block}",
                "zigzag": f"2 * world * block = 2 * {world} * {block}",
                "striped": f"world * STRIPE = {world} * {STRIPE}"}[layout]
        raise ValueError(f"{what}: layout {layout!r} needs the global length to be a multiple of {rule} = {m} "
                         f"(equal chunks of whole {block}-position blocks per rank), got global length {total}"
                         + (f" = {world} ranks * {total // world} local" if total % world == 0 else ""))


def chunks(total: int, world: int, rank: int, layout: str) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` global position ranges of ``rank``'s shard, ascending."""
    _check_layout(layout, "chunks")
    if layout == "contiguous":
        n = total // world
        return [(rank * n, (rank + 1) * n)]
    if layout == "zigzag":
        n = total // (2 * world)
        return [(rank * n, (rank + 1) * n), ((2 * world - 1 - rank) * n, (2 * world - rank) * n)]
    return [(s, s + STRIPE) for s in range(rank * STRIPE, total, world * STRIPE)]


def positions(total: int, world: int, rank: int, layout: str, device=None) -> torch.Tensor:
    """int64 ``[total / world]``: the global positions of ``rank``'s shard, in local order."""
    return torch.cat([torch.arange(a, b, device=device) for a, b in chunks(total, world, rank, layout)])


def block_ids(total: int, world: int, rank: int, layout: str, block: int) -> torch.Tensor:
    """int64 CPU ``[total / world / block]``: the global block indices (blocks of ``block``) of ``rank``'s shard."""
    return torch.cat([torch.arange(a // block, b // block) for a, b in chunks(total, world, rank, layout)])


def _group_info(group):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("blockops.distributed: torch.distributed is not initialised (call "
                           "torch.distributed.init_process_group first)")
    return dist.get_world_size(group), dist.get_rank(group)


def shard(x: torch.Tensor, group=None, layout: str = "zigzag", seq_dim: int = 2) -> torch.Tensor:
    """This rank's shard of the global tensor ``x`` (the same on every rank) along ``seq_dim``, by ``layout``.

    The length along ``seq_dim`` must split into the layout's chunks: a multiple of ``world`` (contiguous),
    ``2 * world`` (zigzag) or ``world * STRIPE`` (striped); ring_attention adds that chunks hold whole blocks.
    Returns a new contiguous tensor (differentiable: an index_select).
    """
    _check_layout(layout, "shard")
    world, rank = _group_info(group)
    total = x.shape[seq_dim]
    check_length(total, world, layout, 1, "shard")
    return x.index_select(seq_dim, positions(total, world, rank, layout, x.device)).contiguous()


def unshard(x: torch.Tensor, group=None, layout: str = "zigzag", seq_dim: int = 2) -> torch.Tensor:
    """The global tensor from every rank's shard ``x`` (same shape on every rank): all-gather, then put each
    rank's positions back in global order. Not differentiable (a collective); meant for outputs and checks."""
    import torch.distributed as dist

    _check_layout(layout, "unshard")
    world, rank = _group_info(group)
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=group)
    total = x.shape[seq_dim] * world
    check_length(total, world, layout, 1, "unshard")
    shape = list(x.shape)
    shape[seq_dim] = total
    out = x.new_empty(shape)
    for r, part in enumerate(parts):
        out.index_copy_(seq_dim, positions(total, world, r, layout, x.device), part)
    return out
