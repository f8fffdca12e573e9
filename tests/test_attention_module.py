"""BlockSparseAttention / BlockSparseMultiheadAttention / swap_attention: equivalence with nn.MultiheadAttention
under the equivalent dense mask (self / cross attention, both layouts, unbatched), GQA against a repeat_interleave
reference with gradients, the mask-builder cache, swapping into nn.TransformerEncoder, torch.compile and errors."""
import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICES, assert_compiles, kernel_ran
from torch import nn

from blockops.attention import BlockMask, masks
from blockops.nn import BlockSparseAttention, BlockSparseMultiheadAttention, swap_attention

FWD, BWD = "block_sparse_attention", "block_sparse_attention_backward"
TOL = {"atol": 2e-5, "rtol": 1e-4}   # fp32 kernel vs PyTorch's fp32 attention


def causal_builder(q_len, kv_len, device):
    return masks.causal(q_len, kv_len, block_q=32, block_kv=32, device=device)


def cross_builder(q_len, kv_len, device):
    # Every query row sees some keys (MultiheadAttention gives NaN for rows that see none, the kernel 0).
    return masks.sliding_window(q_len, 24, causal=False, kv_len=kv_len, block_q=32, block_kv=16, device=device)


def mha_mask(block_mask: BlockMask) -> torch.Tensor:
    """MultiheadAttention's bool attn_mask (True = masked out) for a broadcast [1, 1] BlockMask."""
    return ~block_mask.to_dense()[0, 0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("cross,bias", [(False, True), (False, False), (True, True)])
def test_from_mha_matches_multihead_attention(device, batch_first, cross, bias):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(64, 4, bias=bias, batch_first=batch_first, device=device)
    tq, tk = (70, 130) if cross else (100, 100)
    builder = cross_builder if cross else causal_builder
    module = BlockSparseAttention.from_mha(mha, mask=builder)
    assert isinstance(module, BlockSparseMultiheadAttention) and module.batch_first == batch_first
    layout = (lambda t: (3, t, 64)) if batch_first else (lambda t: (t, 3, 64))
    query = torch.randn(layout(tq), device=device)
    kv = torch.randn(layout(tk), device=device) if cross else query
    with kernel_ran(FWD, device):
        out, weights = module(query, kv, kv, need_weights=False)
    ref, _ = mha(query, kv, kv, attn_mask=mha_mask(builder(tq, tk, device)), need_weights=False)
    assert weights is None
    torch.testing.assert_close(out, ref, **TOL)


def test_mha_call_convention_unbatched_and_default_need_weights():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 2)
    module = BlockSparseAttention.from_mha(mha, mask=causal_builder)
    x = torch.randn(50, 32)                              # unbatched [T, E]
    with kernel_ran(FWD, "cpu"):
        out, weights = module(x, x, x)                   # MultiheadAttention's default need_weights=True
    assert weights is None and out.shape == (50, 32)
    torch.testing.assert_close(out, mha(x, x, x, attn_mask=mha_mask(causal_builder(50, 50, "cpu")))[0], **TOL)


@pytest.mark.parametrize("device", DEVICES)
def test_gqa_and_gradients_match_repeat_interleave_reference(device):
    torch.manual_seed(0)
    mask = masks.sink_window_strided(97, sink=8, window=20, stride=3, block_q=16, block_kv=32, device=device)
    module = BlockSparseAttention(96, 6, num_kv_heads=2, mask=mask, device=device)    # 3 query heads per kv head
    x = torch.randn(2, 97, 96, device=device)
    grad_out = torch.randn(2, 97, 96, device=device)
    with kernel_ran(FWD, device), kernel_ran(BWD, device):
        out = module(x)
        out.backward(grad_out)

    ref_module = copy.deepcopy(module)
    ref_module.zero_grad()

    def heads(t, n):
        return t.view(2, 97, n, 16).transpose(1, 2)

    q = heads(ref_module.q_proj(x), 6)
    k = heads(ref_module.k_proj(x), 2).repeat_interleave(3, dim=1)
    v = heads(ref_module.v_proj(x), 2).repeat_interleave(3, dim=1)
    attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to_dense())
    ref = ref_module.out_proj(attn.transpose(1, 2).reshape(2, 97, 96))
    ref.backward(grad_out)
    torch.testing.assert_close(out, ref, **TOL)
    for (name, p), p_ref in zip(module.named_parameters(), ref_module.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {name}"
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-4, rtol=1e-4, msg=f"gradient of {name}")


def test_mask_builder_is_cached_per_length_and_device():
    calls = []

    def builder(q_len, kv_len, device):
        calls.append((q_len, kv_len, torch.device(device).type))
        return causal_builder(q_len, kv_len, device)

    module = BlockSparseAttention(32, 2, mask=builder)
    with kernel_ran(FWD, "cpu"):
        a = module(torch.randn(1, 40, 32))
        module(torch.randn(2, 40, 32))                   # same lengths, other batch: cached
        module(torch.randn(1, 72, 32))
    assert calls == [(40, 40, "cpu"), (72, 72, "cpu")] and a.shape == (1, 40, 32)

    per_call = []
    module(torch.randn(1, 40, 32), mask=lambda q, kv, d: per_call.append(q) or causal_builder(q, kv, d))
    assert per_call == [40] and len(calls) == 2       # a per-call builder, not the module's

    module.mask = builder                                # setting the mask drops the cache
    module(torch.randn(1, 40, 32))
    assert calls[-1] == (40, 40, "cpu") and len(calls) == 3

    for t in range(17, 37):                              # many lengths: the cache stays bounded
        module(torch.randn(1, t, 32))
    assert len(module._mask_cache) <= 16


