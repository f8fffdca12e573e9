"""Bad-input probes for every op family, run in child processes by tests/test_fuzz.py so that a crash (segfault,
SIGFPE, abort, a sanitizer report) fails the probe that caused it instead of killing the test run.

A probe is a function building its inputs and calling one op. Its kind says what passes:

* ``error``: the call raises a clean Python exception (RuntimeError, ValueError, TypeError or IndexError) whose
  message is not empty and, when the probe gives ``match``, contains that text (the argument or the problem);
* ``valid``: a documented-valid (if unusual) input: the call returns and the probe's own comparison with the
  reference in blockops.reference holds;
* ``either``: an input the docs leave open: a clean error as above, or a result matching the reference.

Anything else fails: another exception type (ZeroDivisionError, AssertionError from a wrong result, ...), an
empty message, a silently wrong result, or the process dying. ``xfail`` names the issue item a probe is known to
fail on (tests/test_fuzz.py marks it so).

Child protocol (``python tests/fuzz_probes.py NAME ...``): before each probe a line ``{"start": NAME}``, after it
``{"name": NAME, "ok": bool, "detail": str}``, each flushed; a probe that started without a result line is the one
that took the process down.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

CLEAN_ERRORS = (RuntimeError, ValueError, TypeError, IndexError)
BIG = 2**62          # fits int64, absurd as a size, index, stride or count
HUGE = 2**63 - 1     # int64 max


@dataclass
class Probe:
    name: str
    family: str
    kind: str                      # "error", "valid" or "either"
    fn: Callable[[], object]
    match: str | None = None       # text the error message must contain (case-insensitive)
    xfail: str | None = None       # known failure: "issue 17 item N, fixed on branch rel-..."


PROBES: dict[str, Probe] = {}



def probe(family: str, kind: str = "error", match: str | None = None, xfail: str | None = None):
    def register(fn):
        name = f"{family}.{fn.__name__.removeprefix('p_')}"
        assert name not in PROBES, name
        PROBES[name] = Probe(name, family, kind, fn, match, xfail)
        return fn
    return register


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _close(got, want, rtol=1e-4, atol=1e-4, what="result"):
    got, want = got.double(), want.double()
    if got.shape != want.shape:
        raise AssertionError(f"{what}: shape {tuple(got.shape)} != reference {tuple(want.shape)}")
    if not torch.allclose(got, want, rtol=rtol, atol=atol, equal_nan=True):
        err = (got - want).abs().nan_to_num(nan=float("inf")).max().item()
        raise AssertionError(f"{what}: max |error| {err:.3g} vs the reference")


# ================================================================================================ bitpack
def _pack(values, bits, dim=-1):
    from blockops.ops.bitpack import pack_bits
    return pack_bits(values, bits, dim)


def _unpack(packed, bits, size, dim=-1):
    from blockops.ops.bitpack import unpack_bits
    return unpack_bits(packed, bits, size, dim)


@probe("bitpack", match="dtype")
def p_pack_float_values():
    _pack(torch.zeros(8), 4)


@probe("bitpack", match="contiguous")
def p_pack_non_contiguous():
    _pack(torch.zeros(8, 6, dtype=torch.int32).t(), 4)


@probe("bitpack", match="bits")
def p_pack_bits_zero():
    _pack(torch.zeros(8, dtype=torch.int32), 0)


@probe("bitpack", match="bits")
def p_pack_bits_nine():
    _pack(torch.zeros(8, dtype=torch.int32), 9)


@probe("bitpack", match="bits")
def p_pack_bits_huge():
    _pack(torch.zeros(8, dtype=torch.int32), BIG)


@probe("bitpack", match="bits")
def p_pack_bits_wraps_to_valid():
    _pack(torch.zeros(8, dtype=torch.int32), 2**32 + 4)   # 4 after a cast to int


@probe("bitpack", match="dim")
def p_pack_dim_out_of_range():
    _pack(torch.zeros(8, dtype=torch.int32), 4, 1)


@probe("bitpack", match="dim")
def p_pack_dim_huge():
    _pack(torch.zeros(8, dtype=torch.int32), 4, -BIG)


@probe("bitpack", match="[0, 15]")
def p_pack_value_too_large():
    _pack(torch.tensor([1, 16, 3], dtype=torch.int32), 4)


@probe("bitpack", match="[0, 3]")
def p_pack_value_negative():
    _pack(torch.tensor([1, -1, 3], dtype=torch.int64), 2)


@probe("bitpack", match="values")
def p_pack_zero_dim_tensor():
    _pack(torch.tensor(3, dtype=torch.int32), 4)


@probe("bitpack", kind="valid")
def p_pack_empty_dims():
    from blockops.reference import ref_pack_bits, ref_unpack_bits
    for shape, dim in (((0, 5), 0), ((0, 5), 1), ((3, 0), 1), ((3, 0), 0)):
        v = torch.zeros(shape, dtype=torch.int32)
        p = _pack(v, 3, dim)
        _close(p, ref_pack_bits(v, 3, dim), 0, 0, "pack")
        _close(_unpack(p, 3, shape[dim], dim), ref_unpack_bits(p, 3, shape[dim], dim), 0, 0, "unpack")


@probe("bitpack", match="words")
def p_unpack_wrong_size():
    _unpack(torch.zeros(2, dtype=torch.int32), 4, 17)


@probe("bitpack", match="size")
def p_unpack_negative_size():
    _unpack(torch.zeros(2, dtype=torch.int32), 4, -1)


@probe("bitpack", match="words")
def p_unpack_huge_size():
    _unpack(torch.zeros(2, dtype=torch.int32), 4, BIG)


@probe("bitpack", match="dtype")
def p_unpack_int64_packed():
    _unpack(torch.zeros(2, dtype=torch.int64), 4, 16)


# ================================================================================================= lowbit
def _lowbit(in_features=64, out=24, bits=4, group_size=32, seed=0):
    from blockops.ops.bitpack import pack_bits
    g = _g(seed)
    q = torch.randint(0, 2**bits, (in_features, out), generator=g, dtype=torch.int32)
    groups = in_features // group_size
    scales = torch.rand(groups, out, generator=g) * 0.02 + 0.005
    zeros = torch.randint(0, 2**bits, (groups, out), generator=g).float()
    return pack_bits(q, bits, 0), scales, zeros


def _quant_linear(x, qweight, scales, zeros, bits, group_size, bias=None):
    from blockops.ops.lowbit import quant_linear
    return quant_linear(x, qweight, scales, zeros, bits, group_size, bias)


@probe("lowbit", match="bits")
def p_bits_five():
    qw, s, z = _lowbit()
    _quant_linear(torch.randn(2, 64), qw, s, z, 5, 32)


@probe("lowbit", match="group_size")
def p_group_size_eight():
    qw, s, z = _lowbit()
    _quant_linear(torch.randn(2, 64), qw, s, z, 4, 8)


@probe("lowbit", match="group_size")
def p_group_size_huge():
    """Once refused only after scales.size(0) * group_size overflowed int64 (found by UBSan, tools/sanitize.sh)."""
    qw, s, z = _lowbit()
    _quant_linear(torch.randn(2, 64), qw, s, z, 4, BIG)


@probe("lowbit", match="group_size")
def p_group_size_wraps_to_valid():
    qw, s, z = _lowbit()
    _quant_linear(torch.randn(2, 64), qw, s, z, 4, 2**32 + 32)   # 32 after a cast to int


@probe("lowbit", match="bits")
def p_bits_wraps_to_valid():
    qw, s, z = _lowbit()
    _quant_linear(torch.randn(2, 64), qw, s, z, 2**32 + 4, 32)


@probe("lowbit", match="features")
def p_x_wrong_features():
    qw, s, z = _lowbit()
    _quant_linear(torch.randn(2, 63), qw, s, z, 4, 32)


@probe("lowbit", match="x")
def p_x_int_dtype():
    qw, s, z = _lowbit()
    _quant_linear(torch.zeros(2, 64, dtype=torch.int32), qw, s, z, 4, 32)


@probe("lowbit", match="x")
def p_x_complex_dtype():
    qw, s, z = _lowbit()
    _quant_linear(torch.zeros(2, 64, dtype=torch.complex64), qw, s, z, 4, 32)


@probe("lowbit", kind="either", match="contiguous")
def p_x_non_contiguous():
    from blockops.reference import ref_quant_linear
    qw, s, z = _lowbit()
    x = torch.randn(64, 2).t()
    _close(_quant_linear(x, qw, s, z, 4, 32), ref_quant_linear(x, qw, s, z, 4, 32))


@probe("lowbit", match="qweight")
def p_qweight_int64():
    qw, s, z = _lowbit()
    _quant_linear(torch.randn(2, 64), qw.long(), s, z, 4, 32)


@probe("lowbit", match="qweight")
def p_qweight_wrong_rows():
    qw, s, z = _lowbit()
    _quant_linear(torch.randn(2, 64), qw[:-1].contiguous(), s, z, 4, 32)


@probe("lowbit", match="zeros")
def p_zeros_dtype_mismatch():
    qw, s, z = _lowbit()
    _quant_linear(torch.randn(2, 64), qw, s, z.half(), 4, 32)


@probe("lowbit", match="bias")
def p_bias_wrong_shape():
    qw, s, z = _lowbit()
    _quant_linear(torch.randn(2, 64), qw, s, z, 4, 32, torch.zeros(25))


@probe("lowbit", match="bias")
def p_bias_int_dtype():
    qw, s, z = _lowbit()
    _quant_linear(torch.randn(2, 64), qw, s, z, 4, 32, torch.zeros(24, dtype=torch.int32))


@probe("lowbit", kind="valid")
def p_zero_rows():
    qw, s, z = _lowbit()
    y = _quant_linear(torch.randn(0, 64), qw, s, z, 4, 32)
    assert y.shape == (0, 24), y.shape


@probe("lowbit", kind="valid")
def p_in_features_zero_gives_bias():
    qw, s, z = _lowbit(0, 24, 4, 32)
    bias = torch.randn(24)
    _close(_quant_linear(torch.randn(3, 0), qw, s, z, 4, 32, bias), bias.expand(3, 24), 0, 0)


@probe("lowbit", kind="either")
def p_meta_x_cpu_weights():
    qw, s, z = _lowbit()
    _quant_linear(torch.randn(2, 64, device="meta"), qw, s, z, 4, 32)


@probe("lowbit", match="features")
def p_dequantize_then_linear_grad_input_wrong_shape():
    qw, s, z = _lowbit()
    torch.ops.blockops.quant_linear_grad_input(torch.randn(2, 23), qw, s, z, 4, 32)


@probe("lowbit", match="t")
def p_grad_scales_wrong_t():
    qw, s, z = _lowbit()
    torch.ops.blockops.quant_grad_scales(torch.randn(24, 63), qw, z, 4, 32)


@probe("lowbit", kind="valid")
def p_from_gptq_bias_broadcast():
    """A [1] bias for a 24-output layer must be refused (issue 17 item 4: it was broadcast to every output)."""
    from blockops.nn import QuantLinear
    qw, s, z = _lowbit()
    qzeros = torch.zeros(2, 3, dtype=torch.int32)
    try:
        QuantLinear.from_gptq(qw, qzeros, s.half(), torch.ones(1), bits=4, group_size=32)
    except ValueError as e:
        assert "bias" in str(e), str(e)
        return
    raise AssertionError("a [1] bias for 24 outputs was accepted")


@probe("lowbit", match="broken.safetensors")
def p_gptq_checkpoint_malformed_file():
    """A truncated .safetensors file: the error must say which file (it was the library's bare SafetensorError)."""
    import os
    import tempfile
    from torch import nn
    from blockops.quant.gptq import load_gptq_checkpoint
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "broken.safetensors")
        with open(path, "wb") as f:
            f.write((10**6).to_bytes(8, "little") + b'{"lin.qweight": {"dtype": "I32", "shape": [')
        load_gptq_checkpoint(nn.Sequential(nn.Linear(64, 24)), path, bits=4, group_size=32)


