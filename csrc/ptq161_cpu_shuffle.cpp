// PTQ1.61's binary part for several activation rows on AVX2: U = signs^T x by byte-shuffle lookups in tables of
// signed sums (ptq161_cpu.h; the idea of T-MAC's activation tables, written for blockops' sign layout).
//
//   tables    per row m and nibble n (4 consecutive inputs), the 16 signed sums T[e] = sum_u (bit u of e ? +q_u : -q_u)
//             of the inputs rounded to 14-bit fixed point q (one step per row and block of kShuffleBlockInputs
//             inputs), int16 (|T| <= 4 * 8191 < 2^15), stored as two 16-byte planes: the entries' low bytes, then
//             their high bytes. Built with AVX2 (16 entries = 16 int16 lanes: 4 broadcasts, 4 vpsignw, 3 adds).
//   indices   per word row and 32 output columns, the 8 nibbles of the 32 sign words as 8 vectors of 32 bytes (shift,
//             mask, two pack stages), built once per (input block, band of columns) and reused by every row. After
//             the packs, byte p holds column 8 (p % 16 / 4) + 4 (p / 16) + p % 4.
//   lookup    vpshufb looks up 32 columns at once in a plane broadcast to both 128-bit lanes; the low and the high
//             plane's bytes unpack into the int16 entries; two nibbles' entries interleaved word by word and
//             vpmaddwd with ones add them into int32 per column (never two columns together). Those unpacks undo
//             the packs' order: int32 lane t of accumulator k is column 8 k + t. Per 2 nibbles and 32 columns (256
//             weights): 4 shuffles, 4 byte and 4 word unpacks, 4 vpmaddwd, 4 adds, where the 16-bit fixed-point
//             kernel (lowbit) spends about 50 vector instructions.
//   order     rows in chunks of kRowChunk; per chunk, a task owns a band of kBandBlocks x 32 columns; per input block
//             it builds the band's indices (4 KB, L1), then for every row of the chunk sums the block's nibbles in
//             registers and adds them, times the row's step, into U. One block's tables for the chunk's rows (2 KB a
//             row) stay in L2 while the bands pass over them.
//
// Columns past the last whole 32 (out % 32) take a plain fp32 loop.
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "cpu_features.h"
#include "macros.h"
#include "ptq161_cpu.h"

#if BLOCKOPS_X86_DISPATCH
#include <immintrin.h>
#endif

namespace blockops::ptq161 {

#if BLOCKOPS_X86_DISPATCH
namespace {

constexpr int kFixedMax = 8191;                               // 14 bits: four of them sum to at most 32764
constexpr int64_t kWordsPerBlock = kShuffleBlockInputs / 32;  // sign words (32 inputs each) per input block
constexpr int64_t kNibblesPerBlock = kShuffleBlockInputs / 4;
constexpr int64_t kPlaneBytes = 32;                           // per (row, nibble): 16 low bytes, 16 high bytes
constexpr int64_t kVectorCols = 32;                           // columns per index vector (a byte each)
constexpr int kBandBlocks = 2;                                // 32-column blocks per band: 8 int32 accumulators
constexpr int64_t kRowChunk = 64;  // rows whose tables are built at once: one input block's tables (2 KB a row, 128 KB)
                                   // stay in L2 while the bands pass over them, and the buffer stays small (2 MB at
                                   // 4096 inputs) whatever the batch

static_assert(kShuffleBlockInputs % 32 == 0, "input blocks are whole sign words");

// Row m's steps [blocks] and tables [blocks][rows][nibbles][32 bytes] (the block's slot of row m). A row holding a
// NaN or an infinity has no fixed-point step: its tables and steps are zeros and the result is false (the caller
// computes that row another way).
BLOCKOPS_TARGET_AVX2 bool build_row_tables(const float* xm, int64_t P, int64_t rows, int64_t m, int64_t blocks,
                                           float* steps, uint8_t* tables) {
  // Lane e of pattern u: +1 where bit u of e is set, else -1.
  const __m256i pattern[4] = {
      _mm256_setr_epi16(-1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1),
      _mm256_setr_epi16(-1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1),
      _mm256_setr_epi16(-1, -1, -1, -1, 1, 1, 1, 1, -1, -1, -1, -1, 1, 1, 1, 1),
      _mm256_setr_epi16(-1, -1, -1, -1, -1, -1, -1, -1, 1, 1, 1, 1, 1, 1, 1, 1)};
  // Per 128-bit lane: the 8 entries' low bytes, then their high bytes.
  const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                         0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256 infinity = _mm256_set1_ps(__builtin_inff());
  __m256 bad = _mm256_setzero_ps();
  for (int64_t j = 0; j < P; j += 8) {
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_and_ps(_mm256_loadu_ps(xm + j), magnitude), infinity, _CMP_NLT_UQ));
  }
  const bool finite = _mm256_movemask_ps(bad) == 0;
  alignas(32) int32_t q[kShuffleBlockInputs];
  for (int64_t kb = 0; kb < blocks; ++kb) {
    const int64_t j0 = kb * kShuffleBlockInputs, count = std::min(kShuffleBlockInputs, P - j0);  // whole words
    uint8_t* slot = tables + (kb * rows + m) * kNibblesPerBlock * kPlaneBytes;
    if (!finite) {
      steps[m * blocks + kb] = 0.f;
      std::memset(slot, 0, static_cast<size_t>(count / 4 * kPlaneBytes));
      continue;
    }
    __m256 peak = _mm256_setzero_ps();
    for (int64_t j = 0; j < count; j += 8) peak = _mm256_max_ps(peak, _mm256_and_ps(_mm256_loadu_ps(xm + j0 + j), magnitude));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(peak), _mm256_extractf128_ps(peak, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    const float top = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
    steps[m * blocks + kb] = top > 0.f ? top / kFixedMax : 1.f;
    const __m256 inverse = _mm256_set1_ps(top > 0.f ? kFixedMax / top : 0.f);
    for (int64_t j = 0; j < count; j += 8) {  // round to nearest: |q| <= 8191
      _mm256_store_si256(reinterpret_cast<__m256i*>(q + j),
                         _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xm + j0 + j), inverse)));
    }
    for (int64_t n = 0; n < count / 4; ++n) {
      __m256i t = _mm256_sign_epi16(_mm256_set1_epi16(static_cast<int16_t>(q[4 * n])), pattern[0]);
      for (int u = 1; u < 4; ++u) {
        t = _mm256_add_epi16(t, _mm256_sign_epi16(_mm256_set1_epi16(static_cast<int16_t>(q[4 * n + u])), pattern[u]));
      }
      // [low bytes of entries 0-7, high 0-7 | low 8-15, high 8-15] -> [low 0-15 | high 0-15]
      t = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(t, split), 0xD8);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(slot + n * kPlaneBytes), t);
    }
  }
  return finite;
}

