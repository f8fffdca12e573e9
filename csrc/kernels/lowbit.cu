// Low-bit (2/3/4-bit, group-wise asymmetric) GEMM CUDA kernels: a fused GEMV for up to 8 rows of x, a
// dequantize kernel (for the GEMM paths, which then call cuBLAS from the glue) and the scales' gradient.
// The bit layout and W_hat = (q - z) * s are the shared header's (lowbit.h, bitpack.h), the same code the
// CPU kernels and the tests exercise. Everything accumulates in fp32.
//
// quant_gemv_kernel<kBits, kRows>: every weight word is loaded once, 16 bytes (4 columns) per thread.
//
//                     n ->  blockIdx.x = 0                         blockIdx.x = 1
//                   +----------------------------------------+----------------
//   qweight         | thr 0 | thr 1 | thr 2 | ... | thr 127   | thr 0 | ...
//   [words, out]    | n0..3 | n4..7 | ...                     |  (512 columns per block)
//     blockIdx.y=0  |  x tile 0: kTileWords rows of words     |       x[:, tile] -> smem fp32 [kRows, kTileK]
//     (words_per_   |  x tile 1                               |       xsum per (row, segment) -> smem
//      split rows)  |  ...                                    |
//     blockIdx.y=1  |  ...                                    |
//                   +----------------------------------------+----------------
//
//   per word, per code t:  acc[r][c] += x[r, k] * q[k, n0 + c]                 (codes as exact floats)
//   at each segment end:   total[r][c] += s * (acc[r][c] - z * xsum[r, seg]);  acc = 0
//   A segment is a group clipped to the x tile: scale and zero are constant on it, and the factored form
//   (lowbit.h) is linear in the k range, so flushing per segment gives the per-group result for groups that
//   span tiles or splits. Groups of 2- and 4-bit weights always end on a word boundary (g is a multiple of
//   16); a 3-bit group (10 codes per word) may end inside a word, which takes a per-code slow path.
//   splits == 1: y = total + bias.   splits > 1: atomicAdd(workspace, total), then an epilogue y = ws + bias.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "../static_switch.h"
#include "device_common.cuh"
#include "lowbit_launch.h"

