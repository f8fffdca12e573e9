"""2/3/4-bit group-wise GEMM: kernels vs the dequantize-then-matmul reference, gradients, GPTQ round trips,
QuantLinear, quantize_, checkpoint loading, opcheck, torch.compile and error paths."""
import os
import re

import pytest
import torch
from helpers import (DEVICES, assert_close_to_reference, assert_compiles, env_var, kernel_ran, needs_hopper_kernels,
                     opcheck, rel_error, run_with_cpu_isa)
from torch import nn

import blockops
from blockops.nn import QuantLinear
from blockops.ops import bitpack, lowbit
from blockops.quant import gptq, rtn
from blockops.reference import ref_quant_dequantize, ref_quant_linear


def random_weight(in_features, out_features, bits, group_size, dtype, device, seed=0, fractional_zeros=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (in_features, out_features), generator=g, dtype=torch.int32)
    groups = in_features // group_size
    scales = (torch.rand(groups, out_features, generator=g) * 0.02 + 0.005).to(dtype)
    zeros = torch.randint(0, 2**bits, (groups, out_features), generator=g).float()
    if fractional_zeros:
        zeros = zeros + torch.rand(groups, out_features, generator=g) - 0.5
    return bitpack.pack_bits(q, bits, 0).to(device), scales.to(device), zeros.to(dtype).to(device)


# Relative mean error vs the fp32 reference. fp32: the CPU decode kernel for 2/4-bit rounds activations to
# 16-bit fixed point per group (error ~3e-5); fp16/bf16 outputs are limited by their own rounding.
MAX_REL = {torch.float32: 2e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("rows", [1, 3, 8, 17, 70])
def test_quant_linear_matches_reference(device, bits, group_size, rows):
    in_features, out_features = 384, 72  # 72: a tile and a partial tile of columns
    qweight, scales, zeros = random_weight(in_features, out_features, bits, group_size, torch.float16, device)
    x = torch.randn(rows, in_features, device=device)
    with kernel_ran("quant_linear", device):
        y = lowbit.quant_linear(x, qweight, scales, zeros, bits, group_size)
    assert_close_to_reference(y, ref_quant_linear(x, qweight, scales, zeros, bits, group_size), MAX_REL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 33, 70])
