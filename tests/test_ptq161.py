"""1.61-bit weights (family "ptq161"): packing vs PTQ1.61's dense formula, ops vs the pure-PyTorch reference for every
dtype, batch and salient ratio, sign(0), gradients, bits per weight, PTQ161Linear, the block optimisation,
opcheck, torch.compile and error paths."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import blockops

from blockops.nn import PTQ161Linear
from blockops.ops import bitpack, ptq161
from blockops.quant import ptq161 as qptq
from blockops.reference import ref_ptq161_dequantize, ref_ptq161_linear, ref_ptq161_weight
from helpers import assert_compiles, kernel_ran, opcheck, run_with_cpu_isa

_ops = torch.ops.blockops
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Mean error allowed, relative to the mean of |x| @ |W_hat|^T (the size of the terms summed; a plain relative
# error is meaningless where outputs cancel). fp32: the salient part's 16-bit fixed-point activations (lowbit's
# decode kernel); fp16/bf16: the rounding of the output to x's dtype.
TOL = {torch.float32: 5e-5, torch.float16: 5e-4, torch.bfloat16: 4e-3}


def make_weights(out, inn, ratio, seed=0, factor_dtype=torch.float32, align=1, zero_rows=(), random_factors=True):
    """Packed weights of a random W (rows in `zero_rows` all zero: every non-salient sign there is sign(0)), with
    r1, r2 away from 1 so that every factor matters. Returns (tensors, num_salient, W, mask)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inn, generator=g)
    for r in zero_rows:
        w[r] = 0
    act = torch.rand(inn, generator=g)
    tensors, num_salient = qptq.quantize_weight(w, act, ratio, align, factor_dtype)
    if random_factors:
        tensors["r1"] = (torch.rand(out, generator=g) + 0.5).to(factor_dtype)
        tensors["r2"] = (torch.rand(inn, generator=g) + 0.5).to(factor_dtype)
    mask = torch.zeros(inn)
    mask[tensors["perm"][:num_salient].long()] = 1
    return tensors, num_salient, w, mask


def args_of(tensors):
    return [tensors[k] for k in ptq161.FIELDS]


def dense_of(tensors, w, mask):
    t = tensors
    return ref_ptq161_weight(w, mask, t["salient_scale"], t["salient_zero"], t["alpha"], t["mu"], t["r1"], t["r2"])


def scaled_error(y, ref, x, w_hat):
    return ((y.double() - ref.double()).abs().mean() / (x.double().abs() @ w_hat.double().abs().t()).mean()).item()