namespace blockops::lowbit {
namespace {

constexpr int kThreads = 128;        // GEMV block: 4 warps, enough columns per block to keep int4 loads coalesced
constexpr int kWarps = kThreads / 32;
constexpr int kCols = 4;             // columns per GEMV thread: one 16-byte load of qweight
constexpr int kBlockCols = kThreads * kCols;
constexpr int kTileWords = 64;       // word rows per x tile: 512..1024 codes, <= 32 KiB of fp32 x at 8 rows
constexpr int kLoadAhead = 4;        // word rows loaded before use: with few warps per SM (8 rows: ~150
                                     // registers) one load per thread in flight cannot cover DRAM latency
constexpr int kMinSplitWords = 16;   // word rows per split: keeps x staging a small share of a block's work
constexpr int kSplitWordsPerRow = 4; // and >= 4 word rows per row of x: split-K atomics (splits x m x out
                                     // floats) stay <= 1/4 of the weight's bytes
constexpr int kBlocksPerSm = 2;      // split K until the grid has this many blocks per SM
constexpr int kEltThreads = 256;     // elementwise kernels (dequantize, epilogue, grad_scales): memory-bound

// Enough blocks to fill any current GPU several times over; grid-stride loops do the rest.
int blocks_for(int64_t work) {
  const int64_t blocks = (work + kEltThreads - 1) / kEltThreads;
  return static_cast<int>(blocks < 1 ? 1 : (blocks < 65536 ? blocks : 65536));
}

// Codes are < 2^23: OR-ing one into the mantissa of 2^23 and subtracting 2^23 is exact, and costs two
// full-rate ALU ops where I2F is quarter rate. This is the GEMV's per-code conversion.
__device__ __forceinline__ float code_to_float(uint32_t code) {
  return __uint_as_float(0x4B000000u | code) - 8388608.0f;
}

// ---- GEMV --------------------------------------------------------------------------------------------

// Word row w of qweight at this thread's 4 columns. The int4 load is the fast path (out % 4 == 0 and a
// 16-byte aligned qweight); columns past `out` read as code 0 so their accumulators stay finite.
__device__ __forceinline__ void load_words(const int32_t* __restrict__ qweight, int64_t w, int64_t n0, int64_t out,
                                           bool vec, uint32_t (&q)[kCols]) {
  const int32_t* row = qweight + w * out;
  if (vec && n0 < out) {
    const int4 v = __ldg(reinterpret_cast<const int4*>(row + n0));
    q[0] = static_cast<uint32_t>(v.x);
    q[1] = static_cast<uint32_t>(v.y);
    q[2] = static_cast<uint32_t>(v.z);
    q[3] = static_cast<uint32_t>(v.w);
  } else {
#pragma unroll
    for (int c = 0; c < kCols; ++c) q[c] = n0 + c < out ? static_cast<uint32_t>(__ldg(row + n0 + c)) : 0u;
  }
}

// Code t of each of the thread's words times x[r, kk] of the staged tile, into acc.
template <int kBits, int kRows, int kTileK>
__device__ __forceinline__ void accumulate_code(float (&acc)[kRows][kCols], const float (&xs)[kRows][kTileK],
                                                const uint32_t (&q)[kCols], int t, int kk) {
  float qf[kCols];
#pragma unroll
  for (int c = 0; c < kCols; ++c) qf[c] = code_to_float(bitpack::extract(q[c], t, kBits));
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const float xv = xs[r][kk];  // same address across the warp: a broadcast, no bank conflict
#pragma unroll
    for (int c = 0; c < kCols; ++c) acc[r][c] = fmaf(xv, qf[c], acc[r][c]);
  }
}

// Applies scale and zero of group `grp` to the segment just finished (see the sketch) and restarts acc.
template <int kRows, int kMaxSegments>
__device__ __forceinline__ void flush_segment(float (&acc)[kRows][kCols], float (&total)[kRows][kCols],
                                              const float (&xsum)[kRows][kMaxSegments], int seg, int64_t grp,
                                              const GemvParams& p, int64_t n0) {
  const int64_t out = p.g.out;
  float s[kCols], z[kCols];
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    const bool valid = n0 + c < out;
    s[c] = valid ? load_float(p.scales, p.param_type, grp * out + n0 + c) : 0.0f;
    z[c] = valid ? load_float(p.zeros, p.param_type, grp * out + n0 + c) : 0.0f;
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const float xs = xsum[r][seg];
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      total[r][c] = fmaf(s[c], acc[r][c] - z[c] * xs, total[r][c]);
      acc[r][c] = 0.0f;
    }
  }
}

// x[:, kt0 : kt0 + len] -> fp32 smem; rows >= m and k >= in are zero, so padding codes add nothing.
template <typename T, int kRows, int kTileK>
__device__ __forceinline__ void stage_x(const T* __restrict__ x, float (&xs)[kRows][kTileK], int64_t m, int64_t in,
                                        int64_t kt0, int len) {
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    for (int kk = threadIdx.x; kk < len; kk += kThreads) {
      const int64_t k = kt0 + kk;
      xs[r][kk] = (r < m && k < in) ? to_float(x[r * in + k]) : 0.0f;
    }
  }
}

template <int kBits,   // 2, 3 or 4
          int kRows>   // batch tile: 1, 2, 4 or 8 rows of x; rows >= p.m are zeros and never stored
