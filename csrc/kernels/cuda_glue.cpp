// KernelGuard: can this GPU run the family's kernels of this build? See cuda_glue.h.
#include "cuda_glue.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <mutex>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "../cuda_arch.h"
#include "../introspection.h"

namespace blockops {
namespace {

// Raises unless `family` can run on device `index`; each (family, device) pair is checked once.
void check_family_on_device(const char* family, const char* op, c10::DeviceIndex index) {
  static std::mutex mutex;
  static std::set<std::pair<std::string, c10::DeviceIndex>> checked;
  {
    const std::lock_guard<std::mutex> lock(mutex);
    if (checked.count({family, index}) != 0) return;
  }
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(index);
  const CudaFamilyBuild* build = find_cuda_family(family);
  TORCH_INTERNAL_ASSERT(build != nullptr, "KernelGuard for family ", family, ", whose CUDA kernels are not built");
  TORCH_CHECK(!cuda_arch::kernel_image(build->archs, build->ptx, prop->major, prop->minor).empty(), op, " on ",
              describe_cuda_device(index), ": this build's ", family, " CUDA kernels were compiled for ",
              cuda_arch::names(cuda_arch::parse(build->archs), "sm_"), " with PTX for ",
              cuda_arch::names(cuda_arch::parse(build->ptx), "compute_"), ", none of which runs on this GPU (",
              cuda_build_summary(), "). Rebuild blockops with TORCH_CUDA_ARCH_LIST=\"", prop->major, ".", prop->minor,
              "\" (or add it to the list).");
  const std::lock_guard<std::mutex> lock(mutex);
  checked.insert({family, index});
}

}  // namespace

std::string describe_cuda_device(c10::DeviceIndex index) {
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(index);
  return std::string(prop->name) + " (cuda:" + std::to_string(index) + ", sm_" + std::to_string(prop->major) +
         std::to_string(prop->minor) + ")";
}

bool hopper_kernels_run(const char* family, c10::DeviceIndex index, const char* env_switch) {
  if (!hopper_kernels_built(family)) return false;
  const char* env = std::getenv(env_switch);
  if (env != nullptr && std::string(env) == "0") return false;
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(index);
  return prop->major == 9 && prop->minor == 0;
}

KernelGuard::KernelGuard(const char* family, const char* op, c10::Device device) : guard_(device) {
  check_family_on_device(family, op, device.index());
}

}  // namespace blockops
