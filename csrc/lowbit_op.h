// Torch-facing argument handling for the low-bit GEMM ops, shared by the CPU glue (lowbit_cpu.cpp) and the CUDA glue
// (kernels/lowbit_cuda.cpp); implemented in lowbit_op.cpp. Every check names the op, the argument and the sizes. The
// bias check is checks.h's check_bias, shared with the vq family.
#pragma once
#include <ATen/core/Tensor.h>

#include "lowbit.h"

namespace blockops::lowbit {

constexpr const char* kFamily = "lowbit";

// The ops' names in error messages (their schemas are in ops.cpp).
constexpr const char* kLinear = "blockops.quant_linear";
constexpr const char* kDequant = "blockops.quant_dequantize";
constexpr const char* kGradInput = "blockops.quant_linear_grad_input";
constexpr const char* kGradScales = "blockops.quant_grad_scales";

// Validates (qweight, scales, zeros, bits, group_size) and returns the geometry. in = scales.size(0) * g.
Geometry check_weight(const char* op, const at::Tensor& qweight, const at::Tensor& scales,
                      const at::Tensor& zeros, int64_t bits, int64_t group_size);

// Validates an activation-like tensor [..., features] against the weight's device: floating dtype
// (fp16/bf16/fp32), last dim == features, contiguous.
void check_activation(const char* op, const char* arg, const at::Tensor& t, int64_t features,
                      const at::Tensor& qweight);

// Validates t = grad_out^T @ x of quant_grad_scales: [out, in] fp32, contiguous, on qweight's device.
void check_t(const char* op, const at::Tensor& t, const Geometry& g, const at::Tensor& qweight);

}  // namespace blockops::lowbit
