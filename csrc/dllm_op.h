// Torch-facing argument handling for the dllm ops, shared by the CPU and CUDA glue (implemented in dllm_op.cpp): the
// op names, the checks, and the outputs and kernel parameters they build.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include "dllm.h"

namespace blockops::dllm {

constexpr const char* kFamily = "dllm";   // introspection.h: counters and build_info
constexpr const char* kUnmask = "blockops.dllm_unmask";
constexpr const char* kOverwrite = "blockops.dllm_kv_overwrite";

// dllm_unmask's outputs and the kernel parameters pointing into them.
struct UnmaskCall {
  at::Tensor tokens;      // [B, L] int64
  at::Tensor unmask;      // [B, L] bool
  at::Tensor confidence;  // [B, L] fp32
  UnmaskParams params;
  int dtype;              // DType of the logits (dtype.h), as int to keep this header small
};

// Validates dllm_unmask's arguments (dtypes, shapes, devices, layout, rule values), allocates the outputs on
// the logits' device and fills the parameters.
UnmaskCall prepare_unmask(const at::Tensor& logits, const at::Tensor& masked, const at::Tensor& block_bounds,
                          const c10::optional<at::Tensor>& min_tokens, double threshold,
                          c10::optional<double> factor);

// Validates dllm_kv_overwrite's tensor arguments (not the position values) and fills the parameters.
OverwriteParams prepare_overwrite(const at::Tensor& cache, const at::Tensor& src, const at::Tensor& positions);

// Raises a clear error when a position is outside [0, S) or a row's positions are not strictly increasing.
// Works on any device (on CUDA it reads one flag back: a host sync).
void check_positions(const at::Tensor& positions, int64_t S);

}  // namespace blockops::dllm
