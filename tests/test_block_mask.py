"""BlockMask and its builders: exact token-level masks, list layout, transposed lists, bit tiles, density,
mask algebra, Jenga top-k selection (no host sync), FlexAttention conversion, Hilbert order, error paths,
and the dense masked-attention reference."""
import dataclasses
import inspect
import math

import pytest
import torch
from helpers import DEVICES

from blockops.attention import BlockMask, hilbert, masks
from blockops.reference import ref_masked_attention, ref_unpack_bits

BLOCK_PAIRS = [(16, 16), (32, 64), (64, 32), (128, 128), (16, 128)]


# ------------------------------------------------------------------------------------------ independent checks
def expected_blocks(dense: torch.Tensor, bq: int, bkv: int):
    """Per (b, h, qb, kb): 'full' / 'partial' / None, classified by plain loops over blocks of the dense mask
    (full = every in-range pair visible)."""
    b, h, q, kv = dense.shape
    qb, kb = math.ceil(q / bq), math.ceil(kv / bkv)
    cls = {}
    for bi in range(b):
        for hi in range(h):
            for i in range(qb):
                for j in range(kb):
                    tile = dense[bi, hi, i * bq:(i + 1) * bq, j * bkv:(j + 1) * bkv]
                    cls[bi, hi, i, j] = "full" if bool(tile.all()) else "partial" if bool(tile.any()) else None
    return cls


def listed(num, idx, *lead):
    n = int(num[lead])
    row = idx[lead].tolist()
    assert row[:n] == sorted(row[:n]) and len(set(row[:n])) == n, f"not ascending at {lead}: {row[:n]}"
    assert all(x == 0 for x in row[n:]), f"padding not 0 at {lead}: {row[n:]}"
    return row[:n]


def check_mask(m: BlockMask, ref: torch.Tensor) -> None:
    """Everything a kernel relies on, checked against the token-level reference `ref` [B', H', Q, KV]."""
    ref = ref.cpu()
    m.validate()
    m = m.to("cpu")
    assert m.shape == tuple(ref.shape), (m.shape, tuple(ref.shape))
    assert torch.equal(m.to_dense(), ref), "to_dense differs from the reference mask"
    bq, bkv = m.block_q, m.block_kv
    b, h, q, kv = ref.shape
    qb, kb = math.ceil(q / bq), math.ceil(kv / bkv)
    cls = expected_blocks(ref, bq, bkv)
    used_tiles = set()
    for bi in range(b):
        for hi in range(h):
            for i in range(qb):
                part = listed(m.kv_num_blocks, m.kv_indices, bi, hi, i)
                full = listed(m.full_kv_num_blocks, m.full_kv_indices, bi, hi, i)
                assert part == [j for j in range(kb) if cls[bi, hi, i, j] == "partial"], (bi, hi, i)
                assert full == [j for j in range(kb) if cls[bi, hi, i, j] == "full"], (bi, hi, i)
                for n, j in enumerate(part):
                    tid = int(m.kv_tile_ids[bi, hi, i, n])
                    used_tiles.add(tid)
                    bits = ref_unpack_bits(m.tiles[tid], 1, bkv, -1).bool()
                    want = torch.zeros(bq, bkv, dtype=torch.bool)
                    blk = ref[bi, hi, i * bq:(i + 1) * bq, j * bkv:(j + 1) * bkv]
                    want[:blk.shape[0], :blk.shape[1]] = blk
                    assert torch.equal(bits, want), f"tile of block ({i}, {j}) differs"
            for j in range(kb):
                part = listed(m.q_num_blocks, m.q_indices, bi, hi, j)
                full = listed(m.full_q_num_blocks, m.full_q_indices, bi, hi, j)
                assert part == [i for i in range(qb) if cls[bi, hi, i, j] == "partial"], ("q lists", bi, hi, j)
                assert full == [i for i in range(qb) if cls[bi, hi, i, j] == "full"], ("full q lists", bi, hi, j)
                for n, i in enumerate(part):
                    k_pos = listed(m.kv_num_blocks, m.kv_indices, bi, hi, i).index(j)
                    assert int(m.q_tile_ids[bi, hi, j, n]) == int(m.kv_tile_ids[bi, hi, i, k_pos])
    # tiles: deduplicated, every one used
    assert used_tiles == set(range(m.num_tiles)), "unused tiles"
    assert len({tuple(t.flatten().tolist()) for t in m.tiles}) == m.num_tiles, "duplicate tiles"
    computed = sum(c is not None for c in cls.values())
    d = m.density()
    assert d.tokens == pytest.approx(int(ref.sum()) / ref.numel(), abs=1e-12)
    assert d.tiles == pytest.approx(computed / (b * h * qb * kb), abs=1e-12)


