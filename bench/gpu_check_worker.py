"""Child process of bench/gpu_check.py: runs the compute-sanitizer cases of one kernel family, or the benchmark items,
one item at a time, and reports each on the record pipe of gpu_check.py (``GPU_CHECK_FD``).

    python bench/gpu_check_worker.py sanitizer --family F --device cuda [--skip FILE]
    python bench/gpu_check_worker.py bench --items ID,ID,... --device cuda [--tiny] [--smoke] [--skip FILE]

Records (one JSON object per line): ``items`` (the ids this process will run), then per item ``start`` and ``end``
(outcome ``ok`` or ``error``, seconds, the kernel counters that moved, the error's last lines; bench items add their
rows). After an item fails on CUDA, the worker checks that the CUDA context still works; if not (an illegal address,
a device-side assert: every later call in this process would fail too) it sends ``context_lost`` and exits with
gpu_check.EXIT_CONTEXT_LOST, and gpu_check.py starts a fresh process for the items left.

Sanitizer cases (``CASES``): every op's CUDA kernel at a tiny, awkward shape, one case per kernel path that the
launcher chooses (GEMV / tensor-core / dequantize + cuBLAS, simple / mma attention, ...); ``expect`` names the kernel
counters a case must move on CUDA, so a case that silently took another path says so (``path_ok``). On the CPU (the
dry run) the same cases run the CPU kernels and ``expect`` is not checked.

Bench items (``BENCH_ITEMS``): the goal shapes of docs/performance.md through the family modules of
``blockops.bench`` (baseline in the same run, error and tolerance on every row); ``--tiny`` gives each item a
CPU-sized shape for the dry run. ``limits`` measures the device's copy bandwidth and bf16 GEMM rate in the same run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_check  # noqa: E402  (stdlib only: the record protocol and planted faults)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------------
# Sanitizer cases: family -> [(name, fn(device), expected CUDA counters)]
# ---------------------------------------------------------------------------------------------------------------------

def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, device, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=_gen(seed)).to(device=device, dtype=dtype)


def _cuda_init(device):
    x = torch.ones(1024, device=device)
    return (x * 2).sum().item()


def _bitpack_cases():
    import blockops

    def pack(bits, dim, shape):
        def run(device):
            values = torch.randint(0, 2 ** bits, shape, generator=_gen(), dtype=torch.uint8).to(device)
            return blockops.pack_bits(values, bits, dim)
        return run

    def unpack(bits, dim, shape):
        def run(device):
            values = torch.randint(0, 2 ** bits, shape, generator=_gen(), dtype=torch.uint8).to(device)
            packed = blockops.pack_bits(values, bits, dim)
            return blockops.unpack_bits(packed, bits, shape[dim], dim)
        return run

    return [("pack_bits 3b dim0 70x33", pack(3, 0, (70, 33)), ["pack_bits.cuda"]),
            ("pack_bits 4b dim1 9x41", pack(4, 1, (9, 41)), ["pack_bits.cuda"]),
            ("unpack_bits 3b dim0 70x33", unpack(3, 0, (70, 33)), ["unpack_bits.cuda"]),
            ("unpack_bits 2b dim1 5x77", unpack(2, 1, (5, 77)), ["unpack_bits.cuda"])]


def _with_env(name, value, run):
    """A case run with `name`=`value` (the Hopper kernels' dispatch switches), e.g. to keep the Ampere kernels'
    cases on the Ampere kernels when the GPU is an sm_90."""
    def wrapped(device):
        with _env(name, value):
            return run(device)
    return wrapped


def _lowbit_cases():
    from blockops import ops
    from blockops.bench.lowbit import Config, _weights

    def linear(bits, group, rows, dtype, bias=False):
        def run(device):
            qweight, scales, zeros = _weights(Config(640, 72, bits, group, rows), device, torch.float16)
            x = _randn(rows, 640, device=device, dtype=dtype)
            b = _randn(72, device=device, dtype=dtype, seed=1) if bias else None
            return ops.quant_linear(x, qweight, scales, zeros, bits, group, b)
        return run

    def dequantize(device):
        qweight, scales, zeros = _weights(Config(640, 72, 3, 64, 0), device, torch.float16)
        return ops.quant_dequantize(qweight, scales, zeros, 3, 64)

    def backward(device):
        qweight, scales, zeros = _weights(Config(640, 72, 2, 64, 5), device, torch.float32)
        x = _randn(5, 640, device=device).requires_grad_(True)
        s = scales.clone().requires_grad_(True)
        ops.quant_linear(x, qweight, s, zeros, 2, 64).sum().backward()
        return x.grad, s.grad

    gemv, mma = ["quant_linear.cuda"], ["quant_linear.cuda", "quant_linear_mma.cuda"]
    wgmma = ["quant_linear.cuda", "quant_linear_wgmma.cuda"]
    return [("quant_linear GEMV w2g64 M=3 fp16 +bias", linear(2, 64, 3, torch.float16, True), gemv),
            ("quant_linear GEMV w3g64 M=1 bf16", linear(3, 64, 1, torch.bfloat16), gemv),
            ("quant_linear GEMV w4g128 M=8 fp32", linear(4, 128, 8, torch.float32), gemv),
            ("quant_linear mma w2g64 M=24 fp16", linear(2, 64, 24, torch.float16), mma),
            ("quant_linear mma w4g128 M=64 bf16 +bias", linear(4, 128, 64, torch.bfloat16, True), mma),
            ("quant_linear dequantize+cuBLAS w2g64 M=80 fp16 (BLOCKOPS_LOWBIT_WGMMA=0)",
             _with_env("BLOCKOPS_LOWBIT_WGMMA", "0", linear(2, 64, 80, torch.float16)), gemv),
            ("quant_linear Hopper wgmma w2g64 M=80 fp16", linear(2, 64, 80, torch.float16), wgmma),
            ("quant_linear Hopper wgmma w3g64 M=257 bf16 +bias", linear(3, 64, 257, torch.bfloat16, True), wgmma),
            ("quant_linear Hopper wgmma w4g128 M=100 fp16", linear(4, 128, 100, torch.float16), wgmma),
            ("quant_dequantize w3g64", dequantize, ["quant_dequantize.cuda"]),
            ("quant_linear backward w2g64 M=5 fp32 (x, scales)", backward,
             ["quant_linear_grad_input.cuda", "quant_grad_scales.cuda"])]


def _attention_cases():
    from blockops.attention import block_sparse_attention, masks

    def case(T, H, HK, D, dtype, block, pattern, backward):
        def run(device):
            q = _randn(1, H, T, D, device=device, dtype=dtype, seed=0)
            k = _randn(1, HK, T, D, device=device, dtype=dtype, seed=1)
            v = _randn(1, HK, T, D, device=device, dtype=dtype, seed=2)
            sizes = dict(block_q=block, block_kv=block, device=device)
            if pattern == "causal":
                mask = masks.causal(T, **sizes)
            elif pattern == "longgen":
                mask = masks.sink_window_strided(T, sink=block, window=T // 4, stride=3, **sizes)
            else:
                mask = masks.topk_blocks(q, k, keep_ratio=0.3, block_size=block)
            if not backward:
                return block_sparse_attention(q, k, v, mask)
            leaves = [t.requires_grad_(True) for t in (q, k, v)]
            block_sparse_attention(*leaves, mask).float().square().sum().backward()
            return [t.grad for t in leaves]
        return run

    fwd, bwd = "block_sparse_attention.cuda", "block_sparse_attention_backward.cuda"
    fwd_mma, bwd_mma = "block_sparse_attention_mma.cuda", "block_sparse_attention_backward_mma.cuda"
    fwd_wgmma = "block_sparse_attention_wgmma.cuda"
    ampere = lambda run: _with_env("BLOCKOPS_ATTENTION_WGMMA", "0", run)  # noqa: E731  (the mma.sync forward on sm_90)
    return [("simple fwd+bwd fp32 causal T=100 H=4/2 D=40 blk=32",
             case(100, 4, 2, 40, torch.float32, 32, "causal", True), [fwd, bwd]),
            ("mma fwd+bwd bf16 longgen T=256 H=2 D=64 blk=64",
             ampere(case(256, 2, 2, 64, torch.bfloat16, 64, "longgen", True)), [fwd, fwd_mma, bwd, bwd_mma]),
            ("mma fwd+bwd fp16 jenga T=200 H=4/1 D=128 blk=128",
             ampere(case(200, 4, 1, 128, torch.float16, 128, "jenga", True)), [fwd, fwd_mma, bwd, bwd_mma]),
            ("mma fwd + simple bwd bf16 causal T=96 H=2 D=256 blk=32",
             ampere(case(96, 2, 2, 256, torch.bfloat16, 32, "causal", True)), [fwd, fwd_mma, bwd]),
            ("Hopper wgmma fwd bf16 causal T=333 H=4/2 D=128 blk=128",
             case(333, 4, 2, 128, torch.bfloat16, 128, "causal", False), [fwd, fwd_wgmma]),
            ("Hopper wgmma fwd fp16 longgen T=300 H=2 D=64 blk=128",
             case(300, 2, 2, 64, torch.float16, 128, "longgen", False), [fwd, fwd_wgmma]),
            ("Hopper wgmma fwd bf16 jenga T=257 H=2/1 D=256 blk=128",
             case(257, 2, 1, 256, torch.bfloat16, 128, "jenga", False), [fwd, fwd_wgmma])]


def _path_attention_cases():
    from blockops.attention import PathCache, path_attention, path_decode_step

    def inputs(B, T, HQ, H, D, dtype, device, gate):
        q = _randn(B, T, HQ, D, device=device, dtype=dtype, seed=0)
        k = _randn(B, T, H, D, device=device, dtype=dtype, seed=1)
        v = _randn(B, T, H, D, device=device, dtype=dtype, seed=2)
        w = F.normalize(_randn(B, T, H, D, device=device, seed=3), dim=-1)
        beta = 2 * torch.sigmoid(_randn(B, T, H, device=device, seed=4))
        g = F.logsigmoid(_randn(B, T, HQ, device=device, seed=5) + 3) if gate else None
        return q, k, v, w, beta, g

    def fwd_bwd(B, T, HQ, H, D, dtype, gate, cu=None):
        def run(device):
            q, k, v, w, beta, g = inputs(B, T, HQ, H, D, dtype, device, gate)
            leaves = [t.requires_grad_(True) for t in (q, k, v, w, beta) + ((g,) if gate else ())]
            cu_seqlens = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=device)
            o, _ = path_attention(*leaves[:5], leaves[5] if gate else None, cu_seqlens=cu_seqlens)
            o.float().square().sum().backward()
            return [t.grad for t in leaves]
        return run

    def forward_with_cache(device):
        q, k, v, w, beta, _ = inputs(1, 130, 4, 4, 64, torch.bfloat16, device, False)
        return path_attention(q, k, v, w, beta, use_cache=True)

    def decode(device):
        B, HQ, H, D, n = 2, 4, 2, 32, 40
        keys = torch.zeros(B, H, n + 8, D, device=device)
        values = torch.zeros(B, H, n + 8, D, device=device)
        keys[:, :, :n] = _randn(B, H, n, D, device=device, seed=6)
        values[:, :, :n] = _randn(B, H, n, D, device=device, seed=7)
        cache = PathCache(keys, values, torch.tensor([n, n - 13], dtype=torch.int64, device=device))
        q_t, k_t, v_t = (_randn(B, h, D, device=device, seed=8 + i) for i, h in enumerate((HQ, H, H)))
        w_t = F.normalize(_randn(B, H, D, device=device, seed=11), dim=-1)
        beta_t = 2 * torch.sigmoid(_randn(B, H, device=device, seed=12))
        return path_decode_step(q_t, k_t, v_t, w_t, beta_t, None, cache)

    fwd, bwd = "path_attention.cuda", "path_attention_backward.cuda"
    return [("fwd+bwd fp32 gate T=70 H=4/2 D=32", fwd_bwd(1, 70, 4, 2, 32, torch.float32, True), [fwd, bwd]),
            ("fwd+bwd bf16 T=130 H=2/2 D=64 B=2", fwd_bwd(2, 130, 2, 2, 64, torch.bfloat16, False), [fwd, bwd]),
            ("fwd+bwd fp16 varlen cu_seqlens=[0,37,100] H=2/1 D=40",
             fwd_bwd(1, 100, 2, 1, 40, torch.float16, False, [0, 37, 100]), [fwd, bwd]),
            ("fwd bf16 T=130 D=64 + key cache", forward_with_cache, [fwd, "path_key_cache.cuda"]),
            ("decode step fp32 B=2 H=4/2 D=32 lengths 40/27", decode, ["path_decode_step.cuda"])]


def _vq_cases():
    from blockops import vq
    from blockops.bench.vq import Config, _weights

    def linear(rows, fmt, dtype, bias=False):
        def run(device):
            codes, codebooks, scales = (t.to(device) for t in _weights(Config(256, 72, rows, fmt), dtype))
            x = _randn(rows, 256, device=device, dtype=dtype)
            b = _randn(72, device=device, dtype=dtype, seed=1) if bias else None
            return vq.vq_linear(x, codes, codebooks, scales, b)
        return run

    def dequantize(device):
        codes, codebooks, scales = (t.to(device) for t in _weights(Config(256, 72, 0, "aqlm2x8"), torch.float16))
        return vq.vq_dequantize(codes, codebooks, scales)

    def backward(device):
        codes, codebooks, scales = (t.to(device) for t in _weights(Config(256, 72, 6, "2-bit"), torch.float32))
        leaves = [t.clone().requires_grad_(True) for t in (_randn(6, 256, device=device), codebooks, scales)]
        vq.vq_linear(leaves[0], codes, leaves[1], leaves[2]).square().sum().backward()
        return [t.grad for t in leaves]

    lin = "vq_linear.cuda"
    return [("vq_linear GEMV 2-bit M=2 fp16 +bias", linear(2, "2-bit", torch.float16, True),
             [lin, "vq_linear_gemv.cuda"]),
            ("vq_linear GEMV AQLM 2x8 M=8 bf16", linear(8, "aqlm2x8", torch.bfloat16), [lin, "vq_linear_gemv.cuda"]),
            ("vq_linear mma 2-bit M=24 fp16", linear(24, "2-bit", torch.float16), [lin, "vq_linear_mma.cuda"]),
            ("vq_linear simt 3-bit M=20 fp32", linear(20, "3-bit", torch.float32), [lin, "vq_linear_simt.cuda"]),
            ("vq_dequantize AQLM 2x8", dequantize, ["vq_dequantize.cuda"]),
            ("vq_linear backward 2-bit M=6 fp32 (x, codebooks, scales)", backward,
             ["vq_linear_grad_input.cuda", "vq_grad_codebooks.cuda", "vq_grad_scales.cuda"])]


def _ptq161_cases():
    from blockops import ptq161
    from blockops.bench.ptq161 import Config, packed_weights

    def linear(rows, dtype):
        def run(device):
            tensors, s = packed_weights(Config(333, 72, rows), device)
            x = _randn(rows, 333, device=device, dtype=dtype)
            return ptq161.ptq161_linear(x, *[tensors[k] for k in ptq161.FIELDS], s)
        return run

    def dequantize(device):
        tensors, s = packed_weights(Config(333, 72, 0), device)
        return ptq161.ptq161_dequantize(*[tensors[k] for k in ptq161.FIELDS], s)

    def backward(device):
        tensors, s = packed_weights(Config(333, 72, 3), device, factor_dtype=torch.float32)
        x = _randn(3, 333, device=device).requires_grad_(True)
        params = {k: tensors[k].clone().requires_grad_(True) for k in ("alpha", "r1", "r2")}
        args = [{**tensors, **params}[k] for k in ptq161.FIELDS]
        ptq161.ptq161_linear(x, *args, s).square().sum().backward()
        return x.grad, [p.grad for p in params.values()]

    lin = "ptq161_linear.cuda"
    return [("ptq161_linear GEMV M=5 fp16", linear(5, torch.float16), [lin, "ptq161_linear_gemv.cuda"]),
            ("ptq161_linear GEMV M=1 fp32", linear(1, torch.float32), [lin, "ptq161_linear_gemv.cuda"]),
            ("ptq161_linear decoded blocks + cuBLAS M=12 bf16", linear(12, torch.bfloat16), [lin]),
            ("ptq161_dequantize 333x72", dequantize, ["ptq161_dequantize.cuda"]),
            ("ptq161_linear backward M=3 fp32 (x, alpha, r1, r2)", backward, ["ptq161_linear_backward.cuda"])]


def _dllm_cases():
    from blockops import dllm

    def unmask(B, L, V, dtype, **rule):
        def run(device):
            logits = (_randn(B, L, V, device=device) * 4).to(dtype)
            masked = (torch.rand(B, L, generator=_gen(1)) < 0.7).to(device)
            bounds = torch.tensor([[0, L], [1, L - 2]] * B, dtype=torch.int64, device=device)[:B].contiguous()
            kwargs = dict(rule)
            if "min_tokens" in kwargs:
                kwargs["min_tokens"] = torch.full((B,), kwargs["min_tokens"], dtype=torch.int64, device=device)
            return dllm.unmask(logits, masked, bounds, **kwargs)
        return run

    def overwrite(device):
        cache = _randn(2, 3, 40, 16, device=device, dtype=torch.bfloat16)
        new = _randn(2, 3, 5, 16, device=device, dtype=torch.bfloat16, seed=1)
        positions = torch.tensor([[0, 3, 4, 20, 39], [1, 2, 30, 31, 38]], dtype=torch.int64, device=device)
        dllm.kv_overwrite(cache, new, positions)
        return cache

    return [("unmask threshold fp32 B=2 L=16 V=1000", unmask(2, 16, 1000, torch.float32, threshold=0.9),
             ["dllm_unmask.cuda"]),
            ("unmask factor bf16 B=3 L=8 V=50000 min_tokens=2", unmask(3, 8, 50000, torch.bfloat16, factor=1.0,
                                                                      min_tokens=2), ["dllm_unmask.cuda"]),
            ("kv_overwrite bf16 B=2 H=3 S=40 n=5 D=16", overwrite, ["dllm_kv_overwrite.cuda"])]


def _block_cache_cases():
    from blockops import block_cache as bc

    def relative_l1(device):
        a, b = _randn(2, 33, 20, device=device), _randn(2, 33, 20, device=device, seed=1)
        return bc.relative_l1(a, b, 2, True)

    def residual(device):
        out, x, ref = (_randn(2, 17, 24, device=device, dtype=torch.bfloat16, seed=i) for i in range(3))
        r = torch.empty_like(out)
        return bc.relative_l1_residual(out, x, ref, r, 1, False, True), r

    def apply(device):
        x, r = _randn(3, 19, device=device, dtype=torch.float16), _randn(3, 19, device=device, dtype=torch.float16)
        return bc.apply_residual(x, r)

    def update(device):
        cache, value = _randn(4, 37, device=device), _randn(4, 37, device=device, seed=1)
        bc.cache_update(cache, value)
        bc.cache_update(cache, value * 2, torch.tensor([True], device=device))
        bc.cache_update(cache, value * 3, torch.tensor([0.0], device=device))
        return cache

    return [("relative_l1 fp32 stride 2 per-sample [2,33,20]", relative_l1, ["relative_l1.cuda"]),
            ("relative_l1_residual bf16 compare_residual [2,17,24]", residual, ["relative_l1_residual.cuda"]),
            ("apply_residual fp16 [3,19]", apply, ["apply_residual.cuda"]),
            ("cache_update fp32 plain, gate True, gate 0.0 [4,37]", update, ["cache_update.cuda"])]


CASES = {
    "bitpack": _bitpack_cases,
    "lowbit": _lowbit_cases,
    "attention": _attention_cases,
    "path_attention": _path_attention_cases,
    "vq": _vq_cases,
    "ptq161": _ptq161_cases,
    "dllm": _dllm_cases,
    "block_cache": _block_cache_cases,
}


# ---------------------------------------------------------------------------------------------------------------------
# Bench items: id -> (fn(device, tiny) -> list[Result], goal)
# ---------------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Goal:
    """A goal of docs/performance.md for some rows of an item: rows whose baseline starts with `baseline` and whose
    op starts with `op` meet it when speed-up >= min_speedup and TFLOP/s >= min_tflops."""
    text: str
    baseline: str = ""
    min_speedup: float = 0.0
    min_tflops: float = 0.0
    op: str = ""

    def applies(self, row) -> bool:
        return row.baseline.startswith(self.baseline) and row.op.startswith(self.op)

    def met(self, row) -> bool:
        return row.speedup >= self.min_speedup and row.tflops >= self.min_tflops


def _limits(device, tiny):
    """The device's two ceilings, measured in the same run: a device-to-device copy (bytes read + written) and a
    square bf16 matrix product (random data)."""
    from blockops.bench.harness import Result, time_ms

    n = (1 << 22) if tiny else (1 << 30)       # bytes per buffer: 1 GiB on the GPU
    a = torch.rand(n // 4, device=device)
    b = torch.empty_like(a)
    copy_ms = time_ms(lambda: b.copy_(a), device)
    del a, b
    m = 256 if tiny else 8192
    x = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    y = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    gemm_ms = time_ms(lambda: x @ y, device)
    size = f"{n >> 20} MiB" if n >= (1 << 20) else f"{n} B"
    return [Result("limits", "device copy (read + write)", f"fp32 {size}", device, copy_ms, "-", float("nan"),
                   bytes_moved=2.0 * n, note="measured copy bandwidth: the GB/s ceiling of this run"),
            Result("limits", "bf16 GEMM (torch.matmul)", f"{m}x{m}x{m}", device, gemm_ms, "-", float("nan"),
                   flops=2.0 * m ** 3, note="measured tensor-core rate: the TFLOP/s ceiling of this run")]


def _bitpack(device, tiny):
    from blockops.bench import bitpack

    return bitpack.run(device, configs=[bitpack.Config(256, 256, 2, 0) if tiny else bitpack.Config(4096, 4096, 2, 0)])


def _lowbit(in_features, out_features, rows):
    def run(device, tiny):
        from blockops.bench import lowbit
        from blockops.bench.harness import SharedReferences

        c = lowbit.Config(256, 512, 2, 64, rows) if tiny else lowbit.Config(in_features, out_features, 2, 64, rows)
        return lowbit._gemm_rows([c], device, SharedReferences(device))
    return run


def _vq(rows):
    def run(device, tiny):
        from blockops.bench import vq

        return vq.run(device, configs=[vq.Config(256, 512, rows, "2-bit") if tiny else vq.Config(4096, 11008, rows,
                                                                                                   "2-bit")])
    return run


def _ptq161(rows):
    def run(device, tiny):
        from blockops.bench import ptq161
        from blockops.bench.harness import SharedReferences

        c = ptq161.Config(256, 512, rows) if tiny else ptq161.Config(4096, 14336, rows)
        return ptq161._gemm_rows([c], device, SharedReferences(device))
    return run


def _attention_inputs(pattern, device, tiny):
    """The attention items' case: blockops.bench.attention's config at the GPU goal's shape (T=16384, H=16, D=128,
    bf16, 128x128 blocks; a CPU-sized one with `tiny`), q/k/v and the pattern's mask, and the shape's label."""
    from blockops.bench import attention as A

    c = (A.Config(pattern, 256, 2, 2, 32, torch.float32, 32) if tiny
         else A.Config(pattern, 16384, 16, 16, 128, torch.bfloat16, 128))
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(c.batch, h, c.seq_len, c.head_dim, device=device, generator=gen, dtype=c.dtype)
               for h in (c.heads, c.kv_heads, c.kv_heads))
    dt = str(c.dtype).replace("torch.", "")
    return c, q, k, v, A.make_mask(c, q, k), f"B={c.batch} T={c.seq_len} H={c.heads}/{c.kv_heads} D={c.head_dim} {dt}"


def _attention(pattern, backward):
    """Forward (and forward+backward) of one pattern at the GPU goal's shape (T=16384, H=16, D=128, bf16, 128x128
    blocks) against SDPA: blockops.bench.attention's rows without the compiled-flex baseline (its compilation alone
    would take a good part of the bench budget)."""
    def run(device, tiny):
        from blockops.attention import block_sparse_attention
        from blockops.bench import attention as A
        from blockops.bench.harness import Result, forward_backward, time_ms

        c, q, k, v, mask, label = _attention_inputs(pattern, device, tiny)
        density = mask.density()
        tiles = density.tiles * mask.num_q_blocks * mask.num_kv_blocks
        flops = 4.0 * c.batch * c.heads * tiles * c.block * c.block * c.head_dim
        fwd_err, both_err = A._errors(c, q, k, v, mask, block_sparse_attention(q, k, v, mask))
        causal = pattern in A.CAUSAL_PATTERNS
        shape = f"{label} blk={c.block} tiles={density.tiles:.1%}"
        baseline = f"SDPA {'causal' if causal else 'dense'}"
        ours = time_ms(lambda: block_sparse_attention(q, k, v, mask), device)
        base = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), device)
        rows = [Result("attention", f"fwd {pattern}", shape, device, ours, baseline, base, flops=flops,
                       max_error=fwd_err, tolerance=A.TOL[c.dtype])]
        if backward:
            for x in (q, k, v):
                x.requires_grad_(True)
            grad = torch.randn_like(q)
            ours = time_ms(forward_backward(lambda: block_sparse_attention(q, k, v, mask), (q, k, v), grad), device)
            base = time_ms(forward_backward(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                                            (q, k, v), grad), device)
            rows.append(Result("attention", f"fwd+bwd {pattern}", shape, device, ours, baseline, base,
                               flops=3.5 * flops, max_error=both_err, tolerance=2 * A.TOL[c.dtype]))
        return rows
    return run


def _env(name, value):
    """Sets an environment variable for the duration (the dispatch switches of the Hopper kernels are read per call)."""
    return mock.patch.dict(os.environ, {name: value})


def _attention_hopper(device, tiny):
    """Issue 21's Hopper forward (attention_wgmma.cu: TMA + wgmma, producer warp + consumer warpgroups) against the
    Ampere mma.sync forward on the same call (BLOCKOPS_ATTENTION_WGMMA=0), at T=16384 bf16 128x128 blocks, LongGen and
    causal masks, D = 64, 128, 256: TFLOP/s on computed tiles and, in the summary, the fraction of the H200's
    tensor-core peak. Which kernel ran is in the item's counters (block_sparse_attention_wgmma.cuda)."""
    from blockops.attention import block_sparse_attention
    from blockops.bench import attention as A
    from blockops.bench.harness import Result, max_rel_error, time_ms

    rows = []
    for pattern in ("longgen", "causal"):
        for head_dim in ((32,) if tiny else (64, 128, 256)):
            c = (A.Config(pattern, 256, 2, 2, head_dim, torch.float32, 32) if tiny
                 else A.Config(pattern, 16384, 16, 16, head_dim, torch.bfloat16, 128))
            gen = torch.Generator(device=device).manual_seed(0)
            q, k, v = (torch.randn(c.batch, h, c.seq_len, c.head_dim, device=device, generator=gen, dtype=c.dtype)
                       for h in (c.heads, c.kv_heads, c.kv_heads))
            mask = A.make_mask(c, q, k)
            density = mask.density()
            flops = 4.0 * c.batch * c.heads * density.tiles * mask.num_q_blocks * mask.num_kv_blocks * c.block ** 2 * \
                c.head_dim
            with _env("BLOCKOPS_ATTENTION_WGMMA", "0"):
                ampere_out = block_sparse_attention(q, k, v, mask)
                ampere = time_ms(lambda: block_sparse_attention(q, k, v, mask), device)
            out = block_sparse_attention(q, k, v, mask)
            err = max_rel_error(out.float(), ampere_out.float())
            ours = time_ms(lambda: block_sparse_attention(q, k, v, mask), device)
            dt = str(c.dtype).replace("torch.", "")
            shape = f"T={c.seq_len} H={c.heads} D={head_dim} {dt} blk={c.block} tiles={density.tiles:.1%}"
            rows.append(Result("attention", f"fwd {pattern} (Hopper wgmma)", shape, device, ours,
                               "mma.sync forward (BLOCKOPS_ATTENTION_WGMMA=0)", ampere, flops=flops, max_error=err,
                               tolerance=A.TOL[c.dtype], note="error: against the Ampere kernel's output"))
            del q, k, v, out, ampere_out
    return rows


