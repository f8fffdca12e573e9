"""The package loads the compiled library, says what it contains, and fails clearly when it cannot."""
import os
import shutil
import subprocess
import sys

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
