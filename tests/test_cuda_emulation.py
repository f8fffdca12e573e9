"""The CUDA kernels (csrc/kernels/*.cu) run on the CPU in the emulator of tools/cuda_emu against fp64 references.

No GPU and no torch needed: tools/cuda_emu/gen_emu.py turns the current kernel sources into C++, g++ builds each
harness into build/cuda_emu/<harness>-<hash of its inputs>/ (rebuilt only when a kernel, header, harness file or
flag changes) and the quick sections run (EMU_QUICK: trimmed case lists that still cover every kernel and dtype).
BLOCKOPS_EMU_SANITIZE=1 builds with ASan + UBSan (slower; what catches out-of-bounds accesses in "garbage");
BLOCKOPS_EMU_FULL=1 runs the full case lists.
"""
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EMU = ROOT / "tools" / "cuda_emu"
KERNELS = ROOT / "csrc" / "kernels"
BUILD = ROOT / "build" / "cuda_emu"
CXX = shutil.which("g++")

SANITIZE = os.environ.get("BLOCKOPS_EMU_SANITIZE") == "1"
FLAGS = ["-std=c++20", "-O1", "-fno-strict-aliasing", "-Wall", "-Wno-unknown-pragmas", "-Wno-unused-function",
         "-Wno-psabi", "-pthread", "-DBLOCKOPS_HAVE_CUTE"]
if SANITIZE:
    FLAGS += ["-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]


def read_harnesses():
    """tools/cuda_emu/harnesses.txt, the one list of harnesses (mutations.sh reads it too): harness -> (linked
    kernels, kernels whose generated source the driver #includes, sections or [None] for a harness of one)."""
    harnesses = {}
    for line in (EMU / "harnesses.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, linked, included, sections = line.split("\t")
        split = (lambda field: [] if field == "-" else field.split(","))
        harnesses[name] = (split(linked), split(included), split(sections) or [None])
    return harnesses


HARNESSES = read_harnesses()
SECTIONS = [(name, section) for name, (_, _, sections) in HARNESSES.items() for section in sections]

pytestmark = pytest.mark.skipif(CXX is None, reason="g++ not found: the CUDA emulation harnesses need a C++20 g++")


def _inputs_digest(driver, kernels):
    """Everything the binary depends on: compiler, flags, the kernels, every header they or the harness may
    include, the harness files and the generator."""
    h = hashlib.sha256()
    h.update(subprocess.run([CXX, "--version"], capture_output=True, text=True, check=True).stdout.encode())
    h.update(" ".join(FLAGS).encode())
    files = [KERNELS / f"{k}.cu" for k in kernels] + [EMU / driver, EMU / "gen_emu.py", EMU / "harnesses.txt"]
    files += sorted(EMU.glob("*.h"))
    files += sorted((EMU / "fake").glob("*.h")) + sorted((EMU / "fake").glob("*.cuh"))
    files += sorted(p for p in (ROOT / "csrc").rglob("*") if p.suffix in (".h", ".cuh"))
    for f in files:
        h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _build(name):
    """Path of the harness binary, built unless a build of the same inputs is already there."""
    linked, included, _ = HARNESSES[name]
    driver = f"{name}.cpp"
    digest = _inputs_digest(driver, linked + included)
    out_dir = BUILD / f"{name}-{digest}"
    exe = out_dir / name
    if exe.exists():
        return exe
    for stale in BUILD.glob(f"{name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    for k in linked + included:  # as a script: importing it would leave a __pycache__ in the source tree
        gen = [sys.executable, str(EMU / "gen_emu.py"), str(KERNELS / f"{k}.cu"), str(out_dir / f"{k}_emu.cpp")]
        subprocess.run(gen, check=True)
    tmp = out_dir / f"{name}.tmp{os.getpid()}"
    cmd = [CXX, *FLAGS, f"-I{EMU / 'fake'}", f"-I{EMU}", f"-I{ROOT / 'csrc'}", f"-I{KERNELS}", f"-I{out_dir}",
           str(EMU / driver), *(str(out_dir / f"{k}_emu.cpp") for k in linked), "-o", str(tmp)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{name} does not compile:\n{' '.join(cmd)}\n{r.stderr[-6000:]}"
    os.replace(tmp, exe)  # atomic: a concurrent run sees the complete binary or none
    return exe


@pytest.fixture(scope="module")
def harness():
    built = {}

    def get(name):
        if name not in built:
            built[name] = _build(name)
        return built[name]

    return get


@pytest.mark.parametrize("name,section", SECTIONS, ids=[f"{n}-{s or 'all'}" for n, s in SECTIONS])
def test_emulated_kernels_match_reference(harness, name, section):
    exe = harness(name)
    env = dict(os.environ)
    if os.environ.get("BLOCKOPS_EMU_FULL") != "1":
        env["EMU_QUICK"] = "1"
    r = subprocess.run([str(exe)] + ([section] if section else []), capture_output=True, text=True, env=env,
                       timeout=900)
    log = (r.stdout + r.stderr)[-6000:]
    m = re.search(r"cases: (\d+) failures: (\d+)", r.stdout) or re.search(r"(\d+) cases, (\d+) failures", r.stdout)
    assert r.returncode == 0, f"{name} {section}: exit code {r.returncode}\n{log}"
    assert m is not None, f"{name} {section}: no summary line\n{log}"
    cases, failures = int(m.group(1)), int(m.group(2))
    assert failures == 0 and cases > 0, f"{name} {section}: {cases} cases, {failures} failures\n{log}"


def test_every_kernel_file_and_driver_is_in_the_manifest():
    """Each csrc/kernels/*.cu runs in some harness, each driver tools/cuda_emu/test_*.cpp is listed, and each planted
    bug of mutations.txt has a harness for its kernel file."""
    covered = {k for linked, included, _ in HARNESSES.values() for k in linked + included}
    kernels = {p.stem for p in KERNELS.glob("*.cu")}
    assert kernels <= covered, f"kernel files no harness runs: {sorted(kernels - covered)}"
    drivers = {p.stem for p in EMU.glob("test_*.cpp")}
    assert drivers == set(HARNESSES), f"drivers vs harnesses.txt: {sorted(drivers ^ set(HARNESSES))}"
    for line in (EMU / "mutations.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, kernel_file = line.split("\t")[:2]
            assert kernel_file.removesuffix(".cu") in covered, f"mutation {name}: no harness runs {kernel_file}"
