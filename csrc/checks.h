// Argument checks shared by every op's CPU and CUDA glue. User errors go through TORCH_CHECK with a message
// that names the op, the argument and the sizes; library bugs use TORCH_INTERNAL_ASSERT.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>

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

// A floating tensor a kernel reads: fp16 / bf16 / fp32 on every device, and fp64 on the CPU, where the GEMM
// families and apply_residual run a portable fp64 path so that torch.autograd.gradcheck can check their gradients.
// The CUDA kernels have no fp64 instantiation (it would double their compile time for no user): a clear error.
inline void check_float_dtype(const at::Tensor& t, const char* op, const char* arg) {
  if (t.scalar_type() == at::kDouble) {
    TORCH_CHECK(t.is_cpu(), op, ": ", arg, " is float64 on ", t.device(), ", but float64 is CPU-only (a portable "
                "path for gradcheck); use fp32, fp16 or bf16 on ", t.device().type());
    return;
  }
  check_dtype(t, {at::kHalf, at::kBFloat16, at::kFloat}, op, arg);
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

// An int64 argument that the kernels keep as an int (a params struct field): refused, naming it, when outside
// [lo, hi] (default: int's range) instead of wrapping on the narrowing cast (group_size = 2^32 + 64 read as 64).
// Call it before any other use of the value.
inline int checked_int(int64_t value, const char* op, const char* arg,
                       int64_t lo = std::numeric_limits<int>::min(), int64_t hi = std::numeric_limits<int>::max()) {
  TORCH_CHECK(value >= lo && value <= hi, op, ": ", arg, " must be in [", lo, ", ", hi, "], got ", value);
  return static_cast<int>(value);
}

// A double argument that the kernels keep as a float (a score scale): refused, naming it, when NaN, infinite or
// beyond fp32's range (1e300 passes std::isfinite as a double but becomes inf on the cast), rather than narrowed.
inline float checked_finite_float(double value, const char* op, const char* arg) {
  constexpr double kMax = std::numeric_limits<float>::max();
  TORCH_CHECK(std::isfinite(value) && std::fabs(value) <= kMax, op, ": ", arg, " must be finite and within fp32's range "
              "(|", arg, "| <= ", kMax, "), got ", value);
  return static_cast<float>(value);
}

// Wraps a possibly negative dim into [0, ndim).
inline int64_t normalize_dim(int64_t dim, int64_t ndim, const char* op) {
  TORCH_CHECK(dim >= -ndim && dim < ndim, op, ": dim ", dim, " is out of range for a tensor with ", ndim,
              " dimension(s)");
  return dim < 0 ? dim + ndim : dim;
}

// ---- The quantized linear layers (lowbit, ptq161, vq): activations, bias and t = grad_out^T x ----------------------
// `ref` / `ref_arg` name the weight tensor the others must share a device with (qweight, perm, codes).

// An activation-like tensor [..., features] (x, grad_out): fp16 / bf16 / fp32 (fp64 on the CPU), ref's device, `features` in its last
// dim. Whether it must also be contiguous is the family's rule (check_contiguous after this).
inline void check_features(const at::Tensor& t, int64_t features, const char* op, const char* arg,
                           const at::Tensor& ref, const char* ref_arg) {
  check_float_dtype(t, op, arg);
  check_same_device(t, ref, op, arg, ref_arg);
  check_ndim_at_least(t, 1, op, arg);
  TORCH_CHECK(t.size(-1) == features, op, ": ", arg, " must have ", features, " features in its last dim, got shape ",
              t.sizes());
}

// The optional bias [out]: fp16 / bf16 / fp32 (fp64 on the CPU), ref's device (any strides: the glue makes it contiguous).
inline void check_bias(const c10::optional<at::Tensor>& bias, int64_t out, const char* op, const at::Tensor& ref,
                       const char* ref_arg) {
  if (!bias.has_value()) return;
  check_float_dtype(*bias, op, "bias");
  check_same_device(*bias, ref, op, "bias", ref_arg);
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out, op, ": bias must have shape [", out, "], got ",
              bias->sizes());
}

// t = grad_out^T @ x [out, in] fp32 (fp64 on the CPU: the fp64 path), contiguous, on ref's device: the input of the
// scales' (and codebooks') gradient.
inline void check_grad_product(const at::Tensor& t, int64_t out, int64_t in, const char* op, const at::Tensor& ref,
                               const char* ref_arg) {
  if (t.scalar_type() == at::kDouble) {
    check_float_dtype(t, op, "t");
  } else {
    check_dtype(t, {at::kFloat}, op, "t");
  }
  check_same_device(t, ref, op, "t", ref_arg);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == out && t.size(1) == in, op, ": t must have shape [", out, ", ", in,
              "] (grad_out^T @ x), got ", t.sizes());
  check_contiguous(t, op, "t");
}

}  // namespace blockops
