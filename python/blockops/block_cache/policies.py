"""Skip policies for :func:`blockops.block_cache.enable_block_cache` (facts: shared/reference/caching.md).

Every policy implements ``block_forward(cache, state, i, call) -> output`` for block ``i`` of a step, using the
:class:`~blockops.block_cache.api.BlockCache` helpers (``run``, ``save_residual``, ``save``, ``count``, ``decide``);
decisions are device tensors (see api.py for how eager and compiled runs use them).

| policy | compared | skips |
|---|---|---|
| ``Never`` | - | nothing (the uncached model) |
| ``Always(warmup_steps)`` | - | every block after the warm-up steps |
| ``FirstBlockCache(threshold)`` | block 0's residual vs its last computed one | blocks 1..N-1 as one run |
| ``TeaCache(threshold, coefficients)`` | block 0's (modulated) input vs the previous step's, through a polynomial, accumulated | all blocks as one run |
| ``BWCache(threshold, reuse_steps)`` | every block's output vs its last computed one (mean) | all blocks, R of every R+1 steps in a window after triggering |
| ``BACSchedule`` (bac.py) | offline similarities | each block on its own static schedule |
"""
from __future__ import annotations

import numpy as np
import torch

from blockops.ops.block_cache import apply_residual, relative_l1, relative_l1_residual


class Policy:
    """Base class: ``check(cache)`` validates the policy against the block list when it is enabled."""

    def check(self, cache) -> None:
        pass

    def block_forward(self, cache, st, i: int, call):
        raise NotImplementedError

    def __repr__(self):
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


def _reuse_block(cache, st, i, call, skip):
    """Per-block residual reuse: skip -> input + this block's cached residual; computed -> cache out - in."""
    name = f"r{i}"
    if name not in st.tensors:
        skip = False  # nothing cached yet: the first step of a generation always computes
    out = cache.run(skip, call, call.x, lambda h: apply_residual(h, st.tensors[name]))
    cache.save_residual(st, name, out, call.x, skip)
    cache.count(st, i, skip)
    return out


def _stack_run_block(cache, st, i, call, first):
    """Block i of a run of blocks ``first..N-1`` skipped together under ``st.run_skip``: inside the run the
    input passes through, the last block adds the run's cached residual (output - the run's input)."""
    last = i == cache.num_blocks - 1
    skip = st.run_skip
    if i == first:
        st.run_input = call.x
    if not last:
        out = cache.run(skip, call, call.x)
    else:
        out = cache.run(skip, call, call.x, lambda h: apply_residual(h, st.tensors["run"]))
        cache.save_residual(st, "run", out, st.run_input, skip)
    cache.count(st, i, skip)
    return out


class Never(Policy):
    """Computes every block (for tests and as the uncached baseline through the same wrapper)."""

    def block_forward(self, cache, st, i, call):
        cache.count(st, i, False)
        return call(call.x)


class Always(Policy):
    """Computes every block during the first ``warmup_steps`` steps (caching residuals), then reuses each block's
    last residual at every later step."""

    def __init__(self, warmup_steps: int = 1):
        if warmup_steps < 1:
            raise ValueError(f"Always: warmup_steps must be at least 1 (a residual must exist), got {warmup_steps}")
        self.warmup_steps = warmup_steps

    def block_forward(self, cache, st, i, call):
        skip = cache.decide(st.step >= self.warmup_steps, host=st.step_host >= self.warmup_steps)
        return _reuse_block(cache, st, i, call, skip)


def _reduce(ind, per_sample):
    return ind.max() if per_sample else ind


class FirstBlockCache(Policy):
    """First-block cache (ParaAttention / diffusers): block 0 always runs; when the relative L1 change of its
    residual ``f0(x) - x`` against the residual of the last computed step is below ``threshold``, blocks 1..N-1
    are skipped together (their combined cached residual is added). The cached residuals are updated only on
    computed steps. Typical thresholds 0.05-0.12."""

    def __init__(self, threshold: float, stride: int = 1, per_sample: bool = False):
        if threshold < 0:
            raise ValueError(f"FirstBlockCache: threshold must be >= 0, got {threshold}")
        self.threshold, self.stride, self.per_sample = float(threshold), int(stride), per_sample

    def check(self, cache):
        if cache.num_blocks < 2:
            raise ValueError("FirstBlockCache needs at least two blocks (block 0 always runs)")

    def block_forward(self, cache, st, i, call):
        if i > 0:
            return _stack_run_block(cache, st, i, call, first=1)
        out = call(call.x)
        cache.count(st, 0, False)
        prev = st.tensors.get("r0")
        if prev is None or "run" not in st.tensors:
            st.run_skip = False
            cache.save_residual(st, "r0", out, call.x, False)
            return out
        fresh = torch.empty_like(prev)
        ind = relative_l1_residual(out, call.x, prev, fresh, self.stride, self.per_sample, compare_residual=True)
        skip_t = _reduce(ind, self.per_sample) < self.threshold
        skip = cache.decide(skip_t)
        # The reference residual moves only when the rest of the stack is computed.
        if isinstance(skip, bool):
            if not skip:
                st.tensors["r0"] = fresh
        else:
            cache.save(st, "r0", fresh, skip)
        st.run_skip = skip
        return out