def _lowbit_hopper(device, tiny):
    """Issue 21's Hopper low-bit prefill GEMM (lowbit_wgmma.cu: TMA + wgmma with weights dequantized in registers)
    against the path it replaces above 64 rows (dequantize + cuBLAS, BLOCKOPS_LOWBIT_WGMMA=0) and against cuBLAS on
    fp16 weights: 4096x14336 w2g64 / w4g128, 256 .. 4096 rows of fp16 activations, TFLOP/s (fraction of the
    tensor-core peak in the summary). Which kernel ran: counter quant_linear_wgmma.cuda."""
    from blockops import ops
    from blockops.bench import lowbit
    from blockops.bench.harness import Result, max_rel_error, time_ms
    from blockops.reference import ref_quant_dequantize

    cuda = torch.device(device).type == "cuda"
    act = torch.float16 if cuda else torch.float32
    rows = []
    for bits, group in ((2, 64), (4, 128)):
        c0 = lowbit.Config(256, 512, bits, group, 1) if tiny else lowbit.Config(4096, 14336, bits, group, 1)
        qweight, scales, zeros = lowbit._weights(c0, device, torch.float16)
        w_ref = ref_quant_dequantize(qweight, scales, zeros, bits, group)
        dense = w_ref.to(act)
        for m in ((65, 130) if tiny else (256, 1024, 4096)):
            x = torch.randn(m, c0.in_features, device=device, dtype=act)
            call = lambda: ops.quant_linear(x, qweight, scales, zeros, bits, group)  # noqa: E731
            err = max_rel_error(call(), x.float() @ w_ref.t())
            ours = time_ms(call, device)
            with _env("BLOCKOPS_LOWBIT_WGMMA", "0"):
                old = time_ms(call, device)
            cublas = time_ms(lambda: F.linear(x, dense), device)
            flops = 2.0 * m * c0.in_features * c0.out_features
            shape = f"{c0.in_features}x{c0.out_features} M={m}"
            op = f"quant_linear w{bits}g{group} (Hopper wgmma)"
            rows.append(Result("lowbit", op, shape, device, ours, "dequantize + cuBLAS (BLOCKOPS_LOWBIT_WGMMA=0)", old,
                               flops=flops, max_error=err, tolerance=lowbit.tolerance(act)))
            rows.append(Result("lowbit", op, shape, device, ours, "F.linear fp16 (cuBLAS)", cublas, flops=flops,
                               max_error=err, tolerance=lowbit.tolerance(act)))
            del x
        del qweight, scales, zeros, w_ref, dense
    return rows


