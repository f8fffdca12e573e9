"""Block-mask builders for the seed papers' attention patterns, plus mask algebra.

Every builder returns a :class:`~blockops.attention.BlockMask` built from its exact token-level predicate
(``BlockMask.from_mask_fn``, i.e. ``from_dense`` evaluated a few query blocks at a time), so ``to_dense()`` is the
predicate written in each docstring. ``causal``, causal ``sliding_window`` and ``sink_window_strided`` evaluate it
only on the tiles the diagonal or the window's edge crosses and classify the rest by block (the same BlockMask,
built in seconds at T = 64k instead of minutes). Common keyword arguments:

* ``block_q``, ``block_kv``: tile sizes in {16, 32, 64, 128} (default 64);
* ``batch``, ``heads``: the ``B'`` / ``H'`` of the result (default 1 = broadcast over the real batch / heads);
* ``device``: where the mask lives (default CPU).

Indices below: ``q`` is the query position, ``kv`` the key position (0-based).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from blockops.attention.block_mask import BlockMask, _cdiv, _check_block_size, _pack_rows

__all__ = ["and_masks", "block_diffusion", "blockbert", "blockrank", "causal", "documents", "from_dense",
           "key_padding", "or_masks", "per_head", "sink_window_strided", "sliding_window", "topk_block_selection", "topk_blocks"]


def _build(fn, q_len, kv_len, block_q, block_kv, batch, heads, device) -> BlockMask:
    for name, v in (("batch", batch), ("heads", heads)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    mask = BlockMask.from_mask_fn(fn, q_len, kv_len, block_q, block_kv, device=device)
    return mask if batch == heads == 1 else mask.expand(batch, heads)


_BAND_CHUNK_BLOCKS = 4096   # near-diagonal tiles evaluated at once (4096 x 64 x 64 bools = 16 MB)


def _causal_band(fn, q_len: int, kv_len: int, shift: int, window: int | None, always, block_q: int, block_kv: int,
                 batch: int, heads: int, device) -> BlockMask:
    """The exact mask ``fn`` (= ``kv <= q + shift`` and (``q + shift - kv < window`` or ``always[kv]``)) built in
    O(T^2 / block + T * band) instead of from_mask_fn's O(T^2): a tile wholly above the diagonal is empty; a tile
    wholly below it and out of the window (``window`` None: nowhere) has every row equal to ``always`` over its keys
    (``always`` None: all True), so it is full, empty, or partial with that row repeated; only the tiles the diagonal
    or the window's edge crosses evaluate ``fn`` element by element. Same BlockMask as from_mask_fn (tests check)."""
    _check_block_size("block_q", block_q)
    _check_block_size("block_kv", block_kv)
    for name, v in (("batch", batch), ("heads", heads)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    dev = torch.device("cpu") if device is None else torch.device(device)
    qb_n, kb_n = _cdiv(q_len, block_q), _cdiv(kv_len, block_kv)
    q_first = torch.arange(qb_n, device=dev).view(-1, 1) * block_q
    q_last = torch.clamp(q_first + block_q, max=q_len) - 1
    k_first = torch.arange(kb_n, device=dev).view(1, -1) * block_kv
    k_last = torch.clamp(k_first + block_kv, max=kv_len) - 1
    empty = k_first > q_last + shift
    far = k_last <= q_first + shift
    if window is not None:
        far &= q_first + shift - k_last >= window
    near = ~empty & ~far
    # Far tiles: the key pattern `always` on every row (padding columns past kv_len count as visible for "full").
    kv_pad = kb_n * block_kv
    key_ok = torch.ones(kv_pad, dtype=torch.bool, device=dev) if always is None else \
        torch.nn.functional.pad(always.to(device=dev, dtype=torch.bool), (0, kv_pad - kv_len))
    col_oob = torch.arange(kv_pad, device=dev) >= kv_len
    key_any = (key_ok & ~col_oob).view(kb_n, block_kv).any(-1)
    key_all = (key_ok | col_oob).view(kb_n, block_kv).all(-1)
    full = far & key_all & key_any
    partial = far & key_any & ~key_all
    row_in = torch.arange(block_q, device=dev).view(1, -1, 1)
    pq, pk = partial.nonzero(as_tuple=True)
    far_bits = (key_ok & ~col_oob).view(kb_n, block_kv)[pk].unsqueeze(1) & \
        (q_first.view(-1)[pq].view(-1, 1, 1) + row_in < q_len)
    # Near tiles: fn element by element, a chunk of tiles at a time.
    nq, nk = near.nonzero(as_tuple=True)
    zero = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=dev)
    near_bits, near_full, near_partial = [], [], []
    for c0 in range(0, nq.numel(), _BAND_CHUNK_BLOCKS):
        cq, ck = nq[c0:c0 + _BAND_CHUNK_BLOCKS], nk[c0:c0 + _BAND_CHUNK_BLOCKS]
        q = (cq * block_q).view(-1, 1, 1) + row_in                                    # [N, bq, 1]
        kv = (ck * block_kv).view(-1, 1, 1) + torch.arange(block_kv, device=dev).view(1, 1, -1)
        oob = (q >= q_len) | (kv >= kv_len)
        bits = torch.as_tensor(fn(zero, zero, q, kv), device=dev).to(torch.bool) & ~oob
        any_ = bits.flatten(1).any(-1)
        all_ = (bits | oob).flatten(1).all(-1)
        near_full.append(any_ & all_)
        near_partial.append(any_ & ~all_)
        near_bits.append(bits[any_ & ~all_])
    if near_full:
        nf, np_ = torch.cat(near_full), torch.cat(near_partial)
        full[nq[nf], nk[nf]] = True
        partial[nq[np_], nk[np_]] = True
    # Tiles, deduplicated, in the order of the partial blocks (row-major) as tile ids.
    tob = torch.full((qb_n, kb_n), -1, dtype=torch.int64, device=dev)
    all_bits = torch.cat([far_bits] + near_bits, 0) if near_bits else far_bits
    tob[pq, pk] = torch.arange(pq.numel(), device=dev)
    if near_bits:
        tob[nq[np_], nk[np_]] = torch.arange(pq.numel(), all_bits.shape[0], device=dev)
    tiles = _pack_rows(all_bits)
    if tiles.shape[0] > 0:
        uniq, inverse = torch.unique(tiles.view(tiles.shape[0], -1), dim=0, return_inverse=True)
        tiles = uniq.view(-1, block_q, tiles.shape[2])
        tob = torch.where(tob >= 0, inverse[tob.clamp_min(0)], -1)
    mask = BlockMask._assemble(partial[None, None], full[None, None], tob.clamp_min(0)[None, None], tiles, q_len,
                               kv_len, block_q, block_kv)
    return mask if batch == heads == 1 else mask.expand(batch, heads)


