"""Vector-quantized GEMM (family "vq"): ops vs the pure-PyTorch reference, gradients, k-means, VQLinear,
AQLM layout, opcheck, torch.compile and error paths."""
from __future__ import annotations

import math

import os

import pytest
import torch
import torch.nn.functional as F

import blockops
from blockops.nn import VQLinear
from blockops.ops import vq
from blockops.quant.kmeans import kmeans
from blockops.reference import ref_vq_dequantize, ref_vq_linear
from helpers import assert_compiles, kernel_ran, opcheck, rel_error, run_with_cpu_isa

_ops = torch.ops.blockops
# Mean error allowed per activation dtype (measured: fp32 4e-8, fp16 6e-5, bf16 9e-4, the rounding of the output
# to x's dtype; accumulation is fp32).
TOL = {torch.float32: 2e-7, torch.float16: 2e-4, torch.bfloat16: 2e-3}

# The byte-plane kernel's int16 tables (csrc/vq_cpu_byte_planes.cpp: fp16 / bf16 activations on AVX-512 VBMI; every
# activation dtype in the AVX2 sub-table variant, which every AVX2 CPU takes for uint8 codes, k <= 64, 1-2 rows)
# round each entry to a step of its chunk's largest |entry| / 32767, one step per activation row and PLANE_CHUNK
# positions: at most half a step per term (int16_table_bound). An int16 scale off by 0.2% or a lane mix-up fails.
PLANE_CHUNK = 16


def int16_table_bound(x, codes, codebooks, scales):
    """[rows, out]: the most the int16 tables can add to each output, half a step per position times |scale|."""
    rows, (out, groups, K), (_, k, d) = x.shape[0], codes.shape, codebooks.shape
    entries = torch.einsum("mgd,Kcd->mgKc", x.double().reshape(rows, groups, d), codebooks.double())
    largest = entries.reshape(rows, groups * K, k).abs().amax(-1)           # [rows, positions]
    pad = -largest.shape[1] % PLANE_CHUNK                                   # padding positions: zero tables
    chunk_largest = F.pad(largest, (0, pad)).reshape(rows, -1, PLANE_CHUNK).amax(-1)
    positions = F.pad(torch.ones(groups * K, dtype=torch.float64), (0, pad)).reshape(-1, PLANE_CHUNK).sum(-1)
    half_steps = chunk_largest / 32767 / 2 * positions                      # [rows, chunks]
    s = scales.double().abs() if scales is not None else torch.ones(out, dtype=torch.float64)
    return half_steps.sum(-1, keepdim=True) * s


def assert_within_int16_tables(y, exact, magnitudes, x, codes, codebooks, scales, what=""):
    """y (x's dtype) against the exact result rounded to that dtype: one unit in the last place, the int16 tables'
    bound, and 2^-20 of the summed magnitudes |x| @ |W_hat|^T for fp32 rounding of the entries and sums."""
    dtype = y.dtype
    ulp = torch.finfo(dtype).eps * exact.abs().to(dtype).double().clamp_min(torch.finfo(dtype).tiny)
    allowed = ulp + int16_table_bound(x, codes, codebooks, scales) + 2.0 ** -20 * magnitudes
    assert ((y.double() - exact.to(dtype).double()).abs() <= allowed).all(), what
    # The bound is a worst case, linear in the positions; the roundings' sum grows as their square root: over a
    # whole chunk or more, fp32 outputs also hold 1e-4 of the exact result's norm (measured 2-5e-5), which a
    # systematic error of 0.01% (a step or scale slightly off) exceeds.
    if dtype == torch.float32 and codes.shape[1] * codes.shape[2] >= PLANE_CHUNK:
        assert ((y.double() - exact).norm() / exact.norm()).item() <= 1e-4, what


def plane_calls():
    return blockops.kernel_call_counts()["vq_linear_byte_planes.cpu"]


def takes_sub_tables(k, rows):
    """Mirror of csrc/vq_cpu_byte_planes.cpp sub_tables_apply for uint8 codes where the byte-plane kernel runs:
    the AVX2 sub-table variant (int16 tables) on every CPU with AVX2, AVX-512 VBMI ones included."""
    return k <= 64 and rows <= 2


def make_weights(out, groups, K, k, d, code_dtype=None, cb_dtype=torch.float32, scales=True, seed=0):
    """Random codes over the whole range [0, k) (int16 codes >= 32768 stored negative) and codebooks."""
    g = torch.Generator().manual_seed(seed)
    code_dtype = code_dtype or (torch.uint8 if k <= 256 else torch.int16)
    codes = torch.randint(0, k, (out, groups, K), generator=g, dtype=torch.int32).to(code_dtype)
    codebooks = torch.randn(K, k, d, generator=g).to(cb_dtype)
    s = (torch.rand(out, generator=g) + 0.5).to(cb_dtype) if scales else None
    return codes, codebooks, s


def uses_lookup_table(out, groups, K, k, d, rows):
    """Mirror of csrc/vq.h use_lookup_table (and, above 8 rows, of its use for passes of 8 rows up to
    kCpuLutMaxRows = 32 in vq_linear_cpu), to say which CPU kernel a case exercises."""
    if rows > 8:
        return rows <= 32 and uses_lookup_table(out, groups, K, k, d, 8)
    p = groups * K
    if rows * p * k * 4 > 64 << 20:
        return False
    return rows * p * k * d + 3 * p * out < out * p * d + rows * out * groups * d