def _ring_one_device(device, tiny):
    """blockops.distributed.ring_attention on a group of one rank (NCCL on the GPU, gloo in the CPU dry run) against
    block_sparse_attention on the same inputs, forward and forward+backward, LongGen mask at the attention goal's
    shape: what context parallelism costs on top of the kernels when no message moves (one GPU runs world size 1;
    the multi-rank rows need torchrun on several GPUs, bench/context_parallel)."""
    import tempfile

    import torch.distributed as dist
    from blockops.attention import block_sparse_attention
    from blockops.bench import attention as A
    from blockops.bench.harness import Result, forward_backward, max_rel_error, time_ms
    from blockops.distributed import ring_attention

    c, q, k, v, mask, label = _attention_inputs("longgen", device, tiny)
    shape = f"{label} blk={c.block} 1 rank"
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    with tempfile.TemporaryDirectory() as where:
        dist.init_process_group(backend, init_method=f"file://{where}/init", rank=0, world_size=1)
        try:
            ring = lambda: ring_attention(q, k, v, mask, layout="contiguous")  # noqa: E731
            err = max_rel_error(ring().float(), block_sparse_attention(q, k, v, mask).float())
            rows = [Result("attention", "ring_attention fwd longgen", shape, device, time_ms(ring, device),
                           "block_sparse_attention", time_ms(lambda: block_sparse_attention(q, k, v, mask), device),
                           max_error=err, tolerance=A.TOL[c.dtype], note="world size 1: the ring layer's own cost")]
            for x in (q, k, v):
                x.requires_grad_(True)
            grad = torch.randn_like(q)
            ours = time_ms(forward_backward(ring, (q, k, v), grad), device)
            base = time_ms(forward_backward(lambda: block_sparse_attention(q, k, v, mask), (q, k, v), grad), device)
            rows.append(Result("attention", "ring_attention fwd+bwd longgen", shape, device, ours,
                               "block_sparse_attention", base, note="world size 1"))
        finally:
            dist.destroy_process_group()
    return rows


