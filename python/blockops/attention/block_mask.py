"""`BlockMask`: which (query block, key block) tiles block-sparse attention computes, and how.

Layout (what the kernels read)
------------------------------
A mask covers ``q_len`` queries and ``kv_len`` keys cut into ``QB = ceil(q_len / block_q)`` query blocks and
``KB = ceil(kv_len / block_kv)`` key blocks (``block_q``, ``block_kv`` in {16, 32, 64, 128}). Every list is kept
per ``(b, h)`` of ``[B', H']``, where ``B' in {1, batch}`` and ``H' in {1, heads}``: a size-1 dimension is
broadcast (the kernel uses stride 0). A tile ``(qb, kb)`` is exactly one of:

* empty: no visible pair; listed nowhere, never computed;
* full: every in-range pair (query < q_len, key < kv_len) visible; listed in ``full_kv_indices`` (and
  ``full_q_indices``); the kernel applies no mask there, only the sequence-length bounds;
* partial: some pairs visible; listed in ``kv_indices`` (and ``q_indices``) with a bit tile giving the
  token-level predicate. Tiles mark out-of-range positions (query >= q_len, key >= kv_len) invisible too.

Forward (per query block ``qb`` of ``(b, h)``)::

    for i in range(kv_num_blocks[b, h, qb]):            kb = kv_indices[b, h, qb, i]       # masked
        bits = tiles[kv_tile_ids[b, h, qb, i]]          # [block_q, ceil(block_kv / 32)] int32
        visible(r, c) = (bits[r, c // 32] >> (c % 32)) & 1   # query qb*block_q + r, key kb*block_kv + c
    for i in range(full_kv_num_blocks[b, h, qb]):       kb = full_kv_indices[b, h, qb, i]  # unmasked

Backward for dK/dV walks the transposed lists per key block ``kb``: ``q_indices[b, h, kb, :q_num_blocks]``
with ``q_tile_ids`` (the same tiles, same orientation: rows are queries) and ``full_q_indices``.
Lists are sorted ascending and padded with 0 after the count (so a speculative read stays in range).

All counts, indices and tile ids are int32 and contiguous. Every constructor goes through
:meth:`BlockMask.from_dense` (or its row-chunked twin :meth:`BlockMask.from_mask_fn`, which evaluates a
predicate a few query blocks at a time instead of materialising the whole dense mask), except
:meth:`BlockMask.from_blocks`, the sync-free constructor for block-level selections such as top-k.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import torch

from blockops.ops.bitpack import pack_bits, unpack_bits

__all__ = ["BLOCK_SIZES", "BlockMask", "Density", "expected_block_mask"]

BLOCK_SIZES = (16, 32, 64, 128)

# Query rows evaluated per chunk by from_dense / from_mask_fn: bounds the temporary [B', H', rows, KB * block_kv]
# bool tile view to about 64 M elements.
_CHUNK_ELEMENTS = 1 << 26


def expected_block_mask(value, what: str, extra: str = "") -> TypeError:
    """The TypeError for ``value`` given where a blockops `BlockMask` is expected (``what``: the function and
    argument; ``extra``: other accepted kinds). torch's FlexAttention BlockMask shares the class name, so it is
    named in full, with the conversion."""
    kind = type(value)
    if kind.__name__ == "BlockMask" and kind.__module__.startswith("torch.nn.attention"):
        return TypeError(f"{what} must be a blockops.attention.BlockMask{extra}; got torch's FlexAttention BlockMask "
                         f"({kind.__module__}.BlockMask): convert it with blockops.attention.BlockMask.from_flex(mask)")
    return TypeError(f"{what} must be a blockops.attention.BlockMask{extra}; got {kind.__module__}.{kind.__qualname__}")


class Density(NamedTuple):
    """``tokens``: fraction of visible (query, key) pairs among ``B' * H' * q_len * kv_len``; ``tiles``: fraction
    of computed (partial or full) tiles among ``B' * H' * QB * KB``."""
    tokens: float
    tiles: float


def _check_block_size(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value not in BLOCK_SIZES:
        raise ValueError(f"BlockMask: {name} must be one of {BLOCK_SIZES}, got {value!r}")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _sorted_lists(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool ``[..., N]`` -> (int32 counts ``[...]``, int32 indices ``[..., N]`` ascending, 0-padded). No host sync."""
    n = sel.shape[-1]
    ar = torch.arange(n, device=sel.device, dtype=torch.int32)
    key = torch.where(sel, ar, ar + n)            # selected first, each group in index order
    idx = torch.sort(key, dim=-1).values
    num = sel.sum(-1, dtype=torch.int32)
    idx = torch.where(idx < n, idx, torch.zeros_like(idx))
    return num.contiguous(), idx.contiguous()


