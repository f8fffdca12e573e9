// Vector-quantized GEMM on the CPU (family "vq"; layout and numerics in csrc/vq.h). CUDA tensors have no
// kernel yet and get the dispatcher's missing-kernel error.
//
// vq_linear, rows <= kSmallBatchRows (decode), one of two kernels per call (rule: vq::use_lookup_table):
//
//   lookup table:  lut[p][c][m] = x[m, j*d:(j+1)*d] . codebooks[K][c]      p = j*K + K-index, c < k, m < rows
//                  y[m, n] = scales[n] * sum_p lut[p][codes[n, p]][m]       (one vector gather serves every m)
//                  Tables built once per call, split over threads by positions; gathers split over threads by
//                  output rows, tile by tile, chunk by chunk (sketch at the kernel). With uint8 codes on an
//                  AVX-512 VBMI CPU, the tables are split into byte planes and looked up 64 output rows at a
//                  time by register permutes instead ("byte planes", sketch there): exact fp32 tables (four
//                  planes) for fp32 activations, int16 tables (two planes) for fp16 / bf16 ones, which also take
//                  9..32 rows of layers with at least 256 outputs (use_byte_planes).
//
//   direct:        each task dequantizes one weight row at a time into fp32 and dots it with every
//                  activation row (no table: the choice when k is large relative to out).
//
// vq_linear, larger batches -- blocks of up to kBlockBytes of W_hat dequantized into fp32 and multiplied with
// ATen's GEMM (at::mm; in bf16 for bf16 activations); only one block of W_hat exists at a time.
// vq_dequantize -- W_hat row by row. vq_linear_grad_input -- the same blocks, multiplied the other way.
// vq_grad_codebooks -- deterministic scatter-add: each task owns a range of codewords and scans all codes in
// order, so every codeword's gradient is summed in the same order whatever the thread count.
// vq_grad_scales -- unscaled rows of W_hat dotted with the rows of t = grad_out^T x.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#if BLOCKOPS_X86_DISPATCH
#include <immintrin.h>
#endif

#include "checks.h"
#include "cpu_common.h"
#include "cpu_features.h"
#include "glue.h"
#include "introspection.h"
#include "vq.h"
#include "vq_op.h"

