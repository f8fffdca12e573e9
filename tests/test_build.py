"""The package loads the compiled library, says what it contains, and fails clearly when it cannot."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import blockops


def test_build_info_describes_the_build():
    info = blockops.build_info()
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert info["cpu_isa"] in ("avx2+fma", "portable")
    assert "bitpack" in info["cpu_families"]
    # at::parallel_for only runs in parallel in code compiled with OpenMP (torch's backend here).
    if "OpenMP" in torch.__config__.parallel_info():
        assert info["cpu_parallel"] == "openmp"
    if info["cuda_compiled"]:
        assert info["cuda_version"]
        assert info["cuda_families"].get("bitpack"), info
    else:
        assert info["cuda_families"] == {}


def test_expected_cuda_architectures_were_built():
    """CI sets BLOCKOPS_EXPECT_CUDA_ARCHS (e.g. "8.0;9.0a"): every kernel family must be built for them."""
    expected = [a for a in os.environ.get("BLOCKOPS_EXPECT_CUDA_ARCHS", "").split(";") if a]
    info = blockops.build_info()
    if not expected:
        return
    assert info["cuda_compiled"], "CUDA kernels were expected but not compiled"
    for family, archs in info["cuda_families"].items():
        assert set(expected) <= set(archs), f"{family}: built for {archs}, expected {expected}"
    assert set(info["cuda_families"]) == set(info["cpu_families"]), "a family's CUDA kernels were left out"


def test_hopper_kernels_are_reported():
    """build_info()["hopper_kernels"]: the families with sm_90a wgmma + TMA kernels, compiled exactly when the CuTe
    headers were found and 9.0a was built. CI builds 9.0a with the nvidia-cutlass wheel: there they must be in."""
    info = blockops.build_info()
    assert set(info["hopper_kernels"]) == {"attention", "lowbit"}
    for family, built in info["hopper_kernels"].items():
        expected = bool(info["cutlass_include"]) and "9.0a" in info["cuda_families"].get(family, [])
        assert built == expected, (family, info)
    if "9.0a" in os.environ.get("BLOCKOPS_EXPECT_CUDA_ARCHS", "").split(";"):
        assert all(info["hopper_kernels"].values()), info


def test_ptx_is_embedded_for_newer_gpus():
    """Each family embeds PTX (here the newest requested architecture that is not arch-specific), which GPUs newer
    than every cubin JIT-compile instead of failing with "no kernel image"."""
    info = blockops.build_info()
    if not info["cuda_compiled"] or not info["cuda_families"]:
        pytest.skip("no CUDA kernels in this build")
    plain = sorted((a for a in info["cuda_requested_archs"] if a[-1].isdigit()), key=lambda a: tuple(map(int, a.split("."))))
    if not plain:
        pytest.skip("only arch-specific targets requested: no PTX by design")
    for family, ptx in info["cuda_ptx"].items():
        assert ptx == [plain[-1]], f"{family}: PTX for {ptx}, expected {plain[-1]}"
    library = open(blockops._C.__file__, "rb").read()
    assert f".target sm_{plain[-1].replace('.', '')}".encode() in library, "no PTX text in the library"


def test_no_gpu_touched_at_import():
    code = "import torch, blockops; assert not torch.cuda.is_initialized()"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_library_gives_a_clear_error(tmp_path):
    package = os.path.dirname(blockops.__file__)
    copy = tmp_path / "blockops"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    result = subprocess.run(
        [sys.executable, "-c", "import blockops"],
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(tmp_path)),
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "compiled library blockops._C is missing" in result.stderr
    assert "pip install --no-build-isolation -e ." in result.stderr


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cmake():
    try:
        import cmake

        return os.path.join(cmake.CMAKE_BIN_DIR, "cmake")
    except ImportError:
        return shutil.which("cmake")


@pytest.mark.skipif(not blockops.build_info()["cuda_compiled"], reason="the test configures a CUDA build")
def test_arch_subset_build_links_loads_and_names_missing_kernels(tmp_path):
    """A build for a GPU older than every family supports (TORCH_CUDA_ARCH_LIST=7.5, a T4), one family only: the
    CUDA families are left out with their glue, so the library links and loads (a glue file compiled without its
    kernels once made it unloadable), and an op's CUDA kernel is an error that names the op, the family, the
    requested architectures and the oldest supported one."""
    build, out = tmp_path / "build", tmp_path / "out"
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST="7.5", BLOCKOPS_FAMILIES="bitpack")
    configure = [_cmake(), "-S", ROOT, "-B", str(build), "-G", "Ninja", f"-DPython_EXECUTABLE={sys.executable}",
                 f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out}", "-DCMAKE_BUILD_TYPE=Release"]
    try:
        import ninja

        configure.append(f"-DCMAKE_MAKE_PROGRAM={os.path.join(ninja.BIN_DIR, 'ninja')}")
    except ImportError:
        pass
    logs = ""
    for cmd in (configure, [_cmake(), "--build", str(build), "--parallel", os.environ.get("MAX_JOBS", "2")]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        logs += r.stdout
    assert "CUDA family bitpack: no requested architecture supports it" in logs
    library = next(out.glob("_C*.so"))
    code = f"""