// The nibble indices of words [w0, w0 + words) for `blocks` 32-column blocks from column col0:
// index[((w - w0) * 8 + n) * kBandBlocks + b] = 32 bytes, the n-th nibbles of block b's sign words (order: above).
BLOCKOPS_TARGET_AVX2 void build_indices(const int32_t* signs, int64_t out, int64_t w0, int64_t words, int64_t col0,
                                        int blocks, __m256i* index) {
  const __m256i nibble = _mm256_set1_epi32(15);
  for (int64_t w = 0; w < words; ++w) {
    const int32_t* row = signs + (w0 + w) * out + col0;
    for (int b = 0; b < blocks; ++b) {
      __m256i s[4];
      for (int k = 0; k < 4; ++k) s[k] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b * kVectorCols + 8 * k));
      for (int n = 0; n < 8; ++n) {
        __m256i a[4];
        for (int k = 0; k < 4; ++k) {
          a[k] = _mm256_and_si256(s[k], nibble);
          s[k] = _mm256_srli_epi32(s[k], 4);
        }
        index[(w * 8 + n) * kBandBlocks + b] =
            _mm256_packus_epi16(_mm256_packus_epi32(a[0], a[1]), _mm256_packus_epi32(a[2], a[3]));
      }
    }
  }
}

// For every row: the block's nibbles looked up and summed in int32 per column, then U[m, band] += step * sums.
template <int kBlocks>
BLOCKOPS_TARGET_AVX2 void lookup_rows(const uint8_t* tables, const __m256i* index, int64_t nibbles, int64_t rows,
                                      int64_t kb, int64_t blocks, const float* steps, int64_t out, int64_t col0,
                                      float* u) {
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t m = 0; m < rows; ++m) {
    const uint8_t* tab = tables + (kb * rows + m) * kNibblesPerBlock * kPlaneBytes;
    __m256i acc[kBlocks][4];
    for (int b = 0; b < kBlocks; ++b)
      for (int k = 0; k < 4; ++k) acc[b][k] = _mm256_setzero_si256();
    for (int64_t n = 0; n < nibbles; n += 2) {
      const uint8_t* t0 = tab + n * kPlaneBytes;
      const __m256i lo0 = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t0)));
      const __m256i hi0 = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t0 + 16)));
      const __m256i lo1 = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t0 + 32)));
      const __m256i hi1 = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t0 + 48)));
      for (int b = 0; b < kBlocks; ++b) {
        const __m256i i0 = index[n * kBandBlocks + b], i1 = index[(n + 1) * kBandBlocks + b];
        const __m256i l0 = _mm256_shuffle_epi8(lo0, i0), h0 = _mm256_shuffle_epi8(hi0, i0);
        const __m256i l1 = _mm256_shuffle_epi8(lo1, i1), h1 = _mm256_shuffle_epi8(hi1, i1);
        const __m256i e0 = _mm256_unpacklo_epi8(l0, h0), e1 = _mm256_unpackhi_epi8(l0, h0);  // int16 entries
        const __m256i f0 = _mm256_unpacklo_epi8(l1, h1), f1 = _mm256_unpackhi_epi8(l1, h1);
        acc[b][0] = _mm256_add_epi32(acc[b][0], _mm256_madd_epi16(_mm256_unpacklo_epi16(e0, f0), ones));
        acc[b][1] = _mm256_add_epi32(acc[b][1], _mm256_madd_epi16(_mm256_unpackhi_epi16(e0, f0), ones));
        acc[b][2] = _mm256_add_epi32(acc[b][2], _mm256_madd_epi16(_mm256_unpacklo_epi16(e1, f1), ones));
        acc[b][3] = _mm256_add_epi32(acc[b][3], _mm256_madd_epi16(_mm256_unpackhi_epi16(e1, f1), ones));
      }
    }
    const __m256 step = _mm256_set1_ps(steps[m * blocks + kb]);
    float* um = u + m * out + col0;
    for (int b = 0; b < kBlocks; ++b) {
      for (int k = 0; k < 4; ++k) {
        float* y = um + b * kVectorCols + 8 * k;
        _mm256_storeu_ps(y, _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[b][k]), step, _mm256_loadu_ps(y)));
      }
    }
  }
}

}  // namespace

