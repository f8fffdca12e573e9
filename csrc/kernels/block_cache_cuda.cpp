// CUDA glue for the block_cache ops: argument checks (shared with the CPU path), allocation, launch on the current
// stream, and the CUDA dispatch registration. Compiled by the host compiler; the kernels are in block_cache.cu.
// Nothing here reads a device value on the host: indicators and gates stay on the GPU.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../block_cache_op.h"
#include "../glue.h"
#include "../introspection.h"
#include "cuda_glue.h"
#include "block_cache_launch.h"

namespace blockops::block_cache {
namespace {

KernelCounter relative_l1_counter(kFamily, "relative_l1.cuda");
KernelCounter relative_l1_residual_counter(kFamily, "relative_l1_residual.cuda");
KernelCounter apply_residual_counter(kFamily, "apply_residual.cuda");
KernelCounter cache_update_counter(kFamily, "cache_update.cuda");

at::Tensor run_indicator(IndicatorParams p, const at::Tensor& like) {
  at::Tensor partials = at::empty({partials_count(p.g) * 2}, like.options().dtype(at::kFloat));
  at::Tensor out = at::empty(indicator_sizes(p.g, p.per_sample), like.options().dtype(at::kFloat));
  p.partials = reinterpret_cast<Partial*>(partials.mutable_data_ptr<float>());
  p.indicator = out.mutable_data_ptr<float>();
  C10_CUDA_CHECK(launch_indicator(p, c10::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor relative_l1_cuda(const at::Tensor& current, const at::Tensor& reference, int64_t stride, bool per_sample) {
  const Geometry g = check_indicator_args({&current, &reference}, {"current", "reference"}, stride,
                                          kRelativeL1);
  const KernelGuard guard(kFamily, kRelativeL1, current.device());
  relative_l1_counter.hit();
  IndicatorParams p{current.const_data_ptr(), nullptr, reference.const_data_ptr(), nullptr,
                    dtype_of(current.scalar_type()), g, per_sample, false, nullptr, nullptr};
  return run_indicator(p, current);
}

at::Tensor relative_l1_residual_cuda(const at::Tensor& output, const at::Tensor& input, const at::Tensor& reference,
                                     at::Tensor& residual, int64_t stride, bool per_sample, bool compare_residual) {
  const Geometry g = check_indicator_args({&output, &input, &reference, &residual},
                                          {"output", "input", "reference", "residual"}, stride,
                                          kRelativeL1Residual);
  const KernelGuard guard(kFamily, kRelativeL1Residual, output.device());
  relative_l1_residual_counter.hit();
  IndicatorParams p{output.const_data_ptr(), input.const_data_ptr(), reference.const_data_ptr(),
                    residual.mutable_data_ptr(), dtype_of(output.scalar_type()), g, per_sample, compare_residual,
                    nullptr, nullptr};
  return run_indicator(p, output);
}

at::Tensor apply_residual_cuda(const at::Tensor& input, const at::Tensor& residual) {
  check_same_layout(input, residual, kApplyResidual, "input", "residual");
  const KernelGuard guard(kFamily, kApplyResidual, input.device());
  at::Tensor out = at::empty(input.sizes(), input.options());
  if (out.numel() == 0) return out;
  apply_residual_counter.hit();
  C10_CUDA_CHECK(launch_apply_residual(input.const_data_ptr(), residual.const_data_ptr(), out.mutable_data_ptr(),
                                       dtype_of(input.scalar_type()), input.numel(),
                                       c10::cuda::getCurrentCUDAStream()));
  return out;
}

GateType gate_type_of(at::ScalarType s) {
  switch (s) {
    case at::kBool: return GateType::kBool;
    case at::kHalf: return GateType::kF16;
    case at::kBFloat16: return GateType::kBF16;
    case at::kDouble: return GateType::kF64;
    case at::kFloat: return GateType::kF32;
    default: TORCH_CHECK(false, "blockops.cache_update: gate must be bool, fp16, bf16, fp32 or fp64, got ", s);
  }
}

void cache_update_cuda(at::Tensor& cache, const at::Tensor& value, const std::optional<at::Tensor>& gate) {
  check_same_layout(cache, value, kCacheUpdate, "cache", "value");
  GateType type = GateType::kBool;
  if (gate.has_value()) {
    check_gate(*gate, cache, kCacheUpdate);
    type = gate_type_of(gate->scalar_type());
  }
  const KernelGuard guard(kFamily, kCacheUpdate, cache.device());
  cache_update_counter.hit();
  const at::Tensor gate_contig = gate.has_value() ? gate->contiguous() : at::Tensor();
  C10_CUDA_CHECK(launch_cache_update(cache.mutable_data_ptr(), value.const_data_ptr(),
                                     value.numel() * value.element_size(),
                                     gate.has_value() ? gate_contig.const_data_ptr() : nullptr, type,
                                     c10::cuda::getCurrentCUDAStream()));
}

}  // namespace

TORCH_LIBRARY_IMPL(blockops, CUDA, m) {
  m.impl("relative_l1", &relative_l1_cuda);
  m.impl("relative_l1_residual", &relative_l1_residual_cuda);
  m.impl("apply_residual", &apply_residual_cuda);
  m.impl("cache_update", &cache_update_cuda);
}

}  // namespace blockops::block_cache
