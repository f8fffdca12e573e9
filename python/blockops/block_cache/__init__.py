"""Cached-block skipping for diffusion transformers (family "block_cache"): fused indicator / residual kernels,
one-call enabling on any ``nn.ModuleList`` of blocks, and the policies of BWCache, first-block cache, TeaCache and
BAC. The op wrappers (``relative_l1``, ``relative_l1_residual``, ``apply_residual``, ``cache_update``) live in
:mod:`blockops.ops.block_cache`; ``blockops.cache`` is this package's former name and still works.

    import blockops.block_cache as bc
    cache = bc.enable_block_cache(dit, bc.FirstBlockCache(threshold=0.08))   # finds dit.blocks
    with bc.cache_context(dit, num_steps=50):
        latent = sample(dit, noise)
    print(cache.summary())
    bc.disable_block_cache(dit)

On a diffusers pipeline or transformer (dual-stream Flux / SD3 blocks included), one call:

    cache = blockops.cache.enable(pipe, bc.FirstBlockCache(0.08, warmup_steps=2, max_consecutive=3))
    image = pipe(prompt, num_inference_steps=28).images[0]
    print(cache.cached_steps(), cache.stats()[:3])
    blockops.cache.disable(pipe)
"""
from blockops.block_cache.api import (BlockCache, cache_context, disable_block_cache, enable_block_cache,  # noqa: F401
                                      get_block_cache)
from blockops.block_cache.diffusers_hooks import disable, enable  # noqa: F401
from blockops.block_cache.bac import (BACSchedule, bubbling_union, caching_error, optimal_update_steps,  # noqa: F401
                                      schedule_value)
from blockops.block_cache.policies import (Always, BWCache, FirstBlockCache, Never, Policy, RecordFeatures,  # noqa: F401
                                           TaylorSeer, TeaCache, TeaCacheCalibration, fit_teacache_coefficients)
from blockops.ops.block_cache import apply_residual, cache_update, relative_l1, relative_l1_residual  # noqa: F401

__all__ = ["Always", "BACSchedule", "BWCache", "BlockCache", "FirstBlockCache", "Never", "Policy", "RecordFeatures",
           "TaylorSeer", "TeaCache", "TeaCacheCalibration", "apply_residual", "bubbling_union", "cache_context",
           "cache_update", "caching_error", "disable", "disable_block_cache", "enable", "enable_block_cache",
           "fit_teacache_coefficients", "get_block_cache", "optimal_update_steps", "relative_l1",
           "relative_l1_residual", "schedule_value"]