# (out, groups, K, k, d): every d and k, K in {1, 2}; awkward out and in / d. The last two cases put k = 4096
# on both sides of the lookup-table rule at batch 1.
CASES = [(out, groups, K, k, d)
         for i, (k, d, K) in enumerate([(k, d, K) for k in (16, 256, 4096, 65536) for d in (2, 4, 8) for K in (1, 2)])
         for out, groups in [((1, 17, 100)[i % 3], (13, 7, 5)[i % 3])]] + [(3000, 5, 1, 4096, 8), (40, 9, 2, 4096, 4)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def test_batched_path_several_blocks():
    """in = 65536 fp32 rows are 256 KB, so the 64 MB dequantized blocks of the batched path hold 256 rows: out =
    300 takes two blocks (forward and grad_input), exercising the column-slice writes."""
    codes, codebooks, scales = make_weights(300, 8192, 1, 256, 8, seed=3)
    x = torch.randn(9, 65536, generator=torch.Generator().manual_seed(4), requires_grad=True)
    with kernel_ran("vq_linear", "cpu"):
        y = vq.vq_linear(x, codes, codebooks, scales)
    xr = x.detach().double().requires_grad_()
    ref = xr @ ref_vq_dequantize(codes, codebooks, scales).double().t()
    assert rel_error(y, ref) < 1e-6
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g.double())
    assert rel_error(x.grad, xr.grad) < 1e-6


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_linear_matches_reference(case):
    out, groups, K, k, d = case
    i = CASES.index(case)
    cb_dtype, x_dtype = DTYPES[i % 3], DTYPES[(i // 3) % 3]
    codes, codebooks, scales = make_weights(out, groups, K, k, d, cb_dtype=cb_dtype, scales=i % 2 == 0, seed=i)
    bias = torch.randn(out).to(cb_dtype) if i % 4 < 2 else None
    ref_w = ref_vq_dequantize(codes, codebooks, scales)
    gen = torch.Generator().manual_seed(100 + i)
    for rows in (1, 3, 4, 8, 33, 300):
        x = torch.randn(rows, groups * d, generator=gen).to(x_dtype)
        before = plane_calls()
        with kernel_ran("vq_linear", "cpu"):
            y = vq.vq_linear(x, codes, codebooks, scales, bias)
        ref = ref_vq_linear(x, codes, codebooks, scales, bias).float()
        assert y.dtype == x_dtype and y.shape == (rows, out)
        magnitudes = x.double().abs() @ ref_w.double().abs().t()
        if x_dtype == torch.float32 and plane_calls() > before and takes_sub_tables(k, rows):  # int16 tables
            exact = x.double() @ ref_w.double().t() + (bias.double() if bias is not None else 0)
            assert_within_int16_tables(y, exact, magnitudes, x, codes, codebooks, scales, f"rows={rows}")
            continue
        # Relative to the size of the terms summed (|x| @ |W_hat|^T): a single output (out = 1, batch 1) can
        # cancel to nearly zero, which would make the plain relative error meaningless.
        err = ((y.double() - ref.double()).abs().mean() / magnitudes.mean()).item()
        assert err <= TOL[x_dtype], f"rows={rows}: relative error {err:.3g} ({x_dtype})"
    with kernel_ran("vq_dequantize", "cpu"):
        w = vq.vq_dequantize(codes, codebooks, scales)
    assert w.dtype == cb_dtype
    torch.testing.assert_close(w.float(), ref_w.to(cb_dtype).float(), rtol=0, atol=0)


def test_cases_cover_both_small_batch_kernels():
    paths = {uses_lookup_table(out, g, K, k, d, rows) for out, g, K, k, d in CASES for rows in (1, 3)}
    assert paths == {True, False}
    assert uses_lookup_table(3000, 5, 1, 4096, 8, 1) and not uses_lookup_table(40, 9, 2, 4096, 4, 1)


# Lookup-table kernel layouts: (out, groups, K, k, d, code dtype). Positions P = groups * K that are not whole
# 64-bit words of codes (P = 5, 13, 1023, 8190) exercise the padded tail; out = 1100 with P = 8190 (9 MB of codes,
# 4 MB tiles) spans several tiles per thread, so the next tile's prefetch runs; k = 16 and 64 give long chunks,
# k = 256 the shortest; int16 codes four codes per word. P a multiple of every chunk (256, 128, 64) takes the
# whole-chunk staging copy at every segment width (8 to 128 bytes).
LUT_CASES = [(1100, 4095, 2, 64, 4, torch.uint8), (700, 1023, 1, 256, 4, torch.uint8), (300, 5, 1, 16, 2, torch.uint8), (257, 13, 2, 64, 8, torch.uint8),
             (200, 40, 1, 64, 2, torch.uint8), (3000, 9, 2, 256, 4, torch.int16), (3000, 7, 1, 1024, 2, torch.int16),
             (640, 256, 1, 256, 4, torch.uint8), (300, 64, 2, 64, 4, torch.uint8), (1100, 64, 1, 1024, 8, torch.int16),
             (130, 64, 1, 16, 2, torch.int16)]


@pytest.mark.parametrize("case", LUT_CASES, ids=lambda c: "x".join(map(str, c[:5])) + "-" + str(c[5]).split(".")[-1])
def test_lookup_table_every_row_count(case):
    """Every activation-row count the table kernel serves in one pass (1..8: rows padded to 1, 2, 4 or 8 lanes),
    passes of balanced size (9 = 5 + 4, 17 = 6 + 6 + 5, 32 = 4 x 8) and the first blocked count (33), with scales
    and bias, against the fp64 decode-then-linear reference."""
    out, groups, K, k, d, code_dtype = case
    codes, codebooks, scales = make_weights(out, groups, K, k, d, code_dtype=code_dtype, seed=out)
    bias = torch.randn(out)
    w = ref_vq_dequantize(codes, codebooks, scales).double()
    gen = torch.Generator().manual_seed(7)
    for rows in list(range(1, 10)) + [17, 32, 33]:
        assert (rows == 33) != uses_lookup_table(out, groups, K, k, d, rows), "case no longer takes the table kernel"
        x = torch.randn(rows, groups * d, generator=gen)
        before, before_codewords = plane_calls(), codeword_calls()
        with kernel_ran("vq_linear", "cpu"):
            y = vq.vq_linear(x, codes, codebooks, scales, bias)
        ref = x.double() @ w.t() + bias.double()
        if plane_calls() > before and takes_sub_tables(k, rows):  # int16 tables
            assert_within_int16_tables(y, ref, x.double().abs() @ w.abs().t(), x, codes, codebooks, scales,
                                       f"rows={rows}")
            continue
        if codeword_calls() > before_codewords:  # AVX2 without VBMI: the int16 codeword kernel
            assert_within_codewords(y, ref, x.double().abs() @ w.abs().t(), x, codes, codebooks, scales, f"rows={rows}")
            continue
        err = ((y.double() - ref).abs().mean() / (x.double().abs() @ w.abs().t()).mean()).item()
        assert err <= TOL[torch.float32], f"rows={rows}: relative error {err:.3g}"


# Byte-plane kernel layouts (fp16 / bf16 activations, uint8 codes, AVX-512 VBMI): (out, groups, K, k, d). out
# = 190, 700, 769 leave partial 64-row groups and tiles of 3, 3 and 1 groups; P = 33, 140, 185 are not whole 64-position
# transpose blocks; k = 64, 128, 200 leave table entries past k (never indexed); k = 256 uses the code's top bit.
PLANE_CASES = [(300, 37, 1, 256, 4), (257, 5, 2, 64, 8), (700, 64, 1, 200, 2), (190, 33, 1, 128, 4),
               (769, 70, 2, 256, 4), (1000, 185, 1, 256, 2)]
HAS_VBMI_PLANES = "avx512-vbmi" in blockops.build_info()["cpu_families"]["vq"]


@pytest.mark.skipif(not HAS_VBMI_PLANES, reason="the byte-plane kernel needs an AVX-512 VBMI CPU")
@pytest.mark.parametrize("case", PLANE_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_byte_plane_kernel(case, dtype):
    """Every activation-row count 1..8 (and 9, 16, 32 on whole tiles), scales and bias: the output is the exact
    result rounded to fp16 / bf16, give or take one unit in the last place and the int16 tables' bound
    (int16_table_bound); fp32 activations take exact fp32 tables (four byte planes), within 2^-20 of the summed
    magnitudes |x| @ |W_hat|^T, except k <= 64 at 1-2 rows, which takes the AVX2 sub-table variant (int16 tables for
    fp32 too). A lane or row mix-up would be off by whole outputs, an int16 scale off by 0.2% fails too."""
    out, groups, K, k, d = case
    codes, codebooks, scales = make_weights(out, groups, K, k, d, cb_dtype=torch.float16, seed=out)
    gen = torch.Generator().manual_seed(11)
    bias = torch.randn(out, generator=gen).to(dtype)
    w = ref_vq_dequantize(codes, codebooks, scales).double()
    # 9..32: layers of a whole tile, fp16 / bf16 only (fp32 activations: exact tables, up to 8 rows)
    row_counts = list(range(1, 9)) + ([9, 16, 32] if out >= 256 and dtype != torch.float32 else [])
    for rows in row_counts:
        assert rows > 8 or uses_lookup_table(out, groups, K, k, d, rows), "case no longer takes a table kernel"
        x = torch.randn(rows, groups * d, generator=gen).to(dtype)
        with kernel_ran("vq_linear_byte_planes", "cpu"):
            y = vq.vq_linear(x, codes, codebooks, scales, bias)
        assert y.dtype == dtype and y.shape == (rows, out)
        exact = x.double() @ w.t() + bias.double()
        ulp = torch.finfo(dtype).eps * exact.abs().to(dtype).double().clamp_min(torch.finfo(dtype).tiny)
        magnitudes = x.double().abs() @ w.abs().t()
        if dtype != torch.float32 or takes_sub_tables(k, rows):  # int16 tables
            assert_within_int16_tables(y, exact, magnitudes, x, codes, codebooks, scales, f"rows={rows}")
            continue
        # fp32: exact fp32 tables, so only fp32 summation error (a few units of 2^-24 of the terms)
        assert ((y.double() - exact.to(dtype).double()).abs() <= ulp + 2.0 ** -20 * magnitudes).all(), f"rows={rows}"


@pytest.mark.skipif(not HAS_VBMI_PLANES, reason="the byte-plane kernel needs an AVX-512 VBMI CPU")
def test_byte_plane_kernel_domain():
    """Taken up to 8 rows (where a table beats the direct kernel) and, for fp16 / bf16 activations, up to 32 rows
    on layers of a whole 256-row tile; int16 codes, 33 rows, fp32 beyond 8 rows and small layers beyond 8 rows
    take the other kernels."""
    codes, codebooks, scales = make_weights(300, 37, 1, 256, 4)
    small, small_cb, small_scales = make_weights(100, 37, 1, 256, 4)
    wide, wide_cb, wide_scales = make_weights(300, 37, 1, 512, 4)
    calls = []
    for x, args in [(torch.randn(9, 148), (codes, codebooks, scales)),
                    (torch.randn(33, 148).bfloat16(), (codes, codebooks, scales)),
                    (torch.randn(9, 148).half(), (small, small_cb, small_scales)),
                    (torch.randn(4, 148).bfloat16(), (wide, wide_cb, wide_scales)),
                    (torch.randn(32, 148).half(), (codes, codebooks, scales))]:
        before = blockops.kernel_call_counts()["vq_linear_byte_planes.cpu"]
        vq.vq_linear(x, *args)
        calls.append(blockops.kernel_call_counts()["vq_linear_byte_planes.cpu"] - before)
    assert calls == [0, 0, 0, 0, 1]
    before = blockops.kernel_call_counts()["vq_linear_byte_planes.cpu"]
    vq.vq_linear(torch.randn(4, 148), codes, codebooks, scales)   # fp32, 4 rows: exact tables
    assert blockops.kernel_call_counts()["vq_linear_byte_planes.cpu"] == before + 1


@pytest.mark.skipif(not HAS_VBMI_PLANES, reason="the byte-plane kernel needs an AVX-512 VBMI CPU")
def test_byte_plane_kernel_reports_codes_out_of_range():
    """The byte-plane kernel checks the code range on its own pass over the codes (its tables are 256 wide, so a
    code >= k reads zeros, never out of bounds): the same error as the other kernels, naming the code."""
    codes, codebooks, scales = make_weights(300, 37, 1, 200, 4)
    codes[123, 7, 0] = 231
    before = blockops.kernel_call_counts()["vq_linear_byte_planes.cpu"]
    with pytest.raises(RuntimeError, match=r"code 231 at codes\[123, 7, 0\] is out of range for a codebook of k = 200"):
        vq.vq_linear(torch.randn(2, 148).bfloat16(), codes, codebooks, scales)
    assert blockops.kernel_call_counts()["vq_linear_byte_planes.cpu"] == before + 1


@pytest.mark.skipif(not HAS_VBMI_PLANES, reason="the byte-plane kernel needs an AVX-512 VBMI CPU")
def test_byte_plane_scales_follow_outlier_activations():
    """One activation group 1000x larger than the rest: only the 16 positions sharing its int16 scale lose
    resolution, so the result stays as accurate as the fp32 kernel's rounded to bf16."""
    codes, codebooks, scales = make_weights(512, 256, 1, 256, 4, seed=5)
    x = torch.randn(1, 1024)
    x[0, 40:44] *= 1000
    x = x.to(torch.bfloat16)
    with kernel_ran("vq_linear_byte_planes", "cpu"):
        y = vq.vq_linear(x, codes, codebooks, scales)
    exact = ref_vq_linear(x.double(), codes, codebooks.double(), scales.double()).double()
    rounded = vq.vq_linear(x.float(), codes, codebooks, scales).to(torch.bfloat16)
    assert rel_error(y, exact) <= 1.05 * rel_error(rounded, exact) + 1e-6


@pytest.mark.skipif(not HAS_VBMI_PLANES, reason="the byte-plane kernel needs an AVX-512 VBMI CPU")
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_byte_plane_kernel_propagates_nan_and_inf(bad):
    """A NaN or infinite activation cannot live in the int16 tables: its row of outputs is NaN (F.linear gives NaN
    or +-inf there), never finite; the other rows are unaffected."""
    codes, codebooks, scales = make_weights(512, 256, 1, 256, 4, seed=6)
    x = torch.randn(3, 1024).to(torch.bfloat16)
    x[1, 517] = bad
    with kernel_ran("vq_linear_byte_planes", "cpu"):
        y = vq.vq_linear(x, codes, codebooks, scales)
    assert y[1].isnan().all() and torch.isfinite(y[[0, 2]]).all()
    torch.testing.assert_close(y[[0, 2]], vq.vq_linear(x[[0, 2]], codes, codebooks, scales), rtol=0, atol=0)


# The AVX2 sub-table variant of the byte-plane kernel (every AVX2 CPU, AVX-512 VBMI ones included: uint8 codes,
# k <= 64, one or two activation rows): (out, groups, K, k, d). k = 16, 32, 40, 64 take one to four 16-entry sub-tables (40: entries past
# k in the third); out = 300, 700, 257, 769, 1100 leave partial 32-row groups; P = 5 and 26 are shorter than one
# 32-position transpose half, 140 and 8190 are not whole 64-position blocks; 8190 positions span many blocks.
SUB_TABLE_CASES = [(300, 5, 1, 16, 2), (257, 13, 2, 64, 8), (700, 140, 1, 40, 2), (769, 70, 2, 32, 4),
                   (1100, 4095, 2, 64, 4)]


def sub_table_checks():
    """Run by test_avx2_sub_table_kernel in a BLOCKOPS_CPU_ISA=avx2 process."""
    assert blockops.build_info()["cpu_families"]["vq"] == "avx2+fma"
    gen = torch.Generator().manual_seed(13)
    for out, groups, K, k, d in SUB_TABLE_CASES:
        what = f"{out}x{groups}x{K}x{k}x{d}"
        assert uses_lookup_table(out, groups, K, k, d, 1), what
        codes, codebooks, scales = make_weights(out, groups, K, k, d, cb_dtype=torch.float16, seed=out)
        w = ref_vq_dequantize(codes, codebooks, scales).double()
        for dtype, rows in zip(DTYPES, (1, 2, 1)):
            bias = torch.randn(out, generator=gen).to(dtype)
            x = torch.randn(rows, groups * d, generator=gen).to(dtype)
            with kernel_ran("vq_linear_byte_planes", "cpu"):
                y = vq.vq_linear(x, codes, codebooks, scales, bias)
            assert y.dtype == dtype and y.shape == (rows, out), what
            exact = x.double() @ w.t() + bias.double()
            assert_within_int16_tables(y, exact, x.double().abs() @ w.abs().t(), x, codes, codebooks, scales,
                                       f"{what} {dtype}")
        # Threads take 32-row groups whole: the same result for any thread count.
        x = torch.randn(1, 1, groups * d, generator=gen)
        torch.set_num_threads(1)
        one = vq.vq_linear(x, codes, codebooks, scales)
        torch.set_num_threads(2)
        assert torch.equal(one, vq.vq_linear(x, codes, codebooks, scales)), what
        # Three rows take the exact table kernel (each row looks its codes up again here: no faster).
        before = plane_calls()
        vq.vq_linear(torch.randn(3, groups * d, generator=gen), codes, codebooks, scales)
        assert plane_calls() == before, what
    # A NaN or infinite activation cannot live in int16 tables: the exact table kernel runs instead, so the outputs
    # are non-finite where F.linear's are (inf times a weight's sign, NaN for NaN).
    codes, codebooks, scales = make_weights(512, 256, 1, 64, 2, seed=6)
    w = ref_vq_dequantize(codes, codebooks, scales).double()
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = torch.randn(1, 512, generator=gen)
        x[0, 77] = bad
        before = plane_calls()
        with kernel_ran("vq_linear", "cpu"):
            y = vq.vq_linear(x, codes, codebooks, scales)
        assert plane_calls() == before
        ref = x.double() @ w.t()
        assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.isposinf(), ref.isposinf()), bad
        assert torch.equal(y.isneginf(), ref.isneginf()), bad
    # Codes past k: 45 < 48 lies inside the third sub-table's entries (zeros), 255 beyond every sub-table; the
    # kernel runs, then the caller names the code.
    for k, bad_code in ((40, 45), (64, 255)):
        codes, codebooks, scales = make_weights(700, 140, 1, k, 2)
        codes[123, 7, 0] = bad_code
        before = plane_calls()
        try:
            vq.vq_linear(torch.randn(1, 280), codes, codebooks, scales)
            raise AssertionError("no error")
        except RuntimeError as e:
            assert f"code {bad_code} at codes[123, 7, 0] is out of range for a codebook of k = {k}" in str(e), e
        assert plane_calls() == before + 1


def test_avx2_sub_table_kernel():
    """BLOCKOPS_CPU_ISA=avx2: one or two rows of uint8 codes with k <= 64 take the byte-plane kernel's AVX2 variant
    (16-entry sub-tables, int16 tables for every activation dtype): every sub-table count, partial row groups and
    position blocks, fp32 / fp16 (2 rows) / bf16 activations with bias within the int16 tables' bound; the same
    output for 1 and 2 threads; 3 rows on the table kernel; NaN / inf activations on the exact table kernel; codes
    past k named."""
    run_with_cpu_isa("avx2", f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
                             "import test_vq; test_vq.sub_table_checks()")


# The AVX2 codeword kernel (csrc/vq_cpu_codewords.cpp: AVX2 CPUs without VBMI, one row, uint8 codes, k = 256, d 4 or 8,
# K 1 or 2, inputs a multiple of 64) rounds each codebook to a step of its largest |entry| / 16383 and the activations
# to a step of each 64-input block's largest |x| / 16383, then sums exactly in int32 per block.
CODEWORD_FIXED_MAX = 16383
CODEWORD_BLOCK = 64
CODEWORD_CASES = [(257, 64, 1, 4), (130, 32, 2, 8), (7, 16, 1, 8), (66, 96, 2, 4), (5, 16, 1, 4), (1100, 512, 1, 4)]


def codeword_calls():
    return blockops.kernel_call_counts()["vq_linear_codewords.cpu"]


def codeword_bound(x, codes, codebooks, scales):
    """[rows, out]: the most the fixed-point codewords and activations can move each output: per weight, half a step
    of each of its codewords' codebooks times |x|, plus (|weight| + that) times half the activation's step."""
    (out, groups, K), (_, k, d) = codes.shape, codebooks.shape
    cb = codebooks.double()
    half_cb = (cb.abs().reshape(K, -1).amax(-1) / CODEWORD_FIXED_MAX / 2).sum()        # per weight, K codewords
    xd = x.double().reshape(-1, groups * d)
    half_x = xd.abs().reshape(xd.shape[0], -1, CODEWORD_BLOCK).amax(-1) / CODEWORD_FIXED_MAX / 2
    half_x = half_x.repeat_interleave(CODEWORD_BLOCK, dim=1)                            # [rows, in]
    w = ref_vq_dequantize(codes, codebooks).double()                                   # unscaled [out, in]
    per_output = xd.abs().sum(1, keepdim=True) * half_cb + half_x @ (w.abs() + half_cb).t()
    s = scales.double().abs() if scales is not None else torch.ones(out, dtype=torch.float64)
    return per_output * s


def assert_within_codewords(y, exact, magnitudes, x, codes, codebooks, scales, what=""):
    """y (x's dtype, [rows, out]) against the exact result rounded to that dtype: one unit in the last place, the
    fixed-point bound and 2^-20 of the summed magnitudes |x| @ |W_hat|^T for the fp32 conversions and sums; fp32
    outputs also within 2e-4 of the exact result's norm (the issue's limit is 1e-3; measured 6-8e-5; a step 0.1%
    off exceeds it)."""
    dtype = y.dtype
    ulp = torch.finfo(dtype).eps * exact.abs().to(dtype).double()
    allowed = ulp + codeword_bound(x, codes, codebooks, scales) + 2.0 ** -20 * magnitudes
    assert ((y.double() - exact.to(dtype).double()).abs() <= allowed).all(), what
    if dtype == torch.float32:
        assert ((y.double() - exact).norm() / exact.norm()).item() <= 2e-4, what


def codeword_checks():
    """Run by test_avx2_codeword_kernel in a BLOCKOPS_CPU_ISA=avx2 process."""
    assert blockops.build_info()["cpu_families"]["vq"] == "avx2+fma"
    gen = torch.Generator().manual_seed(21)
    for out, groups, K, d in CODEWORD_CASES:
        what = f"{out}x{groups}x{K}x{d}"
        codes, codebooks, scales = make_weights(out, groups, K, 256, d, seed=out)
        codebooks[-1] *= 3  # codebooks of different ranges: one step each
        w = ref_vq_dequantize(codes, codebooks, scales).double()
        for dtype, rows in zip(DTYPES, (1, 2, 2)):
            bias = torch.randn(out, generator=gen).to(dtype)
            x = (torch.randn(rows, groups * d, generator=gen) * torch.linspace(0.01, 4, groups * d)).to(dtype)
            before = codeword_calls()
            with kernel_ran("vq_linear", "cpu"):
                y = vq.vq_linear(x, codes, codebooks, scales, bias)
            assert codeword_calls() == before + 1, what
            assert y.dtype == dtype and y.shape == (rows, out), what
            exact = x.double() @ w.t() + bias.double()
            assert_within_codewords(y, exact, x.double().abs() @ w.abs().t(), x, codes, codebooks, scales,
                                    f"{what} {dtype}")
        # Tiles of whole rows, each row summed in one order: the same result for any thread count.
        x = torch.randn(1, groups * d, generator=gen)
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(vq.vq_linear(x, codes, codebooks, scales))
        torch.set_num_threads(2)
        assert all(torch.equal(results[0], r) for r in results[1:]), what
        # Each row of a two-row call is its one-row call, bit for bit (the same sums in the same order).
        x2 = torch.cat([x, torch.randn(1, groups * d, generator=gen)])
        y2 = vq.vq_linear(x2, codes, codebooks, scales)
        assert torch.equal(y2[:1], results[0]) and torch.equal(y2[1:], vq.vq_linear(x2[1:], codes, codebooks, scales))
    # Not taken: three rows, inputs not a multiple of 64, k below 256, int16 codes; the exact table or direct kernels
    # give the reference's result there.
    for rows, out, groups, K, k, d, dt in ((3, 64, 64, 1, 256, 4, torch.uint8), (1, 64, 15, 1, 256, 4, torch.uint8),
                                            (1, 64, 64, 1, 255, 4, torch.uint8), (1, 64, 64, 1, 256, 4, torch.int16),
                                            (1, 64, 32, 1, 256, 2, torch.uint8)):
        codes, codebooks, scales = make_weights(out, groups, K, k, d, code_dtype=dt)
        x = torch.randn(rows, groups * d, generator=gen)
        before = codeword_calls()
        y = vq.vq_linear(x, codes, codebooks, scales)
        assert codeword_calls() == before, (rows, groups, k, d, dt)
        torch.testing.assert_close(y, ref_vq_linear(x, codes, codebooks, scales), rtol=1e-5, atol=1e-5)
    # A NaN or an infinity (activation or codebook entry) has no fixed-point value: the exact table kernel runs, so
    # the outputs are non-finite where the reference's are.
    codes, codebooks, scales = make_weights(512, 128, 1, 256, 4, seed=6)
    for bad in (float("nan"), float("inf"), float("-inf")):
        for where in ("x", "codebook"):
            x, cb = torch.randn(1, 512, generator=gen), codebooks.clone()
            if where == "x":
                x[0, 77] = bad
            else:
                cb[0, 200, 1] = bad
            before = codeword_calls()
            y = vq.vq_linear(x, codes, cb, scales)
            assert codeword_calls() == before, (bad, where)
            ref = ref_vq_linear(x.double(), codes, cb.double(), scales.double())
            assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.isposinf(), ref.isposinf()), (bad, where)
            assert torch.equal(y.isneginf(), ref.isneginf()), (bad, where)


def test_avx2_codeword_kernel():
    """BLOCKOPS_CPU_ISA=avx2: one or two rows of uint8 codes with k = 256, d = 4 or 8, K = 1 or 2 and inputs a multiple
    of 64 take the int16 codeword kernel: within the fixed-point bound (codeword_bound) and 2e-4 relative error for
    every activation dtype with bias, output rows past the last group of 4, codebooks of different ranges,
    activations of different ranges per block; the same output for 1, 2 and 3 threads, and each row of a two-row
    call bitwise its one-row call; the exact kernels where it does not apply (three rows, ...) and for NaN / inf
    activations or codebook entries."""
    run_with_cpu_isa("avx2", f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
                             "import test_vq; test_vq.codeword_checks()")


def test_int16_codes_are_unsigned_and_2d_codes():
    """Codes >= 32768 are stored as negative int16 (AQLM's convention) and read back as uint16; K = 1 codes may
    be [out, in/d]."""
    k, d = 65536, 4
    codes32 = torch.tensor([[0, 32767, 32768, 65535], [40000, 1, 65534, 50000]], dtype=torch.int32)
    codes = codes32.to(torch.int16)
    assert (codes < 0).any()
    codebooks = torch.randn(1, k, d)
    w = vq.vq_dequantize(codes, codebooks)
    torch.testing.assert_close(w, codebooks[0][codes32.long()].reshape(2, 4 * d), rtol=0, atol=0)
    x = torch.randn(2, 4 * d)
    with kernel_ran("vq_linear", "cpu"):
        torch.testing.assert_close(vq.vq_linear(x, codes, codebooks), x @ w.t(), rtol=1e-5, atol=1e-5)


def test_batched_input_shapes():
    codes, codebooks, scales = make_weights(17, 7, 2, 256, 4)
    x = torch.randn(2, 5, 28)
    with kernel_ran("vq_linear", "cpu"):
        y = vq.vq_linear(x, codes, codebooks, scales)
    torch.testing.assert_close(y, ref_vq_linear(x, codes, codebooks, scales), rtol=1e-5, atol=1e-5)
    assert vq.vq_linear(torch.randn(0, 28), codes, codebooks).shape == (0, 17)


@pytest.mark.parametrize("rows", [3, 33])
@pytest.mark.parametrize("K", [1, 2])
def test_gradients_match_reference(rows, K):
    codes, codebooks, scales = make_weights(17, 11, K, 64, 4, seed=rows + K)
    codebooks.requires_grad_(True)
    scales.requires_grad_(True)
    bias = torch.randn(17, requires_grad=True)
    x = torch.randn(rows, 44, requires_grad=True)
    gy = torch.randn(rows, 17)
    with kernel_ran("vq_linear_grad_input", "cpu"), kernel_ran("vq_grad_codebooks", "cpu"), \
            kernel_ran("vq_grad_scales", "cpu"):
        ours = torch.autograd.grad(vq.vq_linear(x, codes, codebooks, scales, bias), (x, codebooks, scales, bias), gy)
    ref = torch.autograd.grad(ref_vq_linear(x, codes, codebooks, scales, bias), (x, codebooks, scales, bias), gy)
    for name, a, b in zip(("x", "codebooks", "scales", "bias"), ours, ref):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)


