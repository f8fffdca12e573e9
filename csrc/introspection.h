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

// One counter per kernel entry point ("<op>.<backend>"). Define at namespace scope so that every counter is
// listed from load time on, then call hit() once per kernel launch.
class KernelCounter {
 public:
  explicit KernelCounter(const char* name);
  void hit() { calls_.fetch_add(1, std::memory_order_relaxed); }
  const char* name() const { return name_; }
  uint64_t calls() const { return calls_.load(std::memory_order_relaxed); }

 private:
  const char* name_;
  std::atomic<uint64_t> calls_{0};
};

// A kernel family announces itself (at namespace scope) with the function that names the CPU ISA its CPU
// kernels use in this process.
struct FamilyRegistration {
  FamilyRegistration(const char* name, const char* (*cpu_isa)());
};

std::vector<std::pair<std::string, uint64_t>> kernel_call_counts();
std::string build_info_json();

}  // namespace blockops
