"""Build blockops._C through CMake + Ninja (see CMakeLists.txt).

    pip install --no-build-isolation -e .     # development install (re-running rebuilds only what changed)
    pip install --no-build-isolation .        # regular install

Environment: BLOCKOPS_CUDA=0 forces a CPU-only build; TORCH_CUDA_ARCH_LIST picks CUDA architectures (default:
BLOCKOPS_DEFAULT_CUDA_ARCHS in CMakeLists.txt); BLOCKOPS_FAMILIES (";"-separated) builds only some kernel families;
MAX_JOBS caps parallel compile jobs; CUDA_HOME / CUTLASS_DIR override discovery.
The CMake build folder is kept in build/ of the source tree so that rebuilds are incremental.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def cmake_executable() -> str:
    try:  # the `cmake` wheel (4.x); Debian's 3.25 is too old for CUDA C++20
        import cmake

        return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
    except ImportError:
        found = shutil.which("cmake")
        if found is None:
            sys.exit("blockops: cmake not found; pip install 'cmake>=3.26' ninja")
        return found


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        cpu_only = os.environ.get("BLOCKOPS_CUDA") == "0"
        # One build folder per Python and per CPU-only/CUDA flavour, so switching does not rebuild everything.
        flavour = "-cpu" if cpu_only else ""
        build_dir = ROOT / "build" / f"cmake-py{sys.version_info.major}{sys.version_info.minor}{flavour}"
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake = cmake_executable()
        configure = [
            cmake, "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        try:
            import ninja

            configure.append(f"-DCMAKE_MAKE_PROGRAM={Path(ninja.BIN_DIR) / 'ninja'}")
        except ImportError:
            pass
        if cpu_only:
            configure.append("-DBLOCKOPS_CUDA=OFF")
        subprocess.run(configure, check=True)
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs], check=True)


setup(
    name="blockops",
    version="0.1.0",
    description="Block-wise low-bit GEMM, block-sparse attention and block caching kernels for PyTorch",
    package_dir={"": "python"},
    packages=find_packages("python"),
    ext_modules=[CMakeExtension("blockops._C")],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy", "tqdm"],
    extras_require={"bench": ["matplotlib"], "test": ["pytest"]},
    entry_points={"console_scripts": ["blockops=blockops.__main__:main"]},
)