def test_gradients_low_precision_and_partial():
    """fp16 codebooks / bf16 activations; only x requiring grad; no scales or bias in the call."""
    codes, codebooks, _ = make_weights(9, 6, 1, 256, 8, cb_dtype=torch.float16, scales=False)
    x = torch.randn(4, 48, dtype=torch.bfloat16, requires_grad=True)
    with kernel_ran("vq_linear_grad_input", "cpu"):
        (gx,) = torch.autograd.grad(vq.vq_linear(x, codes, codebooks).float().sum(), (x,))
    ref = ref_vq_dequantize(codes, codebooks).sum(0).expand(4, 48)
    assert gx.dtype == torch.bfloat16
    assert rel_error(gx, ref) < 1e-2
    cb = codebooks.clone().requires_grad_(True)
    with kernel_ran("vq_grad_codebooks", "cpu"):
        (gc,) = torch.autograd.grad(vq.vq_linear(x.detach(), codes, cb).float().sum(), (cb,))
    ref_cb = codebooks.float().requires_grad_(True)
    (gr,) = torch.autograd.grad(ref_vq_linear(x.detach().float(), codes, ref_cb).sum(), (ref_cb,))
    assert gc.dtype == torch.float16 and rel_error(gc, gr) < 1e-2


@pytest.mark.filterwarnings("ignore:Input #")  # fp32 only: the ops have no fp64 kernels
def test_gradcheck():
    codes, codebooks, scales = make_weights(5, 3, 2, 16, 2, seed=3)
    inputs = (torch.randn(2, 6, requires_grad=True), codebooks.requires_grad_(True), scales.requires_grad_(True),
              torch.randn(5, requires_grad=True))
    with kernel_ran("vq_linear", "cpu"):
        assert torch.autograd.gradcheck(lambda x, c, s, b: vq.vq_linear(x, codes, c, s, b), inputs, eps=1e-2,
                                        atol=2e-3, rtol=2e-3)