def _positive(name: str, v, allow_zero: bool = False) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < (0 if allow_zero else 1):
        raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} int, got {v!r}")
    return v


def from_dense(mask: torch.Tensor, block_size: int | tuple[int, int] = 64) -> BlockMask:
    """:meth:`BlockMask.from_dense` with ``block_size`` = ``block_q = block_kv`` or ``(block_q, block_kv)``: bool
    ``[Q, KV]``, ``[H', Q, KV]`` or ``[B', H', Q, KV]`` (True = visible)."""
    block_q, block_kv = (block_size, block_size) if isinstance(block_size, int) else block_size
    return BlockMask.from_dense(mask, block_q, block_kv)


def causal(q_len: int, kv_len: int | None = None, *, bottom_right: bool = False, block_q: int = 64,
           block_kv: int = 64, batch: int = 1, heads: int = 1, device=None) -> BlockMask:
    """Causal mask: ``kv <= q`` (top-left aligned, as ``F.scaled_dot_product_attention(is_causal=True)`` and
    ``torch.tril(ones(q_len, kv_len))``). With ``bottom_right=True``: ``kv <= q + kv_len - q_len`` (the last query
    sees every key: decoding with a KV cache, FlashAttention's convention). ``kv_len`` defaults to ``q_len``."""
    kv_len = q_len if kv_len is None else kv_len
    _positive("q_len", q_len), _positive("kv_len", kv_len)
    shift = kv_len - q_len if bottom_right else 0
    return _causal_band(lambda b, h, q, kv: kv <= q + shift, q_len, kv_len, shift, None, None, block_q, block_kv,
                        batch, heads, device)


