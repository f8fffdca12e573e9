"""Bit packing (family "bitpack"): typed wrappers and fake (meta) implementations of ``pack_bits`` /
``unpack_bits``, and the packed layout's word arithmetic (``values_per_word``, ``packed_length``).

The schemas live in csrc/ops.cpp; the CPU and CUDA kernels register themselves from the C++ library. Each
wrapper's docstring gives every argument's dtype, shape and layout. Fake implementations only check what
the shapes alone can tell and allocate the output, so the ops trace under torch.compile and FakeTensor.
"""
from __future__ import annotations

import torch

_ops = torch.ops.blockops

_PACKABLE_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def values_per_word(bits: int) -> int:
    """How many `bits`-bit values one int32 word holds (3 bits: 10, the two high bits unused)."""
    return 32 // bits


def packed_length(length, bits: int):
    """Words needed along the packed dim for `length` values of `bits` bits."""
    per = values_per_word(bits)
    return (length + per - 1) // per


def pack_bits(values: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Pack small unsigned integers into int32 words, LSB-first, along `dim`.

    Args:
        values: uint8, int8, int16, int32 or int64, any shape, contiguous; every value in [0, 2**bits).
        bits: 1..8.
        dim: the dimension to pack along (negative counts from the end).

    Returns:
        int32 tensor, same shape except ``ceil(n / p)`` along ``dim`` where ``p = 32 // bits``. Value ``j``
        of a lane is stored in word ``j // p`` at bits ``[bits * (j % p), bits * (j % p) + bits)``; the
        last word is zero-padded. Packing ``[in, out]`` integer weights along dim 0 gives GPTQ's
        ``qweight`` (EfficientQAT's 10-per-word layout for 3 bits).

    Raises:
        RuntimeError naming the problem for out-of-range values, bad bits/dim/dtype or a non-contiguous input.
    """
    return _ops.pack_bits(values, bits, dim)


def unpack_bits(packed: torch.Tensor, bits: int, size: int, dim: int = -1) -> torch.Tensor:
    """Inverse of :func:`pack_bits`.

    Args:
        packed: int32, contiguous, as produced by ``pack_bits(values, bits, dim)``.
        bits: 1..8, as used for packing.
        size: the unpacked length along ``dim``; ``ceil(size / (32 // bits))`` must equal ``packed.shape[dim]``.
        dim: the packed dimension.

    Returns:
        uint8 tensor with ``size`` along ``dim``. Padding bits are ignored.
    """
    return _ops.unpack_bits(packed, bits, size, dim)


def _check_bits(bits: int, op: str) -> None:
    torch._check(1 <= bits <= 8, lambda: f"{op}: bits must be in [1, 8], got {bits}")


def _wrap_dim(dim: int, ndim: int, op: str) -> int:
    torch._check(-ndim <= dim < ndim, lambda: f"{op}: dim {dim} is out of range for {ndim} dimension(s)")
    return dim % ndim


@torch.library.register_fake("blockops::pack_bits")
def _pack_bits_fake(values, bits, dim=-1):
    op = "blockops.pack_bits"
    _check_bits(bits, op)
    torch._check(values.dtype in _PACKABLE_DTYPES, lambda: f"{op}: unsupported dtype {values.dtype}")
    torch._check(values.dim() >= 1, lambda: f"{op}: values must have at least 1 dimension")
    dim = _wrap_dim(dim, values.dim(), op)
    shape = list(values.shape)
    shape[dim] = packed_length(shape[dim], bits)
    return values.new_empty(shape, dtype=torch.int32)


@torch.library.register_fake("blockops::unpack_bits")
def _unpack_bits_fake(packed, bits, size, dim=-1):
    op = "blockops.unpack_bits"
    _check_bits(bits, op)
    torch._check(packed.dtype == torch.int32, lambda: f"{op}: packed must be int32, got {packed.dtype}")
    torch._check(packed.dim() >= 1, lambda: f"{op}: packed must have at least 1 dimension")
    dim = _wrap_dim(dim, packed.dim(), op)
    torch._check(
        packed_length(size, bits) == packed.shape[dim],
        lambda: f"{op}: {size} values of {bits} bits do not fit the packed length {packed.shape[dim]}",
    )
    shape = list(packed.shape)
    shape[dim] = size
    return packed.new_empty(shape, dtype=torch.uint8)

__all__ = ["pack_bits", "packed_length", "unpack_bits", "values_per_word"]