namespace blockops::vq {
namespace {

KernelCounter linear_counter(kFamily, "vq_linear.cpu");
KernelCounter byte_planes_counter(kFamily, "vq_linear_byte_planes.cpu");  // which vq_linear.cpu calls took the
                                                                 // int16 byte-plane kernel
KernelCounter dequant_counter(kFamily, "vq_dequantize.cpu");
KernelCounter grad_input_counter(kFamily, "vq_linear_grad_input.cpu");
KernelCounter grad_codebooks_counter(kFamily, "vq_grad_codebooks.cpu");
KernelCounter grad_scales_counter(kFamily, "vq_grad_scales.cpu");
// The byte-plane kernel (fp16 / bf16 activations, uint8 codes, small batches) needs AVX-512 VBMI.
const char* vq_cpu_isa() {
  return cpu_has_avx512_vbmi() ? "avx2+fma, avx512-vbmi (fp16/bf16 byte planes)" : cpu_isa_name();
}
FamilyRegistration family(kFamily, vq_cpu_isa);

constexpr int64_t kSmallBatchRows = 8;     // the tables hold up to 8 rows' sums side by side (one AVX2 vector
                                           // per gather). Measured at 4096 x 11008, one thread (CPU time): the
                                           // table kernel ties fp32 F.linear at 8 rows (2-bit, 3-bit), while 16
                                           // side by side (16 MB of tables for k = 256) ran 4x slower
constexpr int64_t kChunkBytes = 16 << 10;  // tables gathered from per chunk: half of Zen 4's 32 KB L1
constexpr int64_t kTileBytes = 4 << 20;    // staged codes of one tile (L3). Every tile reads all the tables,
                                           // which reach MBs with long rows and several activation rows
                                           // (11 MB at 11008 x 4096, 4 rows), so few large tiles beat tiles
                                           // sized for L2 (measured, one thread: 512 KB 30 ms, 4 MB 13.6 ms)
constexpr int64_t kBuildGrain = 1 << 22;   // table multiply-adds per task (~0.3 ms on one thread)
constexpr int64_t kTilesPerThread = 4;     // table-kernel tiles per thread, for balance on a shared CPU
constexpr int64_t kBlockBytes = 64 << 20;  // fp32 W_hat dequantized at once on the GEMM paths. Measured: GEMMs
                                           // on 512-row blocks ran 1.6x slower than one GEMM on the whole
                                           // 4608 x 1152 DiT weight (21 MB), so blocks are as large as this allows

// The scales in fp32, or ones.
std::vector<float> scale_vector(const c10::optional<at::Tensor>& scales, int64_t out) {
  std::vector<float> s(out, 1.0f);
  if (scales.has_value()) {
    const at::Tensor s32 = contiguous_fp32(*scales);
    std::copy_n(s32.const_data_ptr<float>(), out, s.begin());
  }
  return s;
}

// ---------------------------------------------------------------------------------------------------------
// Tiny helpers
// ---------------------------------------------------------------------------------------------------------

// Rows [r0, r1) of W_hat into dst (row r at dst + (r - r0) * in), dispatching on d and the code type once.
template <int D, typename CodeT>
void dequant_rows_t(const CodeT* codes, const float* cb, const Geometry& g, const float* scales, int64_t r0, int64_t r1,
                    float* dst) {
  for (int64_t r = r0; r < r1; ++r) dequant_row<D>(codes + r * g.positions(), cb, g, scales[r], dst + (r - r0) * g.in());
}

template <typename CodeT>
void dequant_rows_d(const CodeT* codes, const float* cb, const Geometry& g, const float* scales, int64_t r0, int64_t r1,
                    float* dst) {
  switch (g.d) {
    case 2: dequant_rows_t<2>(codes, cb, g, scales, r0, r1, dst); break;
    case 4: dequant_rows_t<4>(codes, cb, g, scales, r0, r1, dst); break;
    default: dequant_rows_t<8>(codes, cb, g, scales, r0, r1, dst); break;
  }
}

void dequant_rows(const void* codes, CodeType type, const float* cb, const Geometry& g, const float* scales,
                  int64_t r0, int64_t r1, float* dst) {
  if (type == CodeType::kU8) {
    dequant_rows_d(static_cast<const uint8_t*>(codes), cb, g, scales, r0, r1, dst);
  } else {
    dequant_rows_d(static_cast<const uint16_t*>(codes), cb, g, scales, r0, r1, dst);
  }
}

// Same, spread over threads.
void dequant_rows_parallel(const void* codes, CodeType type, const float* cb, const Geometry& g, const float* scales,
                           int64_t r0, int64_t r1, float* dst) {
  at::parallel_for(r0, r1, 16, [&](int64_t b, int64_t e) { dequant_rows(codes, type, cb, g, scales, b, e, dst + (b - r0) * g.in()); });
}

float dot_portable(const float* a, const float* b, int64_t n) {
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;  // four chains so that the adds pipeline
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += a[i] * b[i];
    s1 += a[i + 1] * b[i + 1];
    s2 += a[i + 2] * b[i + 2];
    s3 += a[i + 3] * b[i + 3];
  }
  for (; i < n; ++i) s0 += a[i] * b[i];
  return (s0 + s1) + (s2 + s3);
}

#if BLOCKOPS_X86_DISPATCH
BLOCKOPS_TARGET_AVX2 float dot_avx2(const float* a, const float* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();  // two chains hide the FMA latency
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
  float s = hsum_avx2(_mm256_add_ps(s0, s1));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}
#endif

float dot(bool avx2, const float* a, const float* b, int64_t n) {
#if BLOCKOPS_X86_DISPATCH
  if (avx2) return dot_avx2(a, b, n);
#endif
  return dot_portable(a, b, n);
}

// ---------------------------------------------------------------------------------------------------------
// Small batches: lookup table
// ---------------------------------------------------------------------------------------------------------
//
// Tables: lut[p][c][m] = x[m, j*d:(j+1)*d] . codebooks[p % K][c] for position p = j*K + (p % K), codeword c and
// activation row m < RP, the rows padded with zeros to RP in {1, 2, 4, 8}. The RP sums of one codeword sit side by
// side, so one vector load fetches what one code contributes to every activation row: a gather costs about the
// same at batch 8 as at batch 1. In memory the W positions covered by one 64-bit word of codes (W = 8 uint8 or 4
// int16 codes) are interleaved per codeword, [P / W][k][W][RP], so that a code rotated into place is its entry's
// byte offset (no multiply, no per-position base pointer). Positions are padded with zero tables to whole words.
//
// Gathers, per task (a contiguous range of output rows, one per thread), per tile of rows (kTileBytes of codes):
//
//        positions ->   chunk 0           chunk 1           ...    (chunk * k * RP floats of tables <= kChunkBytes: L1)
//                       +-----------------+-----------------+--
//      tile rows        | staged codes [chunk][row][chunk positions], copied row by row from codes [out, P]
//      (4 at a time)    +-----------------+-----------------+--
//
//   The tile's codes are read in order (one sequential stream, the next tile's prefetched while this one is
//   gathered) and come out contiguous per chunk: read in place, rows of 1024 codes at a power-of-two stride would
//   all map to the same few L1 sets. Each chunk's tables stay in L1 while all the tile's rows gather from them.

// The vectors below live inside always-inlined loops, never crossing a call, so GCC's -Wpsabi note (a vector
// return would change the ABI between the AVX2 and the portable copies) does not apply.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

// RP floats side by side: a GCC vector (SSE/AVX2 in the AVX2 copy of the loops), or a float when RP = 1. (A
// typedef: GCC drops vector_size from an alias declaration in a template.)
template <int RP>
struct Lanes { typedef float type __attribute__((vector_size(RP * sizeof(float)))); };
static_assert(sizeof(Lanes<4>::type) == 4 * sizeof(float), "Lanes<RP> must be a vector of RP floats");
template <>
struct Lanes<1> { using type = float; };

template <int RP>
__attribute__((always_inline)) inline typename Lanes<RP>::type load_lanes(const float* p) {
  typename Lanes<RP>::type v;
  std::memcpy(&v, p, sizeof v);  // unaligned vector load
  return v;
}

template <int RP>
__attribute__((always_inline)) inline void store_lanes(float* p, typename Lanes<RP>::type v) {
  std::memcpy(p, &v, sizeof v);
}

// How the table and the gathers are cut, for one call.
struct TablePlan {
  int64_t rp;      // activation rows padded to 1, 2, 4 or 8
  int64_t chunk;   // positions per chunk: a power of two in [8, 64] (whole 64-bit words of codes) with
                   // chunk * k * rp floats at most kChunkBytes where possible
  int64_t padded;  // positions rounded up to whole 64-bit words of uint8 codes (8); the last chunk may be shorter
  int64_t tile;    // output rows per tile: staged codes and accumulators within kTileBytes
};

static_assert(kSmallBatchRows <= 8, "the tables hold at most 8 activation rows side by side");

TablePlan plan_tables(const Geometry& g, int64_t rows, int64_t code_bytes) {
  TablePlan t{};
  t.rp = rows <= 1 ? 1 : rows <= 2 ? 2 : rows <= 4 ? 4 : 8;
  const int64_t entry_bytes = g.k * t.rp * static_cast<int64_t>(sizeof(float));
  t.chunk = 8;
  while (t.chunk < 64 && t.chunk * 2 * entry_bytes <= kChunkBytes) t.chunk *= 2;
  t.padded = (g.positions() + 7) / 8 * 8;
  const int64_t row_bytes = t.padded * code_bytes + t.rp * static_cast<int64_t>(sizeof(float));
  t.tile = std::max<int64_t>(16, kTileBytes / row_bytes);
  return t;
}

// Tables of one position p into its slot of the word-interleaved layout (see lut_entry): RP = 1, unit-stride over
// c into a block of kBuildBlock sums with the codebook transposed to [K][d][k], so that it vectorises 8-wide in
// the AVX2 copy, then spread to the slot; RP > 1, one vector of the RP rows' inputs per t, times each codeword's
// weight broadcast. Positions >= P (padding) get zeros.
constexpr int64_t kBuildBlock = 64;

template <int D, int RP>
__attribute__((always_inline)) inline void build_position(const float* x, const float* cb, const float* cbt,
                                                          const Geometry& g, int64_t rows, int64_t p, int64_t stride,
                                                          float* slot) {
  if (p >= g.positions()) {
    for (int64_t c = 0; c < g.k; ++c)
      for (int m = 0; m < RP; ++m) slot[c * stride + m] = 0.f;
    return;
  }
  const int64_t j = p / g.K, kk = p % g.K, in = g.in();
  if constexpr (RP == 1) {
    const float* xg = x + j * D;
    const float* ct = cbt + kk * D * g.k;
    float sums[kBuildBlock];
    for (int64_t c0 = 0; c0 < g.k; c0 += kBuildBlock) {
      const int64_t n = std::min(kBuildBlock, g.k - c0);
      for (int64_t c = 0; c < n; ++c) {
        float s = 0.f;
        for (int t = 0; t < D; ++t) s += xg[t] * ct[t * g.k + c0 + c];
        sums[c] = s;
      }
      for (int64_t c = 0; c < n; ++c) slot[(c0 + c) * stride] = sums[c];
    }
  } else {
    using V = typename Lanes<RP>::type;
    V xt[D];
    for (int t = 0; t < D; ++t) {
      float lane[RP] = {};
      for (int64_t m = 0; m < rows; ++m) lane[m] = x[m * in + j * D + t];
      xt[t] = load_lanes<RP>(lane);
    }
    const float* cw = cb + kk * g.k * D;
    for (int64_t c = 0; c < g.k; ++c) {
      V s = xt[0] * cw[c * D];
      for (int t = 1; t < D; ++t) s += xt[t] * cw[c * D + t];
      store_lanes<RP>(slot + c * stride, s);
    }
  }
}

// The tables of words [w0, w1): positions w * W .. w * W + W - 1, W codes per 64-bit word.
template <int D, int RP>
__attribute__((always_inline)) inline void build_words(const float* x, const float* cb, const float* cbt,
                                                       const Geometry& g, int64_t rows, int64_t per_word, int64_t w0,
                                                       int64_t w1, float* lut) {
  for (int64_t w = w0; w < w1; ++w)
    for (int64_t i = 0; i < per_word; ++i)
      build_position<D, RP>(x, cb, cbt, g, rows, w * per_word + i, per_word * RP, lut + (w * g.k * per_word + i) * RP);
}

template <int D, int RP>
void build_words_portable(const float* x, const float* cb, const float* cbt, const Geometry& g, int64_t rows,
                          int64_t per_word, int64_t w0, int64_t w1, float* lut) {
  build_words<D, RP>(x, cb, cbt, g, rows, per_word, w0, w1, lut);
}
#if BLOCKOPS_X86_DISPATCH
template <int D, int RP>
BLOCKOPS_TARGET_AVX2 void build_words_avx2(const float* x, const float* cb, const float* cbt, const Geometry& g,
                                           int64_t rows, int64_t per_word, int64_t w0, int64_t w1, float* lut) {
  build_words<D, RP>(x, cb, cbt, g, rows, per_word, w0, w1, lut);
}
#endif

using BuildFn = void (*)(const float*, const float*, const float*, const Geometry&, int64_t, int64_t, int64_t, int64_t,
                         float*);

template <int RP>
BuildFn pick_build_rp(bool avx2, int64_t d) {
#if BLOCKOPS_X86_DISPATCH
  if (avx2) return d == 2 ? &build_words_avx2<2, RP> : d == 4 ? &build_words_avx2<4, RP> : &build_words_avx2<8, RP>;
#endif
  return d == 2 ? &build_words_portable<2, RP> : d == 4 ? &build_words_portable<4, RP> : &build_words_portable<8, RP>;
}

BuildFn pick_build(bool avx2, int64_t d, int64_t rp) {
  switch (rp) {
    case 1: return pick_build_rp<1>(avx2, d);
    case 2: return pick_build_rp<2>(avx2, d);
    case 4: return pick_build_rp<4>(avx2, d);
    default: return pick_build_rp<8>(avx2, d);
  }
}

// All tables, [padded / W][k][W][rp] (W codes per 64-bit word): the W positions that one word of codes covers
// sit side by side for each codeword, so that a code shifted into place is the byte offset of its entry.
void build_tables(bool avx2, const float* x, const float* cb32, const Geometry& g, int64_t rows, const TablePlan& t,
                  int64_t per_word, float* lut) {
  std::vector<float> cbt;  // [K][d][k], for the single-row tables
  if (t.rp == 1) {
    cbt.resize(static_cast<size_t>(g.K * g.d * g.k));
    for (int64_t kk = 0; kk < g.K; ++kk)
      for (int64_t c = 0; c < g.k; ++c)
        for (int64_t i = 0; i < g.d; ++i) cbt[(kk * g.d + i) * g.k + c] = cb32[(kk * g.k + c) * g.d + i];
  }
  const float* cbt_p = cbt.data();
  const BuildFn build = pick_build(avx2, g.d, t.rp);
  // At least kBuildGrain multiply-adds per task: a small build (a few hundred microseconds at most) runs on the
  // calling thread, sparing a parallel region whose wake-up costs milliseconds on a shared CPU.
  const int64_t per_word_work = std::max<int64_t>(1, per_word * g.k * g.d * rows);
  at::parallel_for(0, t.padded / per_word, std::max<int64_t>(1, kBuildGrain / per_word_work), [&](int64_t w0, int64_t w1) {
    build(x, cb32, cbt_p, g, rows, per_word, w0, w1, lut);
  });
}

// w rotated right by n in [0, 64): one instruction (ror / rorx), and it leaves w intact for the next code.
inline uint64_t rotate_right(uint64_t w, int n) { return (w >> n) | (w << ((64 - n) & 63)); }

struct GatherArgs {
  const float* lut;     // [padded / W][k][W][rp], see build_tables
  const void* codes;    // [out, P]
  const float* scales;  // [out] fp32
  float* y;             // [rows, out] fp32
  Geometry g;
  TablePlan t;
  int64_t rows;
};

// acc[r][0:RP] += sum over the chunk's positions i of table(i, codes[r][i]) for R rows at once (the staged codes of
// row r at codes + r * len). R rows of kSums sums each are independent chains, so that the adds pipeline; the
// per-row overhead (zeroing, reducing the sums, updating acc) is paid once per chunk.
template <typename CodeT, int RP, int R>
__attribute__((always_inline)) inline void gather_rows(const CodeT* codes, int64_t len, const float* lut, int64_t table,
                                                       float* acc) {
  using V = typename Lanes<RP>::type;
  constexpr int kPerWord = 8 / sizeof(CodeT);        // codes per 64-bit word
  constexpr int kBits = 8 * sizeof(CodeT);
  constexpr uint64_t kMask = (uint64_t{1} << kBits) - 1;
  constexpr int kSums = R == 1 ? 8 : 2;              // sums per row: 8 chains in flight either way
  constexpr int kEntryShift = std::countr_zero(static_cast<unsigned>(kPerWord * RP * sizeof(float)));  // log2 of a
                                                     // codeword's bytes in a word's tables
  V s[R][kSums] = {};
  for (int64_t i0 = 0; i0 < len; i0 += kPerWord) {
    const char* word_tables = reinterpret_cast<const char*>(lut + i0 * table);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      uint64_t w;
      std::memcpy(&w, codes + r * len + i0, sizeof w);
#pragma GCC unroll 8
      for (int i = 0; i < kPerWord; ++i) {
        // Byte offset of code i's entry: the code rotated into bits [kEntryShift, kEntryShift + kBits).
        const uint64_t offset = rotate_right(w, (i * kBits - kEntryShift) & 63) & (kMask << kEntryShift);
        s[r][i % kSums] += load_lanes<RP>(reinterpret_cast<const float*>(word_tables + offset) + i * RP);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    V sum = s[r][0];
    for (int i = 1; i < kSums; ++i) sum += s[r][i];
    store_lanes<RP>(acc + r * RP, load_lanes<RP>(acc + r * RP) + sum);
  }
}

// One tile of output rows [n0, n1) of a task ending at n_end: stage its codes, gather every chunk's tables into
// acc [row][RP], then write y = scale * acc.
template <typename CodeT, int RP>
__attribute__((always_inline)) inline void gather_tile(const GatherArgs& a, int64_t n0, int64_t n1, int64_t n_end,
                                                       CodeT* staged, float* acc) {
  constexpr int kPerWord = 8 / sizeof(CodeT);        // codes per 64-bit word
  constexpr int kRowsAtOnce = 4;                     // output rows gathered together
  const int64_t P = a.g.positions(), k = a.g.k, rows = n1 - n0;
  const int64_t chunk = a.t.chunk, padded = a.t.padded, table = k * RP;
  const CodeT* codes = static_cast<const CodeT*>(a.codes);
  // Stage the tile: staged[q * chunk * rows + r * len_q + i] = codes[n0 + r, q * chunk + i] for chunk q of len_q
  // positions, zero past P. The tile's codes are read in order (one sequential stream) and each chunk's codes
  // come out contiguous.
  for (int64_t r = 0; r < rows; ++r) {
    const CodeT* src = codes + (n0 + r) * P;
    for (int64_t q0 = 0; q0 < padded; q0 += chunk) {
      const int64_t len = std::min(chunk, padded - q0);
      CodeT* dst = staged + q0 * rows + r * len;
      for (int64_t i0 = 0; i0 < len; i0 += kPerWord) {
        if (q0 + i0 + kPerWord <= P) {
          std::memcpy(dst + i0, src + q0 + i0, sizeof(uint64_t));
        } else {
          for (int i = 0; i < kPerWord; ++i) dst[i0 + i] = q0 + i0 + i < P ? src[q0 + i0 + i] : CodeT{0};
        }
      }
    }
  }
  std::fill(acc, acc + rows * RP, 0.f);
  const char* next = reinterpret_cast<const char*>(codes + n1 * P);
  const int64_t next_bytes = std::min(rows, n_end - n1) * P * static_cast<int64_t>(sizeof(CodeT));
  for (int64_t q0 = 0; q0 < padded; q0 += chunk) {
    const int64_t len = std::min(chunk, padded - q0);
    const float* lut = a.lut + q0 * table;
    const CodeT* code_rows = staged + q0 * rows;
    int64_t r = 0;
    for (; r + kRowsAtOnce <= rows; r += kRowsAtOnce) {
      // Sweep the next tile's codes into the cache at the pace this tile's staged codes are read, so that
      // staging it finds them there instead of waiting on DRAM.
      const int64_t ahead = (q0 * rows + r * len) * static_cast<int64_t>(sizeof(CodeT));
      if (ahead < next_bytes) __builtin_prefetch(next + ahead);
      gather_rows<CodeT, RP, kRowsAtOnce>(code_rows + r * len, len, lut, table, acc + r * RP);
    }
    for (; r < rows; ++r) gather_rows<CodeT, RP, 1>(code_rows + r * len, len, lut, table, acc + r * RP);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t n = n0 + r;
    for (int64_t m = 0; m < a.rows; ++m) a.y[m * a.g.out + n] = a.scales[n] * acc[r * RP + m];
  }
}

template <typename CodeT, int RP>
void gather_portable(const GatherArgs& a, int64_t n0, int64_t n1, int64_t n_end, void* staged, float* acc) {
  gather_tile<CodeT, RP>(a, n0, n1, n_end, static_cast<CodeT*>(staged), acc);
}
#if BLOCKOPS_X86_DISPATCH
template <typename CodeT, int RP>
BLOCKOPS_TARGET_AVX2 void gather_avx2(const GatherArgs& a, int64_t n0, int64_t n1, int64_t n_end, void* staged,
                                      float* acc) {
  gather_tile<CodeT, RP>(a, n0, n1, n_end, static_cast<CodeT*>(staged), acc);
}
#endif

using GatherFn = void (*)(const GatherArgs&, int64_t, int64_t, int64_t, void*, float*);

template <typename CodeT, int RP>
GatherFn pick_gather_isa(bool avx2) {
#if BLOCKOPS_X86_DISPATCH
  if (avx2) return &gather_avx2<CodeT, RP>;
#endif
  return &gather_portable<CodeT, RP>;
}

template <typename CodeT>
GatherFn pick_gather_rp(bool avx2, int64_t rp) {
  switch (rp) {
    case 1: return pick_gather_isa<CodeT, 1>(avx2);
    case 2: return pick_gather_isa<CodeT, 2>(avx2);
    case 4: return pick_gather_isa<CodeT, 4>(avx2);
    default: return pick_gather_isa<CodeT, 8>(avx2);
  }
}

void lut_gemv(bool avx2, const float* x, const void* codes, CodeType type, const float* cb32, const float* scales,
              const Geometry& g, int64_t rows, float* y) {
  const int64_t code_bytes = type == CodeType::kU8 ? 1 : 2;
  const TablePlan t = plan_tables(g, rows, code_bytes);
  at::Tensor lut = at::empty({t.padded, g.k, t.rp}, at::TensorOptions().dtype(at::kFloat));  // interleaved, see build_tables
  build_tables(avx2, x, cb32, g, rows, t, 8 / code_bytes, lut.mutable_data_ptr<float>());
  const GatherArgs a{lut.const_data_ptr<float>(), codes, scales, y, g, t, rows};
  const GatherFn gather = type == CodeType::kU8 ? pick_gather_rp<uint8_t>(avx2, t.rp)
                                                : pick_gather_rp<uint16_t>(avx2, t.rp);
  // Tiles handed out in order from a shared counter rather than one fixed range per thread: on a shared CPU a
  // descheduled thread leaves its tiles to the others instead of making them wait at the end. kTilesPerThread
  // tiles per thread at least, so that there is something to hand over; each tile reads the whole table.
  const int64_t threads = at::get_num_threads();
  const int64_t tile = std::min(t.tile, std::max<int64_t>(64, (g.out + kTilesPerThread * threads - 1) /
                                                                  (kTilesPerThread * threads)));
  std::atomic<int64_t> next_tile{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    // Not zero-filled: staging writes every byte before it is read.
    const auto staged = std::make_unique_for_overwrite<uint8_t[]>(static_cast<size_t>(tile * t.padded * code_bytes));
    std::vector<float> acc(static_cast<size_t>(tile * t.rp));
    for (int64_t n0 = next_tile.fetch_add(tile); n0 < g.out; n0 = next_tile.fetch_add(tile)) {
      gather(a, n0, std::min(g.out, n0 + tile), g.out, staged.get(), acc.data());
    }
  });
}

#pragma GCC diagnostic pop

// ---------------------------------------------------------------------------------------------------------
// Small batches, uint8 codes: tables in byte planes (AVX-512 VBMI)
// ---------------------------------------------------------------------------------------------------------
//
// The fp32 kernel above gathers one table entry per code with scalar loads: about one code per cycle, and its
// tables leave L1 for long rows. Here the vector lanes are 64 output rows at one position instead, so that one
// table serves every lane and the lookup is a register permute:
//
//   table entries   x_m[group j] . codebook[K][c]. fp16 / bf16 activations: rounded to int16 with one scale
//                   per activation row and chunk of kPlaneChunk positions (the chunk's largest |entry| -> 32767):
//                   an error of at most 2^-16 of that entry per term, far below the rounding of the input
//                   itself. fp32 activations: the fp32 entries themselves, as four byte planes ("exact"). Built
//                   with AVX-512 (vector rounding and byte split: a scalar build cost more than the lookups).
//   byte planes     each table is stored as its 256 low bytes and its 256 high bytes: vpermi2b looks up 128
//                   entries for 64 codes at once, so two of them plus a blend on the code's top bit read a plane;
//                   unpacking the low and high planes byte by byte gives back the exact int16 entries.
//   accumulation    int16: two positions' entries of each row interleaved word by word, vpdpwssd with ones
//                   adds them into int32; each chunk's int32 sums are scaled into fp32 at the end of the chunk.
//                   exact: the four planes' bytes interleave back into the fp32 entries, added in fp32 (a fresh
//                   partial sum per chunk).
//   codes           per block of 64 positions, a tile of up to kPlaneGroups * 64 output rows is transposed into
//                   [group][position][64 rows] (16 x 64-byte blocks through a 4-stage unpack network) so that a
//                   position's 64 codes are one load; the range check takes the codes' maximum on this pass.
//   order           each thread owns a contiguous range of tiles and walks position blocks outermost, tiles
//                   inside: a block's tables (32 KB per activation row) stay in L1 / L2 for all its tiles, so
//                   every table is read once per thread, and a tile loads each position's planes once for all
//                   its groups.
//
// Lane order: after the two unpacks, dword lane 4l + i of accumulator a in {0..3} holds row 16l + 4a + i.

constexpr int64_t kPlaneChunk = 16;      // positions per int16 scale: int32 sums stay below 16 * 32767
constexpr int64_t kPlaneGroups = 4;      // 64-row groups per tile; measured at 4096 x 11008, 2 threads, batch 1:
                                         // 1, 2, 4 groups 2.4, 1.5, 1.4 ms (before the vector table build)
constexpr int64_t kPlanePositions = 64;  // positions are padded to whole 64-position transpose blocks

struct PlaneTables {
  uint8_t* plane[4];  // [rows][padded][256] each: the int16 entries' low and high bytes (planes 0, 1), or the
                      // fp32 entries' four bytes, least significant first (exact tables, fp32 activations)
  float* scale;       // [rows][padded / kPlaneChunk]: fp32 value of one int16 step (int16 tables only)
  int64_t padded;     // positions rounded up to kPlanePositions (the extra ones are zero tables)
  bool exact;         // fp32 entries in four planes, else int16 entries in two
};

// Per-thread buffers reused from call to call: a fresh MB-sized allocation per call costs page faults (and
// zeroing) worth a fifth of a batch-1 call. Every byte is written before it is read. Buffers above
// kScratchKeepBytes are released after the call rather than kept for the thread's lifetime.
constexpr size_t kScratchKeepBytes = size_t{16} << 20;

template <typename T>
T* scratch(std::vector<T>& buffer, int64_t count) {
  if (buffer.size() < static_cast<size_t>(count)) buffer.resize(static_cast<size_t>(count));
  return buffer.data();
}

template <typename T>
void release_if_large(std::vector<T>& buffer) {
  if (buffer.capacity() * sizeof(T) > kScratchKeepBytes) std::vector<T>().swap(buffer);
}

#if BLOCKOPS_X86_DISPATCH
// GCC 12 warns that the "undefined" source vector inside its own _mm512_unpack*_epi32/64 intrinsics is (or may
// be) uninitialised (a known false positive of the header); nothing here reads an uninitialised value.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

// Table entries c0 .. c0 + 15 of position p of activation row m: x_m[group] . codeword, fp32 (codebook
// transposed to [K][d][k]: 16 codewords per vector); zeros for codewords >= k and padding positions p >= P.
BLOCKOPS_TARGET_AVX512_VBMI inline __m512 table_entries(const float* x, const float* cbt, const Geometry& g,
                                                        int64_t m, int64_t p, int64_t c0) {
  __m512 e = _mm512_setzero_ps();
  if (p >= g.positions() || c0 >= g.k) return e;
  const float* xg = x + m * g.in() + (p / g.K) * g.d;
  const float* ct = cbt + (p % g.K) * g.d * g.k;
  const __mmask16 valid = g.k - c0 >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (g.k - c0)) - 1);
  for (int64_t u = 0; u < g.d; ++u)
    e = _mm512_fmadd_ps(_mm512_set1_ps(xg[u]), _mm512_maskz_loadu_ps(valid, ct + u * g.k + c0), e);
  return e;
}