# ============================================================================================== attention
def _attn(B=1, H=2, Hk=2, Tq=40, Tk=40, D=16, Dv=16, dtype=torch.float32, seed=0):
    g = _g(seed)
    q = torch.randn(B, H, Tq, D, generator=g).to(dtype)
    k = torch.randn(B, Hk, Tk, D, generator=g).to(dtype)
    v = torch.randn(B, Hk, Tk, Dv, generator=g).to(dtype)
    return q, k, v


def _bsa(q, k, v, mask, **kw):
    from blockops.attention import block_sparse_attention
    return block_sparse_attention(q, k, v, mask, **kw)


def _causal(t, tk=None, bq=16, bkv=16):
    from blockops.attention import masks
    return masks.causal(t, tk, block_q=bq, block_kv=bkv)


@probe("attention", match="dtype")
def p_int_q():
    q, k, v = _attn()
    _bsa(q.int(), k.int(), v.int(), _causal(40))


@probe("attention", match="dtype")
def p_q_k_dtype_mismatch():
    q, k, v = _attn()
    _bsa(q, k.half(), v, _causal(40))


@probe("attention", match="8")
def p_head_dim_12():
    q, k, v = _attn(D=12)
    _bsa(q, k, v, _causal(40))


@probe("attention", match="256")
def p_head_dim_264():
    q, k, v = _attn(D=264)
    _bsa(q, k, v, _causal(40))


