// PTQ1.61 mixed GEMM on the CPU: the CPU kernels and the CPU glue of the ptq161 family (format: ptq161.h; argument
// checks and the salient part's calls into the lowbit ops: ptq161_op.cpp).
//
// ptq161_linear = salient 4-bit part + binary part, both on gathered activations (x read through perm once):
//
//   salient:  s_i (D[m, i] - z_i X[m])   -- the lowbit family's 4-bit kernels, called through the dispatcher
//             (blockops::quant_linear with one scale/zero per row, split into groups of <= 1024 channels so its
//             16-bit fixed-point decode kernel applies); nothing of the 4-bit decode is duplicated here. One row
//             on AVX2: quant_linear's split-K pieces (lowbit::RowProduct, lowbit_cpu.h) run in the same parallel
//             region as the binary part's bands (linear_one_row).
//   binary:   r1_i (alpha_i U[m, i] + mu_i V[m]),  U = signs^T x'  (x' = r2 x over the non-salient channels)
//
// U for up to kCpuGemvMaxRows rows: a lookup-table GEMV. Per group of 4 non-salient inputs a 16-entry table holds
// every signed sum +-x'_0 +-x'_1 +-x'_2 +-x'_3; a 4-bit nibble of sign bits indexes it. With AVX-512 the table is
// one zmm register and _mm512_permutexvar_ps looks up 16 rows at once (it reads only the low 4 bits of each
// index, so a shift of the sign word is the whole decode): 64 weights per shift + permute + add. On AVX2, whose
// vpermps holds 8 entries, groups of 3 inputs (TableLayout): 24 weights per shift + permute + add.
//
//      signs [words, out] int32           a task owns a band of kBandTiles tiles (16 rows = one 64-byte line of
//      +------ band 0 ------+-- band 1     each word row) and walks down the word rows; per word row the 8 tables
//      | t0 | t1 | ... | t7 | t0 | ...    of its 32 inputs are loaded once and reused by every tile of the band;
//      v    v    v     v    v             lines kPrefetchWords ahead are prefetched (a stride of out * 4 bytes
//                                          defeats the hardware prefetchers). Several activation rows share
//                                          each line of sign words (partial sums in an L1 buffer).
//
// U for 2 or more rows on AVX2 (4 or more with AVX-512): byte-shuffle lookups in int16 tables of signed sums,
// 32 columns per vpshufb (ptq161_cpu.h, ptq161_cpu_shuffle.cpp). Without AVX2 above 16 rows, and the transposed
// product signs x G' of the backward: +-1 blocks of the sign matrix decoded into fp32 and multiplied by ATen's GEMM
// (at::mm), one block at a time.
// sign(0) = 0 entries (zero_signs) are corrected after the kernels (U) or zeroed in the decoded blocks.
//
// fp64 (CPU only, for gradcheck): when x, grad_out, the factors or the bias are fp64, W_hat is dequantized in fp64
// (dequant_into<double>, the same loop as ptq161_dequantize) and the product and the gradients are dense fp64 ATen
// products of it (linear_fp64, backward_fp64): a portable path, O(out * in) memory, not a fast one.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/mv.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <utility>
#include <vector>

#include "cpu_common.h"
#include "cpu_features.h"
#include "glue.h"
#include "introspection.h"
#include "lowbit_cpu.h"
#include "ptq161_cpu.h"
#include "macros.h"
#include "ptq161_op.h"
#include "static_switch.h"

#if BLOCKOPS_X86_DISPATCH
#include <immintrin.h>
#endif

