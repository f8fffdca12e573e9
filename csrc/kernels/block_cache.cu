// Cached-block skipping on CUDA: the relative L1 indicator (+ residual) in two deterministic passes, apply_residual
// and the gated cache update. Numerics and the chunking are csrc/block_cache.h's; everything accumulates in fp32
// within a chunk and fp64 across chunks.
//
//   pass 1, one CTA per (sample b, chunk k) (grid.x = B * chunks, b = task / chunks):
//       threads stride over the chunk's elements (every token when writing the residual, else only the tokens
//       t % stride == 0), each keeping its own (num, den); a warp-shuffle tree, then warp 0 adds the kWarps
//       warp sums in order -> partials[task]. The same thread count and tree every launch: deterministic.
//   pass 2, one thread per indicator: reduce_partials (chunk order, fp64) -> indicator[b] or indicator[0].
//   apply_residual, cache_update: grid-stride elementwise; cache_update's threads read the gate first and return
//   when it is zero, so a skipped update needs no host synchronisation.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "block_cache_launch.h"
#include "device_common.cuh"

namespace blockops::block_cache {
namespace {

constexpr int kThreads = 256;             // 8 warps: a chunk of 16K elements is 64 per thread
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxGridX = 2147483647;  // grid.x limit
constexpr int64_t kElementwiseBlocks = 4096;  // grid of the elementwise kernels: enough CTAs for any GPU

template <bool kResidual, bool kCompareResidual>
__global__ void __launch_bounds__(kThreads) indicator_partials_kernel(IndicatorParams p) {
  __shared__ float warp_num[kWarps];
  __shared__ float warp_den[kWarps];
  const Geometry& g = p.g;
  const int64_t task = blockIdx.x;
  const int64_t b = task / g.chunks(), k = task % g.chunks();
  const int64_t t0 = g.chunk_begin(k);
  // Rows (tokens) this pass visits: all of them when the residual is written, else every stride-th.
  const int64_t token_step = kResidual ? 1 : g.stride;
  const int64_t rows = (g.chunk_end(k) - t0 + token_step - 1) / token_step;
  const int64_t base = (b * g.tokens + t0) * g.channels;
  float num = 0.0f, den = 0.0f;
  for (int64_t e = threadIdx.x; e < rows * g.channels; e += kThreads) {
    const int64_t row = e / g.channels, c = e % g.channels;
    const int64_t t = t0 + row * token_step;
    const int64_t i = base + (row * token_step) * g.channels + c;
    float x = load_float(p.x, p.type, i);
    if constexpr (kResidual) {
      const float d = x - load_float(p.input, p.type, i);
      store_float(p.residual, p.type, i, d);
      if constexpr (kCompareResidual) x = d;
      if (t % g.stride != 0) continue;
    }
    const float r = load_float(p.reference, p.type, i);
    num += fabsf(x - r);
    den += fabsf(r);
  }
  num = warp_sum(num);
  den = warp_sum(den);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    warp_num[warp] = num;
    warp_den[warp] = den;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float total_num = 0.0f, total_den = 0.0f;
    for (int w = 0; w < kWarps; ++w) {
      total_num += warp_num[w];
      total_den += warp_den[w];
    }
    p.partials[task] = Partial{total_num, total_den};
  }
}

__global__ void indicator_finalize_kernel(IndicatorParams p) {
  const int64_t outputs = p.per_sample ? p.g.batch : 1;
  const int64_t o = blockIdx.x * int64_t{kThreads} + threadIdx.x;
  if (o < outputs) p.indicator[o] = reduce_partials(p.partials, p.g, o, p.per_sample);
}

__global__ void apply_residual_kernel(const void* __restrict__ input, const void* __restrict__ residual,
                                      void* __restrict__ out, DType type, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{kThreads} + threadIdx.x; i < n; i += int64_t{gridDim.x} * kThreads)
    store_float(out, type, i, load_float(input, type, i) + load_float(residual, type, i));
}

__device__ __forceinline__ bool gate_open(const void* gate, GateType type) {
  if (gate == nullptr) return true;
  switch (type) {
    case GateType::kBool: return *static_cast<const uint8_t*>(gate) != 0;
    case GateType::kF16: return load_float(gate, DType::kF16, 0) != 0.0f;
    case GateType::kBF16: return load_float(gate, DType::kBF16, 0) != 0.0f;
    case GateType::kF64: return *static_cast<const double*>(gate) != 0.0;
    default: return *static_cast<const float*>(gate) != 0.0f;
  }
}

// Copies 16-bit words: every dtype the op accepts is a multiple of two bytes.
__global__ void cache_update_kernel(uint16_t* __restrict__ cache, const uint16_t* __restrict__ value, int64_t words,
                                    const void* gate, GateType gate_type) {
  if (!gate_open(gate, gate_type)) return;
  for (int64_t i = blockIdx.x * int64_t{kThreads} + threadIdx.x; i < words; i += int64_t{gridDim.x} * kThreads)
    cache[i] = value[i];
}

int elementwise_blocks(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < kElementwiseBlocks ? (blocks > 0 ? blocks : 1) : kElementwiseBlocks);
}

}  // namespace

cudaError_t launch_indicator(const IndicatorParams& p, cudaStream_t stream) {
  const int64_t tasks = partials_count(p.g);
  if (tasks > kMaxGridX) return cudaErrorInvalidValue;
  if (tasks > 0) {
    const dim3 grid(static_cast<unsigned>(tasks));
    if (p.residual == nullptr) {
      indicator_partials_kernel<false, false><<<grid, kThreads, 0, stream>>>(p);
    } else if (p.compare_residual) {
      indicator_partials_kernel<true, true><<<grid, kThreads, 0, stream>>>(p);
    } else {
      indicator_partials_kernel<true, false><<<grid, kThreads, 0, stream>>>(p);
    }
  }
  const int64_t outputs = p.per_sample ? p.g.batch : 1;
  if (outputs > 0) {
    indicator_finalize_kernel<<<static_cast<unsigned>((outputs + kThreads - 1) / kThreads), kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

cudaError_t launch_apply_residual(const void* input, const void* residual, void* out, DType type, int64_t n,
                                  cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  apply_residual_kernel<<<elementwise_blocks(n), kThreads, 0, stream>>>(input, residual, out, type, n);
  return cudaGetLastError();
}

cudaError_t launch_cache_update(void* cache, const void* value, int64_t bytes, const void* gate, GateType gate_type,
                                cudaStream_t stream) {
  const int64_t words = bytes / 2;
  if (words == 0) return cudaSuccess;
  cache_update_kernel<<<elementwise_blocks(words), kThreads, 0, stream>>>(
      static_cast<uint16_t*>(cache), static_cast<const uint16_t*>(value), words, gate, gate_type);
  return cudaGetLastError();
}

}  // namespace blockops::block_cache