def grid(q_len, kv_len):
    return torch.arange(q_len).view(-1, 1), torch.arange(kv_len).view(1, -1)


# --------------------------------------------------------------------------------------------------- builders
@pytest.mark.parametrize("block_q,block_kv", BLOCK_PAIRS)
@pytest.mark.parametrize("q_len,kv_len", [(97, 97), (130, 257), (257, 130)])
def test_causal(q_len, kv_len, block_q, block_kv):
    ref = torch.ones(q_len, kv_len, dtype=torch.bool).tril()          # SDPA is_causal: top-left
    check_mask(masks.causal(q_len, kv_len, block_q=block_q, block_kv=block_kv), ref[None, None])
    ref_br = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
    check_mask(masks.causal(q_len, kv_len, bottom_right=True, block_q=block_q, block_kv=block_kv), ref_br[None, None])


def test_causal_matches_sdpa_is_causal_convention():
    q, k, v = (torch.randn(1, 1, n, 8, dtype=torch.float64) for n in (5, 9, 9))
    out, _ = ref_masked_attention(q, k, v, masks.causal(5, 9, block_q=16, block_kv=16).to_dense())
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))


@pytest.mark.parametrize("block_q,block_kv", BLOCK_PAIRS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("q_len,window", [(97, 5), (257, 40), (130, 200)])
def test_sliding_window(q_len, window, causal, block_q, block_kv):
    ref = torch.zeros(q_len, q_len, dtype=torch.bool)
    for i in range(q_len):
        lo = max(0, i - window + 1)
        hi = i + 1 if causal else min(q_len, i + window)
        ref[i, lo:hi] = True
    m = masks.sliding_window(q_len, window, causal=causal, block_q=block_q, block_kv=block_kv)
    check_mask(m, ref[None, None])


@pytest.mark.parametrize("block_q,block_kv", [(16, 16), (32, 64), (64, 32), (128, 128)])
@pytest.mark.parametrize("q_len,sink,window,stride", [(257, 4, 33, 3), (130, 0, 16, 2), (97, 10, 1, 5)])
def test_sink_window_strided(q_len, sink, window, stride, block_q, block_kv):
    ref = torch.zeros(q_len, q_len, dtype=torch.bool)
    for i in range(q_len):
        for j in range(i + 1):
            ref[i, j] = j < sink or i - j < window or (j // block_kv) % stride == 0
    m = masks.sink_window_strided(q_len, sink, window, stride, block_q=block_q, block_kv=block_kv)
    check_mask(m, ref[None, None])


@pytest.mark.parametrize("chunk", [3, 4096])
def test_banded_builders_equal_from_mask_fn(monkeypatch, chunk):
    """causal, causal sliding_window and sink_window_strided classify tiles away from the diagonal without
    evaluating the predicate (masks._causal_band: O(T^2 / block) instead of O(T^2)); the result must be the very
    BlockMask from_mask_fn builds from the same predicate, field by field, near-diagonal tiles in chunks of 3 too."""
    monkeypatch.setattr(masks, "_BAND_CHUNK_BLOCKS", chunk)
    fields = ["kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks", "q_indices",
              "full_q_num_blocks", "full_q_indices"]

    def same(m, fn, q_len, kv_len, bq, bk):
        ref = BlockMask.from_mask_fn(fn, q_len, kv_len, bq, bk)
        for f in fields:
            assert torch.equal(getattr(m, f), getattr(ref, f)), f
        assert torch.equal(m.to_dense(), ref.to_dense()) and m.num_tiles == ref.num_tiles

    for q_len, kv_len, bq, bk in [(1, 1, 16, 16), (37, 66, 16, 32), (333, 333, 64, 64), (515, 544, 16, 128)]:
        for br in (False, True):
            shift = kv_len - q_len if br else 0
            same(masks.causal(q_len, kv_len, bottom_right=br, block_q=bq, block_kv=bk),
                 lambda b, h, q, kv: kv <= q + shift, q_len, kv_len, bq, bk)
        for w in (1, 5, 64, 300):
            same(masks.sliding_window(q_len, w, kv_len=kv_len, block_q=bq, block_kv=bk),
                 lambda b, h, q, kv: (kv <= q) & (q - kv < w), q_len, kv_len, bq, bk)
        for sink, w, stride, sb in [(0, 1, 1, None), (4, 17, 3, None), (70, 64, 2, 16), (1, 200, 5, 48)]:
            step = bk if sb is None else sb
            same(masks.sink_window_strided(q_len, sink, w, stride, stride_block=sb, block_q=bq, block_kv=bk),
                 lambda b, h, q, kv: (kv <= q) & ((kv < sink) | (q - kv < w) | ((kv // step) % stride == 0)),
                 q_len, q_len, bq, bk)


@pytest.mark.parametrize("block_q,block_kv", [(16, 16), (32, 64), (128, 16)])
@pytest.mark.parametrize("causal", [False, True])
def test_documents(causal, block_q, block_kv):
    seqlens = [30, 1, 50, 16, 33]
    n = sum(seqlens)
    ref = torch.zeros(n, n, dtype=torch.bool)
    start = 0
    for length in seqlens:
        blk = torch.ones(length, length, dtype=torch.bool)
        ref[start:start + length, start:start + length] = blk.tril() if causal else blk
        start += length
    check_mask(masks.documents(seqlens, causal=causal, block_q=block_q, block_kv=block_kv), ref[None, None])
    # one packing per batch element
    rows = [[64, 66], [10, 100, 20]]
    refs = []
    for r in rows:
        ids = torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r))
        d = ids.view(-1, 1) == ids.view(1, -1)
        refs.append(d & torch.ones_like(d).tril() if causal else d)
    check_mask(masks.documents(rows, causal=causal, block_q=block_q, block_kv=block_kv),
               torch.stack(refs)[:, None])


@pytest.mark.parametrize("block_q,block_kv", [(16, 16), (32, 64), (64, 64), (128, 32)])
@pytest.mark.parametrize("block_size,n", [(4, 97), (32, 130), (16, 64)])
def test_block_diffusion(block_size, n, block_q, block_kv):
    qi, ki = grid(n, n)
    check_mask(masks.block_diffusion(block_size, n, block_q=block_q, block_kv=block_kv),
               (qi // block_size >= ki // block_size)[None, None])
    ref = torch.zeros(2 * n, 2 * n, dtype=torch.bool)
    for q in range(2 * n):
        for kv in range(2 * n):
            x0q, x0kv = q >= n, kv >= n
            bq, bkv = (q % n) // block_size, (kv % n) // block_size
            ref[q, kv] = ((bq == bkv and x0q == x0kv) or (bq > bkv and x0kv and not x0q)
                          or (bq >= bkv and x0kv and x0q))
    check_mask(masks.block_diffusion(block_size, n, training=True, block_q=block_q, block_kv=block_kv),
               ref[None, None])


@pytest.mark.parametrize("block_q,block_kv", [(16, 16), (32, 64), (64, 32)])
@pytest.mark.parametrize("query_causal", [True, False])
@pytest.mark.parametrize("instr,docs,query", [(20, [30, 30, 30], 15), (0, [50, 7], 40), (33, [64], 1)])
def test_blockrank(instr, docs, query, query_causal, block_q, block_kv):
    bounds = [(0, instr)]
    for d in docs:
        bounds.append((bounds[-1][1], bounds[-1][1] + d))
    n = bounds[-1][1] + query
    ref = torch.zeros(n, n, dtype=torch.bool)
    ref[:instr, :instr] = torch.ones(instr, instr, dtype=torch.bool).tril()
    for s, e in bounds[1:]:
        ref[s:e, :instr] = True
        ref[s:e, s:e] = torch.ones(e - s, e - s, dtype=torch.bool).tril()
    qs = bounds[-1][1]
    ref[qs:, :qs] = True
    ref[qs:, qs:] = torch.ones(query, query, dtype=torch.bool).tril() if query_causal else True
    m = masks.blockrank(instr, docs, query, query_causal=query_causal, block_q=block_q, block_kv=block_kv)
    check_mask(m, ref[None, None])


def test_batch_heads_broadcast_and_expand():
    m = masks.causal(97, block_q=32, block_kv=32, batch=2, heads=3)
    ref = torch.ones(97, 97, dtype=torch.bool).tril().expand(2, 3, 97, 97)
    check_mask(m, ref)
    m1 = masks.causal(97, block_q=32, block_kv=32)
    assert m1.shape == (1, 1, 97, 97)
    check_mask(m1.expand(1, 4), ref[:1, :1].expand(1, 4, 97, 97))


# ---------------------------------------------------------------------------------------------- from_dense
def random_block_structured(b, h, q, kv, bq, bkv, seed):
    """Random mask with empty, full and partial tiles (and rows with no visible key)."""
    g = torch.Generator().manual_seed(seed)
    qb, kb = math.ceil(q / bq), math.ceil(kv / bkv)
    kind = torch.randint(0, 3, (b, h, qb, kb), generator=g)           # 0 empty, 1 full, 2 random bits
    bits = torch.rand(b, h, qb * bq, kb * bkv, generator=g) < 0.3
    k = kind.repeat_interleave(bq, 2).repeat_interleave(bkv, 3)
    dense = (k == 1) | ((k == 2) & bits)
    dense = dense[:, :, :q, :kv].clone()
    dense[:, :, 3] = False                                             # an empty row
    return dense


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_q,block_kv", BLOCK_PAIRS)
@pytest.mark.parametrize("shape", [(2, 3, 97, 130), (1, 2, 257, 97), (1, 1, 130, 1025)])
def test_from_dense_random(device, shape, block_q, block_kv):
    dense = random_block_structured(*shape, block_q, block_kv, seed=sum(shape) + block_q).to(device)
    m = BlockMask.from_dense(dense, block_q, block_kv)
    assert m.device.type == torch.device(device).type
    check_mask(m, dense)
    # 2-D and 3-D inputs broadcast
    assert BlockMask.from_dense(dense[0, 0], block_q, block_kv).shape == (1, 1) + shape[2:]
    assert BlockMask.from_dense(dense[0], block_q, block_kv).shape == (1,) + shape[1:]


def test_from_dense_identical_tiles_are_shared():
    m = masks.causal(1000, block_q=32, block_kv=32)
    assert m.num_tiles == 2          # the diagonal tile and the short last one
    check_mask(masks.causal(200, block_q=32, block_kv=32), torch.ones(200, 200, dtype=torch.bool).tril()[None, None])


def test_from_mask_fn_chunked(monkeypatch):
    import blockops.attention.block_mask as bm

    monkeypatch.setattr(bm, "_CHUNK_ELEMENTS", 16 * 64)                # force one query block per chunk
    dense = random_block_structured(1, 2, 130, 97, 16, 32, seed=5)
    check_mask(BlockMask.from_dense(dense, 16, 32), dense)
    m = BlockMask.from_mask_fn(lambda b, h, q, kv: (q + h) % 3 == kv % 2, 97, 65, 32, 16, heads=2)
    qi, ki = grid(97, 65)
    check_mask(m, torch.stack([(qi + h) % 3 == ki % 2 for h in range(2)])[None])


# ------------------------------------------------------------------------------------------------ mask algebra
def test_and_or_masks():
    a = masks.sliding_window(130, 20, block_q=32, block_kv=32)
    c = masks.documents([40, 90], causal=True, block_q=32, block_kv=32)
    r = BlockMask.from_dense(random_block_structured(2, 1, 130, 130, 32, 32, seed=1), 32, 32)
    da, dc, dr = a.to_dense(), c.to_dense(), r.to_dense()
    check_mask(masks.and_masks(a, c), da & dc)
    check_mask(masks.or_masks(a, c), da | dc)
    check_mask(masks.and_masks(a, c, r), da & dc & dr)            # [1, 1] and [2, 1] broadcast
    check_mask(masks.or_masks(r, a, block_q=16, block_kv=64), dr | da)
    with pytest.raises(ValueError, match="lengths differ"):
        masks.and_masks(a, masks.causal(97, block_q=32, block_kv=32))


def test_per_head():
    parts = [masks.causal(130, block_q=32, block_kv=16), masks.sliding_window(130, 17, block_q=32, block_kv=16),
             masks.causal(130, block_q=32, block_kv=16),
             BlockMask.from_dense(random_block_structured(1, 1, 130, 130, 32, 16, seed=3), 32, 16)]
    m = masks.per_head(*parts)
    assert m.shape == (1, 4, 130, 130)
    check_mask(m, torch.cat([p.to_dense() for p in parts], 1))
    with pytest.raises(ValueError, match="one head"):
        masks.per_head(m, parts[0])
    with pytest.raises(ValueError, match="block sizes differ"):
        masks.per_head(parts[0], masks.causal(130, block_q=16, block_kv=16))


# --------------------------------------------------------------------------------------------------- top-k
def topk_reference(q, k, block_q, block_kv):
    """Block probabilities by explicit loops over blocks: [B, H, QB, KB] fp64."""
    b, h, tq, d = q.shape
    tk = k.shape[2]
    rep = h // k.shape[1]
    qb, kb = math.ceil(tq / block_q), math.ceil(tk / block_kv)
    probs = torch.zeros(b, h, qb, kb, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            qp = torch.stack([q[bi, hi, i * block_q:(i + 1) * block_q].double().mean(0) for i in range(qb)])
            kp = torch.stack([k[bi, hi // rep, j * block_kv:(j + 1) * block_kv].double().mean(0) for j in range(kb)])
            probs[bi, hi] = torch.softmax(qp @ kp.T / math.sqrt(d), -1)
    return probs


def selected_blocks(m: BlockMask):
    b, h, qb = m.kv_num_blocks.shape
    assert int(m.kv_num_blocks.sum()) == 0 and m.num_tiles == 0, "top-k masks have full blocks only"
    return {(bi, hi, i): set(listed(m.full_kv_num_blocks, m.full_kv_indices, bi, hi, i))
            for bi in range(b) for hi in range(h) for i in range(qb)}


@pytest.mark.parametrize("keep_ratio,min_blocks", [(0.25, 1), (0.1, 3), (0.5, 0)])
def test_topk_keep_ratio(keep_ratio, min_blocks):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 257, 24, generator=g), torch.randn(2, 2, 300, 24, generator=g)   # GQA 4/2
    m = masks.topk_blocks(q, k, keep_ratio=keep_ratio, min_blocks=min_blocks, block_size=(32, 16))
    m.validate()
    assert m.shape == (2, 4, 257, 300)
    probs = topk_reference(q, k, 32, 16)
    kb = probs.shape[-1]
    n_keep = max(min_blocks, math.ceil(keep_ratio * kb))
    for (bi, hi, i), sel in selected_blocks(m).items():
        want = set(torch.argsort(probs[bi, hi, i], descending=True)[:n_keep].tolist())
        assert sel == want, (bi, hi, i)
    check_mask(m, m.to_dense())  # lists / transposes consistent


def test_topk_cum_prob_and_always():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 2, 200, 16, generator=g) * 3, torch.randn(1, 2, 200, 16, generator=g) * 3
    m = masks.topk_blocks(q, k, cum_prob=0.6, min_blocks=1, block_size=16)
    probs = topk_reference(q, k, 16, 16)
    for (bi, hi, i), sel in selected_blocks(m).items():
        p = probs[bi, hi, i]
        kept = sorted(sel, key=lambda j: -p[j].item())
        rest = [j for j in range(p.numel()) if j not in sel]
        assert sum(p[j].item() for j in kept) >= 0.6 - 1e-6                   # reaches the threshold
        assert sum(p[j].item() for j in kept[:-1]) < 0.6 + 1e-6                # and no more blocks than needed
        assert not rest or min(p[j] for j in kept) >= max(p[j] for j in rest)  # the top ones
    kb = probs.shape[-1]
    always_list = [0, kb - 1]
    always_bool = torch.zeros(kb, dtype=torch.bool)
    always_bool[always_list] = True
    for always in (always_list, always_bool):
        ma = masks.topk_blocks(q, k, cum_prob=0.6, always=always, block_size=16)
        for key, sel in selected_blocks(ma).items():
            assert sel == selected_blocks(m)[key] | set(always_list)
    # keep_ratio and cum_prob together: the union
    mu = masks.topk_blocks(q, k, keep_ratio=0.3, cum_prob=0.6, block_size=16)
    mr = masks.topk_blocks(q, k, keep_ratio=0.3, block_size=16)
    for key, sel in selected_blocks(mu).items():
        assert sel == selected_blocks(m)[key] | selected_blocks(mr)[key]


@pytest.mark.parametrize("device", DEVICES)
def test_topk_no_host_sync(device):
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 2, 130, 16, generator=g).to(device), torch.randn(1, 2, 130, 16, generator=g).to(device)
    def names(code):
        out = set(code.co_names)
        for c in code.co_consts:
            if inspect.iscode(c):
                out |= names(c)
        return out

    for fn in (masks.topk_blocks, masks.topk_block_selection, masks._mean_pool, BlockMask.from_blocks,
               BlockMask._assemble):
        syncing = names(fn.__code__) & {"item", "tolist", "nonzero", "cpu", "numpy"}
        assert not syncing, f"{fn.__name__} calls {syncing}"

    always = torch.zeros(5, dtype=torch.bool, device=device)          # a device tensor: no host-to-device copy
    always[0] = True

    def lists(q, k):
        m = masks.topk_blocks(q, k, keep_ratio=0.3, cum_prob=0.5, always=always, block_size=32)
        return m.full_kv_num_blocks, m.full_kv_indices, m.full_q_num_blocks, m.full_q_indices, m.kv_num_blocks

    eager = lists(q, k)
    if device == "cuda":
        torch.cuda.set_sync_debug_mode("error")
        try:
            lists(q, k)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch._dynamo.reset()
    compiled = torch.compile(lists, fullgraph=True)(q, k)
    for a, b in zip(compiled, eager):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ flex
def _flex():
    try:
        import torch.nn.attention.flex_attention as fa

        fa.BlockMask.from_kv_blocks, fa.create_block_mask, fa.create_mask  # noqa: B018
        return fa
    except (ImportError, AttributeError):
        pytest.skip("torch.nn.attention.flex_attention (BlockMask.from_kv_blocks, create_block_mask) unavailable")


@pytest.mark.parametrize("block_q,block_kv", [(32, 32), (64, 32), (128, 128)])
def test_flex_round_trip(block_q, block_kv):
    fa = _flex()
    rand = random_block_structured(2, 2, 130, 97, block_q, block_kv, seed=4)
    for m in (masks.sliding_window(257, 40, block_q=block_q, block_kv=block_kv),
              BlockMask.from_dense(rand, block_q, block_kv)):
        f = m.to_flex()
        assert f.BLOCK_SIZE == (block_q, block_kv) and tuple(f.seq_lengths) == (m.q_len, m.kv_len)
        assert torch.equal(f.kv_num_blocks, m.kv_num_blocks) and torch.equal(f.full_kv_indices, m.full_kv_indices)
        b, h = m.shape[:2]
        token = fa.create_mask(f.mask_mod, b, h, m.q_len, m.kv_len, device="cpu")
        assert torch.equal(token, m.to_dense())
        back = BlockMask.from_flex(f)
        check_mask(back, m.to_dense())


def test_from_flex_create_block_mask():
    fa = _flex()

    def doc_causal(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & ((q_idx // 50) == (kv_idx // 50))

    f = fa.create_block_mask(doc_causal, 1, 1, 130, 130, device="cpu", BLOCK_SIZE=(32, 64))
    m = BlockMask.from_flex(f)
    qi, ki = grid(130, 130)
    check_mask(m, ((ki <= qi) & (qi // 50 == ki // 50))[None, None])
    with pytest.raises(ValueError, match="block_q"):
        BlockMask.from_flex(fa.create_block_mask(doc_causal, 1, 1, 130, 130, device="cpu", BLOCK_SIZE=(8, 64)))


# -------------------------------------------------------------------------------------------- inspection
def test_ascii_repr_png(tmp_path):
    m = masks.causal(100, block_q=32, block_kv=32)
    assert m.to_ascii() == "+...\n#+..\n##+.\n###+"
    r = repr(m)
    for part in ("q_len=100", "kv_len=100", "32x32", "density", "partial=4", "full=6"):
        assert part in r, r
    assert masks.sliding_window(64, 8, block_q=16, block_kv=16, causal=False).to_ascii() == \
        "++..\n+++.\n.+++\n..++"
    with pytest.raises(ValueError, match="max_blocks"):
        m.to_ascii(max_blocks=3)
    pytest.importorskip("matplotlib")
    m.to_png(tmp_path / "m.png")
    m.to_png(tmp_path / "t.png", tokens=True)
    assert (tmp_path / "m.png").stat().st_size > 0 and (tmp_path / "t.png").stat().st_size > 0


@pytest.mark.parametrize("device", DEVICES)
def test_to_device(device):
    m = masks.documents([40, 57], causal=True, block_q=32, block_kv=16)
    md = m.to(device)
    assert md.device.type == torch.device(device).type and md.tiles.device == md.device
    assert torch.equal(md.to_dense().cpu(), m.to_dense())
    assert md.density() == m.density()


# ------------------------------------------------------------------------------------------------ error paths
def test_bad_block_size():
    with pytest.raises(ValueError, match="block_q"):
        masks.causal(100, block_q=48)
    with pytest.raises(ValueError, match="block_kv"):
        BlockMask.from_dense(torch.ones(10, 10, dtype=torch.bool), 64, 256)
    with pytest.raises(ValueError, match="block_q"):
        masks.topk_blocks(torch.randn(1, 1, 64, 8), torch.randn(1, 1, 64, 8), keep_ratio=0.5, block_size=8)


def test_mask_shape_not_matching_lengths():
    dense = torch.ones(97, 130, dtype=torch.bool)
    with pytest.raises(ValueError, match="q_len"):
        BlockMask.from_dense(dense, 32, 32, q_len=96)
    with pytest.raises(ValueError, match="kv_len"):
        BlockMask.from_dense(dense, 32, 32, kv_len=97)
    with pytest.raises(ValueError, match="bool"):
        BlockMask.from_dense(dense.float(), 32, 32)
    with pytest.raises(ValueError, match="mask must be"):
        BlockMask.from_dense(dense[0], 32, 32)
    with pytest.raises(ValueError, match="blocks must end in"):
        BlockMask.from_blocks(torch.ones(4, 4, dtype=torch.bool), 97, 130, 32, 32)


def test_hand_built_mask_errors():
    m = masks.sliding_window(130, 20, block_q=32, block_kv=16)
    kb = m.num_kv_blocks

    def tweak(name, fn):
        t = getattr(m, name).clone()
        fn(t)
        return dataclasses.replace(m, **{name: t})

    with pytest.raises(ValueError, match="kv_indices has an index out of range"):
        tweak("kv_indices", lambda t: t.__setitem__((0, 0, 2, 0), kb)).validate()
    with pytest.raises(ValueError, match="full_q_indices has an index out of range"):
        tweak("full_q_indices", lambda t: t.__setitem__((0, 0, 1, 3), -1)).validate()
    with pytest.raises(ValueError, match="kv_num_blocks has counts outside"):
        tweak("kv_num_blocks", lambda t: t.__setitem__((0, 0, 0), kb + 1)).validate()
    with pytest.raises(ValueError, match="not strictly ascending"):
        tweak("kv_indices", lambda t: t[0, 0, 2, :2].copy_(t[0, 0, 2, :2].flip(0))).validate()
    with pytest.raises(ValueError, match="kv_tile_ids has a tile id out of range"):
        tweak("kv_tile_ids", lambda t: t.__setitem__((0, 0, 1, 0), m.num_tiles)).validate()
    with pytest.raises(ValueError, match="not the transpose"):
        tweak("q_num_blocks", lambda t: t.__setitem__((0, 0, 0), 0)).validate()
    # a block listed both partial and full
    both = tweak("full_kv_num_blocks", lambda t: t.__setitem__((0, 0, 0), 1))
    both = dataclasses.replace(both, full_kv_indices=m.kv_indices.clone())
    with pytest.raises(ValueError, match="both as partial"):
        both.validate()
    # tiles marking out-of-range keys visible
    with pytest.raises(ValueError, match="beyond q_len / kv_len"):
        dataclasses.replace(m, tiles=torch.full_like(m.tiles, 0xFFFF)).validate()
    # shape / dtype errors at construction
    with pytest.raises(ValueError, match="kv_indices must have shape"):
        dataclasses.replace(m, kv_indices=m.kv_indices[..., :-1].contiguous())
    with pytest.raises(ValueError, match="must be int32"):
        dataclasses.replace(m, q_indices=m.q_indices.long())
    with pytest.raises(ValueError, match="tiles must be"):
        dataclasses.replace(m, tiles=torch.zeros(1, 16, 1, dtype=torch.int32))


# --------------------------------------------------------------------------------------------------- Hilbert
@pytest.mark.parametrize("extent", [(3, 5, 7), (1, 4, 4), (8, 8, 8), (2, 3, 1), (1, 1, 1), (5, 12, 20), (7, 2, 9)])
def test_hilbert_order(extent):
    t, h, w = extent
    perm = hilbert.hilbert_order(t, h, w)
    n = t * h * w
    assert perm.dtype == torch.int64 and perm.shape == (n,)
    assert torch.equal(torch.sort(perm).values, torch.arange(n)), "not a permutation"
    coords = torch.stack([perm // (h * w), (perm // w) % h, perm % w], 1)
    assert torch.equal(coords, hilbert.hilbert_coords(t, h, w))
    steps = (coords[1:] - coords[:-1]).abs().sum(1)
    assert bool((steps == 1).all()), f"non-unit steps at {torch.nonzero(steps != 1).flatten().tolist()}"
    inv = hilbert.inverse_permutation(perm)
    assert torch.equal(perm[inv], torch.arange(n)) and torch.equal(inv[perm], torch.arange(n))
    x = torch.randn(2, 3, n, 4)
    xr = hilbert.reorder(x, perm, dim=2)
    assert torch.equal(xr[:, :, 0], x[:, :, perm[0]])
    assert torch.equal(hilbert.restore(xr, perm, dim=2), x)


def test_hilbert_is_local():
    c = hilbert.hilbert_coords(8, 8, 8)
    bricks = c.view(-1, 64, 3)                      # power-of-two cube: every 64 tokens form a 4x4x4 brick
    assert bool(((bricks.max(1).values - bricks.min(1).values) == 3).all())
    with pytest.raises(ValueError, match="positive"):
        hilbert.hilbert_order(0, 4, 4)


# --------------------------------------------------------------------------------- masked-attention reference
def test_ref_masked_attention_vs_sdpa():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 97, 40, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, 130, 40, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, 130, 24, generator=g, dtype=torch.float64)
    dense = random_block_structured(2, 4, 97, 130, 16, 32, seed=7)
    out, lse = ref_masked_attention(q, k, v, dense, scale=0.3)
    assert out.shape == (2, 4, 97, 24) and lse.shape == (2, 4, 97)
    rows = dense.any(-1)
    assert not bool(rows.all()), "the test mask should have empty rows"
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, kr, vr, attn_mask=dense, scale=0.3)
    torch.testing.assert_close(out[rows], sdpa[rows])
    assert bool((out[~rows] == 0).all()) and bool(torch.isneginf(lse[~rows]).all())
    s = (q @ kr.transpose(-1, -2)) * 0.3
    for bi, hi, i in [(0, 0, 0), (1, 3, 50), (0, 2, 96)]:
        if rows[bi, hi, i]:
            want = torch.log(torch.exp(s[bi, hi, i][dense[bi, hi, i]]).sum())
            torch.testing.assert_close(lse[bi, hi, i], want)
    # with a builder's mask and the default scale
    m = masks.block_diffusion(16, 48, training=True, block_q=16, block_kv=16)
    qq, kk, vv = (torch.randn(1, 2, 96, 16, generator=g, dtype=torch.float64) for _ in range(3))
    out, _ = ref_masked_attention(qq, kk, vv, m.to_dense())
    sdpa = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, attn_mask=m.to_dense())
    torch.testing.assert_close(out, sdpa)


def test_flex_block_mask_where_a_blockops_one_is_expected_names_the_conversion():
    """torch's FlexAttention BlockMask shares the class name: the error says which one it got and how to convert."""
    from torch.nn.attention.flex_attention import create_block_mask

    from blockops.attention import block_sparse_attention
    from blockops.nn import BlockSparseAttention

    flex = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, 64, 64, device="cpu")
    q = torch.randn(1, 2, 64, 16)
    with pytest.raises(TypeError, match=r"torch's FlexAttention BlockMask .*BlockMask\.from_flex\(mask\)"):
        block_sparse_attention(q, q, q, flex)
    with pytest.raises(TypeError, match=r"FlexAttention BlockMask .*from_flex"):
        BlockSparseAttention(32, 2, mask=flex)
    with pytest.raises(TypeError, match=r"must be a blockops.attention.BlockMask; got builtins.str"):
        block_sparse_attention(q, q, q, "causal")


def test_block_mask_is_not_a_dense_tensor():
    m = BlockMask.from_dense(torch.ones(32, 32, dtype=torch.bool), 16, 16)
    assert m.ndim == 4 and len(m.shape) == 4
    with pytest.raises(TypeError, match="not a dense mask tensor.*to_dense"):
        m[0]
    with pytest.raises(AttributeError, match="no attribute 'all'.*not a dense mask tensor"):
        m.all()
    assert not hasattr(m, "_private_probe")