namespace blockops::ptq161 {

namespace {

KernelCounter linear_counter(kFamily, "ptq161_linear.cpu");
KernelCounter dequant_counter(kFamily, "ptq161_dequantize.cpu");
KernelCounter backward_counter(kFamily, "ptq161_linear_backward.cpu");
KernelCounter shuffle_counter(kFamily, "ptq161_sign_shuffle.cpu");  // which ptq161_linear.cpu calls took the
                                                                    // byte-shuffle binary kernel
KernelCounter one_region_counter(kFamily, "ptq161_linear_one_region.cpu");  // which took linear_one_row
// The binary GEMV uses AVX-512 (vpermps on zmm) where the CPU has the AVX-512 set the lowbit decode kernel needs.
const char* ptq161_cpu_isa() { return cpu_has_avx512_vnni() ? "avx2+fma, avx512 (binary GEMV)" : cpu_isa_name(); }
FamilyRegistration family(kFamily, ptq161_cpu_isa);

constexpr int64_t kCpuGemvMaxRows = 16;  // table passes up to here, decoded +-1 blocks + GEMM above (set by an
                                         // operation count, not yet tuned by measurement: see docs/performance.md;
                                         // CUDA: kCudaGemvMaxRows in kernels/ptq161_launch.h)
constexpr int kTileRows = 16;           // output rows per tile: one 64-byte line of a word row
constexpr int kBandTiles = 8;           // tiles per task: 8 accumulator pairs + 8 tables fill the zmm file
constexpr int64_t kBandRows = kBandTiles * kTileRows;
constexpr int kPrefetchWords = 16;      // word rows fetched ahead (~ memory latency / time per word row)
constexpr int kNibbles = kSignsPerWord / 4;
constexpr int kTable = 16;              // entries per 4-input table
// linear_one_row's hand-outs: sign words of tables per item (a few microseconds of work), columns per epilogue item.
constexpr int64_t kTableWordsPerItem = 16;
constexpr int64_t kEpilogueColumns = 2048;

// The binary GEMV's tables: per activation row and sign word, one table per group of `bits` consecutive sign bits,
// entry e = sum_u (bit u of e ? +x'_u : -x'_u). Nibbles (8 tables of 16) where a lookup takes 16 entries (AVX-512's
// vpermps on zmm, and the portable loop: fewer lookups); triplets (10 tables of 8 for bits 0..29, an 11th for bits
// 30-31 with x'_2 = 0) on AVX2, whose vpermps looks up 8 entries: a nibble there took two permutes, a shift and a
// blend per 8 outputs, a triplet takes one permute (and a shift): per 8 outputs and word 44 against 64 instructions
// with half the permutes, which bound the loop.
struct TableLayout {
  int bits, groups, entries;  // sign bits per table, tables per word, entries per table
  int64_t word_floats() const { return int64_t(groups) * entries; }
};
constexpr TableLayout kNibbleTables{4, kNibbles, kTable};
constexpr TableLayout kTripletTables{3, (kSignsPerWord + 2) / 3, 8};
constexpr int64_t kBlockFloats = 2 << 20;  // decoded +-1 block: at most 8 MB of fp32
constexpr int64_t kTaskWork = 1 << 16;      // elements per task at least: below, waking threads costs more

// Grain for at::parallel_for over items of `work` elements each, so that small problems run on one thread.
int64_t grain(int64_t work) { return std::max<int64_t>(1, kTaskWork / std::max<int64_t>(work, 1)); }

// ---------------------------------------------------------------------------------------------------------
// Gathering activations through perm
// ---------------------------------------------------------------------------------------------------------

// x [rows, in] fp32 -> salient [rows, S_pad] (zero padded), plain [rows, words * 32] = r2 x over the non-salient
// channels (zero padded: padding sign bits then contribute nothing), its row sums plain_sum [rows, 1] (the mu part's
// V, summed here rather than by a reduction op on every call), and, for the r2 gradient, plain_raw (x itself).
struct Gathered {
  at::Tensor salient, plain, plain_sum, plain_raw;
};

Gathered gather(const at::Tensor& x32, const at::Tensor& perm, const at::Tensor& r2, const Geometry& g, bool raw) {
  const int64_t rows = x32.size(0), padded = g.sign_words() * kSignsPerWord;
  Gathered out{at::zeros({rows, g.salient_padded()}, x32.options()), at::zeros({rows, padded}, x32.options()),
               at::empty({rows, 1}, x32.options()), raw ? at::empty({rows, g.plain()}, x32.options()) : at::Tensor()};
  const float* x = x32.const_data_ptr<float>();
  const int32_t* p = perm.const_data_ptr<int32_t>();
  const float* r = r2.const_data_ptr<float>();
  float* sal = out.salient.mutable_data_ptr<float>();
  float* pl = out.plain.mutable_data_ptr<float>();
  float* ps = out.plain_sum.mutable_data_ptr<float>();
  float* pr = raw ? out.plain_raw.mutable_data_ptr<float>() : nullptr;
  at::parallel_for(0, rows, grain(g.in), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const float* xm = x + m * g.in;
      for (int64_t k = 0; k < g.salient; ++k) sal[m * g.salient_padded() + k] = xm[p[k]];
      double sum = 0.0;
      for (int64_t j = 0; j < g.plain(); ++j) {
        const int32_t c = p[g.salient + j];
        pl[m * padded + j] = r[c] * xm[c];
        sum += pl[m * padded + j];
        if (pr != nullptr) pr[m * g.plain() + j] = xm[c];
      }
      ps[m] = static_cast<float>(sum);
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// The binary part: U = signs^T x' (lookup-table GEMV) and the +-1 blocks
// ---------------------------------------------------------------------------------------------------------

// The tables of (row, sign word) pairs [idx0, idx1) (idx = row * words + word) of plain [rows, words * 32]: per
// group of layout.bits inputs the signed sums (TableLayout), built by doubling: entry e with its top bit set is entry
// e without it plus 2 x'_top. A triplet past the word's last bit reads x' = 0.
void build_table_words(const float* plain, const TableLayout& layout, int64_t idx0, int64_t idx1, float* t) {
  for (int64_t idx = idx0; idx < idx1; ++idx) {
    const float* xw = plain + idx * kSignsPerWord;
    for (int k = 0; k < layout.groups; ++k) {
      float xs[4] = {};
      for (int u = 0; u < layout.bits && layout.bits * k + u < kSignsPerWord; ++u) xs[u] = xw[layout.bits * k + u];
      float* e = t + idx * layout.word_floats() + k * layout.entries;
      e[0] = 0.f;
      for (int u = 0; u < layout.bits; ++u) e[0] -= xs[u];
      for (int u = 0; u < layout.bits; ++u) {
        for (int low = 0; low < (1 << u); ++low) e[(1 << u) | low] = e[low] + 2.f * xs[u];
      }
    }
  }
}

at::Tensor build_tables(const at::Tensor& plain, const Geometry& g, const TableLayout& layout) {
  const int64_t rows = plain.size(0), words = g.sign_words();
  at::Tensor tables = at::empty({rows, words * layout.word_floats()}, plain.options());
  const float* x = plain.const_data_ptr<float>();
  float* t = tables.mutable_data_ptr<float>();
  at::parallel_for(0, rows * words, grain(layout.word_floats()),
                   [&](int64_t begin, int64_t end) { build_table_words(x, layout, begin, end, t); });
  return tables;
}

// Portable GEMV over output rows [i0, i1) of one activation row.
void sign_rows_portable(const float* table, const TableLayout& layout, const int32_t* signs, const Geometry& g,
                        int64_t i0, int64_t i1, float* u) {
  const uint32_t mask = static_cast<uint32_t>(layout.entries - 1);
  for (int64_t i = i0; i < i1; ++i) {
    float acc = 0.f;
    for (int64_t w = 0; w < g.sign_words(); ++w) {
      const uint32_t word = static_cast<uint32_t>(signs[w * g.out + i]);
      const float* tw = table + w * layout.word_floats();
      for (int k = 0; k < layout.groups; ++k) acc += tw[k * layout.entries + ((word >> (layout.bits * k)) & mask)];
    }
    u[i] = acc;
  }
}

#if BLOCKOPS_X86_DISPATCH
// The table lookup of one nibble of sign bits per row: vpermps reads only the low 4 bits of each index, so the
// word shifted right by 4 k is the index of nibble k. (The zero-masking forms with a full mask compile to the
// same instructions and spare GCC's "may be used uninitialized" warnings about the unmasked forms' pass-through.)
BLOCKOPS_TARGET_AVX512_VNNI __attribute__((always_inline)) inline __m512 lookup_nibble(__m512i bits, unsigned shift,
                                                                                     __m512 table) {
  constexpr __mmask16 kAll = 0xFFFF;
  return _mm512_maskz_permutexvar_ps(kAll, _mm512_maskz_srli_epi32(kAll, bits, shift), table);
}

// AVX-512: kTiles tiles of 16 rows from row i0, one activation row. Two accumulators per tile (even and odd
// nibbles) halve the add chains' latency.
template <int kTiles>
BLOCKOPS_TARGET_AVX512_VNNI void sign_band_avx512(const float* table, const int32_t* signs, const Geometry& g,
                                                  int64_t i0, float* u) {
  __m512 acc0[kTiles], acc1[kTiles];
  for (int t = 0; t < kTiles; ++t) acc0[t] = acc1[t] = _mm512_setzero_ps();
  for (int64_t w = 0; w < g.sign_words(); ++w) {
    const int32_t* line = signs + w * g.out + i0;
    const char* ahead = reinterpret_cast<const char*>(line + kPrefetchWords * g.out);
    for (int t = 0; t < kTiles; ++t) _mm_prefetch(ahead + t * 64, _MM_HINT_T0);
    __m512 tab[kNibbles];
    for (int k = 0; k < kNibbles; ++k) tab[k] = _mm512_loadu_ps(table + (w * kNibbles + k) * kTable);
    for (int t = 0; t < kTiles; ++t) {
      const __m512i bits = _mm512_loadu_si512(line + t * kTileRows);
      for (int k = 0; k < kNibbles; k += 2) {
        acc0[t] = _mm512_add_ps(acc0[t], lookup_nibble(bits, 4 * k, tab[k]));
        acc1[t] = _mm512_add_ps(acc1[t], lookup_nibble(bits, 4 * k + 4, tab[k + 1]));
      }
    }
  }
  for (int t = 0; t < kTiles; ++t) _mm512_storeu_ps(u + i0 + t * kTileRows, _mm512_add_ps(acc0[t], acc1[t]));
}

// AVX-512, several activation rows: the word row's line of each tile is loaded from memory once and reused from
// L1 for every activation row, whose 8 tables are loaded once per word row; the partial sums (rows x tiles x 16)
// live in an L1 buffer rather than registers. `tiles` full tiles from row i0.
BLOCKOPS_TARGET_AVX512_VNNI void sign_band_rows_avx512(const float* tables, int64_t table_stride, int rows,
                                                       const int32_t* signs, const Geometry& g, int64_t i0,
                                                       int tiles, float* u) {
  alignas(64) float acc[kCpuGemvMaxRows][kBandTiles * kTileRows];
  for (int m = 0; m < rows; ++m)
    for (int c = 0; c < tiles * kTileRows; ++c) acc[m][c] = 0.f;
  for (int64_t w = 0; w < g.sign_words(); ++w) {
    const int32_t* line = signs + w * g.out + i0;
    const char* ahead = reinterpret_cast<const char*>(line + kPrefetchWords * g.out);
    for (int t = 0; t < tiles; ++t) _mm_prefetch(ahead + t * 64, _MM_HINT_T0);
    for (int m = 0; m < rows; ++m) {
      __m512 tab[kNibbles];
      for (int k = 0; k < kNibbles; ++k) tab[k] = _mm512_loadu_ps(tables + m * table_stride + (w * kNibbles + k) * kTable);
      for (int t = 0; t < tiles; ++t) {
        const __m512i bits = _mm512_loadu_si512(line + t * kTileRows);
        __m512 a0 = _mm512_load_ps(&acc[m][t * kTileRows]), a1 = _mm512_setzero_ps();
        for (int k = 0; k < kNibbles; k += 2) {
          a0 = _mm512_add_ps(a0, lookup_nibble(bits, 4 * k, tab[k]));
          a1 = _mm512_add_ps(a1, lookup_nibble(bits, 4 * k + 4, tab[k + 1]));
        }
        _mm512_store_ps(&acc[m][t * kTileRows], _mm512_add_ps(a0, a1));
      }
    }
  }
  for (int m = 0; m < rows; ++m)
    for (int t = 0; t < tiles; ++t) _mm512_storeu_ps(u + m * g.out + i0 + t * kTileRows, _mm512_load_ps(&acc[m][t * kTileRows]));
}

// AVX2: kTiles tiles of 8 rows, triplet tables (kTripletTables): vpermps reads only the low 3 bits of each index,
// so the sign word shifted right by 3 k is the index of triplet k (the 11th, bits 30-31, indexes entries 0-3). The
// triplets and tiles are expanded at compile time (every index a constant). One accumulator per tile: 4 add chains
// of 11 a word hide the add latency behind the 44 permutes, and 4 accumulators + 4 words + their high halves + a
// table fit the 16 ymm registers (with two accumulators per tile GCC spilled half of them).
//
// The shifts: with a vector shift per triplet the loop was bound by shifts and permutes together (on Zen both
// issue to the same two pipes; without the shifts, a wrong-result experiment, it ran 1.5x faster). Most of them
// are multiplies instead: for a 16-bit x, the high half of x * 2^(16 - s) is x >> s, and vpmulhuw runs on the
// multiply pipes. Triplets inside bits 0-14 multiply the word's low 16 bits, those inside bits 18-31 its high half
// (hi = word >> 16, one shift a word), and the triplet at bits 15-17, which straddles the halves, keeps its shift:
// 2 shifts and 9 multiplies a word instead of 10 shifts. Same indices, same sums (bitwise); a bare loop of the
// lookups with the tables in L1 ran 84 -> 118 weights/ns (Zen, one thread). On Intel cores shifts and vpmulhuw
// share ports 0 and 1: as many instructions as before.
BLOCKOPS_TARGET_AVX2 __attribute__((always_inline)) inline void pin_register(__m256& v) { asm volatile("" : "+x"(v)); }
template <int k>
BLOCKOPS_TARGET_AVX2 __attribute__((always_inline)) inline __m256i triplet_index(__m256i word, __m256i hi) {
  constexpr int shift = kTripletTables.bits * k;
  if constexpr (shift == 0) {
    return word;
  } else if constexpr (shift < 16 - kTripletTables.bits + 1) {  // bits shift .. shift + 2 within the low half
    return _mm256_mulhi_epu16(word, _mm256_set1_epi32(1 << (16 - shift)));
  } else if constexpr (shift < 16) {                            // straddles the halves
    return _mm256_srli_epi32(word, shift);
  } else {
    return _mm256_mulhi_epu16(hi, _mm256_set1_epi32(1 << (32 - shift)));
  }
}
template <int k, int... T>
BLOCKOPS_TARGET_AVX2 __attribute__((always_inline)) inline void lookup_triplet(const float* tw, const __m256i* bits,
                                                                             const __m256i* hi, __m256* acc,
                                                                             std::integer_sequence<int, T...>) {
  const __m256 tab = _mm256_loadu_ps(tw + k * kTripletTables.entries);
  ((acc[T] = _mm256_add_ps(acc[T], _mm256_permutevar8x32_ps(tab, triplet_index<k>(bits[T], hi[T])))), ...);
  // Each triplet's adds before the next triplet's lookups: left free, GCC computed all 44 lookups of a word first and
  // spilled them (a store and a load per lookup).
  (pin_register(acc[T]), ...);
}
template <int... K, typename Tiles>
BLOCKOPS_TARGET_AVX2 __attribute__((always_inline)) inline void lookup_word(const float* tw, const __m256i* bits,
                                                                          const __m256i* hi, __m256* acc,
                                                                          std::integer_sequence<int, K...>,
                                                                          Tiles tiles) {
  (lookup_triplet<K>(tw, bits, hi, acc, tiles), ...);
}

template <int kTiles>
BLOCKOPS_TARGET_AVX2 void sign_band_avx2(const float* table, const int32_t* signs, const Geometry& g, int64_t i0,
                                         float* u) {
  __m256 acc[kTiles];
  for (int t = 0; t < kTiles; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t w = 0; w < g.sign_words(); ++w) {
    const int32_t* line = signs + w * g.out + i0;
    const char* ahead = reinterpret_cast<const char*>(line + kPrefetchWords * g.out);
    for (int t = 0; t < kTiles; t += 2) _mm_prefetch(ahead + t * 32, _MM_HINT_T0);
    __m256i bits[kTiles], hi[kTiles];
    for (int t = 0; t < kTiles; ++t) {
      bits[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(line + t * 8));
      hi[t] = _mm256_srli_epi32(bits[t], 16);
    }
    lookup_word(table + w * kTripletTables.word_floats(), bits, hi, acc,
                std::make_integer_sequence<int, kTripletTables.groups>{}, std::make_integer_sequence<int, kTiles>{});
  }
  for (int t = 0; t < kTiles; ++t) _mm256_storeu_ps(u + i0 + t * 8, acc[t]);
}
#endif

// The table layout sign_gemv's kernels read on this CPU.
const TableLayout& gemv_table_layout() {
#if BLOCKOPS_X86_DISPATCH
  if (!cpu_has_avx512_vnni() && cpu_has_avx2_fma()) return kTripletTables;
#endif
  return kNibbleTables;
}

// Band `band` (kBandTiles * 16 output rows) of U for every row of the tables; the rows left over at the band's end
// (out % 16, or all of them without AVX2) take the portable loop.
void sign_gemv_band(const at::Tensor& tables, const int32_t* signs, const Geometry& g, int64_t band, float* u) {
  const TableLayout& layout = gemv_table_layout();
  const int64_t rows = tables.size(0);
  const int64_t table_stride = tables.size(1);
  const float* tab = tables.const_data_ptr<float>();
  const int64_t i0 = band * kBandRows, i1 = std::min(g.out, i0 + kBandRows);
#if BLOCKOPS_X86_DISPATCH
  const bool avx512 = cpu_has_avx512_vnni(), avx2 = cpu_has_avx2_fma();
  if (avx512 && rows > 1) {
    const int tiles = static_cast<int>((i1 - i0) / kTileRows);
    if (tiles > 0) sign_band_rows_avx512(tab, table_stride, static_cast<int>(rows), signs, g, i0, tiles, u);
    for (int64_t m = 0; m < rows; ++m) {
      sign_rows_portable(tab + m * table_stride, layout, signs, g, i0 + tiles * kTileRows, i1, u + m * g.out);
    }
    return;
  }
#endif
  for (int64_t m = 0; m < rows; ++m) {
    const float* table = tab + m * table_stride;
    float* um = u + m * g.out;
    int64_t i = i0;
#if BLOCKOPS_X86_DISPATCH
    if (avx512) {
      if (i1 - i == kBandRows) {
        sign_band_avx512<kBandTiles>(table, signs, g, i, um);
        i += kBandRows;
      }
      for (; i + kTileRows <= i1; i += kTileRows) sign_band_avx512<1>(table, signs, g, i, um);
    } else if (avx2) {
      for (; i + 32 <= i1; i += 32) sign_band_avx2<4>(table, signs, g, i, um);
      for (; i + 8 <= i1; i += 8) sign_band_avx2<1>(table, signs, g, i, um);
    }
#endif
    sign_rows_portable(table, layout, signs, g, i, i1, um);
  }
}

int64_t sign_gemv_bands(const Geometry& g) { return (g.out + kBandRows - 1) / kBandRows; }

// U [rows, out] for few rows: tasks take bands.
void sign_gemv(const at::Tensor& tables, const int32_t* signs, const Geometry& g, float* u) {
  at::parallel_for(0, sign_gemv_bands(g), grain(kBandRows * g.sign_words() * kSignsPerWord * tables.size(0)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t band = begin; band < end; ++band) sign_gemv_band(tables, signs, g, band, u);
                   });
}

// Decodes word rows [w0, w1) of the signs into block [jb, out] fp32 (+1 / -1; 0 for sign(0) entries), jb = the
// non-salient positions j0 = 32 w0 .. min(N, 32 w1). Tasks take word rows; the loop over rows is unit-stride.
void decode_sign_block(const int32_t* signs, const int64_t* zero_signs, int64_t num_zero, const Geometry& g,
                       int64_t w0, int64_t w1, float* block) {
  const int64_t j0 = w0 * kSignsPerWord, j1 = std::min(g.plain(), w1 * kSignsPerWord);
  at::parallel_for(w0, w1, grain(kSignsPerWord * g.out), [&](int64_t wb, int64_t we) {
    for (int64_t w = wb; w < we; ++w) {
      const uint32_t* word = reinterpret_cast<const uint32_t*>(signs + w * g.out);
      const int lanes = static_cast<int>(std::min<int64_t>(kSignsPerWord, j1 - w * kSignsPerWord));
      for (int t = 0; t < lanes; ++t) {
        float* dst = block + (w * kSignsPerWord + t - j0) * g.out;
        for (int64_t i = 0; i < g.out; ++i) dst[i] = static_cast<float>(static_cast<int>((word[i] >> t) & 1u) * 2 - 1);
      }
    }
  });
  // zero_signs is sorted by j * out + i, so the block's entries form one contiguous run.
  const int64_t* first = std::lower_bound(zero_signs, zero_signs + num_zero, j0 * g.out);
  const int64_t* last = std::lower_bound(zero_signs, zero_signs + num_zero, j1 * g.out);
  for (const int64_t* e = first; e < last; ++e) block[*e - j0 * g.out] = 0.f;
}

// Runs f(j0, jb, block) over the sign matrix in decoded blocks of at most kBlockFloats (whole words of 32 rows).
template <typename F>
void for_each_sign_block(const at::Tensor& signs, const at::Tensor& zero_signs, const Geometry& g,
                         const at::TensorOptions& options, F&& f) {
  const int64_t words_per_block = std::max<int64_t>(1, kBlockFloats / (kSignsPerWord * std::max<int64_t>(g.out, 1)));
  const int64_t block_rows = std::min(g.plain(), words_per_block * kSignsPerWord);
  at::Tensor buffer = at::empty({block_rows * g.out}, options);
  for (int64_t w0 = 0; w0 < g.sign_words(); w0 += words_per_block) {
    const int64_t w1 = std::min(g.sign_words(), w0 + words_per_block);
    const int64_t j0 = w0 * kSignsPerWord, jb = std::min(g.plain(), w1 * kSignsPerWord) - j0;
    at::Tensor block = buffer.narrow(0, 0, jb * g.out).view({jb, g.out});
    decode_sign_block(signs.const_data_ptr<int32_t>(), zero_signs.const_data_ptr<int64_t>(), zero_signs.numel(), g,
                      w0, w1, block.mutable_data_ptr<float>());
    f(j0, jb, block);
  }
}

// U [rows, out] = sum_j b[j, i] plain[m, j] with b = 0 for the sign(0) entries. One row, or 2-3 rows with AVX-512
// (vpermps looks up 16 outputs at once): the lookup-table GEMV. Otherwise, with AVX2, the byte-shuffle kernel
// (ptq161_cpu_shuffle.cpp: 14-bit activations in int16 tables, 32 columns per vpshufb; measured at 4096 x 4096, one
// thread: AVX2 path 4 / 16 / 64 rows 1.16-1.43 / 4.6-5.9 / 18.7 ms on lowbit's 16-bit fixed-point kernel before,
// 0.78 / 2.7 / 10.6 ms; native (AVX-512) 8 / 16 rows 1.30 / 2.45 ms against the table GEMV's 1.51 / 3.0, which
// keeps 2 rows: 0.46 against 0.50 ms). Without AVX2 or with a NaN / infinity in the activations: the table GEMV up
// to kCpuGemvMaxRows, decoded +-1 blocks and ATen's GEMM above.
// fp32_sums: the factors' gradients (backward) keep fp32 sums, as their contract says (the table GEMV or the
// blocks), instead of the shuffle kernel's 14-bit activations.
constexpr int64_t kShuffleMinRows = 4;  // with AVX-512, the table GEMV below this many rows

// The table and shuffle kernels read every stored bit as a sign; this takes the sign(0) entries back out of U.
void remove_zero_signs(const at::Tensor& plain, const at::Tensor& signs, const at::Tensor& zero_signs,
                       const Geometry& g, at::Tensor& u) {
  const int64_t* z = zero_signs.const_data_ptr<int64_t>();
  const float* x = plain.const_data_ptr<float>();
  float* um = u.mutable_data_ptr<float>();
  const int32_t* s = signs.const_data_ptr<int32_t>();
  for (int64_t e = 0; e < zero_signs.numel(); ++e) {
    const int64_t j = z[e] / g.out, i = z[e] % g.out;
    const float b = sign_value(sign_bit(s, g, j, i));
    for (int64_t m = 0; m < plain.size(0); ++m) um[m * g.out + i] -= b * x[m * plain.size(1) + j];
  }
}

at::Tensor sign_dot(const at::Tensor& plain, const at::Tensor& signs, const at::Tensor& zero_signs, const Geometry& g,
                    bool fp32_sums = false) {
  const int64_t rows = plain.size(0);
  if (g.plain() == 0) return at::zeros({rows, g.out}, plain.options());
  const bool table_gemv = rows == 1 || (rows <= kCpuGemvMaxRows &&
                                        (fp32_sums || (cpu_has_avx512_vnni() && rows < kShuffleMinRows)));
  std::vector<int64_t> non_finite;  // rows the shuffle kernel leaves to the exact path below
  at::Tensor u = table_gemv || fp32_sums ? at::Tensor() : sign_matmul_shuffle(plain, signs, non_finite);
  if (u.defined()) shuffle_counter.hit();
  if (!u.defined() && rows <= kCpuGemvMaxRows) {
    u = at::empty({rows, g.out}, plain.options());
    sign_gemv(build_tables(plain, g, gemv_table_layout()), signs.const_data_ptr<int32_t>(), g,
              u.mutable_data_ptr<float>());
  }
  if (u.defined()) {
    remove_zero_signs(plain, signs, zero_signs, g, u);
    if (!non_finite.empty()) {
      // A NaN / Inf row on the exact path (the table GEMV or the blocks), so that it is non-finite as F.linear's and
      // every other row is what it is without it.
      const at::Tensor which = at::tensor(non_finite, plain.options().dtype(at::kLong));
      u.index_copy_(0, which, sign_dot(plain.index_select(0, which), signs, zero_signs, g, /*fp32_sums=*/true));
    }
    return u;
  }
  u = at::zeros({rows, g.out}, plain.options());
  for_each_sign_block(signs, zero_signs, g, plain.options(), [&](int64_t j0, int64_t jb, const at::Tensor& block) {
    u.addmm_(plain.narrow(1, j0, jb), block);
  });
  return u;
}

// The transposed product [rows, N]: out[m, j] = sum_i b[j, i] gy[m, i].
at::Tensor sign_dot_transposed(const at::Tensor& gy, const at::Tensor& signs, const at::Tensor& zero_signs,
                               const Geometry& g) {
  at::Tensor out = at::empty({gy.size(0), g.plain()}, gy.options());
  for_each_sign_block(signs, zero_signs, g, gy.options(), [&](int64_t j0, int64_t jb, const at::Tensor& block) {
    out.narrow(1, j0, jb).copy_(at::mm(gy, block.t()));
  });
  return out;
}

// W_hat [out, in] in T (fp32; fp64 on the fp64 path) in the original channel order into out, from the factors in T:
// tasks take tiles of 16 rows (one line of each packed row), so the codes and signs are read once and each row's
// entries are scattered through perm within that row.
template <typename T>
void dequant_into(const at::Tensor& perm, const at::Tensor& qsalient, const at::Tensor& signs,
                  const at::Tensor& zero_signs, const Geometry& g, const T* sc, const T* ze, const T* al, const T* mp,
                  const T* rp, const T* r2p, T* out) {
  const int32_t* p = perm.const_data_ptr<int32_t>();
  const int32_t* q = qsalient.const_data_ptr<int32_t>();
  const int32_t* s = signs.const_data_ptr<int32_t>();
  const int64_t tiles = (g.out + kTileRows - 1) / kTileRows;
  at::parallel_for(0, tiles, grain(kTileRows * g.in), [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t i1 = std::min(g.out, (tile + 1) * kTileRows);
      for (int64_t k = 0; k < g.salient; ++k) {
        for (int64_t i = tile * kTileRows; i < i1; ++i) {
          out[i * g.in + p[k]] = high_weight<T>(salient_code(q, g, k, i), sc[i], ze[i]);
        }
      }
      for (int64_t j = 0; j < g.plain(); ++j) {
        const int32_t c = p[g.salient + j];
        for (int64_t i = tile * kTileRows; i < i1; ++i) {
          out[i * g.in + c] =
              r2p[c] * low_weight_unscaled<T>(static_cast<T>(sign_value(sign_bit(s, g, j, i))), al[i], mp[i], rp[i]);
        }
      }
    }
  });
  const int64_t* z = zero_signs.const_data_ptr<int64_t>();
  for (int64_t e = 0; e < zero_signs.numel(); ++e) {
    const int64_t j = z[e] / g.out, i = z[e] % g.out;
    const int32_t c = p[g.salient + j];
    out[i * g.in + c] = r2p[c] * low_weight_unscaled<T>(T(0), al[i], mp[i], rp[i]);
  }
}

// ---- The fp64 path ----------------------------------------------------------------------------------------------

bool fp64_factors(const at::Tensor& salient_scale, const at::Tensor& salient_zero, const at::Tensor& alpha,
                  const at::Tensor& mu, const at::Tensor& r1, const at::Tensor& r2) {
  return any_fp64({&salient_scale, &salient_zero, &alpha, &mu, &r1, &r2});
}

// W_hat [out, in] fp64 from the given factors (any float dtypes; converted to fp64).
at::Tensor dequant_fp64(const at::Tensor& perm, const at::Tensor& qsalient, const at::Tensor& signs,
                        const at::Tensor& zero_signs, const Geometry& g, const at::Tensor& scale,
                        const at::Tensor& zero, const at::Tensor& alpha, const at::Tensor& mu, const at::Tensor& r1,
                        const at::Tensor& r2) {
  at::Tensor w = at::empty({g.out, g.in}, perm.options().dtype(at::kDouble));
  if (w.numel() == 0) return w;
  const at::Tensor sc = contiguous_as<double>(scale), ze = contiguous_as<double>(zero);
  const at::Tensor al = contiguous_as<double>(alpha), mp = contiguous_as<double>(mu);
  const at::Tensor rp = contiguous_as<double>(r1), r2p = contiguous_as<double>(r2);
  dequant_into<double>(perm, qsalient, signs, zero_signs, g, sc.const_data_ptr<double>(), ze.const_data_ptr<double>(),
                       al.const_data_ptr<double>(), mp.const_data_ptr<double>(), rp.const_data_ptr<double>(),
                       r2p.const_data_ptr<double>(), w.mutable_data_ptr<double>());
  return w;
}

// The six factors (scale, zero, alpha, mu, r1, r2; checked: contiguous fp16 / bf16 / fp32) in fp32 for the kernels:
// fp32 ones as they are, the others converted into one buffer. Six ATen conversions (an allocation and an op each)
// were ~3 us of ptq161_linear's 16 us per-call floor at 256 x 256 (AVX2 path).
Factors fp32_factors(std::initializer_list<const at::Tensor*> factors) {
  int64_t total = 0;
  for (const at::Tensor* t : factors) total += t->scalar_type() == at::kFloat ? 0 : t->numel();
  const at::Tensor buffer = at::empty({total}, factors.begin()[0]->options().dtype(at::kFloat));
  const bool avx2 = cpu_has_avx2_fma();
  std::vector<at::Tensor> out;
  int64_t offset = 0;
  for (const at::Tensor* t : factors) {
    if (t->scalar_type() == at::kFloat) {
      out.push_back(*t);
      continue;
    }
    float* dst = buffer.mutable_data_ptr<float>() + offset;
    if (t->scalar_type() == at::kHalf) {
      convert_to_fp32(t->const_data_ptr<c10::Half>(), dst, t->numel(), avx2);
    } else {
      TORCH_INTERNAL_ASSERT(t->scalar_type() == at::kBFloat16);
      convert_to_fp32(t->const_data_ptr<c10::BFloat16>(), dst, t->numel(), avx2);
    }
    out.push_back(buffer.narrow(0, offset, t->numel()));
    offset += t->numel();
  }
  return Factors{out[0], out[1], out[2], out[3], out[4], out[5]};
}

// ---------------------------------------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------------------------------------
// Columns [c0, c1) of one output row: y += r1 (alpha U + mu V) + bias (u: that row of U, null where there is no
// binary part; v: its V; bias null where there is none).
void add_binary_part(float* y, const float* u, float v, const Factors& f, const float* bias, int64_t c0, int64_t c1) {
  const float* al = f.alpha.const_data_ptr<float>();
  const float* mp = f.mu.const_data_ptr<float>();
  const float* rp = f.r1.const_data_ptr<float>();
  for (int64_t i = c0; i < c1; ++i) {
    y[i] += rp[i] * (al[i] * (u != nullptr ? u[i] : 0.f) + mp[i] * v) + (bias != nullptr ? bias[i] : 0.f);
  }
}


// One activation row whose salient part takes lowbit's one-row split-K path (lowbit::RowProduct): the whole product
// in one parallel region, its phases joined by shared counters:
//   1. items from one counter: the binary GEMV's tables (kTableWordsPerItem sign words each), the salient part's
//      pieces, then the binary GEMV's bands (a band first waits until every table is built: by the time a thread
//      gets there, normally done);
//   2. the thread that finishes the last item removes the zero signs' terms from U and runs the salient part's
//      columns past its last full tile;
//   3. then the threads take columns of y = salient part + r1 (alpha U + mu V) + bias.
// Through the dispatcher the salient part was a second region, and the tables, the sums of the pieces and the
// epilogue ran on the calling thread: perf per thread (AVX2 path, 2048 x 5632) showed the worker idle a third of the
// call. Results as on the other path: the same kernels and sums, each item's output its own. Returns y, or an
// undefined tensor (nothing done) where the salient part would not take that path.
at::Tensor linear_one_row(const Gathered& xg, const at::Tensor& qsalient, const at::Tensor& signs,
                          const at::Tensor& zero_signs, const Factors& f, const Geometry& g,
                          const c10::optional<at::Tensor>& bias) {
  const lowbit::Geometry lg{g.salient_padded(), g.out, kSalientBits, static_cast<int>(salient_group_size(g))};
  if (!lowbit::RowProduct::applies(lg)) return {};
  TORCH_INTERNAL_ASSERT(lowbit::valid_geometry(lg));
  // Every salient group repeats the row's scale and zero: RowProduct reads the one row in place.
  const lowbit::RowProduct salient(xg.salient, qsalient, f.scale.view({1, g.out}), f.zero.view({1, g.out}), lg);
  one_region_counter.hit();
  const TableLayout& layout = gemv_table_layout();
  const bool binary = g.plain() > 0;
  const at::Tensor tables =
      binary ? at::empty({1, g.sign_words() * layout.word_floats()}, xg.plain.options()) : at::Tensor();
  at::Tensor u = binary ? at::empty({1, g.out}, xg.plain.options()) : at::Tensor();
  at::Tensor y = at::empty({1, g.out}, xg.plain.options());
  const at::Tensor b32 = bias.has_value() ? contiguous_fp32(*bias) : at::Tensor();
  const int64_t table_items = binary ? (g.sign_words() + kTableWordsPerItem - 1) / kTableWordsPerItem : 0;
  const int64_t pieces = salient.pieces(), bands = binary ? sign_gemv_bands(g) : 0;
  const int64_t items = table_items + pieces + bands;
  const int64_t width = salient.width(), column_items = (g.out + kEpilogueColumns - 1) / kEpilogueColumns;
  float* up = binary ? u.mutable_data_ptr<float>() : nullptr;
  float* yp = y.mutable_data_ptr<float>();
  const float v = xg.plain_sum.const_data_ptr<float>()[0];
  const float* bp = bias.has_value() ? b32.const_data_ptr<float>() : nullptr;
  const int32_t* s = signs.const_data_ptr<int32_t>();
  std::atomic<int64_t> next{0}, tables_built{0}, done{0}, finished{0}, next_columns{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    for (int64_t item = next++; item < items; item = next++) {
      if (item < table_items) {
        const int64_t w0 = item * kTableWordsPerItem, w1 = std::min(g.sign_words(), w0 + kTableWordsPerItem);
        build_table_words(xg.plain.const_data_ptr<float>(), layout, w0, w1, tables.mutable_data_ptr<float>());
        tables_built += 1;
      } else if (item < table_items + pieces) {
        salient.run(item - table_items);
      } else {
        spin_until_at_least(tables_built, table_items);
        sign_gemv_band(tables, s, g, item - table_items - pieces, up);
      }
      if (++done == items) {  // the last item: what needs all of them, once
        if (binary) remove_zero_signs(xg.plain, signs, zero_signs, g, u);
        salient.partial_tile(yp);
        finished = 1;
      }
    }
    spin_until_at_least(finished, 1);
    for (int64_t ci = next_columns++; ci < column_items; ci = next_columns++) {
      const int64_t c0 = ci * kEpilogueColumns, c1 = std::min(g.out, c0 + kEpilogueColumns);
      if (c0 < width) salient.sum(yp, c0, std::min(c1, width));
      add_binary_part(yp, up, v, f, bp, c0, c1);
    }
  });
  return y;
}

at::Tensor ptq161_linear_cpu(const at::Tensor& x, const at::Tensor& perm, const at::Tensor& qsalient,
                             const at::Tensor& salient_scale, const at::Tensor& salient_zero, const at::Tensor& signs,
                             const at::Tensor& zero_signs, const at::Tensor& alpha, const at::Tensor& mu,
                             const at::Tensor& r1, const at::Tensor& r2, int64_t num_salient,
                             const c10::optional<at::Tensor>& bias) {
  Linear ln = begin_linear(kLinear, x, perm, qsalient, salient_scale, salient_zero, signs, zero_signs, alpha, mu, r1,
                           r2, num_salient, bias, /*convert_factors=*/false);
  if (ln.done()) return linear_without_products(ln.out_sizes, bias, x.options());
  linear_counter.hit();
  if (any_fp64({&x}) || fp64_factors(salient_scale, salient_zero, alpha, mu, r1, r2) ||
      (bias.has_value() && bias->scalar_type() == at::kDouble)) {
    // The fp64 path: y = x W_hat^T (+ bias) with W_hat dequantized in fp64.
    const at::Tensor w = dequant_fp64(perm, qsalient, signs, zero_signs, ln.g, salient_scale, salient_zero, alpha, mu,
                                      r1, r2);
    at::Tensor y = at::mm(x.reshape({ln.rows, ln.g.in}).to(at::kDouble), w.t());
    if (bias.has_value()) y.add_(contiguous_as<double>(*bias));
    return y.to(x.scalar_type()).view(ln.out_sizes);
  }
  ln.f = fp32_factors({&salient_scale, &salient_zero, &alpha, &mu, &r1, &r2});
  const Factors& f = ln.f;
  const Geometry& g = ln.g;
  const int64_t rows = ln.rows;
  const at::Tensor& x32 = ln.x32;
  const Gathered xg = gather(x32, perm, f.r2, g, false);
  if (rows == 1 && g.salient > 0) {
    const at::Tensor y = linear_one_row(xg, qsalient, signs, zero_signs, f, g, bias);
    if (y.defined()) return y.to(x.scalar_type()).view(ln.out_sizes);
  }
  const at::Tensor u = sign_dot(xg.plain, signs, zero_signs, g);
  at::Tensor y = g.salient > 0 ? lowbit_linear(xg.salient, qsalient, salient_params(f, g))
                               : at::zeros({rows, g.out}, x32.options());
  // y += r1 (alpha U + mu V) + bias, one pass.
  const float* up = u.const_data_ptr<float>();
  const float* vp = xg.plain_sum.const_data_ptr<float>();
  const at::Tensor b32 = bias.has_value() ? contiguous_fp32(*bias) : at::Tensor();
  const float* bp = bias.has_value() ? b32.const_data_ptr<float>() : nullptr;
  float* yp = y.mutable_data_ptr<float>();
  at::parallel_for(0, rows, grain(g.out), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) add_binary_part(yp + m * g.out, up + m * g.out, vp[m], f, bp, 0, g.out);
  });
  return y.to(x.scalar_type()).view(ln.out_sizes);
}

