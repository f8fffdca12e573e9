// Cached-block skipping numerics, torch-free and shared by the CPU kernels (block_cache_cpu.cpp), the CUDA
// kernels (kernels/block_cache.cu) and the emulation harness (tools/cuda_emu/test_block_cache.cpp).
//
// Every tensor of a call is viewed as [B, T, C] row-major (B = size(0), T = size(1), C = the product of the
// rest). The relative L1 indicator of x against a reference r over the tokens t with t % stride == 0 is
//
//     rel = sum |x - r| / sum |r|        (per sample b, or summed over the whole batch first)
//
// Determinism: the tokens of a sample are cut into fixed chunks of chunk_tokens() tokens (a function of C and
// the stride only, not of the thread or block count); each chunk's two sums are fp32 partials in an order
// fixed by the backend, and the partials are added in chunk order in fp64. A given backend therefore returns
// bit-identical indicators run after run and for any thread count.
//
//   sample b:  | chunk 0: tokens [0, tc) | chunk 1: [tc, 2 tc) | ... |     tc = chunk_tokens(C, stride)
//              partial[b][chunk] = (sum |x - r|, sum |r|) over its tokens t % stride == 0  -> fp32
//   rel[b] = ratio(sum_chunk partial.num, sum_chunk partial.den)                           -> fp64, then fp32
#pragma once
#include <cstdint>

#include "macros.h"

namespace blockops::block_cache {

// Elements of the strided tokens one chunk covers, about: large enough that a chunk's bookkeeping (a task on
// the CPU, a thread block on the GPU) is amortised, small enough that a 256-token DiT latent still spreads
// over many chunks.
constexpr int64_t kChunkElements = 16384;

// The stride the kernels use for a stride >= 1 over `tokens` tokens: a stride >= T visits token 0 only, as T
// (or 1 when T is 0) does, so it is clamped there. Without the clamp a huge stride (2^49, 2^63 - 1) overflows
// the chunk size below and every index computed from it (issue 17: SIGFPE, or an indicator of 0 for tensors
// that differ). The checks (block_cache_op.cpp) apply it before any kernel, CPU or CUDA, sees the stride.
BLOCKOPS_HD int64_t clamp_stride(int64_t tokens, int64_t stride) {
  const int64_t limit = tokens > 1 ? tokens : 1;
  return stride < limit ? stride : limit;
}

// Tokens (of the full, unstrided token axis) per chunk: a multiple of the stride so every chunk starts on a
// token that enters the indicator. Saturates at INT64_MAX rather than wrap (a clamped stride never gets near:
// stride <= T and T * kChunkElements is far below 2^63 for any tensor that fits in memory).
BLOCKOPS_HD int64_t chunk_tokens(int64_t channels, int64_t stride) {
  const int64_t c = channels > 0 ? channels : 1;
  const int64_t strided = kChunkElements / c > 0 ? kChunkElements / c : 1;
  constexpr int64_t kMax = INT64_MAX;
  return stride > kMax / strided ? kMax : strided * stride;
}

struct Geometry {
  int64_t batch;     // B
  int64_t tokens;    // T
  int64_t channels;  // C
  int64_t stride;    // tokens t % stride == 0 enter the indicator

  BLOCKOPS_HD int64_t tokens_per_chunk() const { return chunk_tokens(channels, stride); }
  // (T - 1) / tc + 1 rather than (T + tc - 1) / tc: no overflow for any tc >= 1.
  BLOCKOPS_HD int64_t chunks() const { return tokens > 0 ? (tokens - 1) / tokens_per_chunk() + 1 : 0; }
  BLOCKOPS_HD int64_t sample_elements() const { return tokens * channels; }
  // Token range [first, last) of chunk k.
  BLOCKOPS_HD int64_t chunk_begin(int64_t k) const { return k * tokens_per_chunk(); }
  BLOCKOPS_HD int64_t chunk_end(int64_t k) const {
    const int64_t e = (k + 1) * tokens_per_chunk();
    return e < tokens ? e : tokens;
  }
};

// The two sums of one chunk.
struct Partial {
  float num;  // sum |x - r|
  float den;  // sum |r|
};

// The indicator from the fp64 totals: 0 when nothing differs from an all-zero reference, +inf when something
// differs from it, NaN when an input held NaN (so any "rel < threshold" test fails and the block is computed).
BLOCKOPS_HD float ratio(double num, double den) {
  if (num == 0.0 && den == 0.0) return 0.0f;
  return static_cast<float>(num / den);
}

// Final pass: rel for sample b (per_sample) or for the whole batch, from the partials [B][chunks], summed in
// chunk order (then sample order) in fp64.
BLOCKOPS_HD float reduce_partials(const Partial* partials, const Geometry& g, int64_t b, bool per_sample) {
  double num = 0.0, den = 0.0;
  const int64_t first = per_sample ? b : 0, last = per_sample ? b + 1 : g.batch;
  for (int64_t s = first; s < last; ++s) {
    for (int64_t k = 0; k < g.chunks(); ++k) {
      num += partials[s * g.chunks() + k].num;
      den += partials[s * g.chunks() + k].den;
    }
  }
  return ratio(num, den);
}

}  // namespace blockops::block_cache
