"""blockops.nn.PaTHAttention: prefill + single-token decoding equals the full forward (batched, GQA, with and
without the forget gate, packed sequences of different lengths), the whole layer and its gradients against the
same layer on the reference attention, packed sequences equal separate ones, torch.compile, bf16, error paths."""
from __future__ import annotations

import pytest
import torch

import blockops.nn.path_attention as path_module
from blockops.nn import PaTHAttention, PaTHAttentionCache
from blockops.reference import ref_path_attention
from helpers import assert_compiles, kernel_ran

HIDDEN, HEADS, KV_HEADS = 48, 4, 2      # GQA 4/2 heads of head_dim=16 (given: 48 / 4 = 12 is not a multiple of 8)


def make_layer(gate: bool, seed: int = 0, **kw) -> PaTHAttention:
    torch.manual_seed(seed)
    layer = PaTHAttention(HIDDEN, HEADS, KV_HEADS, head_dim=16, use_forget_gate=gate, **kw)
    with torch.no_grad():   # biases away from zero so that beta and the gate vary (beta near 2 included)
        layer.bt_proj.bias.uniform_(-2.0, 3.0)
        if gate:
            layer.g_proj.bias.uniform_(0.0, 3.0)
    return layer


def inputs(*shape, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("gate", [False, True])
def test_prefill_then_decode_equals_full_forward(gate):
    layer = make_layer(gate).eval()
    n, m = 9, 5
    x = inputs(2, n + m, HIDDEN)
    with kernel_ran("path_attention", "cpu"):
        full, none = layer(x)
        prefill, cache = layer(x[:, :n], use_cache=True)
    assert none is None and isinstance(cache, PaTHAttentionCache)
    assert cache.conv_state.shape == (2, KV_HEADS * 16, 2)
    steps = []
    for t in range(n, n + m):
        y_t, cache_t = layer(x[:, t:t + 1], cache=cache)
        assert cache_t is cache and y_t.shape == (2, 1, HIDDEN)
        steps.append(y_t)
    assert cache.attn.lengths.tolist() == [n + m] * 2
    torch.testing.assert_close(torch.cat([prefill, *steps], 1), full, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("gate", [False, True])
def test_packed_prefill_then_decode_rows_of_different_lengths(gate):
    """A cu_seqlens prefill gives one cache row per sequence (lengths 1, 2, 6: two shorter than the convolution),
    decoding then continues every sequence as if it had been run on its own."""
    layer = make_layer(gate).eval()
    lens, m = [1, 2, 6], 3
    seqs = [inputs(1, n + m, HIDDEN, seed=10 + i) for i, n in enumerate(lens)]
    cu = torch.tensor([0, 1, 3, 9], dtype=torch.int32)
    packed = torch.cat([s[:, :n] for s, n in zip(seqs, lens)], 1)
    with kernel_ran("path_attention", "cpu"):
        prefill, cache = layer(packed, cu_seqlens=cu, use_cache=True)
        full = [layer(s)[0] for s in seqs]
    assert cache.attn.lengths.tolist() == lens
    steps = [layer(torch.cat([s[:, n + t:n + t + 1] for s, n in zip(seqs, lens)]), cache=cache)[0]
             for t in range(m)]
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        got = torch.cat([prefill[:, s:e], *[y[i:i + 1] for y in steps]], 1)
        torch.testing.assert_close(got, full[i], atol=2e-5, rtol=1e-4)


def test_packed_forward_equals_separate_forwards():
    layer = make_layer(True)
    cu = torch.tensor([0, 2, 3, 20, 45], dtype=torch.int64)
    x = inputs(1, 45, HIDDEN)
    with kernel_ran("path_attention", "cpu"):
        packed, _ = layer(x, cu_seqlens=cu)
        separate = torch.cat([layer(x[:, s:e])[0] for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())], 1)
    torch.testing.assert_close(packed, separate, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("w_rank", [32, None])
def test_layer_and_gradients_match_reference_attention(monkeypatch, w_rank):
    """The layer on the kernels against the same layer on ref_path_attention (fp32 autograd): output and the
    gradient of every parameter, which must all be reached."""
    layer = make_layer(True, w_rank=w_rank, bias=True)
    x = inputs(2, 37, HIDDEN).requires_grad_(True)
    grad_y = inputs(2, 37, HIDDEN, seed=2)

    def output_and_grads():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        y, _ = layer(x)
        y.backward(grad_y)
        return y.detach(), {n: p.grad for n, p in layer.named_parameters()}, x.grad

    with kernel_ran("path_attention", "cpu"), kernel_ran("path_attention_backward", "cpu"):
        y, grads, gx = output_and_grads()
    monkeypatch.setattr(path_module, "path_attention",
                        lambda q, k, v, w, beta, g, cu_seqlens=None, use_cache=False:
                        (ref_path_attention(q, k, v, w, beta, g, cu_seqlens=cu_seqlens), None))
    y_ref, grads_ref, gx_ref = output_and_grads()
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=1e-4)
    for name, g in grads.items():
        assert g is not None and g.abs().max() > 0, f"no gradient reaches {name}"
        torch.testing.assert_close(g, grads_ref[name], atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_compile_fullgraph_packed_with_gate():
    """The training step compiles in one graph: forward (packed sequences, gate) and backward match eager."""
    layer = make_layer(True)
    cu = torch.tensor([0, 5, 24], dtype=torch.int32)
    x = inputs(1, 24, HIDDEN)
    grad_y = inputs(1, 24, HIDDEN, seed=2)
    fn = lambda x, cu: layer(x, cu_seqlens=cu)[0]   # noqa: E731
    fn(x, cu).backward(grad_y)
    eager_grads = {n: p.grad for n, p in layer.named_parameters()}
    layer.zero_grad(set_to_none=True)
    with kernel_ran("path_attention", "cpu"), kernel_ran("path_attention_backward", "cpu"):
        assert_compiles(fn, x, cu).backward(grad_y)
    for name, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, eager_grads[name], msg=lambda m: f"{name}: {m}")


def test_bf16_layer_close_to_fp32():
    layer = make_layer(False)
    layer16 = make_layer(False).to(torch.bfloat16)
    x = inputs(2, 33, HIDDEN)
    with kernel_ran("path_attention", "cpu"):
        y32, _ = layer(x)
        y16, _ = layer16(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    err = ((y16.float() - y32).pow(2).mean().sqrt() / y32.pow(2).mean().sqrt()).item()
    assert err < 0.02, f"bf16 relative RMS error {err:.3g}"


def test_errors_and_repr():
    for kw, msg in ((dict(num_kv_heads=3), "multiple of num_kv_heads"), (dict(head_dim=12), "multiple of 8"),
                    (dict(w_rank=0), "w_rank"), (dict(conv_size=0), "conv_size")):
        with pytest.raises(ValueError, match=msg):
            PaTHAttention(HIDDEN, HEADS, **{"head_dim": 16, **kw})
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        PaTHAttention(50, 4)
    layer = make_layer(True).eval()
    assert "num_kv_heads=2" in repr(layer) and "use_forget_gate=True" in repr(layer) and "w_rank=32" in repr(layer)
    with pytest.raises(ValueError, match=r"x must be \[B, T, 48\]"):
        layer(inputs(2, 5, 40))
    with pytest.raises(ValueError, match="needs B = 1"):
        layer(inputs(2, 5, HIDDEN), cu_seqlens=torch.tensor([0, 5]))
    with kernel_ran("path_attention", "cpu"):
        _, cache = layer(inputs(2, 5, HIDDEN), use_cache=True)
    with pytest.raises(ValueError, match="one token per cache row"):
        layer(inputs(2, 2, HIDDEN), cache=cache)
    with pytest.raises(ValueError, match="one token per cache row"):
        layer(inputs(3, 1, HIDDEN), cache=cache)
    with pytest.raises(ValueError, match="cu_seqlens is for the prefill"):
        layer(inputs(2, 1, HIDDEN), cu_seqlens=torch.tensor([0, 1]), cache=cache)
    with pytest.raises(ValueError, match="not made by this layer"):
        make_layer(True, conv_size=4)(inputs(2, 1, HIDDEN), cache=cache)
    with pytest.raises(ValueError, match="forget gate"):      # a gated cache given to a layer without a gate
        make_layer(False)(inputs(2, 1, HIDDEN), cache=cache)


# ---- fla's layer: constructor, state dict, forward convention ----------------------------------------------------

def _fla_state_dict_shapes(hidden, heads, kv_heads, gate, qk_norm, low_rank, shortconv, conv_size, conv_bias):
    """The state dict of fla.layers.path_attn.PaTHAttention (fla-org/flash-linear-attention) for these arguments,
    as its constructor builds it: nn.Linear projections, w_proj an nn.Sequential(hidden->32, 32->kv_dim) when
    use_low_rank_w, ShortConvolution (an nn.Conv1d, weight [kv_dim, 1, conv_size]) with bias iff conv_bias, RMSNorm
    weights (maybe_q_norm [hidden], maybe_k_norm [kv_dim]) iff use_qk_norm. fla needs triton, so the test reads the
    names from here rather than from an fla layer."""
    d = hidden // heads
    kv = kv_heads * d
    shapes = {"q_proj.weight": (hidden, hidden), "k_proj.weight": (kv, hidden), "v_proj.weight": (kv, hidden),
              "bt_proj.weight": (kv_heads, hidden), "bt_proj.bias": (kv_heads,), "o_proj.weight": (hidden, hidden)}
    shapes.update({"w_proj.0.weight": (32, hidden), "w_proj.1.weight": (kv, 32)} if low_rank
                  else {"w_proj.weight": (kv, hidden)})
    if qk_norm:
        shapes.update({"maybe_q_norm.weight": (hidden,), "maybe_k_norm.weight": (kv,)})
    if shortconv:
        shapes["w_conv1d.weight"] = (kv, 1, conv_size)
        if conv_bias:
            shapes["w_conv1d.bias"] = (kv,)
    if gate:
        shapes.update({"g_proj.weight": (heads, hidden), "g_proj.bias": (heads,)})
    return shapes


@pytest.mark.parametrize("gate, qk_norm, low_rank, shortconv, conv_bias", [
    (False, False, True, True, False),      # fla's defaults
    (True, True, False, True, True),
    (True, False, True, False, False),
])
def test_fla_constructor_and_state_dict(gate, qk_norm, low_rank, shortconv, conv_bias):
    fla_args = dict(hidden_size=64, num_heads=4, num_kv_heads=2, use_forget_gate=gate, use_qk_norm=qk_norm,
                    layer_idx=5, use_low_rank_w=low_rank, use_w_shortconv=shortconv, conv_size=4, conv_bias=conv_bias)
    torch.manual_seed(0)
    fla_style = PaTHAttention(**fla_args).eval()
    assert fla_style.layer_idx == 5 and fla_style.w_rank == (32 if low_rank else None)
    expected = _fla_state_dict_shapes(64, 4, 2, gate, qk_norm, low_rank, shortconv, 4, conv_bias)
    assert {k: tuple(v.shape) for k, v in fla_style.state_dict().items()} == expected
    # The same layer built with blockops' own arguments (w_rank instead of use_low_rank_w) loads the state dict
    # strictly and computes the same output.
    blockops_style = PaTHAttention(64, 4, 2, use_forget_gate=gate, w_rank=32 if low_rank else None, conv_size=4,
                                   use_qk_norm=qk_norm, use_w_shortconv=shortconv, conv_bias=conv_bias).eval()
    with torch.no_grad():
        for p in fla_style.parameters():
            p.uniform_(-0.3, 0.3)
    blockops_style.load_state_dict(fla_style.state_dict(), strict=True)
    x = inputs(2, 11, 64)
    with torch.no_grad():
        assert torch.equal(fla_style(x)[0], blockops_style(x)[0])


@pytest.mark.parametrize("shortconv", [True, False])
def test_fla_forward_convention_padding_and_cache(shortconv):
    layer = PaTHAttention(64, 4, 2, use_forget_gate=True, use_qk_norm=True, layer_idx=0,
                          use_w_shortconv=shortconv).eval()
    x = inputs(2, 9, 64)
    with torch.no_grad():
        y, _ = layer(x)
        o, attn, past = layer(hidden_states=x)
        assert torch.equal(o, y) and attn is None and past is None
        # padding: the padded row equals the unpadded sequence alone; padded positions are zeros
        mask = torch.ones(2, 9, dtype=torch.long)
        mask[1, 6:] = 0
        o, _, _ = layer(hidden_states=x, attention_mask=mask, output_attentions=False)
        torch.testing.assert_close(o[1, :6], layer(x[1:, :6])[0][0], atol=1e-6, rtol=1e-6)
        assert not o[1, 6:].any()
        # prefill into a dict keyed by layer_idx, then a decoding step from it
        cache = {}
        o, _, cache = layer(hidden_states=x[:, :5], attention_mask=torch.ones(2, 5), past_key_values=cache,
                            use_cache=True)
        assert isinstance(cache[0], PaTHAttentionCache)
        step, _, cache = layer(hidden_states=x[:, 5:6], past_key_values=cache, use_cache=True)
        torch.testing.assert_close(step[:, 0], y[:, 5], atol=1e-6, rtol=1e-6)


def test_fla_convention_errors():
    layer = PaTHAttention(64, 4, layer_idx=None).eval()
    x = inputs(1, 4, 64)
    with pytest.raises(ValueError, match="use_cache=True needs past_key_values"):
        layer(hidden_states=x, use_cache=True)
    with pytest.raises(ValueError, match="needs the layer's layer_idx"):
        layer(hidden_states=x, past_key_values={}, use_cache=True)
    with pytest.raises(ValueError, match="padding mask"):
        layer(hidden_states=x, attention_mask=torch.ones(1, 4, 4))
    with pytest.raises(TypeError, match="fla's Cache is not supported"):
        layer(hidden_states=x, past_key_values=object())
    with pytest.raises(ValueError, match="contradicts w_rank"):
        PaTHAttention(64, 4, w_rank=None, use_low_rank_w=True)
    with pytest.raises(TypeError, match="unexpected arguments"):
        layer(x, foo=1)
