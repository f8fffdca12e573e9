// Which kernel image of a CUDA build a GPU runs, from architecture lists as TORCH_CUDA_ARCH_LIST writes them
// ("8.0;9.0a"). Torch-free and CUDA-free: KernelGuard (kernels/cuda_glue.cpp) uses it on the GPU at hand, and
// module.cpp exposes it to the tests (_C.cuda_kernel_image), which check the rules without a GPU.
#pragma once
#include <string>
#include <vector>

namespace blockops::cuda_arch {

// One entry: "8.0" (code for 8.x, x >= 0), "9.0a" (arch-specific: 9.0 only), "10.0f" (family-specific: 10.x).
struct Arch {
  int major = 0;
  int minor = 0;
  char suffix = '\0';  // '\0', 'a' or 'f'
};

inline std::vector<Arch> parse(const std::string& list) {
  std::vector<Arch> archs;
  size_t start = 0;
  while (start < list.size()) {
    size_t end = list.find(';', start);
    if (end == std::string::npos) end = list.size();
    const std::string entry = list.substr(start, end - start);
    const size_t dot = entry.find('.');
    if (dot != std::string::npos && dot > 0 && dot + 1 < entry.size()) {
      Arch a;
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
inline bool cubin_runs(const Arch& a, int major, int minor) {
  return a.major == major && (a.suffix == 'a' ? a.minor == minor : a.minor <= minor);
}

// PTX JIT-compiles for every GPU at least as new as its virtual architecture; arch- or family-specific PTX only
// where its cubin would run.
inline bool ptx_runs(const Arch& a, int major, int minor) {
  if (a.suffix != '\0') return cubin_runs(a, major, minor);
  return a.major < major || (a.major == major && a.minor <= minor);
}

// "80", "90a".
inline std::string digits(const Arch& a) {
  return std::to_string(a.major) + std::to_string(a.minor) + (a.suffix != '\0' ? std::string(1, a.suffix) : "");
}

// "sm_80, sm_90a" (prefix "sm_" or "compute_"), or "none".
inline std::string names(const std::vector<Arch>& archs, const char* prefix) {
  std::string out;
  for (const Arch& a : archs) out += (out.empty() ? "" : ", ") + std::string(prefix) + digits(a);
  return out.empty() ? "none" : out;
}

// The image a GPU of compute capability major.minor runs from cubins `archs` and PTX `ptx`: "sm_XY" (a cubin,
// preferred, the newest that runs), "compute_XY" (PTX, JIT-compiled at first launch) or "" (none runs: a launch
// would fail with "no kernel image is available").
inline std::string kernel_image(const std::string& archs, const std::string& ptx, int major, int minor) {
  std::string best;
  int best_minor = -1;
  for (const Arch& a : parse(archs)) {
    if (cubin_runs(a, major, minor) && a.minor >= best_minor) {
      best = "sm_" + digits(a);
      best_minor = a.minor;
    }
  }
  if (!best.empty()) return best;
  for (const Arch& a : parse(ptx)) {
    if (ptx_runs(a, major, minor)) best = "compute_" + digits(a);
  }
  return best;
}

}  // namespace blockops::cuda_arch
