"""``enable_block_cache`` / ``disable_block_cache``: cached-block skipping on any ``nn.ModuleList`` of blocks.

How a block is wrapped: its ``forward`` is replaced by an instance attribute (the module, its parameters and its
``state_dict`` keys stay as they are) that hands the call to the policy. A computed block records its residual
``out - in``; a skipped block returns ``in + cached residual`` (``apply_residual``); a skipped run of blocks
passes its input through and its last block adds the run's cached residual.

Streams: a block that returns a tuple (dual-stream Flux / SD3 / HunyuanVideo blocks update the image and the text
tokens) is seen as a dict stream name -> tensor (``BlockLayout`` / ``BlockCall``); every residual above is kept
per stream, the skip indicators read the hidden-states stream, and the wrapper hands the block's own tuple back.

Statistics: in eager mode every (branch, step) is recorded with its skipped blocks and the policy's indicator
(``BlockCache.stats()``, ``cached_steps()``), until the next generation starts (``cache_context`` / ``reset``).

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
import inspect

import torch
from torch import nn

from blockops.ops.block_cache import cache_update, relative_l1_residual

_ATTR = "_blockops_block_cache"


def _compiling() -> bool:
    return torch.compiler.is_compiling()


# Output layouts of the diffusers blocks that return several streams: the input each returned tensor continues
# (checked against the installed diffusers 0.42 sources; a block of another class is learnt from its first call).
KNOWN_OUTPUTS = {
    "FluxTransformerBlock": ("encoder_hidden_states", "hidden_states"),
    "FluxSingleTransformerBlock": ("encoder_hidden_states", "hidden_states"),
    "JointTransformerBlock": ("encoder_hidden_states", "hidden_states"),          # SD3 (the last: None, hidden)
    "HunyuanVideoTransformerBlock": ("hidden_states", "encoder_hidden_states"),
    "HunyuanVideoSingleTransformerBlock": ("hidden_states", "encoder_hidden_states"),
    "HunyuanVideoTokenReplaceTransformerBlock": ("hidden_states", "encoder_hidden_states"),
    "HunyuanVideoTokenReplaceSingleTransformerBlock": ("hidden_states", "encoder_hidden_states"),
}


class BlockLayout:
    """How one block is called and what it returns: ``params`` (its forward's positional parameter names, to find
    a stream passed positionally), ``outputs`` (None until known: the stream name each returned tensor continues,
    in return order; ``single`` when the block returns one tensor)."""

    def __init__(self, forward, outputs=None):
        try:
            sig = inspect.signature(forward)
            self.params = [p.name for p in sig.parameters.values()
                           if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        except (TypeError, ValueError):
            self.params = []
        self.outputs = tuple(outputs) if outputs is not None else None
        self.single = False

    def learn(self, index, out, streams: dict):
        """The first computed call: a tensor continues the primary stream; a tuple's tensors are matched to the
        tensor arguments by shape (an error when that is ambiguous: name them with ``outputs=``)."""
        if isinstance(out, torch.Tensor):
            self.single, self.outputs = True, None
            return
        if not isinstance(out, (tuple, list)):
            raise TypeError(f"blockops.block_cache: block {index} returned {type(out).__name__}; a cached block must "
                            "return a tensor or a tuple of tensors")
        names = []
        for j, o in enumerate(out):
            match = [n for n, x in streams.items() if isinstance(o, torch.Tensor) and x.shape == o.shape]
            if len(match) != 1:
                raise TypeError(f"blockops.block_cache: block {index} returned a tuple whose element {j} "
                                f"({'None' if o is None else tuple(o.shape)}) matches {len(match)} of its tensor inputs "
                                f"{ {n: tuple(x.shape) for n, x in streams.items()} } by shape; name what each element "
                                "continues with outputs=(...), e.g. ('encoder_hidden_states', 'hidden_states')")
            names.append(match[0])
        if len(set(names)) != len(names):
            raise TypeError(f"blockops.block_cache: block {index}'s outputs all match {names} by shape; pass outputs=")
        self.outputs = tuple(names)


class BlockCall:
    """One call of a wrapped block: the module, its arguments, its streams ``xs`` (name -> tensor: the hidden states,
    plus every other input the block returns an update of, e.g. ``encoder_hidden_states`` for dual-stream blocks)
    and ``__call__(xs)`` running the original forward on new streams, returning ``{name: tensor or None}``.
    ``x`` is the primary stream (the first positional argument, or ``hidden_states=`` / ``x=``): the one the
    policies' indicators measure."""

    def __init__(self, index, module, forward, args, kwargs, layout: BlockLayout):
        self.index, self.module, self.forward, self.args, self.kwargs = index, module, forward, args, kwargs
        self.layout = layout
        if args:
            self.key = None
            self.primary = layout.params[0] if layout.params else "hidden_states"
            x = args[0]
        else:
            self.key = next((k for k in ("hidden_states", "x") if k in kwargs), None)
            if self.key is None:
                raise TypeError(f"blockops.block_cache: block {index} was called without hidden states (a first positional "
                                "argument, or hidden_states= / x=)")
            self.primary = self.key
            x = kwargs[self.key]
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"blockops.block_cache: block {index}'s hidden states must be a tensor, got {type(x).__name__}")
        names = layout.outputs if layout.outputs is not None else (self.primary,)
        if self.primary not in names:
            raise TypeError(f"blockops.block_cache: block {index} returns {names}, not its hidden states {self.primary!r}")
        self.xs = {self.primary: x.contiguous()}  # the kernels read [B, T, C] row-major (a no-op for the usual layout)
        for n in names:
            if n != self.primary:
                v = self._get(n)
                if not isinstance(v, torch.Tensor):
                    raise TypeError(f"blockops.block_cache: block {index} returns a {n!r} stream but was called with "
                                    f"{n}={type(v).__name__}")
                self.xs[n] = v.contiguous()
        self.x = self.xs[self.primary]

    def _get(self, name):
        if name == self.primary:
            return self.args[0] if self.key is None else self.kwargs[self.key]
        if name in self.kwargs:
            return self.kwargs[name]
        if name in self.layout.params and self.layout.params.index(name) < len(self.args):
            return self.args[self.layout.params.index(name)]
        return None

    def _tensor_inputs(self):
        """Every tensor argument by name (what a tuple's elements are matched against on the first call)."""
        found = {}
        for j, a in enumerate(self.args):
            if isinstance(a, torch.Tensor) and j < len(self.layout.params):
                found[self.layout.params[j]] = a
        found.update({k: v for k, v in self.kwargs.items() if isinstance(v, torch.Tensor)})
        if self.key is None:
            found[self.primary] = self.args[0]
        return found

    def __call__(self, xs: dict) -> dict:
        args, kwargs = list(self.args), dict(self.kwargs)
        for n, v in xs.items():
            if n == self.primary and self.key is None:
                args[0] = v
            elif n in kwargs or n == self.key:
                kwargs[n] = v
            elif n in self.layout.params and self.layout.params.index(n) < len(args):
                args[self.layout.params.index(n)] = v
            else:
                kwargs[n] = v
        out = self.forward(*args, **kwargs)
        lay = self.layout
        if lay.outputs is None and not lay.single:
            lay.learn(self.index, out, {**self._tensor_inputs(), **xs})
            for n in lay.outputs or ():   # the first call knew only the primary stream: add the others' inputs
                if n not in xs and isinstance(self._get(n), torch.Tensor):
                    xs[n] = self._get(n).contiguous()
        if lay.single:
            if not isinstance(out, torch.Tensor) or out.shape != xs[self.primary].shape:
                got = type(out).__name__ if not isinstance(out, torch.Tensor) else f"shape {tuple(out.shape)}"
                raise TypeError(f"blockops.block_cache: block {self.index} returned {got}; it returned one tensor shaped "
                                f"like its hidden states {tuple(xs[self.primary].shape)} before")
            return {self.primary: out.contiguous()}
        if not isinstance(out, (tuple, list)) or len(out) != len(lay.outputs):
            raise TypeError(f"blockops.block_cache: block {self.index} returned {type(out).__name__}; expected a tuple "
                            f"of {len(lay.outputs)} continuing {lay.outputs}")
        res = {}
        for n, o in zip(lay.outputs, out):
            if o is not None and (not isinstance(o, torch.Tensor) or (n in xs and o.shape != xs[n].shape)):
                got = type(o).__name__ if not isinstance(o, torch.Tensor) else f"shape {tuple(o.shape)}"
                raise TypeError(f"blockops.block_cache: block {self.index}'s output {n!r} is {got}, its input "
                                f"{tuple(xs[n].shape) if n in xs else '-'}")
            res[n] = None if o is None else o.contiguous()
        return res

    def pack(self, outs: dict):
        """The block's own return value from the streams."""
        if self.layout.single or self.layout.outputs is None:
            return outs[self.primary]
        return tuple(outs.get(n) for n in self.layout.outputs)


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
        self.indicator = None         # what the policy measured this step (a 0-dim device tensor), for stats()
        self.forecast = False         # this step's skipped run used a forecast residual
        self.consecutive_host = 0     # cached steps in a row (eager mirror of the device counter)
        self.cached_host = 0          # cached steps in this generation (eager)
        self.step_skipped: list[int] = []   # blocks skipped in the current step (eager)

    def begin_step(self):
        self.step.add_(1)
        if not _compiling():
            self.step_host += 1


