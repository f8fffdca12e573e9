"""Cached-block skipping on real diffusers models (tiny, randomly initialised: no weights are downloadable here):
``blockops.cache.enable`` on single-stream (DiT, PixArt, Wan) and dual-stream (Flux, SD3, HunyuanVideo)
transformers called step by step as their pipelines do, and on a full ``DiTPipeline`` call; agreement with
diffusers' FirstBlockCache and cache-dit's DBCache. Skipped without diffusers (cache-dit's test without cache-dit)."""
from __future__ import annotations

import contextlib

import pytest
import torch

import blockops.cache as bcache

diffusers = pytest.importorskip("diffusers")

STEPS = 6


def _dit(out_channels=None):
    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=3,
                                            sample_size=8, patch_size=2, num_embeds_ada_norm=1000, norm_num_groups=1,
                                            out_channels=out_channels)
    labels = torch.tensor([1, 1000])   # a CFG pair in one batch: class 1 and the null class

    def call(x, t):
        return model(torch.cat([x, x]), timestep=torch.full((2,), int(t * 999)), class_labels=labels).sample[:1]

    return model, call, torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))


def _pixart():
    torch.manual_seed(0)
    model = diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                               out_channels=8, num_layers=3, sample_size=8, patch_size=2,
                                               cross_attention_dim=16, caption_channels=12, norm_num_groups=1)
    text = torch.randn(1, 5, 12, generator=torch.Generator().manual_seed(2))
    cond = {"resolution": None, "aspect_ratio": None}

    def call(x, t):
        out = model(x, encoder_hidden_states=text, timestep=torch.full((1,), int(t * 999)), added_cond_kwargs=cond)
        return out.sample[:, :4]   # learned sigma: the first half is the prediction

    return model, call, torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))


def _flux():
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                             attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                             pooled_projection_dim=10, axes_dims_rope=[2, 2, 4])
    return model, _flux_call(model), torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(1))


def _flux_call(model):
    g = torch.Generator().manual_seed(2)
    text, pooled = torch.randn(1, 5, 12, generator=g), torch.randn(1, 10, generator=g)
    img_ids, txt_ids = torch.zeros(16, 3), torch.zeros(5, 3)
    img_ids[:, 1], img_ids[:, 2] = torch.arange(16) // 4, torch.arange(16) % 4

    def call(x, t):
        return model(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled,
                     timestep=torch.full((1,), t), img_ids=img_ids, txt_ids=txt_ids).sample

    return call


def _sd3():
    torch.manual_seed(0)
    model = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=3,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                            caption_projection_dim=16, pooled_projection_dim=10, out_channels=4)
    g = torch.Generator().manual_seed(2)
    text, pooled = torch.randn(2, 5, 12, generator=g), torch.randn(2, 10, generator=g)

    def call(x, t):
        return model(hidden_states=torch.cat([x, x]), encoder_hidden_states=text, pooled_projections=pooled,
                     timestep=torch.full((2,), t * 1000)).sample[:1]

    return model, call, torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))


def _wan():
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                            in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32,
                                            num_layers=3, cross_attn_norm=True, rope_max_seq_len=32)
    text = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(2))

    def call(x, t):
        return model(hidden_states=x, timestep=torch.full((1,), t * 1000), encoder_hidden_states=text).sample

    return model, call, torch.randn(1, 4, 2, 8, 8, generator=torch.Generator().manual_seed(1))


def _hunyuan_video():
    torch.manual_seed(0)
    model = diffusers.HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                                     attention_head_dim=8, num_layers=2, num_single_layers=2,
                                                     num_refiner_layers=1, patch_size=1, patch_size_t=1,
                                                     text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 2, 4))
    g = torch.Generator().manual_seed(2)
    text, pooled = torch.randn(1, 5, 16, generator=g), torch.randn(1, 8, generator=g)
    mask = torch.ones(1, 5, dtype=torch.bool)

    def call(x, t):
        return model(hidden_states=x, timestep=torch.full((1,), t * 1000), encoder_hidden_states=text,
                     encoder_attention_mask=mask, pooled_projections=pooled, guidance=torch.full((1,), 3000.0)).sample

    return model, call, torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(1))