# ---- fp64 (CPU): the portable fp64 path, so that gradcheck runs on the kernels themselves ----------------------


@pytest.mark.parametrize("rows", [1, 20])  # small-batch and GEMM-sized: fp64 takes the blocked path for both
@pytest.mark.parametrize("K,k,d", [(1, 16, 4), (2, 256, 2)])
def test_fp64_matches_fp64_reference(rows, K, k, d):
    codes, codebooks, scales = make_weights(24, 6, K, k, d, cb_dtype=torch.float64, seed=4)
    x, bias = torch.randn(rows, 6 * d, dtype=torch.float64), torch.randn(24, dtype=torch.float64)
    with kernel_ran("vq_linear", "cpu"):
        y = vq.vq_linear(x, codes, codebooks, scales, bias)
    # ref_vq_dequantize works in fp32: the same formula in fp64 here.
    w = sum(codebooks[c][codes[:, :, c].long()] for c in range(K)).reshape(24, 6 * d) * scales[:, None]
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, x @ w.t() + bias, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(vq.vq_dequantize(codes, codebooks, scales), w, rtol=0, atol=1e-15)
    assert vq.vq_linear(x.float(), codes, codebooks, scales).dtype == torch.float32  # fp64 weights, fp32 x


@pytest.mark.filterwarnings("ignore:Input #")
@pytest.mark.parametrize("K", [1, 2])
def test_gradcheck_fp64(K):
    """gradcheck at fp64 tolerances on the kernels (vq_linear, vq_linear_grad_input, vq_grad_codebooks,
    vq_grad_scales) for x, codebooks, scales and bias. No gradgradcheck: the backward ops have no autograd of their
    own, so vq_linear is once differentiable (as documented)."""
    codes, codebooks, scales = make_weights(5, 3, K, 16, 2, cb_dtype=torch.float64, seed=3)
    inputs = (torch.randn(2, 2, 6, dtype=torch.float64, requires_grad=True), codebooks.requires_grad_(True),
              scales.requires_grad_(True), torch.randn(5, dtype=torch.float64, requires_grad=True))
    with kernel_ran("vq_grad_codebooks", "cpu"), kernel_ran("vq_grad_scales", "cpu"):
        assert torch.autograd.gradcheck(lambda x, c, s, b: vq.vq_linear(x, codes, c, s, b), inputs)


