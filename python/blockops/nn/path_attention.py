"""PaTH attention layer: :class:`PaTHAttention` (q/k/v/o projections with grouped-query heads, the Householder
directions ``w`` from a low-rank projection, a short causal convolution and per-head L2 normalisation, ``beta = 2 *
sigmoid(.)``, the optional PaTH-FoX forget gate) with a training/prefill forward through the PaTH kernels and
incremental decoding through :class:`PaTHAttentionCache`.

A drop-in for flash-linear-attention's ``fla.layers.path_attn.PaTHAttention``: the same constructor arguments
(``hidden_size``, ``num_heads``, ``num_kv_heads``, ``use_forget_gate``, ``use_qk_norm``, ``layer_idx``,
``use_low_rank_w``, ``use_w_shortconv``, ``conv_size``, ``conv_bias``), the same parameter names (``q_proj``,
``k_proj``, ``v_proj``, ``w_proj``, ``w_conv1d``, ``bt_proj``, ``g_proj``, ``o_proj``, ``maybe_q_norm``,
``maybe_k_norm``), so an fla layer's state dict loads as it is, and fla's forward convention. Usage::

    attn = PaTHAttention(1024, 16, num_kv_heads=4, use_forget_gate=True)
    y, _ = attn(x)                                    # training: x [B, T, 1024]
    y, cache = attn(prompt, use_cache=True)           # prefill
    y_t, cache = attn(x_t, cache=cache)               # one decoding step: x_t [B, 1, 1024]; cache updated in place

    # fla's convention (chosen when the call names hidden_states= or passes attention_mask / past_key_values /
    # output_attentions): a 3-tuple, a 2-D padding mask, the caches in a dict keyed by layer_idx
    o, _, past = attn(hidden_states=x, attention_mask=mask, past_key_values={}, use_cache=True)
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from blockops.ops.path_attention import PathCache, path_attention, path_decode_step

__all__ = ["PaTHAttention", "PaTHAttentionCache"]

# Added under the square root of the L2 norm of w (fla's l2_norm uses the same): keeps an all-zero direction finite.
_L2_EPS = 1e-6


@dataclasses.dataclass
class PaTHAttentionCache:
    """Decoding state of one :class:`PaTHAttention` layer, one row per batch row (or per packed sequence of a
    ``cu_seqlens`` prefill); rows may have different lengths.

    Attributes:
        attn: the :class:`~blockops.attention.PathCache` (keys carried to each row's newest position, values,
            forget-gate sums).
        conv_state: ``[N, H * D, conv_size - 1]`` the last ``conv_size - 1`` inputs of the w branch's causal
            convolution (the low-rank projection's outputs, before the convolution), oldest first; zeros stand for
            positions before a row's first token.
    """

    attn: PathCache
    conv_state: torch.Tensor


class PaTHAttention(nn.Module):
    """PaTH attention layer (Yang et al., 2025), with the optional forget gate of PaTH-FoX.

    Per token: ``q, k, v`` from linear projections (``num_heads`` query heads, ``num_kv_heads`` key/value heads of
    ``head_dim``); ``w = l2norm_per_head(silu(causal_depthwise_conv(w_proj(x))))`` per key head; ``beta = 2 *
    sigmoid(bt_proj(x))`` per key head, in ``(0, 2)`` so the transforms ``I - beta w w^T`` may have a negative
    eigenvalue; with ``use_forget_gate``, ``g = logsigmoid(g_proj(x))`` per query head. Then
    :func:`~blockops.attention.path_attention` (scale ``head_dim ** -0.5``) and ``o_proj``. ``w``, ``beta`` and ``g``
    are computed in fp32 whatever the module's dtype.

    Args:
        hidden_size: model width (fla's default 2048).
        num_heads: query heads HQ (fla's default 32).
        num_kv_heads: key/value heads H (default ``num_heads``); must divide ``num_heads``.
        head_dim: D (default ``hidden_size // num_heads``); a multiple of 8 up to 256 (what the kernels take).
        use_forget_gate: add the PaTH-FoX forget gate.
        w_rank: rank of the w projection ``hidden -> w_rank -> H * D`` (32 like fla's ``use_low_rank_w=True``),
            or None for one full ``hidden -> H * D`` projection (``use_low_rank_w=False``).
        conv_size: taps of the causal depthwise convolution on w (fla: 3).
        bias: biases on the q, k, v and o projections (``bt_proj`` and ``g_proj`` always have one, as in fla).
        use_qk_norm: RMSNorm (eps 1e-5, with weight) of q over all heads and of k over all key heads, after the
            projections (fla's ``maybe_q_norm`` / ``maybe_k_norm``).
        layer_idx: this layer's key in a ``past_key_values`` dict (fla's convention).
        use_low_rank_w: fla's name for the w projection's choice: True = ``w_rank=32``, False = ``w_rank=None``
            (default: follow ``w_rank``).
        use_w_shortconv: the short convolution and SiLU on the w branch (False: ``w = l2norm(w_proj(x))``).
        conv_bias: a bias on that convolution (added before the SiLU).
        device, dtype: of the parameters.

    ``forward(x, cu_seqlens=None, cache=None, use_cache=False) -> (y, cache)``:

    * training / prefill (``cache`` None): ``x [B, T, hidden]``; ``cu_seqlens`` (int32/int64 ``[N + 1]``, ``B = 1``)
      packs N independent sequences (neither attention nor the convolution crosses a boundary). With ``use_cache``
      also returns a :class:`PaTHAttentionCache` with one row per batch row (per sequence with ``cu_seqlens``); else
      the cache is None. ``torch.compile(fullgraph=True)`` works without ``use_cache`` (building the cache reads
      ``cu_seqlens`` on the host).
    * decoding (``cache`` given): ``x [N, 1, hidden]``, one new token per cache row; updates the cache in place and
      returns it. One fused kernel per step (``torch.ops.blockops.path_decode_step``), fp32 cache, without autograd.

    fla's ``forward(hidden_states, attention_mask=None, past_key_values=None, output_attentions=False,
    use_cache=False, **kwargs) -> (o, None, past_key_values)`` is used when a call names ``hidden_states=`` or passes
    ``attention_mask``, ``past_key_values`` or ``output_attentions`` (see `forward`).
    """

    def __init__(self, hidden_size: int = 2048, num_heads: int = 32, num_kv_heads: int | None = None,
                 head_dim: int | None = None, use_forget_gate: bool = False, w_rank: int | None = 32, conv_size: int = 3,
                 bias: bool = False, use_qk_norm: bool = False, layer_idx: int | None = None,
                 use_low_rank_w: bool | None = None, use_w_shortconv: bool = True, conv_bias: bool = False,
                 device=None, dtype=None):
        super().__init__()
        name = type(self).__name__
        if use_low_rank_w is not None:
            # fla's flag picks between w_rank's default (32, fla's bottleneck) and None; an explicit w_rank that
            # says otherwise is a contradiction rather than something to guess about.
            if (use_low_rank_w and w_rank is None) or (not use_low_rank_w and w_rank not in (32, None)):
                raise ValueError(f"{name}: use_low_rank_w={use_low_rank_w} contradicts w_rank={w_rank!r}")
            w_rank = w_rank if use_low_rank_w else None
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for arg, val in (("hidden_size", hidden_size), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                         ("conv_size", conv_size)):
            if not isinstance(val, int) or val <= 0:
                raise ValueError(f"{name}: {arg} must be a positive int, got {val!r}")
        if num_heads % num_kv_heads:
            raise ValueError(f"{name}: num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        if head_dim is None:
            if hidden_size % num_heads:
                raise ValueError(f"{name}: hidden_size={hidden_size} is not divisible by num_heads={num_heads}; "
                                 f"pass head_dim")
            head_dim = hidden_size // num_heads
        if not isinstance(head_dim, int) or head_dim % 8 or not 8 <= head_dim <= 256:
            raise ValueError(f"{name}: head_dim={head_dim!r} must be a multiple of 8 in [8, 256]")
        if w_rank is not None and (not isinstance(w_rank, int) or w_rank <= 0):
            raise ValueError(f"{name}: w_rank must be a positive int or None, got {w_rank!r}")
        self.hidden_size, self.num_heads, self.num_kv_heads = hidden_size, num_heads, num_kv_heads
        self.head_dim = head_dim
        self.use_forget_gate, self.w_rank, self.conv_size = use_forget_gate, w_rank, conv_size
        self.use_qk_norm, self.layer_idx, self.use_w_shortconv = use_qk_norm, layer_idx, use_w_shortconv
        self.use_low_rank_w = w_rank is not None
        # Past inputs of the w convolution a decoding step needs (none without the convolution).
        self._conv_history = conv_size - 1 if use_w_shortconv else 0
        kw = {"device": device, "dtype": dtype}
        q_dim, kv_dim = num_heads * head_dim, num_kv_heads * head_dim
        self.q_proj = nn.Linear(hidden_size, q_dim, bias=bias, **kw)
        self.k_proj = nn.Linear(hidden_size, kv_dim, bias=bias, **kw)
        self.v_proj = nn.Linear(hidden_size, kv_dim, bias=bias, **kw)
        if w_rank is None:
            self.w_proj = nn.Linear(hidden_size, kv_dim, bias=False, **kw)
        else:
            self.w_proj = nn.Sequential(nn.Linear(hidden_size, w_rank, bias=False, **kw),
                                        nn.Linear(w_rank, kv_dim, bias=False, **kw))
        # Depthwise: weight [H * D, 1, conv_size], tap conv_size - 1 on the current token. Applied by _conv and
        # _conv_step rather than called, so that packed sequences and the decoding state share one formula.
        self.w_conv1d = (nn.Conv1d(kv_dim, kv_dim, conv_size, groups=kv_dim, bias=conv_bias, **kw)
                         if use_w_shortconv else None)
        # fla's RMSNorm defaults (eps 1e-5, a weight, no bias); nn.Identity (no parameters) when off, as in fla.
        self.maybe_q_norm = nn.RMSNorm(q_dim, eps=1e-5, **kw) if use_qk_norm else nn.Identity()
        self.maybe_k_norm = nn.RMSNorm(kv_dim, eps=1e-5, **kw) if use_qk_norm else nn.Identity()
        self.bt_proj = nn.Linear(hidden_size, num_kv_heads, bias=True, **kw)
        self.g_proj = nn.Linear(hidden_size, num_heads, bias=True, **kw) if use_forget_gate else None
        self.o_proj = nn.Linear(q_dim, hidden_size, bias=bias, **kw)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, use_forget_gate={self.use_forget_gate}, w_rank={self.w_rank}, "
                f"conv_size={self.conv_size}, use_w_shortconv={self.use_w_shortconv}, "
                f"use_qk_norm={self.use_qk_norm}, layer_idx={self.layer_idx}")

    def _qkv(self, x: torch.Tensor):
        """q ``[..., HQ, D]``, k, v ``[..., H, D]`` of x ``[..., hidden]`` (q / k normed with ``use_qk_norm``)."""
        q = self.maybe_q_norm(self.q_proj(x)).unflatten(-1, (self.num_heads, self.head_dim))
        k = self.maybe_k_norm(self.k_proj(x)).unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        return q, k, v

    # ------------------------------------------------------------------------------------------------------------
    # The w branch: causal depthwise convolution over time, SiLU (fla's short convolution), L2 norm per key head
    # ------------------------------------------------------------------------------------------------------------

    def _conv(self, u: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        """Causal convolution of u ``[B, T, C]`` in fp32; ``pos [T]`` (packed sequences) is each token's index in
        its own sequence: taps reaching before the sequence start read zeros, as for an unpacked sequence."""
        u = u.float()
        if self.w_conv1d is None:
            return u
        taps = self.w_conv1d.weight[:, 0].float()             # [C, K]
        K, T = self.conv_size, u.shape[1]
        y = u * taps[:, K - 1]
        for s in range(1, K):                                 # tap K - 1 - s reads the token s steps back
            back = F.pad(u, (0, 0, s, 0))[:, :T]
            if pos is not None:
                back = back.masked_fill((pos < s)[None, :, None], 0.0)
            y = y + back * taps[:, K - 1 - s]
        return y if self.w_conv1d.bias is None else y + self.w_conv1d.bias.float()

    def _conv_step(self, u_t: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token u_t ``[N, C]`` after ``state [N, C, K - 1]``: the same sum, in the same order, as `_conv`
        (so decoding reproduces the prefill bit for bit); returns the output and the next state."""
        if self.w_conv1d is None:
            return u_t.float(), state
        taps = self.w_conv1d.weight[:, 0].float()
        window = torch.cat([state, u_t[:, :, None]], dim=2)   # [N, C, K], oldest first
        win = window.float()
        K = self.conv_size
        y = win[:, :, K - 1] * taps[:, K - 1]
        for s in range(1, K):
            y = y + win[:, :, K - 1 - s] * taps[:, K - 1 - s]
        y = y if self.w_conv1d.bias is None else y + self.w_conv1d.bias.float()
        return y, window[:, :, 1:]

    def _directions(self, y: torch.Tensor) -> torch.Tensor:
        """Conv outputs ``[..., H * D]`` (fp32) -> unit directions ``[..., H, D]`` (SiLU is the short convolution's
        activation: none without it, as in fla)."""
        w = (F.silu(y) if self.w_conv1d is not None else y).unflatten(-1, (self.num_kv_heads, self.head_dim))
        return w * torch.rsqrt(w.pow(2).sum(-1, keepdim=True) + _L2_EPS)

    def _conv_state(self, u: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
        """The last K - 1 conv inputs of every row (``[N, C, K - 1]``), zeros before a row's first token."""
        K = self._conv_history + 1
        if K == 1:
            rows = u.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
            return u.new_zeros(rows, u.shape[-1], 0)
        if cu_seqlens is None:
            return F.pad(u, (0, 0, K - 1, 0))[:, u.shape[1]:].transpose(1, 2).contiguous()
        starts, ends = cu_seqlens[:-1].long(), cu_seqlens[1:].long()
        idx = ends[:, None] - (K - 1) + torch.arange(K - 1, device=u.device)    # [N, K - 1]
        state = u[0, idx.clamp_min(0)].masked_fill((idx < starts[:, None])[:, :, None], 0.0)   # [N, K - 1, C]
        return state.transpose(1, 2).contiguous()

    # ------------------------------------------------------------------------------------------------------------

    _FLA = object()   # "not given" marker of fla's keywords (their presence selects fla's convention)

    def forward(self, x: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                cache: PaTHAttentionCache | None = None, use_cache: bool = False, *, hidden_states=None,
                attention_mask=_FLA, past_key_values=_FLA, output_attentions=_FLA, **kwargs):
        """blockops' convention: ``forward(x, cu_seqlens=None, cache=None, use_cache=False) -> (y, cache)`` (see the
        class). fla's: ``forward(hidden_states=x, attention_mask=None, past_key_values=None, output_attentions=False,
        use_cache=False, cu_seqlens=None) -> (o, None, past_key_values)``, chosen when ``hidden_states``,
        ``attention_mask``, ``past_key_values`` or ``output_attentions`` is passed by name:

        * ``attention_mask [B, T]`` (1 = token, 0 = padding, any positions): the tokens are packed into sequences
          (``cu_seqlens``) and the output scattered back, zeros at padding (fla's unpad / pad); not with
          ``cu_seqlens``.
        * ``past_key_values``: a dict (or any mapping) filled with this layer's `PaTHAttentionCache` under
          ``layer_idx``, or this layer's `PaTHAttentionCache` itself; required with ``use_cache``. When it holds
          this layer's cache the call is a decoding step (``x [N, 1, hidden]``; the mask is not needed: each cache
          row knows its length). fla's own ``Cache`` class is not read (its state layout differs).
        * ``output_attentions``: accepted; no weights are formed (the second element is None, as in fla).
        """
        fla = (hidden_states is not None or attention_mask is not self._FLA or past_key_values is not self._FLA
               or output_attentions is not self._FLA)
        if not fla:
            if kwargs:
                raise TypeError(f"{type(self).__name__}.forward got unexpected arguments {sorted(kwargs)}")
            return self._forward(x, cu_seqlens, cache, use_cache)
        if x is not None and hidden_states is not None:
            raise TypeError(f"{type(self).__name__}.forward: give the input once (x or hidden_states)")
        return self._forward_fla(hidden_states if hidden_states is not None else x,
                                 None if attention_mask is self._FLA else attention_mask,
                                 None if past_key_values is self._FLA else past_key_values,
                                 use_cache, kwargs.pop("cu_seqlens", cu_seqlens))

    def _forward_fla(self, x, attention_mask, past_key_values, use_cache, cu_seqlens):
        name = type(self).__name__
        if use_cache and past_key_values is None:
            raise ValueError(f"{name}: use_cache=True needs past_key_values (a dict, filled under layer_idx)")
        holder = past_key_values
        cache = holder if isinstance(holder, PaTHAttentionCache) else None
        if holder is not None and cache is None:
            if not hasattr(holder, "get") or not hasattr(holder, "__setitem__"):
                raise TypeError(f"{name}: past_key_values must be a dict (layer_idx -> PaTHAttentionCache) or a "
                                f"PaTHAttentionCache, got {type(holder).__name__} (fla's Cache is not supported)")
            if self.layer_idx is None:
                raise ValueError(f"{name}: a past_key_values dict needs the layer's layer_idx")
            cache = holder.get(self.layer_idx)
        if cache is not None:                                 # decoding step
            y, cache = self._forward(x, None, cache, False)
            return y, None, holder
        if attention_mask is not None:
            if attention_mask.dim() != 2 or tuple(attention_mask.shape) != tuple(x.shape[:2]):
                raise ValueError(f"{name}: attention_mask must be a [B, T] = {list(x.shape[:2])} padding mask (1 = "
                                 f"token, 0 = padding), got {tuple(attention_mask.shape)}")
            if cu_seqlens is not None:
                raise ValueError(f"{name}: give attention_mask or cu_seqlens, not both")
            keep = attention_mask.bool()
            lengths = keep.sum(1)
            cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
            y, new = self._forward(x[keep][None], cu, None, use_cache)
            out = x.new_zeros(*x.shape[:2], y.shape[-1])
            out[keep] = y[0]
        else:
            out, new = self._forward(x, cu_seqlens, None, use_cache)
        if use_cache:
            if isinstance(holder, PaTHAttentionCache):
                raise ValueError(f"{name}: a prefill fills a past_key_values dict; this one already holds a cache")
            holder[self.layer_idx] = new
        return out, None, past_key_values

    def _forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                 cache: PaTHAttentionCache | None = None,
                 use_cache: bool = False) -> tuple[torch.Tensor, PaTHAttentionCache | None]:
        name = type(self).__name__
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: the input must be a tensor [B, T, {self.hidden_size}], got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"{name}: x must be [B, T, {self.hidden_size}], got {tuple(x.shape)}")
        if cache is not None:
            return self._decode(x, cu_seqlens, cache)
        if cu_seqlens is not None and x.shape[0] != 1:
            raise ValueError(f"{name}: cu_seqlens packs sequences along T and needs B = 1, got x {tuple(x.shape)}")
        T = x.shape[1]
        q, k, v = self._qkv(x)
        u = self.w_proj(x)
        pos = None
        if cu_seqlens is not None:
            # Index of each token in its own sequence; searchsorted keeps it on the device (no host sync).
            t = torch.arange(T, device=x.device)
            seq = torch.searchsorted(cu_seqlens, t.to(cu_seqlens.dtype), right=True) - 1
            pos = t - cu_seqlens.long()[seq]
        w = self._directions(self._conv(u, pos))
        beta = 2.0 * torch.sigmoid(self.bt_proj(x).float())
        g = F.logsigmoid(self.g_proj(x).float()) if self.use_forget_gate else None
        o, k_cache = path_attention(q, k, v, w, beta, g, cu_seqlens=cu_seqlens, use_cache=use_cache)
        y = self.o_proj(o.flatten(-2))
        if not use_cache:
            return y, None
        with torch.no_grad():
            attn = PathCache.from_prefill(k_cache, v, g, cu_seqlens)
            return y, PaTHAttentionCache(attn, self._conv_state(u, cu_seqlens))

    # Decoding is inference: without this, the cache tensors would carry an autograd graph growing every step.
    @torch.no_grad()
    def _decode(self, x: torch.Tensor, cu_seqlens, cache: PaTHAttentionCache):
        name = type(self).__name__
        rows = cache.conv_state.shape[0]
        if cu_seqlens is not None:
            raise ValueError(f"{name}: cu_seqlens is for the prefill; decoding takes x [N, 1, hidden] with one "
                             f"row per cache row")
        if x.shape[:2] != (rows, 1):
            raise ValueError(f"{name}: decoding takes one token per cache row, x [{rows}, 1, {self.hidden_size}]; "
                             f"got {tuple(x.shape)} (prefill longer inputs without a cache)")
        if cache.conv_state.shape[1:] != (self.num_kv_heads * self.head_dim, self._conv_history):
            raise ValueError(f"{name}: cache.conv_state {tuple(cache.conv_state.shape)} was not made by this layer "
                             f"(expected [N, {self.num_kv_heads * self.head_dim}, {self._conv_history}])")
        x_t = x[:, 0]
        q, k, v = self._qkv(x_t)
        y_conv, cache.conv_state = self._conv_step(self.w_proj(x_t), cache.conv_state)
        w = self._directions(y_conv)
        beta = 2.0 * torch.sigmoid(self.bt_proj(x_t).float())
        g = F.logsigmoid(self.g_proj(x_t).float()) if self.use_forget_gate else None
        o = path_decode_step(q, k, v, w, beta, g, cache.attn)
        return self.o_proj(o.flatten(-2))[:, None], cache
