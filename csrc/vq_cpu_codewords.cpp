// Vector-quantized GEMV on AVX2 CPUs without AVX-512 VBMI, 1-2 activation rows, uint8 codes of k = 256 codewords of
// d = 4 or 8 weights, K = 1 or 2 codebooks (VQ4DiT's 2-bit k256 d4, AQLM 2x8): codewords times activations in int16
// fixed point (vpmaddwd), no lookup tables (vq_cpu.h: codeword_gemv).
//
//   codewords  cb16[kk][c][u] = round(codebooks[kk][c][u] / cb_step[kk]), one step per codebook, |cb16| <= kFixedMax.
//   x          x16[t] = round(x[t] / x_step[b]), one step per block b of kBlockInputs = 64 inputs, |x16| <= kFixedMax.
//   product    per output row and block: 4 chunks of 16 inputs; per chunk and codebook, the chunk's 16 / d codewords
//              (d int16 each: 8 or 16 bytes) loaded from the codebook (2 or 4 KB: L1) into one vector and multiplied
//              with the chunk's x16 by vpmaddwd: 8 int32 sums of two products. A lane collects 4 of them per block
//              and codebook, |sum| <= 4 * 2 * kFixedMax^2 < 2^31: exact in int32. Then to fp32 times x_step[b] *
//              cb_step[kk] (one fma per block and codebook) into the row's fp32 sums; y[n] = scales[n] * (sum of the
//              8 lanes). (One step shared by the K codebooks would let their sums add in int32 first, at 14 bits
//              each for K = 2: twice the error, 1.5e-4 relative on random AQLM 2x8 weights against 7e-5.)
//   order      4 output rows at a time share each chunk's x16 vector (with two activation rows, each assembled
//              codeword vector is multiplied with both rows' activations); the threads take tiles of rows in turn.
//              Each output's sums are formed in one order whatever the tile or thread (deterministic).
//
// Why not the lookup tables (vq_cpu_lut.cpp) here: one table lookup per code is a dependent byte load, a table load and
// an add; 14336 inputs of k = 256 tables (3.5 MB) also outgrow L2 and need staging. A bare loop of the lookups with
// the tables in L1 ran 5.2 codes/ns on one Zen thread, this loop 6.4 with the codes streamed from L3 (the whole
// kernel: 4096 x 14336 and 11008 x 4096 2-bit, see docs/performance.md). ggml's IQ2 kernels assemble their grid
// vectors the same way (scalar loads), from int8 activations; here both sides keep 15 bits.
//
// Accuracy: each weight moves by at most the sum over its K codewords of cb_step[kk] / 2 and each activation by
// x_step / 2 (3e-5 of the largest entry of its codebook / activation of its block): tests/test_vq.py codeword_bound;
// measured 6-8e-5 relative error on random weights and activations. A NaN or infinite activation or
// codebook entry has no fixed-point value: the caller runs the exact table kernel instead (codeword_gemv returns
// false without writing y).
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_common.h"
#include "cpu_features.h"
#include "macros.h"
#include "vq_cpu.h"

#if BLOCKOPS_X86_DISPATCH
#include <immintrin.h>
#endif

namespace blockops::vq {

#if BLOCKOPS_X86_DISPATCH
namespace {

constexpr int kFixedMax = 16383;       // 15 bits: see the int32 bound above
constexpr int64_t kBlockInputs = 64;   // inputs per activation step: 4 chunks of 16
constexpr int64_t kChunkInputs = 16;   // inputs per vpmaddwd (16 int16 lanes)
constexpr int kRowsAtOnce = 4;         // output rows sharing each x16 vector (with two activation rows: 8 fp32
                                       // sums in registers, which 4 activation rows would exceed)
constexpr int64_t kTileRows = 64;      // output rows per hand-out: ~230K codes at 14336 inputs (~40 us)

// x16 and the per-block steps of one activation row. Returns false if x holds a NaN or an infinity.
BLOCKOPS_TARGET_AVX2 bool quantize_activations(const float* x, int64_t in, int16_t* x16, float* steps) {
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256 infinity = _mm256_set1_ps(__builtin_inff());
  for (int64_t b = 0; b < in / kBlockInputs; ++b) {
    const float* xb = x + b * kBlockInputs;
    __m256 peak = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
    for (int64_t t = 0; t < kBlockInputs; t += 8) {
      const __m256 v = _mm256_and_ps(_mm256_loadu_ps(xb + t), magnitude);
      peak = _mm256_max_ps(peak, v);
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, infinity, _CMP_NLT_UQ));  // |x| >= inf or NaN (unordered)
    }
    if (_mm256_movemask_ps(bad) != 0) return false;
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, peak);
    float top = 0.f;
    for (float v : lanes) top = std::max(top, v);
    steps[b] = top > 0.f ? top / kFixedMax : 0.f;
    const __m256 inverse = _mm256_set1_ps(top > 0.f ? kFixedMax / top : 0.f);
    for (int64_t t = 0; t < kBlockInputs; t += 16) {
      const __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + t), inverse));
      const __m256i hi = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + t + 8), inverse));
      // packs interleaves the 128-bit lanes: [lo 0-3, hi 0-3, lo 4-7, hi 4-7] -> restore the order.
      const __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(x16 + b * kBlockInputs + t), packed);
    }
  }
  return true;
}

