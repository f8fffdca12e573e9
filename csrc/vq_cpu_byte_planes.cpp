// Vector-quantized GEMM on the CPU, small batches of uint8 codes: the lookup tables in byte planes, looked up many
// output rows at a time by register permutes (vq_cpu.h): on AVX-512 VBMI CPUs 64 rows per vpermi2b, any k <= 256
// (sketch below); on AVX2 CPUs 32 rows per vpshufb from 16-entry sub-tables, k <= 64 (sketch at the AVX2 section).
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu_common.h"
#include "cpu_features.h"
#include "macros.h"
#include "vq_cpu.h"

#if BLOCKOPS_X86_DISPATCH
#include <immintrin.h>
#endif

namespace blockops::vq {
namespace {

// The lookup-table kernel (vq_cpu_lut.cpp) gathers one table entry per code with scalar loads: about one code per
// cycle, and its tables leave L1 for long rows. Here the vector lanes are 64 output rows at one position instead, so
// that one table serves every lane and the lookup is a register permute:
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
  uint8_t* plane[4];  // [rows][padded][256] each (AVX2: [rows][padded][64]): the int16 entries' low and high bytes
                      // (planes 0, 1), or the fp32 entries' four bytes, least significant first (exact tables, fp32
                      // activations; VBMI only)
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


// The byte-plane kernel's domain: uint8 codes (k <= 256), half-precision activations, an AVX-512 VBMI CPU;
// up to kCpuSmallBatchRows rows where a table beats the direct kernel (use_lookup_table), and up to kPlaneMaxRows
// for layers of at least one whole tile, where the alternative is dequantizing W_hat for a GEMM (a lookup costs
// about 0.05 ns per code and row on this kernel, so 32 rows of 4096 x 11008 still beat the dequantize alone).
constexpr int64_t kPlaneMaxRows = 32;

// AVX2 (sketch at plane_gemv_avx2): k <= kSubTableEntries, looked up kGroupRows output rows at a time, for up to
// kSubTableMaxRows activation rows (each row looks its codes up again, where the scalar table kernel reads all
// rows' entries with one vector load per code).
constexpr int64_t kSubTableEntries = 64;  // bytes per position and plane: four 16-entry sub-tables
constexpr int64_t kGroupRows = 32;        // output rows per vector of codes
constexpr int64_t kSubTableMaxRows = 2;  // 3 rows: no faster than the table kernel (4096 x 11008, 3-bit)
constexpr int64_t kPrefetchBlocks = 2;  // measured 1..8 at 4096 x 11008 and 11008 x 4096: 2 best, none 15% slower
constexpr int64_t kBuildChunks = 8;     // table chunks (16 positions each) per hand-out

// Whether the AVX2 sub-table variant takes these weights and rows, on any CPU with AVX2: also on AVX-512 VBMI ones,
// where it beat the vpermi2b kernel at k <= 64 and one row (AVX-512 path, 3-bit k64 d2, 4096 x 11008, two threads:
// 1.45 against 2.25 ms with int16 tables for bf16 activations, 2.52 ms with exact ones for fp32).
bool sub_tables_apply(const Geometry& g, int64_t rows) {
  return g.k <= kSubTableEntries && rows <= kSubTableMaxRows && cpu_has_avx2_fma();
}

}  // namespace

#if BLOCKOPS_X86_DISPATCH
// GCC 12 warns that the "undefined" source vector inside its own _mm512_unpack*_epi32/64 intrinsics is (or may
// be) uninitialised (a known false positive of the header); nothing here reads an uninitialised value.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace {

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

// The 4-stage unpack network both transposes share (P: the intrinsics' prefix, _mm256 or _mm512): a[0..15], 16 rows of
// bytes, come out transposed within each 128-bit lane (register i, lane l: position 16 l + i of the 16 rows); b is
// scratch.
#define BLOCKOPS_TRANSPOSE_16_ROWS(P, a, b)                                          \
  do {                                                                               \
    for (int i = 0; i < 8; ++i) {                                                    \
      b[2 * i] = P##_unpacklo_epi8(a[2 * i], a[2 * i + 1]);                          \
      b[2 * i + 1] = P##_unpackhi_epi8(a[2 * i], a[2 * i + 1]);                      \
    }                                                                                \
    for (int i = 0; i < 4; ++i)                                                      \
      for (int j = 0; j < 2; ++j) {                                                  \
        a[4 * i + 2 * j] = P##_unpacklo_epi16(b[4 * i + j], b[4 * i + j + 2]);       \
        a[4 * i + 2 * j + 1] = P##_unpackhi_epi16(b[4 * i + j], b[4 * i + j + 2]);   \
      }                                                                              \
    for (int i = 0; i < 2; ++i)                                                      \
      for (int j = 0; j < 4; ++j) {                                                  \
        b[8 * i + 2 * j] = P##_unpacklo_epi32(a[8 * i + j], a[8 * i + j + 4]);       \
        b[8 * i + 2 * j + 1] = P##_unpackhi_epi32(a[8 * i + j], a[8 * i + j + 4]);   \
      }                                                                              \
    for (int j = 0; j < 8; ++j) {                                                    \
      a[2 * j] = P##_unpacklo_epi64(b[j], b[j + 8]);                                 \
      a[2 * j + 1] = P##_unpackhi_epi64(b[j], b[j + 8]);                             \
    }                                                                                \
  } while (0)

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
  BLOCKOPS_TRANSPOSE_16_ROWS(_mm512, a, b);
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

}  // namespace