# ---- format and quantizer ---------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.05, 0.2, 0.5])
@pytest.mark.parametrize("shape", [(37, 53), (300, 77), (16, 1000)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("factor_dtype", [torch.float32, torch.float16])
def test_packing_reproduces_dense_formula(shape, ratio, factor_dtype):
    """Packed tensors decoded (reference and kernel) equal PTQ1.61's dense mask * W_high + (1 - mask) * W_low."""
    out, inn = shape
    tensors, s, w, mask = make_weights(out, inn, ratio, factor_dtype=factor_dtype, zero_rows=(1,))
    assert s == round(ratio * inn)
    assert torch.equal(tensors["perm"].sort().values, torch.arange(inn, dtype=torch.int32))
    dense = dense_of(tensors, w, mask)
    torch.testing.assert_close(ref_ptq161_dequantize(*args_of(tensors), s), dense, rtol=1e-6, atol=1e-6)
    with kernel_ran("ptq161_dequantize", "cpu"):
        torch.testing.assert_close(ptq161.ptq161_dequantize(*args_of(tensors), s), dense, rtol=1e-6, atol=1e-6)


def test_salient_channels_are_the_largest_activations():
    act = torch.tensor([0.1, 5.0, 0.2, 3.0, 0.3, 4.0, 0.0, 0.05])
    tensors, s = qptq.quantize_weight(torch.randn(4, 8), act, salient_ratio=0.375, salient_align=1)
    assert s == 3 and tensors["perm"].tolist() == [1, 3, 5, 0, 2, 4, 6, 7]
    assert qptq.salient_count(4096, 0.2) == 816 and qptq.salient_count(4096, 0.2, 1) == 819


def test_salient_codes_are_4bit_min_max_per_row():
    w = torch.tensor([[-1.5, 0.0, 3.0, 0.7], [0.2, 0.4, 0.1, 0.3]])  # row 1: all positive -> range [0, max]
    tensors, s = qptq.quantize_weight(w, torch.ones(4), 1.0, 1, torch.float32)
    torch.testing.assert_close(tensors["salient_scale"], torch.tensor([4.5 / 15, 0.4 / 15]))
    torch.testing.assert_close(tensors["salient_zero"], torch.tensor([5.0, 0.0]))
    q = bitpack.unpack_bits(tensors["qsalient"], 4, 16, 0)[:4].t()
    assert q.tolist() == [[0, 5, 15, 7], [8, 15, 4, 11]]


def test_sign_zero_is_zero_as_in_torch_sign():
    """A non-salient weight equal to its row's mean has sign 0: W_low = r1 r2 mu there (listed in zero_signs)."""
    w = torch.tensor([[9.0, 1.0, -1.0, 0.0, 0.0], [9.0, 2.0, 2.0, 2.0, 2.0], [9.0, 1.0, 2.0, 3.0, 6.0]])
    act = torch.tensor([10.0, 1, 1, 1, 1])
    tensors, s = qptq.quantize_weight(w, act, 0.2, 1, torch.float32)
    assert s == 1
    # non-salient entries j * out + i with W == mu: row 0 (mu 0): j = 2, 3; row 1 (mu 2): every j; row 2 (mu 3): j = 2.
    assert tensors["zero_signs"].tolist() == sorted([2 * 3 + 0, 3 * 3 + 0, 2 * 3 + 2] + [j * 3 + 1 for j in range(4)])
    tensors["r1"] = torch.tensor([1.5, 0.5, 2.0])
    tensors["r2"] = torch.tensor([1.0, 0.5, 2.0, 3.0, 0.25])
    mask = torch.tensor([1.0, 0, 0, 0, 0])
    dense = dense_of(tensors, w, mask)
    assert dense[1, 1:].tolist() == [0.5 * r * 2.0 for r in (0.5, 2.0, 3.0, 0.25)]  # r1 r2 mu, no alpha term
    torch.testing.assert_close(ptq161.ptq161_dequantize(*args_of(tensors), s), dense)
    for rows in (1, 17):  # the table GEMV and the fixed-point kernel correct U afterwards
        x = torch.randn(rows, 5)
        with kernel_ran("ptq161_linear", "cpu"):
            torch.testing.assert_close(ptq161.ptq161_linear(x, *args_of(tensors), s), x @ dense.t(),
                                       rtol=1e-4, atol=1e-4)


def test_bits_per_weight_4096_square():
    layer = PTQ161Linear(4096, 4096, num_salient=qptq.salient_count(4096, 0.2), bias=False)
    bits = layer.bits_per_weight()
    s, n = 816, 4096 - 816
    expected = (4 * s + 32 * -(-n // 32) + 5 * 16) / 4096 + (32 + 16) / 4096
    assert bits == pytest.approx(expected, rel=1e-12)
    assert bits < 1.65
    assert f"bits_per_weight={bits:.4f}" in repr(layer)
    # the exact 20% (819 channels) pads the codes to 832 and still fits; fp32 factors do not
    assert PTQ161Linear(4096, 4096, 819, bias=False).bits_per_weight() < 1.65
    assert PTQ161Linear(4096, 4096, 816, bias=False, factor_dtype=torch.float32).bits_per_weight() > 1.65


# ---- the GEMM against the reference -----------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.05, 0.2, 0.5])
@pytest.mark.parametrize("x_dtype", DTYPES, ids=str)
def test_linear_matches_reference(x_dtype, ratio):
    """Every batch (table GEMV up to 16 rows, lowbit's fixed-point kernel above), odd sizes, out = 300 (two full bands
    of 128 rows, then 16-row tiles and a partial tile for the portable loop), with and without bias."""
    for case, (out, inn) in enumerate([(300, 77), (37, 1000)]):
        tensors, s, w, mask = make_weights(out, inn, ratio, seed=case, zero_rows=(2,))
        assert tensors["zero_signs"].numel() > 0
        dense = dense_of(tensors, w, mask)
        bias = torch.randn(out) if case == 0 else None
        gen = torch.Generator().manual_seed(7)
        for rows in (1, 2, 5, 17, 64):
            x = torch.randn(rows, inn, generator=gen).to(x_dtype)
            with kernel_ran("ptq161_linear", "cpu"):
                y = ptq161.ptq161_linear(x, *args_of(tensors), s, bias)
            assert y.dtype == x_dtype and y.shape == (rows, out)
            ref = x.double() @ dense.double().t() + (0 if bias is None else bias.double())
            err = scaled_error(y, ref, x, dense)
            assert err <= TOL[x_dtype], f"{out}x{inn} rows={rows}: error {err:.3g}"


@pytest.mark.skipif(blockops.build_info()["cpu_families"]["ptq161"] == "portable", reason="needs AVX2")
def test_batched_binary_part_runs_on_the_shuffle_kernel():
    """4 rows and more (2 and more without AVX-512, as the AVX2 child of test_every_cpu_code_path_matches runs):
    U = signs^T x' by byte-shuffle lookups in int16 tables of signed sums (activations rounded per row and block of
    256 inputs to 14 bits), corrected for sign(0) entries afterwards. out = 300: nine 32-column blocks (a band of
    one block at the end) and 12 columns of the fp32 tail; 1000 inputs: a short last block."""
    tensors, s, w, mask = make_weights(300, 1000, 0.2, seed=5, zero_rows=(3, 299))
    dense = dense_of(tensors, w, mask)
    for rows in (4, 17, 63, 64, 65, 300):
        x = torch.randn(rows, 1000)
        with kernel_ran("ptq161_sign_shuffle", "cpu"):
            y = ptq161.ptq161_linear(x, *args_of(tensors), s)
        ref = x.double() @ dense.double().t()
        assert scaled_error(y, ref, x, dense) < 5e-5, rows
        assert ((y - ref).abs().max() / ref.abs().max()).item() < 2e-4, rows


@pytest.mark.skipif(blockops.build_info()["cpu_families"]["ptq161"] == "portable", reason="needs AVX2")
@pytest.mark.parametrize("rows, bad_row", [(5, 1), (40, 1), (70, 66)])
def test_non_finite_activation_row_takes_the_exact_path(rows, bad_row):
    """A row with a NaN or an infinity (no fixed-point step exists for it) is computed on the exact path: it is
    non-finite in every output, as F.linear's, and every other row stays exactly what it is without it (70 rows: the
    bad row in the kernel's second chunk of 64)."""
    tensors, s, w, mask = make_weights(96, 256, 0.1, seed=2)
    x = torch.randn(rows, 256)
    clean = ptq161.ptq161_linear(x, *args_of(tensors), s)
    for bad in (float("nan"), float("inf")):
        xb = x.clone()
        xb[bad_row, 7] = bad
        with kernel_ran("ptq161_sign_shuffle", "cpu"):
            y = ptq161.ptq161_linear(xb, *args_of(tensors), s)
        assert not torch.isfinite(y[bad_row]).any()
        others = [m for m in range(rows) if m != bad_row]
        assert torch.equal(y[others], clean[others])


@pytest.mark.skipif(blockops.build_info()["cpu_families"]["ptq161"] == "portable", reason="needs AVX2")
def test_shuffle_kernel_result_does_not_depend_on_the_thread_count():
    """Each output of the byte-shuffle kernel is summed by one task in a fixed order: 1 and 2 threads agree bitwise
    (130 rows: three chunks; 300 outputs: bands of two blocks, one of one block, and the fp32 tail)."""
    tensors, s, w, mask = make_weights(300, 1000, 0.2, seed=7)
    x = torch.randn(130, 1000)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ptq161.ptq161_linear(x, *args_of(tensors), s)
        torch.set_num_threads(2)
        with kernel_ran("ptq161_sign_shuffle", "cpu"):
            two = ptq161.ptq161_linear(x, *args_of(tensors), s)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_linear_several_sign_blocks_and_shapes():
    """out = 4100: the batched path decodes the signs in blocks of 15 words (2 blocks here); 3-D input; 0 rows."""
    tensors, s, w, mask = make_weights(4100, 700, 0.2, seed=3, zero_rows=(5, 4099))
    dense = dense_of(tensors, w, mask)
    for rows in (3, 20):
        x = torch.randn(2, rows, 700)
        y = ptq161.ptq161_linear(x, *args_of(tensors), s)
        assert scaled_error(y, x.double() @ dense.double().t(), x, dense) < TOL[torch.float32]
    assert ptq161.ptq161_linear(torch.randn(0, 700), *args_of(tensors), s).shape == (0, 4100)


def test_all_salient_and_no_salient():
    for ratio in (0.0, 1.0):
        tensors, s, w, mask = make_weights(40, 64, ratio)
        dense = dense_of(tensors, w, mask)
        torch.testing.assert_close(ptq161.ptq161_dequantize(*args_of(tensors), s), dense, rtol=1e-6, atol=1e-6)
        x = torch.randn(3, 64)
        assert scaled_error(ptq161.ptq161_linear(x, *args_of(tensors), s), x @ dense.t(), x, dense) < 5e-5


@pytest.mark.parametrize("isa", ["portable", "avx2"])
def test_every_cpu_code_path_matches(isa):
    """BLOCKOPS_CPU_ISA forces the portable kernels, or stops at AVX2 (no AVX-512 vpermps): each path alone must
    match the reference, with full bands, single tiles and a partial tile of rows."""
    code = (
        "import torch, sys\n"
        f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "from test_ptq161 import make_weights, args_of, dense_of, scaled_error\n"
        "import blockops\n"
        "from blockops.ops import ptq161\n"
        "tensors, s, w, mask = make_weights(300, 333, 0.2, zero_rows=(0,))\n"
        "dense = dense_of(tensors, w, mask)\n"
        "for rows in (1, 6, 7, 64):\n"  # the table GEMV; the byte-shuffle kernel on AVX2
        "    x = torch.randn(rows, 333)\n"
        "    err = scaled_error(ptq161.ptq161_linear(x, *args_of(tensors), s), x.double() @ dense.double().t(), x, dense)\n"
        "    assert err < 5e-5, (rows, err)\n"
        "counts = blockops.kernel_call_counts()\n"
        "if blockops.build_info()['cpu_families']['ptq161'] == 'avx2+fma':\n"
        "    assert counts['ptq161_sign_shuffle.cpu'] == 3\n"
        # one row: both parts in one parallel region on AVX2 (the salient part on lowbit's split-K kernels)
        "assert counts['ptq161_linear_one_region.cpu'] == (0 if blockops.build_info()['cpu_isa_path'] == 'portable' else 1), counts\n"
        "from blockops.reference import ref_ptq161_linear\n"   # the factors' gradients keep fp32 sums (1e-5)
        "alpha = tensors['alpha'].clone().requires_grad_()\n"
        "x, gy = torch.randn(6, 333), torch.randn(6, 300)\n"
        "ga, = torch.autograd.grad(ptq161.ptq161_linear(x, *args_of({**tensors, 'alpha': alpha}), s), alpha, gy)\n"
        "gr, = torch.autograd.grad(ref_ptq161_linear(x, *args_of({**tensors, 'alpha': alpha}), s), alpha, gy)\n"
        "assert ((ga - gr).abs().max() / gr.abs().max()) < 1e-5\n"
    )
    run_with_cpu_isa(isa, code)


# ---- gradients ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 3, 33])
@pytest.mark.parametrize("factor_dtype", [torch.float32, torch.bfloat16])
def test_gradients_match_autograd_through_reference(rows, factor_dtype):
    tensors, s, w, mask = make_weights(50, 90, 0.2, seed=rows, zero_rows=(4,), factor_dtype=factor_dtype)
    params = {k: tensors[k].clone().requires_grad_() for k in ("alpha", "r1", "r2")}
    full = {**tensors, **params}
    bias = torch.randn(50, requires_grad=True)
    x = torch.randn(rows, 90, requires_grad=True)
    gy = torch.randn(rows, 50)
    inputs = (x, params["alpha"], params["r1"], params["r2"], bias)
    with kernel_ran("ptq161_linear_backward", "cpu"):
        ours = torch.autograd.grad(ptq161.ptq161_linear(x, *args_of(full), s, bias), inputs, gy)
    ref = torch.autograd.grad(ref_ptq161_linear(x, *args_of(full), s, bias), inputs, gy)
    rtol = 1e-4 if factor_dtype == torch.float32 else 2e-2
    for name, a, b in zip(("x", "alpha", "r1", "r2", "bias"), ours, ref):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=rtol * b.float().abs().max().item(), msg=name)
    # salient channels do not use r2: their gradient is 0
    assert (ours[3][tensors["perm"][:s].long()] == 0).all()


def test_only_x_or_only_factors():
    tensors, s, _, _ = make_weights(20, 40, 0.2)
    x = torch.randn(2, 40, requires_grad=True)
    gx, = torch.autograd.grad(ptq161.ptq161_linear(x, *args_of(tensors), s).sum(), x)
    alpha = tensors["alpha"].clone().requires_grad_()
    ga, = torch.autograd.grad(ptq161.ptq161_linear(x.detach(), *args_of({**tensors, "alpha": alpha}), s).sum(), alpha)
    assert gx.shape == x.shape and ga.shape == alpha.shape
    outs = _ops.ptq161_linear_backward(torch.ones(2, 20), x.detach(), *args_of(tensors), s, False, True)
    assert outs[0].numel() == 0 and outs[1].shape == (20,)


@pytest.mark.filterwarnings("ignore:Input #")
def test_gradcheck_small():
    """Finite differences on the kernel itself (fp32: loose tolerances; the op takes no fp64)."""
    tensors, s, _, _ = make_weights(12, 24, 0.25, zero_rows=(3,))
    x = torch.randn(2, 24, requires_grad=True)
    alpha, r1, r2 = (tensors[k].clone().requires_grad_() for k in ("alpha", "r1", "r2"))

    def f(x, alpha, r1, r2):
        return ptq161.ptq161_linear(x, *args_of({**tensors, "alpha": alpha, "r1": r1, "r2": r2}), s)

    torch.autograd.gradcheck(f, (x, alpha, r1, r2), eps=1e-2, atol=2e-2, rtol=2e-2, fast_mode=True)


# ---- fp64 (CPU): the portable fp64 path, so that gradcheck runs at fp64 tolerances ----------------------------


def _fp64(tensors):
    return {k: v.double() if v.is_floating_point() else v for k, v in tensors.items()}


@pytest.mark.parametrize("rows", [1, 20])
@pytest.mark.parametrize("ratio", [0.0, 0.25, 1.0])
def test_fp64_matches_fp64_reference(rows, ratio):
    tensors, s, w, mask = make_weights(24, 80, ratio, zero_rows=(3,))
    t64 = _fp64(tensors)
    x, bias = torch.randn(rows, 80, dtype=torch.float64), torch.randn(24, dtype=torch.float64)
    w_hat = ref_ptq161_dequantize(*args_of(t64), s).double()  # the reference works in fp32
    with kernel_ran("ptq161_dequantize", "cpu"):
        w64 = ptq161.ptq161_dequantize(*args_of(t64), s)
    assert w64.dtype == torch.float64
    torch.testing.assert_close(w64, w_hat, rtol=1e-6, atol=1e-6)
    with kernel_ran("ptq161_linear", "cpu"):
        y = ptq161.ptq161_linear(x, *args_of(t64), s, bias)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, x @ w64.t() + bias, rtol=1e-12, atol=1e-12)
    assert ptq161.ptq161_linear(x.float(), *args_of(t64), s).dtype == torch.float32  # fp64 factors, fp32 x


@pytest.mark.filterwarnings("ignore:Input #")
@pytest.mark.parametrize("ratio", [0.25, 0.0])
def test_gradcheck_fp64(ratio):
    """gradcheck at fp64 tolerances on the kernels (ptq161_linear, ptq161_linear_backward) for x, alpha, r1, r2 and
    bias, with a sign(0) row. No gradgradcheck: ptq161_linear_backward has no autograd of its own, so
    ptq161_linear is once differentiable (as documented)."""
    tensors, s, _, _ = make_weights(12, 40, ratio, zero_rows=(3,))
    t64 = _fp64(tensors)
    x = torch.randn(2, 2, 40, dtype=torch.float64, requires_grad=True)
    alpha, r1, r2 = (t64[k].clone().requires_grad_() for k in ("alpha", "r1", "r2"))
    bias = torch.randn(12, dtype=torch.float64, requires_grad=True)

    def f(x, alpha, r1, r2, bias):
        return ptq161.ptq161_linear(x, *args_of({**t64, "alpha": alpha, "r1": r1, "r2": r2}), s, bias)

    with kernel_ran("ptq161_linear_backward", "cpu"):
        assert torch.autograd.gradcheck(f, (x, alpha, r1, r2, bias))


def test_fp64_backward_only_x_or_only_factors():
    tensors, s, _, _ = make_weights(12, 40, 0.25)
    t64 = _fp64(tensors)
    x, gy = torch.randn(3, 40, dtype=torch.float64), torch.randn(3, 12, dtype=torch.float64)
    full = _ops.ptq161_linear_backward(gy, x, *args_of(t64), s, True, True)
    only_x = _ops.ptq161_linear_backward(gy, x, *args_of(t64), s, True, False)
    only_f = _ops.ptq161_linear_backward(gy, x, *args_of(t64), s, False, True)
    assert torch.equal(only_x[0], full[0]) and all(t.numel() == 0 for t in only_x[1:])
    assert only_f[0].numel() == 0 and all(torch.equal(a, b) for a, b in zip(only_f[1:], full[1:]))


def test_opcheck_fp64():
    tensors, s, _, _ = make_weights(24, 40, 0.25)
    t64 = _fp64(tensors)
    x = torch.randn(3, 40, dtype=torch.float64)
    opcheck(_ops.ptq161_linear.default, (x, *args_of(t64), s, torch.randn(24, dtype=torch.float64)))
    leaves = {**t64, **{k: t64[k].clone().requires_grad_() for k in ("alpha", "r1", "r2")}}
    opcheck(_ops.ptq161_linear.default, (x.clone().requires_grad_(), *args_of(leaves), s))
    opcheck(_ops.ptq161_dequantize.default, (*args_of(t64), s))
    opcheck(_ops.ptq161_linear_backward.default,
            (torch.randn(3, 24, dtype=torch.float64), x, *args_of(t64), s, True, True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp64_is_cpu_only_on_cuda():
    tensors, s, _, _ = make_weights(24, 40, 0.25)
    cuda = {k: v.cuda() for k, v in tensors.items()}
    with pytest.raises(RuntimeError, match="x is float64 on cuda.*float64 is CPU-only"):
        ptq161.ptq161_linear(torch.randn(2, 40, dtype=torch.float64, device="cuda"), *args_of(cuda), s)


# ---- module and quantization pipeline ---------------------------------------------------------------------


def test_module_from_linear_forward_and_state_dict():
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    act = torch.rand(96)
    layer = PTQ161Linear.from_linear(linear, act, salient_ratio=0.2, factor_dtype=torch.float32)
    assert layer.num_salient == 16 and torch.equal(layer.r1, torch.ones(40))
    tensors, s = qptq.quantize_weight(linear.weight, act, 0.2, 16, torch.float32)
    for name in ptq161.FIELDS:
        assert torch.equal(getattr(layer, name), tensors[name]), name
    x = torch.randn(4, 96)
    torch.testing.assert_close(layer(x), x @ layer.dequantize().t() + linear.bias, rtol=1e-4, atol=1e-4)
    # a copy with another sign(0) count loads the state dict (zero_signs takes the checkpoint's length)
    other = PTQ161Linear(96, 40, 16, factor_dtype=torch.float32)
    sd = dict(layer.state_dict(), zero_signs=torch.tensor([0, 5]))
    other.load_state_dict(sd)
    assert other.zero_signs.tolist() == [0, 5]
    assert "bits_per_weight=" in repr(layer)


def test_collect_act_scales():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    batches = [torch.randn(3, 8) for _ in range(4)]
    scales = qptq.collect_act_scales(model, batches)
    assert set(scales) == {"0", "2"}
    x = torch.cat(batches)
    torch.testing.assert_close(scales["0"], x.abs().amax(0))
    torch.testing.assert_close(scales["2"], torch.relu(model[0](x)).abs().amax(0).detach())
    assert not model[0]._forward_pre_hooks


class MLPBlock(nn.Module):
    """A pre-norm transformer MLP block with a residual (what PTQ1.61 optimises per decoder layer)."""

    def __init__(self, dim=64, hidden=160):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


def test_optimize_block_lowers_block_error():
    torch.manual_seed(0)
    fp_block = MLPBlock()
    inputs = torch.randn(16, 8, 64)
    scales = qptq.collect_act_scales(fp_block, [inputs])
    q_block = qptq.quantize_linears(qptq.copy.deepcopy(fp_block), scales, 0.2)
    assert isinstance(q_block.up, PTQ161Linear) and q_block.up.alpha.dtype == torch.float16
    frozen = {k: v.clone() for k, v in q_block.state_dict().items() if not k.endswith(("alpha", "r1", "r2"))}

    def block_error():
        with torch.no_grad():
            return (q_block(inputs) - fp_block(inputs)).pow(2).mean().item()

    before = block_error()
    with kernel_ran("ptq161_linear_backward", "cpu"):
        history = qptq.optimize_block(fp_block, q_block, inputs, epochs=8, batch_size=4, progress=False)
    after = block_error()
    assert len(history) == 8 and history[-1] < history[0]
    assert after < 0.95 * before, (before, after)  # measured 0.92: r1, r2 refine an L1-optimal alpha
    assert q_block.up.alpha.dtype == torch.float16 and q_block.up.alpha.requires_grad  # as before
    assert not torch.equal(q_block.up.r2, torch.ones_like(q_block.up.r2))
    for k, v in q_block.state_dict().items():  # only alpha, r1, r2 moved
        if k in frozen:
            assert torch.equal(v, frozen[k]), k
    # the same seed gives the same history
    q2 = qptq.quantize_linears(qptq.copy.deepcopy(fp_block), scales, 0.2)
    assert qptq.optimize_block(fp_block, q2, inputs, epochs=2, batch_size=4, progress=False) == \
        pytest.approx(history[:2], rel=1e-5)


def test_block_loss_terms():
    a = torch.randn(2, 3, 8)
    assert qptq.block_loss(a, a, a).item() == pytest.approx(0.0, abs=1e-6)
    b = -a  # cos = -1: |cos| = 1, so only the MSE terms remain
    assert qptq.block_loss(b, a, a).item() == pytest.approx(2 * (2 * a).pow(2).mean().item(), rel=1e-5)


def test_quantization_preprocessing_merges_lora():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 32))
    teacher = [p.detach().clone() for p in model.parameters()]
    batches = [torch.randn(4, 32) for _ in range(3)]
    targets = [model(b).detach() for b in batches]

    def loss_fn(q_model, batch):
        return (q_model(batch) - targets[[b is batch for b in batches].index(True)]).pow(2).mean()

    out = qptq.quantization_preprocessing(model, batches, loss_fn, rank=4, steps=5, lr=1e-2, progress=False)
    assert out is model
    assert not torch.equal(model[0].weight, teacher[0]) and torch.equal(model[0].bias, teacher[1])


# ---- registration, tracing, compile, errors -----------------------------------------------------------------


def test_opcheck():
    tensors, s, _, _ = make_weights(24, 40, 0.2, zero_rows=(1,))
    bias = torch.randn(24)
    for rows in (2, 20):
        x = torch.randn(rows, 40)
        opcheck(_ops.ptq161_linear.default, (x, *args_of(tensors), s, bias))
        grads = {k: tensors[k].clone().requires_grad_() for k in ("alpha", "r1", "r2")}
        opcheck(_ops.ptq161_linear.default, (x.clone().requires_grad_(), *args_of({**tensors, **grads}), s, None))
    opcheck(_ops.ptq161_dequantize.default, (*args_of(tensors), s))
    for flags in ((True, True), (False, True), (True, False)):
        opcheck(_ops.ptq161_linear_backward.default, (torch.randn(3, 24), torch.randn(3, 40), *args_of(tensors), s,
                                                      *flags))


def test_torch_compile_model_with_ptq161_linear():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 32))
    scales = qptq.collect_act_scales(model, [torch.randn(5, 64)])
    qptq.quantize_linears(model, scales, 0.25, factor_dtype=torch.float32)
    assert_compiles(model, torch.randn(3, 64))


