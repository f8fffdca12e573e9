"""Vector-quantized GEMM benchmark: blockops.vq.vq_linear with the issue's formats -- 2-bit (k=256, d=4), 3-bit
(k=64, d=2) and AQLM 2x8 (two additive codebooks, k=256, d=8) -- on an LLM layer at batch 1..16 and DiT-XL/2
layers at 256..4096 tokens, with fp32 and bf16 activations, against, in the same run, F.linear with dense fp32
and bf16 weights and (fp32 activations) the reference decode-then-linear (`blockops.reference.ref_vq_linear`).
GB/s counts codes + codebooks + scales per call.

CUDA: fp16 activations and codebooks, against fp16 `F.linear` (cuBLAS) and, in the same run, the reference
decode-then-linear and our `vq_dequantize` followed by cuBLAS; the issue's goals (batch 1: >= 4x faster than fp16
cuBLAS; DiT token counts: no slower) are marked on the rows they concern.

Error check: ``max |y - ref| / max |ref|`` with ``ref = ref_vq_linear`` in fp32 (W_hat decoded in fp32) on the same
x, codes, codebooks and scales; the reference weight of each weight (``ref_vq_dequantize``) is built once per run,
timed, and shared by the rows of that weight. Tolerance (``tolerance()``): fp32 outputs 2e-4, tests/test_vq.py's
contract: exact fp32 tables or decoded fp32 blocks with fp32 accumulation (about 1e-6 measured), except 1-2 rows of
k <= 64 codes (every AVX2 CPU), whose sub-table kernel rounds its tables to int16 (4e-5 measured on
the 3-bit rows), and 1-2 rows of k = 256 codes on AVX2 CPUs without VBMI, whose codeword kernel rounds codewords and
activations to int16 (6-8e-5): the same 2e-4 as the low-bit 16-bit fixed-point path; fp16/bf16 outputs
1e-5 + 2 units of the dtype's rounding u: y is rounded once to its dtype (<= u of max |y|), and on the paths that
round W_hat to x's dtype before the product (bf16 blocks + GEMM on the CPU above the GEMV rows, mma.sync tiles on
CUDA) that adds a sum of independent roundings, well under u of max |y|; the byte-plane kernel's int16 tables (bf16
x) add at most 3e-5 of ``|x| @ |W_hat|^T``, a few 1e-4 of max |y| here. A 1% error in y fails the fp32 and fp16 rows;
bf16's u is 0.4%, so there the check catches errors above about 1.2%.

The op's other kernels, in rows of their own (CPU and CUDA alike):

* ``vq_dequantize`` (W_hat [out, in] in the codebooks' dtype, fp16 here) against the reference decode
  ``ref_vq_dequantize`` (fp32): its one timed build, whose output is also the error reference. Error
  ``max |W - ref| / max |ref|``; the fp32 reference is exact with one codebook (a codeword times its row's scale,
  both fp16; AQLM's sum of two codewords adds at most an fp32 rounding, far below u), so the only error allowed is
  rounding W_hat once to its dtype: tolerance ``dequantize_tolerance()``, u of that dtype (fp16: 4.9e-4; 3.2e-4
  measured).
* a VQ4DiT codebook fine-tuning step ("fwd+bwd"): vq_linear forward and backward with x, the codebooks and the
  scales requiring grad (fp32 x, codebooks and scales, as trained copies are), which runs
  ``vq_linear_grad_input``, ``vq_grad_codebooks`` and ``vq_grad_scales``, against F.linear forward and backward
  with a dense fp32 weight requiring grad, on a DiT-XL/2 layer. Error: the largest ``max |g - ref| / max |ref|``
  over the gradients of x, the codebooks and the scales, against autograd through ``ref_vq_linear`` (fp32) on the
  same inputs and output gradient. Tolerance ``GRAD_TOLERANCE`` = 2e-5: both sides sum in fp32, and a codeword's
  gradient is a sum of about 5000 entries of ``grad_out^T x`` (DiT-XL/2 at 256 tokens): each side lies up to about
  3e-6 from an fp64 computation (measured; one thread gives the reference's own summation order and the same
  gradient), so two summation orders (threads, CUDA) may differ by twice that; x and the scales about 3e-7. A 1%
  error in a gradient fails the row."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from blockops import vq
from blockops.bench.harness import (Result, SharedReferences, linear_training_step, max_rel_error, model_rows,
                                     time_ms, unit_roundoff)
from blockops.reference import ref_vq_dequantize, ref_vq_linear

# The torch.ops.blockops ops this family's rows run (backward kernels included).
OPS = ("vq_linear", "vq_dequantize", "vq_linear_grad_input", "vq_grad_codebooks", "vq_grad_scales")


@dataclasses.dataclass(frozen=True)
class Format:
    name: str
    codebook_size: int     # k
    vector_dim: int        # d
    num_codebooks: int     # K


FORMATS = {"2-bit": Format("2-bit k256 d4", 256, 4, 1), "3-bit": Format("3-bit k64 d2", 64, 2, 1),
           "aqlm2x8": Format("AQLM 2x8", 256, 8, 2)}


@dataclasses.dataclass(frozen=True)
class Config:
    in_features: int
    out_features: int
    rows: int
    fmt: str               # key of FORMATS


_DIT = [(1152, 1152), (1152, 3456), (1152, 4608), (4608, 1152)]
QUICK_CPU = [Config(4096, 11008, 1, "2-bit"), Config(4096, 11008, 1, "3-bit"), Config(4096, 11008, 1, "aqlm2x8"),
             Config(4096, 11008, 16, "2-bit"),
             Config(1152, 4608, 1024, "2-bit")]
FULL_CPU = ([Config(4096, 11008, m, f) for f in FORMATS for m in (1, 2, 4, 8, 16)]
            + [Config(11008, 4096, m, "2-bit") for m in (1, 4)]   # the MLP's down projection
            + [Config(i, o, t, "2-bit") for i, o in _DIT for t in (256, 1024, 4096)])


def _weights(c: Config, dtype: torch.dtype):
    f = FORMATS[c.fmt]
    g = torch.Generator().manual_seed(0)
    groups = c.in_features // f.vector_dim
    codes = torch.randint(0, f.codebook_size, (c.out_features, groups, f.num_codebooks), generator=g)
    codebooks = torch.randn(f.num_codebooks, f.codebook_size, f.vector_dim, generator=g).to(dtype)
    scales = (torch.rand(c.out_features, generator=g) * 0.01 + 0.001).to(dtype)
    return codes.to(torch.uint8).contiguous(), codebooks, scales


def tolerance(dtype: torch.dtype) -> float:
    """Largest acceptable max |y - ref| / max |ref| for outputs of `dtype` (see the module docstring)."""
    return 2e-4 if dtype == torch.float32 else 1e-5 + 2 * unit_roundoff(dtype)


QUICK_CUDA = [Config(4096, 11008, 1, "2-bit"), Config(4096, 11008, 1, "aqlm2x8"), Config(1152, 4608, 1024, "2-bit")]
FULL_CUDA = ([Config(i, o, m, f) for i, o in [(4096, 11008), (11008, 4096), (4096, 4096)] for f in FORMATS
              for m in (1, 4, 16)]
             + [Config(i, o, t, f) for i, o in _DIT for t in (256, 1024, 4096) for f in ("2-bit", "3-bit")])


@dataclasses.dataclass(frozen=True)
class WeightConfig:
    in_features: int
    out_features: int
    fmt: str               # key of FORMATS


# vq_dequantize rows (one layer's W_hat) and VQ4DiT fine-tuning steps (Config.rows: tokens), CPU and CUDA alike.
QUICK_DEQUANT = [WeightConfig(4096, 11008, "2-bit")]
FULL_DEQUANT = [WeightConfig(4096, 11008, f) for f in FORMATS] + [WeightConfig(1152, 4608, "2-bit")]
QUICK_TRAIN = [Config(1152, 4608, 256, "2-bit")]
FULL_TRAIN = [Config(i, o, t, "2-bit") for i, o in _DIT for t in (256, 1024)] + [Config(1152, 4608, 256, "3-bit")]
# Largest acceptable max |g - ref| / max |ref| of the training rows' fp32 gradients (see the module docstring).
GRAD_TOLERANCE = 2e-5
# Training steps and the dequantize take up to a few hundred ms on 2 cores: median of 3 calls after 1 warm-up (the
# reference decode: its one build, SharedReferences).
_STEP_TIMING = dict(warmup=1, min_repeats=3, min_seconds=0.0)


def dequantize_tolerance(dtype: torch.dtype) -> float:
    """Largest acceptable max |W - ref| / max |ref| of vq_dequantize's output of `dtype`: one rounding."""
    return unit_roundoff(dtype)


