"""Bit packing benchmark: blockops.pack_bits / unpack_bits against the pure-PyTorch reference (shifts and
sums on int64, what one writes without the op) on weight-sized tensors. GB/s counts bytes read + written
by blockops' kernel; these ops are memory-bound, so that is the figure to compare with the bandwidth.

Error check: the ops are bit-exact. ``max_error`` is ``max |ours - reference|`` over the int32 words (pack_bits,
against ``ref_pack_bits``) or over the unpacked values (unpack_bits of the reference's words, against the original
values), so any wrong bit shows as an error of at least 1; tolerance 0."""
from __future__ import annotations

import dataclasses

import torch

import blockops
from blockops.bench.harness import Result, max_abs_error, time_ms
from blockops.reference import ref_pack_bits, ref_unpack_bits

# The torch.ops.blockops ops this family's rows run (backward kernels included).
OPS = ("pack_bits", "unpack_bits")


@dataclasses.dataclass(frozen=True)
class Config:
    rows: int   # packed dim length (input channels of a weight)
    cols: int
    bits: int
    dim: int    # 0: GPTQ qweight layout (pack along input channels of [in, out]); 1: along the last dim


QUICK = [Config(4096, 4096, 2, 0), Config(4096, 4096, 3, 0), Config(4096, 4096, 4, 1)]
FULL = QUICK + [Config(11008, 4096, 2, 0), Config(4096, 11008, 4, 0), Config(4096, 14336, 2, 1)]


def run(device: str, quick: bool = True, configs: list[Config] | None = None) -> list[Result]:
    """Rows of the quick or full list, or of `configs` when given."""
    results = []
    for c in configs if configs is not None else QUICK if quick else FULL:
        g = torch.Generator().manual_seed(0)
        values = torch.randint(0, 2**c.bits, (c.rows, c.cols), generator=g, dtype=torch.uint8).to(device)
        packed, ref_packed = blockops.pack_bits(values, c.bits, c.dim), ref_pack_bits(values, c.bits, c.dim)
        pack_error = max_abs_error(packed, ref_packed)
        unpack_error = max_abs_error(blockops.unpack_bits(ref_packed, c.bits, values.shape[c.dim], c.dim), values)
        moved = values.numel() + packed.numel() * 4
        shape = f"{c.rows}x{c.cols}"
        ours = time_ms(lambda: blockops.pack_bits(values, c.bits, c.dim), device)
        base = time_ms(lambda: ref_pack_bits(values, c.bits, c.dim), device)
        results.append(Result("bitpack", f"pack_bits {c.bits}b dim{c.dim}", shape, device, ours,
                              "torch shifts+sum", base, bytes_moved=moved, max_error=pack_error, tolerance=0.0))
        ours = time_ms(lambda: blockops.unpack_bits(packed, c.bits, values.shape[c.dim], c.dim), device)
        base = time_ms(lambda: ref_unpack_bits(packed, c.bits, values.shape[c.dim], c.dim), device)
        results.append(Result("bitpack", f"unpack_bits {c.bits}b dim{c.dim}", shape, device, ours,
                              "torch shifts+mask", base, bytes_moved=moved, max_error=unpack_error, tolerance=0.0))
    return results