def test_swap_attention_into_transformer_encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, dim_feedforward=96, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True)
    reference = copy.deepcopy(model).eval()
    assert swap_attention(model, causal_builder) == 2
    assert all(isinstance(m.self_attn, BlockSparseMultiheadAttention) for m in model.layers)
    model.eval()
    x = torch.randn(2, 80, 64)
    causal_mask = mha_mask(causal_builder(80, 80, "cpu"))

    # Inference, grad disabled: the layers' dense fast path must not bypass the swapped attention.
    with torch.no_grad(), kernel_ran(FWD, "cpu"):
        out = model(x)
    with torch.no_grad():
        torch.testing.assert_close(out, reference(x, mask=causal_mask), **TOL)

    model.train()
    with kernel_ran(FWD, "cpu"), kernel_ran(BWD, "cpu"):
        model(x).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "self_attn" in n)

    # What nn.TransformerEncoder passes on to self_attn: attn_mask / key_padding_mask tensors are refused, also
    # on the eval-mode nested-tensor path (swap_attention turned it off, so the padding mask reaches the module).
    model.eval()
    with torch.no_grad(), pytest.raises(ValueError, match="dense tensor"):
        model(x, mask=causal_mask)
    with torch.no_grad(), pytest.raises(ValueError, match="key_padding_mask"):
        model(x, src_key_padding_mask=torch.zeros(2, 80, dtype=torch.bool))


def test_swap_attention_keeps_dropout_for_eval_only():
    layer = nn.TransformerEncoderLayer(32, 2, dim_feedforward=32, batch_first=True)    # dropout=0.1 by default
    model = nn.Sequential(layer)
    swap_attention(model, causal_builder)
    x = torch.randn(1, 33, 32)
    model.eval()
    with kernel_ran(FWD, "cpu"):
        model(x)
    model.train()
    with pytest.raises(ValueError, match="dropout"):
        model(x)
    layer.self_attn.dropout = 0.0
    with kernel_ran(FWD, "cpu"):
        model(x)


def test_swap_attention_filter_and_cross_attention():
    torch.manual_seed(0)
    decoder_layer = nn.TransformerDecoderLayer(32, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    reference = copy.deepcopy(decoder_layer)
    n = swap_attention(decoder_layer, cross_builder, filter_fn=lambda m, name: name == "multihead_attn")
    assert n == 1 and isinstance(decoder_layer.self_attn, nn.MultiheadAttention)
    tgt, memory = torch.randn(2, 40, 32), torch.randn(2, 90, 32)
    with kernel_ran(FWD, "cpu"):
        out = decoder_layer(tgt, memory)
    ref = reference(tgt, memory, memory_mask=mha_mask(cross_builder(40, 90, "cpu")))
    torch.testing.assert_close(out, ref, **TOL)


def test_torch_compile_module():
    torch.manual_seed(0)
    module = BlockSparseAttention(64, 4, num_kv_heads=2, mask=causal_builder)
    x = torch.randn(1, 64, 64)
    # assert_compiles calls the module eagerly first, which builds the mask (building is not traceable).
    with kernel_ran(FWD, "cpu"):
        assert_compiles(module, x)


def test_errors():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        BlockSparseAttention(65, 4)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        BlockSparseAttention(64, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match="head_dim"):
        BlockSparseAttention(48, 4)                      # head_dim 12
    with pytest.raises(TypeError, match="mask must be"):
        BlockSparseAttention(32, 2, mask="causal")
    with pytest.raises(ValueError, match="add_bias_kv"):
        BlockSparseAttention.from_mha(nn.MultiheadAttention(32, 2, add_bias_kv=True))
    with pytest.raises(ValueError, match="add_zero_attn"):
        BlockSparseAttention.from_mha(nn.MultiheadAttention(32, 2, add_zero_attn=True))
    with pytest.raises(ValueError, match="kdim"):
        BlockSparseAttention.from_mha(nn.MultiheadAttention(32, 2, kdim=16, vdim=16))
    with pytest.raises(TypeError, match="MultiheadAttention"):
        BlockSparseAttention.from_mha(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="itself"):
        swap_attention(nn.MultiheadAttention(32, 2), causal_builder)

    x = torch.randn(1, 40, 32)
    with pytest.raises(ValueError, match="no mask"):
        BlockSparseAttention(32, 2)(x)
    module = BlockSparseAttention(32, 2, mask=causal_builder)
    with pytest.raises(ValueError, match=r"\[B, T, E\] with E=32"):
        module(torch.randn(1, 40, 16))
    with pytest.raises(ValueError, match="must match"):
        module(x, torch.randn(1, 50, 32), torch.randn(1, 51, 32))
    with pytest.raises(ValueError, match="q_len=64"):
        module(x, mask=causal_builder(64, 64, "cpu"))   # a mask for other lengths
    with pytest.raises(TypeError, match="returned"):
        module(x, mask=lambda q, kv, d: None)
    mha_style = BlockSparseAttention.from_mha(nn.MultiheadAttention(32, 2, batch_first=True), causal_builder)
    with pytest.raises(ValueError, match="is_causal"):
        mha_style(x, x, x, is_causal=True)
    with kernel_ran(FWD, "cpu"):                         # the module still works after the refused calls
        module(x)
        mha_style(x, x, x, attn_mask=causal_builder(40, 40, "cpu"))