def _weight_key(c) -> tuple:
    """What _weights' tensors depend on: rows of equal keys (fp16 codebooks) share one reference weight."""
    return (c.in_features, c.out_features, c.fmt)


def _run_cuda(device: str, configs: list[Config], refs: SharedReferences) -> list[Result]:
    results = []
    for c in configs:
        f = FORMATS[c.fmt]
        codes, codebooks, scales = (t.to(device) for t in _weights(c, torch.float16))
        x = torch.randn(c.rows, c.in_features, device=device, dtype=torch.float16)
        y = vq.vq_linear(x, codes, codebooks, scales)
        _, w_ref = refs.get(_weight_key(c), lambda: ref_vq_dequantize(codes, codebooks, scales))
        ref = x.float() @ w_ref.t()   # ref_vq_linear in fp32 on the shared reference weight
        err, tol = max_rel_error(y, ref), tolerance(y.dtype)
        weight_bytes = codes.numel() + codebooks.numel() * 2 + scales.numel() * 2
        flops = 2.0 * c.rows * c.in_features * c.out_features
        ours = time_ms(lambda: vq.vq_linear(x, codes, codebooks, scales), device)
        _, total_bits = vq.bits_per_weight(c.out_features, c.in_features, f.codebook_size, f.vector_dim,
                                           f.num_codebooks, scale_bits=16)
        shape = f"{c.in_features}x{c.out_features} M={c.rows}"
        op = f"vq_linear {f.name} ({total_bits:.2f} bits/weight)"

        def row(baseline, base_ms, note=""):
            return Result("vq", op, shape, device, ours, baseline, base_ms, bytes_moved=weight_bytes, flops=flops,
                          max_error=err, tolerance=tol, note=note)

        w = torch.randn(c.out_features, c.in_features, device=device, dtype=torch.float16)
        base = time_ms(lambda: F.linear(x, w), device)
        note = ""
        if c.rows == 1:
            note = f"GPU goal >= 4x fp16 cuBLAS at batch 1: {'met' if base / ours >= 4 else 'missed'}"
        elif c.rows >= 256:
            note = f"GPU goal: no slower than fp16 cuBLAS: {'met' if base / ours >= 1 else 'missed'}"
        results.append(row("F.linear fp16 (cuBLAS)", base, note))
        del w
        results.append(row("vq_dequantize + F.linear fp16",
                           time_ms(lambda: F.linear(x, vq.vq_dequantize(codes, codebooks, scales)), device)))
        results.append(row("decode-then-linear (reference)",
                           time_ms(lambda: ref_vq_linear(x, codes, codebooks, scales), device)))
    return results