def _poly(coefficients, x):
    """Horner's rule, coefficients highest degree first (``np.polyfit``'s order)."""
    y = torch.zeros_like(x)
    for c in coefficients:
        y = y * x + c
    return y


class TeaCache(Policy):
    """TeaCache: the relative L1 change of block 0's modulated input between adjacent steps, rescaled by the
    fitted polynomial, is accumulated; while the sum stays below ``threshold`` the whole block stack is skipped
    (the cached residual of the stack is added) and the sum is reset whenever the stack runs. The first step and
    the last step (when the step count is known) always run.

    Args:
        threshold: e.g. 0.25 / 0.4 / 0.6 / 0.8 (1.5-2.25x on FLUX).
        coefficients: polynomial, highest degree first (``np.polyfit`` order, :func:`fit_teacache_coefficients`).
        modulated_input: ``fn(block0, args, kwargs) -> tensor``, what to compare (TeaCache uses block 0's
            ``norm1(x, temb)``); default: block 0's hidden states.
    """

    def __init__(self, threshold: float, coefficients=(1.0, 0.0), modulated_input=None, stride: int = 1,
                 per_sample: bool = False):
        self.threshold = float(threshold)
        self.coefficients = [float(c) for c in coefficients]
        if not self.coefficients:
            raise ValueError("TeaCache: coefficients must not be empty")
        self.modulated_input, self.stride, self.per_sample = modulated_input, int(stride), per_sample

    def block_forward(self, cache, st, i, call):
        if i == 0:
            self._decide(cache, st, call)
        return _stack_run_block(cache, st, i, call, first=0)

    def _decide(self, cache, st, call):
        m = call.x if self.modulated_input is None else self.modulated_input(call.module, call.args, call.kwargs)
        prev = st.tensors.get("m")
        if prev is None or "run" not in st.tensors:
            st.run_skip = False
            st.tensors["acc"] = torch.zeros((), dtype=torch.float32, device=m.device)
        else:
            ind = _reduce(relative_l1(m.contiguous(), prev, self.stride, self.per_sample), self.per_sample)
            acc = st.tensors["acc"] + _poly(self.coefficients, ind)
            skip_t = acc < self.threshold
            if cache.num_steps is not None:
                skip_t = skip_t & (st.step != cache.num_steps - 1)
            st.tensors["acc"] = torch.where(skip_t, acc, torch.zeros_like(acc))
            st.run_skip = cache.decide(skip_t)
        cache.save(st, "m", m)  # the previous modulated input moves every step