namespace {

// plane_gemv on AVX-512 VBMI: tables 256 entries wide (zeros past k), so codes >= k read zeros.
uint8_t plane_gemv_vbmi(const float* x, const uint8_t* codes, const float* cb32, const float* scales,
                        const Geometry& g, int64_t rows, bool exact, float* y) {
  thread_local std::vector<uint8_t> planes;
  thread_local std::vector<float> steps;
  PlaneTables t;
  t.exact = exact;
  t.padded = (g.positions() + kPlanePositions - 1) / kPlanePositions * kPlanePositions;
  const int64_t plane_size = rows * t.padded * 256, num_planes = exact ? 4 : 2;
  uint8_t* base = scratch(planes, num_planes * plane_size);
  for (int64_t b = 0; b < 4; ++b) t.plane[b] = b < num_planes ? base + b * plane_size : nullptr;
  t.scale = scratch(steps, rows * (t.padded / kPlaneChunk));
  const std::vector<float> cbt = transposed_codebooks(cb32, g, g.k);
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
// ---- AVX2: the same scheme for k <= 64 ---------------------------------------------------------------------------
//
// Without vpermb a register permute reads 16 bytes (vpshufb, per 128-bit lane), so a table of k <= 64 entries is
// looked up as up to four 16-entry sub-tables, 32 output rows at a time. For sub-table s the index is the code
// minus 16 s (wrapping) plus 0x70 with unsigned saturation: the codes of sub-table s land on 0x70..0x7F (vpshufb
// reads their low nibble) and every other code on 0x80 or above, which vpshufb turns into a zero; the sub-tables'
// bytes are ORed together. Tables are int16 for every activation dtype here (fp32 ones would take four planes, the
// scheme that measured no faster than the scalar table kernel on AVX2), rounded with one scale per activation row
// and kPlaneChunk positions as on VBMI: an error of at most half a step (2^-16 of the chunk's largest entry) per
// term, the contract of lowbit's 16-bit fixed-point path. The low bytes (unsigned) and high bytes (signed) of two
// positions' entries interleave and vpmaddubsw with ones adds each pair into int16 per row (a chunk's 16
// positions stay below 2^15), then per chunk low + 256 high widens into int32 and is scaled into fp32. Per 64
// codes: 16 shuffles (four sub-tables, two planes, two positions), 4 unpacks, 4 vpmaddubsw, where the scalar table
// kernel spends a byte load and a dependent fp32 load-add per code: 13.6 against 4.8 codes/ns in a bare loop on
// one Zen 4 core. Non-finite activations cannot be held: the caller takes the exact table kernel for them.
//
// Codes: per 64-position block, a 32-row group's codes are transposed into [64 positions][32 rows] (16 x 32-byte
// blocks through the same 4-stage unpack network per 128-bit lane). Work items are 32-row groups from a shared
// counter, each walking every position block: its 32 rows are read as 32 sequential streams, and the tables (128
// bytes per position and activation row: 256 KB at 4096 inputs) come from L2.
//
// Lane order: dword lane 4l + j of accumulator i holds row 16l + 4i + j of the group (as on VBMI, two lanes).


// Tables of chunk q of activation row m: fp32 entries (codebooks transposed to [K][d][64], zeros past k), the
// chunk's scale, then the int16 entries (rounded to nearest) split into the two planes. False if an entry is NaN
// or infinite (nothing else is written then).
BLOCKOPS_TARGET_AVX2 bool build_sub_table_chunk(const float* x, const float* cbt, const Geometry& g, int64_t m,
                                                int64_t q, PlaneTables& t) {
  alignas(32) float entries[kPlaneChunk][kSubTableEntries];
  __m256 largest = _mm256_setzero_ps(), poison = _mm256_setzero_ps();
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  for (int64_t i = 0; i < kPlaneChunk; ++i) {
    const int64_t p = q * kPlaneChunk + i;
    for (int64_t c0 = 0; c0 < kSubTableEntries; c0 += 8) {
      __m256 e = _mm256_setzero_ps();
      if (p < g.positions()) {
        const float* xg = x + m * g.in() + (p / g.K) * g.d;
        const float* ct = cbt + (p % g.K) * g.d * kSubTableEntries + c0;
        for (int64_t u = 0; u < g.d; ++u)
          e = _mm256_fmadd_ps(_mm256_set1_ps(xg[u]), _mm256_loadu_ps(ct + u * kSubTableEntries), e);
      }
      _mm256_store_ps(entries[i] + c0, e);
      largest = _mm256_max_ps(largest, _mm256_and_ps(e, abs_mask));
      poison = _mm256_add_ps(poison, _mm256_mul_ps(e, _mm256_setzero_ps()));
    }
  }
  alignas(32) float lanes[8], bad[8];
  _mm256_store_ps(lanes, largest);
  _mm256_store_ps(bad, poison);
  float top = 0.f, sum = 0.f;
  for (int i = 0; i < 8; ++i) top = std::max(top, lanes[i]), sum += bad[i];
  if (sum != 0.f) return false;  // NaN: an entry was NaN or infinite
  t.scale[m * (t.padded / kPlaneChunk) + q] = top / 32767.f;
  const __m256 inv = _mm256_set1_ps(top > 0.f ? 32767.f / top : 0.f);
  const __m256i low_byte = _mm256_set1_epi16(0x00FF);
  for (int64_t i = 0; i < kPlaneChunk; ++i) {
    const int64_t offset = (m * t.padded + q * kPlaneChunk + i) * kSubTableEntries;
    for (int64_t c0 = 0; c0 < kSubTableEntries; c0 += 32) {
      __m256i words[2];  // entries c0 .. c0 + 31 as int16, in order
      for (int h = 0; h < 2; ++h) {
        const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_load_ps(entries[i] + c0 + 16 * h), inv));
        const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_load_ps(entries[i] + c0 + 16 * h + 8), inv));
        words[h] = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);  // packs interleaves the lanes
      }
      const __m256i lo = _mm256_packus_epi16(_mm256_and_si256(words[0], low_byte), _mm256_and_si256(words[1], low_byte));
      const __m256i hi = _mm256_packs_epi16(_mm256_srai_epi16(words[0], 8), _mm256_srai_epi16(words[1], 8));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(t.plane[0] + offset + c0), _mm256_permute4x64_epi64(lo, 0xD8));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(t.plane[1] + offset + c0), _mm256_permute4x64_epi64(hi, 0xD8));
    }
  }
  return true;
}

