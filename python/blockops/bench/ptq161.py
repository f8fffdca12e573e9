"""1.61-bit GEMM benchmark: blockops.ptq161.ptq161_linear (PTQ1.61 weights, 20% salient channels at 4 bits, the
rest binarized) on the lowbit family's Llama layer shapes against, in the same run, F.linear with dense weights
(fp32 and bf16 on CPU, fp16 cuBLAS on GPU) and blockops' own 2-bit kernel (quant_linear w2g64). fp32 activations,
fp16 factors. GB/s counts the packed weight bytes of the format (codes, signs, perm, factors) per call.

Error check: ``max |y - ref| / max |ref|`` with ``ref = ref_ptq161_linear`` (the packed format dequantized in fp32,
fp32 matmul) on the same inputs. Tolerance: the low-bit family's (``blockops.bench.lowbit.tolerance``), 2e-4 for
these fp32 outputs: the salient 4-bit channels run through the low-bit decode kernel, whose 16-bit fixed-point
activations give about 3e-5 of max |y| (measured); the binary part is fp32. A 1% error in y fails every row.

The reference weight of each packed weight (``ref_ptq161_dequantize``, fp32: up to ~180 MB and a second or two on
2 cores) is built once per run, timed, and shared by the rows of that weight: the GEMM rows' reference is
``ref_ptq161_linear``'s product ``x @ W_ref^T`` (fp32) on it.

The op's other kernels, in rows of their own (CPU and CUDA alike):

* ``ptq161_dequantize`` (W_hat [out, in], fp32) against that reference dequantize (its one timed build). Error
  ``max |W - ref| / max |ref|``; tolerance ``DEQUANT_TOLERANCE`` = 8 u of fp32 (4.8e-7): the salient part
  ``s (q - z)`` is exact in fp32, the binary part ``r1 r2 (alpha b + mu)`` takes three fp32 roundings in either
  order of evaluation, so two evaluations differ by at most 6 u of the element (about 2e-8 measured).
* a training step of the factors ("fwd+bwd"; PTQ1.61's block optimisation trains alpha, r1 and r2):
  ptq161_linear forward and backward with x, alpha, r1 and r2 requiring grad (fp32 x and factors, as trained
  copies are), which runs ``ptq161_linear_backward``, against F.linear forward and backward with a dense fp32
  weight requiring grad. Error: the largest ``max |g - ref| / max |ref|`` over the gradients of x, alpha, r1 and
  r2, against autograd through ``ref_ptq161_linear`` (fp32) on the same inputs and output gradient. Tolerance
  ``GRAD_TOLERANCE`` = 1e-5: both sides sum in fp32 (up to 7e-7 measured). A 1% error in a gradient fails the
  row."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from blockops import ops, ptq161
from blockops.bench.harness import (Result, SharedReferences, linear_training_step, max_rel_error, model_rows,
                                     time_ms, unit_roundoff)
from blockops.bench.lowbit import _LLAMA
from blockops.bench.lowbit import Config as LowbitConfig
from blockops.bench.lowbit import _weights as lowbit_weights
from blockops.bench.lowbit import tolerance as lowbit_tolerance
from blockops.reference import ref_ptq161_dequantize, ref_ptq161_linear

# The torch.ops.blockops ops this family's rows run (backward kernels included).
OPS = ("ptq161_linear", "ptq161_dequantize", "ptq161_linear_backward")


@dataclasses.dataclass(frozen=True)
class Config:
    in_features: int
    out_features: int
    rows: int
    salient_ratio: float = 0.2


QUICK_CPU = [Config(4096, 11008, 1), Config(4096, 11008, 4), Config(4096, 4096, 64)]
FULL_CPU = [Config(i, o, m) for i, o in _LLAMA for m in (1, 4, 16, 64)] + \
           [Config(2048, 5632, 1), Config(4096, 4096, 512)]


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


@dataclasses.dataclass(frozen=True)
class WeightConfig:
    in_features: int
    out_features: int
    salient_ratio: float = 0.2


# ptq161_dequantize rows (one layer's W_hat; the GEMM rows' shapes, so that the reference weight is shared) and
# training steps of the factors (Config.rows: the batch's rows).
QUICK_DEQUANT_CPU = [WeightConfig(4096, 11008)]
FULL_DEQUANT_CPU = [WeightConfig(i, o) for i, o in _LLAMA]
QUICK_DEQUANT_CUDA = [WeightConfig(4096, 14336)]
FULL_DEQUANT_CUDA = [WeightConfig(i, o) for i, o in _LLAMA + [(8192, 28672)]]
QUICK_TRAIN = [Config(4096, 4096, 16)]
FULL_TRAIN = [Config(4096, 4096, m) for m in (16, 64)] + [Config(4096, 11008, 16)]
# Largest acceptable errors of the dequantize rows and of the training rows' fp32 gradients (module docstring).
DEQUANT_TOLERANCE = 8 * unit_roundoff(torch.float32)
GRAD_TOLERANCE = 1e-5
# Training steps and the dequantize take up to a few hundred ms on 2 cores: median of 3 calls after 1 warm-up (the
# reference dequantize: its one build, SharedReferences).
_STEP_TIMING = dict(warmup=1, min_repeats=3, min_seconds=0.0)


def tolerance(dtype: torch.dtype) -> float:
    """Largest acceptable max |y - ref| / max |ref| (see the module docstring): the low-bit family's."""
    return lowbit_tolerance(dtype)


