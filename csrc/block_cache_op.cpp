// The block_cache ops' argument checks (block_cache_op.h), shared by the CPU glue (block_cache_cpu.cpp) and the
// CUDA glue (kernels/block_cache_cuda.cpp).
#include <ATen/core/Tensor.h>

#include <initializer_list>
#include <vector>

#include "block_cache_op.h"
#include "checks.h"

namespace blockops::block_cache {

Geometry check_indicator_args(std::initializer_list<const at::Tensor*> tensors,
                              std::initializer_list<const char*> names, int64_t stride, const char* op) {
  TORCH_CHECK(stride >= 1, op, ": stride must be at least 1, got ", stride);
  const at::Tensor& first = **tensors.begin();
  const char* first_name = *names.begin();
  auto name = names.begin();
  for (const at::Tensor* t : tensors) {
    check_dtype(*t, {at::kFloat, at::kHalf, at::kBFloat16}, op, *name);
    check_ndim_at_least(*t, 2, op, *name);
    check_same_device(*t, first, op, *name, first_name);
    TORCH_CHECK(t->scalar_type() == first.scalar_type(), op, ": ", *name, " has dtype ", t->scalar_type(), " but ",
                first_name, " has ", first.scalar_type(), "; all tensors must share one dtype");
    TORCH_CHECK(t->sizes() == first.sizes(), op, ": ", *name, " has shape ", t->sizes(), " but ", first_name,
                " has ", first.sizes(), "; all tensors must have one shape");
    check_contiguous(*t, op, *name);
    ++name;
  }
  const int64_t batch = first.size(0), tokens = first.size(1);
  const int64_t channels = batch * tokens == 0 ? 0 : first.numel() / (batch * tokens);
  // A stride >= T visits token 0 only, like T: clamped so the chunk arithmetic cannot overflow (block_cache.h).
  return Geometry{batch, tokens, channels, clamp_stride(tokens, stride)};
}

std::vector<int64_t> indicator_sizes(const Geometry& g, bool per_sample) {
  return per_sample ? std::vector<int64_t>{g.batch} : std::vector<int64_t>{};
}

void check_same_layout(const at::Tensor& a, const at::Tensor& b, const char* op, const char* a_name,
                       const char* b_name) {
  // fp64 on the CPU too: apply_residual has a backward, so gradcheck runs it in fp64; cache_update copies bytes.
  check_float_dtype(a, op, a_name);
  check_same_device(b, a, op, b_name, a_name);
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", b_name, " has dtype ", b.scalar_type(), " but ", a_name,
              " has ", a.scalar_type(), "; they must match");
  TORCH_CHECK(a.sizes() == b.sizes(), op, ": ", b_name, " has shape ", b.sizes(), " but ", a_name, " has ",
              a.sizes(), "; they must match");
  check_contiguous(a, op, a_name);
  check_contiguous(b, op, b_name);
}

void check_gate(const at::Tensor& gate, const at::Tensor& cache, const char* op) {
  TORCH_CHECK(gate.numel() == 1, op, ": gate must have exactly one element, got shape ", gate.sizes());
  TORCH_CHECK(gate.scalar_type() == at::kBool || at::isFloatingType(gate.scalar_type()), op,
              ": gate must be bool or floating, got ", gate.scalar_type());
  check_same_device(gate, cache, op, "gate", "cache");
}

}  // namespace blockops::block_cache