class BWCache(Policy):
    """BWCache: at every computed step, the mean over blocks of the relative L1 change of each block's output
    against its last computed output is measured (on ``indicator_blocks`` only when given). The first computed
    step k >= 1 where it falls below ``threshold`` triggers reuse: in the first half of the steps remaining
    after k (steps k+1 .. k + (N-k-1)//2) every block reuses its cached residual for ``reuse_steps`` steps and is
    recomputed at every ``reuse_steps + 1``-th step after k (refreshing the caches); every other step computes.
    One trigger per generation.

    Args:
        threshold: delta, about 0.15.
        reuse_steps: R, default ``max(1, round(0.1 * num_steps))``.
        indicator_blocks: None (all), an int s (every s-th block) or a list of block indices.
        num_steps: the sampler's step count (or pass it to ``cache_context``).
    """

    def __init__(self, threshold: float = 0.15, reuse_steps: int | None = None, indicator_blocks=None,
                 num_steps: int | None = None, stride: int = 1, per_sample: bool = False):
        if reuse_steps is not None and reuse_steps < 1:
            raise ValueError(f"BWCache: reuse_steps must be at least 1, got {reuse_steps}")
        self.threshold, self.reuse_steps, self.indicator_blocks = float(threshold), reuse_steps, indicator_blocks
        self.num_steps, self.stride, self.per_sample = num_steps, int(stride), per_sample

    def check(self, cache):
        self._measured = self._measured_blocks(cache.num_blocks)

    def _measured_blocks(self, n):
        ib = self.indicator_blocks
        if ib is None:
            return set(range(n))
        if isinstance(ib, int):
            if ib < 1:
                raise ValueError(f"BWCache: indicator_blocks as a stride must be >= 1, got {ib}")
            return set(range(0, n, ib))
        blocks = set(int(b) for b in ib)
        if not blocks or any(not 0 <= b < n for b in blocks):
            raise ValueError(f"BWCache: indicator_blocks {sorted(blocks)} must be non-empty and within [0, {n})")
        return blocks

    def _reuse(self, num_steps):
        return self.reuse_steps if self.reuse_steps is not None else max(1, round(0.1 * num_steps))

    def block_forward(self, cache, st, i, call):
        n_steps = cache.num_steps
        if n_steps is None:
            raise ValueError("BWCache needs the sampler's step count: BWCache(num_steps=...) or "
                             "blockops.block_cache.cache_context(model, num_steps=...)")
        if i == 0:
            self._decide(cache, st, n_steps)
        skip = st.run_skip
        name = f"r{i}"
        measured = i in self._measured and f"h{i}" in st.tensors
        out = cache.run(skip, call, call.x, lambda h: apply_residual(h, st.tensors[name]))
        if measured:
            ind = cache.save_residual(st, name, out, call.x, skip, reference=st.tensors[f"h{i}"],
                                      stride=self.stride, per_sample=self.per_sample)
            if ind is not None:
                st.tensors["ind_sum"] = st.tensors["ind_sum"] + ind
        else:
            cache.save_residual(st, name, out, call.x, skip)
        if i in self._measured:
            cache.save(st, f"h{i}", out, skip)
        cache.count(st, i, skip)
        if i == cache.num_blocks - 1 and "ind_sum" in st.tensors:
            self._maybe_trigger(st, skip)
        return out

    def _decide(self, cache, st, n_steps):
        if f"r{cache.num_blocks - 1}" not in st.tensors:  # first step: nothing cached
            st.run_skip = False
            st.tensors["k"] = torch.full((), -1, dtype=torch.int64, device=st.step.device)
            return
        t, k = st.step, st.tensors["k"]
        r = self._reuse(n_steps)
        window_end = k + 1 + (n_steps - k - 1) // 2
        skip_t = (k >= 0) & (t > k) & (t < window_end) & ((t - k) % (r + 1) != 0)
        st.run_skip = cache.decide(skip_t)
        st.tensors["ind_sum"] = torch.zeros((), dtype=torch.float32, device=t.device)  # measured from now on

    def _maybe_trigger(self, st, skip):
        if isinstance(skip, bool) and skip:
            return
        mean = st.tensors["ind_sum"] / len(self._measured)
        k, t = st.tensors["k"], st.step
        fire = (k < 0) & (mean < self.threshold)
        if not isinstance(skip, bool):
            fire = fire & ~skip
        st.tensors["k"] = torch.where(fire, t, k)


class RecordFeatures(Never):
    """Computes every block and records each block's output per call (fp32, on the CPU), for
    :meth:`similarities` -> ``BACSchedule.fit``. Offline calibration: it synchronises."""

    def __init__(self):
        self.features: dict[int, list[torch.Tensor]] = {}

    def block_forward(self, cache, st, i, call):
        out = super().block_forward(cache, st, i, call)
        self.features.setdefault(i, []).append(out.detach().float().cpu().flatten())
        return out

    def similarities(self) -> torch.Tensor:
        """``[num_blocks, N, N]`` cosine similarities between every pair of recorded steps of each block."""
        sims = []
        for i in sorted(self.features):
            f = torch.nn.functional.normalize(torch.stack(self.features[i]).double(), dim=1)
            sims.append(f @ f.t())
        return torch.stack(sims)


class TeaCacheCalibration(Never):
    """Computes every block and records, per step, the relative L1 change of block 0's modulated input and of
    the stack's output (both against the previous step), for :func:`fit_teacache_coefficients`."""

    def __init__(self, modulated_input=None):
        self.modulated_input = modulated_input
        self.input_changes: list[float] = []
        self.output_changes: list[float] = []
        self._prev_in = self._prev_out = None

    def block_forward(self, cache, st, i, call):
        if i == 0:
            m = call.x if self.modulated_input is None else self.modulated_input(call.module, call.args, call.kwargs)
            m = m.detach().contiguous()
            if self._prev_in is not None and self._prev_in.shape == m.shape:
                self.input_changes.append(float(relative_l1(m, self._prev_in)))
            self._prev_in = m.clone()
        out = super().block_forward(cache, st, i, call)
        if i == cache.num_blocks - 1:
            o = out.detach().contiguous()
            if self._prev_out is not None and self._prev_out.shape == o.shape:
                self.output_changes.append(float(relative_l1(o, self._prev_out)))
            self._prev_out = o.clone()
        return out


def fit_teacache_coefficients(input_changes, output_changes, degree: int = 4) -> list[float]:
    """Least-squares polynomial (``np.polyfit``, highest degree first) mapping the recorded relative L1 change
    of the modulated input to that of the output, as TeaCache calibrates per model."""
    x = np.asarray(input_changes, dtype=np.float64)
    y = np.asarray(output_changes, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"fit_teacache_coefficients: need two equally long 1-D sequences, got {x.shape} and {y.shape}")
    if x.size <= degree:
        raise ValueError(f"fit_teacache_coefficients: a degree-{degree} fit needs more than {degree} points, got {x.size}")
    return [float(c) for c in np.polyfit(x, y, degree)]