// cb16 [K][256][d] and the steps [K], from the fp32 codebooks. Returns false if an entry is a NaN or an infinity.
bool quantize_codebooks(const float* cb32, const Geometry& g, int16_t* cb16, float* steps) {
  const int64_t n = g.k * g.d;  // entries per codebook
  for (int64_t kk = 0; kk < g.K; ++kk) {
    const float* book = cb32 + kk * n;
    float top = 0.f;
    for (int64_t i = 0; i < n; ++i) {
      if (!std::isfinite(book[i])) return false;
      top = std::max(top, std::fabs(book[i]));
    }
    steps[kk] = top > 0.f ? top / kFixedMax : 0.f;
    const float inverse = top > 0.f ? kFixedMax / top : 0.f;
    for (int64_t i = 0; i < n; ++i) cb16[kk * n + i] = static_cast<int16_t>(std::lrint(book[i] * inverse));
  }
  return true;
}

// A block's codes as integers of kWordBytes, loaded once for the K codebooks; the codes come out by shifts. 2-bit
// (d 4, K 1): 32-bit words, one per chunk, from which GCC takes two of every four codes with byte-register moves
// (about 2 instructions a code against 2.6 out of 64-bit words; 1.117 -> 0.999 instructions per weight, time the
// same or up to 10% less); AQLM (d 8, K 2) ran 5-10% slower that way and keeps 64-bit words.
template <int D, int K>
constexpr int kWordBytes = D == 4 && K == 1 ? 4 : 8;
template <int D, int K>
using CodeWord = std::conditional_t<kWordBytes<D, K> == 4, uint32_t, uint64_t>;

// The 16 / D codewords of codebook kk for chunk `chunk` of a block, from the block's code words (code byte
// (chunk * 16 / D + u) * K + kk), as one vector of 16 int16.
template <int D, int K>
BLOCKOPS_TARGET_AVX2 __attribute__((always_inline)) inline __m256i chunk_codewords(const CodeWord<D, K>* words,
                                                                                 const int16_t* cb, int chunk,
                                                                                 int kk) {
  constexpr int kPerChunk = kChunkInputs / D;  // codewords per vector
  constexpr int kBytes = kWordBytes<D, K>;
  auto code = [&](int u) -> int64_t {
    const int byte = (chunk * kPerChunk + u) * K + kk;
    return static_cast<int64_t>((words[byte / kBytes] >> (8 * (byte % kBytes))) & 0xFF);
  };
  const int16_t* book = cb + static_cast<int64_t>(kk) * 256 * D;
  if constexpr (D == 4) {
    int64_t w[4];
    for (int u = 0; u < 4; ++u) std::memcpy(&w[u], book + code(u) * 4, 8);
    return _mm256_set_epi64x(w[3], w[2], w[1], w[0]);
  } else {
    const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(book + code(0) * 8));
    const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(book + code(1) * 8));
    return _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
  }
}

BLOCKOPS_TARGET_AVX2 __attribute__((always_inline)) inline __m256i load_x(const int16_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

// Output rows [n0, n0 + R) of y [M, out] for M activation rows, all blocks. x16 [M][in]; steps [M][blocks][K]:
// x_step[m][b] * cb_step[kk]. One activation row keeps its 4 activation vectors of a block in registers; with more,
// they are memory operands of vpmaddwd (L1), each assembled codeword vector serving all M rows.
template <int D, int K, int M, int R>
BLOCKOPS_TARGET_AVX2 __attribute__((always_inline)) inline void rows_product(const uint8_t* codes, int64_t P,
                                                                            int64_t in, const int16_t* x16,
                                                                            const float* steps, const int16_t* cb,
                                                                            const float* scales, int64_t n0,
                                                                            int64_t out, float* y) {
  constexpr int64_t kCodesPerBlock = kBlockInputs / D * K;  // 16 (d4 K1, d8 K2) or 8 (d8 K1) or 32 (d4 K2)
  constexpr int kChunks = kBlockInputs / kChunkInputs;
  const int64_t blocks = in / kBlockInputs;
  __m256 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const int16_t* xb = x16 + b * kBlockInputs;  // chunk c of activation row m at xb + m * in + c * kChunkInputs
    __m256i xv[kChunks];
    if constexpr (M == 1) {
      for (int c = 0; c < kChunks; ++c) xv[c] = load_x(xb + c * kChunkInputs);
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      CodeWord<D, K> words[kCodesPerBlock / kWordBytes<D, K>];
      std::memcpy(words, codes + (n0 + r) * P + b * kCodesPerBlock, kCodesPerBlock);
#pragma GCC unroll 2
      for (int kk = 0; kk < K; ++kk) {
        __m256i sums[M];
        for (int m = 0; m < M; ++m) sums[m] = _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int c = 0; c < kChunks; ++c) {
          const __m256i w = chunk_codewords<D, K>(words, cb, c, kk);
#pragma GCC unroll 4
          for (int m = 0; m < M; ++m) {
            const __m256i xc = M == 1 ? xv[c] : load_x(xb + m * in + c * kChunkInputs);
            sums[m] = _mm256_add_epi32(sums[m], _mm256_madd_epi16(w, xc));
          }
        }
        for (int m = 0; m < M; ++m) {
          const __m256 step = _mm256_broadcast_ss(steps + (m * blocks + b) * K + kk);
          acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[m]), step, acc[r][m]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int m = 0; m < M; ++m) {
      __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[r][m]), _mm256_extractf128_ps(acc[r][m], 1));
      h = _mm_add_ps(h, _mm_movehl_ps(h, h));
      h = _mm_add_ss(h, _mm_movehdup_ps(h));
      y[m * out + n0 + r] = scales[n0 + r] * _mm_cvtss_f32(h);
    }
  }
}