at::Tensor sign_matmul_shuffle(const at::Tensor& x, const at::Tensor& signs, std::vector<int64_t>& non_finite_rows) {
  if (!cpu_has_avx2_fma()) return at::Tensor();
  const int64_t rows = x.size(0), P = x.size(1), words = signs.size(0), out = signs.size(1);
  TORCH_INTERNAL_ASSERT(P == words * 32 && x.is_contiguous() && x.scalar_type() == at::kFloat &&
                        signs.scalar_type() == at::kInt && signs.is_contiguous());
  const int64_t blocks = (P + kShuffleBlockInputs - 1) / kShuffleBlockInputs;
  const int64_t chunk = std::min(rows, kRowChunk);
  std::vector<float> steps(static_cast<size_t>(chunk * blocks));
  // Every byte a lookup reads is written: nibbles past a short last block are never looked up.
  const auto tables = std::make_unique_for_overwrite<uint8_t[]>(static_cast<size_t>(blocks * chunk * kNibblesPerBlock *
                                                                                     kPlaneBytes));
  const float* xs = x.const_data_ptr<float>();
  std::vector<char> finite(static_cast<size_t>(rows));
  at::Tensor u = at::zeros({rows, out}, x.options());
  float* um = u.mutable_data_ptr<float>();
  const int32_t* s = signs.const_data_ptr<int32_t>();
  const int64_t whole = out / kVectorCols, bands = (whole + kBandBlocks - 1) / kBandBlocks;
  for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
    const int64_t n = std::min(chunk, rows - r0);
    at::parallel_for(0, n, 1, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        finite[r0 + m] = build_row_tables(xs + (r0 + m) * P, P, n, m, blocks, steps.data(), tables.get());
      }
    });
    at::parallel_for(0, bands, 1, [&](int64_t band0, int64_t band1) {
      alignas(32) __m256i index[kNibblesPerBlock * kBandBlocks];
      for (int64_t band = band0; band < band1; ++band) {
        const int64_t col0 = band * kBandBlocks * kVectorCols;
        const int nb = static_cast<int>(std::min<int64_t>(kBandBlocks, whole - band * kBandBlocks));
        for (int64_t kb = 0; kb < blocks; ++kb) {
          const int64_t w0 = kb * kWordsPerBlock, nw = std::min(kWordsPerBlock, words - w0);
          build_indices(s, out, w0, nw, col0, nb, index);
          if (nb == kBandBlocks) {
            lookup_rows<kBandBlocks>(tables.get(), index, nw * 8, n, kb, blocks, steps.data(), out, col0, um + r0 * out);
          } else {
            lookup_rows<1>(tables.get(), index, nw * 8, n, kb, blocks, steps.data(), out, col0, um + r0 * out);
          }
        }
      }
    });
  }
  non_finite_rows.clear();
  for (int64_t m = 0; m < rows; ++m) {
    if (!finite[m]) non_finite_rows.push_back(m);
  }
  // The last out % 32 columns: fp32 sums.
  for (int64_t i = whole * kVectorCols; i < out; ++i) {
    for (int64_t m = 0; m < rows; ++m) {
      if (!finite[m]) continue;
      float sum = 0.f;
      for (int64_t j = 0; j < P; ++j) {
        const bool bit = (static_cast<uint32_t>(s[(j / 32) * out + i]) >> (j % 32)) & 1u;
        sum += bit ? xs[m * P + j] : -xs[m * P + j];
      }
      um[m * out + i] = sum;
    }
  }
  return u;
}
#else
at::Tensor sign_matmul_shuffle(const at::Tensor&, const at::Tensor&, std::vector<int64_t>&) { return at::Tensor(); }
#endif

}  // namespace blockops::ptq161