def _path_long(device, tiny):
    """PaTH forward at the attention goal's shape (T=16384, H=16, D=128, bf16) against causal SDPA; error: relative
    RMS over the first tokens against the fp64 reference on those tokens (causal: they depend on nothing later). The
    backward (one CTA per sequence and key head: minutes at this length) is left to the small item."""
    from blockops.attention import path_attention
    from blockops.bench import path_attention as P
    from blockops.bench.harness import Result, rel_rms_error, time_ms
    from blockops.reference import ref_path_attention

    c = P.Config(1, 128, 2, 2, 32, torch.float32) if tiny else P.Config(1, 16384, 16, 16, 128, torch.bfloat16)
    q, k, v, w, beta, g = P._inputs(c, device)
    out = path_attention(q, k, v, w, beta, g)[0]
    n = 64 if tiny else 256
    ref = ref_path_attention(*(t[:1, :n].double() for t in (q, k, v, w, beta)))
    err = rel_rms_error(out[:1, :n], ref)
    del out, ref
    qs, ks, vs = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    ours = time_ms(lambda: path_attention(q, k, v, w, beta, g)[0], device, warmup=1, min_repeats=3, min_seconds=0.0)
    base = time_ms(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True), device)
    dt = str(c.dtype).replace("torch.", "")
    shape = f"B={c.batch} T={c.seq_len} H={c.heads}/{c.kv_heads} D={c.head_dim} {dt}"
    return [Result("path_attention", "path_attention fwd", shape, device, ours, "SDPA causal", base,
                   flops=2.0 * c.batch * c.heads * c.seq_len ** 2 * c.head_dim, max_error=err,
                   tolerance=P.TOL[c.dtype][0], note=f"error over the first {n} tokens")]