def test_opcheck_fp64():
    codes, codebooks, scales = make_weights(17, 5, 2, 32, 4, cb_dtype=torch.float64, seed=9)
    x, bias = torch.randn(3, 20, dtype=torch.float64), torch.randn(17, dtype=torch.float64)
    opcheck(_ops.vq_linear, (x, codes, codebooks, scales, bias))
    opcheck(_ops.vq_linear, (x.requires_grad_(True), codes, codebooks.clone().requires_grad_(True),
                             scales.clone().requires_grad_(True), bias.requires_grad_(True)))
    t = torch.randn(17, 20, dtype=torch.float64)
    opcheck(_ops.vq_dequantize, (codes, codebooks, scales))
    opcheck(_ops.vq_linear_grad_input, (torch.randn(3, 17, dtype=torch.float64), codes, codebooks, scales))
    opcheck(_ops.vq_grad_codebooks, (t, codes, codebooks, scales))
    opcheck(_ops.vq_grad_scales, (t, codes, codebooks))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp64_is_cpu_only_on_cuda():
    codes, codebooks, scales = make_weights(4, 3, 1, 16, 4)
    with pytest.raises(RuntimeError, match="codebooks is float64 on cuda.*float64 is CPU-only"):
        _ops.vq_linear(torch.randn(2, 12, device="cuda"), codes.cuda(), codebooks.double().cuda(), None, None)


