"""Skip policies for :func:`blockops.block_cache.enable_block_cache` (facts: shared/reference/caching.md).

Every policy implements ``block_forward(cache, state, i, call) -> output`` for block ``i`` of a step, using the
:class:`~blockops.block_cache.api.BlockCache` helpers (``run``, ``save_residual``, ``save``, ``count``, ``decide``);
decisions are device tensors (see api.py for how eager and compiled runs use them). Blocks may carry several
streams (dual-stream blocks): a block's inputs and outputs are dicts stream name -> tensor, every cached residual
is per stream, and the indicators measure the primary stream (the hidden states).

The step-level policies take ``warmup_steps``, ``max_consecutive`` and ``max_cached`` (``_Limits``); the run-based
ones (first-block cache, TeaCache, TaylorSeer) can forecast the skipped run's residual (``forecast_order``) instead
of reusing the last one. Each step's decision and indicator are recorded for ``BlockCache.stats()``.

| policy | compared | skips |
|---|---|---|
| ``Never`` | - | nothing (the uncached model) |
| ``Always(warmup_steps)`` | - | every block after the warm-up steps |
| ``FirstBlockCache(threshold)`` | block 0's residual vs its last computed one | blocks 1..N-1 as one run |
| ``TeaCache(threshold, coefficients)`` | block 0's (modulated) input vs the previous step's, through a polynomial, accumulated | all blocks as one run |
| ``BWCache(threshold, reuse_steps)`` | every block's output vs its last computed one (mean) | all blocks, R of every R+1 steps in a window after triggering |
| ``TaylorSeer(interval, order)`` | - | all blocks, ``interval - 1`` of every ``interval`` steps after warm-up, residual forecast |
| ``BACSchedule`` (bac.py) | offline similarities | each block on its own static schedule |
"""
from __future__ import annotations

import math

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


def _apply(xs: dict, residuals: dict) -> dict:
    """A skipped block's (or run's) output streams: each input plus its cached residual; a stream the block
    returned as None when it last ran stays None."""
    return {n: None if r is None else apply_residual(xs[n], r) for n, r in residuals.items()}


def _reuse_block(cache, st, i, call, skip):
    """Per-block residual reuse: skip -> input + this block's cached residual; computed -> cache out - in."""
    name = f"r{i}"
    if name not in st.tensors:
        skip = False  # nothing cached yet: the first step of a generation always computes
    out = cache.run(skip, call, call.xs, lambda h: _apply(h, st.tensors[name]))
    cache.save_residual(st, name, out, call.xs, skip)
    cache.count(st, i, skip)
    return out


def _stack_run_block(cache, st, i, call, first):
    """Block i of a run of blocks ``first..N-1`` skipped together under ``st.run_skip``: inside the run the
    input streams pass through, the last block adds the run's cached residual per stream (output - the run's
    input), or, with the policy's ``forecast_order`` > 0, the residual extrapolated TaylorSeer-style."""
    last = i == cache.num_blocks - 1
    skip = st.run_skip
    if i == first:
        st.run_input = call.xs
    if not last:
        out = cache.run(skip, call, call.xs)
    else:
        order = getattr(cache.policy, "forecast_order", 0)
        if order and not isinstance(skip, bool):
            raise NotImplementedError(f"{type(cache.policy).__name__}: forecast_order > 0 runs in eager mode only "
                                      "(the forecast's step distances are host values); use forecast_order=0 under "
                                      "torch.compile")
        if skip is True and order and "taylor" in st.tensors:
            residual = _forecast(st)
            st.forecast = any(f is not None and len(f) > 1 for f in st.tensors["taylor"].values())
        else:
            residual = st.tensors.get("run")
        out = cache.run(skip, call, call.xs, lambda h: _apply(h, residual))
        cache.save_residual(st, "run", out, st.run_input, skip)
        if order and skip is False:
            _taylor_update(st, order)
    cache.count(st, i, skip)
    return out