class BlockCache:
    """The cache attached to one block list by :func:`enable_block_cache`: policy, per-branch state, counters."""

    def __init__(self, blocks, policy, blocks_name: str, outputs=None):
        self.blocks, self.policy, self.blocks_name = list(blocks), policy, blocks_name
        self.num_blocks = len(self.blocks)
        self.outputs = outputs
        self.layouts: list[BlockLayout | None] = [None] * self.num_blocks
        self.steps: list[dict] = []   # one record per (branch, step), eager mode: see stats()
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
        self.steps = []
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

    def run(self, skip, call: BlockCall, xs: dict, skipped=None) -> dict:
        """The block's output streams: ``skipped(xs)`` where ``skip`` holds (``None``: the inputs passed through),
        else the block. ``skip`` is a Python bool, or a 0-dim bool tensor (compiling: ``torch.cond`` over the
        streams, which must then all be tensors)."""
        if isinstance(skip, bool):
            if not skip:
                return call(xs)
            return dict(xs) if skipped is None else skipped(xs)
        names = list(xs)

        def as_dict(fn):
            # Both branches return the streams in the inputs' order (a block may return them in another order).
            return lambda *t: tuple(fn(dict(zip(names, t)))[n] for n in names)

        # torch.cond's branches may not return their inputs: the pass-through copies (cheap next to a block).
        skip_fn = as_dict((lambda h: {n: v.clone() for n, v in h.items()}) if skipped is None else skipped)
        return dict(zip(names, torch.cond(skip, skip_fn, as_dict(call), tuple(xs.values()))))

    def count(self, st: BranchState, i: int, skip) -> None:
        if isinstance(skip, bool):
            if _compiling():
                (st.skipped if skip else st.computed)[i] += 1
            elif skip:
                st.skipped_host[i] += 1
                st.step_skipped.append(i)
            else:
                st.computed_host[i] += 1
            return
        st.skipped[i] += skip.long()
        st.computed[i] += (~skip).long()

    def save_residual(self, st: BranchState, name: str, outs: dict, xs: dict, skip, reference=None, stride: int = 1,
                      per_sample: bool = False, compare_residual: bool = False, primary=None):
        """Cache every stream's ``out - x`` as ``st.tensors[name]`` (a dict stream -> tensor, None where the block
        returned None for that stream) unless the block was skipped; with a ``reference``, returns the relative L1
        indicator of the fused pass (``relative_l1_residual``) on the ``primary`` stream, reduced to one value per
        batch (the max over samples when per_sample). Skipped (bool): nothing is written, returns None."""
        if isinstance(skip, bool) and skip:
            return None
        bufs = st.tensors.get(name)
        if bufs is None:
            bufs = st.tensors[name] = {n: None if o is None else torch.empty_like(o, memory_format=torch.contiguous_format)
                                       for n, o in outs.items()}
        ind = None
        for n, out in outs.items():
            if out is None:
                continue
            x, buf = xs[n], bufs[n]
            if x.shape != out.shape:
                raise RuntimeError(f"blockops.block_cache: stream {n!r} changed shape from {tuple(x.shape)} to "
                                   f"{tuple(out.shape)} across a cached run; a skipped run needs the same shapes")
            out, x = out.detach(), x.detach()  # caches hold values, not graphs (skipping is an inference method)
            ref = reference if n == primary else None
            target = buf if isinstance(skip, bool) else torch.empty_like(buf)
            if ref is None:
                torch.sub(out, x, out=target)
            else:
                ind = relative_l1_residual(out, x, ref, target, stride, per_sample, compare_residual)
            if not isinstance(skip, bool):  # compiling, decision on device: copy where the block ran
                cache_update(buf, target, ~skip)
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
        layout = self.layouts[index]
        if layout is None:
            outputs = self.outputs if self.outputs is not None else KNOWN_OUTPUTS.get(type(module).__name__)
            layout = self.layouts[index] = BlockLayout(original, outputs)
        call = BlockCall(index, module, original, args, kwargs, layout)
        st = self.state(call.x.device)
        if index == 0:
            st.begin_step()
            st.indicator, st.forecast, st.step_skipped = None, False, []
        outs = self.policy.block_forward(self, st, index, call)
        if index == self.num_blocks - 1 and not _compiling():
            self._record_step(st)
        return call.pack(outs)

    def _record_step(self, st: BranchState) -> None:
        cached = bool(st.step_skipped)
        st.consecutive_host = st.consecutive_host + 1 if cached else 0
        st.cached_host += cached
        ind = st.indicator
        self.steps.append({"branch": self._branch, "step": st.step_host, "skipped_blocks": list(st.step_skipped),
                           "cached": cached, "forecast": st.forecast,
                           "indicator": ind.detach().clone() if isinstance(ind, torch.Tensor) else ind})

    def stats(self) -> list[dict]:
        """One record per (branch, step) of this generation, in call order (eager mode; compiled calls record
        nothing): ``branch``, ``step``, ``skipped_blocks`` (indices), ``cached`` (any block skipped), ``forecast``
        (the skipped run's residual was extrapolated), ``indicator`` (float or None: what the policy measured at
        that step: first-block cache the relative L1 change of block 0's residual, TeaCache the accumulated
        rescaled change, BWCache the mean change of the measured blocks' outputs)."""
        return [{**r, "indicator": float(r["indicator"]) if isinstance(r["indicator"], torch.Tensor) else r["indicator"]}
                for r in self.steps]

    def cached_steps(self, branch=None) -> list[int]:
        """The steps of ``branch`` (default: the default branch) where any block was skipped."""
        return [r["step"] for r in self.steps if r["branch"] == branch and r["cached"]]

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
        for key in dict.fromkeys(r["branch"] for r in self.steps):
            lines.append(f"  cached steps{'' if key is None else f' ({key})'}: {self.cached_steps(key)}")
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