at::Tensor ptq161_dequantize_cpu(const at::Tensor& perm, const at::Tensor& qsalient, const at::Tensor& salient_scale,
                                 const at::Tensor& salient_zero, const at::Tensor& signs, const at::Tensor& zero_signs,
                                 const at::Tensor& alpha, const at::Tensor& mu, const at::Tensor& r1,
                                 const at::Tensor& r2, int64_t num_salient) {
  Factors f;
  const Geometry g = check_weight(kDequant, perm, qsalient, salient_scale, salient_zero, signs, zero_signs, alpha, mu,
                                  r1, r2, num_salient, &f);
  dequant_counter.hit();
  // fp32, or fp64 when any factor is (the fp64 path).
  return BLOCKOPS_FLOAT_SWITCH(any_fp64({&salient_scale, &salient_zero, &alpha, &mu, &r1, &r2}), T, [&] {
    at::Tensor w = at::empty({g.out, g.in}, alpha.options().dtype(c10::CppTypeToScalarType<T>::value));
    if (w.numel() == 0) return w;
    const at::Tensor sc = contiguous_as<T>(salient_scale), ze = contiguous_as<T>(salient_zero);
    const at::Tensor al = contiguous_as<T>(alpha), mp = contiguous_as<T>(mu);
    const at::Tensor rp = contiguous_as<T>(r1), r2p = contiguous_as<T>(r2);
    dequant_into<T>(perm, qsalient, signs, zero_signs, g, sc.const_data_ptr<T>(), ze.const_data_ptr<T>(),
                    al.const_data_ptr<T>(), mp.const_data_ptr<T>(), rp.const_data_ptr<T>(), r2p.const_data_ptr<T>(),
                    w.mutable_data_ptr<T>());
    return w;
  });
}

