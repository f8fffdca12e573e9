"""A small masked diffusion LM with seeded random weights, for measuring and testing blockops.dllm's generation loops.

Pre-norm transformer (RMSNorm, RoPE attention, SiLU MLP, tied embeddings), following the model protocol of
blockops.dllm.generate: ``forward(input_ids, position_ids=None, past_key_values=None, use_cache=False)`` returns the
logits of the fed tokens; with a cache every layer calls ``past_key_values.update(k, v, layer)`` and attends over
what it returns (slot s = position s).

Attention: ``block_length=None`` is bidirectional (LLaDA-style: dense ``F.scaled_dot_product_attention``, there is
no mask to exploit); an int makes it block-causal (Fast-dLLM v2 / SDAR-style): a full-sequence forward uses
blockops' ``block_sparse_attention`` with ``masks.block_diffusion`` (the kernel visits only the tiles at or below
the block diagonal), a cached forward whose queries lie in one block needs no mask (every returned key is in that
block or before it), anything else a dense boolean mask.

The weights are random, so the "text" is meaningless; ``logit_scale`` sharpens the output distribution so that
confidences spread over (0, 1) as a trained model's do, and several positions pass a 0.9 threshold per step.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from blockops.attention import block_sparse_attention, masks


def _rope(x: torch.Tensor, position_ids: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary embedding of x [B, H, n, D] at positions [B, n] (rotate-half convention)."""
    half = x.shape[-1] // 2
    freq = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angle = position_ids.float()[:, None, :, None] * freq                      # [B, 1, n, half]
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.up = nn.Linear(dim, mlp_ratio * dim, bias=False)
        self.down = nn.Linear(mlp_ratio * dim, dim, bias=False)


class TinyDiffusionLM(nn.Module):
    def __init__(self, vocab_size: int = 512, dim: int = 128, heads: int = 4, layers: int = 2, mlp_ratio: int = 4,
                 block_length: int | None = None, logit_scale: float = 6.0, seed: int = 0,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if dim % heads or (dim // heads) % 8:
            raise ValueError(f"dim / heads must be a multiple of 8, got dim={dim}, heads={heads}")
        self.vocab_size, self.dim, self.block_length, self.logit_scale = vocab_size, dim, block_length, logit_scale
        self.embed = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads, mlp_ratio) for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if "norm" not in name:
                    p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1] if p.dim() > 1 else 1))
        self.to(dtype=dtype, device=device)
        self._mask_cache: dict[int, masks.BlockMask] = {}

    def _attend(self, q, k, v, position_ids):
        """q [B, H, n, D] at position_ids; k, v [B, H, S, D] at positions 0..S-1 (cache) or position_ids."""
        bl = self.block_length
        if bl is None:
            return F.scaled_dot_product_attention(q, k, v)
        n, S = q.shape[2], k.shape[2]
        q_block = position_ids // bl
        if S == n and bool((position_ids == torch.arange(n, device=q.device)).all()):
            mask = self._mask_cache.get(n)
            if mask is None:
                mask = self._mask_cache[n] = masks.block_diffusion(bl, n, device=q.device)
            return block_sparse_attention(q, k, v, mask)
        first, last = int(q_block.min()), int(q_block.max())
        if first == last and S <= (last + 1) * bl:
            return F.scaled_dot_product_attention(q, k, v)     # every key is in the queries' block or before
        visible = (torch.arange(S, device=q.device) // bl)[None, None, :] <= q_block[:, :, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None])

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None, past_key_values=None,
                use_cache: bool = False) -> torch.Tensor:
        B, n = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(n, device=input_ids.device).expand(B, n)
        h = self.embed(input_ids)
        for i, blk in enumerate(self.blocks):
            q, k, v = blk.qkv(blk.norm1(h)).view(B, n, 3, blk.heads, -1).permute(2, 0, 3, 1, 4)   # 3 x [B, H, n, D]
            q, k = _rope(q, position_ids), _rope(k, position_ids)
            if past_key_values is not None:
                k, v = past_key_values.update(k, v, i)
            a = self._attend(q, k, v, position_ids)
            h = h + blk.proj(a.transpose(1, 2).reshape(B, n, self.dim))
            h = h + blk.down(F.silu(blk.up(blk.norm2(h))))
        return self.logit_scale * (self.norm(h) @ self.embed.weight.t())