# Single-stream blocks: DiT, PixArt, Wan; dual-stream: Flux (two lists), SD3, HunyuanVideo (two lists).
MODELS = {"DiT": _dit, "PixArt": _pixart, "Wan": _wan, "Flux": _flux, "SD3": _sd3, "HunyuanVideo": _hunyuan_video}
DUAL = {"Flux": ("encoder_hidden_states", "hidden_states"), "SD3": ("encoder_hidden_states", "hidden_states"),
        "HunyuanVideo": ("hidden_states", "encoder_hidden_states")}


def _denoise(model, call, x, steps=STEPS):
    """An Euler flow-matching loop, one transformer call per step (as the pipelines call it). The generation ends
    as a pipeline's does on models with diffusers' CacheMixin (``_reset_stateful_cache``, what
    ``maybe_free_model_hooks`` calls); models without it (DiT, PixArt) mark it with ``cache_context``."""
    cached = "_blockops_block_cache" in vars(model)
    ctx = bcache.cache_context(model, steps) if cached and not hasattr(model, "_reset_stateful_cache") else None
    with torch.no_grad(), (ctx or contextlib.nullcontext()):
        for i in range(steps):
            t = 1.0 - i / steps
            x = x - call(x, t) / steps
    if cached and ctx is None:
        model._reset_stateful_cache()
    return x


@pytest.mark.parametrize("name", list(MODELS))
def test_enable_on_diffusers_transformer(name):
    model, call, x0 = MODELS[name]()
    model.eval()
    want = _denoise(model, call, x0)

    # Caching enabled but never skipping, and caching disabled: bit-identical to the uncached model.
    cache = bcache.enable(model, bcache.Never())
    assert torch.equal(_denoise(model, call, x0), want)
    assert sum(cache.counters()["skipped"]) == 0 and len(cache.stats()) == STEPS
    bcache.disable(model)
    assert torch.equal(_denoise(model, call, x0), want)
    assert "_blockops_block_cache" not in vars(model) and all("forward" not in vars(b) for b in cache.blocks)

    # A threshold no step can miss: the limits alone decide (2 warm-up steps, at most 2 cached in a row).
    cache = bcache.enable(model, bcache.FirstBlockCache(1e9, warmup_steps=2, max_consecutive=2))
    assert all((lay is None) for lay in cache.layouts)
    got = _denoise(model, call, x0)
    assert cache.cached_steps() == [2, 3, 5]
    n = cache.num_blocks
    assert cache.counters() == {"computed": [STEPS] + [STEPS - 3] * (n - 1), "skipped": [0] + [3] * (n - 1)}
    if name in DUAL:   # every block carried the two streams
        assert all(lay.outputs == DUAL[name] for lay in cache.layouts)
    else:
        assert all(lay.single for lay in cache.layouts)
    err = ((got - want).norm() / want.norm()).item()
    assert 0 < err < 1, err   # skipping changes the result, but not into garbage
    print(f"{name}: {n} blocks, cached steps {cache.cached_steps()}, rel. L2 error vs uncached {err:.3e}")
    stats = cache.stats()
    assert [s["cached"] for s in stats] == [False, False, True, True, False, True]
    assert all(s["indicator"] is not None for s in stats[1:])

    # A second generation starts afresh (the pipeline-style reset): same decisions, same output.
    assert torch.equal(_denoise(model, call, x0), got) and cache.cached_steps() == [2, 3, 5]
    bcache.disable(model)

    # TaylorSeer forecasting on the same model.
    cache = bcache.enable(model, bcache.TaylorSeer(interval=2, order=1, warmup_steps=2))
    ts = _denoise(model, call, x0)
    assert cache.cached_steps() == [2, 4] and [s["forecast"] for s in cache.stats()] == [0, 0, 1, 0, 1, 0]
    assert torch.isfinite(ts).all()
    bcache.disable(model)
    assert torch.equal(_denoise(model, call, x0), want)


def test_flux_block_lists_and_cfg_branches():
    """Flux: both block lists are cached in call order; calls named with transformer.cache_context (as Flux's
    true-CFG pipeline does) get one cache per branch."""
    model, call, x0 = _flux()
    model.eval()
    cache = bcache.enable(model, bcache.Always(warmup_steps=1))
    assert cache.blocks_name == "transformer_blocks+single_transformer_blocks" and cache.num_blocks == 4
    with torch.no_grad():
        for i in range(3):
            for branch in ("cond", "uncond"):
                with model.cache_context(branch):
                    call(x0 * (1 if branch == "cond" else -1), 1.0 - i / 3)
    assert cache.cached_steps("cond") == cache.cached_steps("uncond") == [1, 2]
    assert [s["branch"] for s in cache.stats()] == ["cond", "uncond"] * 3
    bcache.disable(model)


