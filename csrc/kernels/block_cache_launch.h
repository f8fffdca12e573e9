// Launchers of the block_cache CUDA kernels (kernels/block_cache.cu). Torch-free: the glue in block_cache_cuda.cpp
// passes raw pointers, the geometry and the stream.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "../block_cache.h"
#include "../dtype.h"

namespace blockops::block_cache {

// What relative_l1 / relative_l1_residual read and write. x, reference (and input, residual for the residual
// op) are [B, T, C] row-major of one dtype; partials is a device workspace of partials_count(g) Partials;
// indicator is fp32 [B] (per_sample) or [1].
struct IndicatorParams {
  const void* x;          // the compared tensor (relative_l1) or the block's output (relative_l1_residual)
  const void* input;      // residual op: the block's input, else nullptr
  const void* reference;  // the cached tensor
  void* residual;         // residual op: written x - input, else nullptr
  DType type;
  Geometry g;
  bool per_sample;
  bool compare_residual;  // residual op: compare x - input instead of x
  Partial* partials;
  float* indicator;
};

inline int64_t partials_count(const Geometry& g) { return g.batch * g.chunks(); }

cudaError_t launch_indicator(const IndicatorParams& p, cudaStream_t stream);

// out = input + residual, n elements of `type`.
cudaError_t launch_apply_residual(const void* input, const void* residual, void* out, DType type, int64_t n,
                                  cudaStream_t stream);

// The gate's dtype (cache_update): bool, or a floating type.
enum class GateType { kBool, kF16, kBF16, kF32, kF64 };

// cache <- value (bytes, a multiple of 2) unless gate (device, one element, may be nullptr = open) is zero.
cudaError_t launch_cache_update(void* cache, const void* value, int64_t bytes, const void* gate, GateType gate_type,
                                cudaStream_t stream);

}  // namespace blockops::block_cache