// Exact tables of chunk q of activation row m: the fp32 entries' bytes into the four planes.
BLOCKOPS_TARGET_AVX512_VBMI void build_exact_chunk(const float* x, const float* cbt, const Geometry& g, int64_t m,
                                                   int64_t q, PlaneTables& t) {
  for (int64_t i = 0; i < kPlaneChunk; ++i) {
    const int64_t p = q * kPlaneChunk + i, offset = (m * t.padded + p) * 256;
    for (int64_t c0 = 0; c0 < 256; c0 += 16) {
      const __m512i bits = _mm512_castps_si512(table_entries(x, cbt, g, m, p, c0));
      for (int b = 0; b < 4; ++b)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(t.plane[b] + offset + c0),
                         _mm512_cvtepi32_epi8(_mm512_srli_epi32(bits, 8 * b)));
    }
  }
}

// int16 tables of chunk q of activation row m: fp32 entries, the chunk's scale, then the int16 entries (rounded
// to nearest, as lrint) split into the two planes.
BLOCKOPS_TARGET_AVX512_VBMI void build_plane_chunk(const float* x, const float* cbt, const Geometry& g, int64_t m,
                                                   int64_t q, PlaneTables& t) {
  alignas(64) float entries[kPlaneChunk][256];
  __m512 largest = _mm512_setzero_ps(), poison = _mm512_setzero_ps();  // poison: NaN if an entry is NaN or inf
  for (int64_t i = 0; i < kPlaneChunk; ++i) {
    for (int64_t c0 = 0; c0 < 256; c0 += 16) {
      const __m512 e = table_entries(x, cbt, g, m, q * kPlaneChunk + i, c0);
      _mm512_store_ps(entries[i] + c0, e);
      largest = _mm512_max_ps(largest, _mm512_abs_ps(e));
      poison = _mm512_add_ps(poison, _mm512_mul_ps(e, _mm512_setzero_ps()));
    }
  }
  const float top = _mm512_reduce_max_ps(largest), bad = _mm512_reduce_add_ps(poison);
  const bool finite = bad == 0.f;
  // A NaN or infinite activation makes the whole chunk's scale NaN, so every output of its row is NaN (F.linear
  // would give NaN or +-inf there; the int16 entries cannot carry an infinity), never a finite wrong value.
  t.scale[m * (t.padded / kPlaneChunk) + q] = finite ? top / 32767.f : std::nanf("");
  const __m512 inv = _mm512_set1_ps(finite && top > 0.f ? 32767.f / top : 0.f);
  for (int64_t i = 0; i < kPlaneChunk; ++i) {
    const int64_t offset = (m * t.padded + q * kPlaneChunk + i) * 256;
    for (int64_t c0 = 0; c0 < 256; c0 += 16) {
      const __m256i words = _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_load_ps(entries[i] + c0), inv)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(t.plane[0] + offset + c0), _mm256_cvtepi16_epi8(words));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(t.plane[1] + offset + c0),
                       _mm256_cvtepi16_epi8(_mm256_srai_epi16(words, 8)));
    }
  }
}