@probe("attention", match="D")
def p_head_dim_zero():
    q, k, v = _attn(D=0)
    _bsa(q, k, v, _causal(40))


@probe("attention", match="D")
def p_head_dim_zero_with_scale():
    q, k, v = _attn(D=0)
    _bsa(q, k, v, _causal(40), scale=1.0)


@probe("attention", match="q_len")
def p_mask_for_other_length():
    q, k, v = _attn()
    _bsa(q, k, v, _causal(41))


@probe("attention", match="multiple")
def p_heads_not_multiple():
    q, k, v = _attn(H=3, Hk=2)
    _bsa(q, k, v, _causal(40))


@probe("attention", match="[B, H, T, D]")
def p_three_d_q():
    q, k, v = _attn()
    _bsa(q[0], k[0], v[0], _causal(40))


@probe("attention", match="contiguous")
def p_last_dim_strided():
    q, k, v = _attn(D=32)
    _bsa(q[..., ::2], k[..., ::2], v, _causal(40))


@probe("attention", match="BlockMask")
def p_mask_not_a_blockmask():
    q, k, v = _attn()
    _bsa(q, k, v, torch.ones(40, 40, dtype=torch.bool))


def _edited_mask(field, value, index):
    mask = _causal(40)
    t = getattr(mask, field).clone()
    t[index] = value
    import dataclasses
    return dataclasses.replace(mask, **{field: t})


@probe("attention", match="kv_indices")
def p_mask_index_out_of_range():
    q, k, v = _attn()
    _bsa(q, k, v, _edited_mask("kv_indices", 7, (0, 0, 1, 0)))


@probe("attention", match="kv_num_blocks")
def p_mask_count_huge():
    q, k, v = _attn()
    _bsa(q, k, v, _edited_mask("kv_num_blocks", 2**31 - 1, (0, 0, 1)))


@probe("attention", match="full")
def p_mask_full_count_negative():
    q, k, v = _attn()
    _bsa(q, k, v, _edited_mask("full_kv_num_blocks", -5, (0, 0, 2)))


@probe("attention", match="tile")
def p_mask_tile_id_out_of_range():
    q, k, v = _attn()
    _bsa(q, k, v, _edited_mask("kv_tile_ids", 1000, (0, 0, 2, 2)))


@probe("attention", match="full_kv_indices")
def p_mask_edited_in_place_after_use():
    """Issue 17 item 6: a duplicated full-block index written into a mask that was already used once."""
    from blockops.attention import BlockMask
    q, k, v = _attn()
    mask = BlockMask.from_dense(torch.ones(40, 40, dtype=torch.bool), 16, 16)
    _bsa(q, k, v, mask)
    mask.full_kv_indices[0, 0, 2, 1] = 0          # [0, 1, 2] -> [0, 0, 2]: not ascending, block 0 twice
    _bsa(q, k, v, mask)


@probe("attention", kind="valid")
def p_empty_batch():
    q, k, v = _attn(B=0)
    out = _bsa(q, k, v, _causal(40))
    assert out.shape == (0, 2, 40, 16)


@probe("attention", kind="either", match="scale")
def p_nan_scale():
    q, k, v = _attn()
    out = _bsa(q, k, v, _causal(40), scale=float("nan"))
    assert out.shape == q.shape


# ========================================================================================= path_attention
def _path(B=1, T=12, HQ=2, H=2, D=16, Dv=16, gate=True, dtype=torch.float32, seed=0):
    g = _g(seed)
    q = torch.randn(B, T, HQ, D, generator=g).to(dtype)
    k = torch.randn(B, T, H, D, generator=g).to(dtype)
    v = torch.randn(B, T, H, Dv, generator=g).to(dtype)
    w = F.normalize(torch.randn(B, T, H, D, generator=g), dim=-1).to(dtype)
    beta = 2 * torch.sigmoid(torch.randn(B, T, H, generator=g)).to(dtype)
    gg = F.logsigmoid(torch.randn(B, T, HQ, generator=g)).to(dtype) if gate else None
    return q, k, v, w, beta, gg


