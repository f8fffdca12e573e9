"""Context parallelism over ``torch.distributed`` (NCCL on GPUs, gloo on CPUs): block-sparse Ring Attention and the
Blockwise Parallel Transformer's chunked feed-forward and LM head.

* :func:`ring_attention`: each rank holds a shard of the sequence (:func:`shard` / :func:`unshard`, layouts
  ``"zigzag"``, ``"contiguous"``, ``"striped"``); keys and values of the blocks a rank's queries can see under a
  global :class:`~blockops.attention.BlockMask` travel to it directly, and only those; exact forward and backward,
  bitwise deterministic. :func:`last_call_stats` gives the bytes and tiles of the latest call.
* :func:`blockwise_feed_forward`, :func:`blockwise_cross_entropy` (BPT): the feed-forward and the LM head + loss
  chunk by chunk, so neither the ``[T, d_ff]`` activation nor the ``[T, vocab]`` logits exist whole.

Design, schedule and limits: docs/context-parallel.md.
"""
from blockops.distributed.bpt import blockwise_cross_entropy, blockwise_feed_forward
from blockops.distributed.layout import LAYOUTS, STRIPE, positions, shard, unshard
from blockops.distributed.ring import RingStats, causal_mask, full_mask, last_call_stats, plan_stats, ring_attention

__all__ = ["LAYOUTS", "RingStats", "STRIPE", "blockwise_cross_entropy", "blockwise_feed_forward", "causal_mask",
           "full_mask", "last_call_stats", "plan_stats", "positions", "ring_attention", "shard", "unshard"]
