// Launcher of the PTQ1.61 CUDA kernel (kernels/ptq161.cu). Torch-free: the glue in ptq161_cuda.cpp passes raw
// pointers and the geometry; every pointer is to contiguous row-major device memory of the shapes named below.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "../ptq161.h"

namespace blockops::ptq161 {

// Rows of x up to which ptq161_linear runs the fused +-1 GEMV; above it, decoded +-1 blocks + cuBLAS.
constexpr int64_t kCudaGemvMaxRows = 8;

struct BinaryGemvParams {
  const float* plain;     // [m, sign_words * 32] fp32: r2 x over the non-salient channels in perm order, zero padded
  const int32_t* signs;   // [sign_words, out]
  float* u;               // [m, out] fp32: U[r, i] = sum_j b[j, i] plain[r, j] (b = +-1 from the stored bit)
  int64_t m;              // 1 ..= kCudaGemvMaxRows
  Geometry g;
};

cudaError_t launch_binary_gemv(const BinaryGemvParams& p, cudaStream_t stream);

}  // namespace blockops::ptq161