def _path_small(device, tiny):
    from blockops.bench import path_attention as P

    return P._run_config(P.Config(1, 64, 2, 2, 32, torch.float32) if tiny else P.QUICK_GPU[0], device)


def _path_decode(device, tiny):
    from blockops.bench import path_attention as P

    return P._decode_rows([P.DecodeConfig(1, 2, 2, 32, 64, torch.float32) if tiny else P.QUICK_DECODE[0]], device)


def _dllm_unmask(device, tiny):
    from blockops.bench import dllm

    if tiny:
        return dllm._unmask_rows([dllm.UnmaskConfig(1, 8, 1000, torch.float32)], device)
    return dllm._unmask_rows([dllm.UnmaskConfig(8, 32, 126464, dt) for dt in (torch.bfloat16, torch.float32)], device)


def _dllm_overwrite(device, tiny):
    """kv_overwrite of a block's keys (the dual cache's per-step write) against index_copy_ on the same cache;
    GB/s counts the new entries read and written."""
    from blockops import dllm
    from blockops.bench.harness import Result, max_abs_error, time_ms

    B, H, S, D, n = (1, 2, 64, 16, 8) if tiny else (8, 32, 4096, 128, 32)
    cache = _randn(B, H, S, D, device=device, dtype=torch.bfloat16)
    new = _randn(B, H, n, D, device=device, dtype=torch.bfloat16, seed=1)
    start = S // 2
    positions = (torch.arange(n, device=device) + start).expand(B, n).contiguous()
    want = cache.clone()
    want[:, :, start:start + n] = new
    dllm.kv_overwrite(cache, new, positions, check_indices=False)
    err = max_abs_error(cache, want)
    ours = time_ms(lambda: dllm.kv_overwrite(cache, new, positions, check_indices=False), device)
    index = positions[0]
    base = time_ms(lambda: cache.index_copy_(2, index, new), device)
    return [Result("dllm", "kv_overwrite bf16", f"B={B} H={H} S={S} D={D} n={n}", device, ours,
                   "index_copy_ (same positions in every row)", base, bytes_moved=2.0 * new.numel() * 2,
                   max_error=err, tolerance=0.0)]