// rows [r0, r0 + 16) x positions [p0, p0 + 32) of codes [out, P] into dst[p * 32 + r] (p, r relative), zeros for
// rows >= out and positions >= P; `largest` takes the bytewise maximum. After the four unpack stages lane l of
// register i holds position 16 l + i of the 16 rows.
BLOCKOPS_TARGET_AVX2 inline void transpose_16x32(const uint8_t* codes, int64_t out, int64_t P, int64_t r0,
                                                 int64_t p0, uint8_t* dst, __m256i& largest) {
  __m256i a[16], b[16];
  for (int i = 0; i < 16; ++i) {
    if (r0 + i < out && P - p0 >= 32) {
      a[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + (r0 + i) * P + p0));
    } else {
      alignas(32) uint8_t part[32] = {};
      if (r0 + i < out) std::memcpy(part, codes + (r0 + i) * P + p0, static_cast<size_t>(std::max<int64_t>(0, P - p0)));
      a[i] = _mm256_load_si256(reinterpret_cast<const __m256i*>(part));
    }
    largest = _mm256_max_epu8(largest, a[i]);
  }
  BLOCKOPS_TRANSPOSE_16_ROWS(_mm256, a, b);
  for (int i = 0; i < 16; ++i) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i * kGroupRows), _mm256_castsi256_si128(a[i]));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (16 + i) * kGroupRows), _mm256_extracti128_si256(a[i], 1));
  }
}

