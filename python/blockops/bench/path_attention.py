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

Targets on a 2-core CPU at B=1, H=8, T=4096, D=64 (fp32), issue 18 (was 4x and 4x): forward at most 2.5x the time
of causal SDPA, backward (forward+backward minus forward) at most 2.5x our forward, on AVX2-only CPUs too (run with
``--cpu-isa avx2,native``); the rows of that shape say whether they were met.
On a CUDA device it runs the first CUDA kernels (csrc/kernels/path_attention.cu, checked in the CPU emulator, not
tuned: the fp16/bf16 forward's products on tensor cores without a load pipeline, everything else on CUDA cores; the
backward runs one CTA per (sequence, key head), so its figures are a floor to improve on, not the issue's GPU
target) on a small bf16 grid; the issue's GPU grid (up to T=16384) is to come.

Decoding, in rows of their own (CPU and CUDA alike, fp32):

* the key cache (``path_key_cache``: every key carried to the last position, ``H_last ... H_{j+1} k_j``, what
  ``path_attention(..., use_cache=True)`` adds to the forward) on the target shape's keys, against the same
  computation in plain PyTorch ops (``carried_keys_torch``: keys pushed through the later transforms of their
  64-token chunk, then through the product of the later chunks; fp32). Error: relative RMS error over every
  token against ``carried_keys_torch`` in fp64; tolerance the forward's (fp32 1e-5; about 4e-7 measured).
* a decoding step (``path_decode_step`` on a ``PathCache`` of B=1, H=8, D=64 and 4096 cached tokens: the rank-1
  update of every cached key by the new token's transform, the new key and value appended, attention over the
  cache; one fused kernel) against the same step in plain PyTorch ops (``decode_step_torch``: the rank-1 update
  and SDPA over the cache, fp32). Every timed call runs one step on the same cache with its length reset, so the
  work per call is the same. Error: the largest relative RMS error of o_t and of the updated cache (keys, values)
  against ``decode_step_torch`` in fp64 on copies of the same cache; tolerance the forward's (fp32 1e-5,
  tests/test_path_attention.py's decode contract; about 1.4e-6 measured). GB/s counts the cache's bytes read and
  written by the step (keys read and written, values read).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from blockops.attention import PathCache, path_attention, path_decode_step
from blockops.bench.harness import Result, forward_backward, rel_rms_error, time_ms
from blockops.ops.path_attention import path_key_cache
from blockops.reference import ref_path_attention

# The torch.ops.blockops ops this family's rows run (backward kernels included).
OPS = ("path_attention", "path_attention_backward", "path_key_cache", "path_decode_step")


@dataclasses.dataclass(frozen=True)
class Config:
    batch: int              # B
    seq_len: int            # T
    heads: int              # query heads HQ
    kv_heads: int           # key/value heads H (GQA when < heads)
    head_dim: int           # D = Dv
    dtype: torch.dtype      # q, k, v (w, beta, g are fp32)
    gate: bool = False      # PaTH-FoX forget gate


# The shape of the CPU targets, and the targets: forward / causal SDPA, backward / forward (issue 18).
TARGET_CPU = Config(1, 4096, 8, 8, 64, torch.float32)
TARGET_FWD_VS_SDPA = 2.5
TARGET_BWD_VS_FWD = 2.5
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


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    batch: int              # B: cache rows, all of `cached` tokens
    heads: int              # query heads HQ
    kv_heads: int           # key/value heads H
    head_dim: int           # D = Dv
    cached: int             # tokens in the cache before the step
    dtype: torch.dtype      # q_t, k_t, v_t (w_t, beta_t and the cache are fp32)


# Key-cache rows (`Config`: B, T, the key heads H = kv_heads, D, dtype) and decoding steps. Quick: the CPU targets'
# shape (B=1, H=8, T=4096, D=64, fp32), about a second each on 2 cores.
QUICK_KEY_CACHE = [TARGET_CPU]
FULL_KEY_CACHE = [TARGET_CPU, Config(1, 4096, 16, 4, 128, torch.float32), Config(4, 2048, 16, 16, 64, torch.float32)]
QUICK_DECODE = [DecodeConfig(1, 8, 8, 64, 4096, torch.float32)]
FULL_DECODE = QUICK_DECODE + [DecodeConfig(1, 16, 4, 128, 16384, torch.float32),
                              DecodeConfig(8, 16, 4, 64, 4096, torch.float32)]