def _block_cache(device, tiny):
    from blockops.bench import block_cache

    return block_cache.indicator_rows(device, quick=False, shapes=[(1, 64, 64)] if tiny else [(8, 4096, 1152)])


# In the order they run: the goals first, the extras last.
BENCH_ITEMS = {
    "limits": (_limits, None),
    "lowbit:4096x14336:M1": (_lowbit(4096, 14336, 1), Goal(">=5x cuBLAS", "F.linear", 5.0)),
    "lowbit:4096x14336:M16": (_lowbit(4096, 14336, 16), Goal(">=3.5x cuBLAS", "F.linear", 3.5)),
    "vq:4096x11008:M1": (_vq(1), Goal(">=4x cuBLAS", "F.linear", 4.0)),
    "vq:4096x11008:M16": (_vq(16), None),
    "ptq161:4096x14336:M1": (_ptq161(1), None),
    "ptq161:4096x14336:M16": (_ptq161(16), None),
    "attention:longgen": (_attention("longgen", True), Goal(">=400 TFLOP/s", "SDPA", 0.0, 400.0, "fwd ")),
    "attention:causal": (_attention("causal", False), Goal(">=400 TFLOP/s", "SDPA", 0.0, 400.0, "fwd ")),
    "attention:hopper-wgmma": (_attention_hopper, None),
    "lowbit:hopper-wgmma-prefill": (_lowbit_hopper, None),
    "path_attention:T16384": (_path_long, None),
    "dllm:unmask": (_dllm_unmask, None),
    "block_cache:indicator": (_block_cache, Goal(">=2x eager", "eager", 2.0)),
    "bitpack:pack2b": (_bitpack, None),
    "dllm:kv_overwrite": (_dllm_overwrite, None),
    "path_attention:decode": (_path_decode, None),
    "lowbit:8192x28672:M1": (_lowbit(8192, 28672, 1), Goal(">=5x cuBLAS", "F.linear", 5.0)),
    "path_attention:T1024-fwd+bwd": (_path_small, None),
    "attention:ring-longgen-1rank": (_ring_one_device, None),
}


