// Launchers of the vector-quantized GEMM CUDA kernels (kernels/vq.cu). Torch-free: the glue in vq_cuda.cpp
// passes raw pointers, the geometry (vq.h), the dtypes and the stream. Every pointer is to contiguous row-major
// device memory; the glue's checks guarantee the shapes named below.
//
// Codes >= k never cause an out-of-bounds read: every kernel reads code c as min(c, k - 1). The CPU ops raise on
// such codes; checking on the GPU would need a device-to-host sync per call, so the CUDA ops compute with the
// clamped code instead (documented in python/blockops/ops/vq.py and tested in tests/test_vq.py).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "../dtype.h"
#include "../vq.h"

namespace blockops::vq {

// Rows of x up to which vq_linear runs the GEMV on CUDA (CUDA cores, codebook in shared memory). The CPU's
// small-batch limit differs: kCpuSmallBatchRows in vq.h.
constexpr int64_t kCudaGemvMaxRows = 8;

// The quantized weight as the kernels read it.
struct DeviceWeights {
  const void* codes;       // [out, P] (P = groups * K), code_type
  CodeType code_type;
  const void* codebooks;   // [K, k, d], cb_type
  DType cb_type;
  const void* scales;      // [out], scale_type; nullptr: all ones
  DType scale_type;
  Geometry g;
};

struct LinearParams {
  DeviceWeights w;
  const void* x;           // [m, in], x_type (also y's dtype)
  DType x_type;
  const void* bias;        // [out], bias_type; nullptr: no bias
  DType bias_type;
  void* y;                 // [m, out], x_type
  float* workspace;        // GEMV split partials [splits, m, out] fp32 when splits > 1, else unused
  int64_t m;               // rows of x, >= 1
};

enum class LinearPath {
  kGemv,  // m <= kCudaGemvMaxRows: CUDA-core GEMV, codebook replicated in shared memory, split over positions
  kMma,   // fp16/bf16 x, in % 8 == 0, 16-byte aligned x: W_hat tiles dequantized into smem, mma.sync m16n8k16
  kSimt,  // everything else (fp32 x, odd in): CUDA-core tiled GEMM on dequantized W_hat tiles
};

// The kernel vq_linear runs for these arguments on the current device.
LinearPath linear_path(const LinearParams& p);

// Position splits of the GEMV on the current device (>= 1); the glue allocates the workspace when > 1.
int gemv_splits(const LinearParams& p);

// y = x @ W_hat^T (+ bias), fp32 accumulation, rounded once to x's dtype. `splits` from gemv_splits (kGemv only).
cudaError_t launch_vq_linear(const LinearParams& p, LinearPath path, int splits, cudaStream_t stream);

// out [out, in] (out_type) = W_hat, computed in fp32 as scale * (c0 + c1) and rounded once (as the CPU op).
cudaError_t launch_vq_dequantize(const DeviceWeights& w, void* out, DType out_type, cudaStream_t stream);

// grad [out] fp32 = sum_i W_hat_unscaled[n, i] * t[n, i], t [out, in] fp32 (w.scales is ignored).
cudaError_t launch_vq_grad_scales(const float* t, const DeviceWeights& w, float* grad, cudaStream_t stream);

// grad [K, k, d] fp32: grad[book, c] = sum over the code positions e listed in order[offsets[s], offsets[s + 1])
// (s = book * k + c; e = n * P + p, flat index into codes) of scales[n] * t[n, (p / K) * d : ... + d]. One warp per
// codeword sums its list in a fixed lane assignment and reduction tree: deterministic, no atomics. The glue builds
// (order, offsets) with a stable sort of the clamped keys book * k + code.
cudaError_t launch_vq_grad_codebooks(const float* t, const DeviceWeights& w, const int64_t* order,
                                     const int64_t* offsets, float* grad, cudaStream_t stream);

}  // namespace blockops::vq