// rows [r0, r0 + 16) x positions [p0, p0 + 64) of codes [out, P] into dst[p * 64 + r] (p, r relative), zeros for
// rows >= out and positions >= P; `largest` takes the bytewise maximum of the codes read (the range check rides
// on this pass). Four unpack stages transpose within each 128-bit lane; lane l of output register i then holds
// position 16 l + i of the 16 rows.
BLOCKOPS_TARGET_AVX512_VBMI inline void transpose_16x64(const uint8_t* codes, int64_t out, int64_t P, int64_t r0,
                                                        int64_t p0, uint8_t* dst, __m512i& largest) {
  const __mmask64 in_row = P - p0 >= 64 ? ~__mmask64{0} : (__mmask64{1} << (P - p0)) - 1;
  __m512i a[16], b[16];
  for (int i = 0; i < 16; ++i) {
    a[i] = r0 + i < out ? _mm512_maskz_loadu_epi8(in_row, codes + (r0 + i) * P + p0) : _mm512_setzero_si512();
    largest = _mm512_max_epu8(largest, a[i]);
  }
  for (int i = 0; i < 8; ++i) {
    b[2 * i] = _mm512_unpacklo_epi8(a[2 * i], a[2 * i + 1]);
    b[2 * i + 1] = _mm512_unpackhi_epi8(a[2 * i], a[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 2; ++j) {
      a[4 * i + 2 * j] = _mm512_unpacklo_epi16(b[4 * i + j], b[4 * i + j + 2]);
      a[4 * i + 2 * j + 1] = _mm512_unpackhi_epi16(b[4 * i + j], b[4 * i + j + 2]);
    }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j) {
      b[8 * i + 2 * j] = _mm512_unpacklo_epi32(a[8 * i + j], a[8 * i + j + 4]);
      b[8 * i + 2 * j + 1] = _mm512_unpackhi_epi32(a[8 * i + j], a[8 * i + j + 4]);
    }
  for (int j = 0; j < 8; ++j) {
    a[2 * j] = _mm512_unpacklo_epi64(b[j], b[j + 8]);
    a[2 * j + 1] = _mm512_unpackhi_epi64(b[j], b[j + 8]);
  }
  for (int i = 0; i < 16; ++i) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i * 64), _mm512_castsi512_si128(a[i]));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (16 + i) * 64), _mm512_extracti32x4_epi32(a[i], 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (32 + i) * 64), _mm512_extracti32x4_epi32(a[i], 2));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (48 + i) * 64), _mm512_extracti32x4_epi32(a[i], 3));
  }
}

