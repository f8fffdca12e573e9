"""Generation loops for masked diffusion LMs with Fast-dLLM's caches and confidence-aware parallel decoding.

:func:`generate` -- LLaDA / Dream-style bidirectional models, no cache / prefix cache / dual cache (Fast-dLLM v1).
:func:`generate_block_diffusion` -- Fast-dLLM v2 / SDAR-style block-causal models: block-level cache, sub-block
cache, token shift.

Model protocol (what both loops need, and all they use)
-------------------------------------------------------
``model(input_ids, position_ids=position_ids, past_key_values=cache, use_cache=bool)`` with

- ``input_ids`` int64 ``[B, n]``: the fed tokens; ``position_ids`` int64 ``[B, n]``: their sequence positions
  (rows may differ; the model must use them for its position encoding and never infer positions from the cache);
- ``past_key_values``: None (no cache: the fed tokens are positions ``0..n-1`` and attend only to each other), or
  a :class:`DiffusionKVCache`. Then every attention layer ``i`` calls, once per forward,
  ``k, v = past_key_values.update(k_new, v_new, i)`` with ``k_new``, ``v_new`` ``[B, H, n, D]`` for the fed tokens
  (HuggingFace's ``Cache.update`` contract) and attends over the returned ``k``, ``v`` ``[B', H, S, D]``, whose slot
  ``s`` is sequence position ``s``;
- returns the logits ``[B, n, V]`` of the fed tokens: a tensor, an object with ``.logits``, or a tuple whose first
  element is the logits.

Attention: bidirectional models (:func:`generate`) attend to every returned key; block-causal models
(:func:`generate_block_diffusion`) let a query at position ``p`` see keys at positions ``q`` with
``q // block_length <= p // block_length`` (the model's own block length, positions aligned at 0).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from blockops.ops.dllm import kv_overwrite, unmask

__all__ = ["DiffusionKVCache", "GenerateOutput", "GenerationStats", "generate", "generate_block_diffusion"]


# ---------------------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------------------

class DiffusionKVCache:
    """Per-layer K/V buffers ``[batch, H, length, D]`` (slot = sequence position) that the loops pass to the model
    as ``past_key_values``. Before each forward the loop says which slots the fed tokens occupy:

    - :meth:`feed_prefix` (``rows`` optional): the fed tokens are positions ``0..n-1`` of those rows; ``update``
      stores their K/V in slots ``[0, n)`` of the rows and returns them unchanged (the tokens attend to each other:
      the full forward that (re)fills the cache at a block start, or a prompt prefill);
    - :meth:`feed_window` (all rows): the fed tokens are positions ``positions [B, n]`` (per row); ``update``
      overwrites those slots (the per-row ``kv_overwrite`` kernel) and returns slots ``[0, kv_len)`` of every row.

    Prefix cache = a window from the block start to the end of the sequence; dual cache = a window over the
    current block only; the other slots keep what the last full forward stored.
    """

    def __init__(self, batch: int, length: int):
        self.batch, self.length = batch, length
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._rows: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None
        self._kv_len = length

    def feed_prefix(self, rows: torch.Tensor | None = None) -> None:
        self._rows, self._positions = rows, None

    def feed_window(self, positions: torch.Tensor, kv_len: int | None = None) -> None:
        self._rows, self._positions = None, positions.contiguous()
        self._kv_len = self.length if kv_len is None else kv_len

    def get_seq_length(self, layer_idx: int = 0) -> int:   # HuggingFace Cache API
        return self.length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None):
        if layer_idx == len(self.keys):
            for buffers, t in ((self.keys, key_states), (self.values, value_states)):
                buffers.append(t.new_zeros(self.batch, t.shape[1], self.length, t.shape[3]))
        elif layer_idx > len(self.keys):
            raise RuntimeError(f"DiffusionKVCache.update: layer {layer_idx} before layer {len(self.keys)}")
        k_buf, v_buf = self.keys[layer_idx], self.values[layer_idx]
        if self._positions is None:
            n = key_states.shape[2]
            if self._rows is None:
                k_buf[:, :, :n] = key_states
                v_buf[:, :, :n] = value_states
            else:
                k_buf[self._rows, :, :n] = key_states
                v_buf[self._rows, :, :n] = value_states
            return key_states, value_states
        # positions come from the loops, valid by construction: no index check (no host sync)
        kv_overwrite(k_buf, key_states.to(k_buf.dtype), self._positions, check_indices=False)
        kv_overwrite(v_buf, value_states.to(v_buf.dtype), self._positions, check_indices=False)
        return k_buf[:, :, :self._kv_len], v_buf[:, :, :self._kv_len]


# ---------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class GenerationStats:
    steps: int = 0                       # decoding steps (each unmasks >= 1 token in every row still decoding)
    model_calls: int = 0                 # forwards of the model
    fed_tokens: int = 0                  # sum over forwards of batch x fed length (a proxy for compute)
    unmasked_per_step: list[list[int]] = dataclasses.field(default_factory=list)   # [step][row]

    @property
    def tokens_per_step(self) -> float:
        """Mean tokens unmasked per step and decoding row."""
        counts = [c for step in self.unmasked_per_step for c in step if c > 0]
        return sum(counts) / max(len(counts), 1)


@dataclasses.dataclass
class GenerateOutput:
    sequences: torch.Tensor              # int64 [B, prompt + gen_length]
    stats: GenerationStats


def _logits_of(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"the model returned {type(out).__name__}; expected logits, an object with .logits or a tuple")


class _Caller:
    """Calls the model per the protocol and counts."""

    def __init__(self, model, mask_id: int, stats: GenerationStats):
        self.model, self.mask_id, self.stats = model, mask_id, stats
        vocab = getattr(model, "vocab_size", None) or getattr(getattr(model, "config", None), "vocab_size", None)
        if isinstance(vocab, int) and mask_id >= vocab:   # checked before the model embeds it
            raise ValueError(f"mask_id {mask_id} is outside the model's vocabulary of {vocab} tokens")

    def __call__(self, input_ids, position_ids, cache=None):
        logits = _logits_of(self.model(input_ids, position_ids=position_ids, past_key_values=cache,
                                        use_cache=cache is not None))
        self.stats.model_calls += 1
        self.stats.fed_tokens += input_ids.numel()
        if self.stats.model_calls == 1 and not 0 <= self.mask_id < logits.shape[-1]:
            raise ValueError(f"mask_id {self.mask_id} is outside the model's vocabulary of {logits.shape[-1]} tokens")
        # "Unmasking" a position to the mask token would leave it masked and could stall decoding forever (an
        # untrained model does predict it); a trained model gives it ~0 probability anyway.
        logits[..., self.mask_id] = float("-inf")
        return logits


def _check_common(input_ids, gen_length, block_length, threshold, factor, mask_id):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError("input_ids must be an int64 tensor [B, prompt_length], got "
                         f"{getattr(input_ids, 'dtype', type(input_ids))} {tuple(getattr(input_ids, 'shape', ()))}")
    if input_ids.shape[1] < 1:
        raise ValueError("input_ids must hold a prompt of at least one token")
    for name, v in (("gen_length", gen_length), ("block_length", block_length)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not isinstance(mask_id, int) or isinstance(mask_id, bool) or mask_id < 0:
        raise ValueError(f"mask_id must be a non-negative int token id, got {mask_id!r}")
    if (input_ids == mask_id).any():
        raise ValueError(f"the prompt contains mask_id {mask_id}; only generated positions may be masked")
    if factor is not None and not factor > 0:
        raise ValueError(f"factor must be positive, got {factor}")
    if threshold is not None and threshold != threshold:
        raise ValueError("threshold must not be NaN")


def _rule(threshold, factor) -> dict:
    if factor is not None:
        return dict(factor=float(factor))
    return dict(threshold=float("inf") if threshold is None else float(threshold))


def _start(model, input_ids, gen_length, mask_id, threshold, factor, cache: bool):
    """What both generators start from: the unmasking rule, the prompt followed by gen_length masks, the
    statistics, the counting model caller and (with ``cache``) an empty KV cache."""
    B, P = input_ids.shape
    x = torch.cat([input_ids, input_ids.new_full((B, gen_length), mask_id)], 1)
    stats = GenerationStats()
    kv = DiffusionKVCache(B, P + gen_length) if cache else None
    return _rule(threshold, factor), x, stats, _Caller(model, mask_id, stats), kv


def _apply(x, rows, cols, r):
    """x[rows, cols] <- the chosen tokens where unmasked; returns the per-row count unmasked."""
    x[rows[:, None], cols] = torch.where(r.unmask, r.tokens, x[rows[:, None], cols])
    return r.unmask.sum(1)


# ---------------------------------------------------------------------------------------------------------
# Bidirectional models (LLaDA, Dream): Fast-dLLM v1
# ---------------------------------------------------------------------------------------------------------

@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, gen_length: int, block_length: int, steps: int, threshold: float | None = 0.9,
             factor: float | None = None, cache: str | None = None, *, mask_id: int,
             refresh_interval: int | None = None) -> GenerateOutput:
    """Semi-autoregressive block decoding of a bidirectional masked diffusion LM (LLaDA's sampler with Fast-dLLM's
    caches and parallel decoding).

    The ``gen_length`` generated positions (after the prompt) start as ``mask_id`` and are decoded in blocks of
    ``block_length``, left to right. Each row has ``steps / (gen_length / block_length)`` steps per block; step
    ``t`` of a block unmasks at least ``k_t`` of the row's masked block positions (LLaDA's schedule: the block
    length spread evenly over the steps, the first ones taking the remainder) -- the most confident ones, by
    :func:`blockops.dllm.unmask` -- and, with ``threshold``, every one whose confidence exceeds it (Fast-dLLM's
    threshold rule) or, with ``factor`` (which takes precedence), the top ``n`` while ``(n + 1)(1 - c_n) < factor``.
    ``threshold=None, factor=None`` is LLaDA's plain low-confidence remasking: exactly ``k_t`` per step
    (``steps = gen_length`` gives one token per step). Decoding is greedy (argmax); the mask token's logit is set
    to -inf first (so a step always makes progress), confidences are the softmax over the other tokens.

    Rows advance independently: a row whose block is complete moves to its next block at the next step while the
    others continue, so rows may be in different blocks (per-row block bounds, cache positions and refreshes);
    a finished row stays in the batch without being decoded.

    Args:
        model: follows the protocol in this module's docstring (bidirectional attention).
        input_ids: int64 ``[B, P]`` prompts (same length, no ``mask_id``).
        cache: None (full forward every step), ``"prefix"`` (at a row's block start a full forward fills its cache;
            later steps feed positions from the block start to the end and reuse the cached prefix) or ``"dual"``
            (later steps feed only the current block; prefix and suffix come from the cache). With rows in
            different blocks, the prefix window starts at the earliest block start among the rows (rows further
            ahead recompute part of their decoded prefix, which is fresher, not staler).
        refresh_interval: with a cache, also redo the full forward after this many steps of a block (1: every step,
            which equals no cache). Default: only at block starts (Fast-dLLM).

    Returns :class:`GenerateOutput` ``(sequences [B, P + gen_length], stats)``.
    """
    _check_common(input_ids, gen_length, block_length, threshold, factor, mask_id)
    if gen_length % block_length:
        raise ValueError(f"gen_length {gen_length} must be a multiple of block_length {block_length}")
    num_blocks = gen_length // block_length
    if not isinstance(steps, int) or steps < num_blocks or steps % num_blocks:
        raise ValueError(f"steps must be a positive multiple of the number of blocks {num_blocks}, got {steps!r}")
    if cache not in (None, "prefix", "dual"):
        raise ValueError(f"cache must be None, 'prefix' or 'dual', got {cache!r}")
    if refresh_interval is not None and (not isinstance(refresh_interval, int) or refresh_interval < 1):
        raise ValueError(f"refresh_interval must be a positive int or None, got {refresh_interval!r}")

    device = input_ids.device
    B, P = input_ids.shape
    L = P + gen_length
    steps_per_block = steps // num_blocks
    base, extra = divmod(block_length, steps_per_block)
    schedule = [base + (t < extra) for t in range(steps_per_block)]
    rule, x, stats, call, kv = _start(model, input_ids, gen_length, mask_id, threshold, factor, cache)
    all_rows = torch.arange(B, device=device)
    positions_all = torch.arange(L, device=device)

    block = [-1] * B                 # current block per row (-1: not started)
    step_in_block = [0] * B
    since_refresh = [0] * B
    while True:
        # host bookkeeping, one sync: masked tokens left in each row's current block
        masked = x == mask_id
        starts = [P + min(max(bi, 0), num_blocks - 1) * block_length for bi in block]
        left = masked[all_rows[:, None], torch.tensor(starts, device=device)[:, None]
                      + torch.arange(block_length, device=device)].sum(1).tolist()
        refresh = [False] * B
        for b in range(B):
            if block[b] < num_blocks and (block[b] < 0 or left[b] == 0):
                block[b] += 1
                step_in_block[b] = since_refresh[b] = 0
                refresh[b] = True
        active = [b for b in range(B) if block[b] < num_blocks]
        if not active:
            break
        last = num_blocks - 1
        start = torch.tensor([P + min(block[b], last) * block_length for b in range(B)], device=device)
        bounds = torch.stack([start, start + block_length], 1)
        min_tokens = torch.tensor([schedule[min(step_in_block[b], steps_per_block - 1)] for b in range(B)],
                                  device=device)
        count = torch.zeros(B, dtype=torch.long, device=device)

        if kv is None:
            full_rows = active
        else:
            full_rows = [b for b in active if refresh[b] or (refresh_interval is not None
                                                             and since_refresh[b] >= refresh_interval)]
        window_rows = [b for b in active if b not in full_rows]

        # every forward of the step sees the tokens as they were at its start
        updates = []
        if full_rows:
            rows = torch.tensor(full_rows, device=device)
            if kv is not None:
                kv.feed_prefix(rows if len(full_rows) < B else None)
            logits = call(x[rows], positions_all.expand(len(full_rows), L), kv)
            r = unmask(logits, masked[rows].contiguous(), bounds[rows].contiguous(),
                       min_tokens=min_tokens[rows].contiguous(), **rule)
            updates.append((rows, positions_all.expand(len(full_rows), L), r))
            for b in full_rows:
                since_refresh[b] = 0
        if window_rows:
            if cache == "dual":
                win = start[:, None] + torch.arange(block_length, device=device)
            else:   # prefix: from the earliest block start among the decoding rows to the end, for every row
                first = min(P + block[b] * block_length for b in window_rows)
                win = torch.arange(first, L, device=device).expand(B, L - first)
            kv.feed_window(win)
            logits = call(x.gather(1, win), win, kv)
            decoding = torch.zeros(B, dtype=torch.bool, device=device)
            decoding[window_rows] = True
            masked_win = masked.gather(1, win) & decoding[:, None]
            r = unmask(logits, masked_win, (bounds - win[:, :1]).contiguous(), min_tokens=min_tokens, **rule)
            updates.append((all_rows, win, r))
        for rows, cols, r in updates:
            count.index_add_(0, rows, _apply(x, rows, cols, r))
        stats.unmasked_per_step.append(count.tolist())
        stats.steps += 1
        for b in active:
            step_in_block[b] += 1
            since_refresh[b] += 1
    return GenerateOutput(x, stats)


# ---------------------------------------------------------------------------------------------------------
# Block-causal models (Fast-dLLM v2, SDAR)
# ---------------------------------------------------------------------------------------------------------

@torch.inference_mode()
def generate_block_diffusion(model, input_ids: torch.Tensor, gen_length: int, block_length: int,
                             threshold: float | None = 0.9, factor: float | None = None, cache: str | None = None,
                             sub_block_length: int | None = None, *, mask_id: int) -> GenerateOutput:
    """Block diffusion decoding (Fast-dLLM v2) of a block-causal model adapted from an AR model.

    Blocks are aligned at position 0 (block ``k`` = positions ``[k * block_length, (k + 1) * block_length)``, the
    model's training layout); the blocks that hold the ``gen_length`` generated positions are decoded left to right
    (the first may start with prompt tokens, the last may be partial). A block is decoded sub-block by sub-block
    (``sub_block_length``, default the whole block); inside a sub-block each step unmasks the most confident masked
    position and every one above ``threshold`` (or by the ``factor`` rule). Token shift: the token at position
    ``p`` is read from the logits at ``p - 1`` (the AR convention); for a block's first position those come from
    the previous block's final forward. All rows decode the same sub-block; rows that finish it wait.

    Args:
        model: follows the module's protocol with block-causal attention of the same ``block_length``
            (checked against ``model.block_length`` when the model has that attribute).
        cache: None (each step runs the model on everything up to the current block's end), ``"block"`` (finished
            blocks enter the KV cache: a prompt prefill, then one forward per finished block; each step feeds only
            the current block -- exact, because earlier blocks never see later ones) or ``"sub_block"`` (also, at a
            sub-block's start the whole block is fed and cached; later steps feed only the sub-block, plus the
            position before it for the token shift, over the cached block: Fast-dLLM v2's sub-block cache, an
            approximation like the dual cache).

    Returns :class:`GenerateOutput`.
    """
    _check_common(input_ids, gen_length, block_length, threshold, factor, mask_id)
    if cache not in (None, "block", "sub_block"):
        raise ValueError(f"cache must be None, 'block' or 'sub_block', got {cache!r}")
    model_block = getattr(model, "block_length", None)
    if model_block is not None and model_block != block_length:
        raise ValueError(f"block_length {block_length} differs from the model's block_length {model_block}")
    sub = block_length if sub_block_length is None else sub_block_length
    if not isinstance(sub, int) or sub < 1 or block_length % sub:
        raise ValueError(f"sub_block_length must be a positive divisor of block_length {block_length}, got {sub!r}")

    device = input_ids.device
    B, P = input_ids.shape
    L = P + gen_length
    rule, x, stats, call, kv = _start(model, input_ids, gen_length, mask_id, threshold, factor, cache)
    rows = torch.arange(B, device=device)

    def span(a, c):
        return torch.arange(a, c, device=device).expand(B, c - a)

    def sub_bounds(n):               # every row: candidates are the whole fed sub-block
        return torch.tensor([0, n], device=device).expand(B, 2).contiguous()

    first_block = P // block_length
    prefill = first_block * block_length
    carry = None                     # logits [B, 1, V] at the position before the current block
    if kv is not None and prefill > 0:
        kv.feed_prefix()
        carry = call(x[:, :prefill], span(0, prefill), kv)[:, -1:]
    for k in range(first_block, -(-L // block_length)):
        s, e = k * block_length, min((k + 1) * block_length, L)
        for a in range(s, e, sub):
            c = min(a + sub, e)
            fresh = True
            while True:
                masked = x[:, a:c] == mask_id
                if not masked.any():
                    break
                # logits at positions [lo, c - 1) predict tokens [lo + 1, c); `shift_in` covers position a - 1
                if kv is None:
                    lo = max(a - 1, 0)
                    logits = call(x[:, :e], span(0, e))[:, lo:c - 1]
                else:
                    lo = s if cache == "block" or fresh else max(a - 1, s)
                    kv.feed_window(span(lo, e if cache == "block" or fresh else c), kv_len=e)
                    logits = call(x[:, lo:e] if cache == "block" or fresh else x[:, lo:c],
                                  span(lo, e if cache == "block" or fresh else c), kv)
                    logits = logits[:, max(a - 1, lo) - lo:c - 1 - lo]
                    lo = max(a - 1, lo)
                fresh = False
                if lo == a:             # position a - 1 was not fed: the carried logits, or a prompt position 0
                    head = carry if carry is not None and a == s and a > 0 else logits[:, :1]
                    logits = torch.cat([head, logits], 1)
                r = unmask(logits, masked.contiguous(), sub_bounds(c - a), **rule)
                count = _apply(x, rows, span(a, c), r)
                stats.unmasked_per_step.append(count.tolist())
                stats.steps += 1
        if kv is not None:                # the finished block enters the cache; its last logits start the next
            kv.feed_window(span(s, e), kv_len=e)
            carry = call(x[:, s:e], span(s, e), kv)[:, -1:]
    return GenerateOutput(x, stats)
