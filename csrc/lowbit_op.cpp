// The argument checks of the low-bit GEMM ops (lowbit_op.h), the one implementation the CPU and CUDA glue call.
#include "lowbit_op.h"

#include "checks.h"

namespace blockops::lowbit {

Geometry check_weight(const char* op, const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
                      int64_t bits, int64_t group_size) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4, op, ": bits must be 2, 3 or 4, got ", bits);
  TORCH_CHECK(group_size >= kGroupQuantum && group_size % kGroupQuantum == 0, op, ": group_size must be a positive ",
              "multiple of ", kGroupQuantum, ", got ", group_size);
  // Geometry keeps it as an int: refuse what would wrap (2^32 + 64 read as 64) rather than narrow it.
  const int group = checked_int(group_size, op, "group_size", kGroupQuantum);
  TORCH_CHECK(scales.dim() < 1 || scales.size(0) <= std::numeric_limits<int64_t>::max() / group_size, op,
              ": in = scales.size(0) * group_size = ", scales.size(0), " * ", group_size, " overflows int64");
  check_dtype(qweight, {at::kInt}, op, "qweight");
  check_float_dtype(scales, op, "scales");  // fp64 on the CPU only
  TORCH_CHECK(zeros.scalar_type() == scales.scalar_type(), op, ": zeros must have the scales' dtype ",
              scales.scalar_type(), ", got ", zeros.scalar_type());
  TORCH_CHECK(qweight.dim() == 2 && scales.dim() == 2, op, ": qweight and scales must be 2-D, got shapes ",
              qweight.sizes(), " and ", scales.sizes());
  TORCH_CHECK(zeros.sizes() == scales.sizes(), op, ": zeros shape ", zeros.sizes(), " must equal scales shape ",
              scales.sizes());
  check_same_device(scales, qweight, op, "scales", "qweight");
  check_same_device(zeros, qweight, op, "zeros", "qweight");
  check_contiguous(qweight, op, "qweight");
  check_contiguous(scales, op, "scales");
  check_contiguous(zeros, op, "zeros");
  const Geometry g{scales.size(0) * group_size, scales.size(1), static_cast<int>(bits), group};
  TORCH_CHECK(qweight.size(1) == g.out, op, ": qweight has ", qweight.size(1), " output columns but scales has ",
              g.out);
  TORCH_CHECK(qweight.size(0) == g.words(), op, ": in = scales.size(0) * group_size = ", g.in, " needs ", g.words(),
              " packed rows of ", g.per_word(), " ", bits, "-bit codes, but qweight has ", qweight.size(0),
              " (shape ", qweight.sizes(), ")");
  return g;
}

void check_activation(const char* op, const char* arg, const at::Tensor& t, int64_t features,
                      const at::Tensor& qweight) {
  check_features(t, features, op, arg, qweight, "qweight");
  check_contiguous(t, op, arg);
}

void check_t(const char* op, const at::Tensor& t, const Geometry& g, const at::Tensor& qweight) {
  check_grad_product(t, g.out, g.in, op, qweight, "qweight");
}

}  // namespace blockops::lowbit
