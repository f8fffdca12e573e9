// Launchers of the low-bit GEMM CUDA kernels (kernels/lowbit.cu, kernels/lowbit_mma.cu, kernels/lowbit_wgmma.cu).
// Torch-free: the glue in lowbit_cuda.cpp passes raw pointers, the geometry, the dtypes and the stream. Every pointer
// is to contiguous row-major device memory; the glue's checks guarantee the shapes named below.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "../dtype.h"
#include "../lowbit.h"

namespace blockops::lowbit {

// Rows of x up to which quant_linear runs the fused GEMV on CUDA; above it, the tensor-core kernel (when
// quant_mma_supported) up to kCudaMmaMaxRows, else dequantize + cuBLAS GEMM; above kCudaMmaMaxRows on an H100 / H200
// the Hopper kernel (when quant_wgmma_supported), else dequantize + cuBLAS. (The CPU's limits differ:
// kCpuGemvMaxRows in lowbit_cpu.cpp.)
constexpr int64_t kCudaGemvMaxRows = 8;
constexpr int64_t kCudaMmaMaxRows = 64;

// Arguments of the fused GEMV and of the tensor-core kernels (same pointers; only the row range differs).
struct GemvParams {
  const void* x;            // [m, in], x_type
  DType x_type;             // also y's dtype
  const int32_t* qweight;   // [words, out]
  const void* scales;       // [in / g, out], param_type
  const void* zeros;        // [in / g, out], param_type
  DType param_type;
  const void* bias;         // [out], bias_type; nullptr: no bias
  DType bias_type;
  void* y;                  // [m, out], x_type
  float* workspace;         // [m, out] fp32 when splits > 1 (the launcher zeroes it), else unused
  int64_t m;                // 1 ..= kCudaGemvMaxRows (GEMV), kCudaGemvMaxRows < m <= kCudaMmaMaxRows (mma),
                            // m > kCudaMmaMaxRows (wgmma)
  Geometry g;
};

// How many K splits launch_quant_gemv should use for m rows times this weight on the current device (>= 1).
// The glue allocates GemvParams::workspace when this is > 1.
int quant_gemv_splits(const Geometry& g, int64_t m);

// y = x @ W_hat^T (+ bias) for m <= kCudaGemvMaxRows rows; `splits` from quant_gemv_splits.
cudaError_t launch_quant_gemv(const GemvParams& p, int splits, cudaStream_t stream);

// Split-K finish shared by both kernels: y = workspace + bias, rounded once to x's dtype.
cudaError_t launch_splitk_epilogue(const GemvParams& p, cudaStream_t stream);

// Whether launch_quant_mma takes these arguments: kCudaGemvMaxRows < m <= kCudaMmaMaxRows, x fp16 or bf16, out a
// positive multiple of 8, x / qweight / scales / zeros 16-byte aligned, and its shared memory fits the current
// device. Otherwise quant_linear keeps dequantize + cuBLAS.
bool quant_mma_supported(const GemvParams& p);

// How many K splits launch_quant_mma should use for m rows times this weight on the current device (>= 1).
// The glue allocates GemvParams::workspace when this is > 1.
int quant_mma_splits(const Geometry& g, int64_t m);

// y = x @ W_hat^T (+ bias) on tensor cores, weights dequantized in registers; `splits` from quant_mma_splits.
cudaError_t launch_quant_mma(const GemvParams& p, int splits, cudaStream_t stream);

// Whether launch_quant_wgmma (kernels/lowbit_wgmma.cu: sm_90a wgmma + TMA, weights dequantized in registers) takes
// these arguments: m > kCudaMmaMaxRows, x fp16 or bf16, out a positive multiple of 8, x / qweight / scales / zeros
// 16-byte aligned (the TMA bases), and its shared memory fits the current device. Always false in a build without
// the CUTLASS/CuTe headers. The glue asks only on an sm_90 device whose build holds sm_90a code
// (hopper_kernels_run), unless BLOCKOPS_LOWBIT_WGMMA=0.
bool quant_wgmma_supported(const GemvParams& p);

// y = x @ W_hat^T (+ bias) for m > kCudaMmaMaxRows rows on Hopper; p.workspace unused (no split K).
cudaError_t launch_quant_wgmma(const GemvParams& p, cudaStream_t stream);

// out [out, in] (out_type) = W_hat, computed in fp32 and rounded once.
cudaError_t launch_quant_dequantize(const int32_t* qweight, const void* scales, const void* zeros,
                                    DType param_type, void* out, DType out_type, const Geometry& g,
                                    cudaStream_t stream);

// out [in / g, out] fp32: out[grp, n] = sum_{k in grp} (q[k, n] - zeros[grp, n]) * t[n, k], t [out, in] fp32.
cudaError_t launch_quant_grad_scales(const float* t, const int32_t* qweight, const void* zeros, DType zero_type,
                                     float* out, const Geometry& g, cudaStream_t stream);

}  // namespace blockops::lowbit
