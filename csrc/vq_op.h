// Torch-facing argument checks of the vector-quantized GEMM ops (layout in vq.h), shared by the CPU glue
// (vq_cpu.cpp) and the CUDA glue (kernels/vq_cuda.cpp). Header-only. None reads tensor values: the code range
// check needs the codes on the host and stays in vq_cpu.cpp (the CUDA kernels clamp codes instead, vq.cu).
#pragma once
#include <ATen/core/Tensor.h>

#include "checks.h"
#include "vq.h"

namespace blockops::vq {

// The geometry and code type of validated (codes, codebooks, scales).
struct Weights {
  Geometry g;
  CodeType type;
};

inline Weights check_weights(const char* op, const at::Tensor& codes, const at::Tensor& codebooks,
                             const c10::optional<at::Tensor>& scales) {
  check_dtype(codes, {at::kByte, at::kShort}, op, "codes");
  check_dtype(codebooks, {at::kHalf, at::kBFloat16, at::kFloat}, op, "codebooks");
  TORCH_CHECK(codebooks.dim() == 3, op, ": codebooks must be [K, k, d], got shape ", codebooks.sizes());
  const int64_t K = codebooks.size(0), k = codebooks.size(1), d = codebooks.size(2);
  TORCH_CHECK(K == 1 || K == 2, op, ": codebooks.size(0) (additive codebooks K) must be 1 or 2, got ", K,
              " (shape ", codebooks.sizes(), ")");
  TORCH_CHECK(d == 2 || d == 4 || d == 8, op, ": codebooks.size(2) (vector dim d) must be 2, 4 or 8, got ", d);
  TORCH_CHECK(k >= 16 && k <= 65536, op, ": codebooks.size(1) (codebook size k) must be in [16, 65536], got ", k);
  TORCH_CHECK((codes.dim() == 3 && codes.size(2) == K) || (codes.dim() == 2 && K == 1), op,
              ": codes must be [out, in/d, K] = [out, in/d, ", K, "]", K == 1 ? " or [out, in/d]" : "",
              " for codebooks of shape ", codebooks.sizes(), ", got ", codes.sizes());
  check_same_device(codebooks, codes, op, "codebooks", "codes");
  check_contiguous(codes, op, "codes");
  check_contiguous(codebooks, op, "codebooks");
  const Geometry g{codes.size(0), codes.size(1), K, k, d};
  if (scales.has_value()) {
    check_dtype(*scales, {at::kHalf, at::kBFloat16, at::kFloat}, op, "scales");
    check_same_device(*scales, codes, op, "scales", "codes");
    TORCH_CHECK(scales->dim() == 1 && scales->size(0) == g.out, op, ": scales must have shape [", g.out,
                "] (one per output row), got ", scales->sizes());
  }
  return {g, codes.scalar_type() == at::kByte ? CodeType::kU8 : CodeType::kU16};
}

inline void check_activation(const char* op, const char* arg, const at::Tensor& t, int64_t features,
                             const at::Tensor& codes) {
  check_dtype(t, {at::kHalf, at::kBFloat16, at::kFloat}, op, arg);
  check_same_device(t, codes, op, arg, "codes");
  check_ndim_at_least(t, 1, op, arg);
  TORCH_CHECK(t.size(-1) == features, op, ": ", arg, " must have ", features, " features in its last dim (in = ",
              "codes.size(1) * d), got shape ", t.sizes());
}

inline void check_t(const char* op, const at::Tensor& t, const Geometry& g, const at::Tensor& codes) {
  check_dtype(t, {at::kFloat}, op, "t");
  check_same_device(t, codes, op, "t", "codes");
  TORCH_CHECK(t.dim() == 2 && t.size(0) == g.out && t.size(1) == g.in(), op, ": t must have shape [", g.out, ", ",
              g.in(), "] (grad_out^T @ x), got ", t.sizes());
  check_contiguous(t, op, "t");
}

// Validates the optional bias [out] (fp16/bf16/fp32, same device as the codes).
inline void check_bias(const char* op, const c10::optional<at::Tensor>& bias, const Geometry& g,
                       const at::Tensor& codes) {
  if (!bias.has_value()) return;
  check_dtype(*bias, {at::kHalf, at::kBFloat16, at::kFloat}, op, "bias");
  check_same_device(*bias, codes, op, "bias", "codes");
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == g.out, op, ": bias must have shape [", g.out, "], got ",
              bias->sizes());
}

}  // namespace blockops::vq
