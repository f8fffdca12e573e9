"""1.61-bit GEMM benchmark: blockops.ptq161.ptq161_linear (PTQ1.61 weights, 20% salient channels at 4 bits, the
rest binarized) on the lowbit family's Llama layer shapes against, in the same run, F.linear with dense weights
(fp32 and bf16 on CPU, fp16 cuBLAS on GPU) and blockops' own 2-bit kernel (quant_linear w2g64). fp32 activations,
fp16 factors. GB/s counts the packed weight bytes of the format (codes, signs, perm, factors) per call.

Error check: ``max |y - ref| / max |ref|`` with ``ref = ref_ptq161_linear`` (the packed format dequantized in fp32,
fp32 matmul) on the same inputs. Tolerance: the low-bit family's (``blockops.bench.lowbit.tolerance``), 2e-4 for
these fp32 outputs: the salient 4-bit channels run through the low-bit decode kernel, whose 16-bit fixed-point
activations give about 3e-5 of max |y| (measured); the binary part is fp32. A 1% error in y fails every row."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from blockops import ops, ptq161
from blockops.bench.harness import Result, max_rel_error, time_ms
from blockops.bench.lowbit import _LLAMA
from blockops.bench.lowbit import Config as LowbitConfig
from blockops.bench.lowbit import _weights as lowbit_weights
from blockops.bench.lowbit import tolerance as lowbit_tolerance
from blockops.reference import ref_ptq161_linear


@dataclasses.dataclass(frozen=True)
class Config:
    in_features: int
    out_features: int
    rows: int
    salient_ratio: float = 0.2


QUICK_CPU = [Config(4096, 11008, 1), Config(4096, 11008, 4), Config(4096, 4096, 64)]
FULL_CPU = [Config(i, o, m) for i, o in _LLAMA for m in (1, 4, 16, 64)] + [Config(4096, 4096, 512)]


def packed_weights(c: Config, device: str, factor_dtype=torch.float16) -> tuple[dict, int]:
    """Random packed tensors of the format (every code and sign bit random, no sign(0) entries)."""
    g = torch.Generator().manual_seed(0)
    s = ptq161.salient_count(c.in_features, c.salient_ratio)
    n = c.in_features - s
    words = lambda rows: torch.randint(-2**31, 2**31, (rows, c.out_features), generator=g, dtype=torch.int64)
    t = {
        "perm": torch.randperm(c.in_features, generator=g).to(torch.int32),
        "qsalient": words(ptq161.salient_padded(s) // 8).to(torch.int32),
        "salient_scale": torch.rand(c.out_features, generator=g) * 0.01 + 0.001,
        "salient_zero": torch.randint(0, 16, (c.out_features,), generator=g).float(),
        "signs": words(-(-n // 32)).to(torch.int32),
        "zero_signs": torch.zeros(0, dtype=torch.int64),
        "alpha": torch.rand(c.out_features, generator=g) * 0.02,
        "mu": torch.randn(c.out_features, generator=g) * 1e-3,
        "r1": torch.rand(c.out_features, generator=g) + 0.5,
        "r2": torch.rand(c.in_features, generator=g) + 0.5,
    }
    return {k: v.to(device=device, dtype=factor_dtype if v.is_floating_point() else v.dtype) for k, v in t.items()}, s


QUICK_CUDA = [Config(4096, 14336, 1), Config(4096, 14336, 8), Config(8192, 28672, 1)]
FULL_CUDA = [Config(i, o, m) for i, o in _LLAMA + [(8192, 28672)] for m in (1, 4, 8, 16, 64)]


def tolerance(dtype: torch.dtype) -> float:
    """Largest acceptable max |y - ref| / max |ref| (see the module docstring): the low-bit family's."""
    return lowbit_tolerance(dtype)


def run(device: str, quick: bool = True) -> list[Result]:
    cuda = torch.device(device).type == "cuda"
    configs = (QUICK_CUDA if quick else FULL_CUDA) if cuda else (QUICK_CPU if quick else FULL_CPU)
    results = []
    for c in configs:
        tensors, s = packed_weights(c, device)
        args = [tensors[k] for k in ptq161.FIELDS]
        x = torch.randn(c.rows, c.in_features, device=device)
        y = ptq161.ptq161_linear(x, *args, s)
        ref = ref_ptq161_linear(x, *args, s)  # the reference's dense fp32 weight: the largest shapes need ~1 GB
        err, tol = max_rel_error(y, ref), tolerance(y.dtype)
        weight_bytes = ptq161.bits_per_weight(tensors) * c.in_features * c.out_features / 8
        flops = 2.0 * c.rows * c.in_features * c.out_features
        ours = time_ms(lambda: ptq161.ptq161_linear(x, *args, s), device)
        shape = f"{c.in_features}x{c.out_features} M={c.rows}"
        op = f"ptq161_linear {ptq161.bits_per_weight(tensors):.3f} bit"

        def row(name, base_ms):
            results.append(Result("ptq161", op, shape, device, ours, name, base_ms, bytes_moved=weight_bytes,
                                  flops=flops, max_error=err, tolerance=tol))

        for dtype in (torch.float16,) if cuda else (torch.float32, torch.bfloat16):
            w = torch.randn(c.out_features, c.in_features, device=device, dtype=dtype)
            xd = x.to(dtype)
            name = f"F.linear {str(dtype).replace('torch.', '')}" + (" (cuBLAS)" if cuda else "")
            row(name, time_ms(lambda: F.linear(xd, w), device))
            del w
        qweight, scales, zeros = lowbit_weights(LowbitConfig(c.in_features, c.out_features, 2, 64, c.rows), device,
                                                torch.float16)
        row("blockops quant_linear w2g64",
            time_ms(lambda: ops.quant_linear(x, qweight, scales, zeros, 2, 64), device))
    return results
