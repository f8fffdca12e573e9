"""The one shape of every kernel family (docs/architecture.md), checked from what the library registers: each op
defined in csrc/ops.cpp belongs to a family that has every layer in its place, and each op has CPU and CUDA kernels
(or the CUDA kernel that says why there is none), kernel counters, a fake implementation in its family's op-layer
module, a pure-PyTorch reference the tests use, a test and a benchmark row."""
import glob
import importlib
import os
import re

import pytest
import torch

import blockops
from blockops import bench
from blockops.reference import OP_REFERENCES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFO = blockops.build_info()
OPS = INFO["ops"]                       # op -> family, recorded by ops.cpp's define()
FAMILIES = sorted(set(OPS.values()))


def _read(pattern):
    return "\n".join(open(p).read() for p in sorted(glob.glob(os.path.join(ROOT, pattern))))


TESTS = _read("tests/test_*.py")


def test_the_families_are_the_documented_eight():
    doc = open(os.path.join(ROOT, "docs", "architecture.md")).read()
    documented = re.findall(r"^\| `(\w+)` \|", doc, flags=re.M)
    assert FAMILIES == sorted(documented), f"ops.cpp families {FAMILIES} vs docs/architecture.md {documented}"
    # Bench families without ops of their own (OPS = (): context_parallel runs the attention kernels across ranks)
    # are layers above the kernel families; architecture.md names each.
    kernel_benches = sorted(f for f in bench.FAMILIES if bench.FAMILY_OPS[f])
    assert FAMILIES == kernel_benches, f"bench families with ops: {kernel_benches}"
    for f in set(bench.FAMILIES) - set(kernel_benches):
        assert f"`{f}`" in doc, f"bench family {f} (no ops) is not described in docs/architecture.md"
    assert all(hasattr(blockops.ops, f) for f in FAMILIES), "a family without its op-layer module in blockops.ops"


@pytest.mark.parametrize("family", FAMILIES)
def test_family_has_every_layer(family):
    def one(path):
        assert os.path.exists(os.path.join(ROOT, path)), f"{family}: missing {path}"

    def some(pattern):
        assert glob.glob(os.path.join(ROOT, pattern)), f"{family}: nothing matches {pattern}"

    one(f"csrc/{family}.h")                   # torch-free numerics and params, shared by CPU, CUDA and the emulator
    one(f"csrc/{family}_op.h")                # argument checks that the CPU and CUDA glue both call
    one(f"csrc/{family}_op.cpp")
    some(f"csrc/{family}_cpu*.cpp")           # CPU kernels and CPU registration
    one(f"csrc/kernels/{family}_launch.h")    # torch-free launchers
    some(f"csrc/kernels/{family}*.cu")        # CUDA kernels
    one(f"csrc/kernels/{family}_cuda.cpp")    # CUDA glue and registration
    one(f"python/blockops/ops/{family}.py")   # wrappers, fakes, autograd
    one(f"python/blockops/bench/{family}.py")
    some(f"tests/test_{family}*.py")
    one(f"bench/bench_{family}.py")
    harnesses = open(os.path.join(ROOT, "tools", "cuda_emu", "harnesses.txt")).read()
    assert re.search(rf"^test_\w+\t[\w,]*\b{family}\b", harnesses, flags=re.M), f"{family}: no emulation harness"
    # The checks live in F_op.cpp: no TORCH_CHECK-style argument check is implemented in the CUDA glue.
    glue = open(os.path.join(ROOT, "csrc", "kernels", f"{family}_cuda.cpp")).read()
    assert "check_dtype(" not in glue and "check_contiguous(" not in glue, f"{family}: checks in the CUDA glue"


@pytest.mark.parametrize("op", sorted(OPS))
def test_op_has_every_layer(op):
    family = OPS[op]
    name = f"blockops::{op}"
    for key in ("CPU", "CUDA"):  # a family without CUDA kernels in this build gets the CUDA kernel that says so
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, key), f"{op}: no {key} kernel registered"
    counters = INFO["kernel_counters"]
    assert counters.get(f"{op}.cpu") == family, f"{op}: no CPU kernel counter of family {family}"
    if family in INFO["cuda_families"]:
        assert counters.get(f"{op}.cuda") == family, f"{op}: no CUDA kernel counter of family {family}"

    entry = torch._library.simple_registry.singleton.find(name)
    assert entry.fake_impl.kernel is not None, f"{op}: no fake implementation"
    source = entry.fake_impl.kernel.source.replace(os.sep, "/")
    assert f"/blockops/ops/{family}.py:" in source, f"{op}: fake implementation in {source}, not ops/{family}.py"

    reference = OP_REFERENCES.get(op)
    assert reference is not None, f"{op}: no entry in blockops.reference.OP_REFERENCES"
    assert re.search(rf"\b{reference.__name__}\b", TESTS), f"{op}: no test uses its reference {reference.__name__}"
    assert re.search(rf"\b{op}\b", TESTS), f"{op}: no test names it"

    ops_benched = getattr(importlib.import_module(f"blockops.bench.{family}"), "OPS", ())
    assert op in ops_benched, f"{op}: no benchmark row (python/blockops/bench/{family}.py OPS: {ops_benched})"