def run(device: str, quick: bool = True) -> list[Result]:
    cuda = torch.device(device).type == "cuda"
    configs = (QUICK_CUDA if quick else FULL_CUDA) if cuda else (QUICK_CPU if quick else FULL_CPU)
    refs = SharedReferences(device)   # ref_ptq161_dequantize of each weight, keyed by its Config fields
    results = _gemm_rows(configs, device, refs)
    results += _dequantize_rows((QUICK_DEQUANT_CUDA if quick else FULL_DEQUANT_CUDA) if cuda else
                                (QUICK_DEQUANT_CPU if quick else FULL_DEQUANT_CPU), device, refs)
    del refs
    results += _train_rows(QUICK_TRAIN if quick else FULL_TRAIN, device)
    return results


def _gemm_rows(configs: list[Config], device: str, refs: SharedReferences) -> list[Result]:
    cuda = torch.device(device).type == "cuda"
    results = []
    for c in configs:
        tensors, s = packed_weights(c, device)
        args = [tensors[k] for k in ptq161.FIELDS]
        x = torch.randn(c.rows, c.in_features, device=device)
        y = ptq161.ptq161_linear(x, *args, s)
        _, w_ref = refs.get((c.in_features, c.out_features, c.salient_ratio), lambda: ref_ptq161_dequantize(*args, s))
        ref = x.float() @ w_ref.t()   # ref_ptq161_linear on the shared reference weight
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
        if not cuda and c.rows == 1:
            results += model_rows("ptq161", op, shape, device, lambda: ptq161.ptq161_linear(x, *args, s), x,
                                  c.in_features, c.out_features, bytes_moved=weight_bytes, flops=flops,
                                  max_error=err, tolerance=tol)
    return results


def _dequantize_rows(configs: list[WeightConfig], device: str, refs: SharedReferences) -> list[Result]:
    results = []
    for c in configs:
        tensors, s = packed_weights(Config(c.in_features, c.out_features, 0, c.salient_ratio), device)
        args = [tensors[k] for k in ptq161.FIELDS]
        w = ptq161.ptq161_dequantize(*args, s)
        base, ref = refs.get((c.in_features, c.out_features, c.salient_ratio), lambda: ref_ptq161_dequantize(*args, s))
        err = max_rel_error(w, ref)
        del w
        ours = time_ms(lambda: ptq161.ptq161_dequantize(*args, s), device, **_STEP_TIMING)
        bits = ptq161.bits_per_weight(tensors)
        moved = (bits / 8 + 4) * c.in_features * c.out_features
        results.append(Result("ptq161", f"ptq161_dequantize {bits:.3f} bit", f"{c.in_features}x{c.out_features}",
                              device, ours, "ref_ptq161_dequantize (1 call)", base, bytes_moved=moved, max_error=err,
                              tolerance=DEQUANT_TOLERANCE))
    return results


def _train_rows(configs: list[Config], device: str) -> list[Result]:
    """Training steps of the factors: ptq161_linear forward + backward (x, alpha, r1, r2 requiring grad) vs dense
    F.linear forward + backward (x and the weight requiring grad); fp32 throughout."""
    results = []
    for c in configs:
        tensors, s = packed_weights(c, device, torch.float32)
        g = torch.Generator(device=device).manual_seed(1)
        x = torch.randn(c.rows, c.in_features, device=device, generator=g)
        grad = torch.randn(c.rows, c.out_features, device=device, generator=g)
        trained = ("alpha", "r1", "r2")

        def leaves_and_args():
            leaves = {"x": x.clone().requires_grad_(True),
                      **{k: tensors[k].clone().requires_grad_(True) for k in trained}}
            return list(leaves.values()), [leaves.get(k, tensors[k]) for k in ptq161.FIELDS]

        leaves, args = leaves_and_args()
        ref_leaves, ref_args = leaves_and_args()
        results.append(linear_training_step(
            "ptq161", "ptq161_linear fwd+bwd (factors)", device,
            lambda: ptq161.ptq161_linear(leaves[0], *args, s),
            lambda: ref_ptq161_linear(ref_leaves[0], *ref_args, s),
            leaves, ref_leaves, grad, g, tolerance=GRAD_TOLERANCE, note="x, alpha, r1, r2 require grad; fp32",
            timing=_STEP_TIMING))
    return results