// One plane's bytes for 64 codes (one position, 64 rows). Wide: k > 128, so the code's top bit (`top`) picks
// between two 128-entry permutes; otherwise one permute covers every code.
template <bool Wide>
BLOCKOPS_TARGET_AVX512_VBMI inline __m512i plane_bytes(const __m512i (&plane)[4], __m512i codes, __mmask64 top) {
  const __m512i low = _mm512_permutex2var_epi8(plane[0], codes, plane[1]);
  if constexpr (Wide) return _mm512_mask_blend_epi8(top, low, _mm512_permutex2var_epi8(plane[2], codes, plane[3]));
  return low;
}

// The int16 entries of 64 codes from the two planes of a table: the words of rows 16l + 0..7 in `first` and
// 16l + 8..15 in `second` (per 128-bit lane l).
template <bool Wide>
BLOCKOPS_TARGET_AVX512_VBMI inline void plane_lookup(const __m512i (&lo)[4], const __m512i (&hi)[4], __m512i codes,
                                                     __m512i& first, __m512i& second) {
  const __mmask64 top = _mm512_movepi8_mask(codes);  // code >= 128: the second half of the table
  const __m512i l = plane_bytes<Wide>(lo, codes, top), h = plane_bytes<Wide>(hi, codes, top);
  first = _mm512_unpacklo_epi8(l, h);
  second = _mm512_unpackhi_epi8(l, h);
}

struct PlaneArgs {
  const PlaneTables* t;
  const uint8_t* codes;  // [out, P]
  const float* scales;   // [out] fp32
  float* y;              // [rows, out] fp32
  Geometry g;
  int64_t rows;
};

// One block of kPlanePositions positions [p0, p0 + 64) of the tile of output rows [n0, n0 + 64 * G), every
// activation row: the tile's codes of the block transposed into tcodes ([group][64 positions][64 rows], 16 KB at
// G = 4), looked up, and each chunk's int32 sums scaled into sums [rows][G][4][16] (fp32, lane order; the caller
// zeroes it before the first block and unscrambles it after the last). `largest` takes the codes' maximum.
template <int G>
BLOCKOPS_TARGET_AVX512_VBMI inline void transpose_block(const PlaneArgs& a, int64_t n0, int64_t p0, uint8_t* tcodes,
                                                        __m512i& largest) {
  for (int grp = 0; grp < G; ++grp)
    for (int64_t r = 0; r < 64; r += 16)
      transpose_16x64(a.codes, a.g.out, a.g.positions(), n0 + grp * 64 + r, p0, tcodes + grp * 64 * 64 + r, largest);
}

