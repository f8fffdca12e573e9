// Argument checks shared by every op's CPU and CUDA glue. User errors go through TORCH_CHECK with a message
// that names the op, the argument and the sizes; library bugs use TORCH_INTERNAL_ASSERT.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>

namespace blockops {

inline void check_dtype(const at::Tensor& t, std::initializer_list<at::ScalarType> allowed, const char* op,
                        const char* arg) {
  for (at::ScalarType s : allowed) {
    if (t.scalar_type() == s) return;
  }
  std::string names;
  for (at::ScalarType s : allowed) names += std::string(names.empty() ? "" : ", ") + c10::toString(s);
  TORCH_CHECK(false, op, ": ", arg, " must have dtype in {", names, "}, got ", t.scalar_type());
}

inline void check_contiguous(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", arg, " must be contiguous (got strides ", t.strides(),
              " for sizes ", t.sizes(), "); call .contiguous() first");
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* arg,
                              const char* ref_arg) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", arg, " is on ", t.device(), " but ", ref_arg, " is on ",
              ref.device(), "; all tensors must be on one device");
}

inline void check_ndim_at_least(const at::Tensor& t, int64_t ndim, const char* op, const char* arg) {
  TORCH_CHECK(t.dim() >= ndim, op, ": ", arg, " must have at least ", ndim, " dimension(s), got shape ",
              t.sizes());
}

// Wraps a possibly negative dim into [0, ndim).
inline int64_t normalize_dim(int64_t dim, int64_t ndim, const char* op) {
  TORCH_CHECK(dim >= -ndim && dim < ndim, op, ": dim ", dim, " is out of range for a tensor with ", ndim,
              " dimension(s)");
  return dim < 0 ? dim + ndim : dim;
}

}  // namespace blockops
