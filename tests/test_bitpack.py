"""pack_bits / unpack_bits: reference comparisons, layout facts, error paths, opcheck, torch.compile."""

import pytest
import torch
from helpers import DEVICES, assert_compiles, kernel_ran, opcheck, run_with_cpu_isa

import blockops
from blockops.ops import bitpack
from blockops.reference import ref_pack_bits, ref_unpack_bits

ALL_BITS = list(range(1, 9))
SHAPES_AND_DIMS = [((97,), 0), ((5, 1025), -1), ((33, 7), 0), ((3, 31, 17), 1), ((2, 3, 4, 5), 2), ((1,), -1)]


def random_values(shape, bits, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**bits, shape, generator=g, dtype=torch.int64).to(dtype).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("shape,dim", SHAPES_AND_DIMS)
def test_pack_unpack_match_reference(device, bits, shape, dim):
    values = random_values(shape, bits, torch.uint8, device, seed=bits)
    with kernel_ran("pack_bits", device):
        packed = bitpack.pack_bits(values, bits, dim)
    torch.testing.assert_close(packed, ref_pack_bits(values, bits, dim), rtol=0, atol=0)
    with kernel_ran("unpack_bits", device):
        unpacked = bitpack.unpack_bits(packed, bits, shape[dim], dim)
    torch.testing.assert_close(unpacked, values, rtol=0, atol=0)
    torch.testing.assert_close(unpacked, ref_unpack_bits(packed, bits, shape[dim], dim), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_every_input_dtype(device, dtype):
    values = random_values((6, 50), 4, dtype, device)
    packed = bitpack.pack_bits(values, 4, 1)
    torch.testing.assert_close(packed, ref_pack_bits(values, 4, 1), rtol=0, atol=0)


def test_layout_is_lsb_first_gptq():
    # 2 bits, 16 per word: value j sits at bits [2j, 2j+2). Values 0,1,2,3 repeated -> 0b11100100 per nibble.
    values = torch.tensor([0, 1, 2, 3] * 4, dtype=torch.int32)
    assert bitpack.pack_bits(values, 2).item() == int("11100100" * 4, 2) - 2**32
    # 3 bits (EfficientQAT): 10 per word, high 2 bits unused; 11 values need 2 words, the second holds v[10].
    values = torch.arange(11, dtype=torch.int32) % 8
    packed = bitpack.pack_bits(values, 3)
    assert packed.shape == (2,)
    assert packed[0].item() == sum((j % 8) << (3 * j) for j in range(10))
    assert packed[1].item() == 10 % 8
    # GPTQ's qweight: integer weights [in, out] packed along dim 0 (input channels).
    w = random_values((64, 5), 4, torch.int32, "cpu")
    qweight = bitpack.pack_bits(w, 4, 0)
    assert qweight.shape == (8, 5)
    assert ((qweight[1, 3] >> 8) & 0xF).item() == w[8 + 2, 3].item()


@pytest.mark.parametrize("device", DEVICES)
def test_large_values_use_bit_31(device):
    values = torch.full((16,), 3, dtype=torch.uint8, device=device)
    packed = bitpack.pack_bits(values, 2)
    assert packed.item() == -1  # all 32 bits set
    assert bitpack.unpack_bits(packed, 2, 16).eq(3).all()


@pytest.mark.parametrize("device", DEVICES)
def test_unpack_ignores_padding_bits(device):
    packed = torch.tensor([-1], dtype=torch.int32, device=device)  # garbage in the 2 unused bits and beyond
    out = bitpack.unpack_bits(packed, 3, 4)
    assert out.tolist() == [7, 7, 7, 7]


@pytest.mark.parametrize("device", DEVICES)
def test_empty_tensors(device):
    values = torch.empty((3, 0), dtype=torch.uint8, device=device)
    packed = bitpack.pack_bits(values, 2, -1)
    assert packed.shape == (3, 0)
    assert bitpack.unpack_bits(packed, 2, 0, -1).shape == (3, 0)
    assert bitpack.pack_bits(torch.empty((0, 8), dtype=torch.uint8, device=device), 2, 1).shape == (0, 1)


# ---- error paths ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad_value", [-1, 4, 255])
def test_out_of_range_values_are_an_error(device, bad_value):
    values = torch.zeros(40, dtype=torch.int16, device=device)
    values[17] = bad_value
    with pytest.raises(RuntimeError, match=r"values must lie in \[0, 3\] for bits=2"):
        bitpack.pack_bits(values, 2)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_arguments_give_clear_errors(device):
    v = torch.zeros((4, 8), dtype=torch.uint8, device=device)
    with pytest.raises(RuntimeError, match="bits must be in"):
        bitpack.pack_bits(v, 0)
    with pytest.raises(RuntimeError, match="bits must be in"):
        bitpack.pack_bits(v, 9)
    with pytest.raises(RuntimeError, match="must have dtype in"):
        bitpack.pack_bits(v.float(), 2)
    with pytest.raises(RuntimeError, match="dim 2 is out of range"):
        bitpack.pack_bits(v, 2, 2)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        bitpack.pack_bits(v.t(), 2)
    with pytest.raises(RuntimeError, match="at least 1 dimension"):
        bitpack.pack_bits(torch.tensor(1, dtype=torch.uint8, device=device), 2)
    packed = bitpack.pack_bits(v, 2, 1)
    with pytest.raises(RuntimeError, match="need 2 words"):
        bitpack.unpack_bits(packed, 2, 17, 1)
    with pytest.raises(RuntimeError, match="packed must have dtype"):
        bitpack.unpack_bits(packed.long(), 2, 8, 1)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        bitpack.unpack_bits(torch.zeros((3, 4), dtype=torch.int32, device=device).t(), 2, 16, 1)


def test_unsupported_layout_names_the_backend():
    sparse = torch.zeros((4, 8), dtype=torch.uint8).to_sparse()
    with pytest.raises(NotImplementedError, match="SparseCPU"):
        bitpack.pack_bits(sparse, 2)


# ---- registration, tracing, compile ---------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    values = random_values((7, 45), 3, torch.uint8, device)
    opcheck(torch.ops.blockops.pack_bits.default, (values, 3, 1))
    opcheck(torch.ops.blockops.pack_bits.default, (values.to(torch.int32), 3, 0))
    packed = bitpack.pack_bits(values, 3, 1)
    opcheck(torch.ops.blockops.unpack_bits.default, (packed, 3, 45, 1))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    values = random_values((9, 70), 2, torch.uint8, device)

    def roundtrip(v):
        return bitpack.unpack_bits(bitpack.pack_bits(v, 2, 1) + 0, 2, v.shape[1], 1)

    out = assert_compiles(roundtrip, values)
    torch.testing.assert_close(out, values, rtol=0, atol=0)


def test_both_registrations_present():
    dump = torch._C._dispatch_dump("blockops::pack_bits")
    assert "CPU: registered at" in dump and "bitpack_cpu.cpp" in dump
    if blockops.build_info()["cuda_compiled"]:
        assert "CUDA: registered at" in dump and "bitpack_cuda.cpp" in dump


def test_portable_cpu_path_matches():
    """The non-AVX2 code path (forced through BLOCKOPS_CPU_ISA=portable) gives the same words."""
    code = (
        "import torch, blockops\n"
        "from blockops.ops import bitpack\n"
        "from blockops.reference import ref_pack_bits\n"
        "assert blockops.build_info()['cpu_families']['bitpack'] == 'portable'\n"
        "v = torch.randint(0, 8, (33, 300), dtype=torch.uint8)\n"
        "for dim in (0, 1):\n"
        "    p = bitpack.pack_bits(v, 3, dim)\n"
        "    assert torch.equal(p, ref_pack_bits(v, 3, dim))\n"
        "    assert torch.equal(bitpack.unpack_bits(p, 3, v.shape[dim], dim), v)\n"
    )
    run_with_cpu_isa("portable", code)
