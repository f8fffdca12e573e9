"""Attention modules over a block mask: :class:`BlockSparseAttention` (q/k/v/out projections, grouped-query heads,
the mask fixed on the module or given per call) and :class:`BlockSparseMultiheadAttention`, its
``nn.MultiheadAttention``-convention twin made by :meth:`BlockSparseAttention.from_mha` and installed in whole models
by :func:`swap_attention`.

Masks are a :class:`~blockops.attention.BlockMask` built for the exact ``(q_len, kv_len)`` of the call, or a *mask
builder* ``(q_len, kv_len, device) -> BlockMask`` for inputs of varying length, e.g.::

    attn = BlockSparseAttention(1024, 16, num_kv_heads=4,
                                mask=lambda q, kv, dev: masks.causal(q, kv, device=dev))
    y = attn(x)                                   # x [B, T, 1024]; the causal mask for T is built once, then cached

Context parallel: with ``group=`` (a ``torch.distributed`` process group) the module takes this rank's shard of the
sequence (``blockops.distributed.shard``, by ``layout``) and runs :func:`blockops.distributed.ring_attention`; the
mask (or builder) is for the GLOBAL sequence, ``world * T_local`` positions.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Union

import torch
from torch import nn

from blockops.attention.block_mask import BlockMask, expected_block_mask
from blockops.attention.sparse_attention import block_sparse_attention

__all__ = ["BlockSparseAttention", "BlockSparseMultiheadAttention", "MaskBuilder", "swap_attention"]

MaskBuilder = Callable[[int, int, torch.device], BlockMask]
MaskLike = Union[BlockMask, MaskBuilder]

# Built masks kept per module: (source, q_len, kv_len, device) entries, oldest evicted first. Enough for a few
# sequence lengths on a few devices; inputs of ever-changing length rebuild instead of growing without bound.
_MASK_CACHE_SIZE = 16


def _check_mask_like(mask, what: str) -> None:
    if mask is not None and not isinstance(mask, BlockMask) and not callable(mask):
        raise expected_block_mask(mask, f"{what}: mask", ", a builder (q_len, kv_len, device) -> BlockMask, or None")


def _describe(mask) -> str:
    if mask is None:
        return "None"
    if isinstance(mask, BlockMask):
        return f"BlockMask(q_len={mask.q_len}, kv_len={mask.kv_len}, blocks={mask.block_q}x{mask.block_kv})"
    return f"builder {getattr(mask, '__qualname__', None) or repr(mask)}"


class BlockSparseAttention(nn.Module):
    """Multi-head (or grouped-query) attention computed only on the tiles of a block mask.

    ``out = out_proj(block_sparse_attention(q_proj(query), k_proj(key), v_proj(value), mask))`` with ``num_heads``
    query heads and ``num_kv_heads`` key/value heads of ``head_dim = embed_dim // num_heads`` (``num_kv_heads``
    divides ``num_heads``; each key/value head serves ``num_heads // num_kv_heads`` consecutive query heads, as
    ``repeat_interleave``). Score scale ``head_dim ** -0.5``; no attention dropout.

    Args:
        embed_dim: model width E, a multiple of ``num_heads``; ``head_dim`` must be a multiple of 8 up to 256
            (what the kernels take).
        num_heads: query heads H.
        num_kv_heads: key/value heads (default ``num_heads``: multi-head attention).
        bias: biases on the four projections.
        mask: default mask (a BlockMask, or a builder ``(q_len, kv_len, device) -> BlockMask`` whose results are
            cached per ``(q_len, kv_len, device)``); may be None if every call passes one.
        batch_first: inputs ``[B, T, E]`` (True) or ``[T, B, E]`` (False).
        device, dtype: of the projection weights.
        group: a ``torch.distributed`` process group to run context parallel over (self-attention only): inputs
            are this rank's shards of a sequence laid out by ``layout``, the mask covers the global sequence
            (a builder is called with ``(world * T_local, world * T_local, device)``). ``None`` (default): one
            device. Use ``torch.distributed.group.WORLD`` for all ranks.
        layout: ``"zigzag"`` (default), ``"contiguous"`` or ``"striped"``: how the shards were cut
            (:mod:`blockops.distributed.layout`); only used with ``group``.

    Projections: ``q_proj [E, E]``, ``k_proj`` / ``v_proj [num_kv_heads * head_dim, E]``, ``out_proj [E, E]``,
    initialised as ``nn.MultiheadAttention`` does (Xavier-uniform q/k/v weights, zero biases). The mask is a plain
    attribute, not part of ``state_dict``; a BlockMask follows the inputs' device (copied once per device).
    Under ``torch.compile(fullgraph=True)`` build the mask first (one eager call, or pass a BlockMask).
    """

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int | None = None, bias: bool = True,
                 mask: MaskLike | None = None, batch_first: bool = True, device=None, dtype=None, *,
                 group=None, layout: str = "zigzag"):
        super().__init__()
        from blockops.distributed.layout import LAYOUTS
        if layout not in LAYOUTS:
            raise ValueError(f"BlockSparseAttention: layout must be one of {LAYOUTS}, got {layout!r}")
        self.group, self.layout = group, layout
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for name, v in (("embed_dim", embed_dim), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"BlockSparseAttention: {name} must be a positive int, got {v!r}")
        if embed_dim % num_heads:
            raise ValueError(f"BlockSparseAttention: embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        if num_heads % num_kv_heads:
            raise ValueError(f"BlockSparseAttention: num_heads={num_heads} is not a multiple of "
                             f"num_kv_heads={num_kv_heads}")
        head_dim = embed_dim // num_heads
        if head_dim % 8 or head_dim > 256:
            raise ValueError(f"BlockSparseAttention: head_dim = embed_dim / num_heads = {head_dim} must be a "
                             f"multiple of 8 up to 256 (what the kernels support)")
        self.embed_dim, self.num_heads, self.num_kv_heads, self.head_dim = embed_dim, num_heads, num_kv_heads, head_dim
        self.batch_first = batch_first
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * head_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * head_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(proj.weight)
        if bias:
            for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
                nn.init.zeros_(proj.bias)
        self._mask_cache: OrderedDict = OrderedDict()
        self.mask = mask

    # ---- mask ---------------------------------------------------------------------------------------------------

    @property
    def mask(self) -> MaskLike | None:
        """The default mask (BlockMask, builder or None). Setting it drops the cached masks."""
        return self._mask

    @mask.setter
    def mask(self, mask: MaskLike | None) -> None:
        _check_mask_like(mask, type(self).__name__)
        self._mask = mask
        self._mask_cache.clear()

    def _resolve_mask(self, mask: MaskLike | None, q_len: int, kv_len: int, device: torch.device) -> BlockMask:
        """The BlockMask for this call: `mask`, else the module's. A builder is called once per (q_len, kv_len,
        device); a BlockMask on another device (the module was moved with .to()) is copied there once."""
        _check_mask_like(mask, f"{type(self).__name__}.forward")
        source = self._mask if mask is None else mask
        if source is None:
            raise ValueError(f"{type(self).__name__}: no mask; give one to the constructor (mask=...) or to forward")
        if isinstance(source, BlockMask) and source.device == device:
            return source
        key = (source, q_len, kv_len, device)
        built = self._mask_cache.get(key)
        return self._build_mask(key) if built is None else built

    # Building a mask is data-dependent (its lists come from the token-level predicate), so it runs eagerly: under
    # torch.compile a cache miss is a graph break (an error with fullgraph=True: run one eager call first).
    @torch.compiler.disable(reason="building a BlockMask is data-dependent: call the module once eagerly for this "
                                   "(q_len, kv_len, device), or pass a BlockMask, before torch.compile(fullgraph=True)")
    def _build_mask(self, key) -> BlockMask:
        source, q_len, kv_len, device = key
        built = source.to(device) if isinstance(source, BlockMask) else source(q_len, kv_len, device)
        if not isinstance(built, BlockMask):
            raise TypeError(f"{type(self).__name__}: the mask builder returned {type(built).__name__}, not a "
                            f"BlockMask")
        self._mask_cache[key] = built
        if len(self._mask_cache) > _MASK_CACHE_SIZE:
            self._mask_cache.popitem(last=False)
        return built

    # ---- forward ------------------------------------------------------------------------------------------------

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None,
                mask: MaskLike | None = None) -> torch.Tensor:
        """Attention of ``query`` over ``key`` / ``value`` (default: ``key = query``, ``value = key``).

        Args:
            query: ``[B, Tq, E]`` (``[Tq, B, E]`` when ``batch_first=False``); with ``group``, this rank's shard.
            key, value: ``[B, Tk, E]`` (``[Tk, B, E]``), same length; cross-attention when they differ from query.
            mask: this call's BlockMask (for ``q_len = Tq``, ``kv_len = Tk``) or builder; default the module's.

        Returns ``[B, Tq, E]`` (``[Tq, B, E]``) in the projections' dtype.
        """
        key = query if key is None else key
        value = key if value is None else value
        name = type(self).__name__
        for what, t in (("query", query), ("key", key), ("value", value)):
            if t.dim() != 3 or t.shape[-1] != self.embed_dim:
                layout = "[B, T, E]" if self.batch_first else "[T, B, E]"
                raise ValueError(f"{name}: {what} must be {layout} with E={self.embed_dim}, got {tuple(t.shape)}")
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        if key.shape[:2] != value.shape[:2] or key.shape[0] != query.shape[0]:
            raise ValueError(f"{name}: key {tuple(key.shape)} and value {tuple(value.shape)} must match each other "
                             f"in batch and length, and query {tuple(query.shape)} in batch (batch_first layout)")
        b, tq, tk = query.shape[0], query.shape[1], key.shape[1]
        if self.group is not None:
            if tq != tk:
                raise ValueError(f"{name}: context parallel (group=...) is self-attention only: query and key "
                                 f"shards must have the same length, got {tq} and {tk}")
            import torch.distributed as dist
            total = dist.get_world_size(self.group) * tq
            block_mask = self._resolve_mask(mask, total, total, query.device)
        else:
            block_mask = self._resolve_mask(mask, tq, tk, query.device)
        # [B, T, heads * D] -> [B, heads, T, D]: a view with a contiguous last dim, as the kernels take.
        q = self.q_proj(query).view(b, tq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(key).view(b, tk, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(value).view(b, tk, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.group is not None:
            from blockops.distributed.ring import ring_attention
            out = ring_attention(q, k, v, block_mask, group=self.group, layout=self.layout)
        else:
            out = block_sparse_attention(q, k, v, block_mask)
        out = self.out_proj(out.transpose(1, 2).reshape(b, tq, self.embed_dim))
        return out if self.batch_first else out.transpose(0, 1)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, bias={self.q_proj.bias is not None}, batch_first={self.batch_first}, "
                f"mask={_describe(self._mask)}" + (f", layout={self.layout!r}, context parallel" if self.group
                                                   is not None else ""))

    # ---- conversion ---------------------------------------------------------------------------------------------

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention, mask: MaskLike | None = None) -> "BlockSparseMultiheadAttention":
        """A :class:`BlockSparseMultiheadAttention` with ``mha``'s weights copied exactly (``in_proj_weight`` /
        ``in_proj_bias`` split into q/k/v, ``out_proj``), its ``batch_first``, device and dtype, and ``mask``.

        Refused (ValueError): ``add_bias_kv``, ``add_zero_attn``, ``kdim`` / ``vdim`` other than ``embed_dim``, a
        ``head_dim`` the kernels do not take. ``mha.dropout`` is kept: a module with dropout > 0 runs in eval mode
        and raises in training mode (attention dropout is not implemented; set ``module.dropout = 0.0`` to train
        without it).
        """
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"from_mha: expected nn.MultiheadAttention, got {type(mha).__name__}")
        if mha.bias_k is not None:
            raise ValueError("from_mha: add_bias_kv=True is not supported (learned extra key/value positions)")
        if mha.add_zero_attn:
            raise ValueError("from_mha: add_zero_attn=True is not supported (an extra all-zero key/value position)")
        if not mha._qkv_same_embed_dim:
            raise ValueError(f"from_mha: kdim={mha.kdim} / vdim={mha.vdim} must equal embed_dim={mha.embed_dim}")
        weight = mha.in_proj_weight
        module = BlockSparseMultiheadAttention(mha.embed_dim, mha.num_heads, bias=mha.in_proj_bias is not None,
                                               mask=mask, batch_first=mha.batch_first, device=weight.device,
                                               dtype=weight.dtype, dropout=mha.dropout)
        with torch.no_grad():
            for i, proj in enumerate((module.q_proj, module.k_proj, module.v_proj)):
                rows = slice(i * mha.embed_dim, (i + 1) * mha.embed_dim)
                proj.weight.copy_(weight[rows])
                if mha.in_proj_bias is not None:
                    proj.bias.copy_(mha.in_proj_bias[rows])
            module.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                module.out_proj.bias.copy_(mha.out_proj.bias)
        return module.train(mha.training)


class BlockSparseMultiheadAttention(BlockSparseAttention):
    """:class:`BlockSparseAttention` called the ``nn.MultiheadAttention`` way, to be swapped into existing models
    (made by :meth:`BlockSparseAttention.from_mha` and :func:`swap_attention`).

    ``forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False)`` returns ``(out, None)``. What is supported:

    * query / key / value as in MultiheadAttention: ``[B, T, E]`` / ``[T, B, E]`` by ``batch_first``, or unbatched
      ``[T, E]``; self- and cross-attention;
    * ``attn_mask``: None (the module's mask) or a BlockMask / builder for this call. A dense tensor mask is
      refused (ValueError): converting it on every call would cost more than the attention it saves; build it
      once with ``blockops.attention.masks.from_dense`` instead;
    * ``key_padding_mask`` must be None (ValueError otherwise): pad with a per-batch BlockMask, e.g.
      ``masks.documents``;
    * ``is_causal`` must be False (ValueError otherwise; in MultiheadAttention it is only a hint about a dense
      ``attn_mask``): put causality in the block mask (``masks.causal``);
    * ``need_weights`` / ``average_attn_weights`` are accepted and ignored: attention weights are never
      materialised, the second output is always None (so the common ``attn(x, x, x)[0]`` works with
      MultiheadAttention's default ``need_weights=True``);
    * ``dropout`` (copied from the MultiheadAttention) must be 0 in training mode (ValueError otherwise).

    Constructor: :class:`BlockSparseAttention`'s arguments plus ``dropout``; ``batch_first`` defaults to False, as in
    MultiheadAttention.

    The attributes ``in_proj_weight = in_proj_bias = None`` and ``_qkv_same_embed_dim = False`` say that there is no
    packed q/k/v projection: ``nn.TransformerEncoderLayer``'s inference fast path reads them and would otherwise
    compute dense attention from ``in_proj_weight`` itself, bypassing this module.
    """

    in_proj_weight = None
    in_proj_bias = None
    _qkv_same_embed_dim = False

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int | None = None, bias: bool = True,
                 mask: MaskLike | None = None, batch_first: bool = False, device=None, dtype=None,
                 dropout: float = 0.0):
        super().__init__(embed_dim, num_heads, num_kv_heads, bias, mask, batch_first, device, dtype)
        self.dropout = float(dropout)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: MaskLike | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, None]:
        name = type(self).__name__
        if self.training and self.dropout > 0:
            raise ValueError(f"{name}: attention dropout ({self.dropout}) is not supported in training mode; set "
                             f"module.dropout = 0.0 to train without it")
        if key_padding_mask is not None:
            raise ValueError(f"{name}: key_padding_mask is not supported; express padding in the block mask (a "
                             f"per-batch BlockMask, e.g. blockops.attention.masks.documents)")
        if isinstance(attn_mask, torch.Tensor):
            raise ValueError(f"{name}: attn_mask must be None, a BlockMask or a mask builder, not a dense tensor; "
                             f"convert it once with blockops.attention.masks.from_dense(~mask) (MultiheadAttention's "
                             f"True means masked out) or put the pattern in the module's mask")
        if is_causal:
            raise ValueError(f"{name}: is_causal=True is not supported; put causality in the block mask "
                             f"(blockops.attention.masks.causal)")
        if query.dim() == 2:        # unbatched [T, E], as MultiheadAttention accepts
            dim = 0 if self.batch_first else 1
            out = super().forward(query.unsqueeze(dim), key.unsqueeze(dim), value.unsqueeze(dim), attn_mask)
            return out.squeeze(dim), None
        return super().forward(query, key, value, attn_mask), None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dropout={self.dropout}"


def swap_attention(model: nn.Module, mask: MaskLike,
                   filter_fn: Callable[[nn.MultiheadAttention, str], bool] | None = None) -> int:
    """Replace, in place, every ``nn.MultiheadAttention`` of ``model`` (for which ``filter_fn(module, name)`` is
    true, if given) by ``BlockSparseAttention.from_mha(module, mask)``. Returns the number replaced. A transformers
    model (which has no ``nn.MultiheadAttention``) is refused with a pointer to ``attn_implementation="blockops"``.

    ``mask``: one BlockMask for every layer, or a builder ``(q_len, kv_len, device) -> BlockMask`` (needed when
    the lengths vary, or for cross-attention where ``q_len != kv_len``). Every selected module is checked before
    any is replaced, so an unsupported one leaves the model unchanged. ``nn.TransformerEncoder``s holding a
    replaced layer get ``use_nested_tensor = False``: their nested-tensor fast path would read the packed
    ``in_proj_weight`` of their first layer's attention, which the replacement does not have.
    """
    _check_mask_like(mask, "swap_attention")
    if mask is None:
        raise ValueError("swap_attention: give a BlockMask or a mask builder")
    if isinstance(model, nn.MultiheadAttention):
        raise ValueError("swap_attention: model is itself a MultiheadAttention; use BlockSparseAttention.from_mha")
    selected = [(name, m) for name, m in model.named_modules()
                if isinstance(m, nn.MultiheadAttention) and (filter_fn is None or filter_fn(m, name))]
    if not selected and hasattr(getattr(model, "config", None), "_attn_implementation"):
        # transformers' attention modules are their own classes, not nn.MultiheadAttention.
        raise ValueError("swap_attention replaces nn.MultiheadAttention modules and this transformers model has none; "
                         "load it with attn_implementation=\"blockops\" and pass the mask as model(..., "
                         "blockops_mask=mask) or in config.blockops_attention (blockops.integrations.transformers)")
    replacements = [(name, BlockSparseAttention.from_mha(m, mask)) for name, m in selected]
    for name, module in replacements:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
    replaced = {id(m) for _, m in replacements}
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoder) and any(id(x) in replaced for x in m.modules()):
            m.use_nested_tensor = False
    return len(replacements)
