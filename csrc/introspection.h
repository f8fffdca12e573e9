// What the library can say about itself: which kernel families were built (CPU ISA, CUDA architectures)
// and how often each compiled kernel entry point ran. Tests use the call counters to prove that the
// compiled kernel, not some Python fallback, produced a result.
#pragma once
#include <atomic>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace blockops {

// One counter per kernel entry point ("<op>.<backend>", or "<op>_<path>.<backend>" for a path inside one),
// belonging to a kernel family. Define at namespace scope so that every counter is listed from load time on,
// then call hit() once per kernel launch.
class KernelCounter {
 public:
  KernelCounter(const char* family, const char* name);
  void hit() { calls_.fetch_add(1, std::memory_order_relaxed); }
  const char* family() const { return family_; }
  const char* name() const { return name_; }
  uint64_t calls() const { return calls_.load(std::memory_order_relaxed); }

 private:
  const char* family_;
  const char* name_;
  std::atomic<uint64_t> calls_{0};
};

// A kernel family announces itself (at namespace scope) with the function that names the CPU ISA its CPU
// kernels use in this process.
struct FamilyRegistration {
  FamilyRegistration(const char* name, const char* (*cpu_isa)());
};

// Records the family of an op defined in ops.cpp (the one schema file); build_info() lists them.
void register_op_family(const std::string& op, const char* family);
// The family of a defined op, or "" for an unknown name.
std::string op_family(const std::string& op);

// A kernel family's CUDA build: the architectures its cubins were compiled for and those of its embedded PTX
// (which newer GPUs JIT-compile), each ";"-separated as in TORCH_CUDA_ARCH_LIST ("8.0;9.0a").
struct CudaFamilyBuild {
  const char* family;
  const char* archs;
  const char* ptx;
};
// Every family whose CUDA kernels are in this build (none without CUDA), from CMake (build_config.h).
const std::vector<CudaFamilyBuild>& cuda_family_builds();
// `family`'s entry, or nullptr when its CUDA kernels were not built.
const CudaFamilyBuild* find_cuda_family(const std::string& family);
// The families with Hopper kernels (csrc/kernels/<family>_wgmma.cu), and whether this build compiled them: CUTLASS/CuTe
// headers found (BLOCKOPS_HAVE_CUTE) and "9.0a" among the family's CUDA architectures. build_info() reports both.
const std::vector<std::string>& hopper_kernel_families();
bool hopper_kernels_built(const std::string& family);
// Why a family has no CUDA kernels in this build, for error messages: the CUDA architectures that were requested and
// the oldest one the kernels support, or that the build has no CUDA at all.
std::string cuda_build_summary();

std::vector<std::pair<std::string, uint64_t>> kernel_call_counts();
std::string build_info_json();

}  // namespace blockops
