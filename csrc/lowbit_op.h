// Torch-facing argument handling for the low-bit GEMM ops, shared by the CPU and CUDA glue (implemented
// in lowbit_cpu.cpp, which every build compiles). Every check names the op, the argument and the sizes.
#pragma once
#include <ATen/core/Tensor.h>

#include "lowbit.h"

namespace blockops::lowbit {

// Validates (qweight, scales, zeros, bits, group_size) and returns the geometry. in = scales.size(0) * g.
Geometry check_weight(const char* op, const at::Tensor& qweight, const at::Tensor& scales,
                      const at::Tensor& zeros, int64_t bits, int64_t group_size);

// Validates an activation-like tensor [..., features] against the weight's device: floating dtype
// (fp16/bf16/fp32), last dim == features, contiguous.
void check_activation(const char* op, const char* arg, const at::Tensor& t, int64_t features,
                      const at::Tensor& qweight);

// Validates the optional bias [out] (any float dtype, same device as qweight).
void check_bias(const char* op, const c10::optional<at::Tensor>& bias, const Geometry& g, const at::Tensor& qweight);

}  // namespace blockops::lowbit