def _find_blocks(model: nn.Module, blocks_attr) -> tuple[str, list]:
    """(name, blocks): the list itself, the list(s) at ``blocks_attr`` (a dotted path, or several run one after
    the other, e.g. Flux's ``["transformer_blocks", "single_transformer_blocks"]``), or the one candidate list."""
    if isinstance(model, nn.ModuleList) and blocks_attr is None:
        return "ModuleList", list(model)
    if blocks_attr is not None:
        names = [blocks_attr] if isinstance(blocks_attr, str) else list(blocks_attr)
        if not names:
            raise ValueError("blockops.block_cache: blocks_attr names no block list")
        blocks = []
        for path in names:
            obj = model
            for part in path.split("."):
                if not hasattr(obj, part):
                    raise ValueError(f"blockops.block_cache: {type(model).__name__} has no attribute path {path!r}")
                obj = getattr(obj, part)
            if not isinstance(obj, nn.ModuleList) or len(obj) == 0:
                raise ValueError(f"blockops.block_cache: {path!r} is a {type(obj).__name__}, not a non-empty "
                                 "nn.ModuleList of blocks")
            blocks += list(obj)
        return "+".join(names), blocks
    found = _candidate_lists(model)
    if not found:
        raise ValueError(f"blockops.block_cache: {type(model).__name__} has no nn.ModuleList of blocks (at least two modules "
                         "of one class); pass the list itself or blocks_attr='name.of.list'")
    if len(found) > 1:
        raise ValueError(f"blockops.block_cache: {type(model).__name__} has several block lists "
                         f"{[n for n, _ in found]}; name one (or several, in call order) with blocks_attr=")
    return found[0][0], list(found[0][1])


