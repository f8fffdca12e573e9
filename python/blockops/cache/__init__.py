"""``blockops.cache``: the former name of :mod:`blockops.block_cache` (cached-block skipping), kept as an alias.
It re-exports that package's public names, so ``import blockops.cache as bc`` works as before; new code should
import ``blockops.block_cache``. Its modules (``api``, ``bac``, ``policies``) live under ``blockops.block_cache`` and
the op wrappers under ``blockops.ops.block_cache``. ``blockops.cache.enable(pipe_or_transformer, policy)`` /
``disable`` is the one-call entry on diffusers pipelines (:mod:`blockops.block_cache.diffusers_hooks`)."""
from blockops.block_cache import (Always, BACSchedule, BWCache, BlockCache, FirstBlockCache, Never, Policy,  # noqa: F401
                                  RecordFeatures, TaylorSeer, TeaCache, TeaCacheCalibration, apply_residual,
                                  bubbling_union, cache_context, cache_update, caching_error, disable,
                                  disable_block_cache, enable, enable_block_cache, fit_teacache_coefficients,
                                  get_block_cache, optimal_update_steps, relative_l1, relative_l1_residual,
                                  schedule_value)

__all__ = ["Always", "BACSchedule", "BWCache", "BlockCache", "FirstBlockCache", "Never", "Policy", "RecordFeatures",
           "TaylorSeer", "TeaCache", "TeaCacheCalibration", "apply_residual", "bubbling_union", "cache_context",
           "cache_update", "caching_error", "disable", "disable_block_cache", "enable", "enable_block_cache",
           "fit_teacache_coefficients", "get_block_cache", "optimal_update_steps", "relative_l1",
           "relative_l1_residual", "schedule_value"]