def _lists_to_blocks(num: torch.Tensor, idx: torch.Tensor, width: int, values: torch.Tensor | None = None,
                     fill=False) -> torch.Tensor:
    """Inverse of `_sorted_lists`: ``[..., width]`` with ``values`` (default True) at listed columns and ``fill``
    elsewhere. Padding entries go to a scratch column, so duplicate zeros in the padding never overwrite."""
    listed = torch.arange(idx.shape[-1], device=idx.device) < num.unsqueeze(-1)
    col = torch.where(listed, idx.long(), width).clamp(0, width)
    if values is None:
        values = torch.ones_like(listed)
    out = torch.full((*idx.shape[:-1], width + 1), fill, dtype=values.dtype, device=idx.device)
    out.scatter_(-1, col, values)
    return out[..., :width]


def _to4d(mask: torch.Tensor, what: str) -> torch.Tensor:
    if mask.dim() == 2:
        return mask[None, None]
    if mask.dim() == 3:
        return mask[None]
    if mask.dim() == 4:
        return mask
    raise ValueError(f"{what}: mask must be [Q, KV], [H, Q, KV] or [B, H, Q, KV], got shape {tuple(mask.shape)}")


def _pack_rows(bits: torch.Tensor) -> torch.Tensor:
    """bool ``[P, block_q, block_kv]`` -> int32 ``[P, block_q, ceil(block_kv / 32)]`` (blockops.pack_bits, 1 bit)."""
    p, bq, bkv = bits.shape
    if p == 0:
        return torch.zeros(0, bq, _cdiv(bkv, 32), dtype=torch.int32, device=bits.device)
    return pack_bits(bits.to(torch.uint8).contiguous(), 1, -1)