def _taylor_update(st, order: int) -> None:
    """TaylorSeer's factors after a computed step t: ``f_0 = R_t`` and, recursively, ``f_{j+1} = (f_j(t) -
    f_j(t_prev)) / (t - t_prev)`` (divided differences against the previous computed step's factors, up to
    ``order``; fp32), as diffusers' TaylorSeerCacheHook and cache-dit's TaylorSeer calibrator compute them."""
    prev, prev_step = st.tensors.get("taylor"), st.tensors.get("taylor_step")
    t = st.step_host
    new = {}
    for n, r in st.tensors["run"].items():
        if r is None:
            new[n] = None
            continue
        factors = [r.float().clone()]   # a copy: the run buffer is overwritten in place at the next computed step
        if prev is not None and prev.get(n) is not None:
            for j in range(min(order, len(prev[n]))):
                if prev[n][j].shape != factors[j].shape:
                    break
                factors.append((factors[j] - prev[n][j]) / (t - prev_step))
        new[n] = factors
    st.tensors["taylor"], st.tensors["taylor_step"] = new, t


def _forecast(st) -> dict:
    """The run residual at the current step t from the factors of the last computed step c:
    ``sum_k f_k (t - c)^k / k!`` (fp32, rounded once to the residual's dtype)."""
    d = st.step_host - st.tensors["taylor_step"]
    out = {}
    for n, factors in st.tensors["taylor"].items():
        if factors is None:
            out[n] = None
            continue
        acc = factors[0].clone()
        for k in range(1, len(factors)):
            acc.add_(factors[k], alpha=d ** k / math.factorial(k))
        out[n] = acc.to(st.tensors["run"][n].dtype)
    return out


class _Limits:
    """Options shared by the step-level policies: ``warmup_steps`` (the first steps always compute),
    ``max_consecutive`` (at most that many cached steps in a row; then one computes) and ``max_cached`` (at most
    that many cached steps per generation and branch). The counters live on the device, so the gate adds no
    host synchronisation and compiles."""

    def _init_limits(self, warmup_steps, max_consecutive, max_cached):
        for name, v in (("warmup_steps", warmup_steps), ("max_consecutive", max_consecutive),
                        ("max_cached", max_cached)):
            if v is not None and v < 0:
                raise ValueError(f"{type(self).__name__}: {name} must be >= 0, got {v}")
        self.warmup_steps = int(warmup_steps or 0)
        self.max_consecutive = None if max_consecutive is None else int(max_consecutive)
        self.max_cached = None if max_cached is None else int(max_cached)

    def _gate(self, st, skip_t: torch.Tensor) -> torch.Tensor:
        if self.warmup_steps:
            skip_t = skip_t & (st.step >= self.warmup_steps)
        if self.max_consecutive is not None:
            run = st.tensors.get("consecutive")
            run = torch.zeros((), dtype=torch.int64, device=skip_t.device) if run is None else run
            skip_t = skip_t & (run < self.max_consecutive)
        if self.max_cached is not None:
            total = st.tensors.get("cached")
            total = torch.zeros((), dtype=torch.int64, device=skip_t.device) if total is None else total
            skip_t = skip_t & (total < self.max_cached)
            st.tensors["cached"] = total + skip_t.long()
        if self.max_consecutive is not None:
            st.tensors["consecutive"] = torch.where(skip_t, run + 1, torch.zeros_like(run))
        return skip_t


class Never(Policy):
    """Computes every block (for tests and as the uncached baseline through the same wrapper)."""

    def block_forward(self, cache, st, i, call):
        cache.count(st, i, False)
        return call(call.xs)


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


