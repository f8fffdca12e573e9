// What the torch-facing glue of every family (the CPU and CUDA entry points) shares besides the argument checks of
// checks.h: at::ScalarType <-> DType, fp32 copies, activation shapes. Call these only after the op's checks.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>
#include <c10/util/accumulate.h>

#include <initializer_list>
#include <type_traits>
#include <vector>

#include "dtype.h"

namespace blockops {

inline DType dtype_of(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return DType::kF32;
    case at::kHalf: return DType::kF16;
    case at::kBFloat16: return DType::kBF16;
    default: TORCH_INTERNAL_ASSERT(false, "a dtype check let an unsupported dtype through: ", s);
  }
}

inline at::ScalarType scalar_type_of(DType t) {
  switch (t) {
    case DType::kF16: return at::kHalf;
    case DType::kBF16: return at::kBFloat16;
    default: return at::kFloat;
  }
}

// t as a contiguous fp32 tensor: t itself when it already is one (no copy), else a converted copy.
inline at::Tensor contiguous_fp32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// The same in the compute type T of a kernel with an fp64 path (float: contiguous_fp32; double: fp64).
template <typename T>
inline at::Tensor contiguous_as(const at::Tensor& t) {
  return t.to(std::is_same_v<T, double> ? at::kDouble : at::kFloat).contiguous();
}

// Whether any of the defined tensors is fp64: the CPU kernels of the GEMM families then take their fp64 path.
inline bool any_fp64(std::initializer_list<const at::Tensor*> ts) {
  for (const at::Tensor* t : ts) {
    if (t->defined() && t->scalar_type() == at::kDouble) return true;
  }
  return false;
}

// Rows of an activation [..., features]: the leading dims flattened (0 features still leaves the rows countable).
inline int64_t rows_of(const at::Tensor& t) {
  return c10::multiply_integers(t.sizes().begin(), t.sizes().end() - 1);
}

// t's sizes with the last one replaced: the output shape of a [..., in] -> [..., out] op.
inline std::vector<int64_t> with_last_dim(const at::Tensor& t, int64_t last) {
  std::vector<int64_t> sizes(t.sizes().begin(), t.sizes().end());
  sizes.back() = last;
  return sizes;
}

// The output of a quantized linear layer [..., in] -> [..., out] that has nothing to multiply (no rows, no
// outputs, or no input features): x @ W^T is all zeros, so y is the bias broadcast over the rows in x's dtype
// (what F.linear returns for in == 0), or zeros without a bias. Called by every family's CPU and CUDA glue
// (lowbit, vq, ptq161) after the checks, before any kernel sees in == 0.
inline at::Tensor linear_without_products(const std::vector<int64_t>& out_sizes, const c10::optional<at::Tensor>& bias,
                                          const at::TensorOptions& options) {
  at::Tensor y = at::zeros(out_sizes, options);
  if (bias.has_value() && y.numel() > 0) y.copy_(*bias);  // broadcasts [out] over the rows, rounds to x's dtype
  return y;
}

}  // namespace blockops