def _path_attention(*args, **kw):
    from blockops.ops.path_attention import path_attention
    return path_attention(*args, **kw)


@probe("path_attention", match="8")
def p_head_dim_12():
    _path_attention(*_path(D=12))


@probe("path_attention", match="D")
def p_head_dim_zero():
    _path_attention(*_path(D=0))


@probe("path_attention", match="dtype")
def p_k_dtype_mismatch():
    q, k, v, w, beta, g = _path()
    _path_attention(q, k.half(), v, w, beta, g)


@probe("path_attention", match="dtype")
def p_int_inputs():
    q, k, v, w, beta, g = _path()
    _path_attention(q.int(), k.int(), v.int(), w, beta, g)


@probe("path_attention", match="beta")
def p_beta_wrong_shape():
    q, k, v, w, beta, g = _path()
    _path_attention(q, k, v, w, beta[..., :1], g)


@probe("path_attention", match="g")
def p_gate_wrong_heads():
    q, k, v, w, beta, g = _path(HQ=4, H=2)
    _path_attention(q, k, v, w, beta, g[..., :2])


@probe("path_attention", match="multiple")
def p_heads_not_multiple():
    _path_attention(*_path(HQ=3, H=2))


@probe("path_attention", match="cu_seqlens")
def p_cu_seqlens_past_end():
    q, k, v, w, beta, g = _path()
    _path_attention(q, k, v, w, beta, g, cu_seqlens=torch.tensor([0, 5, 13], dtype=torch.int32))


@probe("path_attention", match="cu_seqlens")
def p_cu_seqlens_huge():
    q, k, v, w, beta, g = _path()
    _path_attention(q, k, v, w, beta, g, cu_seqlens=torch.tensor([0, BIG, 12], dtype=torch.int64))


@probe("path_attention", match="cu_seqlens")
def p_cu_seqlens_descending():
    q, k, v, w, beta, g = _path()
    _path_attention(q, k, v, w, beta, g, cu_seqlens=torch.tensor([0, 8, 4, 12], dtype=torch.int32))


@probe("path_attention", match="cu_seqlens")
def p_cu_seqlens_not_from_zero():
    q, k, v, w, beta, g = _path()
    _path_attention(q, k, v, w, beta, g, cu_seqlens=torch.tensor([2, 12], dtype=torch.int32))


@probe("path_attention", match="cu_seqlens")
def p_cu_seqlens_float():
    q, k, v, w, beta, g = _path()
    _path_attention(q, k, v, w, beta, g, cu_seqlens=torch.tensor([0.0, 12.0]))


@probe("path_attention", match="B")
def p_cu_seqlens_with_batch_two():
    q, k, v, w, beta, g = _path(B=2)
    _path_attention(q, k, v, w, beta, g, cu_seqlens=torch.tensor([0, 12], dtype=torch.int32))


@probe("path_attention", kind="either")
def p_zero_length():
    o, _ = _path_attention(*_path(T=0))
    assert o.shape == (1, 0, 2, 16)


def _decode_args(B=2, HQ=2, H=2, D=16, Dv=16, L=8, gate=False):
    g = _g(3)
    q_t = torch.randn(B, HQ, D, generator=g)
    k_t = torch.randn(B, H, D, generator=g)
    v_t = torch.randn(B, H, Dv, generator=g)
    w_t = F.normalize(torch.randn(B, H, D, generator=g), dim=-1)
    beta_t = torch.rand(B, H, generator=g)
    keys, values = torch.randn(B, H, L, D, generator=g), torch.randn(B, H, L, Dv, generator=g)
    lengths = torch.tensor([3, 5][:B] + [1] * max(0, B - 2), dtype=torch.int64)
    g_t = gates = g_last = None
    if gate:
        g_t, gates, g_last = torch.rand(B, HQ, generator=g), torch.rand(B, HQ, L, generator=g), torch.rand(B, HQ)
    return [q_t, k_t, v_t, w_t, beta_t, g_t, keys, values, lengths, gates, g_last, D ** -0.5]


@probe("path_attention", match="q_t")
def p_decode_two_d_q():
    from blockops.ops.path_attention import PathCache, path_decode_step
    a = _decode_args()
    path_decode_step(a[0][0], a[1], a[2], a[3], a[4], None, PathCache(a[6], a[7], a[8]))


@probe("path_attention", match="lengths")
def p_decode_length_at_capacity():
    a = _decode_args()
    a[8] = torch.tensor([3, 8])                      # no slot left for the new token (the op does not grow)
    torch.ops.blockops.path_decode_step(*a)


@probe("path_attention", match="lengths")
def p_decode_length_negative():
    a = _decode_args()
    a[8] = torch.tensor([3, -1])
    torch.ops.blockops.path_decode_step(*a)


@probe("path_attention", match="lengths")
def p_decode_length_huge():
    a = _decode_args()
    a[8] = torch.tensor([3, BIG])
    torch.ops.blockops.path_decode_step(*a)


@probe("path_attention", match="lengths")
def p_decode_lengths_int32():
    a = _decode_args()
    a[8] = a[8].int()
    torch.ops.blockops.path_decode_step(*a)


@probe("path_attention", match="keys")
def p_decode_keys_half():
    a = _decode_args()
    a[6] = a[6].half()
    torch.ops.blockops.path_decode_step(*a)


@probe("path_attention", match="gate")
def p_decode_gate_without_gated_cache():
    a = _decode_args()
    a[5] = torch.rand(2, 2)
    torch.ops.blockops.path_decode_step(*a)