def enable_block_cache(blocks_or_model: nn.Module, policy, blocks_attr=None, outputs=None) -> BlockCache:
    """Wrap the blocks of ``blocks_or_model`` (an ``nn.ModuleList``, or a model holding exactly one list of
    same-class blocks, or the list(s) at ``blocks_attr``: a dotted attribute path, or a sequence of them whose
    blocks run one list after the other) so that ``policy`` decides, step by step, which blocks run. Returns the
    :class:`BlockCache` (also reachable as ``get_block_cache(model)``).

    Blocks must be called in order once per sampler step, with the hidden states as first positional argument
    (or ``hidden_states=`` / ``x=``). A block returns one tensor shaped like them, or a tuple of several streams
    (dual-stream blocks: Flux, SD3, HunyuanVideo), each an updated input of the block; each stream gets its own
    cached residual. ``outputs`` names the input each returned element continues, in return order (e.g.
    ``("encoder_hidden_states", "hidden_states")``); by default it is known for the diffusers block classes in
    ``KNOWN_OUTPUTS`` and otherwise learnt on the first call by matching shapes. A ``None`` element (SD3's last
    block drops the text stream) stays ``None`` when the block is skipped.
    """
    from blockops.block_cache.policies import Policy

    if not isinstance(policy, Policy):
        raise TypeError(f"blockops.block_cache: policy must be a blockops.block_cache policy, got {type(policy).__name__}")
    if getattr(blocks_or_model, _ATTR, None) is not None:
        raise RuntimeError("blockops.block_cache: a block cache is already enabled here; disable_block_cache() first")
    name, blocks = _find_blocks(blocks_or_model, blocks_attr)
    if any("forward" in vars(b) for b in blocks):
        raise RuntimeError(f"blockops.block_cache: the blocks of {name} already have a patched forward (another cache?)")
    cache = BlockCache(blocks, policy, name, outputs)
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
