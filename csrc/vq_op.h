// Torch-facing argument checks of the vector-quantized GEMM ops (layout in vq.h), shared by the CPU glue
// (vq_cpu.cpp) and the CUDA glue (kernels/vq_cuda.cpp); implemented in vq_op.cpp. The bias check is checks.h's
// check_bias, shared with the lowbit family.
#pragma once
#include <ATen/core/Tensor.h>

#include "vq.h"

namespace blockops::vq {

constexpr const char* kFamily = "vq";

// The ops' names in error messages (their schemas are in ops.cpp).
constexpr const char* kLinear = "blockops.vq_linear";
constexpr const char* kDequant = "blockops.vq_dequantize";
constexpr const char* kGradInput = "blockops.vq_linear_grad_input";
constexpr const char* kGradCodebooks = "blockops.vq_grad_codebooks";
constexpr const char* kGradScales = "blockops.vq_grad_scales";

// The geometry and code type of validated (codes, codebooks, scales).
struct Weights {
  Geometry g;
  CodeType type;
};

// Validates codes [out, G, K] (or [out, G] for K = 1), codebooks [K, k, d] and the optional scales [out]: dtypes,
// shapes, devices, contiguity. Reads no tensor values (codes >= k: check_code_range).
Weights check_weights(const char* op, const at::Tensor& codes, const at::Tensor& codebooks,
                      const c10::optional<at::Tensor>& scales);

// An activation-like tensor [..., features] (x, grad_out): fp16 / bf16 / fp32 on the codes' device. Any strides:
// both backends copy it (contiguous fp32 on the CPU, contiguous and 16-byte aligned on CUDA).
void check_activation(const char* op, const char* arg, const at::Tensor& t, int64_t features, const at::Tensor& codes);

// t = grad_out^T @ x [out, in] fp32, contiguous, on the codes' device.
void check_t(const char* op, const at::Tensor& t, const Geometry& g, const at::Tensor& codes);

// Codes >= k would index past the codebook: a user error, raised (naming the first such code) before any CPU kernel
// reads a codeword. Reads every code, so only for host tensors: the CPU ops call it; the CUDA kernels clamp codes
// instead of paying a device-to-host sync (vq_launch.h). Skipped when the dtype cannot hold such a code (uint8 with
// k = 256, int16 with k = 65536).
void check_code_range(const char* op, const at::Tensor& codes, const Weights& w);

}  // namespace blockops::vq
