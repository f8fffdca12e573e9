"""Thread safety: every registered op called concurrently from several Python threads (each thread with its own
inputs, torch's intra-op pool at 2 threads) gives bitwise the results of serial calls.

The CPU kernels keep no mutable global state: per-call buffers are locals or tensors, per-worker scratch is built
inside the parallel region (attention's run_tasks, PaTH's task loop) or thread_local (vq's byte-plane tables,
reused by the thread that owns them, never shared), the CPU feature flags and the dispatcher handles are
function-local statics (initialised once, thread-safely, by the C++ runtime) and the kernel counters are atomics.
This test is what keeps it so: a new op must get a case in CASES (test_every_op_has_a_case), and a kernel that
shares a scratch buffer or a lazily built table between calls shows up here as a mismatch.
"""
from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

import blockops
from blockops.attention import masks
from blockops.ops import bitpack
from blockops.ops.attention import MASK_FIELDS
from blockops.quant import ptq161 as qptq
from blockops.ops import ptq161 as ptq161_ops
from blockops.reference import OP_REFERENCES

_ops = torch.ops.blockops
THREADS = 4
CALLS = 4  # calls per thread and case, back to back


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# Each case: seed -> a function running the op once on that seed's inputs (made once, outside the threads) and
# returning every tensor it produced, the in-place outputs included (those start from a fresh copy per call).

def _bitpack(op):
    def make(seed):
        g = _gen(seed)
        values = torch.randint(0, 8, (37, 300), generator=g, dtype=torch.uint8)
        packed = bitpack.pack_bits(values, 3, dim=1)
        if op == "pack_bits":
            return lambda: (_ops.pack_bits(values, 3, 1),)
        return lambda: (_ops.unpack_bits(packed, 3, 300, 1),)
    return make