class FirstBlockCache(_Limits, Policy):
    """First-block cache (ParaAttention / diffusers): block 0 always runs; when the relative L1 change of its
    residual ``f0(x) - x`` (hidden-states stream) against the residual of the last computed step is below
    ``threshold``, blocks 1..N-1 are skipped together (their combined cached residual is added, per stream). The
    cached residuals are updated only on computed steps. Typical thresholds 0.05-0.12.

    ``warmup_steps`` / ``max_consecutive`` / ``max_cached``: see ``_Limits`` (cache-dit's ``max_warmup_steps``,
    ``max_continuous_cached_steps``, ``max_cached_steps``). ``forecast_order`` 1 or 2: on a skipped step the
    run's residual is extrapolated from the last computed ones (TaylorSeer, as cache-dit's DBCache + TaylorSeer);
    0 reuses the last one. Forecasting runs in eager mode only."""

    def __init__(self, threshold: float, stride: int = 1, per_sample: bool = False, warmup_steps: int = 0,
                 max_consecutive: int | None = None, max_cached: int | None = None, forecast_order: int = 0):
        if threshold < 0:
            raise ValueError(f"FirstBlockCache: threshold must be >= 0, got {threshold}")
        self.threshold, self.stride, self.per_sample = float(threshold), int(stride), per_sample
        self._init_limits(warmup_steps, max_consecutive, max_cached)
        self.forecast_order = _check_order(self, forecast_order, allow_zero=True)

    def check(self, cache):
        if cache.num_blocks < 2:
            raise ValueError("FirstBlockCache needs at least two blocks (block 0 always runs)")

    def block_forward(self, cache, st, i, call):
        if i > 0:
            return _stack_run_block(cache, st, i, call, first=1)
        outs = call(call.xs)
        out = outs[call.primary]
        cache.count(st, 0, False)
        prev = st.tensors.get("r0")
        if prev is None or "run" not in st.tensors:
            st.run_skip = False
            st.tensors["r0"] = (out - call.x).detach().contiguous()
            return outs
        fresh = torch.empty_like(prev)
        ind = relative_l1_residual(out, call.x, prev, fresh, self.stride, self.per_sample, compare_residual=True)
        ind = _reduce(ind, self.per_sample)
        st.indicator = ind
        skip_t = self._gate(st, ind < self.threshold)
        skip = cache.decide(skip_t)
        # The reference residual moves only when the rest of the stack is computed.
        if isinstance(skip, bool):
            if not skip:
                st.tensors["r0"] = fresh
        else:
            cache.save(st, "r0", fresh, skip)
        st.run_skip = skip
        return outs


def _check_order(policy, order, allow_zero=False):
    if order not in ((0, 1, 2) if allow_zero else (1, 2)):
        raise ValueError(f"{type(policy).__name__}: the forecast order must be {'0, ' if allow_zero else ''}1 or 2, "
                         f"got {order}")
    return int(order)


def _poly(coefficients, x):
    """Horner's rule, coefficients highest degree first (``np.polyfit``'s order)."""
    y = torch.zeros_like(x)
    for c in coefficients:
        y = y * x + c
    return y


class TeaCache(_Limits, Policy):
    """TeaCache: the relative L1 change of block 0's modulated input between adjacent steps, rescaled by the
    fitted polynomial, is accumulated; while the sum stays below ``threshold`` the whole block stack is skipped
    (the cached residual of the stack is added) and the sum is reset whenever the stack runs. The first step and
    the last step (when the step count is known) always run.

    Args:
        threshold: e.g. 0.25 / 0.4 / 0.6 / 0.8 (1.5-2.25x on FLUX).
        coefficients: polynomial, highest degree first (``np.polyfit`` order, :func:`fit_teacache_coefficients`).
        modulated_input: ``fn(block0, args, kwargs) -> tensor``, what to compare (TeaCache uses block 0's
            ``norm1(x, temb)``); default: block 0's hidden states.
        warmup_steps, max_consecutive, max_cached, forecast_order: as for :class:`FirstBlockCache`.
    """

    def __init__(self, threshold: float, coefficients=(1.0, 0.0), modulated_input=None, stride: int = 1,
                 per_sample: bool = False, warmup_steps: int = 0, max_consecutive: int | None = None,
                 max_cached: int | None = None, forecast_order: int = 0):
        self._init_limits(warmup_steps, max_consecutive, max_cached)
        self.forecast_order = _check_order(self, forecast_order, allow_zero=True)
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
            st.indicator = acc
            skip_t = acc < self.threshold
            if cache.num_steps is not None:
                skip_t = skip_t & (st.step != cache.num_steps - 1)
            skip_t = self._gate(st, skip_t)
            st.tensors["acc"] = torch.where(skip_t, acc, torch.zeros_like(acc))
            st.run_skip = cache.decide(skip_t)
        cache.save(st, "m", m)  # the previous modulated input moves every step