# Chunk of carried_keys_torch (any size gives the same keys; 64 keeps its loops short and its tensors small).
_KEY_CHUNK = 64


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
    fp32); on CUDA `QUICK_GPU` / `FULL_GPU`. Then the key-cache and decoding rows (`QUICK_KEY_CACHE` and
    `QUICK_DECODE`, or the full lists), unless `configs` overrides the grid (e.g. `DOC_CPU`)."""
    results: list[Result] = []
    if configs is not None:
        for c in configs:
            results.extend(_run_config(c, device))
        return results
    on_gpu = torch.device(device).type == "cuda"
    for c in (QUICK_GPU if quick else FULL_GPU) if on_gpu else (QUICK_CPU if quick else FULL_CPU):
        results.extend(_run_config(c, device))
    results.extend(_key_cache_rows(QUICK_KEY_CACHE if quick else FULL_KEY_CACHE, device))
    results.extend(_decode_rows(QUICK_DECODE if quick else FULL_DECODE, device))
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
        notes.append(f"CPU target fwd <= {TARGET_FWD_VS_SDPA}x SDPA: "
                     f"{'met' if ratio <= TARGET_FWD_VS_SDPA else 'missed'} ({ratio:.2f}x)")
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
        met = bwd <= TARGET_BWD_VS_FWD * fwd
        notes.append(f"CPU target bwd <= {TARGET_BWD_VS_FWD}x fwd: {'met' if met else 'missed'} "
                     f"(bwd {bwd:.4g} ms = {bwd / fwd:.2f}x fwd)")
    if not ref_bwd_ok:
        notes.append("naive reference fwd+bwd not timed: its autograd graph is O(T^2 D) per head")
    results.append(row("path_attention fwd+bwd", both, "SDPA causal", sdpa_both, 3.5 * fwd_flops, "; ".join(notes)))
    if ref_bwd_ok:
        ref_ms = time_ms(forward_backward(ref, inputs, grad), device, **once)
        results.append(row("path_attention fwd+bwd", both, "naive reference (1 call)", ref_ms, 3.5 * fwd_flops))
    return results


def carried_keys_torch(k: torch.Tensor, w: torch.Tensor, beta: torch.Tensor, chunk: int = _KEY_CHUNK) -> torch.Tensor:
    """The key cache in plain PyTorch ops, in k's dtype: ``k_cache[:, j] = H_{T-1} ... H_{j+1} k[:, j]`` with
    ``H_t = I - beta_t w_t w_t^T`` (k, w [B, T, H, D], beta [B, T, H]). Chunked: each key is pushed through the later
    transforms of its own chunk (one rank-1 update per position, all chunks at once), then multiplied by the product
    of all later chunks' transforms (each chunk's product built the same way, then a suffix product over chunks)."""
    B, T, H, D = k.shape
    n = -(-T // chunk)
    pad = n * chunk - T            # padded positions: beta = 0, H = I
    dt = k.dtype
    kc = F.pad(k, (0, 0, 0, 0, 0, pad)).reshape(B, n, chunk, H, D).clone()
    wc = F.pad(w.to(dt), (0, 0, 0, 0, 0, pad)).reshape(B, n, chunk, H, D)
    bc = F.pad(beta.to(dt), (0, 0, 0, pad)).reshape(B, n, chunk, H)
    for s in range(1, chunk):      # the transform at position s of every chunk, on the chunk's earlier keys
        ws = wc[:, :, s, None]                                              # [B, n, 1, H, D]
        kc[:, :, :s] -= bc[:, :, s, None, :, None] * (kc[:, :, :s] * ws).sum(-1, keepdim=True) * ws
    eye = torch.eye(D, dtype=dt, device=k.device)
    M = eye.expand(B, n, H, D, D).clone()                                   # M[c] = H_last(c) ... H_first(c)
    for s in range(chunk):
        ws = wc[:, :, s]                                                    # [B, n, H, D]
        M -= bc[:, :, s, :, None, None] * ws[..., :, None] * (ws[..., None, :] @ M)
    Q = torch.empty_like(M)                                                 # Q[c] = M[n-1] ... M[c+1]
    Q[:, n - 1] = eye
    for c in range(n - 2, -1, -1):
        Q[:, c] = Q[:, c + 1] @ M[:, c + 1]
    out = torch.einsum("bnhij,bnshj->bnshi", Q, kc)
    return out.reshape(B, n * chunk, H, D)[:, :T]


def _key_cache_rows(configs: list[Config], device: str) -> list[Result]:
    results = []
    for c in configs:
        _, k, _, w, beta, _ = _inputs(c, device)
        ours_out = path_key_cache(k, w, beta)
        err = rel_rms_error(ours_out, carried_keys_torch(k.double(), w.double(), beta.double()))
        del ours_out
        ours = time_ms(lambda: path_key_cache(k, w, beta), device)
        kf, wf, bf = k.float(), w.float(), beta.float()
        base = time_ms(lambda: carried_keys_torch(kf, wf, bf), device, warmup=1, min_repeats=3, min_seconds=0.0)
        dt = str(c.dtype).replace("torch.", "")
        moved = (2 * k.numel() * k.element_size() + w.numel() * w.element_size() + beta.numel() * beta.element_size())
        results.append(Result("path_attention", "path_key_cache", f"B={c.batch} T={c.seq_len} H={c.kv_heads} "
                              f"D={c.head_dim} {dt}", device, ours, "PyTorch ops, chunked (fp32)", base,
                              bytes_moved=moved, max_error=err, tolerance=TOL[c.dtype][0]))
    return results


def decode_step_torch(q_t, k_t, v_t, w_t, beta_t, keys, values, length: int, scale: float) -> torch.Tensor:
    """One decoding step in plain PyTorch ops, in the cache's dtype, on a cache without a forget gate whose rows all
    hold `length` keys (tests/test_path_attention.py's decode_step_torch, without the gate and per-row lengths): the
    rank-1 update ``k_j <- k_j - beta_t (k_j . w_t) w_t`` of the cached keys and the new key and value at `length`
    (keys and values updated in place), then SDPA of q_t over the length + 1 keys. Returns o_t [B, HQ, Dv]."""
    dt = keys.dtype
    w = w_t.to(dt)[:, :, None, :]                                           # [B, H, 1, D]
    old = keys[:, :, :length]
    old -= beta_t.to(dt)[:, :, None, None] * (old @ w.transpose(-1, -2)) * w
    keys[:, :, length] = k_t.to(dt)
    values[:, :, length] = v_t.to(dt)
    o = F.scaled_dot_product_attention(q_t.to(dt)[:, :, None], keys[:, :, :length + 1], values[:, :, :length + 1],
                                       scale=scale, enable_gqa=q_t.shape[1] != k_t.shape[1])
    return o[:, :, 0]


def _decode_rows(configs: list[DecodeConfig], device: str) -> list[Result]:
    results = []
    for c in configs:
        gen = torch.Generator(device=device).manual_seed(2)

        def randn(*shape):
            return torch.randn(*shape, device=device, generator=gen)

        B, HQ, H, D, n = c.batch, c.heads, c.kv_heads, c.head_dim, c.cached
        capacity = n + 64      # room for the new token: the cache never grows in a timed call
        keys = torch.zeros(B, H, capacity, D, device=device)
        values = torch.zeros(B, H, capacity, D, device=device)
        keys[:, :, :n], values[:, :, :n] = randn(B, H, n, D), randn(B, H, n, D)
        lengths = torch.full((B,), n, dtype=torch.int64, device=device)
        q_t, k_t, v_t = (randn(B, heads, D).to(c.dtype) for heads in (HQ, H, H))
        w_t = F.normalize(randn(B, H, D), dim=-1)
        beta_t = 2 * torch.sigmoid(randn(B, H))
        scale = D ** -0.5
        step = (q_t, k_t, v_t, w_t, beta_t, None)

        cache = PathCache(keys.clone(), values.clone(), lengths)
        o = path_decode_step(*step, cache)
        ref_keys, ref_values = keys.double(), values.double()
        ref = decode_step_torch(q_t, k_t, v_t, w_t, beta_t, ref_keys, ref_values, n, scale)
        err = max(rel_rms_error(o, ref), rel_rms_error(cache.keys[:, :, :n + 1], ref_keys[:, :, :n + 1]),
                  rel_rms_error(cache.values[:, :, :n + 1], ref_values[:, :, :n + 1]))
        del ref_keys, ref_values

        def ours_step():
            cache.lengths = lengths    # the same step every call (the kernel updates the cached keys in place)
            return path_decode_step(*step, cache)

        ours = time_ms(ours_step, device)
        base_keys, base_values = keys.clone(), values.clone()
        base = time_ms(lambda: decode_step_torch(q_t, k_t, v_t, w_t, beta_t, base_keys, base_values, n, scale),
                       device)
        dt = str(c.dtype).replace("torch.", "")
        moved = B * H * n * (2 * D + D) * 4
        flops = 4.0 * B * H * n * D + 4.0 * B * HQ * n * D
        results.append(Result("path_attention", "path_decode_step", f"B={B} H={HQ}/{H} D={D} cached={n} {dt}",
                              device, ours, "PyTorch rank-1 update + SDPA", base, bytes_moved=moved, flops=flops,
                              max_error=err, tolerance=TOL[c.dtype][0]))
    return results