def _lowbit(op, rows):
    def make(seed):
        g = _gen(seed)
        inn, out, gs, bits = 256, 200, 64, 4
        q = torch.randint(0, 16, (out, inn), generator=g)
        qweight = bitpack.pack_bits(q.t().contiguous(), bits, dim=0)
        scales = torch.rand(inn // gs, out, generator=g) * 0.02 + 0.01
        zeros = torch.randint(0, 16, (inn // gs, out), generator=g).float()
        x = torch.randn(rows, inn, generator=g)
        gy = torch.randn(rows, out, generator=g)
        bias = torch.randn(out, generator=g)
        if op == "quant_linear":
            return lambda: (_ops.quant_linear(x, qweight, scales, zeros, bits, gs, bias),)
        if op == "quant_dequantize":
            return lambda: (_ops.quant_dequantize(qweight, scales, zeros, bits, gs),)
        if op == "quant_linear_grad_input":
            return lambda: (_ops.quant_linear_grad_input(gy, qweight, scales, zeros, bits, gs),)
        t = (gy.t() @ x).contiguous()
        return lambda: (_ops.quant_grad_scales(t, qweight, zeros, bits, gs),)
    return make


def _attention(op):
    def make(seed):
        g = _gen(seed)
        mask = masks.sliding_window(80, 40, block_q=16, block_kv=32)
        q, k, v = (torch.randn(1, 2, 80, 16, generator=g) for _ in range(3))
        mask_args = [getattr(mask, f) for f in MASK_FIELDS]
        tail = (mask.block_q, mask.block_kv, 0.25)
        if op == "block_sparse_attention":
            return lambda: _ops.block_sparse_attention(q, k, v, *mask_args, *tail)
        out, lse = _ops.block_sparse_attention(q, k, v, *mask_args, *tail)
        grad = torch.randn(out.shape, generator=g)
        return lambda: _ops.block_sparse_attention_backward(grad, q, k, v, out, lse, None, *mask_args, *tail)
    return make


def _path_inputs(g, B=1, T=70, HQ=2, H=1, D=16, Dv=16):
    q = torch.randn(B, T, HQ, D, generator=g)
    k = torch.randn(B, T, H, D, generator=g)
    v = torch.randn(B, T, H, Dv, generator=g)
    w = F.normalize(torch.randn(B, T, H, D, generator=g), dim=-1)
    beta = 2 * torch.sigmoid(torch.randn(B, T, H, generator=g))
    gate = F.logsigmoid(torch.randn(B, T, HQ, generator=g) + 2)
    return q, k, v, w, beta, gate


def _path(op):
    def make(seed):
        g = _gen(seed)
        q, k, v, w, beta, gate = _path_inputs(g)
        if op == "path_attention":
            return lambda: _ops.path_attention(q, k, v, w, beta, gate, None, 0.25)
        if op == "path_key_cache":
            return lambda: (_ops.path_key_cache(k, w, beta, None),)
        if op == "path_attention_backward":
            o, lse = _ops.path_attention(q, k, v, w, beta, gate, None, 0.25)
            grad = torch.randn(o.shape, generator=g)
            return lambda: _ops.path_attention_backward(grad, q, k, v, w, beta, gate, None, o, lse, None, 0.25)
        # path_decode_step: a batched fp32 cache of capacity 40, rows of lengths 0, 5 and 30, updated in place.
        B, HQ, H, D, Dv, L = 3, 2, 1, 16, 16, 40
        qt, kt, vt, wt, bt, gt = (t[:, 0] for t in _path_inputs(g, B=B, T=1))
        keys = torch.randn(B, H, L, D, generator=g)
        values = torch.randn(B, H, L, Dv, generator=g)
        lens = torch.tensor([0, 5, 30])
        gates = torch.randn(B, HQ, L, generator=g)
        g_last = torch.randn(B, HQ, generator=g)

        def run():
            ks, vs, gs, gl = keys.clone(), values.clone(), gates.clone(), g_last.clone()
            o = _ops.path_decode_step(qt, kt, vt, wt, bt, gt, ks, vs, lens, gs, gl, 0.25)
            return o, ks, vs, gs, gl
        return run
    return make


def _vq(op, rows, x_dtype=torch.float32, k=256, out=192, inn=128):
    def make(seed):
        g = _gen(seed)
        K, d = 2, 4
        codes = torch.randint(0, k, (out, inn // d, K), generator=g).to(torch.uint8)
        codebooks = torch.randn(K, k, d, generator=g)
        scales = torch.rand(out, generator=g) + 0.5
        x = torch.randn(rows, inn, generator=g).to(x_dtype)
        gy = torch.randn(rows, out, generator=g)
        bias = torch.randn(out, generator=g)
        t = (gy.t() @ x.float()).contiguous()
        if op == "vq_linear":
            return lambda: (_ops.vq_linear(x, codes, codebooks, scales, bias),)
        if op == "vq_dequantize":
            return lambda: (_ops.vq_dequantize(codes, codebooks, scales),)
        if op == "vq_linear_grad_input":
            return lambda: (_ops.vq_linear_grad_input(gy, codes, codebooks, scales),)
        if op == "vq_grad_codebooks":
            return lambda: (_ops.vq_grad_codebooks(t, codes, codebooks, scales),)
        return lambda: (_ops.vq_grad_scales(t, codes, codebooks),)
    return make


def _ptq161(op, rows):
    def make(seed):
        g = _gen(seed)
        out, inn = 48, 160
        tensors, s = qptq.quantize_weight(torch.randn(out, inn, generator=g), torch.rand(inn, generator=g), 0.2, 1,
                                          torch.float32)
        args = [tensors[f] for f in ptq161_ops.FIELDS]
        x = torch.randn(rows, inn, generator=g)
        gy = torch.randn(rows, out, generator=g)
        if op == "ptq161_linear":
            return lambda: (_ops.ptq161_linear(x, *args, s, None),)
        if op == "ptq161_dequantize":
            return lambda: (_ops.ptq161_dequantize(*args, s),)
        return lambda: _ops.ptq161_linear_backward(gy, x, *args, s, True, True)
    return make


def _dllm(op):
    def make(seed):
        g = _gen(seed)
        if op == "dllm_unmask":
            logits = torch.randn(3, 40, 500, generator=g)
            masked = torch.rand(3, 40, generator=g) < 0.7
            bounds = torch.tensor([[0, 40], [8, 24], [16, 40]])
            return lambda: _ops.dllm_unmask(logits, masked, bounds, None, 0.05, None)
        cache = torch.randn(2, 3, 50, 16, generator=g)
        new = torch.randn(2, 3, 5, 16, generator=g)
        positions = torch.stack([torch.randperm(50, generator=g)[:5].sort().values for _ in range(2)])

        def run():
            c = cache.clone()
            _ops.dllm_kv_overwrite(c, new, positions, True)
            return (c,)
        return run
    return make


def _block_cache(op):
    def make(seed):
        g = _gen(seed)
        a, b, c = (torch.randn(2, 64, 300, generator=g) for _ in range(3))
        if op == "relative_l1":
            return lambda: (_ops.relative_l1(a, b, 2, True),)
        if op == "relative_l1_residual":
            def run():
                res = torch.empty_like(a)
                ind = _ops.relative_l1_residual(a, b, c, res, 1, True, True)
                return ind, res
            return run
        if op == "apply_residual":
            return lambda: (_ops.apply_residual(a, b),)
        gate = torch.tensor(True)

        def run():
            cache = c.clone()
            _ops.cache_update(cache, a, gate)
            return (cache,)
        return run
    return make


# op -> cases (several where an op has kernels for different sizes or dtypes: the small-batch kernels with their
# scratch and the GEMM paths).
CASES = {
    "pack_bits": [_bitpack("pack_bits")],
    "unpack_bits": [_bitpack("unpack_bits")],
    "quant_linear": [_lowbit("quant_linear", 3), _lowbit("quant_linear", 70)],
    "quant_dequantize": [_lowbit("quant_dequantize", 1)],
    "quant_linear_grad_input": [_lowbit("quant_linear_grad_input", 5)],
    "quant_grad_scales": [_lowbit("quant_grad_scales", 5)],
    "block_sparse_attention": [_attention("block_sparse_attention")],
    "block_sparse_attention_backward": [_attention("block_sparse_attention_backward")],
    "path_attention": [_path("path_attention")],
    "path_key_cache": [_path("path_key_cache")],
    "path_attention_backward": [_path("path_attention_backward")],
    "path_decode_step": [_path("path_decode_step")],
    # k = 16: the table kernels (byte planes with their thread_local tables on AVX-512 VBMI CPUs, exact for fp32 x,
    # int16 for fp16 x); k = 256 at 2 rows: the direct kernel; 20 rows: the blocked GEMM.
    "vq_linear": [_vq("vq_linear", 2, k=16, out=512, inn=512), _vq("vq_linear", 4, torch.float16, k=16, out=512,
                                                                      inn=512), _vq("vq_linear", 2),
                  _vq("vq_linear", 20)],
    "vq_dequantize": [_vq("vq_dequantize", 1)],
    "vq_linear_grad_input": [_vq("vq_linear_grad_input", 3)],
    "vq_grad_codebooks": [_vq("vq_grad_codebooks", 3)],
    "vq_grad_scales": [_vq("vq_grad_scales", 3)],
    "ptq161_linear": [_ptq161("ptq161_linear", 3), _ptq161("ptq161_linear", 20)],
    "ptq161_dequantize": [_ptq161("ptq161_dequantize", 1)],
    "ptq161_linear_backward": [_ptq161("ptq161_linear_backward", 3)],
    "dllm_unmask": [_dllm("dllm_unmask")],
    "dllm_kv_overwrite": [_dllm("dllm_kv_overwrite")],
    "relative_l1": [_block_cache("relative_l1")],
    "relative_l1_residual": [_block_cache("relative_l1_residual")],
    "apply_residual": [_block_cache("apply_residual")],
    "cache_update": [_block_cache("cache_update")],
}


def test_every_op_has_a_case():
    """A new op (every op has an OP_REFERENCES entry, tests/test_architecture.py) needs a case here."""
    assert set(CASES) == set(OP_REFERENCES), (
        f"ops without a thread-safety case: {sorted(set(OP_REFERENCES) - set(CASES))}; "
        f"cases for unknown ops: {sorted(set(CASES) - set(OP_REFERENCES))}")


@pytest.fixture
def two_intra_op_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _assert_bitwise_equal(got, want, what):
    assert len(got) == len(want), what
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}, output {i}: {a.dtype} {a.shape} vs {b.dtype} {b.shape}"
        # Bitwise, NaN included (equal_nan compares values; the raw bytes are the stricter test).
        assert torch.equal(a.contiguous().view(torch.uint8) if a.dtype != torch.bool else a,
                           b.contiguous().view(torch.uint8) if b.dtype != torch.bool else b), \
            f"{what}, output {i}: concurrent result differs from the serial one"


def test_concurrent_calls_match_serial(two_intra_op_threads):
    """THREADS Python threads, each with its own inputs (seed = thread), call every case of every op CALLS times in
    a row, all threads starting each case together (a barrier: calls of one kernel overlap, which is when shared
    scratch would be overwritten), while torch's intra-op pool runs 2 threads per call."""
    cases = [(op, c, make) for op, makers in CASES.items() for c, make in enumerate(makers)]
    runs = {(op, c, seed): make(seed) for op, c, make in cases for seed in range(THREADS)}
    serial = {key: tuple(t.clone() for t in run()) for key, run in runs.items()}
    errors = []
    barrier = threading.Barrier(THREADS)

    def worker(seed):
        for op, c, _ in cases:
            try:
                barrier.wait()
            except threading.BrokenBarrierError:
                return
            try:
                results = [runs[op, c, seed]() for _ in range(CALLS)]  # back to back, compared afterwards
                for got in results:
                    _assert_bitwise_equal(got, serial[op, c, seed], f"{op} case {c}, thread {seed}")
            except Exception as e:  # noqa: BLE001 -- reported by the main thread
                errors.append(e)

    before = blockops.kernel_call_counts()
    threads = [threading.Thread(target=worker, args=(s,)) for s in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, "\n".join(str(e) for e in errors)
    after = blockops.kernel_call_counts()
    # The kernels with per-thread scratch ran concurrently (vq's byte planes only exist on AVX-512 VBMI CPUs).
    expected = ["vq_linear.cpu", "quant_linear.cpu", "block_sparse_attention.cpu", "path_attention.cpu"]
    if blockops.build_info()["cpu_isa_path"] == "avx512-vbmi":
        expected.append("vq_linear_byte_planes.cpu")
    for name in expected:
        assert after[name] > before[name], f"{name} did not run in the threads"
