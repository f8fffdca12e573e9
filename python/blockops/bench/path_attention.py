"""PaTH attention benchmark (family "path_attention"): blockops.attention.path_attention, forward and
forward+backward, against in the same run:

* causal ``F.scaled_dot_product_attention`` on the same shapes (GQA through ``enable_gqa``): the cost PaTH adds over
  attention with RoPE;
* the naive O(T^2) reference ``ref_path_attention`` (autograd, in q's dtype), only where it is affordable on the
  CPU: forward for T <= 2048 (it materialises ``[B, HQ, T, T]`` logits by a T-step Python loop), forward+backward
  only up to about the size of T=512, H=16, D=64 (its autograd graph keeps every step, O(T^2 D) per head). Rows
  whose reference is skipped say so in their note.

Inputs are made as the PaTH layer makes them (w L2-normalised, beta = 2 sigmoid(.), g = logsigmoid(.), all three in
fp32). TFLOP/s count causal attention's FLOPs (``2 B HQ T^2 D`` forward, 3.5x that forward+backward), not the extra
work of the Householder transforms, so that they compare directly with SDPA's.

Error check (outside the timed calls): flash-linear-attention's relative RMS error ``rms(ours - ref) / rms(ref)``
against ``ref_path_attention`` in fp64 on the same (rounded) inputs, over the first ``_ERR_ROWS`` tokens of batch row
0 (fewer for many heads or a wide D, to bound the reference's autograd graph; causal: those tokens depend only on
themselves). The ``fwd`` rows' error is the output's; the ``fwd+bwd`` rows' the largest over the output and the
gradients of q, k, v, w, beta (and g), from one extra backward of ours with the output gradient zero after those
tokens (their gradients then are the truncated problem's). Tolerances, the accuracy contract of
tests/test_path_attention.py: fp32 (fp32 arithmetic throughout) 1e-5, forward and every gradient (against fp64;
about 6e-7 measured on every CPU path); fp16/bf16 q, k, v (the output and dq, dk, dv rounded to it; on CUDA the
forward's products on tensor cores with fp32 accumulation) flash-linear-attention's 0.005 forward and 0.02 with the
gradients (its loosest, for dbeta and dg; dq, dk, dv have 0.008, dw 0.015).

Targets of the issue, on a 2-core CPU at B=1, H=8, T=4096, D=64 (fp32): forward at most 4x the time of causal SDPA,
backward (forward+backward minus forward) at most 4x our forward; the rows of that shape say whether they were met.
On a CUDA device it runs the first CUDA kernels (csrc/kernels/path_attention.cu, checked in the CPU emulator, not
tuned: the fp16/bf16 forward's products on tensor cores without a load pipeline, everything else on CUDA cores; the
backward runs one CTA per (sequence, key head), so its figures are a floor to improve on, not the issue's GPU
target) on a small bf16 grid; the issue's GPU grid (up to T=16384) is to come.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from blockops.attention import path_attention
from blockops.bench.harness import Result, forward_backward, rel_rms_error, time_ms
from blockops.reference import ref_path_attention


@dataclasses.dataclass(frozen=True)
class Config:
    batch: int              # B
    seq_len: int            # T
    heads: int              # query heads HQ
    kv_heads: int           # key/value heads H (GQA when < heads)
    head_dim: int           # D = Dv
    dtype: torch.dtype      # q, k, v (w, beta, g are fp32)
    gate: bool = False      # PaTH-FoX forget gate


# The shape of the CPU targets.
TARGET_CPU = Config(1, 4096, 8, 8, 64, torch.float32)
# CPU quick: ~20-30 s on 2 cores.
QUICK_CPU = [TARGET_CPU]
# The grid on the CPU (long: up to minutes per shape at B=8, T=4096): B 1 and 8, T 512/2048/4096, H=16 with
# 16 or 4 key/value heads, D 64/128.
FULL_CPU = [TARGET_CPU] + [Config(b, t, 16, hk, d, torch.float32) for t in (512, 2048, 4096) for b in (1, 8)
                           for hk in (16, 4) for d in (64, 128)]
# The CPU figures of docs/performance.md (a few minutes): the target shape with and without the gate, then GQA 16/4
# at T 512 (reference forward and backward) and 2048 (reference forward), D=128, bf16 and a batch of 4.
DOC_CPU = [TARGET_CPU, dataclasses.replace(TARGET_CPU, gate=True),
           Config(1, 512, 16, 4, 64, torch.float32), Config(1, 2048, 16, 4, 64, torch.float32),
           Config(1, 2048, 16, 4, 128, torch.float32), Config(1, 4096, 16, 4, 64, torch.bfloat16),
           Config(4, 512, 16, 4, 128, torch.float32)]

# GPU (simple CUDA-core kernels): quick is one small bf16 shape (seconds); the full list adds GQA 16/4 at T=2048
# and D=128 (tens of seconds, the backward's few CTAs dominate).
QUICK_GPU = [Config(1, 1024, 8, 8, 64, torch.bfloat16)]
FULL_GPU = QUICK_GPU + [Config(1, 2048, 16, 4, 64, torch.bfloat16), Config(1, 2048, 16, 4, 128, torch.bfloat16, True)]

# Affordability of the naive reference on the CPU, in B * HQ * T^2 (* D): about 2.3 GB and 4 s for its forward at
# B=1, HQ=16, T=2048; about 1.4 GB for its forward+backward at B=1, HQ=16, T=512, D=64 (the memory grows as T^2 D).
_REF_FWD_MAX_T = 2048
_REF_FWD_LIMIT = 1 << 26
_REF_BWD_LIMIT = 1 << 29
# Tokens of batch row 0 checked against the reference: _ERR_ROWS, halved while tokens^2 * HQ * D passes
# _ERR_LIMIT (the fp64 reference's autograd graph grows as that: a few hundred MB at the limit).
_ERR_ROWS = 256
_ERR_LIMIT = 1 << 25
# Largest acceptable relative RMS error: (forward, forward with the gradients), see the module docstring.
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (0.005, 0.02), torch.bfloat16: (0.005, 0.02)}


def _inputs(c: Config, device: str):
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, dtype=c.dtype):
        return torch.randn(*shape, device=device, generator=gen, dtype=dtype)

    B, T, HQ, H, D = c.batch, c.seq_len, c.heads, c.kv_heads, c.head_dim
    q, k, v = randn(B, T, HQ, D), randn(B, T, H, D), randn(B, T, H, D)
    w = F.normalize(randn(B, T, H, D, dtype=torch.float32), dim=-1)
    beta = 2 * torch.sigmoid(randn(B, T, H, dtype=torch.float32))
    g = F.logsigmoid(randn(B, T, HQ, dtype=torch.float32) + 3) if c.gate else None
    return q, k, v, w, beta, g


def _errors(c: Config, q, k, v, w, beta, g) -> tuple[float, float]:
    """(forward error, largest error of the forward and the gradients), see the module docstring."""
    n = min(_ERR_ROWS, c.seq_len)
    while n > 32 and n * n * c.heads * c.head_dim > _ERR_LIMIT:
        n //= 2
    inputs = [t for t in (q, k, v, w, beta, g) if t is not None]
    ours = [t.detach().requires_grad_(True) for t in inputs]
    ref = [t[:1, :n].detach().double().requires_grad_(True) for t in inputs]
    out = path_attention(*ours[:5], ours[5] if g is not None else None)[0]
    ref_out = ref_path_attention(*ref[:5], ref[5] if g is not None else None)
    fwd = rel_rms_error(out[:1, :n], ref_out)
    grad = torch.zeros_like(out)
    grad[:1, :n] = torch.randn(grad[:1, :n].shape, generator=torch.Generator().manual_seed(1)).to(grad)
    out.backward(grad)
    ref_out.backward(grad[:1, :n].double())
    return fwd, max([fwd] + [rel_rms_error(a.grad[:1, :n], b.grad) for a, b in zip(ours, ref)])


def run(device: str, quick: bool = True, configs: list[Config] | None = None) -> list[Result]:
    """Rows per config: forward vs causal SDPA, forward vs the naive reference (where affordable), forward+backward
    vs causal SDPA and vs the reference (where affordable). Quick: the CPU targets' shape (B=1, H=8, T=4096, D=64,
    fp32); on CUDA `QUICK_GPU` / `FULL_GPU`. `configs` overrides the grid (e.g. `DOC_CPU`)."""
    if configs is None:
        on_gpu = torch.device(device).type == "cuda"
        configs = (QUICK_GPU if quick else FULL_GPU) if on_gpu else (QUICK_CPU if quick else FULL_CPU)
    results: list[Result] = []
    for c in configs:
        results.extend(_run_config(c, device))
    return results


def _run_config(c: Config, device: str) -> list[Result]:
    q, k, v, w, beta, g = _inputs(c, device)
    # SDPA layout [B, heads, T, D], same values.
    qs, ks, vs = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    sdpa = lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True,  # noqa: E731
                                                  enable_gqa=c.heads != c.kv_heads)
    ours = lambda: path_attention(q, k, v, w, beta, g)[0]   # noqa: E731
    ref = lambda: ref_path_attention(q, k, v, w, beta, g)   # noqa: E731

    fwd_err, both_err = _errors(c, q, k, v, w, beta, g)
    fwd_tol, both_tol = TOL[c.dtype]
    dt = str(c.dtype).replace("torch.", "")
    shape = (f"B={c.batch} T={c.seq_len} H={c.heads}/{c.kv_heads} D={c.head_dim} {dt}"
             + (" gate" if c.gate else ""))
    fwd_flops = 2.0 * c.batch * c.heads * c.seq_len ** 2 * c.head_dim
    # Big problems: fewer repeats (a CPU call at T=4096 takes up to seconds); the median of 3 is still robust.
    heavy = c.batch * c.heads * c.seq_len ** 2 * c.head_dim > 2 ** 31
    timing = {"warmup": 1, "min_repeats": 3, "min_seconds": 0.0} if heavy else {}
    # The reference is a slow baseline: one call shows its order of magnitude.
    once = {"warmup": 0, "min_repeats": 1, "min_seconds": 0.0}
    is_target = c == TARGET_CPU and torch.device(device).type == "cpu"
    dense = c.batch * c.heads * c.seq_len ** 2
    ref_fwd_ok = c.seq_len <= _REF_FWD_MAX_T and dense <= _REF_FWD_LIMIT
    ref_bwd_ok = dense * c.head_dim <= _REF_BWD_LIMIT

    def row(op, ours_ms, baseline, base_ms, flops, note=""):
        err, tol = (fwd_err, fwd_tol) if op.endswith(" fwd") else (both_err, both_tol)
        return Result("path_attention", op, shape, device, ours_ms, baseline, base_ms, flops=flops, max_error=err,
                      tolerance=tol, note=note)

    results = []
    fwd = time_ms(ours, device, **timing)
    sdpa_fwd = time_ms(sdpa, device, **timing)
    notes = []
    if is_target:
        ratio = fwd / sdpa_fwd
        notes.append(f"CPU target fwd <= 4x SDPA: {'met' if ratio <= 4 else 'missed'} ({ratio:.2f}x)")
    if not ref_fwd_ok:
        notes.append(f"naive reference not timed: T={c.seq_len} too large for it on CPU (T <= {_REF_FWD_MAX_T}, "
                     f"B*H*T^2 <= 2^26)")
    results.append(row("path_attention fwd", fwd, "SDPA causal", sdpa_fwd, fwd_flops, "; ".join(notes)))
    if ref_fwd_ok:
        with torch.no_grad():
            ref_ms = time_ms(ref, device, **once)
        results.append(row("path_attention fwd", fwd, "naive reference (1 call)", ref_ms, fwd_flops))

    inputs = (q, k, v, w, beta) + (() if g is None else (g,))
    for x in inputs + (qs, ks, vs):
        x.requires_grad_(True)
    grad = torch.randn_like(q)
    grad_s = grad.transpose(1, 2).contiguous()
    both = time_ms(forward_backward(ours, inputs, grad), device, **timing)
    sdpa_both = time_ms(forward_backward(sdpa, (qs, ks, vs), grad_s), device, **timing)
    notes = []
    if is_target:
        bwd = both - fwd
        notes.append(f"CPU target bwd <= 4x fwd: {'met' if bwd <= 4 * fwd else 'missed'} "
                     f"(bwd {bwd:.4g} ms = {bwd / fwd:.2f}x fwd)")
    if not ref_bwd_ok:
        notes.append("naive reference fwd+bwd not timed: its autograd graph is O(T^2 D) per head")
    results.append(row("path_attention fwd+bwd", both, "SDPA causal", sdpa_both, 3.5 * fwd_flops, "; ".join(notes)))
    if ref_bwd_ok:
        ref_ms = time_ms(forward_backward(ref, inputs, grad), device, **once)
        results.append(row("path_attention fwd+bwd", both, "naive reference (1 call)", ref_ms, 3.5 * fwd_flops))
    return results
