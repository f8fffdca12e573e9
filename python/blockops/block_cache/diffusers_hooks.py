"""One-call cached-block skipping on a diffusers pipeline or transformer: :func:`enable` / :func:`disable`
(re-exported as ``blockops.cache.enable`` / ``blockops.block_cache.enable``).

What :func:`enable` does, through diffusers' public hook registry (``diffusers.hooks.HookRegistry``, the extension
point its own FirstBlockCache / TaylorSeer caches use), without patching any diffusers class:

* finds the transformer (``pipe.transformer``, or the model itself) and its block lists in call order
  (``transformer_blocks`` then ``single_transformer_blocks`` for Flux / HunyuanVideo, ``transformer_blocks`` for
  DiT / PixArt / SD3, ``blocks`` for Wan) and wraps them with :func:`~blockops.block_cache.enable_block_cache`
  (dual-stream blocks keep one cached residual per stream);
* registers a stateful diffusers hook on the transformer. diffusers pipelines reset stateful hooks when a
  generation ends (``maybe_free_model_hooks`` -> ``_reset_stateful_cache``, on transformers with diffusers'
  ``CacheMixin``: Flux, SD3, Wan, ...): the hook then frees the cached tensors and the next transformer call
  starts a new generation (caches, counters and per-step statistics start empty; the finished generation's
  ``stats()`` and ``summary()`` stay readable until then). For transformers without it (DiT, PixArt) a call
  after a branch's last step (the step count being known) starts the new generation. Pipelines that name
  their calls with ``transformer.cache_context("cond" / "uncond", ...)`` (Flux with true CFG, Wan) get one cache
  branch per name, and their ``num_inference_steps`` when they pass it.
* the step count (what BWCache and TeaCache's last-step rule need) comes from the policy, the pipeline's context,
  ``pipe._num_timesteps`` or ``len(pipe.scheduler.timesteps)`` at the first call of a generation, in that order.

A transformer called step by step without a pipeline works the same way; mark generations with
``blockops.block_cache.cache_context(transformer, num_steps)`` (or call ``transformer._reset_stateful_cache()``).
"""
from __future__ import annotations

from torch import nn

from blockops.block_cache.api import disable_block_cache, enable_block_cache, get_block_cache

HOOK_NAME = "blockops_block_cache"

# Block lists of the diffusers transformers, in the order their forward runs them.
BLOCK_LISTS = (("transformer_blocks", "single_transformer_blocks"), ("blocks",))


def _transformer(obj) -> nn.Module:
    if isinstance(obj, nn.Module):
        return obj
    t = getattr(obj, "transformer", None)
    if isinstance(t, nn.Module):
        return t
    raise TypeError(f"blockops.cache.enable: expected a diffusers pipeline with a .transformer or an nn.Module, "
                    f"got {type(obj).__name__}")


def _block_lists(transformer: nn.Module):
    """The known block-list attributes present on ``transformer`` (None: let enable_block_cache search)."""
    for names in BLOCK_LISTS:
        present = [n for n in names if isinstance(getattr(transformer, n, None), nn.ModuleList)
                   and len(getattr(transformer, n)) > 0]
        if present:
            return present
    return None


def _make_hook(cache, pipe):
    """The diffusers hook (built lazily: diffusers is only needed when a diffusers model is cached)."""
    from diffusers.hooks.hooks import ModelHook, StateManager

    class _Context(StateManager):
        """diffusers sets every stateful hook's StateManager context around a named call: follow it."""

        def __init__(self):
            super().__init__(object)

        def set_context(self, context):
            super().set_context(context)
            cache._branch = None if context is None else context.name
            steps = None if context is None else getattr(context, "num_inference_steps", None)
            if steps is not None and cache.num_steps is None:
                cache.num_steps = int(steps)

    class BlockCacheHook(ModelHook):
        _is_stateful = True

        def __init__(self):
            super().__init__()
            self.context = _Context()
            self.pending_reset = False

        def pre_forward(self, module, *args, **kwargs):
            st = cache._states.get(cache._branch)
            finished = st is not None and cache.num_steps is not None and st.step_host >= cache.num_steps - 1
            if self.pending_reset or finished:
                self.pending_reset = False
                cache.reset()
                cache.num_steps = getattr(cache.policy, "num_steps", None)
            if cache.num_steps is None and pipe is not None:
                steps = getattr(pipe, "_num_timesteps", None)
                if steps is None and getattr(getattr(pipe, "scheduler", None), "timesteps", None) is not None:
                    steps = len(pipe.scheduler.timesteps)
                if steps:
                    cache.num_steps = int(steps)
            return args, kwargs

        def reset_state(self, module):
            # The generation ended: free the tensors now, keep counters and stats readable, start afresh next call.
            cache.free_tensors()
            self.pending_reset = True
            cache.num_steps = getattr(cache.policy, "num_steps", None)
            return module

    return BlockCacheHook()


def enable(pipe_or_transformer, policy, blocks_attr=None, outputs=None):
    """Enable cached-block skipping with ``policy`` on a diffusers pipeline (its ``.transformer``) or a
    transformer (any ``nn.Module``; diffusers models also get the generation-reset hook). Returns the
    :class:`~blockops.block_cache.BlockCache` (``stats()``, ``cached_steps()``, ``summary()``).

    ``blocks_attr`` / ``outputs``: as for :func:`~blockops.block_cache.enable_block_cache` (by default the
    diffusers block lists and the known output layouts of their blocks)."""
    transformer = _transformer(pipe_or_transformer)
    lists = blocks_attr if blocks_attr is not None else _block_lists(transformer)
    cache = enable_block_cache(transformer, policy, blocks_attr=lists, outputs=outputs)
    try:
        from diffusers import ModelMixin
        from diffusers.hooks import HookRegistry
    except ImportError:
        return cache
    if isinstance(transformer, ModelMixin):
        pipe = None if pipe_or_transformer is transformer else pipe_or_transformer
        registry = HookRegistry.check_if_exists_or_initialize(transformer)
        registry.register_hook(_make_hook(cache, pipe), HOOK_NAME)
        registry.invalidate_child_registries_cache()
    return cache


def disable(pipe_or_transformer):
    """Remove what :func:`enable` added (blocks' forwards, the hook); returns the cache, whose counters and stats
    stay readable."""
    transformer = _transformer(pipe_or_transformer)
    cache = get_block_cache(transformer)
    registry = getattr(transformer, "_diffusers_hook", None)
    if registry is not None and registry.get_hook(HOOK_NAME) is not None:
        registry.remove_hook(HOOK_NAME, recurse=False)
        registry.invalidate_child_registries_cache()
    disable_block_cache(transformer)
    return cache