@pytest.mark.parametrize("bias", [False, True])
def test_in_features_zero_gives_the_bias(bias):
    """issue 17: with in_features == 0, x @ W^T is all zeros and F.linear returns the bias; ptq161_linear returned
    zeros, and its backward refused grad_out (rows counted as x.numel() / in). alpha and r1 get zero gradients."""
    tensors, s, _, _ = make_weights(6, 0, 0.0)
    params = {k: tensors[k].clone().requires_grad_() for k in ("alpha", "r1", "r2")}
    b = torch.randn(6, requires_grad=True) if bias else None
    for shape in [(3, 0), (2, 4, 0), (0, 0)]:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.zeros(shape, dtype=dtype, requires_grad=True)
            y = ptq161.ptq161_linear(x, *args_of({**tensors, **params}), s, b)
            want = torch.nn.functional.linear(x, torch.zeros(6, 0, dtype=dtype), None if b is None else b.to(dtype))
            assert y.shape == want.shape and y.dtype == dtype
            torch.testing.assert_close(y, want, rtol=0, atol=0)
            gy = torch.randn(y.shape).to(dtype)
            inputs = (x, params["alpha"], params["r1"], params["r2"]) + ((b,) if bias else ())
            grads = torch.autograd.grad(y, inputs, gy)
            assert grads[0].shape == x.shape and grads[3].shape == (0,)
            assert torch.equal(grads[1], torch.zeros(6)) and torch.equal(grads[2], torch.zeros(6))
            if bias:
                torch.testing.assert_close(grads[4], gy.float().reshape(-1, 6).sum(0))