class BWCache(_Limits, Policy):
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
        warmup_steps, max_consecutive, max_cached: as for :class:`FirstBlockCache`.
    """

    def __init__(self, threshold: float = 0.15, reuse_steps: int | None = None, indicator_blocks=None,
                 num_steps: int | None = None, stride: int = 1, per_sample: bool = False, warmup_steps: int = 0,
                 max_consecutive: int | None = None, max_cached: int | None = None):
        self._init_limits(warmup_steps, max_consecutive, max_cached)
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
        outs = cache.run(skip, call, call.xs, lambda h: _apply(h, st.tensors[name]))
        if measured:
            ind = cache.save_residual(st, name, outs, call.xs, skip, reference=st.tensors[f"h{i}"],
                                      stride=self.stride, per_sample=self.per_sample, primary=call.primary)
            if ind is not None:
                st.tensors["ind_sum"] = st.tensors["ind_sum"] + ind
        else:
            cache.save_residual(st, name, outs, call.xs, skip)
        if i in self._measured:
            cache.save(st, f"h{i}", outs[call.primary], skip)
        cache.count(st, i, skip)
        if i == cache.num_blocks - 1 and "ind_sum" in st.tensors:
            self._maybe_trigger(st, skip)
        return outs

    def _decide(self, cache, st, n_steps):
        if f"r{cache.num_blocks - 1}" not in st.tensors:  # first step: nothing cached
            st.run_skip = False
            st.tensors["k"] = torch.full((), -1, dtype=torch.int64, device=st.step.device)
            return
        t, k = st.step, st.tensors["k"]
        r = self._reuse(n_steps)
        window_end = k + 1 + (n_steps - k - 1) // 2
        skip_t = (k >= 0) & (t > k) & (t < window_end) & ((t - k) % (r + 1) != 0)
        st.run_skip = cache.decide(self._gate(st, skip_t))
        st.tensors["ind_sum"] = torch.zeros((), dtype=torch.float32, device=t.device)  # measured from now on

    def _maybe_trigger(self, st, skip):
        if isinstance(skip, bool) and skip:
            return
        mean = st.tensors["ind_sum"] / len(self._measured)
        st.indicator = mean
        k, t = st.tensors["k"], st.step
        fire = (k < 0) & (mean < self.threshold)
        if not isinstance(skip, bool):
            fire = fire & ~skip
        st.tensors["k"] = torch.where(fire, t, k)


class TaylorSeer(Policy):
    """TaylorSeer (from reusing to forecasting): the first ``warmup_steps`` steps compute, then one step of every
    ``interval`` computes and the ``interval - 1`` steps between skip the whole block stack, adding the stack's
    residual (per stream) forecast from the computed steps by a Taylor expansion of order ``order`` whose
    derivatives are divided differences: after computed steps ``... < c' < c``, ``f_0 = R_c``,
    ``f_{j+1} = (f_j(c) - f_j(c')) / (c - c')``, and at step t, ``R(t) = sum_k f_k (t - c)^k / k!``. With fewer
    computed steps than ``order + 1`` the expansion stops at the order they allow (one: plain reuse).
    The schedule is static (no indicator, no synchronisation); forecasting runs in eager mode only."""

    def __init__(self, interval: int = 3, order: int = 1, warmup_steps: int = 2):
        if interval < 1:
            raise ValueError(f"TaylorSeer: interval must be >= 1, got {interval}")
        if warmup_steps < 1:
            raise ValueError(f"TaylorSeer: warmup_steps must be >= 1 (a residual must exist), got {warmup_steps}")
        self.interval, self.warmup_steps = int(interval), int(warmup_steps)
        self.forecast_order = _check_order(self, order)

    def block_forward(self, cache, st, i, call):
        if i == 0:
            if torch.compiler.is_compiling():
                raise NotImplementedError("TaylorSeer runs in eager mode only (its schedule and forecast use host steps)")
            t = st.step_host
            st.run_skip = t >= self.warmup_steps and (t - self.warmup_steps + 1) % self.interval != 0
            if "run" not in st.tensors:
                st.run_skip = False
        return _stack_run_block(cache, st, i, call, first=0)


class RecordFeatures(Never):
    """Computes every block and records each block's output per call (fp32, on the CPU), for
    :meth:`similarities` -> ``BACSchedule.fit``. Offline calibration: it synchronises."""

    def __init__(self):
        self.features: dict[int, list[torch.Tensor]] = {}

    def block_forward(self, cache, st, i, call):
        outs = super().block_forward(cache, st, i, call)
        self.features.setdefault(i, []).append(outs[call.primary].detach().float().cpu().flatten())
        return outs

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
        outs = super().block_forward(cache, st, i, call)
        if i == cache.num_blocks - 1:
            o = outs[call.primary].detach().contiguous()
            if self._prev_out is not None and self._prev_out.shape == o.shape:
                self.output_changes.append(float(relative_l1(o, self._prev_out)))
            self._prev_out = o.clone()
        return outs


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