template <int G, bool Wide>
BLOCKOPS_TARGET_AVX512_VBMI void plane_block(const PlaneArgs& a, int64_t n0, int64_t p0, uint8_t* tcodes, float* sums,
                                             __m512i& largest) {
  const int64_t padded = a.t->padded;
  transpose_block<G>(a, n0, p0, tcodes, largest);
  const __m512i ones = _mm512_set1_epi16(1);
  for (int64_t m = 0; m < a.rows; ++m) {
    const uint8_t* lo_m = a.t->plane[0] + m * padded * 256;
    const uint8_t* hi_m = a.t->plane[1] + m * padded * 256;
    float* sums_m = sums + m * G * 64;
    for (int64_t q0 = p0; q0 < p0 + kPlanePositions; q0 += kPlaneChunk) {
      __m512i acc[G][4];
      for (auto& v : acc)
        for (auto& u : v) u = _mm512_setzero_si512();
      for (int64_t p = q0; p < q0 + kPlaneChunk; p += 2) {
        __m512i words[G][2][2];  // [group][position p, p + 1][rows 16l + 0..7, 16l + 8..15]
        for (int pp = 0; pp < 2; ++pp) {
          const auto* lo = reinterpret_cast<const __m512i*>(lo_m + (p + pp) * 256);
          const auto* hi = reinterpret_cast<const __m512i*>(hi_m + (p + pp) * 256);
          __m512i lo_t[4], hi_t[4];
          for (int i = 0; i < (Wide ? 4 : 2); ++i) {
            lo_t[i] = _mm512_loadu_si512(lo + i);
            hi_t[i] = _mm512_loadu_si512(hi + i);
          }
          for (int grp = 0; grp < G; ++grp)
            plane_lookup<Wide>(lo_t, hi_t, _mm512_loadu_si512(tcodes + (grp * 64 + p + pp - p0) * 64),
                               words[grp][pp][0], words[grp][pp][1]);
        }
        for (int grp = 0; grp < G; ++grp)
          for (int half = 0; half < 2; ++half) {
            const __m512i first = words[grp][0][half], second = words[grp][1][half];
            acc[grp][2 * half] = _mm512_dpwssd_epi32(acc[grp][2 * half], _mm512_unpacklo_epi16(first, second), ones);
            acc[grp][2 * half + 1] =
                _mm512_dpwssd_epi32(acc[grp][2 * half + 1], _mm512_unpackhi_epi16(first, second), ones);
          }
      }
      const __m512 step = _mm512_set1_ps(a.t->scale[m * (padded / kPlaneChunk) + q0 / kPlaneChunk]);
      for (int grp = 0; grp < G; ++grp)
        for (int i = 0; i < 4; ++i) {
          float* s = sums_m + (grp * 4 + i) * 16;
          _mm512_storeu_ps(s, _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[grp][i]), step, _mm512_loadu_ps(s)));
        }
    }
  }
}

// plane_block for exact (fp32) tables: the four planes' bytes of each code interleave back into the fp32 entry,
// added per chunk in fp32 (a fresh partial sum per kPlaneChunk positions, then into `sums`).
template <int G, bool Wide>
BLOCKOPS_TARGET_AVX512_VBMI void exact_block(const PlaneArgs& a, int64_t n0, int64_t p0, uint8_t* tcodes, float* sums,
                                             __m512i& largest) {
  const int64_t padded = a.t->padded;
  transpose_block<G>(a, n0, p0, tcodes, largest);
  for (int64_t m = 0; m < a.rows; ++m) {
    float* sums_m = sums + m * G * 64;
    for (int64_t q0 = p0; q0 < p0 + kPlanePositions; q0 += kPlaneChunk) {
      __m512 acc[G][4];
      for (auto& v : acc)
        for (auto& u : v) u = _mm512_setzero_ps();
      for (int64_t p = q0; p < q0 + kPlaneChunk; ++p) {
        __m512i table[4][4];
        for (int b = 0; b < 4; ++b) {
          const auto* src = reinterpret_cast<const __m512i*>(a.t->plane[b] + (m * padded + p) * 256);
          for (int i = 0; i < (Wide ? 4 : 2); ++i) table[b][i] = _mm512_loadu_si512(src + i);
        }
        for (int grp = 0; grp < G; ++grp) {
          const __m512i codes = _mm512_loadu_si512(tcodes + (grp * 64 + p - p0) * 64);
          const __mmask64 top = _mm512_movepi8_mask(codes);
          const __m512i b0 = plane_bytes<Wide>(table[0], codes, top), b1 = plane_bytes<Wide>(table[1], codes, top);
          const __m512i b2 = plane_bytes<Wide>(table[2], codes, top), b3 = plane_bytes<Wide>(table[3], codes, top);
          const __m512i low_lo = _mm512_unpacklo_epi8(b0, b1), low_hi = _mm512_unpackhi_epi8(b0, b1);
          const __m512i high_lo = _mm512_unpacklo_epi8(b2, b3), high_hi = _mm512_unpackhi_epi8(b2, b3);
          // Same lane order as the int16 path: accumulator i holds rows 16l + 4i + j.
          acc[grp][0] = _mm512_add_ps(acc[grp][0], _mm512_castsi512_ps(_mm512_unpacklo_epi16(low_lo, high_lo)));
          acc[grp][1] = _mm512_add_ps(acc[grp][1], _mm512_castsi512_ps(_mm512_unpackhi_epi16(low_lo, high_lo)));
          acc[grp][2] = _mm512_add_ps(acc[grp][2], _mm512_castsi512_ps(_mm512_unpacklo_epi16(low_hi, high_hi)));
          acc[grp][3] = _mm512_add_ps(acc[grp][3], _mm512_castsi512_ps(_mm512_unpackhi_epi16(low_hi, high_hi)));
        }
      }
      for (int grp = 0; grp < G; ++grp)
        for (int i = 0; i < 4; ++i) {
          float* s = sums_m + (grp * 4 + i) * 16;
          _mm512_storeu_ps(s, _mm512_add_ps(_mm512_loadu_ps(s), acc[grp][i]));
        }
    }
  }
}

// The two block kernels as types, so that one dispatch (run_block) turns the run-time group count and table width
// into their template arguments.
struct ExactKernel {
  template <int G, bool Wide>
  BLOCKOPS_TARGET_AVX512_VBMI static void run(const PlaneArgs& a, int64_t n0, int64_t p0, uint8_t* tcodes,
                                              float* sums, __m512i& largest) {
    exact_block<G, Wide>(a, n0, p0, tcodes, sums, largest);
  }
};
struct Int16Kernel {
  template <int G, bool Wide>
  BLOCKOPS_TARGET_AVX512_VBMI static void run(const PlaneArgs& a, int64_t n0, int64_t p0, uint8_t* tcodes,
                                              float* sums, __m512i& largest) {
    plane_block<G, Wide>(a, n0, p0, tcodes, sums, largest);
  }
};

template <typename Kernel>
BLOCKOPS_TARGET_AVX512_VBMI void run_block(int64_t groups, bool wide, const PlaneArgs& a, int64_t n0, int64_t p0,
                                           uint8_t* tcodes, float* sums, __m512i& largest) {
  switch (groups * 2 + wide) {
    case 2: return Kernel::template run<1, false>(a, n0, p0, tcodes, sums, largest);
    case 3: return Kernel::template run<1, true>(a, n0, p0, tcodes, sums, largest);
    case 4: return Kernel::template run<2, false>(a, n0, p0, tcodes, sums, largest);
    case 5: return Kernel::template run<2, true>(a, n0, p0, tcodes, sums, largest);
    case 6: return Kernel::template run<3, false>(a, n0, p0, tcodes, sums, largest);
    case 7: return Kernel::template run<3, true>(a, n0, p0, tcodes, sums, largest);
    case 8: return Kernel::template run<4, false>(a, n0, p0, tcodes, sums, largest);
    default: return Kernel::template run<4, true>(a, n0, p0, tcodes, sums, largest);
  }
}