// Output rows [n0, n1): kRowsAtOnce at a time, then one at a time.
template <int D, int K, int M>
BLOCKOPS_TARGET_AVX2 void tile_product(const uint8_t* codes, const Geometry& g, const int16_t* x16,
                                       const float* steps, const int16_t* cb, const float* scales, int64_t n0,
                                       int64_t n1, float* y) {
  const int64_t P = g.positions(), in = g.in();
  int64_t n = n0;
  for (; n + kRowsAtOnce <= n1; n += kRowsAtOnce) {
    rows_product<D, K, M, kRowsAtOnce>(codes, P, in, x16, steps, cb, scales, n, g.out, y);
  }
  for (; n < n1; ++n) rows_product<D, K, M, 1>(codes, P, in, x16, steps, cb, scales, n, g.out, y);
}

using TileFn = void (*)(const uint8_t*, const Geometry&, const int16_t*, const float*, const int16_t*, const float*,
                        int64_t, int64_t, float*);

template <int M>
TileFn pick_tile_rows(const Geometry& g) {
  if (g.d == 4) return g.K == 1 ? &tile_product<4, 1, M> : &tile_product<4, 2, M>;
  return g.K == 1 ? &tile_product<8, 1, M> : &tile_product<8, 2, M>;
}

TileFn pick_tile(const Geometry& g, int64_t rows) {
  static_assert(kCodewordMaxRows == 2, "a tile function per row count up to kCodewordMaxRows");
  return rows == 1 ? pick_tile_rows<1>(g) : pick_tile_rows<2>(g);
}

}  // namespace
#endif

bool use_codewords(const Geometry& g, CodeType type, int64_t rows) {
#if BLOCKOPS_X86_DISPATCH
  // On VBMI CPUs the byte-plane kernel takes these (exact fp32 tables for fp32 activations, and faster there).
  return cpu_has_avx2_fma() && !cpu_has_avx512_vbmi() && type == CodeType::kU8 && rows >= 1 &&
         rows <= kCodewordMaxRows && g.k == 256 &&
         (g.d == 4 || g.d == 8) && (g.K == 1 || g.K == 2) && g.in() % kBlockInputs == 0 && g.in() > 0 && g.out > 0;
#else
  (void)g, (void)type, (void)rows;
  return false;
#endif
}

bool codeword_gemv(const float* x, const uint8_t* codes, const float* cb32, const float* scales, const Geometry& g,
                   int64_t rows, float* y) {
#if BLOCKOPS_X86_DISPATCH
  const int64_t in = g.in(), blocks = in / kBlockInputs;
  std::vector<int16_t> x16(static_cast<size_t>(rows * in));
  std::vector<float> x_steps(static_cast<size_t>(rows * blocks)), cb_steps(static_cast<size_t>(g.K));
  std::vector<float> steps(static_cast<size_t>(rows * blocks * g.K));
  std::vector<int16_t> cb16(static_cast<size_t>(g.K * g.k * g.d));
  for (int64_t m = 0; m < rows; ++m) {
    if (!quantize_activations(x + m * in, in, x16.data() + m * in, x_steps.data() + m * blocks)) return false;
  }
  if (!quantize_codebooks(cb32, g, cb16.data(), cb_steps.data())) return false;
  for (int64_t i = 0; i < rows * blocks; ++i)
    for (int64_t kk = 0; kk < g.K; ++kk) steps[i * g.K + kk] = x_steps[i] * cb_steps[kk];
  const TileFn tile = pick_tile(g, rows);
  const int64_t tiles = (g.out + kTileRows - 1) / kTileRows;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), tiles), 1, [&](int64_t, int64_t) {
    for (int64_t t = next++; t < tiles; t = next++) {
      tile(codes, g, x16.data(), steps.data(), cb16.data(), scales, t * kTileRows, std::min(g.out, (t + 1) * kTileRows),
           y);
    }
  });
  return true;
#else
  (void)x, (void)codes, (void)cb32, (void)scales, (void)g, (void)rows, (void)y;
  return false;
#endif
}

}  // namespace blockops::vq