// One plane's bytes for the 32 codes whose sub-table indices are idx (S sub-tables of the position's 64 bytes).
BLOCKOPS_TARGET_AVX2 inline __m256i sub_table(const uint8_t* plane, int s) {  // in both 128-bit lanes
  return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(plane + 16 * s)));
}

template <int S>
BLOCKOPS_TARGET_AVX2 inline __m256i sub_table_bytes(const uint8_t* plane, const __m256i (&idx)[S]) {
  __m256i bytes = _mm256_shuffle_epi8(sub_table(plane, 0), idx[0]);
  for (int s = 1; s < S; ++s) bytes = _mm256_or_si256(bytes, _mm256_shuffle_epi8(sub_table(plane, s), idx[s]));
  return bytes;
}

// The 32 rows' products over positions [p0, p0 + 64) of one 32-row group (codes transposed in tcodes [64][32])
// for every activation row, each chunk's int32 sums scaled into sums [rows][4][8] (fp32, lane order).
template <int S>
BLOCKOPS_TARGET_AVX2 void sub_table_block(const PlaneTables& t, int64_t rows, int64_t p0, const uint8_t* tcodes,
                                          float* sums) {
  const __m256i bias = _mm256_set1_epi8(0x70), sixteen = _mm256_set1_epi8(16), ones = _mm256_set1_epi8(1);
  const __m256i low_high = _mm256_set1_epi32((256 << 16) | 1);  // int16 pairs (low, high) -> low + 256 high
  for (int64_t m = 0; m < rows; ++m) {
    const uint8_t* lo_m = t.plane[0] + m * t.padded * kSubTableEntries;
    const uint8_t* hi_m = t.plane[1] + m * t.padded * kSubTableEntries;
    for (int64_t q0 = p0; q0 < p0 + kPlanePositions; q0 += kPlaneChunk) {
      // Per-row int16 sums of the chunk: low bytes (rows 16l + 0..7, 16l + 8..15), high bytes (the same).
      __m256i low_a = _mm256_setzero_si256(), low_b = low_a, high_a = low_a, high_b = low_a;
      for (int64_t p = q0; p < q0 + kPlaneChunk; p += 2) {
        __m256i low[2], high[2];
        for (int pp = 0; pp < 2; ++pp) {
          __m256i code = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tcodes + (p + pp - p0) * kGroupRows));
          __m256i idx[S];
          for (int s = 0; s < S; ++s) {
            idx[s] = _mm256_adds_epu8(code, bias);
            code = _mm256_sub_epi8(code, sixteen);
          }
          low[pp] = sub_table_bytes<S>(lo_m + (p + pp) * kSubTableEntries, idx);
          high[pp] = sub_table_bytes<S>(hi_m + (p + pp) * kSubTableEntries, idx);
        }
        low_a = _mm256_add_epi16(low_a, _mm256_maddubs_epi16(_mm256_unpacklo_epi8(low[0], low[1]), ones));
        low_b = _mm256_add_epi16(low_b, _mm256_maddubs_epi16(_mm256_unpackhi_epi8(low[0], low[1]), ones));
        high_a = _mm256_add_epi16(high_a, _mm256_maddubs_epi16(ones, _mm256_unpacklo_epi8(high[0], high[1])));
        high_b = _mm256_add_epi16(high_b, _mm256_maddubs_epi16(ones, _mm256_unpackhi_epi8(high[0], high[1])));
      }
      const __m256i acc[4] = {_mm256_madd_epi16(_mm256_unpacklo_epi16(low_a, high_a), low_high),
                              _mm256_madd_epi16(_mm256_unpackhi_epi16(low_a, high_a), low_high),
                              _mm256_madd_epi16(_mm256_unpacklo_epi16(low_b, high_b), low_high),
                              _mm256_madd_epi16(_mm256_unpackhi_epi16(low_b, high_b), low_high)};
      const __m256 step = _mm256_set1_ps(t.scale[m * (t.padded / kPlaneChunk) + q0 / kPlaneChunk]);
      for (int i = 0; i < 4; ++i) {
        float* s = sums + (m * 4 + i) * 8;
        _mm256_storeu_ps(s, _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[i]), step, _mm256_loadu_ps(s)));
      }
    }
  }
}