def test_grad_codebooks_deterministic_across_threads():
    codes, codebooks, scales = make_weights(100, 13, 2, 16, 4, seed=5)  # many codes per codeword
    t = torch.randn(100, 52)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with kernel_ran("vq_grad_codebooks", "cpu"):
            one = _ops.vq_grad_codebooks(t, codes, codebooks, scales)
        torch.set_num_threads(max(2, threads))
        many = _ops.vq_grad_codebooks(t, codes, codebooks, scales)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_avx2_table_kernel():
    """BLOCKOPS_CPU_ISA=avx2 (what an AVX2-only CPU runs; on an AVX-512 VBMI machine the uint8 cases would take
    the byte planes): the AVX2 table kernel for uint8 and int16 codes, one pass (1, 3, 8 rows) and passes of
    balanced size (9, 17, 32), against the fp64 reference; one row of uint8 codes with k <= 64 takes the sub-table
    kernel (test_avx2_sub_table_kernel) and is held to its int16 tables' bound."""
    code = (
        "import sys, torch, blockops\n"
        f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "from test_vq import LUT_CASES, assert_within_int16_tables, make_weights, plane_calls, uses_lookup_table\n"
        "from blockops.reference import ref_vq_dequantize\n"
        "assert blockops.build_info()['cpu_families']['vq'] == 'avx2+fma'\n"
        "gen = torch.Generator().manual_seed(3)\n"
        "for out, groups, K, k, d, dt in LUT_CASES[1:5]:\n"
        "    codes, cb, scales = make_weights(out, groups, K, k, d, code_dtype=dt, seed=out)\n"
        "    w = ref_vq_dequantize(codes, cb, scales).double()\n"
        "    for rows in (1, 3, 8, 9, 17, 32):\n"
        "        assert uses_lookup_table(out, groups, K, k, d, rows)\n"
        "        x = torch.randn(rows, groups * d, generator=gen)\n"
        "        before = plane_calls()\n"
        "        y = blockops.ops.vq.vq_linear(x, codes, cb, scales)\n"
        "        ref = x.double() @ w.t()\n"
        "        if plane_calls() > before:  # uint8, k <= 64, one row: the sub-table kernel\n"
        "            assert rows == 1 and k <= 64 and dt == torch.uint8\n"
        "            assert_within_int16_tables(y, ref, x.double().abs() @ w.abs().t(), x, codes, cb, scales)\n"
        "            continue\n"
        "        err = ((y.double() - ref).abs().max() / (x.double().abs() @ w.abs().t()).max()).item()\n"
        "        assert err < 1e-6, (out, groups, rows, err)\n"
    )
    run_with_cpu_isa("avx2", code)


def test_portable_kernels():
    """BLOCKOPS_CPU_ISA=portable: both small-batch kernels and the dequantize without AVX2."""
    code = (
        "import torch, blockops\n"
        "from blockops.reference import ref_vq_linear\n"
        "torch.manual_seed(0)\n"
        "assert blockops.build_info()['cpu_families']['vq'] == 'portable'\n"
        "cases = [(3000, 5, 1, 4096, 8, torch.int16), (40, 9, 2, 4096, 4, torch.int16), (17, 13, 2, 256, 2, torch.int16),\n"
        "         (700, 37, 1, 256, 4, torch.uint8), (300, 21, 2, 64, 2, torch.uint8)]\n"
        "for out, g, K, k, d, dt in cases:\n"
        "    codes = torch.randint(0, k, (out, g, K), dtype=torch.int32).to(dt)\n"
        "    for rows in (1, 3, 8, 19):\n"
        "        cb, x = torch.randn(K, k, d), torch.randn(rows, g * d)\n"
        "        torch.testing.assert_close(blockops.ops.vq.vq_linear(x, codes, cb), ref_vq_linear(x, codes, cb),\n"
        "                                   rtol=1e-5, atol=1e-4)\n"
        "assert blockops.kernel_call_counts()['vq_linear.cpu'] == 20\n"
    )
    run_with_cpu_isa("portable", code)


# ---- k-means ------------------------------------------------------------------------------------------------

def test_kmeans_deterministic_and_improves():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(3000, 4, generator=g) + torch.randint(0, 4, (3000, 1), generator=g).float() * 3
    c1, codes1, e1 = kmeans(v, 32, iters=10, seed=7)
    c2, codes2, e2 = kmeans(v, 32, iters=10, seed=7)
    assert torch.equal(c1, c2) and torch.equal(codes1, codes2) and e1 == e2
    # Another chunk size only changes the order of the fp32 sums.
    c3, _, e3 = kmeans(v, 32, iters=10, seed=7, chunk_size=700)
    torch.testing.assert_close(c3, c1, rtol=1e-4, atol=1e-4)
    assert c1.shape == (32, 4) and codes1.shape == (3000,) and codes1.max() < 32
    sse = lambda c, a: ((v - c[a]) ** 2).sum().item()  # noqa: E731
    assert abs(sse(c1, codes1) - e1) <= 1e-3 * e1
    errors = [kmeans(v, 32, iters=i, seed=7)[2] for i in (0, 1, 3, 10)]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(errors, errors[1:])), errors
    random_codes = torch.randint(0, 32, (3000,), generator=g)
    assert e1 < 0.5 * sse(c1, random_codes)
    random_codebook = v[torch.randperm(3000, generator=g)[:32]]
    assert e1 < sse(random_codebook, ((v[:, None] - random_codebook) ** 2).sum(-1).argmin(1))


def test_kmeans_errors():
    with pytest.raises(ValueError, match="k <= N"):
        kmeans(torch.randn(10, 4), 11)
    with pytest.raises(ValueError, match=r"\[N, d\]"):
        kmeans(torch.randn(10), 2)


# ---- VQLinear ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d,K,bits", [(4, 1, 2), (2, 1, 3), (8, 2, 2)])
def test_from_linear(d, K, bits):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 50)
    module = VQLinear.from_linear(linear, bits=bits, vector_dim=d, num_codebooks=K, iters=10, dtype=torch.float32)
    w = module.dequantize()
    err = ((w - linear.weight).norm() / linear.weight.norm()).item()
    assert err < 0.6, err
    x = torch.randn(5, 96)
    with kernel_ran("vq_linear", "cpu"):
        y = module(x)
    torch.testing.assert_close(y, F.linear(x, w, module.bias), rtol=1e-5, atol=1e-5)
    assert "bits_per_weight" in repr(module)
    code_bits, total = module.bits_per_weight()
    assert code_bits == pytest.approx(K * math.log2(module.codebook_size) / d) and total > code_bits


def test_from_linear_fp16_and_training_codebooks():
    torch.manual_seed(1)
    linear = torch.nn.Linear(64, 33)
    module = VQLinear.from_linear(linear, codebook_size=64, vector_dim=4, iters=5)
    assert module.codebooks.dtype == torch.float16 and module.codes.dtype == torch.uint8
    x = torch.randn(7, 64, dtype=torch.float16)
    loss = module(x).float().pow(2).mean()
    with kernel_ran("vq_grad_codebooks", "cpu"):
        loss.backward()
    assert module.codebooks.grad is not None and module.scales.grad is not None and module.bias.grad is not None


def _aqlm_dequantize(codes, codebooks, scales):
    """AQLM's own decode for out_group_size 1: codes read mod 2^nbits, codewords summed over codebooks, times
    scales [out, 1, 1, 1]."""
    num_codebooks, k, _, in_group = codebooks.shape
    idx = codes.long() % (1 << (8 * codes.element_size()))
    w = sum(codebooks[c].float().reshape(k, in_group)[idx[:, :, c]] for c in range(num_codebooks))
    return w.reshape(codes.shape[0], -1) * scales.float().reshape(-1, 1)


@pytest.mark.parametrize("scheme", ["1x16", "2x8"])
def test_from_aqlm(scheme):
    g = torch.Generator().manual_seed(2)
    K, nbits = (1, 16) if scheme == "1x16" else (2, 8)
    out, in_groups, in_group = 19, 6, 8
    code_dtype = torch.int16 if nbits == 16 else torch.int8
    codes = torch.randint(0, 1 << nbits, (out, in_groups, K), generator=g, dtype=torch.int32).to(code_dtype)
    codebooks = torch.randn(K, 1 << nbits, 1, in_group, generator=g).half()
    scales = (torch.rand(out, 1, 1, 1, generator=g) + 0.5).half()
    bias = torch.randn(out, generator=g).half()
    module = VQLinear.from_aqlm(codes, codebooks, scales, bias)
    ref = _aqlm_dequantize(codes, codebooks, scales)
    with kernel_ran("vq_dequantize", "cpu"):
        torch.testing.assert_close(module.dequantize().float(), ref.half().float(), rtol=0, atol=0)
    x = torch.randn(2, in_groups * in_group)
    torch.testing.assert_close(module(x), x @ ref.t() + bias.float(), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="out_group_size"):
        VQLinear.from_aqlm(codes, codebooks.reshape(K, 1 << nbits, 2, 4), scales)