def test_op_errors_name_the_problem():
    tensors, s, _, _ = make_weights(24, 40, 0.2)
    x = torch.randn(2, 40)

    def call(x=x, num_salient=s, **over):
        return ptq161.ptq161_linear(x, *args_of({**tensors, **over}), num_salient)

    cases = [
        (dict(x=torch.randn(2, 39)), "x must have 40 features"),
        (dict(x=x.int()), "x must have dtype in"),
        (dict(x=torch.randn(40, 2).t()), "x must be contiguous"),
        (dict(num_salient=41), r"num_salient must be in \[0, in = 40\]"),
        (dict(num_salient=s + 16), "qsalient must have shape"),
        (dict(signs=tensors["signs"][:, :23].contiguous()), "signs must have shape"),
        (dict(perm=tensors["perm"].long()), "perm must have dtype in"),
        (dict(zero_signs=tensors["zero_signs"].int()), "zero_signs must have dtype in"),
        (dict(alpha=tensors["alpha"].int()), "alpha must have dtype in"),
        (dict(r1=torch.ones(23)), r"r1 must have shape \[24\]"),
        (dict(r2=torch.ones(24)), r"r2 must have shape \[40\]"),
        (dict(perm=torch.arange(1, 41, dtype=torch.int32)), r"perm\[39\] = 40 is out of range \[0, 40\)"),
        (dict(perm=torch.cat([torch.zeros(2, dtype=torch.int32), torch.arange(2, 40, dtype=torch.int32)])),
         "perm is not a permutation: channel 0 appears twice"),
        (dict(zero_signs=torch.tensor([24 * 32])), r"zero_signs\[0\] = 768 is out of range"),
        (dict(zero_signs=torch.tensor([3, 3])), "zero_signs must be strictly increasing"),
    ]
    for over, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call(**over)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        ptq161.ptq161_linear(x, *args_of(tensors), s, torch.zeros(23))
    with pytest.raises(ValueError, match="act_scales must be"):
        qptq.quantize_weight(torch.randn(4, 8), torch.ones(7))
    with pytest.raises(ValueError, match="salient_ratio must be in"):
        qptq.quantize_weight(torch.randn(4, 8), torch.ones(8), 1.5)
    with pytest.raises(ValueError, match="num_salient must be in"):
        PTQ161Linear(8, 4, 9)
    with pytest.raises(ValueError, match="no PTQ161Linear"):
        qptq.optimize_block(nn.Linear(4, 4), nn.Linear(4, 4), torch.randn(2, 4), progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_reference():
    """CUDA: the +-1 GEMV kernel (up to 8 rows, sign(0) entries taken out afterwards), decoded blocks + cuBLAS above,
    dequantize and the backward against the reference; mixed devices are an error naming both."""
    tensors, s, w, mask = make_weights(300, 333, 0.2, zero_rows=(0, 299))
    dense = dense_of(tensors, w, mask).cuda()
    cuda = {k: v.cuda() for k, v in tensors.items()}
    with kernel_ran("ptq161_dequantize", "cuda"):
        torch.testing.assert_close(ptq161.ptq161_dequantize(*args_of(cuda), s), dense, rtol=1e-6, atol=1e-6)
    for rows, dtype in ((1, torch.float32), (5, torch.float16), (8, torch.bfloat16), (9, torch.float32)):
        x = torch.randn(rows, 333, device="cuda").to(dtype)
        with kernel_ran("ptq161_linear", "cuda"):
            y = ptq161.ptq161_linear(x, *args_of(cuda), s)
        assert scaled_error(y, x.double() @ dense.double().t(), x, dense) <= TOL[dtype], rows
    params = {k: cuda[k].clone().requires_grad_() for k in ("alpha", "r1", "r2")}
    x = torch.randn(3, 333, device="cuda", requires_grad=True)
    inputs = (x, params["alpha"], params["r1"], params["r2"])
    with kernel_ran("ptq161_linear_backward", "cuda"):
        ours = torch.autograd.grad(ptq161.ptq161_linear(x, *args_of({**cuda, **params}), s).sum(), inputs)
    ref = torch.autograd.grad(ref_ptq161_linear(x, *args_of({**cuda, **params}), s).sum(), inputs)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())
    with pytest.raises(RuntimeError, match="x is on cpu but perm is on cuda"):
        ptq161.ptq161_linear(torch.randn(2, 333), *args_of(cuda), s)
    with pytest.raises(RuntimeError, match="alpha is on cpu but perm is on cuda"):
        ptq161.ptq161_linear(torch.randn(2, 333, device="cuda"), *args_of({**cuda, "alpha": tensors["alpha"]}), s)
