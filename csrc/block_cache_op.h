// Torch-facing argument handling for the block_cache ops, shared by the CPU and CUDA glue (implemented in
// block_cache_op.cpp): the op names and the checks.
#pragma once
#include <ATen/core/Tensor.h>

#include <initializer_list>
#include <vector>

#include "block_cache.h"

namespace blockops::block_cache {

constexpr const char* kFamily = "block_cache";   // introspection.h: counters and build_info
constexpr const char* kRelativeL1 = "blockops.relative_l1";
constexpr const char* kRelativeL1Residual = "blockops.relative_l1_residual";
constexpr const char* kApplyResidual = "blockops.apply_residual";
constexpr const char* kCacheUpdate = "blockops.cache_update";

// Checks that every tensor of `tensors` (named by `names`) is a contiguous fp16/bf16/fp32 tensor of at least
// two dims with the first one's shape, dtype and device; returns the [B, T, C] geometry with `stride`.
Geometry check_indicator_args(std::initializer_list<const at::Tensor*> tensors,
                              std::initializer_list<const char*> names, int64_t stride, const char* op);
// Shape of the indicator: [B] when per_sample, [] otherwise.
std::vector<int64_t> indicator_sizes(const Geometry& g, bool per_sample);
// apply_residual / cache_update: same shape, dtype and device, contiguous, fp16/bf16/fp32.
void check_same_layout(const at::Tensor& a, const at::Tensor& b, const char* op, const char* a_name,
                       const char* b_name);
// cache_update's gate: one element, bool or floating, on the cache's device.
void check_gate(const at::Tensor& gate, const at::Tensor& cache, const char* op);

}  // namespace blockops::block_cache