import importlib.util, json, torch
spec = importlib.util.spec_from_file_location("blockops._C", {str(library)!r})
lib = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lib)                     # loads (all symbols resolve) and registers the ops
info = json.loads(lib.build_info_json())
assert info["cuda_compiled"] and info["cuda_families"] == {{}}, info
assert info["cuda_requested_archs"] == ["7.5"], info
assert set(info["cpu_families"]) == {{"bitpack"}}, info
assert info["ops"]["quant_linear"] == "lowbit", info
v = torch.randint(0, 4, (64,), dtype=torch.uint8)
assert torch.equal(torch.ops.blockops.unpack_bits(torch.ops.blockops.pack_bits(v, 2, 0), 2, 64, 0), v)
cuda = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
try:
    torch.ops.blockops.pack_bits.default.redispatch(cuda, v, 2, 0)
except RuntimeError as e:
    print(e)
else:
    raise SystemExit("the CUDA kernel of a family that was not built did not raise")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    message = r.stdout
    for part in ("blockops.pack_bits", "bitpack family", '"7.5"', "8.0 or newer", "TORCH_CUDA_ARCH_LIST"):
        assert part in message, f"{part!r} not in: {message}"



def test_kernel_image_rules_for_each_gpu():
    """KernelGuard's rules (csrc/cuda_arch.h), checked without a GPU on this build's families: a cubin runs on its
    major version at an equal or higher minor one (an arch-specific one only on its exact architecture), PTX on
    every newer GPU, nothing on an older one."""
    info = blockops.build_info()
    if not info["cuda_families"]:
        pytest.skip("no CUDA kernels in this build")
    image = blockops._C.cuda_kernel_image
    for family, archs in info["cuda_families"].items():
        if archs != ["8.0", "9.0a"] or info["cuda_ptx"][family] != ["8.0"]:
            pytest.skip(f"the expectations below are for the default architectures, not {archs}")
        assert image(family, 8, 0) == "sm_80"
        assert image(family, 8, 6) == "sm_80" and image(family, 8, 9) == "sm_80"   # A10, L4: binary compatible
        assert image(family, 9, 0) == "sm_90a"                                      # H100 / H200
        assert image(family, 10, 0) == "compute_80" and image(family, 12, 0) == "compute_80"  # Blackwell: JIT
        assert image(family, 7, 5) == ""                                            # T4: nothing runs
    assert image("no_such_family", 9, 0) is None


def _cmake() -> str:
    try:
        import cmake

        return os.path.join(cmake.CMAKE_BIN_DIR, "cmake")
    except ImportError:
        return shutil.which("cmake") or pytest.skip("no cmake")


def test_static_libstdcxx_is_refused(tmp_path):
    """The post-link check (cmake/CheckSharedLibstdcxx.cmake) passes the built extension and refuses a library with
    libstdc++ linked in statically: such a _C segfaulted on its first error message on the H200 image (2026-12-04)."""
    compiler, nm = shutil.which("g++"), shutil.which("nm")
    if compiler is None or nm is None:
        pytest.skip("needs g++ and nm")
    script = os.path.join(os.path.dirname(__file__), "..", "cmake", "CheckSharedLibstdcxx.cmake")
    source = tmp_path / "format.cpp"
    source.write_text('#include <sstream>\n#include <string>\n'
                      'std::string format(long n) { std::ostringstream s; s << "n=" << n; return s.str(); }\n')

    def check(library):
        return subprocess.run([_cmake(), f"-DSO={library}", f"-DNM={nm}", "-P", script], capture_output=True,
                              text=True, timeout=60)

    assert check(blockops._C.__file__).returncode == 0
    for name, flags in (("shared", []), ("static", ["-static-libstdc++"])):
        library = tmp_path / f"lib{name}.so"
        subprocess.run([compiler, "-shared", "-fPIC", "-o", str(library), str(source), *flags], check=True,
                       timeout=120)
        result = check(library)
        if name == "shared":
            assert result.returncode == 0, result.stderr
        else:
            assert result.returncode != 0 and "linked in statically" in result.stderr, result.stderr
            assert not library.exists(), "a refused library must not be left behind"