def _unpack_rows(tiles: torch.Tensor, block_kv: int) -> torch.Tensor:
    """Inverse of `_pack_rows`: bool ``[P, block_q, block_kv]``."""
    if tiles.shape[0] == 0:
        return torch.zeros(0, tiles.shape[1], block_kv, dtype=torch.bool, device=tiles.device)
    return unpack_bits(tiles.contiguous(), 1, block_kv, -1).bool()


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class BlockMask:
    """Block-sparse attention mask: per ``(b, h, query block)`` the partial and full key blocks, the transposed
    lists for the backward pass, and bit tiles with the token-level predicate of partial blocks.

    Shapes use ``QB = ceil(q_len / block_q)``, ``KB = ceil(kv_len / block_kv)``, ``W = ceil(block_kv / 32)``;
    ``B'`` / ``H'`` are the batch / head dims of the mask, each 1 (broadcast) or the real size. All tensors are on
    one device; all integer tensors are int32 and contiguous.

    Attributes:
        q_len, kv_len: int, the query / key lengths the mask was built for (>= 1).
        block_q, block_kv: int in {16, 32, 64, 128}: tile height (queries) and width (keys).
        kv_num_blocks: ``[B', H', QB]`` number of partial key blocks of each query block.
        kv_indices: ``[B', H', QB, KB]`` their key-block indices, ascending, 0 after ``kv_num_blocks``.
        full_kv_num_blocks: ``[B', H', QB]`` number of fully visible key blocks of each query block.
        full_kv_indices: ``[B', H', QB, KB]`` their indices, ascending, 0-padded.
        q_num_blocks: ``[B', H', KB]`` number of partial query blocks of each key block (backward, dK/dV).
        q_indices: ``[B', H', KB, QB]`` their query-block indices, ascending, 0-padded.
        full_q_num_blocks: ``[B', H', KB]``; full_q_indices: ``[B', H', KB, QB]``: same for full blocks.
        tiles: ``[num_tiles, block_q, W]`` bit tiles, deduplicated: bit ``j`` of word ``w`` of row ``r`` is 1 when
            key ``w * 32 + j`` of the block is visible from query row ``r`` (LSB-first, as
            ``blockops.pack_bits(bool_tile, 1, dim=-1)``); bits for positions beyond ``q_len`` / ``kv_len`` or
            ``block_kv`` are 0.
        kv_tile_ids: ``[B', H', QB, KB]`` tile of each listed partial block, aligned with ``kv_indices``
            (0-padded).
        q_tile_ids: ``[B', H', KB, QB]`` tile of each listed partial block, aligned with ``q_indices``.

    The constructor checks only types and shapes (cheap, no host sync); :meth:`validate` checks the values.
    """

    q_len: int
    kv_len: int
    block_q: int
    block_kv: int
    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    full_kv_num_blocks: torch.Tensor
    full_kv_indices: torch.Tensor
    q_num_blocks: torch.Tensor
    q_indices: torch.Tensor
    full_q_num_blocks: torch.Tensor
    full_q_indices: torch.Tensor
    tiles: torch.Tensor
    kv_tile_ids: torch.Tensor
    q_tile_ids: torch.Tensor

    _INT_FIELDS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks",
                   "q_indices", "full_q_num_blocks", "full_q_indices", "tiles", "kv_tile_ids", "q_tile_ids")

    def __post_init__(self) -> None:
        _check_block_size("block_q", self.block_q)
        _check_block_size("block_kv", self.block_kv)
        for name in ("q_len", "kv_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"BlockMask: {name} must be a positive int, got {v!r}")
        device = self.kv_num_blocks.device
        for name in self._INT_FIELDS:
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"BlockMask: {name} must be a tensor, got {type(t).__name__}")
            if t.dtype != torch.int32:
                raise ValueError(f"BlockMask: {name} must be int32, got {t.dtype}")
            if t.device != device:
                raise ValueError(f"BlockMask: {name} is on {t.device}, kv_num_blocks on {device}")
        if self.kv_num_blocks.dim() != 3:
            raise ValueError(f"BlockMask: kv_num_blocks must be [B', H', QB], got {tuple(self.kv_num_blocks.shape)}")
        b, h = self.kv_num_blocks.shape[:2]
        qb, kb, w = self.num_q_blocks, self.num_kv_blocks, _cdiv(self.block_kv, 32)
        expected = {
            "kv_num_blocks": (b, h, qb), "kv_indices": (b, h, qb, kb), "full_kv_num_blocks": (b, h, qb),
            "full_kv_indices": (b, h, qb, kb), "q_num_blocks": (b, h, kb), "q_indices": (b, h, kb, qb),
            "full_q_num_blocks": (b, h, kb), "full_q_indices": (b, h, kb, qb), "kv_tile_ids": (b, h, qb, kb),
            "q_tile_ids": (b, h, kb, qb),
        }
        for name, shape in expected.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"BlockMask: {name} must have shape {shape} for q_len={self.q_len}, "
                                 f"kv_len={self.kv_len}, blocks ({self.block_q}, {self.block_kv}); got {got}")
        if self.tiles.dim() != 3 or tuple(self.tiles.shape[1:]) != (self.block_q, w):
            raise ValueError(f"BlockMask: tiles must be [num_tiles, {self.block_q}, {w}], "
                             f"got {tuple(self.tiles.shape)}")

    # ----------------------------------------------------------------------------------------------------- sizes
    @property
    def num_q_blocks(self) -> int:
        """``QB = ceil(q_len / block_q)``."""
        return _cdiv(self.q_len, self.block_q)

    @property
    def num_kv_blocks(self) -> int:
        """``KB = ceil(kv_len / block_kv)``."""
        return _cdiv(self.kv_len, self.block_kv)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(B', H', q_len, kv_len)``: the shape of :meth:`to_dense`."""
        return (self.kv_num_blocks.shape[0], self.kv_num_blocks.shape[1], self.q_len, self.kv_len)

    @property
    def ndim(self) -> int:
        """4, the rank of :attr:`shape` (code written for dense 4-D masks, e.g. transformers' mask preparation,
        reads it)."""
        return 4

    _NOT_DENSE = ("a blockops BlockMask is not a dense mask tensor: use .to_dense() for F.scaled_dot_product_attention, "
                  ".to_flex() for flex_attention, and in a transformers model attn_implementation=\"blockops\" "
                  "(blockops.integrations.transformers)")

    def __getitem__(self, index):
        # Code written for dense masks (transformers' mask preparation) gets a message saying what to use instead.
        raise TypeError(f"BlockMask cannot be indexed: {self._NOT_DENSE}")

    def __getattr__(self, name: str):
        # Only reached for attributes a BlockMask lacks (tensor methods such as .all() called by code written for
        # dense masks); private and dunder lookups (copy, pickle, hasattr probes of protocols) fail as usual.
        if name.startswith("_"):
            raise AttributeError(name)
        raise AttributeError(f"'BlockMask' object has no attribute {name!r}: {self._NOT_DENSE}")

    @property
    def device(self) -> torch.device:
        return self.kv_num_blocks.device

    @property
    def num_tiles(self) -> int:
        return self.tiles.shape[0]

    # ------------------------------------------------------------------------------------------- constructors
    @classmethod
    def _assemble(cls, partial: torch.Tensor, full: torch.Tensor, tile_of_block: torch.Tensor,
                  tiles: torch.Tensor, q_len: int, kv_len: int, block_q: int, block_kv: int) -> "BlockMask":
        """From block classes ``partial``/``full`` (bool ``[B', H', QB, KB]``, disjoint), ``tile_of_block`` (int
        ``[B', H', QB, KB]``, the tile of each partial block) and ``tiles``. Tensor ops only (no host sync)."""
        kv_num, kv_idx = _sorted_lists(partial)
        fkv_num, fkv_idx = _sorted_lists(full)
        q_num, q_idx = _sorted_lists(partial.transpose(-1, -2))
        fq_num, fq_idx = _sorted_lists(full.transpose(-1, -2))
        tob = tile_of_block.to(torch.int32)

        def aligned(t, num, idx):
            ids = t.gather(-1, idx.long())
            listed = torch.arange(idx.shape[-1], device=idx.device) < num.unsqueeze(-1)
            return torch.where(listed, ids, torch.zeros_like(ids)).contiguous()

        mask = cls(
            q_len=q_len, kv_len=kv_len, block_q=block_q, block_kv=block_kv,
            kv_num_blocks=kv_num, kv_indices=kv_idx, full_kv_num_blocks=fkv_num, full_kv_indices=fkv_idx,
            q_num_blocks=q_num, q_indices=q_idx, full_q_num_blocks=fq_num, full_q_indices=fq_idx,
            tiles=tiles.to(torch.int32).contiguous(),
            kv_tile_ids=aligned(tob, kv_num, kv_idx),
            q_tile_ids=aligned(tob.transpose(-1, -2), q_num, q_idx),
        )
        return mask._mark_valid()

    @classmethod
    def from_blocks(cls, blocks: torch.Tensor, q_len: int, kv_len: int, block_q: int = 64,
                    block_kv: int = 64) -> "BlockMask":
        """A block-level mask: every selected tile fully visible (within the lengths), no partial tiles.

        Args:
            blocks: bool ``[QB, KB]``, ``[H', QB, KB]`` or ``[B', H', QB, KB]`` with ``QB = ceil(q_len / block_q)``,
                ``KB = ceil(kv_len / block_kv)``: True = the tile is computed, unmasked.
            q_len, kv_len, block_q, block_kv: as in :class:`BlockMask`.

        Tensor ops only: no host synchronisation, usable under ``torch.compile(fullgraph=True)`` and CUDA graphs.
        """
        _check_block_size("block_q", block_q)
        _check_block_size("block_kv", block_kv)
        blocks = _to4d(blocks, "BlockMask.from_blocks")
        if blocks.dtype != torch.bool:
            raise ValueError(f"BlockMask.from_blocks: blocks must be bool, got {blocks.dtype}")
        qb, kb = _cdiv(q_len, block_q), _cdiv(kv_len, block_kv)
        if tuple(blocks.shape[-2:]) != (qb, kb):
            raise ValueError(f"BlockMask.from_blocks: blocks must end in [{qb}, {kb}] for q_len={q_len}, "
                             f"kv_len={kv_len}, blocks ({block_q}, {block_kv}); got {tuple(blocks.shape)}")
        tiles = torch.zeros(0, block_q, _cdiv(block_kv, 32), dtype=torch.int32, device=blocks.device)
        none = torch.zeros_like(blocks)
        return cls._assemble(none, blocks, torch.zeros(blocks.shape, dtype=torch.int32, device=blocks.device),
                             tiles, q_len, kv_len, block_q, block_kv)

    @classmethod
    def _from_row_chunks(cls, rows: Callable[[int, int], torch.Tensor], batch: int, heads: int, q_len: int,
                         kv_len: int, block_q: int, block_kv: int, device) -> "BlockMask":
        """The core of from_dense: ``rows(r0, r1)`` gives bool ``[B', H', r1 - r0, kv_len]`` for query rows
        ``[r0, r1)`` (r0, r1 multiples of block_q, r1 clipped to q_len)."""
        qb_total, kb = _cdiv(q_len, block_q), _cdiv(kv_len, block_kv)
        kv_pad = kb * block_kv
        chunk_blocks = max(1, _CHUNK_ELEMENTS // max(1, batch * heads * kv_pad * block_q))
        col_oob = (torch.arange(kv_pad, device=device) >= kv_len).view(1, kb, 1, block_kv)
        partials, fulls, tobs, tile_chunks = [], [], [], []
        offset = 0
        for qb0 in range(0, qb_total, chunk_blocks):
            qb1 = min(qb_total, qb0 + chunk_blocks)
            r0, r1 = qb0 * block_q, min(q_len, qb1 * block_q)
            m = rows(r0, r1)
            if m.shape != (batch, heads, r1 - r0, kv_len):
                raise AssertionError(f"row chunk has shape {tuple(m.shape)}")
            m = torch.nn.functional.pad(m, (0, kv_pad - kv_len, 0, (qb1 - qb0) * block_q - (r1 - r0)))
            t = m.view(batch, heads, qb1 - qb0, block_q, kb, block_kv).permute(0, 1, 2, 4, 3, 5)
            row_oob = (torch.arange(qb0 * block_q, qb1 * block_q, device=device) >= q_len).view(-1, 1, block_q, 1)
            oob = row_oob | col_oob                                   # [qb, KB, block_q, block_kv]
            any_ = t.any(-1).any(-1)
            all_ = (t | oob).all(-1).all(-1)
            full = any_ & all_
            partial = any_ & ~all_
            bits = t[partial]                                         # [P, block_q, block_kv] (host sync)
            tob = torch.full(partial.shape, -1, dtype=torch.int64, device=device)
            tob[partial] = torch.arange(offset, offset + bits.shape[0], device=device)
            offset += bits.shape[0]
            partials.append(partial)
            fulls.append(full)
            tobs.append(tob)
            tile_chunks.append(_pack_rows(bits))
        partial, full, tob = torch.cat(partials, 2), torch.cat(fulls, 2), torch.cat(tobs, 2)
        tiles = torch.cat(tile_chunks, 0)
        if tiles.shape[0] > 0:
            uniq, inverse = torch.unique(tiles.view(tiles.shape[0], -1), dim=0, return_inverse=True)
            tiles = uniq.view(-1, block_q, tiles.shape[2])
            tob = torch.where(tob >= 0, inverse[tob.clamp_min(0)], -1)
        return cls._assemble(partial, full, tob.clamp_min(0), tiles, q_len, kv_len, block_q, block_kv)

    @classmethod
    def from_dense(cls, mask: torch.Tensor, block_q: int = 64, block_kv: int = 64, q_len: int | None = None,
                   kv_len: int | None = None) -> "BlockMask":
        """The exact block mask of a token-level boolean mask.

        Args:
            mask: bool ``[Q, KV]``, ``[H', Q, KV]`` or ``[B', H', Q, KV]`` (True = visible), any device; a
                size-1 batch/head dim is kept as a broadcast dim.
            block_q, block_kv: tile sizes, each in {16, 32, 64, 128}; lengths need not be multiples.
            q_len, kv_len: optional; when given they must equal ``Q`` / ``KV``.

        Returns a BlockMask on mask's device with ``to_dense() == mask``. Tiles whose in-range pairs are all
        visible become full blocks, tiles with no visible pair are dropped, the rest become partial blocks with
        deduplicated bit tiles. Vectorised; processes a few query blocks at a time to bound memory.

        Raises:
            ValueError naming the problem: bad block size, non-bool mask, bad rank, lengths not matching.
        """
        _check_block_size("block_q", block_q)
        _check_block_size("block_kv", block_kv)
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise ValueError(f"BlockMask.from_dense: mask must be a bool tensor, got "
                             f"{getattr(mask, 'dtype', type(mask).__name__)}")
        mask = _to4d(mask, "BlockMask.from_dense")
        b, h, q, kv = mask.shape
        if q_len is not None and q_len != q:
            raise ValueError(f"BlockMask.from_dense: mask has {q} query rows but q_len={q_len}")
        if kv_len is not None and kv_len != kv:
            raise ValueError(f"BlockMask.from_dense: mask has {kv} key columns but kv_len={kv_len}")
        if q < 1 or kv < 1 or b < 1 or h < 1:
            raise ValueError(f"BlockMask.from_dense: empty mask shape {tuple(mask.shape)}")
        return cls._from_row_chunks(lambda r0, r1: mask[:, :, r0:r1], b, h, q, kv, block_q, block_kv, mask.device)

    @classmethod
    def from_mask_fn(cls, fn: Callable[..., torch.Tensor], q_len: int, kv_len: int, block_q: int = 64,
                     block_kv: int = 64, batch: int = 1, heads: int = 1, device=None) -> "BlockMask":
        """``from_dense`` of the mask ``fn(b, h, q_idx, kv_idx)``, evaluated a few query blocks at a time.

        Args:
            fn: called with broadcastable int64 tensors ``b [B', 1, 1, 1]``, ``h [1, H', 1, 1]``,
                ``q_idx [1, 1, R, 1]``, ``kv_idx [1, 1, 1, kv_len]``; returns a bool tensor broadcastable to
                ``[B', H', R, kv_len]`` (FlexAttention's mask_mod written with broadcasting instead of vmap).
            batch, heads: ``B'``, ``H'`` of the result (1 = broadcast).
            device: where to evaluate and store (default CPU).
        """
        _check_block_size("block_q", block_q)
        _check_block_size("block_kv", block_kv)
        for name, v in (("q_len", q_len), ("kv_len", kv_len), ("batch", batch), ("heads", heads)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"BlockMask.from_mask_fn: {name} must be a positive int, got {v!r}")
        device = torch.device("cpu") if device is None else torch.device(device)
        bi = torch.arange(batch, device=device).view(-1, 1, 1, 1)
        hi = torch.arange(heads, device=device).view(1, -1, 1, 1)
        ki = torch.arange(kv_len, device=device).view(1, 1, 1, -1)

        def rows(r0, r1):
            qi = torch.arange(r0, r1, device=device).view(1, 1, -1, 1)
            return torch.as_tensor(fn(bi, hi, qi, ki), device=device).to(torch.bool).expand(
                batch, heads, r1 - r0, kv_len)

        return cls._from_row_chunks(rows, batch, heads, q_len, kv_len, block_q, block_kv, device)

    # ------------------------------------------------------------------------------------------ conversions
    def _block_classes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(full bool ``[B', H', QB, KB]``, tile id int64 ``[B', H', QB, KB]``, -1 where not partial) from the
        forward lists."""
        kb = self.num_kv_blocks
        full = _lists_to_blocks(self.full_kv_num_blocks, self.full_kv_indices, kb)
        tob = _lists_to_blocks(self.kv_num_blocks, self.kv_indices, kb, values=self.kv_tile_ids.long(), fill=-1)
        return full, tob

    def to_dense(self) -> torch.Tensor:
        """bool ``[B', H', q_len, kv_len]``: the exact token-level mask, expanded from the forward lists and tiles."""
        full, tob = self._block_classes()
        b, h, qb, kb = full.shape
        bits = _unpack_rows(self.tiles, self.block_kv)
        if bits.shape[0] == 0:
            bits = torch.zeros(1, self.block_q, self.block_kv, dtype=torch.bool, device=self.device)
        tile = bits[tob.clamp(0, bits.shape[0] - 1)]                     # [B', H', QB, KB, bq, bkv]
        dense = torch.where((tob >= 0)[..., None, None], tile, full[..., None, None])
        dense = dense.permute(0, 1, 2, 4, 3, 5).reshape(b, h, qb * self.block_q, kb * self.block_kv)
        return dense[:, :, :self.q_len, :self.kv_len].contiguous()

    def to(self, device) -> "BlockMask":
        """The same mask with every tensor on `device`."""
        return self._same_validity(dataclasses.replace(self, **{n: getattr(self, n).to(device)
                                                                for n in self._INT_FIELDS}))

    # Masks made by blockops' constructors are valid by construction; hand-built ones are validated before the
    # first kernel call (blockops.attention.block_sparse_attention). Validity is remembered together with the
    # tensors' version counters (`Tensor._version`, bumped by every in-place write, views included): a mask
    # edited in place afterwards (mask.kv_indices[...] = 3) no longer matches and is validated again before its
    # next use. Reading 11 counters costs no device sync. Inference tensors have no version counter: such a mask
    # is remembered as valid once (None), as before.
    def _versions(self):
        if torch.compiler.is_compiling():   # a mask built inside a compiled region: not tracked (no graph break)
            return None
        tensors = [getattr(self, n) for n in self._INT_FIELDS]
        if any(t.is_inference() for t in tensors):
            return None
        return tuple(t._version for t in tensors)

    def _is_marked_valid(self) -> bool:
        marked = getattr(self, "_valid_versions", False)
        return marked is not False and marked == self._versions()

    def _mark_valid(self) -> "BlockMask":
        object.__setattr__(self, "_valid_versions", self._versions())
        return self

    def _same_validity(self, other: "BlockMask") -> "BlockMask":
        return other._mark_valid() if self._is_marked_valid() else other

    def expand(self, batch: int, heads: int) -> "BlockMask":
        """Materialise broadcast dims: ``B' = batch``, ``H' = heads`` (each must be 1 or already equal)."""
        b, h = self.kv_num_blocks.shape[:2]
        if b not in (1, batch) or h not in (1, heads):
            raise ValueError(f"BlockMask.expand: cannot expand [B'={b}, H'={h}] to [{batch}, {heads}]")
        fields = {}
        for n in self._INT_FIELDS:
            t = getattr(self, n)
            fields[n] = t if n == "tiles" else t.expand(batch, heads, *t.shape[2:]).contiguous()
        return self._same_validity(dataclasses.replace(self, **fields))

    def to_flex(self):
        """The equivalent ``torch.nn.attention.flex_attention.BlockMask``.

        Same partial / full lists, ``BLOCK_SIZE = (block_q, block_kv)``, ``seq_lengths = (q_len, kv_len)`` and a
        ``mask_mod`` that reads the dense mask (``B' * H' * q_len * kv_len`` bools kept alive by the closure;
        broadcast dims index 0). Restrictions: FlexAttention's kernels need sparse block sizes that are multiples
        of their own tile sizes (128 by default on GPU, so 16/32 blocks may be rejected at kernel launch), and
        its CPU path is inference only.
        """
        from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask

        dense = self.to_dense()
        nb, nh = dense.shape[:2]

        def mask_mod(b, h, q_idx, kv_idx):
            bb = b if nb > 1 else b * 0
            hh = h if nh > 1 else h * 0
            return dense[bb, hh, q_idx, kv_idx]

        return FlexBlockMask.from_kv_blocks(
            self.kv_num_blocks, self.kv_indices, self.full_kv_num_blocks, self.full_kv_indices,
            BLOCK_SIZE=(self.block_q, self.block_kv), mask_mod=mask_mod, seq_lengths=(self.q_len, self.kv_len))

    @classmethod
    def from_flex(cls, flex_mask) -> "BlockMask":
        """From a ``torch.nn.attention.flex_attention.BlockMask``: its lists and ``mask_mod`` evaluated on the
        partial blocks (``create_mask``), re-classified exactly. Its ``BLOCK_SIZE`` entries must be in
        {16, 32, 64, 128}. Full blocks are taken as visible without calling mask_mod, as flex does."""
        from torch.nn.attention.flex_attention import create_mask

        block_q, block_kv = flex_mask.BLOCK_SIZE
        _check_block_size("block_q (flex BLOCK_SIZE[0])", block_q)
        _check_block_size("block_kv (flex BLOCK_SIZE[1])", block_kv)
        q_len, kv_len = (int(x) for x in flex_mask.seq_lengths)
        b, h = flex_mask.kv_num_blocks.shape[:2]
        qb, kb = _cdiv(q_len, block_q), _cdiv(kv_len, block_kv)
        width = max(kb, flex_mask.kv_indices.shape[-1])
        partial = _lists_to_blocks(flex_mask.kv_num_blocks, flex_mask.kv_indices, width)[..., :qb, :kb]
        if flex_mask.full_kv_num_blocks is not None:
            full = _lists_to_blocks(flex_mask.full_kv_num_blocks, flex_mask.full_kv_indices,
                                    max(kb, flex_mask.full_kv_indices.shape[-1]))[..., :qb, :kb]
        else:
            full = torch.zeros_like(partial)
        device = flex_mask.kv_num_blocks.device
        token = create_mask(flex_mask.mask_mod, b, h, q_len, kv_len, device=device).to(torch.bool)

        def expand(blk):
            return blk.repeat_interleave(block_q, 2).repeat_interleave(block_kv, 3)[:, :, :q_len, :kv_len]

        dense = expand(full) | (expand(partial) & token)
        return cls.from_dense(dense, block_q, block_kv)

    # ------------------------------------------------------------------------------------------ inspection
    def density(self) -> Density:
        """(fraction of visible (query, key) pairs, fraction of computed tiles); see :class:`Density`."""
        b, h, qb = self.kv_num_blocks.shape
        kb = self.num_kv_blocks
        rows = (self.q_len - torch.arange(qb, device=self.device) * self.block_q).clamp(max=self.block_q)
        cols = (self.kv_len - torch.arange(kb, device=self.device) * self.block_kv).clamp(max=self.block_kv)
        full, tob = self._block_classes()
        area = rows.view(-1, 1) * cols.view(1, -1)                                    # [QB, KB]
        pairs = (full * area).sum()
        if self.num_tiles:
            per_tile = _unpack_rows(self.tiles, self.block_kv).sum((1, 2))
            pairs = pairs + torch.where(tob >= 0, per_tile[tob.clamp_min(0)], 0).sum()
        computed = self.kv_num_blocks.sum() + self.full_kv_num_blocks.sum()
        return Density(tokens=pairs.item() / (b * h * self.q_len * self.kv_len),
                       tiles=computed.item() / (b * h * qb * kb))

    def __repr__(self) -> str:
        b, h, qb = self.kv_num_blocks.shape
        d = self.density()
        return (f"BlockMask(shape=[B'={b}, H'={h}, q_len={self.q_len}, kv_len={self.kv_len}], "
                f"blocks={self.block_q}x{self.block_kv} ({qb}x{self.num_kv_blocks} tiles), "
                f"density={d.tokens:.3f} of pairs / {d.tiles:.3f} of tiles, "
                f"partial={int(self.kv_num_blocks.sum())} ({self.num_tiles} unique bit tiles), "
                f"full={int(self.full_kv_num_blocks.sum())}, device={self.device})")

    def to_ascii(self, batch: int = 0, head: int = 0, max_blocks: int = 256) -> str:
        """One line per query block, one char per key block: ``#`` full, ``+`` partial, ``.`` empty.

        Args:
            batch, head: which ``(b, h)`` of ``[B', H']`` to draw.
            max_blocks: refuse masks with more query or key blocks than this (ValueError).
        """
        if max(self.num_q_blocks, self.num_kv_blocks) > max_blocks:
            raise ValueError(f"BlockMask.to_ascii: {self.num_q_blocks}x{self.num_kv_blocks} blocks is more than "
                             f"max_blocks={max_blocks}")
        full, tob = self._block_classes()
        full, part = full[batch, head].cpu(), (tob[batch, head] >= 0).cpu()
        chars = [["#" if f else "+" if p else "." for f, p in zip(fr.tolist(), pr.tolist())]
                 for fr, pr in zip(full, part)]
        return "\n".join("".join(r) for r in chars)

    def to_png(self, path, batch: int = 0, head: int = 0, tokens: bool = False) -> None:
        """Save a picture of the mask with matplotlib (optional dependency): block classes (dark = full,
        mid = partial, white = empty), or the token-level mask when ``tokens=True``."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("BlockMask.to_png needs matplotlib (pip install matplotlib)") from e
        if tokens:
            img = self.to_dense()[batch, head].float().cpu()
        else:
            full, tob = self._block_classes()
            img = (full[batch, head].float() + 0.5 * (tob[batch, head] >= 0).float()).cpu()
        fig, ax = plt.subplots(figsize=(6, 6 * img.shape[0] / max(1, img.shape[1]) + 0.5))
        ax.imshow(img.numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xlabel("key block" if not tokens else "key")
        ax.set_ylabel("query block" if not tokens else "query")
        ax.set_title(f"q_len={self.q_len} kv_len={self.kv_len} blocks={self.block_q}x{self.block_kv}")
        fig.savefig(path, bbox_inches="tight")
        plt.close(fig)

    # ------------------------------------------------------------------------------------------ validation
    def validate(self) -> "BlockMask":
        """Check the values (host sync). Returns self.

        Raises ValueError naming the first problem: a count outside ``[0, KB]`` / ``[0, QB]``, an index or tile id
        out of range (padding included), lists not strictly ascending, a block both partial and full, transposed
        lists or their tile ids not matching the forward lists, bits set beyond the lengths or ``block_kv``.
        """
        qb, kb = self.num_q_blocks, self.num_kv_blocks
        checks = (("kv_num_blocks", "kv_indices", kb), ("full_kv_num_blocks", "full_kv_indices", kb),
                  ("q_num_blocks", "q_indices", qb), ("full_q_num_blocks", "full_q_indices", qb))
        for num_name, idx_name, n in checks:
            num, idx = getattr(self, num_name), getattr(self, idx_name)
            if bool(((num < 0) | (num > n)).any()):
                raise ValueError(f"BlockMask.validate: {num_name} has counts outside [0, {n}] "
                                 f"(min {int(num.min())}, max {int(num.max())})")
            if bool(((idx < 0) | (idx >= n)).any()):
                bad = ((idx < 0) | (idx >= n)).nonzero()[0].tolist()
                raise ValueError(f"BlockMask.validate: {idx_name} has an index out of range [0, {n}) at "
                                 f"{bad}: {int(idx[tuple(bad)])}")
            listed = torch.arange(n, device=self.device) < num.unsqueeze(-1)
            ascending = (idx[..., 1:] > idx[..., :-1]) | ~listed[..., 1:]
            if not bool(ascending.all()):
                raise ValueError(f"BlockMask.validate: {idx_name} is not strictly ascending within "
                                 f"{num_name}")
        for ids_name, num_name, idx_name in (("kv_tile_ids", "kv_num_blocks", "kv_indices"),
                                             ("q_tile_ids", "q_num_blocks", "q_indices")):
            ids = getattr(self, ids_name)
            if bool(((ids < 0) | (ids >= max(1, self.num_tiles))).any()):
                raise ValueError(f"BlockMask.validate: {ids_name} has a tile id out of range "
                                 f"[0, {self.num_tiles})")
            listed = torch.arange(ids.shape[-1], device=self.device) < getattr(self, num_name).unsqueeze(-1)
            if self.num_tiles == 0 and bool(listed.any()):
                raise ValueError(f"BlockMask.validate: {num_name} lists partial blocks but there are no tiles")
        full, tob = self._block_classes()
        if bool((full & (tob >= 0)).any()):
            raise ValueError("BlockMask.validate: a block is listed both as partial (kv_indices) and full "
                             "(full_kv_indices)")
        full_t = _lists_to_blocks(self.full_q_num_blocks, self.full_q_indices, qb)
        tob_t = _lists_to_blocks(self.q_num_blocks, self.q_indices, qb, values=self.q_tile_ids.long(), fill=-1)
        if not torch.equal(full_t.transpose(-1, -2), full):
            raise ValueError("BlockMask.validate: full_q_num_blocks / full_q_indices are not the transpose of "
                             "full_kv_num_blocks / full_kv_indices")
        if not torch.equal((tob_t >= 0).transpose(-1, -2), tob >= 0):
            raise ValueError("BlockMask.validate: q_num_blocks / q_indices are not the transpose of "
                             "kv_num_blocks / kv_indices")
        if not torch.equal(tob_t.transpose(-1, -2), tob):
            raise ValueError("BlockMask.validate: q_tile_ids do not match kv_tile_ids for the same blocks")
        if self.num_tiles:
            if self.block_kv % 32:
                pad_bits = (self.tiles[:, :, -1].long() & 0xFFFFFFFF) >> (self.block_kv % 32)
                if bool((pad_bits != 0).any()):
                    raise ValueError(f"BlockMask.validate: tiles have bits set beyond block_kv={self.block_kv}")
            bits = _unpack_rows(self.tiles, self.block_kv)                  # [T, block_q, block_kv]
            rows_last = self.q_len - (qb - 1) * self.block_q                 # valid rows of the last query block
            cols_last = self.kv_len - (kb - 1) * self.block_kv               # valid keys of the last key block
            last_q, last_kv = tob[:, :, -1, :], tob[..., -1]
            if (rows_last < self.block_q and bool(bits[last_q[last_q >= 0]][:, rows_last:].any())) or (
                    cols_last < self.block_kv and bool(bits[last_kv[last_kv >= 0]][:, :, cols_last:].any())):
                raise ValueError("BlockMask.validate: a tile marks positions at or beyond q_len / kv_len visible")
        return self