def test_dit_pipeline_call():
    """A full DiTPipeline call (tiny random VAE too): one call enables caching on the pipeline, the step count
    comes from the pipeline, the pipeline's end-of-call reset starts the next generation afresh."""
    torch.manual_seed(0)
    transformer, _, _ = _dit(out_channels=8)   # learned sigma, as the DiT pipeline expects
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                                  norm_num_groups=4, sample_size=8)
    transformer.eval(), vae.eval()   # constructors leave modules in training mode (dropout)
    pipe = diffusers.DiTPipeline(transformer=transformer, vae=vae, scheduler=diffusers.DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe(class_labels=[1], num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                    output_type="np").images

    want = run()
    cache = bcache.enable(pipe, bcache.TeaCache(1e9, warmup_steps=1, max_consecutive=1))
    got = run()
    assert cache.num_steps == STEPS
    # TeaCache always computes the last step (the step count came from the pipeline).
    assert cache.cached_steps() == [1, 3]
    first_stats = cache.stats()
    again = run()
    assert cache.stats() == first_stats and (again == got).all()
    err = float(abs(got - want).max())
    assert 0 < err < 1
    bcache.disable(pipe)
    assert (run() == want).all()


def test_enable_errors():
    with pytest.raises(TypeError, match="expected a diffusers pipeline with a .transformer or an nn.Module"):
        bcache.enable(object(), bcache.Never())
    model, _, _ = _dit()
    bcache.enable(model, bcache.Never())
    with pytest.raises(RuntimeError, match="already enabled"):
        bcache.enable(model, bcache.Never())
    bcache.disable(model)
    with pytest.raises(RuntimeError, match="no block cache is enabled"):
        bcache.disable(model)


@pytest.mark.parametrize("peer", ["diffusers", "cache-dit"])
def test_first_block_cache_matches_peer_libraries(peer):
    """The same rule as diffusers' FirstBlockCache and cache-dit's DBCache F1B0 (skip blocks 1..N-1 when block 0's
    residual changed less than the threshold, relative L1 against the last computed step): on the same Flux
    model the same steps are skipped, with the same indicators, and the final latents are bit-identical."""
    import copy

    model, call, x0 = _flux()
    model.eval()
    threshold = 0.3
    peer_model = copy.deepcopy(model)
    if peer == "diffusers":
        peer_model.enable_cache(diffusers.FirstBlockCacheConfig(threshold=threshold))
    else:
        cache_dit = pytest.importorskip("cache_dit")
        cache_dit.enable_cache(peer_model, cache_config=cache_dit.DBCacheConfig(
            Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=threshold, max_warmup_steps=1,
            num_inference_steps=8))
    peer_calls = []
    peer_model.single_transformer_blocks[-1].proj_out.register_forward_pre_hook(lambda *a: peer_calls.append(1))

    def loop(m, fn):
        x = x0
        with torch.no_grad():
            for i in range(8):
                with m.cache_context("cond"):
                    x = x - fn(x, 1.0 - i / 8) / 8
        m._reset_stateful_cache()
        return x

    cache = bcache.enable(model, bcache.FirstBlockCache(threshold, warmup_steps=1))
    ours = loop(model, call)
    theirs = loop(peer_model, _flux_call(peer_model))
    assert cache.cached_steps("cond") and len(peer_calls) == 8 - len(cache.cached_steps("cond"))
    assert torch.equal(ours, theirs)   # the same skips, the same residual additions: bit-identical
    if peer == "cache-dit":   # cache-dit reports its decisions: the same steps, the same indicators
        report = cache_dit.summary(peer_model, logging=False)[0]
        assert report.cached_steps == cache.cached_steps("cond")
        ours_ind = {str(r["step"]): r["indicator"] for r in cache.stats() if r["indicator"] is not None}
        assert ours_ind.keys() == report.residual_diffs.keys()
        for k, v in report.residual_diffs.items():
            assert ours_ind[k] == pytest.approx(v, rel=1e-6)
