// Vector-quantized GEMM on the CPU, small batches: the lookup-table GEMV (vq_cpu.h; the rule that picks it is vq.h's
// use_lookup_table). Any code dtype and k, fp32 tables built once per call, AVX2 or portable copies of the loops.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstring>
#include <memory>
#include <vector>

#include "cpu_common.h"
#include "vq_cpu.h"

namespace blockops::vq {
namespace {

constexpr int64_t kChunkBytes = 16 << 10;  // tables gathered from per chunk: half of Zen 4's 32 KB L1
constexpr int64_t kTileBytes = 4 << 20;    // staged codes of one tile (L3). Every tile reads all the tables,
                                           // which reach MBs with long rows and several activation rows
                                           // (11 MB at 11008 x 4096, 4 rows), so few large tiles beat tiles
                                           // sized for L2 (measured, one thread: 512 KB 30 ms, 4 MB 13.6 ms)
constexpr int64_t kTilesPerThread = 2;     // table-kernel tiles per thread, for balance on a shared CPU (one per
                                           // thread was no faster even with 3.5 MB of tables, 14336 inputs)

// Tables: lut[p][c][m] = x[m, j*d:(j+1)*d] . codebooks[p % K][c] for position p = j*K + (p % K), codeword c and
// activation row m < RP, the rows padded with zeros to RP in {1, 2, 4, 8}. The RP sums of one codeword sit side by
// side, so one vector load fetches what one code contributes to every activation row: a gather costs about the
// same at batch 8 as at batch 1. In memory, [padded][k][RP]: position-major, so that with k a compile-time
// constant (64 or 256, uint8 codes) code i of a word of 8 positions is looked up as one load of the code and one
// add from base + i * k * RP * 4 (a constant displacement) + code * RP * 4: 2 instructions per code for RP <= 2
// (the scale of x86 addressing stops at 8 bytes; RP = 4 and 8 add a shift). Positions are padded with zero tables
// to whole words of 8.
//
// Gathers, per tile of output rows (staged codes within kTileBytes; the threads take tiles in turn, lut_gemv):
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

static_assert(kCpuSmallBatchRows <= 8, "the tables hold at most 8 activation rows side by side");

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

// Tables of one position p into its slot of the word-interleaved layout (see build_tables): RP = 1, unit-stride over
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

// The tables of words [w0, w1): positions w * W .. w * W + W - 1, W per word of codes.
template <int D, int RP>
__attribute__((always_inline)) inline void build_words(const float* x, const float* cb, const float* cbt,
                                                       const Geometry& g, int64_t rows, int64_t per_word, int64_t w0,
                                                       int64_t w1, float* lut) {
  for (int64_t p = w0 * per_word; p < w1 * per_word; ++p) build_position<D, RP>(x, cb, cbt, g, rows, p, RP, lut + p * g.k * RP);
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

struct GatherArgs {
  const float* lut;     // [padded][k][rp], see build_tables
  const void* codes;    // [out, P]
  const float* scales;  // [out] fp32
  float* y;             // [rows, out] fp32
  Geometry g;
  TablePlan t;
  int64_t rows;
};

// acc[r][0:RP] += sum over the chunk's positions i of table(i, codes[r][i]) for R rows at once (the staged codes of
// row r at codes + r * len). R rows of kSums sums each are independent chains, so that the adds pipeline; the
// per-row overhead (zeroing, reducing the sums, updating acc) is paid once per chunk. kK: k when it is a
// compile-time constant (64, 256), else 0 and `table` (k * RP floats per position) is read at run time.
template <typename CodeT, int RP, int R, int kK>
__attribute__((always_inline)) inline void gather_rows(const CodeT* codes, int64_t len, const float* lut,
                                                       int64_t table_runtime, float* acc) {
  using V = typename Lanes<RP>::type;
  constexpr int kPerWord = 8;                        // positions per step: padded is a multiple of 8
  // Two sums per row whatever R, so that a row's sum order does not depend on whether it was gathered with 3 others
  // or alone (the rows past a tile's last group of 4: tiles, and so those rows, depend on the thread count; with 8
  // sums for a lone row the result did, on the AVX2 path).
  constexpr int kSums = 2;
  const int64_t table = kK > 0 ? int64_t{kK} * RP : table_runtime;
  V s[R][kSums] = {};
  // `tables` advances as a pointer of its own, so that each lookup's address is one register plus the code times
  // RP * 4 plus a constant displacement: folded into the add's memory operand.
  const float* tables = lut;
  for (int64_t i0 = 0; i0 < len; i0 += kPerWord, tables += kPerWord * table) {
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const CodeT* c = codes + r * len + i0;
#pragma GCC unroll 8
      for (int i = 0; i < kPerWord; ++i) {
        s[r][i % kSums] += load_lanes<RP>(tables + i * table + static_cast<int64_t>(c[i]) * RP);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    V sum = s[r][0];
    for (int i = 1; i < kSums; ++i) sum += s[r][i];
    store_lanes<RP>(acc + r * RP, load_lanes<RP>(acc + r * RP) + sum);
  }
}

// Staging when every chunk is whole (P a multiple of the chunk, so padded == P): each (row, chunk) segment is a
// fixed-size block of kBytes = chunk * sizeof(code) bytes (8 to 128), copied in 16-byte vectors (8-byte words for
// kBytes = 8) and ORed into `seen`. Rows go in groups that fill a 64-byte line of the staged tile (kGroup rows of a
// chunk sit side by side there), so that every staged line is written whole at once: row by row, the stores of one
// row land tile * kBytes bytes apart -- a power of two at some shapes, all in one L1 / L2 set -- and each line was
// fetched again for every row it holds. The general loop below also pays a word-by-word tail check per segment:
// with 16-code segments (k = 256, one activation row) it took 56% of the kernel's instructions (callgrind, AVX2
// path).
using Vec16 = uint64_t __attribute__((vector_size(16)));

template <int kBytes, int kRowsAtOnce>
__attribute__((always_inline)) inline void stage_rows(const char* src, int64_t row_bytes, int64_t rows, char* dst,
                                                      Vec16& seen16, uint64_t& seen8) {
  const int64_t chunks = row_bytes / kBytes;
  for (int64_t q = 0; q < chunks; ++q) {
    for (int r = 0; r < kRowsAtOnce; ++r) {
      const char* from = src + r * row_bytes + q * kBytes;
      char* to = dst + (q * rows + r) * kBytes;
      if constexpr (kBytes == 8) {
        uint64_t w;
        std::memcpy(&w, from, 8);
        std::memcpy(to, &w, 8);
        seen8 |= w;
      } else {
#pragma GCC unroll 8
        for (int i = 0; i < kBytes; i += 16) {
          Vec16 v;
          std::memcpy(&v, from + i, 16);
          std::memcpy(to + i, &v, 16);
          seen16 |= v;
        }
      }
    }
  }
}

template <int kBytes>
__attribute__((always_inline)) inline uint64_t stage_whole_chunks(const char* src, int64_t row_bytes, int64_t rows,
                                                                  char* staged) {
  constexpr int kGroup = kBytes >= 64 ? 1 : 64 / kBytes;
  Vec16 seen16 = {};
  uint64_t seen8 = 0;
  int64_t r = 0;
  for (; r + kGroup <= rows; r += kGroup) {
    stage_rows<kBytes, kGroup>(src + r * row_bytes, row_bytes, rows, staged + r * kBytes, seen16, seen8);
  }
  for (; r < rows; ++r) stage_rows<kBytes, 1>(src + r * row_bytes, row_bytes, rows, staged + r * kBytes, seen16, seen8);
  return seen8 | seen16[0] | seen16[1];
}

// Stages the codes of rows [n0, n0 + rows): staged[q * chunk * rows + r * len_q + i] = codes[n0 + r, q * chunk + i]
// for chunk q of len_q positions, zero past P. The tile's codes are read in order (one sequential stream) and each
// chunk's codes come out contiguous. Returns the OR of every staged 64-bit word (lut_gemv's deferred code-range
// check).
template <typename CodeT>
__attribute__((always_inline)) inline uint64_t stage_tile(const CodeT* codes, int64_t P, int64_t chunk, int64_t padded,
                                                          int64_t n0, int64_t rows, CodeT* staged) {
  constexpr int kPerWord = 8 / sizeof(CodeT);  // codes per 64-bit word
  if (P % chunk == 0) {  // every chunk whole (and padded == P)
    const char* src = reinterpret_cast<const char*>(codes + n0 * P);
    const int64_t row_bytes = P * static_cast<int64_t>(sizeof(CodeT));
    char* dst = reinterpret_cast<char*>(staged);
    switch (chunk * static_cast<int64_t>(sizeof(CodeT))) {
      case 8: return stage_whole_chunks<8>(src, row_bytes, rows, dst);
      case 16: return stage_whole_chunks<16>(src, row_bytes, rows, dst);
      case 32: return stage_whole_chunks<32>(src, row_bytes, rows, dst);
      case 64: return stage_whole_chunks<64>(src, row_bytes, rows, dst);
      case 128: return stage_whole_chunks<128>(src, row_bytes, rows, dst);
      default: break;  // not reached: chunk is a power of two in [8, 64] (plan_tables)
    }
  }
  uint64_t seen = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const CodeT* src = codes + (n0 + r) * P;
    for (int64_t q0 = 0; q0 < padded; q0 += chunk) {
      const int64_t len = std::min(chunk, padded - q0);
      CodeT* dst = staged + q0 * rows + r * len;
      for (int64_t i0 = 0; i0 < len; i0 += kPerWord) {
        uint64_t word = 0;
        if (q0 + i0 + kPerWord <= P) {
          std::memcpy(&word, src + q0 + i0, sizeof word);
        } else {
          CodeT part[kPerWord] = {};
          for (int i = 0; q0 + i0 + i < P; ++i) part[i] = src[q0 + i0 + i];
          std::memcpy(&word, part, sizeof word);
        }
        std::memcpy(dst + i0, &word, sizeof word);
        seen |= word;
      }
    }
  }
  return seen;
}

// One tile of output rows [n0, n1) of a task ending at n_end: stage its codes, gather every chunk's tables into
// acc [row][RP], then write y = scale * acc.
template <typename CodeT, int RP, int kK>
__attribute__((always_inline)) inline uint64_t gather_tile(const GatherArgs& a, int64_t n0, int64_t n1, int64_t n_end,
                                                           CodeT* staged, float* acc) {
  constexpr int kRowsAtOnce = 4;                     // output rows gathered together
  const int64_t P = a.g.positions(), k = a.g.k, rows = n1 - n0;
  const int64_t chunk = a.t.chunk, padded = a.t.padded, table = k * RP;
  const CodeT* codes = static_cast<const CodeT*>(a.codes);
  const uint64_t seen = stage_tile(codes, P, chunk, padded, n0, rows, staged);
  std::fill(acc, acc + rows * RP, 0.f);
  const char* next = reinterpret_cast<const char*>(codes + n1 * P);
  const int64_t next_bytes = std::min(rows, n_end - n1) * P * static_cast<int64_t>(sizeof(CodeT));
  for (int64_t q0 = 0; q0 < padded; q0 += chunk) {
    const int64_t len = std::min(chunk, padded - q0);
    const float* lut = a.lut + q0 * table;
    const CodeT* code_rows = staged + q0 * rows;
    // The next chunk's tables, fetched into L2 a few lines per group of rows while this chunk's are gathered from:
    // with tables beyond L2 (k = 256, one row: 2.7 MB at 11008 inputs, 3.5 MB at 14336) each tile otherwise waits
    // on L3 for every chunk's 16 KB (AVX2 path, 14336 in x 4096 out, two threads: 4.8 -> 3.1-3.4 ms).
    const char* next_lut = reinterpret_cast<const char*>(lut + len * table);
    const int64_t next_lut_lines = std::min(chunk, std::max<int64_t>(0, padded - q0 - len)) * table *
                                   static_cast<int64_t>(sizeof(float)) / 64;
    const int64_t lines_per_group = (next_lut_lines + rows / kRowsAtOnce - 1) / std::max<int64_t>(1, rows / kRowsAtOnce);
    int64_t r = 0;
    for (int64_t line = 0; r + kRowsAtOnce <= rows; r += kRowsAtOnce) {
      // Sweep the next tile's codes into the cache at the pace this tile's staged codes are read, so that
      // staging it finds them there instead of waiting on DRAM.
      const int64_t ahead = (q0 * rows + r * len) * static_cast<int64_t>(sizeof(CodeT));
      if (ahead < next_bytes) __builtin_prefetch(next + ahead);
      for (const int64_t stop = std::min(next_lut_lines, line + lines_per_group); line < stop; ++line) {
        __builtin_prefetch(next_lut + line * 64, 0, 2);
      }
      gather_rows<CodeT, RP, kRowsAtOnce, kK>(code_rows + r * len, len, lut, table, acc + r * RP);
    }
    for (; r < rows; ++r) gather_rows<CodeT, RP, 1, kK>(code_rows + r * len, len, lut, table, acc + r * RP);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t n = n0 + r;
    for (int64_t m = 0; m < a.rows; ++m) a.y[m * a.g.out + n] = a.scales[n] * acc[r * RP + m];
  }
  return seen;
}

template <typename CodeT, int RP, int kK>
uint64_t gather_portable(const GatherArgs& a, int64_t n0, int64_t n1, int64_t n_end, void* staged, float* acc) {
  return gather_tile<CodeT, RP, kK>(a, n0, n1, n_end, static_cast<CodeT*>(staged), acc);
}
#if BLOCKOPS_X86_DISPATCH
template <typename CodeT, int RP, int kK>
BLOCKOPS_TARGET_AVX2 uint64_t gather_avx2(const GatherArgs& a, int64_t n0, int64_t n1, int64_t n_end, void* staged,
                                          float* acc) {
  return gather_tile<CodeT, RP, kK>(a, n0, n1, n_end, static_cast<CodeT*>(staged), acc);
}
#endif

using GatherFn = uint64_t (*)(const GatherArgs&, int64_t, int64_t, int64_t, void*, float*);

template <typename CodeT, int RP, int kK>
GatherFn pick_gather_isa(bool avx2) {
#if BLOCKOPS_X86_DISPATCH
  if (avx2) return &gather_avx2<CodeT, RP, kK>;
#endif
  return &gather_portable<CodeT, RP, kK>;
}

template <typename CodeT, int kK>
GatherFn pick_gather_rp(bool avx2, int64_t rp) {
  switch (rp) {
    case 1: return pick_gather_isa<CodeT, 1, kK>(avx2);
    case 2: return pick_gather_isa<CodeT, 2, kK>(avx2);
    case 4: return pick_gather_isa<CodeT, 4, kK>(avx2);
    default: return pick_gather_isa<CodeT, 8, kK>(avx2);
  }
}

// The gather for the code type and k: the common codebook sizes of uint8 codes (AQLM / VQ4DiT 256, 3-bit VQ 64)
// get the constant-k loops, the rest read k at run time.
GatherFn pick_gather(bool avx2, CodeType type, int64_t k, int64_t rp) {
  if (type != CodeType::kU8) return pick_gather_rp<uint16_t, 0>(avx2, rp);
  if (k == 256) return pick_gather_rp<uint8_t, 256>(avx2, rp);
  if (k == 64) return pick_gather_rp<uint8_t, 64>(avx2, rp);
  return pick_gather_rp<uint8_t, 0>(avx2, rp);
}

}  // namespace

std::vector<float> transposed_codebooks(const float* cb32, const Geometry& g, int64_t width) {
  std::vector<float> cbt(static_cast<size_t>(g.K * g.d * width), 0.f);
  for (int64_t kk = 0; kk < g.K; ++kk)
    for (int64_t c = 0; c < g.k; ++c)
      for (int64_t u = 0; u < g.d; ++u) cbt[(kk * g.d + u) * width + c] = cb32[(kk * g.k + c) * g.d + u];
  return cbt;
}

uint32_t lut_gemv(bool avx2, const float* x, const void* codes, CodeType type, const float* cb32, const float* scales,
                  const Geometry& g, int64_t rows, float* y) {
  const int64_t code_bytes = type == CodeType::kU8 ? 1 : 2;
  const TablePlan t = plan_tables(g, rows, code_bytes);
  // [padded][k][rp] (see build_tables), then, for uint8 codes, zeros up to where code 255 of the last position
  // would read: codes are range-checked after the gathers (lut_gemv's contract in vq_cpu.h).
  const int64_t tables = t.padded * g.k * t.rp;
  const int64_t guard = type == CodeType::kU8 ? std::max<int64_t>(0, 256 - g.k) * t.rp : 0;
  at::Tensor lut = at::empty({tables + guard}, at::TensorOptions().dtype(at::kFloat));
  std::fill(lut.mutable_data_ptr<float>() + tables, lut.mutable_data_ptr<float>() + tables + guard, 0.f);
  // The single-row build reads the codebooks transposed to [K][d][k].
  const std::vector<float> cbt = t.rp == 1 ? transposed_codebooks(cb32, g, g.k) : std::vector<float>();
  const BuildFn build = pick_build(avx2, g.d, t.rp);
  const int64_t per_word = 8 / code_bytes, words = t.padded / per_word;
  // Words of tables per hand-out: about kBuildGrain / 16 multiply-adds (some 20 us), so that the threads share it.
  const int64_t words_per_task =
      std::max<int64_t>(1, kBuildGrain / 16 / std::max<int64_t>(1, per_word * g.k * g.d * rows));
  const GatherArgs a{lut.const_data_ptr<float>(), codes, scales, y, g, t, rows};
  const GatherFn gather = pick_gather(avx2, type, g.k, t.rp);
  // Tiles handed out in order from a shared counter rather than one fixed range per thread: on a shared CPU a
  // descheduled thread leaves its tiles to the others instead of making them wait at the end. kTilesPerThread
  // tiles per thread, so that there is something to hand over; each tile reads the whole table.
  const int64_t threads = at::get_num_threads();
  // Equal tiles, a whole number per thread, within t.tile rows; a multiple of 4 rows (gathered 4 at a time) but not
  // of 256: then a chunk's staged block (tile x 16 codes at k = 256) is a multiple of 4 KB, and a row's codes of
  // consecutive chunks all fall in one L1 set (2-bit 4096 x 4096, 1024-row tiles: 0.65-0.67 ms, 1028: 0.51-0.59).
  int64_t tiles = std::max(kTilesPerThread * threads, (g.out + t.tile - 1) / t.tile);
  tiles = (tiles + threads - 1) / threads * threads;
  int64_t tile = std::max<int64_t>(64, ((g.out + tiles - 1) / tiles + 3) / 4 * 4);
  if (tile % 256 == 0) tile += 4;
  std::atomic<int64_t> next_word{0}, built{0}, next_tile{0};
  std::atomic<uint64_t> seen{0};
  // One region: the tables' words first (every thread), then, once all are built, the tiles. Built in a region of
  // its own or on the calling thread, the other thread waited through it (perf, AVX2 path, 2-bit 4096 x 11008,
  // one row: the worker idle 12% of the call).
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t w0 = next_word.fetch_add(words_per_task); w0 < words; w0 = next_word.fetch_add(words_per_task)) {
      const int64_t w1 = std::min(words, w0 + words_per_task);
      build(x, cb32, cbt.data(), g, rows, per_word, w0, w1, lut.mutable_data_ptr<float>());
      built += w1 - w0;
    }
    spin_until_at_least(built, words);
    // Not zero-filled: staging writes every byte before it is read.
    const auto staged = std::make_unique_for_overwrite<uint8_t[]>(static_cast<size_t>(tile * t.padded * code_bytes));
    std::vector<float> acc(static_cast<size_t>(tile * t.rp));
    uint64_t mine = 0;
    for (int64_t n0 = next_tile.fetch_add(tile); n0 < g.out; n0 = next_tile.fetch_add(tile)) {
      mine |= gather(a, n0, std::min(g.out, n0 + tile), g.out, staged.get(), acc.data());
    }
    seen.fetch_or(mine);
  });
  // Fold the OR of 64-bit words down to one code's width.
  uint64_t folded = seen.load();
  for (int64_t bits = 32; bits >= 8 * code_bytes; bits /= 2) folded |= folded >> bits;
  return static_cast<uint32_t>(folded & (code_bytes == 1 ? 0xFFu : 0xFFFFu));
}

#pragma GCC diagnostic pop

}  // namespace blockops::vq