// Output rows of tiles [t0, t1) (kPlaneGroups * 64 rows each), every activation row: position blocks outermost,
// so that each thread reads every table once (a table serves all its tiles while it is in L1 / L2) instead of
// once per tile. Returns the largest code read.
BLOCKOPS_TARGET_AVX512_VBMI uint8_t plane_tiles(const PlaneArgs& a, int64_t t0, int64_t t1, uint8_t* tcodes,
                                                float* sums) {
  constexpr int64_t tile_rows = kPlaneGroups * 64;
  const int64_t out = a.g.out, sums_per_tile = a.rows * tile_rows;
  std::fill(sums, sums + (t1 - t0) * sums_per_tile, 0.f);
  __m512i largest = _mm512_setzero_si512();
  const bool wide = a.g.k > 128;
  for (int64_t p0 = 0; p0 < a.t->padded; p0 += kPlanePositions) {
    for (int64_t tile = t0; tile < t1; ++tile) {
      const int64_t n0 = tile * tile_rows, groups = std::min<int64_t>(kPlaneGroups, (out - n0 + 63) / 64);
      float* s = sums + (tile - t0) * sums_per_tile;
      if (a.t->exact) {
        run_block<ExactKernel>(groups, wide, a, n0, p0, tcodes, s, largest);
      } else {
        run_block<Int16Kernel>(groups, wide, a, n0, p0, tcodes, s, largest);
      }
    }
  }
  // Lane order -> rows: dword lane 4l + j of accumulator i holds row 16l + 4i + j of its 64-row group.
  for (int64_t tile = t0; tile < t1; ++tile) {
    const int64_t n0 = tile * tile_rows, groups = std::min<int64_t>(kPlaneGroups, (out - n0 + 63) / 64);
    for (int64_t m = 0; m < a.rows; ++m) {
      const float* s = sums + (tile - t0) * sums_per_tile + m * groups * 64;
      for (int64_t grp = 0; grp < groups; ++grp)
        for (int l = 0; l < 4; ++l)
          for (int i = 0; i < 4; ++i)
            for (int j = 0; j < 4; ++j) {
              const int64_t n = n0 + grp * 64 + 16 * l + 4 * i + j;
              if (n < out) a.y[m * out + n] = a.scales[n] * s[(grp * 4 + i) * 16 + 4 * l + j];
            }
    }
  }
  alignas(64) uint8_t bytes[64];
  _mm512_store_si512(bytes, largest);
  return *std::max_element(bytes, bytes + 64);
}

// y = x @ W_hat^T for rows activation rows. Returns the largest code in `codes`: the tables are 256 entries wide
// (zeros past k), so codes >= k read zeros, never out of bounds, and the caller reports them.
uint8_t plane_gemv(const float* x, const uint8_t* codes, const float* cb32, const float* scales, const Geometry& g,
                   int64_t rows, bool exact, float* y) {
  thread_local std::vector<uint8_t> planes;
  thread_local std::vector<float> steps;
  PlaneTables t;
  t.exact = exact;
  t.padded = (g.positions() + kPlanePositions - 1) / kPlanePositions * kPlanePositions;
  const int64_t plane_size = rows * t.padded * 256, num_planes = exact ? 4 : 2;
  uint8_t* base = scratch(planes, num_planes * plane_size);
  for (int64_t b = 0; b < 4; ++b) t.plane[b] = b < num_planes ? base + b * plane_size : nullptr;
  t.scale = scratch(steps, rows * (t.padded / kPlaneChunk));
  std::vector<float> cbt(static_cast<size_t>(g.K * g.d * g.k));  // [K][d][k]
  for (int64_t kk = 0; kk < g.K; ++kk)
    for (int64_t c = 0; c < g.k; ++c)
      for (int64_t u = 0; u < g.d; ++u) cbt[(kk * g.d + u) * g.k + c] = cb32[(kk * g.k + c) * g.d + u];
  const int64_t chunks = t.padded / kPlaneChunk;
  const int64_t chunk_work = kPlaneChunk * g.k * g.d;
  at::parallel_for(0, rows * chunks, std::max<int64_t>(1, kBuildGrain / chunk_work), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      if (exact) {
        build_exact_chunk(x, cbt.data(), g, i / chunks, i % chunks, t);
      } else {
        build_plane_chunk(x, cbt.data(), g, i / chunks, i % chunks, t);
      }
    }
  });
  const PlaneArgs a{&t, codes, scales, y, g, rows};
  constexpr int64_t tile_rows = kPlaneGroups * 64;
  const int64_t tiles = (g.out + tile_rows - 1) / tile_rows;
  std::atomic<uint8_t> largest{0};
  // Contiguous ranges of tiles, one per thread (each thread sweeps the tables once over its own range).
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    thread_local std::vector<uint8_t> tile_codes;
    thread_local std::vector<float> tile_sums;
    uint8_t* tcodes = scratch(tile_codes, kPlaneGroups * 64 * 64);
    float* sums = scratch(tile_sums, (t1 - t0) * rows * tile_rows);
    const uint8_t mine = plane_tiles(a, t0, t1, tcodes, sums);
    for (uint8_t seen = largest.load(); mine > seen && !largest.compare_exchange_weak(seen, mine);) {
    }
    release_if_large(tile_sums);
  });
  release_if_large(planes);
  return largest.load();
}
#pragma GCC diagnostic pop
#endif

// The byte-plane kernel's domain: uint8 codes (k <= 256), half-precision activations, an AVX-512 VBMI CPU;
// up to kSmallBatchRows rows where a table beats the direct kernel (use_lookup_table), and up to kPlaneMaxRows
// for layers of at least one whole tile, where the alternative is dequantizing W_hat for a GEMM (a lookup costs
// about 0.05 ns per code and row on this kernel, so 32 rows of 4096 x 11008 still beat the dequantize alone).
constexpr int64_t kPlaneMaxRows = 32;

bool use_byte_planes(const Weights& w, const at::Tensor& x, int64_t rows) {
#if BLOCKOPS_X86_DISPATCH
  if (w.type != CodeType::kU8 || !cpu_has_avx512_vbmi()) return false;
  if (rows <= kSmallBatchRows) return use_lookup_table(w.g, rows);
  // fp32 activations (exact tables, four planes) only up to kSmallBatchRows: their tables are twice the size.
  return x.scalar_type() != at::kFloat && rows <= kPlaneMaxRows && w.g.out >= kPlaneGroups * 64;
#else
  (void)w, (void)x, (void)rows;
  return false;
#endif
}

// ---------------------------------------------------------------------------------------------------------
// Small batches: direct dequantize-dot
// ---------------------------------------------------------------------------------------------------------

void direct_gemv(bool avx2, const float* x, const void* codes, CodeType type, const float* cb, const float* scales,
                 const Geometry& g, int64_t rows, float* y) {
  at::parallel_for(0, g.out, 16, [&](int64_t b, int64_t e) {
    std::vector<float> w(g.in());
    for (int64_t n = b; n < e; ++n) {
      dequant_rows(codes, type, cb, g, scales, n, n + 1, w.data());
      for (int64_t m = 0; m < rows; ++m) y[m * g.out + n] = dot(avx2, x + m * g.in(), w.data(), g.in());
    }
  });
}

// Blocks of W_hat [nb, in] fp32 (at most kBlockBytes, at least 64 rows) in turn, handed to fn(n0, nb, block).
template <typename Fn>
void for_each_block(const void* codes, CodeType type, const float* cb, const float* scales, const Geometry& g,
                    Fn&& fn) {
  const int64_t row_bytes = static_cast<int64_t>(sizeof(float)) * std::max<int64_t>(1, g.in());
  const int64_t block_rows = std::min(g.out, std::max<int64_t>(64, kBlockBytes / row_bytes));
  at::Tensor block = at::empty({block_rows, g.in()}, at::TensorOptions().dtype(at::kFloat));
  for (int64_t n0 = 0; n0 < g.out; n0 += block_rows) {
    const int64_t nb = std::min(block_rows, g.out - n0);
    dequant_rows_parallel(codes, type, cb, g, scales, n0, n0 + nb, block.mutable_data_ptr<float>());
    fn(n0, nb, block.narrow(0, 0, nb));
  }
}

// ---------------------------------------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------------------------------------

