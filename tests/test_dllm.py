"""blockops.dllm generation loops on the tiny masked diffusion LM (blockops.bench.tiny_dllm): decoding rules, cache
equivalences where the math gives them, batched rows at different progress, block causality and error paths."""
import pytest
import torch

from blockops.bench.tiny_dllm import TinyDiffusionLM
from blockops.dllm import DiffusionKVCache, generate, generate_block_diffusion
from helpers import kernel_ran

V = 96
MASK = V - 1


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)      # tiny shapes: threads only add noise
    yield
    torch.set_num_threads(threads)


def model(layers=2, block_length=None, seed=0):
    return TinyDiffusionLM(vocab_size=V, dim=32, heads=2, layers=layers, logit_scale=5.0,
                           block_length=block_length, seed=seed)


def prompts(B, P, seed=0):
    return torch.randint(0, MASK, (B, P), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cache", [None, "prefix", "dual"])
@pytest.mark.parametrize("threshold", [1.0, 2.0, None])
def test_threshold_at_or_above_one_unmasks_one_token_per_step(cache, threshold):
    out = generate(model(), prompts(3, 5), 16, 8, 16, threshold=threshold, cache=cache, mask_id=MASK)
    assert out.stats.steps == 16
    assert all(c == [1, 1, 1] for c in out.stats.unmasked_per_step)
    assert not (out.sequences == MASK).any()


@pytest.mark.parametrize("cache", [None, "prefix", "dual"])
@pytest.mark.parametrize("rule", [dict(threshold=0.9), dict(threshold=0.5), dict(factor=1.0), dict(threshold=None)])
def test_generate_finishes_with_no_mask_left(cache, rule):
    p = prompts(2, 7, seed=1)
    with kernel_ran("dllm_unmask", "cpu"):
        out = generate(model(), p, 24, 8, 12, cache=cache, mask_id=MASK, **rule)
    assert out.sequences.shape == (2, 31) and torch.equal(out.sequences[:, :7], p)
    assert not (out.sequences == MASK).any()
    assert sum(map(sum, out.stats.unmasked_per_step)) == 2 * 24
    # the schedule: 12 steps for 3 blocks = 4 steps per block of 8, so at least 2 tokens per step and row
    assert out.stats.steps <= 12 and all(c >= 2 or c == 0 for s in out.stats.unmasked_per_step for c in s)


def test_parallel_decoding_takes_fewer_steps():
    p = prompts(2, 5, seed=2)
    one = generate(model(), p, 32, 8, 32, threshold=None, mask_id=MASK)
    par = generate(model(), p, 32, 8, 32, threshold=0.5, mask_id=MASK)
    assert one.stats.steps == 32 and par.stats.steps < 32 and par.stats.tokens_per_step > 1


def test_dual_cache_refreshed_every_step_equals_no_cache():
    p = prompts(3, 6, seed=3)
    ref = generate(model(), p, 24, 8, 24, threshold=0.6, cache=None, mask_id=MASK)
    for cache in ("dual", "prefix"):
        out = generate(model(), p, 24, 8, 24, threshold=0.6, cache=cache, refresh_interval=1, mask_id=MASK)
        assert torch.equal(out.sequences, ref.sequences)
        assert out.stats.unmasked_per_step == ref.stats.unmasked_per_step


def test_caches_equal_no_cache_for_a_one_layer_model():
    """With one layer a token's K/V depend only on the token and its position, so cached K/V are never stale:
    prefix and dual caches must give exactly the uncached decoding, including rows in different blocks."""
    p = prompts(3, 5, seed=4)
    ref = generate(model(layers=1), p, 32, 8, 32, threshold=0.6, cache=None, mask_id=MASK)
    for cache in ("prefix", "dual"):
        with kernel_ran("dllm_kv_overwrite", "cpu"):
            out = generate(model(layers=1), p, 32, 8, 32, threshold=0.6, cache=cache, mask_id=MASK)
        assert torch.equal(out.sequences, ref.sequences), cache
        assert out.stats.unmasked_per_step == ref.stats.unmasked_per_step


def test_dual_cache_feeds_fewer_tokens_and_finishes():
    p = prompts(2, 5, seed=5)
    ref = generate(model(layers=3), p, 32, 8, 32, threshold=0.6, cache=None, mask_id=MASK)
    out = generate(model(layers=3), p, 32, 8, 32, threshold=0.6, cache="dual", mask_id=MASK)
    assert not (out.sequences == MASK).any()
    assert out.stats.model_calls >= out.stats.steps   # two calls in a step where rows start blocks at other steps
    assert ref.stats.fed_tokens > out.stats.fed_tokens                          # the cache feeds fewer tokens


def test_windowed_forward_on_a_fresh_cache_equals_the_full_forward():
    """The cache mechanism itself, multi-layer, rows at different windows: after a full forward fills the cache,
    a forward of per-row windows (dual: one block per row, at different positions) reproduces the full forward's
    logits at those positions, because the cache then holds exactly the K/V the full forward computed."""
    m = model(layers=3)
    B, L = 3, 40
    x = torch.randint(0, MASK, (B, L), generator=torch.Generator().manual_seed(6))
    pos = torch.arange(L).expand(B, L)
    full = m(x, pos)
    kv = DiffusionKVCache(B, L)
    kv.feed_prefix()
    torch.testing.assert_close(m(x, pos, kv, True), full)
    win = torch.tensor([0, 16, 32])[:, None] + torch.arange(8)                 # a different block per row
    kv.feed_window(win)
    with kernel_ran("dllm_kv_overwrite", "cpu"):
        out = m(x.gather(1, win), win, kv, True)
    torch.testing.assert_close(out, full.gather(1, win[..., None].expand(-1, -1, V)), rtol=1e-5, atol=1e-5)


def test_batched_rows_at_different_progress_match_single_rows():
    """Rows advance through blocks independently: each row of a batch decodes as it would alone (no cache, and the
    dual cache whose windows and refreshes are per row)."""
    p = prompts(4, 6, seed=7)
    for cache in (None, "dual"):
        batch = generate(model(), p, 32, 8, 32, threshold=0.3, cache=cache, mask_id=MASK)
        counts = torch.tensor(batch.stats.unmasked_per_step)
        cumulative = counts.cumsum(0)
        # rows really were in different blocks at some step (some row had finished 8 more tokens than another)
        assert ((cumulative.max(1).values - cumulative.min(1).values) >= 8).any()
        for b in range(4):
            alone = generate(model(), p[b:b + 1], 32, 8, 32, threshold=0.3, cache=cache, mask_id=MASK)
            assert torch.equal(batch.sequences[b], alone.sequences[0]), (cache, b)


@pytest.mark.parametrize("P", [5, 8, 13])
def test_block_cache_equals_no_cache(P):
    """Finished blocks never see later blocks, so caching their K/V is exact: the block-level cache must decode
    exactly as without cache, and so must the sub-block cache for a one-layer model."""
    p = prompts(2, P, seed=P)
    ref = generate_block_diffusion(model(block_length=8), p, 20, 8, threshold=0.6, mask_id=MASK)
    assert not (ref.sequences == MASK).any()
    out = generate_block_diffusion(model(block_length=8), p, 20, 8, threshold=0.6, cache="block", mask_id=MASK)
    assert torch.equal(out.sequences, ref.sequences)
    assert out.stats.fed_tokens < ref.stats.fed_tokens
    ref1 = generate_block_diffusion(model(1, block_length=8), p, 20, 8, threshold=0.6, sub_block_length=4,
                                    mask_id=MASK)
    out1 = generate_block_diffusion(model(1, block_length=8), p, 20, 8, threshold=0.6, sub_block_length=4,
                                    cache="sub_block", mask_id=MASK)
    assert torch.equal(out1.sequences, ref1.sequences)


@pytest.mark.parametrize("cache", [None, "block", "sub_block"])
def test_block_diffusion_respects_block_causality(cache):
    """Earlier blocks never depend on later ones: decoding more blocks leaves the first ones unchanged."""
    p = prompts(2, 8, seed=8)
    short = generate_block_diffusion(model(block_length=8), p, 16, 8, threshold=0.6, cache=cache,
                                     sub_block_length=4, mask_id=MASK)
    long = generate_block_diffusion(model(block_length=8), p, 40, 8, threshold=0.6, cache=cache,
                                    sub_block_length=4, mask_id=MASK)
    assert torch.equal(long.sequences[:, :24], short.sequences)
    assert not (long.sequences == MASK).any()


def test_block_causal_model_logits_ignore_later_blocks():
    m = model(block_length=8)
    x = torch.randint(0, MASK, (1, 32), generator=torch.Generator().manual_seed(9))
    y = x.clone()
    y[:, 20:] = MASK                                    # change block 2 (positions 16..23) and later
    a, b = m(x), m(y)
    torch.testing.assert_close(a[:, :16], b[:, :16])
    assert not torch.allclose(a[:, 16:24], b[:, 16:24])


def test_threshold_one_block_diffusion_one_token_per_step():
    out = generate_block_diffusion(model(block_length=8), prompts(2, 8), 16, 8, threshold=1.0, cache="block",
                                   mask_id=MASK)
    assert out.stats.steps == 16 and all(c == [1, 1] for c in out.stats.unmasked_per_step)


def test_errors():
    m, p = model(), prompts(2, 4)
    with pytest.raises(ValueError, match="gen_length 20 must be a multiple of block_length 8"):
        generate(m, p, 20, 8, 20, mask_id=MASK)
    with pytest.raises(ValueError, match="steps must be a positive multiple of the number of blocks 2"):
        generate(m, p, 16, 8, 3, mask_id=MASK)
    with pytest.raises(ValueError, match="mask_id 200 is outside the model's vocabulary of 96"):
        generate(m, p, 16, 8, 16, mask_id=200)
    with pytest.raises(ValueError, match="mask_id must be a non-negative int"):
        generate(m, p, 16, 8, 16, mask_id=-1)
    with pytest.raises(ValueError, match="the prompt contains mask_id"):
        generate(m, torch.full((1, 3), MASK), 16, 8, 16, mask_id=MASK)
    with pytest.raises(ValueError, match="cache must be None, 'prefix' or 'dual'"):
        generate(m, p, 16, 8, 16, cache="block", mask_id=MASK)
    with pytest.raises(ValueError, match="factor must be positive"):
        generate(m, p, 16, 8, 16, factor=0.0, mask_id=MASK)
    with pytest.raises(ValueError, match="input_ids must be an int64 tensor"):
        generate(m, p.int(), 16, 8, 16, mask_id=MASK)
    with pytest.raises(ValueError, match="refresh_interval"):
        generate(m, p, 16, 8, 16, cache="dual", refresh_interval=0, mask_id=MASK)
    mb = model(block_length=8)
    with pytest.raises(ValueError, match="differs from the model's block_length 8"):
        generate_block_diffusion(mb, p, 16, 4, mask_id=MASK)
    with pytest.raises(ValueError, match="sub_block_length must be a positive divisor of block_length 8"):
        generate_block_diffusion(mb, p, 16, 8, sub_block_length=3, mask_id=MASK)
    with pytest.raises(ValueError, match="cache must be None, 'block' or 'sub_block'"):
        generate_block_diffusion(mb, p, 16, 8, cache="dual", mask_id=MASK)