def test_compile():
    torch.manual_seed(0)
    module = VQLinear.from_linear(torch.nn.Linear(32, 24), bits=2, vector_dim=4, iters=3, dtype=torch.float32)
    with kernel_ran("vq_linear", "cpu"):
        assert_compiles(module, torch.randn(3, 32))


# ---- opcheck --------------------------------------------------------------------------------------------------

def test_opcheck():
    codes, codebooks, scales = make_weights(17, 5, 2, 32, 4, seed=9)
    x, bias = torch.randn(3, 20), torch.randn(17)
    with kernel_ran("vq_linear", "cpu"):
        opcheck(_ops.vq_linear, (x, codes, codebooks, scales, bias))
        opcheck(_ops.vq_linear, (x.requires_grad_(True), codes, codebooks.requires_grad_(True),
                                 scales.requires_grad_(True), bias.requires_grad_(True)))
        opcheck(_ops.vq_linear, (torch.randn(2, 20), codes, codebooks.detach()))
    codebooks, scales = codebooks.detach(), scales.detach()
    t = torch.randn(17, 20)
    with kernel_ran("vq_dequantize", "cpu"):
        opcheck(_ops.vq_dequantize, (codes, codebooks, scales))
    with kernel_ran("vq_linear_grad_input", "cpu"):
        opcheck(_ops.vq_linear_grad_input, (torch.randn(3, 17), codes, codebooks, scales))
    with kernel_ran("vq_grad_codebooks", "cpu"):
        opcheck(_ops.vq_grad_codebooks, (t, codes, codebooks, scales))
    with kernel_ran("vq_grad_scales", "cpu"):
        opcheck(_ops.vq_grad_scales, (t, codes, codebooks))


# ---- error paths ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("isa", ["native", "avx2"])
def test_table_kernel_checks_uint8_codes_as_it_stages_them(isa):
    """The table kernel with uint8 codes has no pass over the codes beforehand: its tables are padded so any byte
    reads inside them, it ORs the codes it stages, and an OR >= k sends vq_linear to the full check, which names
    the code. Out of range at the very last code (the read furthest past the tables), with 1 and 9 rows (9: fp32
    activations take the table kernel even with byte planes); codes whose OR is >= k = 200 although each is
    in range (199 | 56 = 255) must give the right result."""
    code = (
        "import sys, torch, blockops\n"
        f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "from test_vq import make_weights, uses_lookup_table\n"
        "from blockops.reference import ref_vq_linear\n"
        "from blockops.ops import vq\n"
        "rows = (9,) if blockops.build_info()['cpu_families']['vq'] != 'avx2+fma' else (1, 9)\n"
        "for P in (1023, 1024):  # a padded last chunk; whole chunks (the block-copy staging)\n"
        "    codes, cb, s = make_weights(700, P, 1, 64, 2)\n"
        "    for r in rows:\n"
        "        assert uses_lookup_table(700, P, 1, 64, 2, r)\n"
        "        bad = codes.clone(); bad[699, P - 1, 0] = 255\n"
        "        try:\n"
        "            vq.vq_linear(torch.randn(r, 2 * P), bad, cb, s)\n"
        "            raise SystemExit('no error')\n"
        "        except RuntimeError as e:\n"
        "            assert f'code 255 at codes[699, {P - 1}, 0] is out of range for a codebook of k = 64' in str(e), e\n"
        "codes, cb, s = make_weights(700, 1023, 1, 200, 2)\n"
        "codes[5, 3, 0], codes[6, 4, 0] = 199, 56\n"
        "for r in rows:\n"
        "    x = torch.randn(r, 2046)\n"
        "    torch.testing.assert_close(vq.vq_linear(x, codes, cb, s), ref_vq_linear(x, codes, cb, s), rtol=1e-4, atol=1e-3)\n"
    )
    if isa == "native":
        exec(code, {})
    else:
        run_with_cpu_isa("avx2", code)


def test_code_out_of_range():
    codes, codebooks, _ = make_weights(4, 3, 1, 100, 4)
    codes[2, 1, 0] = 100
    x = torch.randn(1, 12)
    for fn in (lambda: vq.vq_linear(x, codes, codebooks), lambda: vq.vq_dequantize(codes, codebooks),
               lambda: _ops.vq_linear_grad_input(torch.randn(1, 4), codes, codebooks),
               lambda: _ops.vq_grad_codebooks(torch.randn(4, 12), codes, codebooks),
               lambda: vq.vq_linear(torch.randn(50, 12), codes, codebooks)):
        with pytest.raises(RuntimeError, match=r"code 100 at codes\[2, 1, 0\] is out of range .* k = 100"):
            fn()
    codes16, codebooks16, _ = make_weights(4, 3, 2, 40000, 2)
    codes16[3, 0, 1] = -1  # 65535 as uint16
    with pytest.raises(RuntimeError, match=r"code 65535 at codes\[3, 0, 1\].*read as uint16"):
        vq.vq_linear(torch.randn(2, 6), codes16, codebooks16)


@pytest.mark.parametrize("bias", [False, True])
def test_in_features_zero_gives_the_bias(bias):
    """issue 17: with in_features == 0 (no code groups), x @ W^T is all zeros and F.linear returns the bias;
    vq_linear returned zeros. Backward: codebooks and scales get zero gradients, bias grad_out summed."""
    codes, codebooks, scales = make_weights(6, 0, 2, 16, 4)
    codebooks.requires_grad_()
    scales.requires_grad_()
    b = torch.randn(6, requires_grad=True) if bias else None
    for shape in [(3, 0), (2, 4, 0), (0, 0)]:
        for dtype in (torch.float32, torch.float16):
            x = torch.zeros(shape, dtype=dtype, requires_grad=True)
            y = vq.vq_linear(x, codes, codebooks, scales, b)
            want = F.linear(x, torch.zeros(6, 0, dtype=dtype), None if b is None else b.to(dtype))
            assert y.shape == want.shape and y.dtype == dtype
            torch.testing.assert_close(y, want, rtol=0, atol=0)
            gy = torch.randn(y.shape).to(dtype)
            inputs = (x, codebooks, scales) + ((b,) if bias else ())
            grads = torch.autograd.grad(y, inputs, gy)
            assert grads[0].shape == x.shape
            assert torch.equal(grads[1], torch.zeros_like(codebooks)) and torch.equal(grads[2], torch.zeros_like(scales))
            if bias:
                torch.testing.assert_close(grads[3], gy.float().reshape(-1, 6).sum(0))


def test_argument_errors():
    codes, codebooks, scales = make_weights(4, 3, 1, 16, 4)
    x = torch.randn(2, 12)
    cases = [
        ((x, codes.int(), codebooks), r"codes must have dtype in \{Byte, Short\}"),
        ((x, codes, codebooks.int()), "codebooks must have dtype"),
        ((x.int(), codes, codebooks), "x must have dtype"),
        ((x, codes, codebooks[0]), r"codebooks must be \[K, k, d\]"),
        ((torch.randn(2, 9), codes, torch.randn(1, 16, 3)), "d\\) must be 2, 4 or 8, got 3"),
        ((x, codes, torch.randn(3, 16, 4)), "must be 1 or 2, got 3"),
        ((x, codes, torch.randn(1, 8, 4)), r"must be in \[16, 65536\], got 8"),
        ((x, codes, torch.randn(2, 16, 4)), r"codes must be \[out, in/d, K\] = \[out, in/d, 2\]"),
        ((torch.randn(2, 10), codes, codebooks), "x must have 12 features"),
        ((x, codes, codebooks, torch.randn(5)), r"scales must have shape \[4\]"),
        ((x, codes, codebooks, None, torch.randn(3)), r"bias must have shape \[4\]"),
        ((x, codes.transpose(0, 1), codebooks), "codes must be contiguous"),
    ]
    for args, pattern in cases:
        with pytest.raises(RuntimeError, match=pattern):
            vq.vq_linear(*args)
    with pytest.raises(RuntimeError, match="t must have shape"):
        _ops.vq_grad_scales(torch.randn(4, 11), codes, codebooks)
    with pytest.raises(ValueError, match="vector_dim must be 2, 4 or 8"):
        VQLinear(12, 4, vector_dim=3)


