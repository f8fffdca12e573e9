// The lowbit family's CPU kernels that another family's CPU code calls directly (implemented in lowbit_cpu.cpp).
// ptq161's binary part is a 1-bit GEMM: its batched CPU path runs on lowbit's fixed-point kernel with sign codes.
#pragma once
#include <ATen/core/Tensor.h>

namespace blockops::lowbit {

constexpr int64_t kCpuGemvMaxRows = 64;  // rows up to which the fp32 and portable decode kernels run (above:
                                         // dequantized blocks + ATen's GEMM); the fixed-point kernels take any
                                         // row count (lowbit_cpu.cpp). CUDA: kCudaGemvMaxRows in lowbit_launch.h

// U [rows, out] fp32, U[m, i] = sum_j (2 b[j, i] - 1) x[m, j], b[j, i] = bit j % 32 of signs[j / 32, i] (signs
// [words, out] int32, x [rows, words * 32] fp32 contiguous), through the fixed-point kernel with 1-bit codes
// (scale 2, zero 1/2): activations rounded per group of up to 256 inputs to 16-bit fixed point, as quant_linear's.
// Returns an undefined tensor where that kernel does not run (no AVX2, or fewer than 2 rows): the caller takes its
// own path.
at::Tensor sign_matmul_fixed_point(const at::Tensor& x, const at::Tensor& signs);

}  // namespace blockops::lowbit
