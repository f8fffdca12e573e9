// PTQ1.61 CUDA kernel: the +-1 part of the mixed GEMM, U = signs^T x' for up to 8 rows of x' (= r2 x over the
// non-salient channels, gathered through perm by the glue). The salient 4-bit part runs on the lowbit family's
// CUDA kernels and the factors r1 (alpha U + mu V) are applied by the glue. Format: ../ptq161.h.
//
// binary_gemv_kernel<kRows>: one thread per output row i, so a warp's loads of a word row are 32 consecutive
// int32 (one 128-byte transaction); every sign word is loaded once.
//
//                    i ->  blockIdx.x = 0             blockIdx.x = 1
//                  +----------------------------+-----------------
//   signs          | thr 0 | thr 1 | ... | 127  | thr 0 | ...        (128 rows per block)
//   [words, out]   |  words of x' tile 0        |      x'[:, tile] -> smem fp32 [kRows, kTileWords * 32]
//     |            |  words of x' tile 1        |
//     v            |  ...                       |
//
//   per word, per bit t:  acc[r] += (bit t ? +1 : -1) * x'[r, 32 w + t]: the sign is XOR-ed into x' (no multiply).
#include <cuda_runtime.h>

#include <cstdint>

#include "ptq161_launch.h"

namespace blockops::ptq161 {
namespace {

constexpr int kThreads = 128;    // rows per block: 4 warps, each reading one 128-byte line per word row
constexpr int kTileWords = 16;   // word rows per staged x' tile: 512 inputs, <= 16 KiB fp32 at 8 rows
constexpr int kTileInputs = kTileWords * kSignsPerWord;

// x' with its sign flipped where the stored bit is 0 (b = -1): bit t of `negate` moved to the fp32 sign bit.
__device__ __forceinline__ float signed_input(float x, uint32_t negate, int t) {
  return __int_as_float(__float_as_int(x) ^ static_cast<int>((negate >> t) << 31));
}

template <int kRows>
__global__ void __launch_bounds__(kThreads) binary_gemv_kernel(BinaryGemvParams p) {
  __shared__ float xs[kRows][kTileInputs];
  const int64_t out = p.g.out, words = p.g.sign_words(), stride = words * kSignsPerWord;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const bool active = i < out;
  float acc[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) acc[r] = 0.f;
  for (int64_t w0 = 0; w0 < words; w0 += kTileWords) {
    const int tile_words = static_cast<int>(words - w0 < kTileWords ? words - w0 : kTileWords);
    __syncthreads();  // the previous tile is no longer read
    for (int e = threadIdx.x; e < kRows * tile_words * kSignsPerWord; e += kThreads) {
      const int r = e / (tile_words * kSignsPerWord), k = e % (tile_words * kSignsPerWord);
      xs[r][k] = p.plain[r * stride + w0 * kSignsPerWord + k];
    }
    __syncthreads();
    if (active) {
      for (int w = 0; w < tile_words; ++w) {
        const uint32_t negate = ~static_cast<uint32_t>(__ldg(p.signs + (w0 + w) * out + i));
#pragma unroll 8
        for (int t = 0; t < kSignsPerWord; ++t) {
#pragma unroll
          for (int r = 0; r < kRows; ++r) acc[r] += signed_input(xs[r][w * kSignsPerWord + t], negate, t);
        }
      }
    }
  }
  if (active) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) p.u[r * out + i] = acc[r];
  }
}

template <int kRows>
cudaError_t launch_rows(const BinaryGemvParams& p, cudaStream_t stream) {
  const int64_t blocks = (p.g.out + kThreads - 1) / kThreads;
  binary_gemv_kernel<kRows><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_binary_gemv(const BinaryGemvParams& p, cudaStream_t stream) {
  if (p.m < 1 || p.m > kCudaGemvMaxRows || p.g.out <= 0) return cudaErrorInvalidValue;
  switch (p.m) {
    case 1: return launch_rows<1>(p, stream);
    case 2: return launch_rows<2>(p, stream);
    case 3: return launch_rows<3>(p, stream);
    case 4: return launch_rows<4>(p, stream);
    case 5: return launch_rows<5>(p, stream);
    case 6: return launch_rows<6>(p, stream);
    case 7: return launch_rows<7>(p, stream);
    default: return launch_rows<8>(p, stream);
  }
}

}  // namespace blockops::ptq161
