"""Low-bit GEMM benchmark: blockops.ops.quant_linear (w2g64, w3g64, w4g128) on Llama layer shapes against, in the
same run, F.linear with dense weights (fp32 and bf16 on CPU, fp16 cuBLAS on GPU) and, on CPU, PyTorch's own
4-bit kernel `_weight_int4pack_mm_for_cpu`. Activations fp32 on CPU, fp16 on GPU; scales and zeros fp16. GB/s
counts the packed weight bytes (codes + scales + zeros) per call, the figure to hold against memory bandwidth at
small batch.

Error check: ``max_error = max |y - ref| / max |ref|`` with ``ref = ref_quant_linear`` (W_hat dequantized in fp32,
fp32 matmul) on the same inputs; the reference weight of each packed weight (``ref_quant_dequantize``, fp32: 180 MB
and about a second on 2 cores at 4096x11008) is built once per run, timed, and shared by the rows of that weight.
Tolerance (``tolerance()``), the accuracy contract of tests/test_lowbit.py: fp32 activations 2e-4 -- the CPU kernels
for 2/4-bit at batch <= 64 round activations per (row, group) to 16-bit fixed point (<= 1.5e-5 of the group's largest
activation each; about 3e-5 of max |y| measured), the other paths are fp32 throughout (~1e-6); fp16/bf16 outputs 4
units of the dtype's rounding u (fp16: 2e-3): <= u from rounding y once, about u more where W_hat is rounded to x's
dtype before cuBLAS (CUDA above 8 rows), the rest for reduced-precision split-K sums. A 1% error in y fails every
row.

The op's other kernels, in rows of their own:

* ``quant_dequantize`` (W_hat [out, in] in the scales' dtype, fp16 here: what the GEMM above the fused kernels'
  rows multiplies) against the reference dequantize ``ref_quant_dequantize`` (fp32): its one timed build, whose
  output is also the error reference. Error ``max |W - ref| / max |ref|``; the fp32 reference is exact here
  ((q - z) * s of a small integer and an fp16 scale), so the only error allowed is rounding W_hat once to its dtype:
  tolerance ``dequantize_tolerance()``, u of that dtype (fp16: 4.9e-4; 4.6e-4 measured, every CPU path).
* an E2E-QP training step at a small batch ("fwd+bwd (E2E-QP)"): quant_linear forward and backward with x and the
  scales requiring grad (fp32 x, scales and zeros, as trained copies are), which runs ``quant_linear_grad_input``
  and ``quant_grad_scales``, against F.linear forward and backward with a dense fp32 weight requiring grad. Error:
  the largest ``max |g - ref| / max |ref|`` over the gradients of x and of the scales, against autograd through
  ``ref_quant_linear`` (fp32) on the same inputs and output gradient. Tolerance ``GRAD_TOLERANCE`` = 1e-5,
  tests/test_lowbit.py's gradient contract (both sides sum in fp32; about 3e-7 measured). A 1% error in a gradient
  fails the row."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from blockops import ops
from blockops.bench.harness import (Result, SharedReferences, linear_training_step, max_rel_error, model_rows,
                                     time_ms, unit_roundoff)
from blockops.reference import ref_quant_dequantize, ref_quant_linear

# The torch.ops.blockops ops this family's rows run (backward kernels included).
OPS = ("quant_linear", "quant_dequantize", "quant_linear_grad_input", "quant_grad_scales")


@dataclasses.dataclass(frozen=True)
class Config:
    in_features: int
    out_features: int
    bits: int
    group_size: int
    rows: int


_LLAMA = [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336), (14336, 4096)]
QUICK_CPU = [Config(4096, 11008, 2, 64, 1), Config(4096, 11008, 2, 64, 4), Config(4096, 11008, 4, 128, 1),
             Config(4096, 4096, 2, 64, 64)]
# Batch 1 also at 2048 x 5632 (issue 18's targets hold "from 2048 x 5632 up": small layers lose most to per-call
# costs) and for 3 and 4 bits at every shape.
FULL_CPU = [Config(i, o, 2, 64, m) for i, o in _LLAMA for m in (1, 4, 16, 64)] + \
           [Config(i, o, b, g, 1) for i, o in [(2048, 5632)] + _LLAMA for b, g in ((3, 64), (4, 128))] + \
           [Config(2048, 5632, 2, 64, 1), Config(4096, 4096, 2, 64, 512)]
QUICK_CUDA = [Config(4096, 14336, 2, 64, m) for m in (1, 16)] + [Config(8192, 28672, 2, 64, 1)]
FULL_CUDA = [Config(i, o, 2, 64, m) for i, o in _LLAMA + [(8192, 28672)] for m in (1, 4, 16, 64, 512)] + \
            [Config(4096, 14336, b, g, 1) for b, g in ((3, 64), (4, 128))]


@dataclasses.dataclass(frozen=True)
class DequantConfig:
    in_features: int
    out_features: int
    bits: int
    group_size: int


# quant_dequantize rows (one layer's W_hat) and E2E-QP training steps (Config.rows: the batch's rows).
QUICK_DEQUANT_CPU = [DequantConfig(4096, 11008, 2, 64)]
FULL_DEQUANT_CPU = [DequantConfig(i, o, 2, 64) for i, o in _LLAMA] + [DequantConfig(4096, 11008, b, g)
                                                                     for b, g in ((3, 64), (4, 128))]
QUICK_DEQUANT_CUDA = [DequantConfig(4096, 14336, 2, 64)]
FULL_DEQUANT_CUDA = [DequantConfig(i, o, 2, 64) for i, o in _LLAMA + [(8192, 28672)]]
QUICK_TRAIN_CPU = [Config(4096, 4096, 2, 64, 16)]
FULL_TRAIN_CPU = [Config(4096, 4096, 2, 64, m) for m in (16, 64)] + [Config(4096, 11008, 2, 64, 16)]
QUICK_TRAIN_CUDA = [Config(4096, 4096, 2, 64, 16)]
FULL_TRAIN_CUDA = [Config(i, o, 2, 64, m) for i, o in ((4096, 4096), (4096, 14336)) for m in (16, 512, 4096)]
# Largest acceptable max |g - ref| / max |ref| of the training rows' fp32 gradients (see the module docstring).
GRAD_TOLERANCE = 1e-5
# A training step or the dequantize takes up to a few hundred ms on 2 cores: median of 3 calls after 1 warm-up (the
# reference dequantize: its one build, SharedReferences).
_STEP_TIMING = dict(warmup=1, min_repeats=3, min_seconds=0.0)


def _weights(c: Config, device: str, scale_dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 2**c.bits, (c.in_features, c.out_features), generator=g, dtype=torch.int32)
    groups = c.in_features // c.group_size
    scales = (torch.rand(groups, c.out_features, generator=g) * 0.01 + 0.001).to(scale_dtype)
    zeros = torch.randint(0, 2**c.bits, (groups, c.out_features), generator=g).to(scale_dtype)
    return ops.pack_bits(q, c.bits, 0).to(device), scales.to(device), zeros.to(device)


def _int4_cpu_baseline(c: Config, x: torch.Tensor):
    """PyTorch's CPU int4 kernel on the same shape (4-bit, group 128 here: what it supports)."""
    codes = torch.randint(0, 16, (c.out_features, c.in_features), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    scales_zeros = torch.rand(c.in_features // 128, c.out_features, 2, dtype=x.dtype)
    return lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 128, scales_zeros)


def tolerance(dtype: torch.dtype) -> float:
    """Largest acceptable max |y - ref| / max |ref| for outputs of `dtype` (see the module docstring)."""
    return 2e-4 if dtype == torch.float32 else 4 * unit_roundoff(dtype)


def dequantize_tolerance(dtype: torch.dtype) -> float:
    """Largest acceptable max |W - ref| / max |ref| of quant_dequantize's output of `dtype`: one rounding."""
    return unit_roundoff(dtype)


def run(device: str, quick: bool = True) -> list[Result]:
    cuda = torch.device(device).type == "cuda"
    configs = (QUICK_CUDA if quick else FULL_CUDA) if cuda else (QUICK_CPU if quick else FULL_CPU)
    refs = SharedReferences(device)   # ref_quant_dequantize of each weight, keyed by _weight_key
    results = _gemm_rows(configs, device, refs)
    results += _dequantize_rows((QUICK_DEQUANT_CUDA if quick else FULL_DEQUANT_CUDA) if cuda else
                                (QUICK_DEQUANT_CPU if quick else FULL_DEQUANT_CPU), device, refs)
    del refs
    results += _train_rows((QUICK_TRAIN_CUDA if quick else FULL_TRAIN_CUDA) if cuda else
                           (QUICK_TRAIN_CPU if quick else FULL_TRAIN_CPU), device)
    return results


def _weight_key(c) -> tuple:
    """What _weights' tensors depend on (fp16 scales): rows of equal keys share one reference weight."""
    return (c.in_features, c.out_features, c.bits, c.group_size)


def _gemm_rows(configs: list[Config], device: str, refs: SharedReferences) -> list[Result]:
    cuda = torch.device(device).type == "cuda"
    results = []
    for c in configs:
        act = torch.float16 if cuda else torch.float32
        qweight, scales, zeros = _weights(c, device, torch.float16)
        x = torch.randn(c.rows, c.in_features, device=device, dtype=act)
        y = ops.quant_linear(x, qweight, scales, zeros, c.bits, c.group_size)
        _, w_ref = refs.get(_weight_key(c), lambda: ref_quant_dequantize(qweight, scales, zeros, c.bits, c.group_size))
        ref = x.float() @ w_ref.t()   # ref_quant_linear on the shared reference weight
        err, tol = max_rel_error(y, ref), tolerance(y.dtype)
        weight_bytes = qweight.numel() * 4 + scales.numel() * 2 + zeros.numel() * 2
        flops = 2.0 * c.rows * c.in_features * c.out_features
        ours = time_ms(lambda: ops.quant_linear(x, qweight, scales, zeros, c.bits, c.group_size), device)
        shape = f"{c.in_features}x{c.out_features} M={c.rows}"
        op = f"quant_linear w{c.bits}g{c.group_size}"
        dense_dtypes = [torch.float16] if cuda else [torch.float32, torch.bfloat16]
        for dtype in dense_dtypes:
            w = torch.randn(c.out_features, c.in_features, device=device, dtype=dtype)
            xd = x.to(dtype)
            base = time_ms(lambda: F.linear(xd, w), device)
            name = f"F.linear {str(dtype).replace('torch.', '')}" + (" (cuBLAS)" if cuda else "")
            results.append(Result("lowbit", op, shape, device, ours, name, base, bytes_moved=weight_bytes,
                                  flops=flops, max_error=err, tolerance=tol))
            del w
        if not cuda and c.rows <= 64:
            try:
                xb = x.to(torch.bfloat16)
                base = time_ms(_int4_cpu_baseline(c, xb), device)
                results.append(Result("lowbit", op, shape, device, ours, "torch int4 CPU (w4g128)", base,
                                      bytes_moved=weight_bytes, flops=flops, max_error=err, tolerance=tol))
            except (RuntimeError, AttributeError) as e:  # older torch without the op: say so, don't hide it
                results.append(Result("lowbit", op, shape, device, ours, "torch int4 CPU", float("nan"),
                                      max_error=err, tolerance=tol, note=f"baseline unavailable: {e}"[:80]))
        if not cuda and c.rows == 1:
            results += model_rows("lowbit", op, shape, device,
                                  lambda: ops.quant_linear(x, qweight, scales, zeros, c.bits, c.group_size), x,
                                  c.in_features, c.out_features, bytes_moved=weight_bytes, flops=flops,
                                  max_error=err, tolerance=tol)
    return results


def _dequantize_rows(configs: list[DequantConfig], device: str, refs: SharedReferences) -> list[Result]:
    results = []
    for c in configs:
        qweight, scales, zeros = _weights(Config(c.in_features, c.out_features, c.bits, c.group_size, 0), device,
                                          torch.float16)
        args = (qweight, scales, zeros, c.bits, c.group_size)
        w = ops.quant_dequantize(*args)
        base, ref = refs.get(_weight_key(c), lambda: ref_quant_dequantize(*args))
        err, tol = max_rel_error(w, ref), dequantize_tolerance(w.dtype)
        del w
        ours = time_ms(lambda: ops.quant_dequantize(*args), device, **_STEP_TIMING)
        moved = qweight.numel() * 4 + scales.numel() * 2 * 2 + c.in_features * c.out_features * scales.element_size()
        results.append(Result("lowbit", f"quant_dequantize w{c.bits}g{c.group_size}",
                              f"{c.in_features}x{c.out_features}", device, ours, "ref_quant_dequantize (1 call)", base,
                              bytes_moved=moved, max_error=err, tolerance=tol))
    return results


def _train_rows(configs: list[Config], device: str) -> list[Result]:
    """E2E-QP steps: quant_linear forward + backward (x and scales requiring grad) vs dense F.linear forward +
    backward (x and the weight requiring grad); fp32 throughout."""
    results = []
    for c in configs:
        qweight, scales, zeros = _weights(c, device, torch.float32)
        g = torch.Generator(device=device).manual_seed(1)
        x = torch.randn(c.rows, c.in_features, device=device, generator=g)
        grad = torch.randn(c.rows, c.out_features, device=device, generator=g)
        leaves = [x.clone().requires_grad_(True), scales.clone().requires_grad_(True)]
        ref_leaves = [x.clone().requires_grad_(True), scales.clone().requires_grad_(True)]
        results.append(linear_training_step(
            "lowbit", f"quant_linear w{c.bits}g{c.group_size} fwd+bwd (E2E-QP)", device,
            lambda: ops.quant_linear(leaves[0], qweight, leaves[1], zeros, c.bits, c.group_size),
            lambda: ref_quant_linear(ref_leaves[0], qweight, ref_leaves[1], zeros, c.bits, c.group_size),
            leaves, ref_leaves, grad, g, tolerance=GRAD_TOLERANCE, note="x, scales require grad; fp32",
            timing=_STEP_TIMING))
    return results