def bench_family(item: str) -> str:
    return item.split(":", 1)[0]


# ---------------------------------------------------------------------------------------------------------------------
# The item loop
# ---------------------------------------------------------------------------------------------------------------------

def _counters(device_type: str) -> dict[str, int]:
    import blockops

    return {k: v for k, v in blockops.kernel_call_counts().items() if k.endswith("." + device_type)}


def _moved(before: dict, after: dict) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


def _synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _context_works(device: str) -> bool:
    if torch.device(device).type != "cuda":
        return True
    try:
        torch.cuda.synchronize()
        return (torch.ones(4, device=device) + 1).sum().item() == 8.0
    except Exception:  # noqa: BLE001 - any error here means the context is gone
        return False


def run_items(stage: str, items, device: str, skip: set, extra) -> int:
    """Runs `items` ([(id, fn)]) in order, skipping `skip`; `extra(id, result, kernels)` adds fields to the end
    record. Returns the process's exit status."""
    import blockops  # (loads the library: its import errors belong to this process, not to an item)

    device_type = torch.device(device).type
    gpu_check.emit(kind="build_info", **gpu_check.build_info_fields(blockops.build_info()))
    todo = [(i, fn) for i, fn in items if i not in skip]
    gpu_check.emit(kind="items", items=[i for i, _ in todo])
    for item, fn in todo:
        gpu_check.emit(kind="start", item=item)
        before = _counters(device_type)
        t0 = time.perf_counter()
        result, outcome, message = None, "ok", ""
        try:
            gpu_check.planted_fault(stage, item)
            result = fn()
            _synchronize(device)
        except Exception as e:  # noqa: BLE001 - every failure is the measurement: record it and go on
            outcome, message = "error", gpu_check.tail_text(traceback.format_exc(), 3000) or repr(e)
        seconds = time.perf_counter() - t0
        kernels = _moved(before, _counters(device_type))
        fields = extra(item, result, kernels) if outcome == "ok" else {}
        gpu_check.emit(kind="end", item=item, outcome=outcome, seconds=round(seconds, 3), kernels=kernels,
                       message=message, **fields)
        if outcome == "error" and not _context_works(device):
            gpu_check.emit(kind="context_lost", item=item)
            sys.stdout.flush()
            os._exit(gpu_check.EXIT_CONTEXT_LOST)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("sanitizer", "bench"))
    parser.add_argument("--family", help="sanitizer: the family whose cases run")
    parser.add_argument("--items", help="bench: comma-separated item ids (default: all)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="bench: CPU-sized shapes (dry run)")
    parser.add_argument("--smoke", action="store_true", help="bench: one timed call per timing (dry run)")
    parser.add_argument("--skip", help="file with a JSON list of item ids already done")
    args = parser.parse_args(argv)
    skip = set(json.load(open(args.skip))) if args.skip else set()
    device = args.device
    cuda = torch.device(device).type == "cuda"

    if args.what == "sanitizer":
        cases = [("cuda init" if cuda else "init", _cuda_init, [])] + CASES[args.family]()
        expected = {name: want for name, _, want in cases}

        def extra(item, result, kernels):
            want = expected[item]
            return {"expected": want, "path_ok": all(k in kernels for k in want)} if cuda and want else {}

        return run_items("sanitizer", [(name, lambda fn=fn: fn(device)) for name, fn, _ in cases], device, skip,
                         extra)

    from blockops.bench import harness

    ids = args.items.split(",") if args.items else list(BENCH_ITEMS)
    unknown = [i for i in ids if i not in BENCH_ITEMS]
    if unknown:
        parser.error(f"unknown bench items {unknown}; known: {list(BENCH_ITEMS)}")

    def extra(item, rows, kernels):
        goal = BENCH_ITEMS[item][1]
        out = []
        for r in rows:
            d = r.as_dict()
            if goal is not None and cuda and goal.applies(r):      # the goals are GPU goals
                d["goal"] = {"text": goal.text, "met": goal.met(r)}
            out.append(d)
        return {"rows": out}

    items = [(i, lambda fn=BENCH_ITEMS[i][0]: fn(device, args.tiny)) for i in ids]
    with harness.smoke_timing(args.smoke):
        return run_items("bench", items, device, skip, extra)


if __name__ == "__main__":
    sys.exit(main())