def run(device: str, quick: bool = True, configs: list[Config] | None = None) -> list[Result]:
    """The GEMM rows of `configs` (default: the quick or full grid of the device), then, without `configs`, the
    dequantize and training rows."""
    refs = SharedReferences(device)   # ref_vq_dequantize of each weight, keyed by _weight_key
    if torch.device(device).type == "cuda":
        results = _run_cuda(device, configs or (QUICK_CUDA if quick else FULL_CUDA), refs)
    elif torch.device(device).type == "cpu":
        results = _run_cpu(device, configs or (QUICK_CPU if quick else FULL_CPU), refs)
    else:
        print(f"vq: no {device} kernel for vector-quantized GEMM; no rows on {device}")
        return []
    if configs is None:
        results += _dequantize_rows(QUICK_DEQUANT if quick else FULL_DEQUANT, device, refs)
        del refs
        results += _train_rows(QUICK_TRAIN if quick else FULL_TRAIN, device)
    return results


def _run_cpu(device: str, configs: list[Config], refs: SharedReferences) -> list[Result]:
    results = []
    for c in configs:
        f = FORMATS[c.fmt]
        codes, codebooks, scales = _weights(c, torch.float16)
        x32 = torch.randn(c.rows, c.in_features)
        weight_bytes = codes.numel() + codebooks.numel() * 2 + scales.numel() * 2
        flops = 2.0 * c.rows * c.in_features * c.out_features
        _, total_bits = vq.bits_per_weight(c.out_features, c.in_features, f.codebook_size, f.vector_dim,
                                           f.num_codebooks, scale_bits=16)
        shape = f"{c.in_features}x{c.out_features} M={c.rows}"
        goal_shape = c.rows == 1 and (c.in_features, c.out_features) == (4096, 11008) and c.fmt == "2-bit"
        dense = {}
        for dtype in (torch.float32, torch.bfloat16):
            w = torch.randn(c.out_features, c.in_features, dtype=dtype)
            xd = x32.to(dtype)
            dense[dtype] = time_ms(lambda: F.linear(xd, w), device)
            del w
        reference_ms = time_ms(lambda: ref_vq_linear(x32, codes, codebooks, scales), device)
        # Both activation dtypes: fp32 runs the fp32 table kernel, bf16 (small batches, AVX-512 VBMI) the
        # int16 byte-plane one (1-2 rows of k <= 64 codes take the int16 sub-table kernel with either dtype, on
        # every AVX2 CPU; 1-2 rows of k = 256 codes the int16 codeword kernel on AVX2 CPUs without VBMI); each
        # against dense F.linear in fp32 and bf16.
        for x_dtype in (torch.float32, torch.bfloat16):
            x = x32.to(x_dtype)
            _, w_ref = refs.get(_weight_key(c), lambda: ref_vq_dequantize(codes, codebooks, scales))
            ref = x.float() @ w_ref.t()   # ref_vq_linear in fp32 on the shared reference weight
            y = vq.vq_linear(x, codes, codebooks, scales)
            err, tol = max_rel_error(y, ref), tolerance(y.dtype)
            ours = time_ms(lambda: vq.vq_linear(x, codes, codebooks, scales), device)
            name = str(x_dtype).replace("torch.", "")
            op = f"vq_linear {f.name} ({total_bits:.2f} bits/weight), x {name}"
            for dtype, base in dense.items():
                note = ""
                if goal_shape and dtype == torch.float32:
                    note = f"CPU goal >= 4x fp32 F.linear: {'met' if base / ours >= 4 else 'missed'}"
                results.append(Result("vq", op, shape, device, ours, f"F.linear {str(dtype).replace('torch.', '')}",
                                      base, bytes_moved=weight_bytes, flops=flops, max_error=err, tolerance=tol,
                                      note=note))
            if x_dtype == torch.float32:
                results.append(Result("vq", op, shape, device, ours, "decode-then-linear (reference)", reference_ms,
                                      bytes_moved=weight_bytes, flops=flops, max_error=err, tolerance=tol))
            if c.rows == 1:
                results += model_rows("vq", op, shape, device, lambda: vq.vq_linear(x, codes, codebooks, scales), x,
                                      c.in_features, c.out_features, bytes_moved=weight_bytes, flops=flops,
                                      max_error=err, tolerance=tol)
    return results


