// What the CUDA glue of every family (csrc/kernels/<family>_cuda.cpp) shares: the guard each CUDA entry point opens
// with. Torch-facing, host compiler only; compiled into every CUDA build (cuda_glue.cpp), whichever families it has.
#pragma once
#include <c10/core/Device.h>
#include <c10/cuda/CUDAGuard.h>

#include <string>

namespace blockops {

// Opens every CUDA entry point of a family: makes `device` the current CUDA device (c10::cuda::CUDAGuard) and,
// when this build holds no kernel image of `family` that the device can run (no cubin of a compatible
// architecture and no embedded PTX old enough to JIT-compile), raises an error naming the op, the GPU's
// architecture and the ones the family was built for, instead of a launch failing with "no kernel image".
class KernelGuard {
 public:
  KernelGuard(const char* family, const char* op, c10::Device device);

 private:
  c10::cuda::CUDAGuard guard_;
};

// Whether `family`'s Hopper kernels (csrc/kernels/<family>_wgmma.cu: wgmma + TMA, sm_90a only) run on device
// `index`: this build compiled them (CUTLASS/CuTe headers found and "9.0a" among the family's architectures), the
// GPU is an sm_90 (H100 / H200), and the environment variable `env_switch` (e.g. "BLOCKOPS_ATTENTION_WGMMA") is not
// "0". The dispatch of a family with Hopper kernels asks this first; everything else takes the Ampere kernels.
bool hopper_kernels_run(const char* family, c10::DeviceIndex index, const char* env_switch);

// "NVIDIA H200 (cuda:0, sm_90)", for error messages.
std::string describe_cuda_device(c10::DeviceIndex index);

}  // namespace blockops