__global__ void __launch_bounds__(kThreads)
    quant_gemv_kernel(const GemvParams p, const int64_t words_per_split, const bool vec) {
  constexpr int kPerWord = bitpack::values_per_word(kBits);
  constexpr int kTileK = kTileWords * kPerWord;
  constexpr int kMaxSegments = (kTileK - 1) / kGroupQuantum + 2;  // a tile cuts at most this many groups
  __shared__ float xs[kRows][kTileK];          // (kRows, kTileK) fp32 slice of x
  __shared__ float xsum[kRows][kMaxSegments];  // (kRows, segments) sums of that slice per segment

  const int64_t in = p.g.in;
  const int64_t out = p.g.out;
  const int64_t gsize = p.g.group_size;
  const int64_t n0 = (int64_t{blockIdx.x} * kThreads + threadIdx.x) * kCols;
  const bool split_k = gridDim.y > 1;
  const int64_t w_begin = int64_t{blockIdx.y} * words_per_split;
  const int64_t w_end = min64(p.g.words(), w_begin + words_per_split);
  if (split_k && w_begin >= w_end) return;  // block-uniform: an empty split adds nothing to the workspace

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  float acc[kRows][kCols] = {};
  float total[kRows][kCols] = {};

  for (int64_t wt0 = w_begin; wt0 < w_end; wt0 += kTileWords) {
    const int tile_words = static_cast<int>(min64(kTileWords, w_end - wt0));
    const int64_t kt0 = wt0 * kPerWord;
    const int len = tile_words * kPerWord;
    const int64_t kt_end = min64(kt0 + len, in);  // > kt0: every word holds at least one real code

    __syncthreads();  // the previous tile's readers are done with xs and xsum
    switch (p.x_type) {
      case DType::kF16: stage_x(static_cast<const __half*>(p.x), xs, p.m, in, kt0, len); break;
      case DType::kBF16: stage_x(static_cast<const __nv_bfloat16*>(p.x), xs, p.m, in, kt0, len); break;
      default: stage_x(static_cast<const float*>(p.x), xs, p.m, in, kt0, len); break;
    }
    __syncthreads();

    // Segment j covers [max(kt0, (grp0 + j) g), min(kt_end, (grp0 + j + 1) g)), local to the tile.
    const int64_t grp0 = kt0 / gsize;
    const int segments = static_cast<int>((kt_end - 1) / gsize - grp0 + 1);
    for (int pair = warp; pair < kRows * segments; pair += kWarps) {  // warp-uniform loop
      const int r = pair / segments;
      const int j = pair % segments;
      const int lo = j == 0 ? 0 : static_cast<int>((grp0 + j) * gsize - kt0);
      const int hi = static_cast<int>(min64((grp0 + j + 1) * gsize, kt_end) - kt0);
      float s = 0.0f;
      for (int kk = lo + lane; kk < hi; kk += 32) s += xs[r][kk];
      s = warp_sum(s);
      if (lane == 0) xsum[r][j] = s;
    }
    __syncthreads();

    auto segment_end = [&](int j) -> int {  // local k one past segment j; INT_MAX once the tile is done
      return j < segments ? static_cast<int>(min64((grp0 + j + 1) * gsize, kt_end) - kt0) : INT_MAX;
    };
    int seg = 0;
    int seg_end = segment_end(0);
    for (int wr0 = 0; wr0 < tile_words; wr0 += kLoadAhead) {
      uint32_t q[kLoadAhead][kCols];
#pragma unroll
      for (int u = 0; u < kLoadAhead; ++u) {  // all loads first: kLoadAhead 16-byte loads in flight
        if (wr0 + u < tile_words) load_words(p.qweight, wt0 + wr0 + u, n0, out, vec, q[u]);
      }
#pragma unroll
      for (int u = 0; u < kLoadAhead; ++u) {
        if (wr0 + u >= tile_words) break;
        const int kw = (wr0 + u) * kPerWord;
        if (seg_end >= kw + kPerWord) {  // no segment ends inside this word: all codes, then maybe one flush
#pragma unroll
          for (int t = 0; t < kPerWord; ++t) accumulate_code<kBits>(acc, xs, q[u], t, kw + t);
          if (seg_end == kw + kPerWord) {
            flush_segment(acc, total, xsum, seg, grp0 + seg, p, n0);
            seg_end = segment_end(++seg);
          }
        } else {  // 3-bit group end or the padded last word: check after every code
#pragma unroll 1
          for (int t = 0; t < kPerWord; ++t) {
            accumulate_code<kBits>(acc, xs, q[u], t, kw + t);
            if (kw + t + 1 == seg_end) {
              flush_segment(acc, total, xsum, seg, grp0 + seg, p, n0);
              seg_end = segment_end(++seg);
            }
          }
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    if (r >= p.m) continue;
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int64_t n = n0 + c;
      if (n >= out) continue;
      if (split_k) {
        atomicAdd(p.workspace + r * out + n, total[r][c]);
      } else {
        const float b = p.bias != nullptr ? load_float(p.bias, p.bias_type, n) : 0.0f;
        store_float(p.y, p.x_type, r * out + n, total[r][c] + b);
      }
    }
  }
}

// Split-K finish: y = workspace + bias, rounded once to y's dtype.
__global__ void __launch_bounds__(kEltThreads)
    splitk_epilogue_kernel(const float* __restrict__ workspace, const void* bias, DType bias_type, void* y,
                           DType y_type, int64_t m, int64_t out) {
  const int64_t total = m * out;
  for (int64_t i = blockIdx.x * int64_t{kEltThreads} + threadIdx.x; i < total; i += int64_t{gridDim.x} * kEltThreads) {
    const float b = bias != nullptr ? load_float(bias, bias_type, i % out) : 0.0f;
    store_float(y, y_type, i, workspace[i] + b);
  }
}

// ---- dequantize --------------------------------------------------------------------------------------

// One thread per packed word (w, n), n fastest so a warp reads 128 contiguous bytes of qweight; the thread
// writes its p values of row n of W_hat. A 3-bit word may cross a group boundary: the group follows k.
template <int kBits,       // 2, 3 or 4
          typename T>      // output element: float, __half or __nv_bfloat16
__global__ void __launch_bounds__(kEltThreads)
    dequantize_kernel(const int32_t* __restrict__ qweight, const void* scales, const void* zeros, DType param_type,
                      T* __restrict__ w_hat, Geometry g) {
  constexpr int kPerWord = bitpack::values_per_word(kBits);
  const int64_t in = g.in;
  const int64_t out = g.out;
  const int64_t gsize = g.group_size;
  const int64_t total = g.words() * out;
  for (int64_t i = blockIdx.x * int64_t{kEltThreads} + threadIdx.x; i < total; i += int64_t{gridDim.x} * kEltThreads) {
    const int64_t n = i % out;
    const int64_t w = i / out;
    const uint32_t word = static_cast<uint32_t>(qweight[i]);
    const int64_t k0 = w * kPerWord;
    int64_t grp = k0 / gsize;
    int64_t grp_end = (grp + 1) * gsize;
    float s = load_float(scales, param_type, grp * out + n);
    float z = load_float(zeros, param_type, grp * out + n);
    T* dst = w_hat + n * in + k0;
#pragma unroll
    for (int t = 0; t < kPerWord; ++t) {
      const int64_t k = k0 + t;
      if (k >= in) break;  // zero padding of the last word
      if (k == grp_end) {  // k < in, so group grp + 1 exists
        ++grp;
        grp_end += gsize;
        s = load_float(scales, param_type, grp * out + n);
        z = load_float(zeros, param_type, grp * out + n);
      }
      dst[t] = from_float<T>(dequant(static_cast<int>(bitpack::extract(word, t, kBits)), s, z));
    }
  }
}

// ---- grad_scales -------------------------------------------------------------------------------------

// One warp per (grp, n), n fastest: the lanes stride over the group's k, so reads of t's row n are
// coalesced; the warp's sum is out[grp, n]. No atomics, so the result is deterministic.
__global__ void __launch_bounds__(kEltThreads)
    grad_scales_kernel(const float* __restrict__ t, const int32_t* __restrict__ qweight, const void* zeros,
                       DType zero_type, float* __restrict__ grad, Geometry g) {
  constexpr int kWarpsPerBlock = kEltThreads / 32;
  const int lane = threadIdx.x % 32;
  const int64_t gsize = g.group_size;
  const int64_t pairs = g.groups() * g.out;
  const int64_t stride = int64_t{gridDim.x} * kWarpsPerBlock;
  for (int64_t pair = (blockIdx.x * int64_t{kEltThreads} + threadIdx.x) / 32; pair < pairs; pair += stride) {
    const int64_t n = pair % g.out;
    const int64_t grp = pair / g.out;
    const float z = load_float(zeros, zero_type, pair);  // zeros[grp, n]; pair == grp * out + n
    const float* t_row = t + n * g.in;
    float sum = 0.0f;
    for (int64_t k = grp * gsize + lane; k < (grp + 1) * gsize; k += 32) {
      sum += dequant(code_at(qweight, g, k, n), 1.0f, z) * t_row[k];  // scale 1: (q - z)
    }
    sum = warp_sum(sum);
    if (lane == 0) grad[pair] = sum;
  }
}

// ---- dispatch ----------------------------------------------------------------------------------------

}  // namespace

// Split K when the output columns alone give fewer than kBlocksPerSm blocks per SM (tall-skinny weights,
// narrow layers): enough splits to reach that, but every split keeps at least
// max(kMinSplitWords, kSplitWordsPerRow * m) word rows.
int quant_gemv_splits(const Geometry& g, int64_t m) {
  const int64_t words = g.words();
  const int64_t col_blocks = ceil_div(g.out, kBlockCols);
  const int64_t target = int64_t{kBlocksPerSm} * multiprocessor_count();
  const int64_t min_words = m * kSplitWordsPerRow > kMinSplitWords ? m * kSplitWordsPerRow : kMinSplitWords;
  if (col_blocks <= 0 || col_blocks >= target || words < 2 * min_words) return 1;
  int64_t splits = min64(ceil_div(target, col_blocks), words / min_words);
  splits = ceil_div(words, ceil_div(words, splits));  // no empty trailing split
  return static_cast<int>(splits < 1 ? 1 : splits);
}

cudaError_t launch_quant_gemv(const GemvParams& p, int splits, cudaStream_t stream) {
  if (!valid_geometry(p.g) || p.m < 1 || p.m > kCudaGemvMaxRows || splits < 1 || splits > 65535 ||
      (splits > 1 && p.workspace == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (p.g.out == 0) return cudaSuccess;
  const int64_t words = p.g.words();
  const int64_t words_per_split = words > 0 ? ceil_div(words, splits) : 0;
  const bool vec = p.g.out % kCols == 0 && reinterpret_cast<uintptr_t>(p.qweight) % 16 == 0;
  if (splits > 1) {
    const cudaError_t err = cudaMemsetAsync(p.workspace, 0, sizeof(float) * p.m * p.g.out, stream);
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(static_cast<unsigned>(ceil_div(p.g.out, kBlockCols)), static_cast<unsigned>(splits));
  const cudaError_t err = BLOCKOPS_WEIGHT_BITS_SWITCH(p.g.bits, kBits, return cudaErrorInvalidValue, [&] {
    return BLOCKOPS_POW2_ROWS_SWITCH(p.m, kRows, return cudaErrorInvalidValue, [&] {
      quant_gemv_kernel<kBits, kRows><<<grid, kThreads, 0, stream>>>(p, words_per_split, vec);
      return cudaGetLastError();
    });
  });
  if (err != cudaSuccess || splits == 1) return err;
  return launch_splitk_epilogue(p, stream);
}

cudaError_t launch_splitk_epilogue(const GemvParams& p, cudaStream_t stream) {
  const int64_t total = p.m * p.g.out;
  splitk_epilogue_kernel<<<blocks_for(total), kEltThreads, 0, stream>>>(p.workspace, p.bias, p.bias_type, p.y,
                                                                        p.x_type, p.m, p.g.out);
  return cudaGetLastError();
}

cudaError_t launch_quant_dequantize(const int32_t* qweight, const void* scales, const void* zeros,
                                    DType param_type, void* out, DType out_type, const Geometry& g,
                                    cudaStream_t stream) {
  if (!valid_geometry(g)) return cudaErrorInvalidValue;
  const int64_t total = g.words() * g.out;
  if (total == 0) return cudaSuccess;
  return BLOCKOPS_WEIGHT_BITS_SWITCH(g.bits, kBits, return cudaErrorInvalidValue, [&] {
    switch (out_type) {
      case DType::kF16:
        dequantize_kernel<kBits><<<blocks_for(total), kEltThreads, 0, stream>>>(
            qweight, scales, zeros, param_type, static_cast<__half*>(out), g);
        break;
      case DType::kBF16:
        dequantize_kernel<kBits><<<blocks_for(total), kEltThreads, 0, stream>>>(
            qweight, scales, zeros, param_type, static_cast<__nv_bfloat16*>(out), g);
        break;
      default:
        dequantize_kernel<kBits><<<blocks_for(total), kEltThreads, 0, stream>>>(
            qweight, scales, zeros, param_type, static_cast<float*>(out), g);
        break;
    }
    return cudaGetLastError();
  });
}

cudaError_t launch_quant_grad_scales(const float* t, const int32_t* qweight, const void* zeros, DType zero_type,
                                     float* out, const Geometry& g, cudaStream_t stream) {
  if (!valid_geometry(g)) return cudaErrorInvalidValue;
  const int64_t pairs = g.groups() * g.out;
  if (pairs == 0) return cudaSuccess;
  constexpr int64_t kWarpsPerBlock = kEltThreads / 32;
  const int64_t blocks = ceil_div(pairs, kWarpsPerBlock);
  grad_scales_kernel<<<static_cast<int>(blocks < 65536 ? blocks : 65536), kEltThreads, 0, stream>>>(
      t, qweight, zeros, zero_type, out, g);
  return cudaGetLastError();
}

}  // namespace blockops::lowbit
