"""The CPU kernels under AddressSanitizer + UndefinedBehaviorSanitizer (docs/reliability.md): tools/sanitize.sh
builds a CPU-only blockops._C with -DBLOCKOPS_SANITIZE=ON in build/sanitize/ (incremental: a re-run with
unchanged sources only runs the tests) and runs a fast subset of the suite (tests/test_fuzz.py with its
bad-input probes, and the bitpack, block_cache and dllm tests) against it with libasan preloaded. Any ASan or
UBSan report aborts its process, which fails this test with the report.

Part of the normal test command, so CI runs it. Measured on a shared 2-core machine: the build from scratch takes
307 s of CPU time (289 s user, 18 s system; 11.5 min wall at MAX_JOBS=1 beside other jobs, so about 3 min at CI's
MAX_JOBS=2), the subset 145 s wall (95 s CPU): about 6 minutes in all, within the 10 minutes budgeted for it in
CI's 90. BLOCKOPS_SANITIZE=0 skips it (e.g. for a quick local run of the whole suite).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CXX = os.environ.get("CXX", "g++")


def _libasan() -> str | None:
    if shutil.which(CXX) is None:
        return None
    path = subprocess.run([CXX, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


pytestmark = [
    pytest.mark.skipif(os.environ.get("BLOCKOPS_SANITIZED_RUN") == "1", reason="already inside the sanitized run"),
    pytest.mark.skipif(os.environ.get("BLOCKOPS_SANITIZE") == "0", reason="BLOCKOPS_SANITIZE=0"),
    pytest.mark.skipif(sys.platform != "linux", reason="the sanitizer run is set up for Linux + g++"),
    pytest.mark.skipif(_libasan() is None, reason=f"{CXX} with libasan not found"),
]


def test_cpu_kernels_under_asan_and_ubsan():
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("BLOCKOPS_FUZZ_EXAMPLES", None)        # the CI-sized budget: the sanitized run is several times slower
    proc = subprocess.run(["bash", str(ROOT / "tools" / "sanitize.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1800)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"sanitized run failed (exit {proc.returncode}):\n{out[-12000:]}"
    for marker in ("ERROR: AddressSanitizer", "runtime error:"):
        assert marker not in out, f"sanitizer report in a passing run:\n{out[-12000:]}"