# ---- CUDA kernels vs the CPU ops (need a GPU) -------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
# Mean error allowed on CUDA per activation dtype: the tensor-core path rounds W_hat once to x's dtype (the CPU's
# batched path keeps it in fp32), so fp16 / bf16 get about twice the output-rounding error.
CUDA_TOL = {torch.float32: 1e-6, torch.float16: 6e-4, torch.bfloat16: 6e-3}


def _cuda(*tensors):
    return [None if t is None else t.cuda() for t in tensors]


@cuda
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_cuda_linear_matches_cpu(case):
    """Every (k, d, K) and dtype on each CUDA path: GEMV (1..8 rows), tensor cores (fp16/bf16, in % 8 == 0) or
    CUDA-core tiles (the rest), against the fp64 decode-then-linear reference, as the CPU op is."""
    out, groups, K, k, d = case
    i = CASES.index(case)
    cb_dtype, x_dtype = DTYPES[i % 3], DTYPES[(i // 3) % 3]
    codes, codebooks, scales = make_weights(out, groups, K, k, d, cb_dtype=cb_dtype, scales=i % 2 == 0, seed=i)
    bias = torch.randn(out).to(cb_dtype) if i % 4 < 2 else None
    ref_w = ref_vq_dequantize(codes, codebooks, scales).double()
    args = _cuda(codes, codebooks, scales, bias)
    gen = torch.Generator().manual_seed(200 + i)
    for rows in (1, 3, 8, 9, 40, 300):
        x = torch.randn(rows, groups * d, generator=gen).to(x_dtype)
        ref = x.double() @ ref_w.t() + (0 if bias is None else bias.double())
        path = "gemv" if rows <= 8 else "mma" if x_dtype != torch.float32 and groups * d % 8 == 0 else "simt"
        with kernel_ran("vq_linear", "cuda"), kernel_ran(f"vq_linear_{path}", "cuda"):
            y = vq.vq_linear(x.cuda(), *args)
        assert y.dtype == x_dtype and y.shape == (rows, out)
        assert rel_error(y.cpu(), ref) < CUDA_TOL[x_dtype], (rows, path)


@cuda
def test_cuda_gemv_splits_and_layouts():
    """LLM-like shapes at batch 1..8: position splits, int16 codes, a misaligned x view, 3-d x, AQLM 2x8."""
    for out, groups, K, k, d, rows in [(512, 1024, 1, 256, 4, 1), (300, 512, 2, 256, 8, 5), (64, 1000, 1, 65536, 8, 2),
                                       (100, 2048, 1, 64, 2, 8)]:
        codes, codebooks, scales = make_weights(out, groups, K, k, d, cb_dtype=torch.float16, seed=rows)
        x = torch.randn(rows * groups * d + 1, dtype=torch.float16)[1:].view(rows, groups * d)  # 2-byte offset
        ref = vq.vq_linear(x.float(), codes, codebooks, scales)
        with kernel_ran("vq_linear_gemv", "cuda"):
            y = vq.vq_linear(x.cuda(), *_cuda(codes, codebooks, scales))
        assert rel_error(y.cpu(), ref) < CUDA_TOL[torch.float16]
    x3 = torch.randn(2, 3, 16 * 8)
    codes, codebooks, scales = make_weights(24, 16, 2, 256, 8, seed=1)
    y = vq.vq_linear(x3.cuda(), *_cuda(codes, codebooks, scales))
    assert y.shape == (2, 3, 24) and rel_error(y.cpu(), vq.vq_linear(x3, codes, codebooks, scales)) < 1e-6


@cuda
def test_cuda_dequantize_bit_exact():
    for K, k, d, dtype in [(1, 256, 4, torch.float16), (2, 256, 8, torch.bfloat16), (1, 4096, 2, torch.float32)]:
        codes, codebooks, scales = make_weights(37, 11, K, k, d, cb_dtype=dtype)
        with kernel_ran("vq_dequantize", "cuda"):
            w = vq.vq_dequantize(*_cuda(codes, codebooks, scales))
        assert torch.equal(w.cpu(), vq.vq_dequantize(codes, codebooks, scales))


@cuda
@pytest.mark.parametrize("K", [1, 2])
def test_cuda_gradients_match_cpu(K):
    codes, codebooks, scales = make_weights(45, 13, K, 64, 4, seed=K)
    bias = torch.randn(45)
    x = torch.randn(7, 52)
    grads = {}
    for device in ("cpu", "cuda"):
        # clone: on the CPU `.to(device)` returns the tensor itself, and marking it would make the CUDA copies non-leaves
        leaves = [t.to(device).clone().requires_grad_() for t in (x, codebooks, scales, bias)]
        y = vq.vq_linear(leaves[0], codes.to(device), *leaves[1:])
        y.backward(torch.linspace(-1, 1, y.numel()).view_as(y).to(device))
        grads[device] = [t.grad.cpu() for t in leaves]
    for g_cuda, g_cpu in zip(grads["cuda"], grads["cpu"]):
        assert rel_error(g_cuda, g_cpu) < 1e-5
    t = torch.randn(45, 52, device="cuda")
    with kernel_ran("vq_grad_codebooks", "cuda"):
        first = _ops.vq_grad_codebooks(t, *_cuda(codes, codebooks, scales))
    assert torch.equal(first, _ops.vq_grad_codebooks(t, *_cuda(codes, codebooks, scales)))  # deterministic
    with kernel_ran("vq_grad_scales", "cuda"), kernel_ran("vq_linear_grad_input", "cuda"):
        assert rel_error(_ops.vq_grad_scales(t, *_cuda(codes, codebooks)).cpu(),
                         _ops.vq_grad_scales(t.cpu(), codes, codebooks)) < 1e-5
        _ops.vq_linear_grad_input(torch.randn(3, 45, device="cuda"), *_cuda(codes, codebooks, scales))


@cuda
def test_cuda_codes_out_of_range_are_clamped():
    """The CPU ops raise; the CUDA ops (no device-to-host sync to check) read a code >= k as k - 1 and never
    read past the codebook."""
    codes, codebooks, scales = make_weights(40, 16, 2, 100, 4)
    codes[2, 1, 0], codes[7, 3, 1] = 100, 255
    clamped = codes.clamp(max=99)
    for rows in (1, 9, 300):
        x = torch.randn(rows, 64)
        y = vq.vq_linear(x.cuda(), *_cuda(codes, codebooks, scales))
        assert rel_error(y.cpu(), vq.vq_linear(x, clamped, codebooks, scales)) < 1e-6
    assert torch.equal(vq.vq_dequantize(*_cuda(codes, codebooks)).cpu(), vq.vq_dequantize(clamped, codebooks))


@cuda
def test_cuda_opcheck_and_compile():
    codes, codebooks, scales = _cuda(*make_weights(17, 5, 2, 32, 4, seed=9))
    x, bias, t = torch.randn(3, 20, device="cuda"), torch.randn(17, device="cuda"), torch.randn(17, 20, device="cuda")
    opcheck(_ops.vq_linear, (x, codes, codebooks, scales, bias))
    opcheck(_ops.vq_linear, (x.half(), codes, codebooks.half().requires_grad_(True), scales.half(), None))
    opcheck(_ops.vq_dequantize, (codes, codebooks, scales))
    opcheck(_ops.vq_grad_codebooks, (t, codes, codebooks, scales))
    opcheck(_ops.vq_grad_scales, (t, codes, codebooks))
    assert_compiles(lambda a: vq.vq_linear(a, codes, codebooks, scales, bias), x)


def test_batched_bf16_multiplies_in_fp32_without_bf16_dot_products():
    """As tests/test_lowbit.py's: without native bf16 dot products (BLOCKOPS_CPU_ISA=avx2) the batched path
    multiplies bf16 activations in fp32; the result is exactly the fp32 path's, rounded to bf16 once."""
    code = (
        "import torch, blockops\n"
        "from blockops.ops import vq\n"
        "assert blockops.build_info()['cpu_bf16_gemm'] is False\n"
        "codes = torch.randint(0, 256, (96, 64, 1), dtype=torch.int32).to(torch.uint8)\n"
        "cb = torch.randn(1, 256, 4) * 0.1\n"
        "x = torch.randn(300, 256).bfloat16()\n"          # above the decode kernels' row limit
        "y = vq.vq_linear(x, codes, cb)\n"
        "assert torch.equal(y, vq.vq_linear(x.float(), codes, cb).bfloat16())\n"
    )
    run_with_cpu_isa("avx2", code)