at::Tensor vq_linear_cpu(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& codebooks,
                         const c10::optional<at::Tensor>& scales, const c10::optional<at::Tensor>& bias) {
  const Weights w = check_weights(kLinear, codes, codebooks, scales);
  const Geometry& g = w.g;
  check_activation(kLinear, "x", x, g.in(), codes);
  check_bias(bias, g.out, kLinear, codes, "codes");
  std::vector<int64_t> out_sizes = x.sizes().vec();
  out_sizes.back() = g.out;
  const int64_t rows = g.in() > 0 ? x.numel() / g.in() : 0;
  const bool planes = rows > 0 && g.out > 0 && use_byte_planes(w, x, rows);
  if (!planes) check_code_range(kLinear, codes, w);  // the byte-plane kernel checks on its own pass over the codes
  linear_counter.hit();
  if (rows == 0 || g.out == 0) return at::zeros(out_sizes, x.options());
  const bool avx2 = cpu_has_avx2_fma();
  const at::Tensor x32 = contiguous_fp32(x).reshape({rows, g.in()});
  const at::Tensor cb32 = contiguous_fp32(codebooks);
  const std::vector<float> s = scale_vector(scales, g.out);
  at::Tensor y32 = at::empty({rows, g.out}, x32.options());
  if (planes) {
#if BLOCKOPS_X86_DISPATCH
    byte_planes_counter.hit();
    const uint8_t largest = plane_gemv(x32.const_data_ptr<float>(), static_cast<const uint8_t*>(codes.const_data_ptr()),
                                       cb32.const_data_ptr<float>(), s.data(), g, rows, x.scalar_type() == at::kFloat,
                                       y32.mutable_data_ptr<float>());
    if (largest >= g.k) check_code_range(kLinear, codes, w);  // raises, naming the first code out of range
#endif
  } else if (rows <= kSmallBatchRows && use_lookup_table(g, rows)) {
    lut_gemv(avx2, x32.const_data_ptr<float>(), codes.const_data_ptr(), w.type, cb32.const_data_ptr<float>(), s.data(),
             g, rows, y32.mutable_data_ptr<float>());
  } else if (rows <= kSmallBatchRows) {
    direct_gemv(avx2, x32.const_data_ptr<float>(), codes.const_data_ptr(), w.type, cb32.const_data_ptr<float>(),
                s.data(), g, rows, y32.mutable_data_ptr<float>());
  } else {
    // bf16 activations multiply in bf16 (W_hat rounded to bf16, fp32 accumulation inside the GEMM), as
    // F.linear does with bf16 weights: the CPU's bf16 GEMM runs about twice as fast as the fp32 one.
    const bool bf16_gemm = x.scalar_type() == at::kBFloat16;
    const at::Tensor xg = bf16_gemm ? x.reshape({rows, g.in()}).contiguous() : x32;
    for_each_block(codes.const_data_ptr(), w.type, cb32.const_data_ptr<float>(), s.data(), g,
                   [&](int64_t n0, int64_t nb, const at::Tensor& blk) {
                     const at::Tensor product = at::mm(xg, (bf16_gemm ? blk.to(at::kBFloat16) : blk).t());
                     if (nb == g.out && !bf16_gemm) {
                       y32 = product;   // one block: no copy into a column slice
                     } else {
                       y32.narrow(1, n0, nb).copy_(product);
                     }
                   });
  }
  if (bias.has_value()) y32.add_(contiguous_fp32(*bias));
  return y32.to(x.scalar_type()).view(out_sizes);
}

at::Tensor vq_dequantize_cpu(const at::Tensor& codes, const at::Tensor& codebooks,
                             const c10::optional<at::Tensor>& scales) {
  const Weights w = check_weights(kDequant, codes, codebooks, scales);
  check_code_range(kDequant, codes, w);
  dequant_counter.hit();
  at::Tensor out = at::empty({w.g.out, w.g.in()}, codebooks.options().dtype(at::kFloat));
  if (out.numel() == 0) return out.to(codebooks.scalar_type());
  const at::Tensor cb32 = contiguous_fp32(codebooks);
  const std::vector<float> s = scale_vector(scales, w.g.out);
  dequant_rows_parallel(codes.const_data_ptr(), w.type, cb32.const_data_ptr<float>(), w.g, s.data(), 0, w.g.out,
                        out.mutable_data_ptr<float>());
  return out.to(codebooks.scalar_type());
}

at::Tensor vq_linear_grad_input_cpu(const at::Tensor& grad_out, const at::Tensor& codes, const at::Tensor& codebooks,
                                    const c10::optional<at::Tensor>& scales) {
  const Weights w = check_weights(kGradInput, codes, codebooks, scales);
  const Geometry& g = w.g;
  check_activation(kGradInput, "grad_out", grad_out, g.out, codes);
  check_code_range(kGradInput, codes, w);
  std::vector<int64_t> out_sizes = grad_out.sizes().vec();
  out_sizes.back() = g.in();
  const int64_t rows = g.out > 0 ? grad_out.numel() / g.out : 0;
  grad_input_counter.hit();
  if (rows == 0 || g.in() == 0) return at::zeros(out_sizes, grad_out.options());
  const at::Tensor gy = contiguous_fp32(grad_out).reshape({rows, g.out});
  const at::Tensor cb32 = contiguous_fp32(codebooks);
  const std::vector<float> s = scale_vector(scales, g.out);
  at::Tensor gx = at::zeros({rows, g.in()}, gy.options());
  for_each_block(codes.const_data_ptr(), w.type, cb32.const_data_ptr<float>(), s.data(), g,
                 [&](int64_t n0, int64_t nb, const at::Tensor& blk) { gx.addmm_(gy.narrow(1, n0, nb), blk); });
  return gx.to(grad_out.scalar_type()).view(out_sizes);
}

at::Tensor vq_grad_codebooks_cpu(const at::Tensor& t, const at::Tensor& codes, const at::Tensor& codebooks,
                                 const c10::optional<at::Tensor>& scales) {
  const Weights w = check_weights(kGradCodebooks, codes, codebooks, scales);
  const Geometry& g = w.g;
  check_t(kGradCodebooks, t, g, codes);
  check_code_range(kGradCodebooks, codes, w);
  grad_codebooks_counter.hit();
  at::Tensor grad = at::zeros({g.K, g.k, g.d}, t.options());
  if (g.out == 0 || g.groups == 0) return grad;
  const std::vector<float> s = scale_vector(scales, g.out);
  const float* tp = t.const_data_ptr<float>();
  float* gp = grad.mutable_data_ptr<float>();
  const void* cp = codes.const_data_ptr();
  const int64_t P = g.positions();
  // Each task owns codewords [c0, c1) of every codebook and walks all codes in (n, j) order.
  at::parallel_for(0, g.k, std::max<int64_t>(16, g.k / (4 * at::get_num_threads())), [&](int64_t c0, int64_t c1) {
    for (int64_t n = 0; n < g.out; ++n) {
      const float sn = s[n];
      const float* trow = tp + n * g.in();
      for (int64_t p = 0; p < P; ++p) {
        const int64_t c = read_code(cp, w.type, n * P + p);
        if (c < c0 || c >= c1) continue;
        float* dst = gp + ((p % g.K) * g.k + c) * g.d;
        const float* src = trow + (p / g.K) * g.d;
        for (int64_t i = 0; i < g.d; ++i) dst[i] += sn * src[i];
      }
    }
  });
  return grad;
}

at::Tensor vq_grad_scales_cpu(const at::Tensor& t, const at::Tensor& codes, const at::Tensor& codebooks) {
  const Weights w = check_weights(kGradScales, codes, codebooks, c10::nullopt);
  const Geometry& g = w.g;
  check_t(kGradScales, t, g, codes);
  check_code_range(kGradScales, codes, w);
  grad_scales_counter.hit();
  at::Tensor grad = at::empty({g.out}, t.options());
  if (g.out == 0) return grad;
  const bool avx2 = cpu_has_avx2_fma();
  const at::Tensor cb32 = contiguous_fp32(codebooks);
  const std::vector<float> ones(g.out, 1.0f);
  const float* tp = t.const_data_ptr<float>();
  float* gp = grad.mutable_data_ptr<float>();
  at::parallel_for(0, g.out, 16, [&](int64_t b, int64_t e) {
    std::vector<float> row(g.in());
    for (int64_t n = b; n < e; ++n) {
      dequant_rows(codes.const_data_ptr(), w.type, cb32.const_data_ptr<float>(), g, ones.data(), n, n + 1, row.data());
      gp[n] = dot(avx2, row.data(), tp + n * g.in(), g.in());
    }
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(blockops, CPU, m) {
  m.impl("vq_linear", &vq_linear_cpu);
  m.impl("vq_dequantize", &vq_dequantize_cpu);
  m.impl("vq_linear_grad_input", &vq_linear_grad_input_cpu);
  m.impl("vq_grad_codebooks", &vq_grad_codebooks_cpu);
  m.impl("vq_grad_scales", &vq_grad_scales_cpu);
}

}  // namespace blockops::vq