// Gradients (G = grad_out [rows, out], x' = r2 x over the non-salient channels, U and V as in the forward):
//   alpha_i = r1_i sum_m G[m, i] U[m, i]          r1_i = sum_m G[m, i] (alpha_i U[m, i] + mu_i V[m])
//   Zn[m, j] = sum_i G[m, i] r1_i (alpha_i b[j, i] + mu_i)   (G times W_low without r2, non-salient columns)
//   r2_c = sum_m x[m, c] Zn[m, j]  (c = perm[S + j]; 0 for salient c)     x: r2_c Zn[m, j] and, salient, G W_high
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ptq161_linear_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& perm, const at::Tensor& qsalient,
    const at::Tensor& salient_scale, const at::Tensor& salient_zero, const at::Tensor& signs,
    const at::Tensor& zero_signs, const at::Tensor& alpha, const at::Tensor& mu, const at::Tensor& r1,
    const at::Tensor& r2, int64_t num_salient, bool need_input, bool need_factors) {
  Backward bw = begin_backward(kBackward, grad_out, x, perm, qsalient, salient_scale, salient_zero, signs, zero_signs,
                               alpha, mu, r1, r2, num_salient, need_input, need_factors);
  backward_counter.hit();
  if (bw.done()) return bw.outputs();
  if (any_fp64({&grad_out, &x}) || fp64_factors(salient_scale, salient_zero, alpha, mu, r1, r2)) {
    // The fp64 path, dense: with T = G^T x [out, in], L = alpha b + mu over the non-salient columns (0 on the
    // salient ones; W_low = r1 r2 L) and B = b alone (two more dequantizations with substituted factors):
    //   x = G W_hat;  alpha_i = r1_i sum_c T[i, c] r2_c B[i, c];  r1_i = sum_c T[i, c] r2_c L[i, c];
    //   r2_c = sum_i T[i, c] r1_i L[i, c]   (the formulas above, without the decomposition).
    const Geometry& g = bw.g;
    const at::Tensor gy = grad_out.reshape({bw.rows, g.out}).to(at::kDouble);
    const at::Tensor x64 = x.reshape({bw.rows, g.in}).to(at::kDouble);
    at::Tensor gx;
    if (need_input) {
      gx = at::mm(gy, dequant_fp64(perm, qsalient, signs, zero_signs, g, salient_scale, salient_zero, alpha, mu, r1,
                                   r2));
    }
    if (need_factors) {
      const at::Tensor zeros_out = at::zeros({g.out}, gy.options()), ones_out = at::ones({g.out}, gy.options());
      const at::Tensor ones_in = at::ones({g.in}, gy.options());
      // W_hat with s = z = 0, r1 = r2 = 1: L (alpha, mu as given) and B (alpha = 1, mu = 0).
      const at::Tensor l = dequant_fp64(perm, qsalient, signs, zero_signs, g, zeros_out, zeros_out, alpha, mu,
                                        ones_out, ones_in);
      const at::Tensor b = dequant_fp64(perm, qsalient, signs, zero_signs, g, zeros_out, zeros_out, ones_out,
                                        zeros_out, ones_out, ones_in);
      const at::Tensor t = at::mm(gy.t(), x64);
      const at::Tensor r1_64 = r1.to(at::kDouble), r2_64 = r2.to(at::kDouble);
      const at::Tensor tl = t * l;
      bw.grad_alpha.copy_(r1_64 * at::mv(t * b, r2_64));
      bw.grad_r1.copy_(at::mv(tl, r2_64));
      bw.grad_r2.copy_(at::mv(tl.t(), r1_64));
    }
    return bw.outputs(gx);
  }
  const Factors& f = bw.f;
  const Geometry& g = bw.g;
  const int64_t rows = bw.rows;
  const at::Tensor& gy = bw.gy;
  const Gathered xg = gather(bw.x32, perm, f.r2, g, need_factors);
  // Zn: the +-1 part with G scaled by r1 alpha, plus the mu part (the same for every j).
  at::Tensor zn;
  if (g.plain() > 0) {
    const at::Tensor gscaled = (gy * (f.r1 * f.alpha)).contiguous();
    zn = sign_dot_transposed(gscaled, signs, zero_signs, g);
    zn.add_(at::mm(gy, (f.r1 * f.mu).view({g.out, 1})));
  }
  const int32_t* p = perm.const_data_ptr<int32_t>();
  if (need_factors) {
    bw.factor_grads(sign_dot(xg.plain, signs, zero_signs, g, /*fp32_sums=*/true), xg.plain_sum);
    if (g.plain() > 0) {
      const at::Tensor per_j = (xg.plain_raw * zn).sum(0);
      at::Tensor gr2_32 = at::zeros({g.in}, bw.x32.options());
      const float* src = per_j.const_data_ptr<float>();
      float* dst = gr2_32.mutable_data_ptr<float>();
      for (int64_t j = 0; j < g.plain(); ++j) dst[p[g.salient + j]] = src[j];
      bw.grad_r2.copy_(gr2_32);
    }
  }
  at::Tensor gx32;
  if (need_input) {
    gx32 = at::empty({rows, g.in}, bw.x32.options());
    float* dst = gx32.mutable_data_ptr<float>();
    const at::Tensor gs = g.salient > 0 ? lowbit_grad_input(gy, qsalient, salient_params(f, g)) : at::Tensor();
    const float* gsp = g.salient > 0 ? gs.const_data_ptr<float>() : nullptr;
    const float* znp = g.plain() > 0 ? zn.const_data_ptr<float>() : nullptr;
    const float* r2p = f.r2.const_data_ptr<float>();
    at::parallel_for(0, rows, grain(g.in), [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        for (int64_t k = 0; k < g.salient; ++k) dst[m * g.in + p[k]] = gsp[m * g.salient_padded() + k];
        for (int64_t j = 0; j < g.plain(); ++j) {
          const int32_t c = p[g.salient + j];
          dst[m * g.in + c] = r2p[c] * znp[m * g.plain() + j];
        }
      }
    });
  }
  return bw.outputs(gx32);
}

}  // namespace

TORCH_LIBRARY_IMPL(blockops, CPU, m) {
  m.impl("ptq161_linear", &ptq161_linear_cpu);
  m.impl("ptq161_dequantize", &ptq161_dequantize_cpu);
  m.impl("ptq161_linear_backward", &ptq161_linear_backward_cpu);
}

}  // namespace blockops::ptq161
