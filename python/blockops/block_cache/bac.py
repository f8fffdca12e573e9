"""BAC's Adaptive Caching Scheduler (dynamic programming) and Bubbling Union.

For one block and ``N`` steps, ``sim[i, k]`` is the similarity (cosine, recorded offline) between the block's
feature at step ``i`` and at a later step ``k``. A schedule updates (computes) the block at steps
``0 = c_0 < c_1 < ... < c_M`` and reuses the feature of the last update at every other step; its value is

    sum_{m=0..M} phi(c_m, c_{m+1} - 1),   phi(i, j) = sum_{k=i+1..j} sim[i, k],   c_{M+1} = N

(each reused step scores its similarity to the step it reuses). :func:`optimal_update_steps` maximises it exactly
by dynamic programming over (number of updates so far, last update step) in O(M N^2).
"""
from __future__ import annotations

import torch

from blockops.block_cache.policies import Policy, _reuse_block


def _segment_values(sim: torch.Tensor) -> torch.Tensor:
    """phi as a table: ``seg[i, j] = sum_{k=i+1..j} sim[i, k]`` for ``j >= i`` (fp64)."""
    n = sim.shape[0]
    upper = torch.triu(sim.double(), diagonal=1)
    seg = torch.cumsum(upper, dim=1)
    return torch.triu(seg) if n else seg


def schedule_value(sim: torch.Tensor, updates) -> float:
    """The objective of a schedule (update steps, step 0 included or implied)."""
    n = sim.shape[0]
    steps = sorted(set(int(u) for u in updates) | {0})
    seg = _segment_values(sim)
    ends = steps[1:] + [n]
    return float(sum(seg[c, e - 1] for c, e in zip(steps, ends)))


def optimal_update_steps(sim: torch.Tensor, num_updates: int) -> list[int]:
    """The update steps ``[0, c_1, ..., c_M]`` (M = min(num_updates, N - 1)) maximising the BAC objective for one
    block's ``[N, N]`` similarity matrix. Ties go to the earliest steps."""
    n = sim.shape[0]
    if n == 0:
        return []
    m_total = max(0, min(int(num_updates), n - 1))
    seg = _segment_values(sim).tolist()
    neg = float("-inf")
    # best[m][c]: the best value of the segments that end before step c when c is the m-th update after step 0
    # (best[0][0] = 0, the segment of update 0 not yet counted); back[m][c] the update before c on that path.
    best = [[neg] * n for _ in range(m_total + 1)]
    back = [[-1] * n for _ in range(m_total + 1)]
    best[0][0] = 0.0
    for m in range(1, m_total + 1):
        for c in range(m, n):
            for p in range(m - 1, c):
                if best[m - 1][p] == neg:
                    continue
                v = best[m - 1][p] + seg[p][c - 1]
                if v > best[m][c]:
                    best[m][c], back[m][c] = v, p
    # Close the last segment at N - 1.
    last, value = -1, neg
    for c in range(n):
        if best[m_total][c] != neg and best[m_total][c] + seg[c][n - 1] > value:
            value, last = best[m_total][c] + seg[c][n - 1], c
    steps = [last]
    for m in range(m_total, 0, -1):
        steps.append(back[m][steps[-1]])
    return sorted(steps)


def caching_error(sim: torch.Tensor, update: torch.Tensor) -> float:
    """``sum over reused steps k of (1 - sim[c(k), k])`` with ``c(k)`` the last update at or before k: how much a
    block's schedule loses (the Bubbling Union ranks FFN blocks by it)."""
    err, last = 0.0, 0
    for k in range(sim.shape[0]):
        if bool(update[k]):
            last = k
        else:
            err += 1.0 - float(sim[last, k])
    return err