def _dequantize_rows(configs: list[WeightConfig], device: str, refs: SharedReferences) -> list[Result]:
    results = []
    for c in configs:
        f = FORMATS[c.fmt]
        codes, codebooks, scales = (t.to(device) for t in _weights(Config(c.in_features, c.out_features, 0, c.fmt),
                                                                    torch.float16))
        w = vq.vq_dequantize(codes, codebooks, scales)
        base, ref = refs.get(_weight_key(c), lambda: ref_vq_dequantize(codes, codebooks, scales))
        err, tol = max_rel_error(w, ref), dequantize_tolerance(w.dtype)
        del w
        ours = time_ms(lambda: vq.vq_dequantize(codes, codebooks, scales), device, **_STEP_TIMING)
        moved = (codes.numel() + codebooks.numel() * 2 + scales.numel() * 2
                 + c.in_features * c.out_features * codebooks.element_size())
        results.append(Result("vq", f"vq_dequantize {f.name}", f"{c.in_features}x{c.out_features}", device, ours,
                              "ref_vq_dequantize (1 call)", base, bytes_moved=moved, max_error=err, tolerance=tol))
    return results


def _train_rows(configs: list[Config], device: str) -> list[Result]:
    """VQ4DiT fine-tuning steps: vq_linear forward + backward (x, codebooks and scales requiring grad) vs dense
    F.linear forward + backward (x and the weight requiring grad); fp32 throughout."""
    results = []
    for c in configs:
        f = FORMATS[c.fmt]
        codes, codebooks, scales = (t.to(device) for t in _weights(c, torch.float32))
        g = torch.Generator(device=device).manual_seed(1)
        x = torch.randn(c.rows, c.in_features, device=device, generator=g)
        grad = torch.randn(c.rows, c.out_features, device=device, generator=g)
        leaves = [t.clone().requires_grad_(True) for t in (x, codebooks, scales)]
        ref_leaves = [t.clone().requires_grad_(True) for t in (x, codebooks, scales)]
        results.append(linear_training_step(
            "vq", f"vq_linear {f.name} fwd+bwd (VQ4DiT codebooks)", device,
            lambda: vq.vq_linear(leaves[0], codes, leaves[1], leaves[2]),
            lambda: ref_vq_linear(ref_leaves[0], codes, ref_leaves[1], ref_leaves[2]),
            leaves, ref_leaves, grad, g, tolerance=GRAD_TOLERANCE,
            note="x, codebooks, scales require grad; fp32", timing=_STEP_TIMING))
    return results