// Output rows [n0, n0 + 32) over every position block; y = scale * sums. Returns the largest code read.
template <int S>
BLOCKOPS_TARGET_AVX2 uint8_t sub_table_group(const PlaneArgs& a, int64_t n0, uint8_t* tcodes, float* sums) {
  const int64_t P = a.g.positions(), out = a.g.out;
  std::fill(sums, sums + a.rows * kGroupRows, 0.f);
  __m256i largest = _mm256_setzero_si256();
  for (int64_t p0 = 0; p0 < a.t->padded; p0 += kPlanePositions) {
    // The codes kPrefetchBlocks blocks ahead: 32 rows read 64 bytes a block each, at a stride of P bytes.
    if (p0 + kPrefetchBlocks * kPlanePositions < P) {
      for (int64_t r = 0; r < kGroupRows && n0 + r < out; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(a.codes + (n0 + r) * P + p0 + kPrefetchBlocks * kPlanePositions),
                     _MM_HINT_T0);
    }
    for (int64_t r = 0; r < kGroupRows; r += 16)
      for (int64_t h = 0; h < kPlanePositions; h += 32)
        transpose_16x32(a.codes, out, P, n0 + r, p0 + h, tcodes + h * kGroupRows + r, largest);
    sub_table_block<S>(*a.t, a.rows, p0, tcodes, sums);
  }
  for (int64_t m = 0; m < a.rows; ++m)
    for (int l = 0; l < 2; ++l)
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) {
          const int64_t n = n0 + 16 * l + 4 * i + j;
          if (n < out) a.y[m * out + n] = a.scales[n] * sums[(m * 4 + i) * 8 + 4 * l + j];
        }
  alignas(32) uint8_t bytes[32];
  _mm256_store_si256(reinterpret_cast<__m256i*>(bytes), largest);
  return *std::max_element(bytes, bytes + 32);
}