@probe("path_attention", match="keys")
def p_decode_keys_non_contiguous():
    a = _decode_args()
    a[6] = a[6].transpose(2, 3).contiguous().transpose(2, 3)
    torch.ops.blockops.path_decode_step(*a)


@probe("path_attention", kind="valid")
def p_decode_matches_reference():
    from blockops.reference import ref_path_decode_step
    a = _decode_args(gate=True)
    want = ref_path_decode_step(*[t.clone() if isinstance(t, torch.Tensor) else t for t in a])
    o = torch.ops.blockops.path_decode_step(*a)
    _close(o, want[0], 1e-4, 1e-5, "o_t")


# ===================================================================================================== vq
def _vq(out=8, groups=4, K=1, k=16, d=4, code_dtype=torch.uint8, seed=0):
    g = _g(seed)
    codes = torch.randint(0, k, (out, groups, K), generator=g, dtype=torch.int32).to(code_dtype)
    codebooks = torch.randn(K, k, d, generator=g)
    return codes, codebooks


def _vq_linear(x, codes, codebooks, scales=None, bias=None):
    from blockops.ops.vq import vq_linear
    return vq_linear(x, codes, codebooks, scales, bias)


@probe("vq", match="code")
def p_code_at_k():
    codes, cb = _vq()
    codes[3, 1, 0] = 16
    _vq_linear(torch.randn(2, 16), codes, cb)


@probe("vq", match="code")
def p_code_255_of_16():
    codes, cb = _vq()
    codes[0, 0, 0] = 255
    _vq_linear(torch.randn(33, 16), codes, cb)


@probe("vq", match="code")
def p_int16_code_negative():
    codes, cb = _vq(k=256, code_dtype=torch.int16)
    codes[1, 2, 0] = -3                              # read as 65533 >= k
    _vq_linear(torch.randn(2, 16), codes, cb)


@probe("vq", match="code")
def p_dequantize_code_out_of_range():
    from blockops.ops.vq import vq_dequantize
    codes, cb = _vq()
    codes[7, 3, 0] = 200
    vq_dequantize(codes, cb)


@probe("vq", match="codes")
def p_codes_int32():
    codes, cb = _vq()
    _vq_linear(torch.randn(2, 16), codes.int(), cb)


@probe("vq", match="K")
def p_three_codebooks():
    codes, cb = _vq(K=3)
    _vq_linear(torch.randn(2, 16), codes, cb)


@probe("vq", match="d")
def p_vector_dim_three():
    codes, cb = _vq(d=3)
    _vq_linear(torch.randn(2, 12), codes, cb)


@probe("vq", match="k")
def p_codebook_size_eight():
    codes, cb = _vq(k=8)
    _vq_linear(torch.randn(2, 16), codes, cb)


@probe("vq", match="codes")
def p_codes_K_mismatch():
    codes, cb = _vq(K=1)
    _vq_linear(torch.randn(2, 16), codes, torch.randn(2, 16, 4))


@probe("vq", match="features")
def p_x_wrong_features():
    codes, cb = _vq()
    _vq_linear(torch.randn(2, 15), codes, cb)


@probe("vq", match="scales")
def p_scales_wrong_shape():
    codes, cb = _vq()
    _vq_linear(torch.randn(2, 16), codes, cb, torch.ones(9))


@probe("vq", match="bias")
def p_bias_wrong_shape():
    codes, cb = _vq()
    _vq_linear(torch.randn(2, 16), codes, cb, None, torch.ones(1))


@probe("vq", kind="either", match="contiguous")
def p_x_non_contiguous():
    from blockops.reference import ref_vq_linear
    codes, cb = _vq()
    x = torch.randn(16, 3).t()
    _close(_vq_linear(x, codes, cb), ref_vq_linear(x, codes, cb), 1e-5, 1e-5)


@probe("vq", kind="valid")
def p_zero_rows():
    codes, cb = _vq()
    assert _vq_linear(torch.randn(0, 16), codes, cb).shape == (0, 8)


@probe("vq", kind="valid")
def p_zero_outputs():
    codes, cb = _vq(out=0)
    assert _vq_linear(torch.randn(3, 16), codes, cb).shape == (3, 0)


@probe("vq", kind="valid")
def p_in_features_zero_gives_bias():
    codes, cb = _vq(groups=0)
    bias = torch.randn(8)
    _close(_vq_linear(torch.randn(3, 0), codes, cb, None, bias), bias.expand(3, 8), 0, 0)