def sliding_window(q_len: int, window: int, causal: bool = True, *, kv_len: int | None = None,
                   block_q: int = 64, block_kv: int = 64, batch: int = 1, heads: int = 1, device=None) -> BlockMask:
    """Local attention over ``window`` positions.

    causal=True: ``0 <= q - kv < window`` (the query and its ``window - 1`` predecessors; Mistral's convention).
    causal=False: ``|q - kv| < window`` (``window - 1`` keys on each side plus the query itself).
    """
    kv_len = q_len if kv_len is None else kv_len
    _positive("q_len", q_len), _positive("kv_len", kv_len), _positive("window", window)
    if causal:
        fn = lambda b, h, q, kv: (kv <= q) & (q - kv < window)  # noqa: E731
        return _causal_band(fn, q_len, kv_len, 0, window, torch.zeros(kv_len, dtype=torch.bool), block_q, block_kv,
                            batch, heads, device)
    else:
        fn = lambda b, h, q, kv: (q - kv).abs() < window  # noqa: E731
    return _build(fn, q_len, kv_len, block_q, block_kv, batch, heads, device)


def sink_window_strided(q_len: int, sink: int, window: int, stride: int, *, stride_block: int | None = None,
                        block_q: int = 64, block_kv: int = 64, batch: int = 1, heads: int = 1,
                        device=None) -> BlockMask:
    """LongGen's sparse pattern: attention sink + sliding window + block-strided keys, all causal.

    Visible iff ``kv <= q`` and (``kv < sink`` or ``q - kv < window`` or ``(kv // stride_block) % stride == 0``),
    with ``stride_block`` defaulting to ``block_kv`` (every ``stride``-th key block, starting with block 0).
    ``sink`` may be 0; ``window`` >= 1 (the diagonal); ``stride`` >= 1.
    """
    _positive("q_len", q_len), _positive("sink", sink, allow_zero=True), _positive("window", window)
    _positive("stride", stride)
    sb = _positive("stride_block", block_kv if stride_block is None else stride_block)

    def fn(b, h, q, kv):
        return (kv <= q) & ((kv < sink) | (q - kv < window) | ((kv // sb) % stride == 0))

    kv = torch.arange(q_len)
    return _causal_band(fn, q_len, q_len, 0, window, (kv < sink) | ((kv // sb) % stride == 0), block_q, block_kv,
                        batch, heads, device)


def documents(seqlens, *, causal: bool = False, block_q: int = 64, block_kv: int = 64, batch: int = 1,
              heads: int = 1, device=None) -> BlockMask:
    """Packed variable-length sequences: block-diagonal by document id.

    Args:
        seqlens: document lengths (list of ints or 1-D int tensor) covering the packed sequence, length
            ``sum(seqlens)``; or a list of such lists, one per batch element (same total), giving ``B' = len``
            (``batch`` must then be 1 or that length).
        causal: also require ``kv <= q`` (causal LM training on packed documents).

    Visible iff ``doc(q) == doc(kv)`` (and ``kv <= q`` when causal), ``doc`` = index of the containing document.
    """
    if isinstance(seqlens, torch.Tensor):
        seqlens = seqlens.tolist()
    rows = seqlens if len(seqlens) and isinstance(seqlens[0], (list, tuple)) else [seqlens]
    if any(len(r) == 0 for r in rows):
        raise ValueError("documents: seqlens must not be empty")
    rows = [[int(n) for n in r] for r in rows]
    for r in rows:
        for n in r:
            _positive("documents: each sequence length", n)
    totals = {sum(r) for r in rows}
    if len(totals) != 1:
        raise ValueError(f"documents: every batch row must cover the same total length, got {sorted(totals)}")
    total = totals.pop()
    dev = torch.device("cpu") if device is None else torch.device(device)
    doc = torch.stack([torch.repeat_interleave(torch.arange(len(r), device=dev),
                                               torch.tensor(r, device=dev)) for r in rows])

    def fn(b, h, q, kv):
        dq = doc[b.view(-1), :][:, q.view(-1)].view(-1, 1, q.shape[2], 1)
        dk = doc[b.view(-1), :][:, kv.view(-1)].view(-1, 1, 1, kv.shape[3])
        same = dq == dk
        return same & (kv <= q) if causal else same

    mask = BlockMask.from_mask_fn(fn, total, total, block_q, block_kv, batch=len(rows), heads=1, device=dev)
    _positive("batch", batch), _positive("heads", heads)
    if len(rows) > 1 and batch not in (1, len(rows)):
        raise ValueError(f"documents: batch={batch} but seqlens has {len(rows)} rows")
    batch = max(batch, len(rows))
    return mask if batch == len(rows) and heads == 1 else mask.expand(batch, heads)


def blockbert(seq_len: int, num_blocks: int, heads: int, *, shifts: Sequence[int] | None = None,
              block_q: int = 64, block_kv: int = 64, device=None) -> BlockMask:
    """BlockBERT (Qiu et al. 2020): the sequence is cut into ``num_blocks`` equal token chunks
    (``ceil(seq_len / num_blocks)`` long, the last one shorter) and each head attends through a permutation of
    them: query chunk ``i`` of head ``h`` sees key chunk ``(i + shifts[h]) % num_blocks`` only. ``shifts`` (one
    per head) defaults to the paper's even split of the heads over the cyclic permutations: head ``h`` gets shift
    ``h * num_blocks // heads`` (n = 2: half the heads block-diagonal, half the swapped blocks). ``H' = heads``;
    the density is ``1 / num_blocks``."""
    _positive("blockbert: seq_len", seq_len), _positive("blockbert: num_blocks", num_blocks)
    _positive("blockbert: heads", heads)
    shifts = [h * num_blocks // heads for h in range(heads)] if shifts is None else [int(s) for s in shifts]
    if len(shifts) != heads:
        raise ValueError(f"blockbert: shifts has {len(shifts)} entries, need one per head ({heads})")
    chunk = _cdiv(seq_len, num_blocks)
    dev = torch.device("cpu") if device is None else torch.device(device)
    shift = torch.tensor(shifts, device=dev).view(1, -1, 1, 1)
    return BlockMask.from_mask_fn(lambda b, h, q, kv: kv // chunk == (q // chunk + shift) % num_blocks,
                                  seq_len, seq_len, block_q, block_kv, heads=heads, device=dev)


def key_padding(mask: BlockMask, keep: torch.Tensor) -> BlockMask:
    """``mask`` with the keys where ``keep [B, kv_len]`` is False hidden for every query (a padding mask, True =
    real token, as transformers' 2-D ``attention_mask``): ``B' = B``. Token-exact; goes through the dense mask
    (``B * H' * q_len * kv_len`` bools, host syncs: build it outside a compiled region). A query whose visible
    keys are all padding gets a zero output (see `block_sparse_attention`)."""
    if not isinstance(keep, torch.Tensor) or keep.dim() != 2 or keep.shape[1] != mask.kv_len:
        got = tuple(keep.shape) if isinstance(keep, torch.Tensor) else type(keep).__name__
        raise ValueError(f"key_padding: keep must be a [B, kv_len={mask.kv_len}] tensor, got {got}")
    b = mask.kv_num_blocks.shape[0]
    if b not in (1, keep.shape[0]):
        raise ValueError(f"key_padding: the mask has batch dim {b}, keep has {keep.shape[0]} rows")
    dense = mask.to_dense() & keep.to(device=mask.device, dtype=torch.bool)[:, None, None, :]
    return BlockMask.from_dense(dense, mask.block_q, mask.block_kv)


def block_diffusion(block_size: int, n: int, training: bool = False, *, block_q: int = 64, block_kv: int = 64,
                    batch: int = 1, heads: int = 1, device=None) -> BlockMask:
    """Block diffusion (BD3-LM, SDAR, Fast-dLLM v2) masks.

    Inference (``training=False``), length ``n``: visible iff ``q // block_size >= kv // block_size``
    (bidirectional inside a block, causal across blocks).

    Training (``training=True``), the doubled sequence ``[x_t ; x_0]`` of length ``2n``: with ``bq``, ``bkv`` the
    block index within each half (``(i mod n) // block_size``) and ``x0q = q >= n``, ``x0kv = kv >= n``::

        (bq == bkv and x0q == x0kv) or (bq > bkv and x0kv and not x0q) or (bq >= bkv and x0kv and x0q)

    (noisy block attends to itself and to clean earlier blocks; the clean half is block-causal.)
    """
    _positive("block_size", block_size), _positive("n", n)
    if training:
        def fn(b, h, q, kv):
            x0q, x0kv = q >= n, kv >= n
            bq, bkv = (q % n) // block_size, (kv % n) // block_size
            return (((bq == bkv) & (x0q == x0kv)) | ((bq > bkv) & x0kv & ~x0q) | ((bq >= bkv) & x0kv & x0q))
        length = 2 * n
    else:
        def fn(b, h, q, kv):
            return q // block_size >= kv // block_size
        length = n
    return _build(fn, length, length, block_q, block_kv, batch, heads, device)


def blockrank(instruction_len: int, doc_lens: Sequence[int], query_len: int, *, query_causal: bool = True,
              block_q: int = 64, block_kv: int = 64, batch: int = 1, heads: int = 1, device=None) -> BlockMask:
    """BlockRank (in-context ranking) structured attention over ``[instruction ; doc_1 ; ... ; doc_M ; query]``.

    * instruction tokens: causal within the instruction;
    * tokens of document i: the whole instruction, and causally their own document (never other documents);
    * query tokens: every instruction and document token, and the query causally (``query_causal=False``:
      the whole query, bidirectionally).

    Length ``instruction_len + sum(doc_lens) + query_len``; ``instruction_len`` may be 0.
    """
    _positive("instruction_len", instruction_len, allow_zero=True), _positive("query_len", query_len)
    doc_lens = [int(n) for n in (doc_lens.tolist() if isinstance(doc_lens, torch.Tensor) else doc_lens)]
    for n in doc_lens:
        _positive("blockrank: each document length", n)
    total = instruction_len + sum(doc_lens) + query_len
    dev = torch.device("cpu") if device is None else torch.device(device)
    lens = torch.tensor([instruction_len, *doc_lens, query_len], device=dev)
    seg = torch.repeat_interleave(torch.arange(len(lens), device=dev), lens)   # 0 = instruction, M + 1 = query
    last = len(lens) - 1

    def fn(b, h, q, kv):
        sq, sk = seg[q], seg[kv]
        causal_ok = kv <= q
        instr = (sq == 0) & (sk == 0) & causal_ok
        doc = (sq > 0) & (sq < last) & ((sk == 0) | ((sk == sq) & causal_ok))
        query = (sq == last) & ((sk < last) | (causal_ok if query_causal else sk == last))
        return instr | doc | query

    return _build(fn, total, total, block_q, block_kv, batch, heads, device)


# ------------------------------------------------------------------------------------------------ top-k (Jenga)
def _mean_pool(x: torch.Tensor, block: int) -> torch.Tensor:
    """``[B, H, T, D]`` -> ``[B, H, ceil(T / block), D]`` fp32 means over the tokens of each block (a short last
    block averages only its real tokens)."""
    b, h, t, d = x.shape
    nb = _cdiv(t, block)
    xp = torch.nn.functional.pad(x.float(), (0, 0, 0, nb * block - t))
    sums = xp.view(b, h, nb, block, d).sum(3)
    counts = (t - torch.arange(nb, device=x.device) * block).clamp(max=block).to(torch.float32)
    return sums / counts.view(1, 1, nb, 1)


def topk_block_selection(q: torch.Tensor, k: torch.Tensor, keep_ratio: float | None = None,
                         cum_prob: float | None = None, min_blocks: int = 1, always=None, block_q: int = 64,
                         block_kv: int = 64) -> torch.Tensor:
    """The block selection of :func:`topk_blocks` as bool ``[B, H, QB, KB]`` (tensor ops only, no host sync)."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"topk_blocks: q and k must be [B, H, T, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[1] % k.shape[1]:
        raise ValueError(f"topk_blocks: q {tuple(q.shape)} and k {tuple(k.shape)} must share batch and head dim, "
                         "with q heads a multiple of k heads")
    if keep_ratio is None and cum_prob is None:
        raise ValueError("topk_blocks: give keep_ratio or cum_prob (or both)")
    if keep_ratio is not None and not 0.0 <= keep_ratio <= 1.0:
        raise ValueError(f"topk_blocks: keep_ratio must be in [0, 1], got {keep_ratio}")
    if cum_prob is not None and not 0.0 <= cum_prob <= 1.0:
        raise ValueError(f"topk_blocks: cum_prob must be in [0, 1], got {cum_prob}")
    _positive("min_blocks", min_blocks, allow_zero=True)
    qp = _mean_pool(q, block_q)                                                      # [B, H, QB, D]
    kp = _mean_pool(k, block_kv)                                                     # [B, Hk, KB, D]
    if kp.shape[1] != qp.shape[1]:
        kp = kp.repeat_interleave(qp.shape[1] // kp.shape[1], dim=1)
    kb = kp.shape[2]
    probs = torch.softmax(qp @ kp.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)  # [B, H, QB, KB]
    sorted_p, order = torch.sort(probs, dim=-1, descending=True)
    rank = torch.arange(kb, device=q.device)
    n_fixed = min_blocks
    if keep_ratio is not None:
        n_fixed = max(n_fixed, math.ceil(keep_ratio * kb - 1e-9))
    keep = (rank < n_fixed).expand_as(sorted_p)
    if cum_prob is not None:
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p      # mass of the blocks ranked above
        keep = keep | (before < cum_prob)
    sel = torch.zeros(keep.shape, dtype=torch.bool, device=q.device).scatter(-1, order, keep.contiguous())
    if always is not None:
        if isinstance(always, torch.Tensor) and always.dtype == torch.bool:
            if always.dim() < 1 or always.shape[-1] != kb:
                raise ValueError(f"topk_blocks: a bool `always` must end in {kb} (one per key block), "
                                 f"got {tuple(always.shape)}")
            extra = always.to(q.device)
        else:
            idx = torch.as_tensor(always, dtype=torch.long, device=q.device).view(-1)
            extra = torch.zeros(kb, dtype=torch.bool, device=q.device).index_fill(0, idx, True)
        sel = sel | extra
    return sel


def topk_blocks(q: torch.Tensor, k: torch.Tensor, keep_ratio: float | None = None, cum_prob: float | None = None,
                min_blocks: int = 1, always=None, block_size: int | tuple[int, int] = 64) -> BlockMask:
    """Jenga-style dynamic block selection from mean-pooled queries and keys.

    Per ``(b, h)`` and query block: ``scores = softmax(mean(q_block) . mean(k_block)^T / sqrt(D))`` over the key
    blocks; keep the blocks ranked (descending score) below ``max(min_blocks, ceil(keep_ratio * KB))``, and/or
    every block until the cumulative probability reaches ``cum_prob`` (a block is kept while the mass ranked
    above it is below ``cum_prob``, so the block that crosses the threshold is kept), plus ``always``.

    Args:
        q: ``[B, H, Tq, D]``, any float dtype, on the device that computes the selection.
        k: ``[B, Hk, Tk, D]`` with ``H`` a multiple of ``Hk`` (GQA: pooled keys repeated per query head).
        keep_ratio: fraction of key blocks kept per query block, in [0, 1].
        cum_prob: cumulative-probability threshold in [0, 1].
        min_blocks: at least this many top blocks per query block.
        always: key blocks always kept (e.g. text tokens in a video DiT): bool ``[KB]`` (or broadcastable to
            ``[B, H, QB, KB]``) or a list / int tensor of key-block indices. Pass a tensor on q's device to avoid
            even the host-to-device copy of a Python list.
        block_size: ``block_q = block_kv = block_size``, or ``(block_q, block_kv)``.

    Returns a BlockMask ``[B, H]`` whose selected tiles are all full (unmasked). Tensor ops only, on q's device:
    no ``.item()``, no Python branching on tensor values (works under ``torch.compile(fullgraph=True)``).
    """
    block_q, block_kv = (block_size, block_size) if isinstance(block_size, int) else block_size
    _check_block_size("block_q", block_q)
    _check_block_size("block_kv", block_kv)
    sel = topk_block_selection(q, k, keep_ratio, cum_prob, min_blocks, always, block_q, block_kv)
    return BlockMask.from_blocks(sel, q.shape[2], k.shape[2], block_q, block_kv)


# ------------------------------------------------------------------------------------------------ mask algebra
def _same_geometry(masks, what: str) -> None:
    if not masks:
        raise ValueError(f"{what}: give at least one mask")
    m0 = masks[0]
    for m in masks[1:]:
        if (m.q_len, m.kv_len) != (m0.q_len, m0.kv_len):
            raise ValueError(f"{what}: lengths differ: ({m0.q_len}, {m0.kv_len}) vs ({m.q_len}, {m.kv_len})")
        if m.device != m0.device:
            raise ValueError(f"{what}: masks on different devices ({m0.device}, {m.device})")


def _combine(masks, op, what: str, block_q, block_kv) -> BlockMask:
    _same_geometry(masks, what)
    dense = masks[0].to_dense()
    for m in masks[1:]:
        try:
            dense = op(dense, m.to_dense())
        except RuntimeError as e:
            raise ValueError(f"{what}: [B', H'] dims do not broadcast: {e}") from e
    bq = masks[0].block_q if block_q is None else block_q
    bkv = masks[0].block_kv if block_kv is None else block_kv
    return BlockMask.from_dense(dense, bq, bkv)


def and_masks(*masks: BlockMask, block_q: int | None = None, block_kv: int | None = None) -> BlockMask:
    """Intersection (token level, exact) of masks with the same lengths; ``[B', H']`` broadcast. Block sizes
    default to the first mask's. Goes through the dense mask (``B' * H' * q_len * kv_len`` bools)."""
    return _combine(masks, torch.logical_and, "and_masks", block_q, block_kv)


def or_masks(*masks: BlockMask, block_q: int | None = None, block_kv: int | None = None) -> BlockMask:
    """Union (token level, exact) of masks with the same lengths; ``[B', H']`` broadcast, as :func:`and_masks`."""
    return _combine(masks, torch.logical_or, "or_masks", block_q, block_kv)


def per_head(*masks: BlockMask) -> BlockMask:
    """Stack single-head masks (``H' = 1`` each) into one mask with ``H' = len(masks)``: head i uses masks[i]
    (BlockBERT-style per-head patterns). Same lengths and block sizes; ``B'`` broadcast to the largest. Works on
    the block lists (no dense mask); bit tiles are merged and deduplicated."""
    _same_geometry(masks, "per_head")
    m0 = masks[0]
    for m in masks:
        if (m.block_q, m.block_kv) != (m0.block_q, m0.block_kv):
            raise ValueError(f"per_head: block sizes differ: ({m0.block_q}, {m0.block_kv}) vs "
                             f"({m.block_q}, {m.block_kv})")
        if m.kv_num_blocks.shape[1] != 1:
            raise ValueError(f"per_head: every mask must have one head (H' = 1), got H' = {m.kv_num_blocks.shape[1]}")
    batch = max(m.kv_num_blocks.shape[0] for m in masks)
    if any(m.kv_num_blocks.shape[0] not in (1, batch) for m in masks):
        raise ValueError("per_head: batch dims B' do not broadcast")
    partial, full, tob, tiles, offset = [], [], [], [], 0
    for m in masks:
        f, t = m._block_classes()
        partial.append((t >= 0).expand(batch, -1, -1, -1))
        full.append(f.expand(batch, -1, -1, -1))
        tob.append(torch.where(t >= 0, t + offset, -1).expand(batch, -1, -1, -1))
        tiles.append(m.tiles)
        offset += m.num_tiles
    partial, full, tob, tiles = torch.cat(partial, 1), torch.cat(full, 1), torch.cat(tob, 1), torch.cat(tiles, 0)
    if tiles.shape[0]:
        uniq, inverse = torch.unique(tiles.view(tiles.shape[0], -1), dim=0, return_inverse=True)
        tiles = uniq.view(-1, *tiles.shape[1:])
        tob = torch.where(tob >= 0, inverse[tob.clamp_min(0)], -1)
    return BlockMask._assemble(partial, full, tob.clamp_min(0), tiles, m0.q_len, m0.kv_len, m0.block_q,
                               m0.block_kv)