// plane_gemv on AVX2 (k <= 64): -1 without writing y if an activation row holds a NaN or infinity.
int plane_gemv_avx2(const float* x, const uint8_t* codes, const float* cb32, const float* scales, const Geometry& g,
                    int64_t rows, float* y) {
  thread_local std::vector<uint8_t> planes;
  thread_local std::vector<float> steps;
  PlaneTables t;
  t.exact = false;
  t.padded = (g.positions() + kPlanePositions - 1) / kPlanePositions * kPlanePositions;
  const int64_t plane_size = rows * t.padded * kSubTableEntries;
  uint8_t* base = scratch(planes, 2 * plane_size);
  t.plane[0] = base;
  t.plane[1] = base + plane_size;
  t.plane[2] = t.plane[3] = nullptr;
  t.scale = scratch(steps, rows * (t.padded / kPlaneChunk));
  const std::vector<float> cbt = transposed_codebooks(cb32, g, kSubTableEntries);
  // One parallel region: the tables' chunks handed out first, then, once every chunk is built, the 32-row groups
  // (a second region left the other thread waiting through a serial build: 6% of a call at 11008 x 4096).
  const int64_t chunks = rows * (t.padded / kPlaneChunk);
  const PlaneArgs a{&t, codes, scales, y, g, rows};
  const int64_t groups = (g.out + kGroupRows - 1) / kGroupRows;
  const int sub_tables = static_cast<int>((g.k + 15) / 16);
  std::atomic<int64_t> next_chunk{0}, built{0}, next_group{0};
  std::atomic<bool> finite{true};
  std::atomic<uint8_t> largest{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    for (int64_t c = next_chunk.fetch_add(kBuildChunks); c < chunks; c = next_chunk.fetch_add(kBuildChunks)) {
      const int64_t end = std::min(chunks, c + kBuildChunks);
      for (int64_t i = c; i < end; ++i)
        if (!build_sub_table_chunk(x, cbt.data(), g, i / (t.padded / kPlaneChunk), i % (t.padded / kPlaneChunk), t))
          finite = false;
      built += end - c;
    }
    spin_until_at_least(built, chunks);
    if (!finite) return;
    alignas(32) uint8_t tcodes[kPlanePositions * kGroupRows];
    std::vector<float> sums(static_cast<size_t>(rows * kGroupRows));
    uint8_t mine = 0;
    for (int64_t grp = next_group++; grp < groups; grp = next_group++) {
      const int64_t n0 = grp * kGroupRows;
      uint8_t seen;
      switch (sub_tables) {
        case 1: seen = sub_table_group<1>(a, n0, tcodes, sums.data()); break;
        case 2: seen = sub_table_group<2>(a, n0, tcodes, sums.data()); break;
        case 3: seen = sub_table_group<3>(a, n0, tcodes, sums.data()); break;
        default: seen = sub_table_group<4>(a, n0, tcodes, sums.data()); break;
      }
      mine = std::max(mine, seen);
    }
    for (uint8_t seen = largest.load(); mine > seen && !largest.compare_exchange_weak(seen, mine);) {
    }
  });
  if (!finite) return -1;
  release_if_large(planes);
  return largest.load();
}

}  // namespace

int plane_gemv(const float* x, const uint8_t* codes, const float* cb32, const float* scales, const Geometry& g,
               int64_t rows, bool exact, float* y) {
  if (sub_tables_apply(g, rows)) return plane_gemv_avx2(x, codes, cb32, scales, g, rows, y);
  return plane_gemv_vbmi(x, codes, cb32, scales, g, rows, exact, y);
}
#pragma GCC diagnostic pop
#endif

bool use_byte_planes(const Geometry& g, CodeType type, bool fp32_x, int64_t rows) {
#if BLOCKOPS_X86_DISPATCH
  if (type != CodeType::kU8) return false;
  if (sub_tables_apply(g, rows)) return use_lookup_table(g, rows);
  if (!cpu_has_avx512_vbmi()) return false;
  if (rows <= kCpuSmallBatchRows) return use_lookup_table(g, rows);
  // fp32 activations (exact tables, four planes) only up to kCpuSmallBatchRows: their tables are twice the size.
  return !fp32_x && rows <= kPlaneMaxRows && g.out >= kPlaneGroups * 64;
#else
  (void)g, (void)type, (void)fp32_x, (void)rows;
  return false;
#endif
}

}  // namespace blockops::vq
