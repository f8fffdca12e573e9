"""``enable_block_cache`` / ``disable_block_cache``: cached-block skipping on any ``nn.ModuleList`` of blocks.

How a block is wrapped: its ``forward`` is replaced by an instance attribute (the module, its parameters and its
``state_dict`` keys stay as they are) that hands the call to the policy. A computed block records its residual
``out - in``; a skipped block returns ``in + cached residual`` (``apply_residual``); a skipped run of blocks
passes its input through and its last block adds the run's cached residual.

Where decisions are taken (see ``BlockCache.run``): every policy computes its skip decision as a device tensor.
In eager mode the decision is read once per decision point (one host synchronisation per step for the dynamic
policies, none for the static BAC schedule, whose host copy is used). Under ``torch.compile`` nothing is read
on the host: each block becomes a ``torch.cond`` between the block and ``in + residual`` (the one way to really
skip the work inside a graph; arithmetic blending would compute every block), and cache writes become
``cache_update`` calls gated by the decision tensor, so the whole sampler step compiles with ``fullgraph=True``.

Classifier-free guidance: each branch key has its own caches, counters and step index. A sampler that runs
the two branches as separate calls names them with :meth:`BlockCache.branch` (``with cache.branch("uncond"):``);
a sampler that batches both branches in one call keeps them apart for free, because every cached tensor is
per row. The policies' ``per_sample=True`` option makes a batched decision on the worst row (max of per-sample
indicators), so a batch skips only when every branch would.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from blockops.ops.block_cache import cache_update, relative_l1_residual

_ATTR = "_blockops_block_cache"


def _compiling() -> bool:
    return torch.compiler.is_compiling()


class BlockCall:
    """One call of a wrapped block: the module, its arguments with the hidden states taken out, and ``__call__(x)``
    running the original forward on new hidden states ``x`` (the first positional argument, or the keyword
    ``hidden_states`` / ``x``)."""

    def __init__(self, index, module, forward, args, kwargs):
        self.index, self.module, self.forward, self.args, self.kwargs = index, module, forward, args, kwargs
        if args:
            self.x, self.key = args[0], None
        else:
            self.key = next((k for k in ("hidden_states", "x") if k in kwargs), None)
            if self.key is None:
                raise TypeError(f"blockops.block_cache: block {index} was called without hidden states (a first positional "
                                "argument, or hidden_states= / x=)")
            self.x = kwargs[self.key]
        if not isinstance(self.x, torch.Tensor):
            raise TypeError(f"blockops.block_cache: block {index}'s hidden states must be a tensor, got {type(self.x).__name__}")
        self.x = self.x.contiguous()  # the kernels read [B, T, C] row-major (a no-op for the usual layout)

    def __call__(self, x):
        if self.key is None:
            out = self.forward(x, *self.args[1:], **self.kwargs)
        else:
            out = self.forward(**{**self.kwargs, self.key: x})
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = type(out).__name__ if not isinstance(out, torch.Tensor) else f"shape {tuple(out.shape)}"
            raise TypeError(f"blockops.block_cache: block {self.index} returned {got}; a cached block must return one tensor "
                            f"shaped like its hidden states {tuple(x.shape)}")
        return out.contiguous()


class BranchState:
    """Caches, counters and the step index of one branch (one classifier-free-guidance branch, say)."""

    def __init__(self, num_blocks: int, device: torch.device):
        self.step = torch.full((), -1, dtype=torch.int64, device=device)   # this generation's step, on device
        self.step_host = -1          # its host mirror (eager mode only)
        self.computed = torch.zeros(num_blocks, dtype=torch.int64, device=device)  # counters on device
        self.skipped = torch.zeros(num_blocks, dtype=torch.int64, device=device)
        self.computed_host = [0] * num_blocks    # eager counters: no kernel launch per block
        self.skipped_host = [0] * num_blocks
        self.tensors: dict[str, torch.Tensor] = {}   # the policy's caches
        self.run_skip = False         # the decision of the current skipped run (bool, or a tensor when compiling)
        self.run_input = None         # the hidden states the run's residual is measured from

    def begin_step(self):
        self.step.add_(1)
        if not _compiling():
            self.step_host += 1


class BlockCache:
    """The cache attached to one block list by :func:`enable_block_cache`: policy, per-branch state, counters."""

    def __init__(self, blocks: nn.ModuleList, policy, blocks_name: str):
        self.blocks, self.policy, self.blocks_name = blocks, policy, blocks_name
        self.num_blocks = len(blocks)
        self.num_steps: int | None = getattr(policy, "num_steps", None)
        self._branch = None
        self._states: dict = {}
        policy.check(self)

    # ---- state ----------------------------------------------------------------------------------------------
    def state(self, device) -> BranchState:
        st = self._states.get(self._branch)
        if st is None:
            st = self._states[self._branch] = BranchState(self.num_blocks, device)
        return st

    def reset(self, num_steps: int | None = None) -> None:
        """Forget every cache and counter (a new generation); ``num_steps`` is the sampler's step count, which
        BWCache, TeaCache (last step) and BAC schedules need."""
        self._states.clear()
        if num_steps is not None:
            self.num_steps = int(num_steps)

    def free_tensors(self) -> None:
        """Drop the cached tensors (memory), keep the counters readable."""
        for st in self._states.values():
            st.tensors.clear()
            st.run_input = None

    @contextlib.contextmanager
    def branch(self, key):
        """Calls inside use the caches of branch ``key`` (e.g. ``"cond"`` / ``"uncond"``)."""
        previous, self._branch = self._branch, key
        try:
            yield self
        finally:
            self._branch = previous

    # ---- helpers for the policies -----------------------------------------------------------------------------
    def decide(self, pred: torch.Tensor, host: bool | None = None):
        """A skip decision: the tensor itself when compiling, else a Python bool (``host`` when the caller has it,
        otherwise read from the tensor: the one synchronisation of a decision point)."""
        if _compiling():
            return pred
        return bool(pred) if host is None else host

    def run(self, skip, call: BlockCall, x: torch.Tensor, skipped=None) -> torch.Tensor:
        """The block's output: ``skipped(x)`` where ``skip`` holds (``None``: the input passed through), else the
        block. ``skip`` is a Python bool, or a 0-dim bool tensor (compiling: ``torch.cond``)."""
        if isinstance(skip, bool):
            if not skip:
                return call(x)
            return x if skipped is None else skipped(x)
        # torch.cond's branches may not return their inputs: the pass-through copies (cheap next to a block).
        skip_fn = (lambda h: h.clone()) if skipped is None else skipped
        return torch.cond(skip, skip_fn, call, (x,))

    def count(self, st: BranchState, i: int, skip) -> None:
        if isinstance(skip, bool):
            if _compiling():
                (st.skipped if skip else st.computed)[i] += 1
            elif skip:
                st.skipped_host[i] += 1
            else:
                st.computed_host[i] += 1
            return
        st.skipped[i] += skip.long()
        st.computed[i] += (~skip).long()

    def save_residual(self, st: BranchState, name: str, out, x, skip, reference=None, stride: int = 1,
                      per_sample: bool = False, compare_residual: bool = False):
        """Cache ``out - x`` as ``st.tensors[name]`` unless the block was skipped; with a ``reference``, returns the
        relative L1 indicator of the fused pass (``relative_l1_residual``), reduced to one value per batch
        (the max over samples when per_sample). Skipped (bool): nothing is written, returns None."""
        buf = st.tensors.get(name)
        if isinstance(skip, bool) and skip:
            return None
        out, x = out.detach(), x.detach()  # caches hold values, not graphs (skipping is an inference method)
        if buf is None or isinstance(skip, bool):
            if buf is None:
                buf = st.tensors[name] = torch.empty_like(out, memory_format=torch.contiguous_format)
            if reference is None:
                torch.sub(out, x, out=buf)
                return None
            ind = relative_l1_residual(out, x, reference, buf, stride, per_sample, compare_residual)
        else:  # compiling, decision on device: compute into a fresh tensor, copy where the block ran
            fresh = torch.empty_like(buf)
            if reference is None:
                torch.sub(out, x, out=fresh)
                ind = None
            else:
                ind = relative_l1_residual(out, x, reference, fresh, stride, per_sample, compare_residual)
            cache_update(buf, fresh, ~skip)
        if ind is not None and per_sample:
            ind = ind.max()
        return ind

    def save(self, st: BranchState, name: str, value: torch.Tensor, skip=False) -> None:
        """Copy ``value`` into the cache ``st.tensors[name]`` unless skipped (a gated copy when compiling)."""
        buf = st.tensors.get(name)
        value = value.detach()
        if buf is None:
            st.tensors[name] = value.clone(memory_format=torch.contiguous_format)
        elif isinstance(skip, bool):
            if not skip:
                cache_update(buf, value.contiguous())
        else:
            cache_update(buf, value.contiguous(), ~skip)

    # ---- the wrapped forward ----------------------------------------------------------------------------------
    def _forward(self, index, module, original, *args, **kwargs):
        call = BlockCall(index, module, original, args, kwargs)
        st = self.state(call.x.device)
        if index == 0:
            st.begin_step()
        return self.policy.block_forward(self, st, index, call)

    # ---- counters -----------------------------------------------------------------------------------------------
    def counters(self) -> dict:
        """``{"computed": [...], "skipped": [...]}`` per block, summed over branches (reads device counters)."""
        computed, skipped = [0] * self.num_blocks, [0] * self.num_blocks
        for st in self._states.values():
            dev_c, dev_s = st.computed.tolist(), st.skipped.tolist()
            for i in range(self.num_blocks):
                computed[i] += st.computed_host[i] + dev_c[i]
                skipped[i] += st.skipped_host[i] + dev_s[i]
        return {"computed": computed, "skipped": skipped}

    def summary(self) -> str:
        c = self.counters()
        total_c, total_s = sum(c["computed"]), sum(c["skipped"])
        ratio = total_s / max(1, total_c + total_s)
        lines = [f"block cache on {self.blocks_name} ({self.num_blocks} blocks), policy {self.policy!r}, "
                 f"branches {len(self._states)}: {total_c} block calls computed, {total_s} skipped "
                 f"(skip ratio {ratio:.1%})",
                 "  block  computed  skipped"]
        lines += [f"  {i:5d}  {c['computed'][i]:8d}  {c['skipped'][i]:7d}" for i in range(self.num_blocks)]
        return "\n".join(lines)

    def __repr__(self):
        return f"BlockCache({self.blocks_name}, {self.num_blocks} blocks, {self.policy!r})"


# ---------------------------------------------------------------------------------------------------------
# Finding the block list
# ---------------------------------------------------------------------------------------------------------

def _candidate_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """ModuleLists of at least two modules of one class, outermost first, not nested in another candidate."""
    found = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) >= 2 and len({type(m) for m in mod}) == 1:
            if not any(name.startswith(outer + ".") for outer, _ in found):
                found.append((name, mod))
    return found


def _find_blocks(model: nn.Module, blocks_attr: str | None) -> tuple[str, nn.ModuleList]:
    if isinstance(model, nn.ModuleList) and blocks_attr is None:
        return "ModuleList", model
    if blocks_attr is not None:
        obj = model
        for part in blocks_attr.split("."):
            if not hasattr(obj, part):
                raise ValueError(f"blockops.block_cache: {type(model).__name__} has no attribute path {blocks_attr!r}")
            obj = getattr(obj, part)
        if not isinstance(obj, nn.ModuleList) or len(obj) == 0:
            raise ValueError(f"blockops.block_cache: {blocks_attr!r} is a {type(obj).__name__}, not a non-empty nn.ModuleList "
                             "of blocks")
        return blocks_attr, obj
    found = _candidate_lists(model)
    if not found:
        raise ValueError(f"blockops.block_cache: {type(model).__name__} has no nn.ModuleList of blocks (at least two modules "
                         "of one class); pass the list itself or blocks_attr='name.of.list'")
    if len(found) > 1:
        raise ValueError(f"blockops.block_cache: {type(model).__name__} has several block lists "
                         f"{[n for n, _ in found]}; name one with blocks_attr=")
    return found[0]


def enable_block_cache(blocks_or_model: nn.Module, policy, blocks_attr: str | None = None) -> BlockCache:
    """Wrap the blocks of ``blocks_or_model`` (an ``nn.ModuleList``, or a model holding exactly one list of
    same-class blocks, or the list at ``blocks_attr``, a dotted attribute path) so that ``policy`` decides, step
    by step, which blocks run. Returns the :class:`BlockCache` (also reachable as ``get_block_cache(model)``).

    Blocks must be called in list order once per sampler step, with the hidden states as first positional
    argument (or ``hidden_states=`` / ``x=``), and return one tensor of the same shape.
    """
    from blockops.block_cache.policies import Policy

    if not isinstance(policy, Policy):
        raise TypeError(f"blockops.block_cache: policy must be a blockops.block_cache policy, got {type(policy).__name__}")
    if getattr(blocks_or_model, _ATTR, None) is not None:
        raise RuntimeError("blockops.block_cache: a block cache is already enabled here; disable_block_cache() first")
    name, blocks = _find_blocks(blocks_or_model, blocks_attr)
    if any("forward" in vars(b) for b in blocks):
        raise RuntimeError(f"blockops.block_cache: the blocks of {name} already have a patched forward (another cache?)")
    cache = BlockCache(blocks, policy, name)
    for i, block in enumerate(blocks):
        original = block.forward

        def forward(*args, _i=i, _block=block, _original=original, **kwargs):
            return cache._forward(_i, _block, _original, *args, **kwargs)

        block.forward = forward
    setattr(blocks_or_model, _ATTR, cache)
    return cache


def get_block_cache(model: nn.Module) -> BlockCache:
    cache = getattr(model, _ATTR, None)
    if cache is None:
        raise RuntimeError(f"blockops.block_cache: no block cache is enabled on this {type(model).__name__}")
    return cache


def disable_block_cache(model: nn.Module) -> None:
    """Restore the blocks' own forward and drop every cached tensor (the returned :class:`BlockCache` keeps its
    counters, so ``summary()`` still works)."""
    cache = get_block_cache(model)
    for block in cache.blocks:
        vars(block).pop("forward", None)
    cache.free_tensors()
    delattr(model, _ATTR)


@contextlib.contextmanager
def cache_context(model: nn.Module, num_steps: int | None = None):
    """One generation: caches and counters start empty; ``num_steps`` (the sampler's step count) is what BWCache,
    TeaCache and BAC schedules count from. On exit the cached tensors are freed; the counters stay readable
    (``summary()``) until the next generation."""
    cache = get_block_cache(model)
    cache.reset(num_steps)
    try:
        yield cache
    finally:
        cache.free_tensors()
