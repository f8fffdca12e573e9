// KernelGuard: can this GPU run the family's kernels of this build? See cuda_glue.h.
#include "cuda_glue.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/util/Exception.h>

#include <mutex>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "../introspection.h"

namespace blockops {
namespace {

// One entry of an architecture list: "8.0" (code for 8.x with x >= 0), "9.0a" (arch-specific: 9.0 only),
// "10.0f" (family-specific: 10.x with x >= 0).
struct Arch {
  int major = 0;
  int minor = 0;
  char suffix = '\0';  // '\0', 'a' or 'f'
};

std::vector<Arch> parse_archs(const char* list) {
  std::vector<Arch> archs;
  const std::string s(list);
  size_t start = 0;
  while (start < s.size()) {
    size_t end = s.find(';', start);
    if (end == std::string::npos) end = s.size();
    const std::string entry = s.substr(start, end - start);
    Arch a;
    const size_t dot = entry.find('.');
    if (dot != std::string::npos) {
      a.major = std::stoi(entry.substr(0, dot));
      a.minor = entry[dot + 1] - '0';
      if (entry.size() > dot + 2) a.suffix = entry[dot + 2];
      archs.push_back(a);
    }
    start = end + 1;
  }
  return archs;
}

// A cubin runs on GPUs of its major version with an equal or higher minor one; an arch-specific cubin ("9.0a")
// only on that exact architecture.
bool cubin_runs(const Arch& a, int major, int minor) {
  return a.major == major && (a.suffix == 'a' ? a.minor == minor : a.minor <= minor);
}

// PTX JIT-compiles for every GPU at least as new as its virtual architecture (arch-specific PTX: never newer).
bool ptx_runs(const Arch& a, int major, int minor) {
  if (a.suffix != '\0') return cubin_runs(a, major, minor);
  return a.major < major || (a.major == major && a.minor <= minor);
}

std::string sm(const Arch& a) {
  return std::to_string(a.major) + std::to_string(a.minor) + (a.suffix != '\0' ? std::string(1, a.suffix) : "");
}

std::string list_sm(const std::vector<Arch>& archs, const char* prefix) {
  std::string out;
  for (const Arch& a : archs) out += (out.empty() ? "" : ", ") + std::string(prefix) + sm(a);
  return out.empty() ? "none" : out;
}

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
  const std::vector<Arch> cubins = parse_archs(build->archs), ptx = parse_archs(build->ptx);
  bool runs = false;
  for (const Arch& a : cubins) runs = runs || cubin_runs(a, prop->major, prop->minor);
  for (const Arch& a : ptx) runs = runs || ptx_runs(a, prop->major, prop->minor);
  TORCH_CHECK(runs, op, " on ", describe_cuda_device(index), ": this build's ", family,
              " CUDA kernels were compiled for ", list_sm(cubins, "sm_"), " with PTX for ", list_sm(ptx, "compute_"),
              ", none of which runs on this GPU (", cuda_build_summary(), "). Rebuild blockops with "
              "TORCH_CUDA_ARCH_LIST=\"", prop->major, ".", prop->minor, "\" (or add it to the list).");
  const std::lock_guard<std::mutex> lock(mutex);
  checked.insert({family, index});
}

}  // namespace

std::string describe_cuda_device(c10::DeviceIndex index) {
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(index);
  return std::string(prop->name) + " (cuda:" + std::to_string(index) + ", sm_" + std::to_string(prop->major) +
         std::to_string(prop->minor) + ")";
}

KernelGuard::KernelGuard(const char* family, const char* op, c10::Device device) : guard_(device) {
  check_family_on_device(family, op, device.index());
}

}  // namespace blockops
