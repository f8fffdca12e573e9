// Masked diffusion LM decoding, CUDA kernels (family "dllm"; the rules and the online-softmax state are csrc/dllm.h's,
// shared with the CPU kernels). The simple version: CUDA cores, fp32 statistics, no shared-memory staging.
//
// dllm_unmask, two launches on one stream:
//   statistics   grid B * L, one CTA of kThreads per position (b, l); non-candidates write (-1, -inf) and leave.
//                thread t walks v = t, t + kThreads, ... < V (coalesced reads), keeping (max, first argmax, sum exp);
//                the kWarps per-thread states merge by xor-shuffles inside each warp, then through shared memory:
//
//                   logits[b, l, :]   | t0 t1 ... t255 | t0 t1 ... t255 | ...     (kThreads-strided)
//                   warp w: shuffle-merge of its 32 states -> red[w];  warp 0: merge of red[0..kWarps) -> thread 0
//
//   selection    grid B, one CTA per row: thread t takes positions l = t, t + kThreads, ...; a candidate's rank is the
//                count of the row's candidates that rank before it (non-candidates hold conf = -inf from the first
//                launch and cannot; the loop only visits the block bounds and checks `masked` to stay independent of
//                that), then dllm.h's rule.
// dllm_kv_overwrite: grid (n, B), one CTA per (row, new position), threads over the H * D elements of that slot.
#include "dllm_launch.h"
#include "device_common.cuh"

namespace blockops::dllm {
namespace {

constexpr int kThreads = 256;               // a CTA per vocabulary row: 8 warps keep enough loads in flight
constexpr int kWarps = kThreads / 32;
constexpr int kCopyThreads = 128;           // a KV slot is H * D elements, typically 1-8K: four warps

// One state shuffled in from lane ^ offset and merged (the index travels as an int: exact for any V < 2^31).
__device__ __forceinline__ RowStats shuffle_merge(const RowStats& s, int offset) {
  RowStats o;
  o.max = __shfl_xor_sync(0xffffffffu, s.max, offset);
  o.argmax = __shfl_xor_sync(0xffffffffu, static_cast<int>(s.argmax), offset);
  o.sum = __shfl_xor_sync(0xffffffffu, s.sum, offset);
  return merge(s, o);
}

__device__ __forceinline__ RowStats warp_merge(RowStats s) {
  for (int offset = 16; offset > 0; offset >>= 1) s = shuffle_merge(s, offset);
  return s;
}

__global__ void __launch_bounds__(kThreads) unmask_stats_kernel(UnmaskParams p, DType type) {
  __shared__ float red_max[kWarps];
  __shared__ int red_arg[kWarps];
  __shared__ float red_sum[kWarps];
  const int64_t b = blockIdx.x / p.L, l = blockIdx.x % p.L;
  const int64_t out = b * p.L + l;
  if (!is_candidate(p, b, l)) {                 // uniform over the CTA: everyone leaves together
    if (threadIdx.x == 0) {
      p.tokens[out] = -1;
      p.conf[out] = -INFINITY;
    }
    return;
  }
  const int64_t row = b * p.stride_b + l * p.stride_l;
  RowStats s = empty_stats();
  for (int64_t v = threadIdx.x; v < p.V; v += kThreads) push(s, load_float(p.logits, type, row + v), v);
  s = warp_merge(s);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    red_max[warp] = s.max;
    red_arg[warp] = static_cast<int>(s.argmax);
    red_sum[warp] = s.sum;
  }
  __syncthreads();
  if (warp == 0) {
    s = lane < kWarps ? RowStats{red_max[lane], red_arg[lane], red_sum[lane]} : empty_stats();
    s = warp_merge(s);
    if (lane == 0) {
      p.tokens[out] = s.argmax;
      p.conf[out] = confidence(s);
    }
  }
}

__global__ void unmask_select_kernel(UnmaskParams p) {
  const int64_t b = blockIdx.x;
  const int64_t lo = p.bounds[2 * b] < 0 ? 0 : p.bounds[2 * b];
  const int64_t hi = p.bounds[2 * b + 1] > p.L ? p.L : p.bounds[2 * b + 1];
  const int64_t k = min_tokens_of(p.min_tokens, b);
  const float* conf = p.conf + b * p.L;
  for (int64_t l = threadIdx.x; l < p.L; l += kThreads) {
    bool take = false;
    if (is_candidate(p, b, l)) {
      int64_t rank = 0;
      for (int64_t m = lo; m < hi; ++m) rank += p.masked[b * p.L + m] && ranks_before(conf[m], m, conf[l], l);
      take = accept(rank, conf[l], k, p.rule);
    }
    p.unmask[b * p.L + l] = take;
  }
}

template <typename T>  // T: an unsigned integer of the element's size (the copy moves bits)
__global__ void __launch_bounds__(kCopyThreads) kv_overwrite_kernel(OverwriteParams p) {
  const int64_t j = blockIdx.x, b = blockIdx.y;
  const int64_t slot = p.positions[b * p.n + j];
  if (slot < 0 || slot >= p.S) return;          // unchecked call: skipped, never written out of bounds
  T* cache = static_cast<T*>(p.cache);
  const T* src = static_cast<const T*>(p.src);
  for (int64_t e = threadIdx.x; e < p.H * p.D; e += kCopyThreads) {
    const int64_t h = e / p.D, d = e % p.D;
    cache[((b * p.H + h) * p.S + slot) * p.D + d] = src[b * p.sb + h * p.sh + j * p.sj + d];
  }
}

}  // namespace

cudaError_t launch_dllm_unmask(const UnmaskParams& p, DType logits_type, cudaStream_t stream) {
  if (p.B * p.L == 0) return cudaSuccess;
  unmask_stats_kernel<<<static_cast<unsigned>(p.B * p.L), kThreads, 0, stream>>>(p, logits_type);
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  unmask_select_kernel<<<static_cast<unsigned>(p.B), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_dllm_kv_overwrite(const OverwriteParams& p, cudaStream_t stream) {
  if (p.B * p.n * p.H * p.D == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(p.n), static_cast<unsigned>(p.B));
  if (p.element_bytes == 2) {
    kv_overwrite_kernel<uint16_t><<<grid, kCopyThreads, 0, stream>>>(p);
  } else {
    kv_overwrite_kernel<uint32_t><<<grid, kCopyThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace blockops::dllm