# ================================================================================================= ptq161
def _ptq(out=8, inn=40, S=10, seed=0, zero=(3, 17)):
    from blockops.ops.bitpack import pack_bits
    from blockops.ops.ptq161 import salient_padded
    g = _g(seed)
    N = inn - S
    perm = torch.randperm(inn, generator=g).int()
    q = torch.randint(0, 16, (salient_padded(S), out), generator=g, dtype=torch.int32)
    b = torch.randint(0, 2, (-(-N // 32) * 32, out), generator=g, dtype=torch.int32)
    t = {"perm": perm, "qsalient": pack_bits(q, 4, 0), "salient_scale": torch.rand(out, generator=g) + 0.1,
         "salient_zero": torch.rand(out, generator=g) * 15, "signs": pack_bits(b, 1, 0),
         "zero_signs": torch.tensor([z for z in zero if z < N * out], dtype=torch.int64),
         "alpha": torch.rand(out, generator=g), "mu": torch.randn(out, generator=g) * 0.1,
         "r1": torch.rand(out, generator=g) + 0.5, "r2": torch.rand(inn, generator=g) + 0.5}
    return t, S


def _ptq_linear(x, t, S, bias=None, **override):
    from blockops.ops.ptq161 import FIELDS, ptq161_linear
    t = dict(t, **override)
    return ptq161_linear(x, *[t[f] for f in FIELDS], S, bias)


@probe("ptq161", match="num_salient")
def p_num_salient_too_large():
    t, S = _ptq()
    _ptq_linear(torch.randn(2, 40), t, 41)


@probe("ptq161", match="num_salient")
def p_num_salient_negative():
    t, S = _ptq()
    _ptq_linear(torch.randn(2, 40), t, -1)


@probe("ptq161", match="num_salient")
def p_num_salient_huge():
    t, S = _ptq()
    _ptq_linear(torch.randn(2, 40), t, BIG)


@probe("ptq161", match="perm")
def p_perm_out_of_range():
    t, S = _ptq()
    perm = t["perm"].clone()
    perm[5] = 40
    _ptq_linear(torch.randn(2, 40), t, S, perm=perm)


@probe("ptq161", match="perm")
def p_perm_negative():
    t, S = _ptq()
    perm = t["perm"].clone()
    perm[0] = -2**31
    _ptq_linear(torch.randn(2, 40), t, S, perm=perm)


@probe("ptq161", kind="either", match="perm")
def p_perm_duplicate():
    from blockops.ops.ptq161 import FIELDS
    from blockops.reference import ref_ptq161_linear
    t, S = _ptq()
    perm = t["perm"].clone()
    perm[1] = perm[0]
    x = torch.randn(2, 40)
    t = dict(t, perm=perm)
    _close(_ptq_linear(x, t, S), ref_ptq161_linear(x, *[t[f] for f in FIELDS], S), 1e-4, 1e-4)


@probe("ptq161", match="zero_signs")
def p_zero_signs_out_of_range():
    t, S = _ptq()
    _ptq_linear(torch.randn(2, 40), t, S, zero_signs=torch.tensor([3, 30 * 8], dtype=torch.int64))


@probe("ptq161", match="zero_signs")
def p_zero_signs_negative():
    t, S = _ptq()
    _ptq_linear(torch.randn(2, 40), t, S, zero_signs=torch.tensor([-1, 3], dtype=torch.int64))


@probe("ptq161", match="zero_signs")
def p_zero_signs_huge():
    t, S = _ptq()
    _ptq_linear(torch.randn(2, 40), t, S, zero_signs=torch.tensor([3, BIG], dtype=torch.int64))


@probe("ptq161", match="zero_signs")
def p_zero_signs_not_increasing():
    t, S = _ptq()
    _ptq_linear(torch.randn(2, 40), t, S, zero_signs=torch.tensor([17, 3], dtype=torch.int64))


@probe("ptq161", match="zero_signs")
def p_zero_signs_int32():
    t, S = _ptq()
    _ptq_linear(torch.randn(2, 40), t, S, zero_signs=t["zero_signs"].int())


@probe("ptq161", match="qsalient")
def p_qsalient_wrong_shape():
    t, S = _ptq()
    _ptq_linear(torch.randn(2, 40), t, S, qsalient=t["qsalient"][:1].contiguous())


@probe("ptq161", match="signs")
def p_signs_wrong_shape():
    t, S = _ptq()
    _ptq_linear(torch.randn(2, 40), t, S, signs=torch.zeros(2, 8, dtype=torch.int32))


@probe("ptq161", match="r2")
def p_r2_wrong_shape():
    t, S = _ptq()
    _ptq_linear(torch.randn(2, 40), t, S, r2=torch.ones(39))


@probe("ptq161", match="features")
def p_x_wrong_features():
    t, S = _ptq()
    _ptq_linear(torch.randn(2, 41), t, S)


@probe("ptq161", match="x")
def p_x_int():
    t, S = _ptq()
    _ptq_linear(torch.zeros(2, 40, dtype=torch.int32), t, S)


@probe("ptq161", match="bias")
def p_bias_wrong_shape():
    t, S = _ptq()
    _ptq_linear(torch.randn(2, 40), t, S, torch.ones(7))


@probe("ptq161", kind="valid")
def p_all_salient_and_none_salient():
    from blockops.ops.ptq161 import FIELDS
    from blockops.reference import ref_ptq161_linear
    for S in (0, 40):
        t, _ = _ptq(S=S)
        x = torch.randn(3, 40)
        _close(_ptq_linear(x, t, S), ref_ptq161_linear(x, *[t[f] for f in FIELDS], S), 1e-3, 1e-3, f"S={S}")


@probe("ptq161", kind="valid")
def p_in_features_zero_gives_bias():
    t, S = _ptq(inn=0, S=0)
    bias = torch.randn(8)
    _close(_ptq_linear(torch.randn(3, 0), t, 0, bias), bias.expand(3, 8), 0, 0)


# =================================================================================================== dllm
def _dllm(B=2, L=9, V=11, seed=0):
    g = _g(seed)
    logits = torch.randn(B, L, V, generator=g) * 3
    masked = torch.rand(B, L, generator=g) < 0.6
    bounds = torch.tensor([[0, L]] * B, dtype=torch.int64).reshape(B, 2)
    return logits, masked, bounds


def _unmask(*a, **kw):
    from blockops.ops.dllm import unmask
    return unmask(*a, **kw)


def _unmask_ref_check(logits, masked, bounds, **kw):
    from blockops.reference import ref_dllm_candidates, ref_dllm_select, ref_dllm_unmask
    r = _unmask(logits, masked, bounds, **kw)
    tokens, _, conf = ref_dllm_unmask(logits, masked, bounds, kw.get("threshold", 0.9), kw.get("factor"),
                                      kw.get("min_tokens"))
    assert torch.equal(r.tokens, tokens), "tokens differ from the reference"
    _close(r.confidence, conf, 2e-6, 1e-7, "confidence")
    cand = ref_dllm_candidates(masked, bounds)
    sel = ref_dllm_select(r.confidence, cand, kw.get("threshold", 0.9), kw.get("factor"), kw.get("min_tokens"))
    assert torch.equal(r.unmask, sel), "selection differs from the rule"


@probe("dllm", match="logits")
def p_one_d_logits():
    _unmask(torch.randn(7), torch.ones(7, dtype=torch.bool))


@probe("dllm", match="logits")
def p_int_logits():
    logits, masked, bounds = _dllm()
    _unmask(logits.int(), masked, bounds)


@probe("dllm", match="masked")
def p_masked_uint8():
    logits, masked, bounds = _dllm()
    _unmask(logits, masked.to(torch.uint8), bounds)


@probe("dllm", match="masked")
def p_masked_wrong_shape():
    logits, masked, bounds = _dllm()
    _unmask(logits, masked[:, :-1].contiguous(), bounds)


@probe("dllm", match="block_bounds")
def p_bounds_int32():
    logits, masked, bounds = _dllm()
    _unmask(logits, masked, bounds.int())


@probe("dllm", match="block_bounds")
def p_bounds_wrong_shape():
    logits, masked, bounds = _dllm()
    _unmask(logits, masked, bounds[:, :1].contiguous())


@probe("dllm", kind="either", match="block_bounds")
def p_bounds_huge_and_negative():
    logits, masked, bounds = _dllm()
    _unmask_ref_check(logits, masked, torch.tensor([[-BIG, BIG], [HUGE, -HUGE]]))


@probe("dllm", kind="either", match="min_tokens")
def p_min_tokens_huge_and_negative():
    logits, masked, bounds = _dllm()
    _unmask_ref_check(logits, masked, bounds, min_tokens=torch.tensor([BIG, -BIG]))


@probe("dllm", match="min_tokens")
def p_min_tokens_wrong_shape():
    logits, masked, bounds = _dllm()
    _unmask(logits, masked, bounds, min_tokens=torch.tensor([1, 2, 3]))


@probe("dllm", kind="either", match="threshold")
def p_threshold_nan():
    logits, masked, bounds = _dllm()
    _unmask_ref_check(logits, masked, bounds, threshold=float("nan"))


@probe("dllm", kind="either", match="V")
def p_empty_vocabulary():
    logits, masked, bounds = _dllm(V=0)
    _unmask(logits, masked, bounds)


@probe("dllm", kind="valid")
def p_empty_batch_and_length():
    for B, L in ((0, 5), (2, 0)):
        logits, masked, bounds = _dllm(B, L, 7)
        r = _unmask(logits, masked, bounds)
        assert r.tokens.shape == (B, L)


@probe("dllm", kind="valid")  # found by this suite: a size-1 vocabulary dim with stride 0 was refused
def p_size_one_vocab_any_stride():
    logits = torch.randn(2, 3, 4)[..., :1]                    # strides (12, 4, 1): fine
    logits = torch.randn(2, 3, 1).as_strided((2, 3, 1), (3, 1, 0))
    masked = torch.ones(2, 3, dtype=torch.bool)
    _unmask_ref_check(logits, masked, torch.tensor([[0, 3], [0, 3]]))


@probe("dllm", match="contiguous")
def p_logits_vocab_strided():
    logits, masked, bounds = _dllm(V=12)
    _unmask(logits[..., ::2], masked, bounds)


def _kv(B=2, H=2, S=10, n=3, D=8):
    g = _g(1)
    cache = torch.randn(B, H, S, D, generator=g)
    new = torch.randn(B, H, n, D, generator=g)
    positions = torch.tensor([[0, 4, 9], [1, 2, 3]], dtype=torch.int64)[:B, :n]
    return cache, new, positions


def _kv_overwrite(*a, **kw):
    from blockops.ops.dllm import kv_overwrite
    return kv_overwrite(*a, **kw)


@probe("dllm", match="positions")
def p_kv_position_at_end():
    cache, new, pos = _kv()
    pos[0, 2] = 10
    _kv_overwrite(cache, new, pos)


@probe("dllm", match="positions")
def p_kv_position_negative():
    cache, new, pos = _kv()
    pos[1, 0] = -1
    _kv_overwrite(cache, new, pos)


@probe("dllm", match="positions")
def p_kv_position_huge():
    cache, new, pos = _kv()
    pos[1, 2] = BIG
    _kv_overwrite(cache, new, pos)


@probe("dllm", match="positions")
def p_kv_positions_not_increasing():
    cache, new, pos = _kv()
    pos[0] = torch.tensor([4, 4, 9])
    _kv_overwrite(cache, new, pos)


@probe("dllm", match="positions")
def p_kv_positions_int32():
    cache, new, pos = _kv()
    _kv_overwrite(cache, new, pos.int())


@probe("dllm", match="new")
def p_kv_new_dtype_mismatch():
    cache, new, pos = _kv()
    _kv_overwrite(cache, new.half(), pos)


@probe("dllm", match="cache")
def p_kv_cache_non_contiguous():
    cache, new, pos = _kv()
    _kv_overwrite(cache.transpose(2, 3).contiguous().transpose(2, 3), new, pos)


@probe("dllm", kind="valid")
def p_kv_unchecked_out_of_range_is_skipped():
    from blockops.reference import ref_dllm_kv_overwrite
    cache, new, pos = _kv()
    pos[0, 2], pos[1, 0] = BIG, -7
    want = cache.clone()
    keep = (pos >= 0) & (pos < cache.shape[2])
    for b in range(2):
        sel = keep[b]
        want[b:b + 1] = ref_dllm_kv_overwrite(cache[b:b + 1], new[b:b + 1, :, sel], pos[b:b + 1, sel])
    _kv_overwrite(cache, new, pos, check_indices=False)
    _close(cache, want, 0, 0, "cache")


# ============================================================================================ block_cache
def _bc(shape=(2, 9, 5), seed=0, dtype=torch.float32):
    g = _g(seed)
    return torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)


def _rel_l1(*a):
    from blockops.ops.block_cache import relative_l1
    return relative_l1(*a)


def _rel_l1_residual(*a):
    from blockops.ops.block_cache import relative_l1_residual
    return relative_l1_residual(*a)


@probe("block_cache", match="stride")
def p_stride_zero():
    _rel_l1(*_bc(), 0)


@probe("block_cache", match="stride")
def p_stride_negative():
    _rel_l1(*_bc(), -3)


def _huge_stride_check(stride, residual=False):
    from blockops.reference import ref_relative_l1, ref_relative_l1_residual
    a, b = _bc((2, 9))                # one element per token: the kernels' chunk is 16384 tokens * stride
    for per_sample in (False, True):
        if residual:
            out = torch.empty_like(a)
            got = _rel_l1_residual(a, b, b, out, stride, per_sample, False)
            want = ref_relative_l1_residual(a, b, b, stride, per_sample, False)[0]
        else:
            got, want = _rel_l1(a, b, stride, per_sample), ref_relative_l1(a, b, stride, per_sample)
        _close(got, want, 2e-6, 0, f"stride={stride} per_sample={per_sample}")


@probe("block_cache", kind="valid")
def p_stride_past_length():
    _huge_stride_check(10)


@probe("block_cache", kind="valid")
def p_stride_2_31():
    _huge_stride_check(2**31)


@probe("block_cache", kind="valid")
def p_stride_2_49():
    _huge_stride_check(2**49)


@probe("block_cache", kind="valid")
def p_stride_2_50():
    _huge_stride_check(2**50)


@probe("block_cache", kind="valid")
def p_stride_int64_max():
    _huge_stride_check(HUGE)


@probe("block_cache", kind="valid")
def p_residual_stride_int64_max():
    _huge_stride_check(HUGE, residual=True)


@probe("block_cache", match="shape")
def p_shape_mismatch():
    a, b = _bc()
    _rel_l1(a, b[:, :-1].contiguous())


@probe("block_cache", match="dtype")
def p_dtype_mismatch():
    a, b = _bc()
    _rel_l1(a, b.half())


@probe("block_cache", match="dtype")
def p_int_dtype():
    a, b = _bc()
    _rel_l1(a.int(), b.int())


@probe("block_cache", match="contiguous")
def p_non_contiguous():
    a, b = _bc((2, 9, 6))
    _rel_l1(a.transpose(1, 2), b.transpose(1, 2))


@probe("block_cache", match="current")
def p_one_d():
    a, b = _bc((9,))
    _rel_l1(a, b)


@probe("block_cache", kind="either")
def p_zero_sizes():
    from blockops.reference import ref_relative_l1
    for shape in ((0, 4, 3), (2, 0, 3), (2, 4, 0)):
        a, b = _bc(shape)
        for per_sample in (False, True):
            _close(_rel_l1(a, b, 1, per_sample), ref_relative_l1(a, b, 1, per_sample), 0, 0, str(shape))


@probe("block_cache", match="residual")
def p_residual_wrong_dtype():
    a, b = _bc()
    _rel_l1_residual(a, b, b, torch.empty_like(a).half(), 1, False, False)


@probe("block_cache", match="residual")
def p_apply_residual_shape_mismatch():
    from blockops.ops.block_cache import apply_residual
    a, b = _bc()
    apply_residual(a, b[:1].contiguous())


@probe("block_cache", match="gate")
def p_cache_update_gate_two_elements():
    from blockops.ops.block_cache import cache_update
    a, b = _bc()
    cache_update(a, b, torch.ones(2, dtype=torch.bool))


@probe("block_cache", match="value")
def p_cache_update_shape_mismatch():
    from blockops.ops.block_cache import cache_update
    a, b = _bc()
    cache_update(a, b[:1].contiguous())


@probe("block_cache", kind="either", match="gate")
def p_cache_update_nan_gate():
    from blockops.ops.block_cache import cache_update
    from blockops.reference import ref_cache_update
    a, b = _bc()
    gate = torch.tensor([float("nan")])
    want = ref_cache_update(a, b, gate)
    cache_update(a, b, gate)
    _close(a, want, 0, 0, "cache")


# ============================================================================================ the runner
def verdict(p: Probe, exc: BaseException | None) -> tuple[bool, str]:
    """(passed, detail) of probe p that raised exc (None: returned normally)."""
    if exc is None:
        if p.kind == "error":
            return False, "returned normally; expected a clear error"
        return True, "returned, matches the reference"
    what = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
    if isinstance(exc, AssertionError) and p.kind != "error":
        return False, f"wrong result: {exc}"
    if p.kind == "valid":
        return False, f"raised on a valid input: {what}"
    if not isinstance(exc, CLEAN_ERRORS):
        return False, f"not a clean error type: {what}"
    msg = str(exc).strip()
    if not msg:
        return False, f"empty message: {type(exc).__name__}"
    if p.match and p.match.lower() not in msg.lower():
        return False, f"message does not mention {p.match!r}: {what}"
    return True, what


def run(names: list[str]) -> None:
    torch.manual_seed(0)
    import blockops  # noqa: F401  (loads the library before the first probe: a load failure is not a probe's)
    for name in names:
        print(json.dumps({"start": name}), flush=True)
        p = PROBES[name]
        try:
            p.fn()
            exc = None
        except BaseException as e:  # noqa: BLE001  (the verdict sorts clean errors from the rest)
            exc = e
        ok, detail = verdict(p, exc)
        print(json.dumps({"name": name, "ok": ok, "detail": detail}), flush=True)


if __name__ == "__main__":
    run(sys.argv[1:] or sorted(PROBES))