class BACSchedule(Policy):
    """A static per-block schedule: block ``b`` is computed at step ``t`` iff ``update[b, t]``, otherwise it
    returns its input plus the residual cached at its last computed step.

    Build it with :meth:`fit` from recorded similarities, or pass a bool ``update [num_blocks, num_steps]``
    (step 0 must be an update for every block: there is nothing to reuse before it).
    """

    def __init__(self, update: torch.Tensor):
        update = torch.as_tensor(update, dtype=torch.bool)
        if update.dim() != 2 or update.shape[1] == 0:
            raise ValueError(f"BACSchedule: update must be a bool [num_blocks, num_steps], got {tuple(update.shape)}")
        if not bool(update[:, 0].all()):
            raise ValueError("BACSchedule: every block must be updated at step 0 (nothing is cached before it)")
        self.update = update.cpu()
        self._host = self.update.tolist()   # eager decisions: no device read
        self._device = {}                   # compiled decisions: the schedule on the step counter's device

    @property
    def num_blocks(self) -> int:
        return self.update.shape[0]

    @property
    def num_steps(self) -> int:
        return self.update.shape[1]

    def __repr__(self):
        return (f"BACSchedule({self.num_blocks} blocks x {self.num_steps} steps, "
                f"{int(self.update.sum())} block updates of {self.update.numel()})")

    def check(self, cache) -> None:
        if cache.num_blocks != self.num_blocks:
            raise ValueError(f"BACSchedule: the schedule has {self.num_blocks} blocks, the block list {cache.num_blocks}")

    def block_forward(self, cache, st, i, call):
        if cache.num_steps is not None and cache.num_steps != self.num_steps:
            raise ValueError(f"BACSchedule: fitted for {self.num_steps} steps, the generation has {cache.num_steps}")
        if st.step_host >= self.num_steps:
            raise ValueError(f"BACSchedule: step {st.step_host} is past the schedule's {self.num_steps} steps; "
                             "use blockops.block_cache.cache_context(model) to start a new generation")
        if torch.compiler.is_compiling():
            device = st.step.device
            if device not in self._device:
                self._device[device] = self.update.to(device)
            step = st.step.clamp(max=self.num_steps - 1).view(1)
            skip = ~torch.index_select(self._device[device][i], 0, step)[0]  # tensor index: no .item()
        else:
            skip = not self._host[i][st.step_host]
        return _reuse_block(cache, st, i, call, skip)

    @classmethod
    def fit(cls, similarities: torch.Tensor, num_updates, ffn_blocks=(), bubble: int = 1) -> "BACSchedule":
        """BAC's scheduler, then its Bubbling Union.

        Args:
            similarities: ``[num_blocks, N, N]``, ``similarities[b, i, k]`` the similarity of block b's feature at
                step i to step k (only ``i < k`` is read), e.g. from :class:`blockops.block_cache.RecordFeatures`.
            num_updates: updates after step 0 per block (int, or one per block).
            ffn_blocks: indices of the FFN blocks (BAC schedules attention and FFN sub-blocks separately; pass
                the indices of the FFN entries of the block list).
            bubble: how many FFN blocks, those with the largest caching error under their own schedule, have
                their update steps unioned into every upstream block's schedule (blocks with a smaller index),
                so the inputs those FFNs see are refreshed whenever they are. 0 turns it off.
        """
        sims = torch.as_tensor(similarities)
        if sims.dim() != 3 or sims.shape[1] != sims.shape[2]:
            raise ValueError(f"BACSchedule.fit: similarities must be [num_blocks, N, N], got {tuple(sims.shape)}")
        nb, n = sims.shape[0], sims.shape[1]
        counts = [int(num_updates)] * nb if isinstance(num_updates, int) else [int(c) for c in num_updates]
        if len(counts) != nb or any(c < 0 for c in counts):
            raise ValueError(f"BACSchedule.fit: num_updates must be a non-negative int or one per block ({nb})")
        ffn = sorted(set(int(b) for b in ffn_blocks))
        if any(not 0 <= b < nb for b in ffn):
            raise ValueError(f"BACSchedule.fit: ffn_blocks {ffn} out of range for {nb} blocks")
        update = torch.zeros(nb, n, dtype=torch.bool)
        for b in range(nb):
            update[b, optimal_update_steps(sims[b], counts[b])] = True
        return cls(bubbling_union(update, sims, ffn, bubble))


def bubbling_union(update: torch.Tensor, similarities: torch.Tensor, ffn_blocks, bubble: int) -> torch.Tensor:
    """BAC's Bubbling Union on a bool ``update [num_blocks, N]``: the ``bubble`` FFN blocks with the largest
    :func:`caching_error` give their update steps to every block upstream of them (smaller index)."""
    update = update.clone()
    ranked = sorted(ffn_blocks, key=lambda b: -caching_error(similarities[b], update[b]))
    for b in ranked[:max(0, bubble)]:
        update[:b] |= update[b]
    return update
