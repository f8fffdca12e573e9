"""Print what the build needs to know about this Python environment, one KEY=value per line.

Used by CMakeLists.txt. Imports torch (CPU-only work, no GPU is touched) and locates, without importing,
the nvidia-cutlass headers and the CUDA library headers/libnvrtc shipped in torch's nvidia-* wheels.
"""
import glob
import importlib.util
import os

import torch


def first(paths):
    paths = sorted(p for p in paths if os.path.exists(p))
    return paths[-1] if paths else ""


site = os.path.dirname(os.path.dirname(torch.__file__))  # the site-packages holding torch
cutlass = ""
spec = importlib.util.find_spec("cutlass_library")  # finds the package without running it
if spec is not None and spec.submodule_search_locations:
    cutlass = first([os.path.join(spec.submodule_search_locations[0], "source", "include")])

print(f"TORCH_VERSION={torch.__version__}")
print(f"TORCH_CUDA={torch.version.cuda or ''}")
print(f"TORCH_ROOT={os.path.dirname(torch.__file__)}")
print(f"TORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
print(f"TORCH_CMAKE_PREFIX={torch.utils.cmake_prefix_path}")
# torch's CUDA wheels ship the math libraries either merged (nvidia/cu13/include, .../lib) or one package per
# library (nvidia/cublas/include, nvidia/cuda_nvrtc/lib, ...): list every include folder, '|'-separated.
includes = sorted(glob.glob(os.path.join(site, "nvidia", "cu[0-9]*", "include")))
includes += sorted(p for p in glob.glob(os.path.join(site, "nvidia", "*", "include")) if p not in includes)
nvrtc = glob.glob(os.path.join(site, "nvidia", "*", "lib", "libnvrtc.so.[0-9]*"))
print(f"NVIDIA_INCLUDE={'|'.join(includes)}")
print(f"NVIDIA_NVRTC={first(nvrtc)}")
print(f"CUTLASS_INCLUDE={cutlass}")
