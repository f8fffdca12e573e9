"""Helpers every test file reuses: devices, reference comparisons, opcheck, torch.compile and
"the compiled kernel ran" checks."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from unittest import mock

import pytest
import torch

import blockops

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


def hopper_kernels_run(family: str) -> bool:
    """Whether this process runs `family`'s Hopper kernels (wgmma + TMA, issue 21): built for sm_90a with CuTe, and
    the current GPU an sm_90 (H100 / H200). The tests of those kernels skip elsewhere; the emulation
    (tests/test_cuda_emulation.py) covers them on every machine."""
    return (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
            and blockops.build_info()["hopper_kernels"].get(family, False))


def needs_hopper_kernels(family: str):
    """Marks a test of `family`'s Hopper kernels: skipped unless hopper_kernels_run(family) (the GPU check's test
    stage counts it as a CUDA test by its reason)."""
    return pytest.mark.skipif(not hopper_kernels_run(family),
                              reason="needs a CUDA device of sm_90 (H100 / H200) and this build's sm_90a kernels")


def env_var(name: str, value: str):
    """`name`=`value` inside the block (the Hopper dispatch switches are read on every call)."""
    return mock.patch.dict(os.environ, {name: value})


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative mean absolute error ``mean|out - ref| / mean|ref|`` (Marlin's measure), in fp64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).abs().mean() / ref.abs().mean().clamp_min(1e-30)).item()


def assert_close_to_reference(out: torch.Tensor, ref: torch.Tensor, max_rel_error: float) -> None:
    """Shape, finiteness and relative mean error against an fp32/fp64 reference."""
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), "output has non-finite values"
    err = rel_error(out, ref)
    assert err <= max_rel_error, f"relative error {err:.3g} > {max_rel_error:.3g}"


def assert_error_within_torch(
    out: torch.Tensor, torch_out: torch.Tensor, ref: torch.Tensor, factor: float = 2.0, floor: float = 1e-6
) -> None:
    """The kernel's max error vs the high-precision reference is at most `factor` times PyTorch's own error
    doing the same computation at the same precision (flash-attention's rule). `floor` covers exact cases."""
    ref = ref.double()
    ours = (out.double() - ref).abs().max().item()
    theirs = (torch_out.double() - ref).abs().max().item()
    assert ours <= factor * theirs + floor, f"error {ours:.3g} > {factor} x PyTorch's {theirs:.3g} + {floor:.1g}"


def opcheck(op, args, kwargs=None) -> None:
    """torch.library.opcheck with every standard test (schema, autograd registration, fake tensor, AOT
    dispatch); raises on the first failure."""
    result = torch.library.opcheck(op, args, kwargs or {})
    failed = {k: v for k, v in result.items() if v != "SUCCESS"}
    assert not failed, f"opcheck failed: {failed}"


def assert_compiles(fn, *args, **kwargs):
    """fn compiled with torch.compile(fullgraph=True) gives eager's result; returns the compiled result."""
    torch._dynamo.reset()
    eager = fn(*args, **kwargs)
    compiled = torch.compile(fn, fullgraph=True)(*args, **kwargs)
    eager_list = eager if isinstance(eager, (tuple, list)) else [eager]
    compiled_list = compiled if isinstance(compiled, (tuple, list)) else [compiled]
    for e, c in zip(eager_list, compiled_list):
        torch.testing.assert_close(c, e)
    return compiled


@contextlib.contextmanager
def kernel_ran(name: str, device: str):
    """Asserts that the compiled kernel entry point ``<name>.<device>`` ran inside the block (counted in the
    C++ library, so a Python fallback cannot pass this check)."""
    key = f"{name}.{torch.device(device).type}"
    before = blockops.kernel_call_counts()
    assert key in before, f"no compiled kernel named {key}; known: {sorted(before)}"
    yield
    after = blockops.kernel_call_counts()
    assert after[key] > before[key], f"compiled kernel {key} did not run"


def run_with_cpu_isa(isa: str, code: str, *args: str) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh Python process with BLOCKOPS_CPU_ISA=isa (the ISA is chosen once, at import),
    from the repository root so `tests` can be put on sys.path; fails with the child's stderr."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", code, *args], env=dict(os.environ, BLOCKOPS_CPU_ISA=isa), cwd=root,
                         capture_output=True, text=True)
    assert res.returncode == 0, f"BLOCKOPS_CPU_ISA={isa} child failed:\n{res.stderr[-4000:]}"
    return res