def test_dtypes_and_bias(device, x_dtype, scale_dtype, rows):
    qweight, scales, zeros = random_weight(256, 48, 2, 64, scale_dtype, device, fractional_zeros=True)
    bias = torch.randn(48, device=device, dtype=x_dtype)
    x = torch.randn(2, rows, 256, device=device, dtype=x_dtype)
    y = lowbit.quant_linear(x, qweight, scales, zeros, 2, 64, bias)
    assert y.dtype == x_dtype and y.shape == (2, rows, 48)
    ref = ref_quant_linear(x, qweight, scales, zeros, 2, 64, bias)
    assert_close_to_reference(y, ref, MAX_REL[x_dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits,group_size", [(2, 32), (3, 32), (4, 96), (3, 48), (2, 160), (3, 80)])
def test_dequantize_is_exact(device, bits, group_size):
    qweight, scales, zeros = random_weight(480, 40, bits, group_size, torch.float32, device)
    with kernel_ran("quant_dequantize", device):
        w = lowbit.quant_dequantize(qweight, scales, zeros, bits, group_size)
    torch.testing.assert_close(w, ref_quant_dequantize(qweight, scales, zeros, bits, group_size), rtol=0, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("rows", [1, 5, 20])
def test_gradients_match_autograd_through_reference(device, bits, rows):
    qweight, scales, zeros = random_weight(192, 40, bits, 32, torch.float32, device, fractional_zeros=True)
    bias = torch.randn(40, device=device)
    x = torch.randn(rows, 192, device=device)
    grad_out = torch.randn(rows, 40, device=device)
    leaves = [t.clone().requires_grad_() for t in (x, scales, zeros, bias)]
    with kernel_ran("quant_linear_grad_input", device), kernel_ran("quant_grad_scales", device):
        lowbit.quant_linear(leaves[0], qweight, leaves[1], leaves[2], bits, 32, leaves[3]).backward(grad_out)
    ref_leaves = [t.clone().double().requires_grad_() for t in (x, scales, zeros, bias)]
    ref_quant_linear_f64(ref_leaves[0], qweight, ref_leaves[1], ref_leaves[2], bits, 32, ref_leaves[3]).backward(
        grad_out.double())
    for name, ours, ref in zip(("x", "scales", "zeros", "bias"), leaves, ref_leaves):
        assert rel_error(ours.grad, ref.grad) < 1e-5, name


@needs_hopper_kernels("lowbit")
@pytest.mark.parametrize("bits,group_size", [(2, 64), (3, 64), (4, 128), (2, 16)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [65, 100, 257, 1024])
def test_hopper_prefill(bits, group_size, dtype, rows):
    """The Hopper prefill GEMM (lowbit_wgmma.cu: TMA + wgmma, weights dequantized in registers) on an H100 / H200
    above the mma.sync kernel's rows: against the reference with fractional zeros, a bias and a partial tile of
    outputs; BLOCKOPS_LOWBIT_WGMMA=0 sends the same call back to dequantize + cuBLAS."""
    in_features, out_features = 384, 200
    qweight, scales, zeros = random_weight(in_features, out_features, bits, group_size, dtype, "cuda",
                                           fractional_zeros=True)
    x = torch.randn(rows, in_features, device="cuda", dtype=dtype)
    bias = torch.randn(out_features, device="cuda", dtype=dtype)
    ref = ref_quant_linear(x, qweight, scales, zeros, bits, group_size, bias)
    with kernel_ran("quant_linear_wgmma", "cuda"):
        y = lowbit.quant_linear(x, qweight, scales, zeros, bits, group_size, bias)
    assert y.dtype == dtype and y.shape == (rows, out_features)
    assert_close_to_reference(y, ref, MAX_REL[dtype])
    before = blockops.kernel_call_counts()["quant_linear_wgmma.cuda"]
    with env_var("BLOCKOPS_LOWBIT_WGMMA", "0"):
        y_old = lowbit.quant_linear(x, qweight, scales, zeros, bits, group_size, bias)
    assert blockops.kernel_call_counts()["quant_linear_wgmma.cuda"] == before
    assert_close_to_reference(y_old, ref, MAX_REL[dtype])


def ref_quant_linear_f64(x, qweight, scales, zeros, bits, group_size, bias):
    in_features = scales.shape[0] * group_size
    q = bitpack.unpack_bits(qweight, bits, in_features, 0).double()
    w = (q - zeros.repeat_interleave(group_size, 0)) * scales.repeat_interleave(group_size, 0)
    return x @ w + bias


@pytest.mark.filterwarnings("ignore:Input #")
def test_gradcheck_small():
    """Finite differences (the kernels compute in fp32, so loose tolerances), without a bias argument."""
    qweight, scales, zeros = random_weight(64, 16, 2, 32, torch.float32, "cpu", fractional_zeros=True)
    x = torch.randn(3, 64, dtype=torch.float32, requires_grad=True)
    s = scales.clone().requires_grad_()
    z = zeros.clone().requires_grad_()

    def f(x, s, z):
        return lowbit.quant_linear(x, qweight, s, z, 2, 32)

    torch.autograd.gradcheck(f, (x, s, z), eps=1e-2, atol=1e-2, rtol=1e-2, fast_mode=True)


# ---- fp64 (CPU): the portable fp64 path, so that gradcheck runs on the kernels themselves ----------------------


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("rows", [1, 70])  # fp64 takes the blocked path at any batch
def test_fp64_matches_fp64_reference(bits, rows):
    qweight, scales, zeros = random_weight(192, 40, bits, 32, torch.float64, "cpu", fractional_zeros=True)
    x, bias = torch.randn(rows, 192, dtype=torch.float64), torch.randn(40, dtype=torch.float64)
    with kernel_ran("quant_linear", "cpu"):
        y = lowbit.quant_linear(x, qweight, scales, zeros, bits, 32, bias)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, ref_quant_linear_f64(x, qweight, scales, zeros, bits, 32, bias), rtol=1e-12,
                               atol=1e-12)
    w = lowbit.quant_dequantize(qweight, scales, zeros, bits, 32)
    assert w.dtype == torch.float64
    torch.testing.assert_close(w, ref_quant_linear_f64(torch.eye(192, dtype=torch.float64), qweight, scales, zeros,
                                                       bits, 32, 0).t(), rtol=0, atol=1e-15)
    # fp32 activations with fp64 scales also compute in fp64 and return x's dtype.
    y32 = lowbit.quant_linear(x.float(), qweight, scales, zeros, bits, 32, bias)
    assert y32.dtype == torch.float32


@pytest.mark.filterwarnings("ignore:Input #")
@pytest.mark.parametrize("bits", [3, 4])
def test_gradcheck_fp64(bits):
    """gradcheck at fp64 tolerances on the kernels (quant_linear, quant_linear_grad_input, quant_grad_scales) for
    x, scales, zeros and bias; x 3-D. No gradgradcheck: the backward ops (quant_linear_grad_input,
    quant_grad_scales) have no autograd of their own, so quant_linear is once differentiable (as documented)."""
    qweight, scales, zeros = random_weight(64, 24, bits, 32, torch.float64, "cpu", fractional_zeros=True)
    x = torch.randn(2, 3, 64, dtype=torch.float64, requires_grad=True)
    s, z = scales.clone().requires_grad_(), zeros.clone().requires_grad_()
    bias = torch.randn(24, dtype=torch.float64, requires_grad=True)
    with kernel_ran("quant_linear_grad_input", "cpu"), kernel_ran("quant_grad_scales", "cpu"):
        assert torch.autograd.gradcheck(lambda x, s, z, b: lowbit.quant_linear(x, qweight, s, z, bits, 32, b),
                                        (x, s, z, bias))


def test_opcheck_fp64():
    qweight, scales, zeros = random_weight(64, 24, 3, 32, torch.float64, "cpu")
    x, bias = torch.randn(3, 64, dtype=torch.float64), torch.randn(24, dtype=torch.float64)
    opcheck(torch.ops.blockops.quant_linear.default, (x, qweight, scales, zeros, 3, 32, bias))
    opcheck(torch.ops.blockops.quant_linear.default,
            (x.requires_grad_(), qweight, scales.clone().requires_grad_(), zeros.clone().requires_grad_(), 3, 32,
             bias.requires_grad_()))
    opcheck(torch.ops.blockops.quant_dequantize.default, (qweight, scales, zeros, 3, 32))
    opcheck(torch.ops.blockops.quant_linear_grad_input.default,
            (torch.randn(3, 24, dtype=torch.float64), qweight, scales, zeros, 3, 32))
    opcheck(torch.ops.blockops.quant_grad_scales.default,
            (torch.randn(24, 64, dtype=torch.float64), qweight, zeros, 3, 32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp64_is_cpu_only_on_cuda():
    qweight, scales, zeros = random_weight(128, 16, 2, 64, torch.float16, "cuda")
    with pytest.raises(RuntimeError, match="x is float64 on cuda.*float64 is CPU-only"):
        torch.ops.blockops.quant_linear(torch.randn(2, 128, dtype=torch.float64, device="cuda"), qweight, scales,
                                        zeros, 2, 64, None)
    with pytest.raises(RuntimeError, match="scales is float64 on cuda.*float64 is CPU-only"):
        torch.ops.blockops.quant_dequantize(qweight, scales.double(), zeros.double(), 2, 64)


# ---- QuantLinear and checkpoints --------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_from_linear_is_round_to_nearest(device, bits):
    torch.manual_seed(0)
    linear = nn.Linear(256, 96).to(device)
    layer = QuantLinear.from_linear(linear, bits=bits, group_size=64, dtype=torch.float32)
    w = linear.weight.detach().reshape(96, 4, 64)
    step = ((w.amax(-1) - w.amin(-1)) / (2**bits - 1)).repeat_interleave(64, 1)
    err = (layer.dequantize() - linear.weight.detach()).abs()
    assert (err <= step * 0.5 + 1e-5).all(), "an element is further than half a step from its grid point"
    x = torch.randn(5, 256, device=device)
    torch.testing.assert_close(layer(x), x @ layer.dequantize().t() + linear.bias, rtol=1e-4, atol=1e-4)
    assert f"bits={bits}" in repr(layer) and "bits_per_weight" in repr(layer)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_gptq_round_trip_is_exact(bits, fmt):
    torch.manual_seed(bits)
    layer = QuantLinear.from_linear(nn.Linear(128, 50), bits=bits, group_size=32)
    tensors = layer.to_gptq(fmt)
    assert tensors["qzeros"].shape == (4, bitpack.packed_length(50, bits))
    back = QuantLinear.from_gptq(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["bias"],
                                 bits=bits, group_size=32, checkpoint_format=fmt, g_idx=tensors["g_idx"])
    for name in ("qweight", "scales", "zeros", "bias"):
        assert torch.equal(getattr(back, name), getattr(layer, name)), name
    again = back.to_gptq(fmt)
    for name, t in tensors.items():
        assert torch.equal(again[name], t), name


def test_gptq_v1_stores_zero_minus_one():
    layer = QuantLinear(32, 8, bits=4, group_size=32)
    with torch.no_grad():
        layer.zeros.copy_(torch.tensor([[0, 1, 2, 3, 8, 13, 14, 15]], dtype=layer.zeros.dtype))
    v1 = bitpack.unpack_bits(layer.to_gptq("gptq")["qzeros"], 4, 8, 1)
    v2 = bitpack.unpack_bits(layer.to_gptq("gptq_v2")["qzeros"], 4, 8, 1)
    assert v2.tolist() == [[0, 1, 2, 3, 8, 13, 14, 15]]
    assert v1.tolist() == [[15, 0, 1, 2, 7, 12, 13, 14]]


def test_efficientqat_3bit_packs_ten_per_word():
    q = torch.randint(0, 8, (64, 4), dtype=torch.int32)
    layer = QuantLinear.from_gptq(bitpack.pack_bits(q, 3, 0), bitpack.pack_bits(torch.zeros(2, 4, dtype=torch.int32), 3, 1),
                                  torch.ones(2, 4, dtype=torch.float16), bits=3, group_size=32)
    assert layer.qweight.shape == (7, 4)  # ceil(64 / 10)
    torch.testing.assert_close(layer.dequantize().float(), q.t().float())


def test_quantize_and_load_checkpoint(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32), nn.ReLU(), nn.Linear(32, 10))
    x = torch.randn(4, 64)
    rtn.quantize_(model, rtn.QuantConfig(bits=4, group_size=32), filter_fn=lambda m, name: name != "4")
    assert isinstance(model[0], QuantLinear) and isinstance(model[2], QuantLinear)
    assert isinstance(model[4], nn.Linear) and not isinstance(model[4], QuantLinear)
    y = model(x)
    state = {}
    for name in ("0", "2"):
        state.update({f"{name}.{k}": v for k, v in model.get_submodule(name).to_gptq().items()})
    state.update({"4.weight": model[4].weight.detach(), "4.bias": model[4].bias.detach()})
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "quantize_config.json").write_text('{"bits": 4, "group_size": 32}')
    fresh = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32), nn.ReLU(), nn.Linear(32, 10))
    gptq.load_gptq_checkpoint(fresh, str(tmp_path))
    assert isinstance(fresh[0], QuantLinear)
    torch.testing.assert_close(fresh(x), y)


def test_checkpoint_errors():
    layer = QuantLinear.from_linear(nn.Linear(64, 16), bits=2, group_size=32)
    state = {f"0.{k}": v for k, v in layer.to_gptq().items()}
    model = nn.Sequential(nn.Linear(64, 16))
    missing = {k: v for k, v in state.items() if not k.endswith("qzeros")}
    with pytest.raises(KeyError, match="missing 0.qzeros"):
        gptq.load_gptq_checkpoint(model, missing, bits=2, group_size=32)
    with pytest.raises(ValueError, match="qweight shape"):
        gptq.load_gptq_checkpoint(model, state, bits=4, group_size=32)
    with pytest.raises(ValueError, match="32->16 in the model but 64->16 in the checkpoint"):
        gptq.load_gptq_checkpoint(nn.Sequential(nn.Linear(32, 16)), state, bits=2, group_size=32)


def test_checkpoint_bias_shape_names_the_layer():
    """issue 17: a [1] bias was broadcast to every output by copy_; a [out + 1] one failed in copy_ naming neither the
    tensor nor the layer."""
    t = QuantLinear.from_linear(nn.Linear(64, 16), bits=2, group_size=32).to_gptq()
    for bad in (torch.zeros(1), torch.zeros(17), torch.zeros(16, 1), torch.zeros(16, dtype=torch.int32)):
        with pytest.raises(ValueError, match=r"from_gptq: bias must be a floating \[out_features\] = \[16\]"):
            QuantLinear.from_gptq(t["qweight"], t["qzeros"], t["scales"], bad, bits=2, group_size=32)
        state = {f"blk.proj.{k}": v for k, v in {**t, "bias": bad}.items()}
        model = nn.Sequential()
        model.add_module("blk", nn.Module())
        model.blk.proj = nn.Linear(64, 16)
        with pytest.raises(ValueError, match=r"layer 'blk.proj': from_gptq: bias must be a floating \[out_features\]"):
            gptq.load_gptq_checkpoint(model, state, bits=2, group_size=32)


def test_malformed_safetensors_names_the_file(tmp_path):
    """issue 17: the library's SafetensorError named neither the checkpoint file nor the loader."""
    from safetensors.torch import save_file

    from blockops.checkpoint import load_safetensors, safetensors_keys

    layer = QuantLinear.from_linear(nn.Linear(64, 16), bits=2, group_size=32)
    good = tmp_path / "good" / "model.safetensors"
    good.parent.mkdir()
    save_file({f"0.{k}": v.contiguous() for k, v in layer.to_gptq().items()}, str(good))
    data = good.read_bytes()
    for name, blob in [("truncated", data[:-7]), ("empty", b""), ("header", data[:8] + b"{oops" + data[13:])]:
        folder = tmp_path / name
        folder.mkdir()
        bad = folder / "model-00002.safetensors"
        bad.write_bytes(blob)
        (folder / "model-00001.safetensors").write_bytes(data)
        file_match = rf"checkpoint file {re.escape(str(bad))} is not a readable \.safetensors file"
        for source in (str(bad), str(folder)):
            with pytest.raises(ValueError, match=rf"load_gptq_checkpoint: {file_match}"):
                gptq.load_gptq_checkpoint(nn.Sequential(nn.Linear(64, 16)), source, bits=2, group_size=32)
        with pytest.raises(ValueError, match=rf"who: {file_match}"):
            load_safetensors(str(bad), "who")
        with pytest.raises(ValueError, match=rf"who: {file_match}"):
            safetensors_keys(str(bad), "who")
    assert safetensors_keys(str(good), "who") == {f"0.{k}" for k in layer.to_gptq()}


def test_module_errors():
    with pytest.raises(ValueError, match="not divisible by group_size"):
        QuantLinear.from_linear(nn.Linear(100, 8), bits=2, group_size=64)
    with pytest.raises(ValueError, match="bits must be 2, 3 or 4"):
        QuantLinear(64, 8, bits=5)
    with pytest.raises(ValueError, match="multiple of 16"):
        QuantLinear(64, 8, group_size=24)
    with pytest.raises(ValueError, match="not divisible"):
        rtn.quantize_(nn.Sequential(nn.Linear(100, 8)), rtn.QuantConfig(2, 64))
    layer = QuantLinear(64, 8, bits=2, group_size=32)
    with torch.no_grad():
        layer.zeros.fill_(0.5)
    with pytest.raises(ValueError, match="zero points must be integers"):
        layer.to_gptq()
    with pytest.raises(ValueError, match="act-order"):
        t = QuantLinear(64, 8, bits=2, group_size=32).to_gptq()
        QuantLinear.from_gptq(t["qweight"], t["qzeros"], t["scales"], bits=2, group_size=32,
                              g_idx=torch.zeros(64, dtype=torch.int32))


@pytest.mark.parametrize("device", DEVICES)
def test_op_errors_name_the_problem(device):
    qweight, scales, zeros = random_weight(128, 16, 2, 64, torch.float16, device)
    x = torch.randn(2, 128, device=device)
    with pytest.raises(RuntimeError, match="bits must be 2, 3 or 4"):
        lowbit.quant_linear(x, qweight, scales, zeros, 5, 64)
    with pytest.raises(RuntimeError, match="group_size must be a positive multiple of 16"):
        lowbit.quant_linear(x, qweight, scales, zeros, 2, 40)
    with pytest.raises(RuntimeError, match="needs 8 packed rows"):
        lowbit.quant_linear(x, qweight[:7].contiguous(), scales, zeros, 2, 64)
    with pytest.raises(RuntimeError, match="must have 128 features"):
        lowbit.quant_linear(torch.randn(2, 127, device=device), qweight, scales, zeros, 2, 64)
    with pytest.raises(RuntimeError, match="x must have dtype in"):
        lowbit.quant_linear(x.int(), qweight, scales, zeros, 2, 64)
    with pytest.raises(RuntimeError, match="qweight must have dtype in"):
        lowbit.quant_linear(x, qweight.long(), scales, zeros, 2, 64)
    with pytest.raises(RuntimeError, match="zeros must have the scales' dtype"):
        lowbit.quant_linear(x, qweight, scales, zeros.float(), 2, 64)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        lowbit.quant_linear(torch.randn(128, 2, device=device).t(), qweight, scales, zeros, 2, 64)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        lowbit.quant_linear(x, qweight, scales, zeros, 2, 64, torch.zeros(15, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_int_arguments_beyond_int32_are_refused(device):
    """issue 17: group_size was narrowed to int in the checks, so 2**32 + 64 was read as 64."""
    qweight, scales, zeros = random_weight(128, 16, 2, 64, torch.float16, device)
    x = torch.randn(2, 128, device=device)
    empty = [t[:0].contiguous() for t in (qweight, scales, zeros)]  # in = 0 * group_size: no size check trips
    for group_size in (2**32 + 64, 2**62):
        with pytest.raises(RuntimeError, match=rf"group_size must be in \[16, 2147483647\], got {group_size}"):
            lowbit.quant_linear(x, qweight, scales, zeros, 2, group_size)
        with pytest.raises(RuntimeError, match=rf"group_size must be in \[16, 2147483647\], got {group_size}"):
            torch.ops.blockops.quant_linear(x[:, :0], *empty, 2, group_size)
        with pytest.raises(RuntimeError, match=rf"group_size must be in \[16, 2147483647\], got {group_size}"):
            lowbit.quant_dequantize(*empty, 2, group_size)
        with pytest.raises(RuntimeError, match=rf"group_size must be in \[16, 2147483647\], got {group_size}"):
            with torch._subclasses.fake_tensor.FakeTensorMode() as mode:   # the fake (torch.compile) agrees
                lowbit.quant_linear(mode.from_tensor(x), *(mode.from_tensor(t) for t in (qweight, scales, zeros)), 2,
                                    group_size)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [False, True])
def test_in_features_zero_gives_the_bias(device, bias):
    """issue 17: with in_features == 0, x @ W^T is all zeros and F.linear returns the bias; quant_linear returned
    zeros. Backward: no gradient reaches x (empty), scales and zeros (empty); bias gets grad_out summed."""
    qweight = torch.zeros(0, 12, dtype=torch.int32, device=device)
    scales = torch.ones(0, 12, device=device, requires_grad=True)
    zeros = torch.zeros(0, 12, device=device, requires_grad=True)
    b = torch.randn(12, device=device, requires_grad=True) if bias else None
    for shape in [(3, 0), (2, 5, 0), (0, 0)]:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.zeros(shape, device=device, dtype=dtype, requires_grad=True)
            y = lowbit.quant_linear(x, qweight, scales, zeros, 2, 32, b)
            want = torch.nn.functional.linear(x, torch.zeros(12, 0, device=device, dtype=dtype),
                                              None if b is None else b.to(dtype))
            assert y.shape == want.shape and y.dtype == dtype
            torch.testing.assert_close(y, want, rtol=0, atol=0)
            gy = torch.randn(y.shape, device=device).to(dtype)
            inputs = (x, scales, zeros) + ((b,) if bias else ())
            grads = torch.autograd.grad(y, inputs, gy)
            assert [g.shape for g in grads[:3]] == [x.shape, scales.shape, zeros.shape]
            if bias:
                torch.testing.assert_close(grads[3], gy.float().reshape(-1, 12).sum(0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for a second device")
def test_mixed_devices_are_an_error():
    qweight, scales, zeros = random_weight(128, 16, 2, 64, torch.float16, "cuda")
    with pytest.raises(RuntimeError, match="x is on cpu but qweight is on cuda"):
        lowbit.quant_linear(torch.randn(2, 128), qweight, scales, zeros, 2, 64)


# ---- registration, tracing, compile ---------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    qweight, scales, zeros = random_weight(128, 24, 3, 32, torch.float32, device)
    bias = torch.randn(24, device=device)
    for rows in (2, 12, 70):
        x = torch.randn(rows, 128, device=device)
        opcheck(torch.ops.blockops.quant_linear.default, (x, qweight, scales, zeros, 3, 32, bias))
        opcheck(torch.ops.blockops.quant_linear.default,
                (x.requires_grad_(), qweight, scales.clone().requires_grad_(), zeros, 3, 32, None))
    opcheck(torch.ops.blockops.quant_dequantize.default, (qweight, scales, zeros, 3, 32))
    opcheck(torch.ops.blockops.quant_linear_grad_input.default,
            (torch.randn(3, 24, device=device), qweight, scales, zeros, 3, 32))
    opcheck(torch.ops.blockops.quant_grad_scales.default, (torch.randn(24, 128, device=device), qweight, zeros, 3, 32))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_model_with_quant_linear(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 32)).to(device)
    rtn.quantize_(model, rtn.QuantConfig(bits=2, group_size=32, dtype=torch.float32))
    x = torch.randn(3, 64, device=device)
    assert_compiles(model, x)


def test_e2e_qp_style_training_updates_only_scales():
    torch.manual_seed(0)
    teacher = nn.Linear(64, 32)
    layer = QuantLinear.from_linear(teacher, bits=2, group_size=32, dtype=torch.float32)
    layer.bias.requires_grad_(False)
    qweight_before, zeros_before = layer.qweight.clone(), layer.zeros.clone()
    opt = torch.optim.AdamW([layer.scales], lr=1e-3)
    x = torch.randn(64, 64)
    losses = []
    for _ in range(30):
        loss = (layer(x) - teacher(x).detach()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.equal(layer.qweight, qweight_before) and torch.equal(layer.zeros, zeros_before)


@pytest.mark.skipif("vnni" not in blockops.build_info()["cpu_families"]["lowbit"], reason="needs AVX512-VNNI")
def test_two_bit_byte_kernel_equals_the_int16_kernel(tmp_path):
    """One row, 2-bit, groups up to 128 on AVX2 without VNNI: the byte kernel (maddubs on codes and the int8 halves of
    x16) must give exactly the int16 kernel's sums, so the output is bitwise what the VNNI path computes."""
    code = (
        "import sys, torch, blockops\n"
        "from blockops.ops import bitpack, lowbit\n"
        "torch.manual_seed(0)\n"
        "outs = []\n"
        "for i, o, gs in [(4096, 300, 64), (1024, 48, 128), (512, 33, 32), (2048, 16, 16)]:\n"
        "    qw = bitpack.pack_bits(torch.randint(0, 4, (i, o), dtype=torch.int32), 2, 0)\n"
        "    s, z = torch.rand(i // gs, o).half(), (torch.rand(i // gs, o) * 3).half()\n"
        "    x = torch.randn(1, i) * 10\n"
        "    x[0, 5] = 1e4\n"                                   # one group's step set by an outlier
        "    outs.append(lowbit.quant_linear(x, qw, s, z, 2, gs))\n"
        "torch.save(outs, sys.argv[1])\n"
    )
    run_with_cpu_isa("avx2", code, str(tmp_path / "avx2.pt"))
    run_with_cpu_isa("native", code, str(tmp_path / "native.pt"))   # "native": any other value caps nothing
    for a, b in zip(torch.load(tmp_path / "avx2.pt"), torch.load(tmp_path / "native.pt")):
        assert torch.equal(a, b)


@pytest.mark.parametrize("isa", ["portable", "avx2"])
def test_every_cpu_code_path_matches(isa):
    """BLOCKOPS_CPU_ISA forces the portable kernels, or stops at AVX2 (no AVX512-VNNI): each path on its own
    must match the reference, for the fixed-point decode kernel (groups up to 1024; 3-bit packed rows of 10
    inputs straddling groups of 32), the fp32 one (groups of 2048) and a partial last tile of columns."""

    code = (
        "import torch, blockops\n"
        "from blockops.ops import bitpack, lowbit\n"
        "from blockops.reference import ref_quant_linear\n"
        f"assert blockops.build_info()['cpu_families']['lowbit'] == ({isa!r} if {isa!r} == 'portable' else 'avx2+fma')\n"
        "for bits in (2, 3, 4):\n"
        "    q = torch.randint(0, 2**bits, (320, 300), dtype=torch.int32)\n"
        "    qw = bitpack.pack_bits(q, bits, 0); s = torch.rand(10, 300); z = torch.rand(10, 300) * 3\n"
        "    for rows in (1, 6, 7, 64, 130):\n"  # the decode kernel; passes of the batched one: 4 + 2, 4 + 3, 16 x 4, ...
        "        x = torch.randn(rows, 320)\n"
        "        y = lowbit.quant_linear(x, qw, s, z, bits, 32)\n"
        "        ref = ref_quant_linear(x, qw, s, z, bits, 32)\n"
        "        assert ((y - ref).abs().mean() / ref.abs().mean()) < 2e-4, (bits, rows)\n"
        "        assert ((y - ref).abs().max() / ref.abs().max()) < 1e-4, (bits, rows)\n"
        "    q = torch.randint(0, 2**bits, (1024, 300), dtype=torch.int32)\n"  # long groups: split-K row blocks
        "    qw = bitpack.pack_bits(q, bits, 0); s = torch.rand(2, 300); z = torch.rand(2, 300) * 3\n"
        "    for rows in (1, 5):\n"
        "        x = torch.randn(rows, 1024)\n"
        "        y = lowbit.quant_linear(x, qw, s, z, bits, 512)\n"
        "        ref = ref_quant_linear(x, qw, s, z, bits, 512)\n"
        "        assert ((y - ref).abs().max() / ref.abs().max()) < 1e-4, (bits, rows, 'groups of 512')\n"
        "    q = torch.randint(0, 2**bits, (4096, 40), dtype=torch.int32)\n"
        "    qw = bitpack.pack_bits(q, bits, 0); s = torch.rand(2, 40); z = torch.rand(2, 40) * 3\n"
        "    for rows in (1, 6):\n"
        "        x = torch.randn(rows, 4096)\n"
        "        y = lowbit.quant_linear(x, qw, s, z, bits, 2048)\n"
        "        ref = ref_quant_linear(x, qw, s, z, bits, 2048)\n"
        "        assert ((y - ref).abs().max() / ref.abs().max()) < 1e-5, (bits, rows, 'fp32 kernel')\n"
    )
    run_with_cpu_isa(isa, code)


def test_batched_bf16_multiplies_in_fp32_without_bf16_dot_products():
    """On a CPU without native bf16 dot products (BLOCKOPS_CPU_ISA=avx2 says so, as an AVX2-only CPU would) the
    batched path multiplies bf16 activations in fp32, since ATen's bf16 GEMM is emulated there and up to 20x
    slower: the result is exactly the fp32 path's, rounded to bf16 once."""
    code = (
        "import torch, blockops\n"
        "from blockops.ops import bitpack, lowbit\n"
        "assert blockops.build_info()['cpu_bf16_gemm'] is False\n"
        "qw = bitpack.pack_bits(torch.randint(0, 4, (256, 96), dtype=torch.int32), 2, 0)\n"
        "s = torch.rand(4, 96) * 0.1; z = torch.rand(4, 96) * 3\n"
        "x = torch.randn(80, 256).bfloat16()\n"           # 80 rows: where a bf16-GEMM CPU takes the bf16 blocks
        "y = lowbit.quant_linear(x, qw, s, z, 2, 64)\n"
        "assert torch.equal(y, lowbit.quant_linear(x.float(), qw, s, z, 2, 64).bfloat16())\n"
    )
    run_with_cpu_isa("avx2", code)
