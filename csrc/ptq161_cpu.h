// The ptq161 family's CPU kernels in files of their own (the rest of the CPU code: ptq161_cpu.cpp).
#pragma once
#include <ATen/core/Tensor.h>

#include <vector>

namespace blockops::ptq161 {

// U [rows, out] fp32, U[m, i] = sum_j (2 b[j, i] - 1) x[m, j], b[j, i] = bit j % 32 of signs[j / 32, i] (signs
// [words, out] int32, x [rows, words * 32] fp32 contiguous): the binary part's product for several rows on AVX2, by
// byte-shuffle lookups in 16-entry tables of signed sums (ptq161_cpu_shuffle.cpp). Activations are rounded per row
// and block of kShuffleBlockInputs inputs to 14-bit fixed point (relative error of an input at most 2^-14 of its
// block's largest |x|). Rows holding a NaN or an infinity have no fixed-point step: they are listed in non_finite_rows
// and left for the caller (their U rows are unspecified). Returns an undefined tensor where the kernel does not run
// (no AVX2): the caller takes its own path.
constexpr int64_t kShuffleBlockInputs = 256;
at::Tensor sign_matmul_shuffle(const at::Tensor& x, const at::Tensor& signs, std::vector<int64_t>& non_finite_rows);

}  // namespace blockops::ptq161
