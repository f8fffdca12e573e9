// Low-bit GEMM on the CPU: the CPU kernels and the CPU glue of the lowbit family (argument checks: lowbit_op.cpp).
//
// quant_linear, decode and batches -- fused kernels that read every packed weight once per pass of up to
// kRowsPerPass activation rows and never materialise W_hat. AVX2 / AVX512-VNNI, 2/3/4-bit, groups up to
// kCpuFixedPointMaxGroup: the 16-bit fixed-point kernels (activations rounded per row and group):
//
//      qweight [words, out] int32        one row (decode): split-K. Up to kSplitPieces pieces of consecutive
//      +-----------------------------+   groups; a piece's packed rows are one contiguous stretch of qweight,
//      | piece 0: groups 0..p-1      |   walked in order (the hardware prefetchers stream it) across all tiles,
//      +-----------------------------+   each tile's sums kept in registers over the group's packed rows; the
//      | piece 1                     |   pieces' partial outputs are added in piece order.
//      +-----------------------------+
//      2 or more rows: a task owns a band of kBandTiles tiles (256 columns) and runs super-passes of up to
//      kSuperPasses passes of kRowsPerPass rows down it: per (group, tile) the 3/4-bit packed rows are decoded
//      once for the super-pass (2-bit: per pass, in registers), each pass keeps its sums in registers over the
//      group's packed rows, scale and zero converted once per tile; the first super-pass brings the band from
//      memory (rows kPrefetchRows ahead prefetched: the hardware prefetchers do not follow a stride of out * 4
//      bytes), the later ones find it in L2.
//   per tile and group:  acc[m] = sum_{k in grp} x16[m, k] * q[k, :]                 (int32)
//                        y[m, :] += s[grp, :] * (acc[m] * step[m, grp] - z[grp, :] * xsum[m, grp])
//   The fp32 kernel (groups above kCpuFixedPointMaxGroup) and the portable one, up to kCpuGemvMaxRows rows: one task
//   per 16-column tile walking down the rows, fp32 activations.
//
// quant_linear, more rows: the fixed-point kernels take any row count (passes of kRowsPerPass rows); without them
// (no AVX2, groups above kCpuFixedPointMaxGroup) or for bf16 activations on a CPU with bf16 dot products,
// dequantize blocks of kBlockRows output features into fp32 and hand them to ATen's blocked GEMM (at::mm); only
// one block of W_hat exists at a time.
// fp64 (CPU only, for gradcheck): any fp64 x / scales / zeros / t takes the blocked paths with the blocks, the GEMM
// and the output in fp64 (the portable dequantize loop; the fp32 kernels above are not instantiated for it).
// quant_dequantize -- W_hat written row by row (dequant_rows).
// quant_linear_grad_input -- the same blocks as the batched path, multiplied the other way.
// quant_grad_scales -- the blocks with unit scales (q - z), times t = grad_out^T x, summed per group.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <cmath>
#include <vector>
#include <type_traits>

#include "checks.h"
#include "cpu_common.h"
#include "cpu_features.h"
#include "glue.h"
#include "introspection.h"
#include "lowbit_cpu.h"
#include "lowbit_op.h"
#include "macros.h"
#include "static_switch.h"

#if BLOCKOPS_X86_DISPATCH
#include <immintrin.h>
#endif

namespace blockops::lowbit {

namespace {

KernelCounter linear_counter(kFamily, "quant_linear.cpu");
KernelCounter dequant_counter(kFamily, "quant_dequantize.cpu");
KernelCounter grad_input_counter(kFamily, "quant_linear_grad_input.cpu");
KernelCounter grad_scales_counter(kFamily, "quant_grad_scales.cpu");
// The fixed-point decode kernel uses AVX512-VNNI where the CPU has it; the rest of the family AVX2/FMA.
const char* lowbit_cpu_isa() { return cpu_has_avx512_vnni() ? "avx2+fma, avx512-vnni (decode)" : cpu_isa_name(); }
FamilyRegistration family(kFamily, lowbit_cpu_isa);

constexpr int64_t kCpuGemvMaxRows = 64;  // rows up to which the fp32 and portable decode kernels run (above:
                                         // dequantized blocks + ATen's GEMM); the fixed-point kernels take any
                                         // row count. CUDA: kCudaGemvMaxRows in kernels/lowbit_launch.h
constexpr int kTileCols = 16;          // one 64-byte cache line of a packed row; two AVX2 vectors
constexpr int kRowsPerPass = 4;        // activation rows kept in registers per pass over a tile
constexpr int kSuperPasses = 4;        // passes sharing one decode of a tile's packed rows (batched kernel)
constexpr int kPrefetchRows = 32;      // packed rows fetched ahead (~ memory latency / time per row)
// 16-bit fixed point: |x16| <= kFixedMax = 127.5 * 256 - 1, so that x16 = 256 * hi + lo splits into two int8
// (hi = (x16 + 128) >> 8, lo = x16 - 256 * hi), as the 2-bit byte kernel needs.
constexpr float kFixedMax = 32639.f;
constexpr int64_t kSplitPieces = 8;   // fixed-point decode (one row): pieces of consecutive groups (split-K)
constexpr int64_t kSplitRows = 8;     // and packed rows walked together across the tiles (streams prefetched)
constexpr int kBandTiles = 16;         // fixed-point path: 256 columns (1 KiB of each packed row) per task
constexpr int64_t kBlockRows = 512;    // output features (rows of W_hat) dequantized at once on the GEMM
                                       // paths: <= 512 * in fp32, e.g. 8 MB at in = 4096

// What one GEMV pass needs: fp32 activations [M, in], their per-group sums [M, groups], fp32 scales and
// zeros [groups, out], the fp32 output [M, out].
struct GemvArgs {
  const float* x;
  const float* xsum;
  // Only for the 16-bit fixed-point path (below): per row, group and packed row r touching the group (a slot),
  // step j, the int16 activations of inputs r*p + j (low half) and r*p + p/2 + j (high half), 0 outside the
  // group; the group's first slot (group_slot [groups + 1]); and the per-(row, group) fixed-point step.
  const int32_t* xpairs;
  const int64_t* group_slot;
  const float* xstep;
  // Only for the 2-bit byte kernel (one row, AVX2 without VNNI, groups up to 128): per packed row r and step j < 4,
  // the int8 high and low parts of x16 at inputs 16 r + 4 b + j, b < 4, as two int32 (null elsewhere).
  const int32_t* xbytes;
  const int32_t* qweight;
  const float* scales;       // fp32 copies: float and portable kernels (null on the fixed-point path)
  const float* zeros;
  const void* scales_native;  // the caller's scales / zeros as stored, read by the fixed-point kernel
  const void* zeros_native;
  DType param_type;          // dtype of scales_native / zeros_native
  int64_t param_stride;      // elements from one group's scales / zeros to the next: out, or 0 where every group
                             // repeats one row (scales [1, out] given to RowProduct: ptq161's salient part)
  float* y;
  Geometry g;
};

// Walks inputs k = 0, 1, ... in pieces that stay inside one packed word and one group: word row r, lanes
// [t0, t1). With 3-bit codes (10 per word) a word can straddle two groups. Advances without divisions,
// which would otherwise cost more than the unpacking for narrow tiles.
struct WordCursor {
  int per;
  int64_t r = 0;
  int t = 0;

  explicit WordCursor(const Geometry& g) : per(g.per_word()) {}
  // Lanes of the current word for at most `left` more inputs; returns the lane count taken.
  int take(int64_t left, int* t0) {
    *t0 = t;
    const int n = static_cast<int>(std::min<int64_t>(per - t, left));
    return n;
  }
  void advance(int n) {
    t += n;
    if (t == per) {
      t = 0;
      ++r;
    }
  }
};

// Portable GEMV over columns [n0, n0 + ncols), ncols <= kTileCols, activation rows [m0, m0 + rows).
template <int kBits>
void gemv_tile_portable(const GemvArgs& a, int64_t n0, int ncols, int64_t m0, int rows) {
  const Geometry& g = a.g;
  constexpr uint32_t kMask = (1u << kBits) - 1u;
  for (int m = 0; m < rows; ++m) {
    const float* x = a.x + (m0 + m) * g.in;
    float y[kTileCols] = {};
    WordCursor cur(g);
    for (int64_t grp = 0; grp < g.groups(); ++grp) {
      float acc[kTileCols] = {};
      for (int64_t left = g.group_size; left > 0;) {
        int t0;
        const int n = cur.take(left, &t0);
        const uint32_t* words = reinterpret_cast<const uint32_t*>(a.qweight + cur.r * g.out + n0);
        const float* xr = x + cur.r * g.per_word();
        for (int c = 0; c < ncols; ++c) {
          const uint32_t w = words[c];
          float s = 0.f;
          for (int t = t0; t < t0 + n; ++t) s += xr[t] * static_cast<float>((w >> (kBits * t)) & kMask);
          acc[c] += s;
        }
        cur.advance(n);
        left -= n;
      }
      const float xs = a.xsum[(m0 + m) * g.groups() + grp];
      for (int c = 0; c < ncols; ++c) {
        y[c] += a.scales[grp * a.param_stride + n0 + c] * (acc[c] - a.zeros[grp * a.param_stride + n0 + c] * xs);
      }
    }
    for (int c = 0; c < ncols; ++c) a.y[(m0 + m) * g.out + n0 + c] = y[c];
  }
}

#if BLOCKOPS_X86_DISPATCH
// AVX2/FMA GEMV over one full 16-column tile and kRows activation rows. Codes are unpacked with a shift by
// a compile-time amount and a mask, converted to fp32 and multiplied by the broadcast activation. With
// few rows the FMA latency (4 cycles) would dominate, so consecutive lanes rotate over kSets independent
// accumulators: 2 * kRows * kSets >= 8 chains keep both FMA ports busy.
template <int kBits, int kRows>
BLOCKOPS_TARGET_AVX2 void gemv_tile_avx2(const GemvArgs& a, int64_t n0, int64_t m0) {
  constexpr int kSets = kRows >= 4 ? 1 : 4 / kRows;
  const Geometry& g = a.g;
  const __m256i mask = _mm256_set1_epi32((1 << kBits) - 1);
  __m256 y_lo[kRows], y_hi[kRows];
  for (int m = 0; m < kRows; ++m) y_lo[m] = y_hi[m] = _mm256_setzero_ps();
  WordCursor cur(g);
  for (int64_t grp = 0; grp < g.groups(); ++grp) {
    __m256 acc_lo[kSets][kRows], acc_hi[kSets][kRows];
    for (int j = 0; j < kSets; ++j)
      for (int m = 0; m < kRows; ++m) acc_lo[j][m] = acc_hi[j][m] = _mm256_setzero_ps();
    for (int64_t left = g.group_size; left > 0;) {
      int t0;
      const int n = cur.take(left, &t0);
      const int32_t* row = a.qweight + cur.r * g.out + n0;
      _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetchRows * g.out), _MM_HINT_T0);
      __m256i w_lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row));
      __m256i w_hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 8));
      // Bring lane t0 to the bottom; afterwards every step shifts by the constant kBits.
      const __m128i first = _mm_cvtsi32_si128(kBits * t0);
      w_lo = _mm256_srl_epi32(w_lo, first);
      w_hi = _mm256_srl_epi32(w_hi, first);
      const float* xr = a.x + m0 * g.in + cur.r * g.per_word() + t0;
      int t = 0;
      for (; t + kSets <= n; t += kSets) {
#pragma GCC unroll 4
        for (int j = 0; j < kSets; ++j) {
          const __m256 q_lo = _mm256_cvtepi32_ps(_mm256_and_si256(w_lo, mask));
          const __m256 q_hi = _mm256_cvtepi32_ps(_mm256_and_si256(w_hi, mask));
          w_lo = _mm256_srli_epi32(w_lo, kBits);
          w_hi = _mm256_srli_epi32(w_hi, kBits);
          for (int m = 0; m < kRows; ++m) {
            const __m256 xv = _mm256_broadcast_ss(xr + m * g.in + t + j);
            acc_lo[j][m] = _mm256_fmadd_ps(xv, q_lo, acc_lo[j][m]);
            acc_hi[j][m] = _mm256_fmadd_ps(xv, q_hi, acc_hi[j][m]);
          }
        }
      }
      for (; t < n; ++t) {
        const __m256 q_lo = _mm256_cvtepi32_ps(_mm256_and_si256(w_lo, mask));
        const __m256 q_hi = _mm256_cvtepi32_ps(_mm256_and_si256(w_hi, mask));
        w_lo = _mm256_srli_epi32(w_lo, kBits);
        w_hi = _mm256_srli_epi32(w_hi, kBits);
        for (int m = 0; m < kRows; ++m) {
          const __m256 xv = _mm256_broadcast_ss(xr + m * g.in + t);
          acc_lo[0][m] = _mm256_fmadd_ps(xv, q_lo, acc_lo[0][m]);
          acc_hi[0][m] = _mm256_fmadd_ps(xv, q_hi, acc_hi[0][m]);
        }
      }
      cur.advance(n);
      left -= n;
    }
    const float* sc = a.scales + grp * a.param_stride + n0;
    const float* ze = a.zeros + grp * a.param_stride + n0;
    const __m256 s_lo = _mm256_loadu_ps(sc), s_hi = _mm256_loadu_ps(sc + 8);
    const __m256 z_lo = _mm256_loadu_ps(ze), z_hi = _mm256_loadu_ps(ze + 8);
    for (int m = 0; m < kRows; ++m) {
      __m256 lo = acc_lo[0][m], hi = acc_hi[0][m];
      for (int j = 1; j < kSets; ++j) {
        lo = _mm256_add_ps(lo, acc_lo[j][m]);
        hi = _mm256_add_ps(hi, acc_hi[j][m]);
      }
      const __m256 xs = _mm256_broadcast_ss(a.xsum + (m0 + m) * g.groups() + grp);
      y_lo[m] = _mm256_fmadd_ps(s_lo, _mm256_fnmadd_ps(z_lo, xs, lo), y_lo[m]);
      y_hi[m] = _mm256_fmadd_ps(s_hi, _mm256_fnmadd_ps(z_hi, xs, hi), y_hi[m]);
    }
  }
  for (int m = 0; m < kRows; ++m) {
    _mm256_storeu_ps(a.y + (m0 + m) * g.out + n0, y_lo[m]);
    _mm256_storeu_ps(a.y + (m0 + m) * g.out + n0 + 8, y_hi[m]);
  }
}

// Eight scales (or zeros) from index i as fp32, whatever their storage dtype: converting them here, once per
// group, costs less than converting the whole [groups, out] tensors on every call.
BLOCKOPS_TARGET_AVX2 __attribute__((always_inline)) inline __m256 load8_as_float(const void* base, int64_t i,
                                                                                  DType type) {
  switch (type) {
    case DType::kF16: return load8_f16_avx2(static_cast<const uint16_t*>(base) + i);
    case DType::kBF16: return load8_bf16_avx2(static_cast<const uint16_t*>(base) + i);
    default:
      return _mm256_loadu_ps(static_cast<const float*>(base) + i);
  }
}

// Eight columns' scale and zero from index i of [groups, out] as fp32.
BLOCKOPS_TARGET_AVX2 __attribute__((always_inline)) inline void load_scale_zero8(const GemvArgs& a, int64_t i,
                                                                                 __m256& scale, __m256& zero) {
  scale = load8_as_float(a.scales_native, i, a.param_type);
  zero = load8_as_float(a.zeros_native, i, a.param_type);
}

// A finished group's contribution to 8 columns of y: y += scale * (step * sums - zero * xsum), the group's int32
// sums of codes times fixed-point activations brought back to fp32 (step: the activations' fixed-point step,
// xsum: their sum over the group, which the asymmetric zero point multiplies).
BLOCKOPS_TARGET_AVX2 __attribute__((always_inline)) inline void add_group8(float* y, __m256i sums, __m256 step,
                                                                           __m256 xsum, __m256 scale, __m256 zero) {
  const __m256 dot = _mm256_fnmadd_ps(zero, xsum, _mm256_mul_ps(_mm256_cvtepi32_ps(sums), step));
  _mm256_storeu_ps(y, _mm256_fmadd_ps(scale, dot, _mm256_loadu_ps(y)));
}

// A 3-bit packed word (10 codes at bits 3t, bits 30-31 unused) with codes 5..9 moved up one bit, from bits
// 15.. to 16..: then code t sits at bit 3t of the low half and code t + 5 at bit 3t of the high half, the 2/4-bit
// words' layout, so the kernel below decodes it alike (4 instructions per word, shared by its 5 steps).
BLOCKOPS_TARGET_AVX2 __attribute__((always_inline)) inline __m256i spread_3bit_avx2(__m256i w) {
  return _mm256_or_si256(_mm256_and_si256(w, _mm256_set1_epi32(0x7FFF)),
                         _mm256_slli_epi32(_mm256_and_si256(w, _mm256_set1_epi32(0x3FFF8000)), 1));
}

// The 2-, 3- and 4-bit decode kernels on 16-bit fixed-point activations. An int32 lane (one column) of a packed
// word holds codes k in its low half and k + p/2 in its high half (3-bit: after spread_3bit_avx2), so one shift
// and one mask leave two codes per lane as int16 pairs; _mm256_madd_epi16 multiplies them by the matching pair of
// int16 activations and adds the two products: 16 weights cost 4 instructions instead of the float path's 8.
// Activations are rounded per (row, group) to 16-bit fixed point, step = max|x| / kFixedMax (relative error
// <= 1.5e-5 of the group's largest activation: finer than fp16 or bf16 inputs). Group sums stay in int32:
// |code * x16| * group_size <= 15 * 32767 * 1024 < 2^31 (kCpuFixedPointMaxGroup, lowbit.h).
// Both kernels are stamped out once per ISA by the macros below: GCC cannot inline an intrinsic of a wider ISA
// into a shared template body, so the bodies are macros and only the dot-product step DOT(acc, codes, x)
// differs: AVX2 multiplies int16 pairs and adds (madd + add), AVX512-VNNI does both in one instruction
// (vpdpwssd on 256-bit registers, via AVX512VL).

// Step j's codes of a tile (c_lo, c_hi: 16 columns, two codes per int32 lane) times the kRows activation rows' int16
// pairs XPAIR(m, j), into s_lo[m], s_hi[m]. With several rows, the asm statement keeps each sum one register chain:
// unrolled, GCC otherwise reassociates the int adds into a tree over every step's products and spills them
// (measured: 4 rows, 2-bit, 1.3x slower).
#define BLOCKOPS_FIXED_DOT_ROWS(DOT, XPAIR, j, c_lo, c_hi)                                                         \
  for (int m = 0; m < kRows; ++m) {                                                                                \
    const __m256i xv = _mm256_set1_epi32(XPAIR(m, j));                                                             \
    s_lo[m] = DOT(s_lo[m], c_lo, xv);                                                                              \
    s_hi[m] = DOT(s_hi[m], c_hi, xv);                                                                              \
    if constexpr (kRows > 1) asm("" : "+x"(s_lo[m]), "+x"(s_hi[m]));                                               \
  }

// The steps of one packed row of a tile (w_lo, w_hi as BLOCKOPS_FIXED_LOAD_WORDS leaves them), decoded in registers:
// one shift and one mask leave step j's two codes per lane.
#define BLOCKOPS_FIXED_ROW_STEPS(DOT, XPAIR)                                                                        \
  _Pragma("GCC unroll 8")                                                                                          \
  for (int j = 0; j < kHalf; ++j) {                                                                                \
    const __m256i c_lo = _mm256_and_si256(w_lo, mask);                                                             \
    const __m256i c_hi = _mm256_and_si256(w_hi, mask);                                                             \
    w_lo = _mm256_srli_epi32(w_lo, kBits);                                                                         \
    w_hi = _mm256_srli_epi32(w_hi, kBits);                                                                         \
    BLOCKOPS_FIXED_DOT_ROWS(DOT, XPAIR, j, c_lo, c_hi)                                                             \
  }

// A tile's packed words of one row into w_lo, w_hi (16 columns); 3-bit words spread so that codes j and j + 5 sit
// 16 bits apart (spread_3bit_avx2).
#define BLOCKOPS_FIXED_LOAD_WORDS(w, w_lo, w_hi)                                                                   \
  {                                                                                                                \
    w_lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));                                                \
    w_hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>((w) + 8));                                          \
    if constexpr (kBits == 3) {                                                                                    \
      w_lo = spread_3bit_avx2(w_lo);                                                                               \
      w_hi = spread_3bit_avx2(w_hi);                                                                               \
    }                                                                                                              \
  }

// What both band kernels below derive from kBits and the band: codes per word, steps, the code mask (a code in each
// int16 half of a lane), the band's width.
#define BLOCKOPS_FIXED_BAND_CONSTANTS                                                                              \
  constexpr int kPer = 32 / kBits;                                                                                 \
  constexpr int kHalf = kPer / 2;                                                                                  \
  constexpr int kField = (1 << kBits) - 1;                                                                         \
  constexpr int kBandCols = kBandTiles * kTileCols;                                                                \
  const Geometry& g = a.g;                                                                                         \
  const __m256i mask = _mm256_set1_epi32(kField | (kField << 16));                                                 \
  const int cols = tiles * kTileCols;

#define BLOCKOPS_XPAIR_ONE(m, j) xp[j]
#define BLOCKOPS_XPAIR_PASS(m, j) xp[(j) * kRows + (m)]

// Several activation rows (any count, in super-passes of up to kSuperPasses passes of up to kRowsPerPass rows):
// the packed weights are no longer the cost, the decode and the multiply-adds are. Per (group, tile) the group's
// packed rows are decoded once into `decoded` (the codes of each step as int16 pairs, L1) and every pass of the
// super-pass multiplies from there (the decode was a fifth of the vector instructions at 3 bits when each pass did
// its own); per pass the 2 x kRows int32 sums stay in registers across the group's packed rows and the group's
// scale and zero (converted once per tile, shared by the rows) are applied straight from them. A pass's activation
// pairs are interleaved ([slot][j][row]), so every broadcast is a load at a constant offset from one pointer. A
// band's packed rows come from memory on the first super-pass and from L2 on the later ones (a band at in = 4096,
// 2-bit, is 256 KiB).
#define BLOCKOPS_DEFINE_FIXED_BATCH(NAME, TARGET, DOT)                                                             \
template <int kBits, int kRows, bool kShared>                                                                      \
TARGET __attribute__((always_inline)) inline void NAME##_pass(                                                     \
    const GemvArgs& a, const __m256i* decoded, const int32_t* w, int64_t slots, const int32_t* xgroup, int64_t m0, \
    int64_t grp, __m256 scale_lo, __m256 zero_lo, __m256 scale_hi, __m256 zero_hi, float* yt, int64_t ystride) {   \
  constexpr int kHalf = 16 / kBits;                                                                                \
  constexpr int kField = (1 << kBits) - 1;                                                                         \
  const __m256i mask = _mm256_set1_epi32(kField | (kField << 16));                                                 \
  __m256i s_lo[kRows], s_hi[kRows];                                                                                \
  for (int m = 0; m < kRows; ++m) s_lo[m] = s_hi[m] = _mm256_setzero_si256();                                      \
  const int32_t* xp = xgroup;                                                                                      \
  for (int64_t r = 0; r < slots; ++r, xp += kHalf * kRows, w += a.g.out) {                                         \
    if constexpr (kShared) {                                                                                       \
      const __m256i* d = decoded + r * kHalf * 2;                                                                  \
      _Pragma("GCC unroll 8")                                                                                      \
      for (int j = 0; j < kHalf; ++j) {                                                                            \
        const __m256i c_lo = _mm256_load_si256(d + 2 * j), c_hi = _mm256_load_si256(d + 2 * j + 1);                \
        BLOCKOPS_FIXED_DOT_ROWS(DOT, BLOCKOPS_XPAIR_PASS, j, c_lo, c_hi)                                           \
      }                                                                                                            \
    } else {                                                                                                       \
      __m256i w_lo, w_hi;                                                                                          \
      BLOCKOPS_FIXED_LOAD_WORDS(w, w_lo, w_hi)                                                                     \
      BLOCKOPS_FIXED_ROW_STEPS(DOT, BLOCKOPS_XPAIR_PASS)                                                           \
    }                                                                                                              \
  }                                                                                                                \
  for (int m = 0; m < kRows; ++m) {                                                                                \
    const __m256 step = _mm256_broadcast_ss(a.xstep + (m0 + m) * a.g.groups() + grp);                              \
    const __m256 xs = _mm256_broadcast_ss(a.xsum + (m0 + m) * a.g.groups() + grp);                                 \
    add_group8(yt + m * ystride, s_lo[m], step, xs, scale_lo, zero_lo);                                            \
    add_group8(yt + m * ystride + 8, s_hi[m], step, xs, scale_hi, zero_hi);                                        \
  }                                                                                                                \
}                                                                                                                  \
template <int kBits, bool kShared>                                                                                 \
TARGET void NAME(const GemvArgs& a, int64_t n0, int tiles, int64_t m0, int64_t rows) {                             \
  BLOCKOPS_FIXED_BAND_CONSTANTS                                                                                    \
  constexpr int64_t kMaxSlots = kCpuFixedPointMaxGroup / kPer + 2;                                                 \
  alignas(32) float y[kSuperPasses * kRowsPerPass][kBandCols];                                                     \
  alignas(32) __m256i decoded[kShared ? kMaxSlots * kHalf * 2 : 1];                                               \
  for (int64_t m = 0; m < rows; ++m)                                                                               \
    for (int c = 0; c < cols; ++c) y[m][c] = 0.f;                                                                  \
  for (int64_t grp = 0; grp < g.groups(); ++grp) {                                                                 \
    const int64_t r0 = grp * g.group_size / kPer, r1 = ((grp + 1) * g.group_size + kPer - 1) / kPer;               \
    for (int64_t r = r0; r < r1; ++r) {                                                                            \
      const char* ahead = reinterpret_cast<const char*>(a.qweight + (r + kPrefetchRows) * g.out + n0);             \
      for (int line = 0; line < tiles; ++line) _mm_prefetch(ahead + line * 64, _MM_HINT_T0);                       \
    }                                                                                                              \
    const int64_t param_row = grp * a.param_stride + n0;                                                           \
    for (int tile = 0; tile < tiles; ++tile) {                                                                     \
      const int32_t* tile_words = a.qweight + r0 * g.out + n0 + tile * kTileCols;                                  \
      const int32_t* w = tile_words;                                                                               \
      for (int64_t r = r0; kShared && r < r1; ++r, w += g.out) {                                                   \
        __m256i w_lo, w_hi;                                                                                        \
        BLOCKOPS_FIXED_LOAD_WORDS(w, w_lo, w_hi)                                                                   \
        __m256i* d = decoded + (r - r0) * kHalf * 2;                                                               \
        _Pragma("GCC unroll 8")                                                                                    \
        for (int j = 0; j < kHalf; ++j) {                                                                          \
          _mm256_store_si256(d + 2 * j, _mm256_and_si256(w_lo, mask));                                             \
          _mm256_store_si256(d + 2 * j + 1, _mm256_and_si256(w_hi, mask));                                         \
          w_lo = _mm256_srli_epi32(w_lo, kBits);                                                                   \
          w_hi = _mm256_srli_epi32(w_hi, kBits);                                                                   \
        }                                                                                                          \
      }                                                                                                            \
      const int64_t p = param_row + tile * kTileCols;                                                              \
      __m256 scale_lo, zero_lo, scale_hi, zero_hi;                                                                 \
      load_scale_zero8(a, p, scale_lo, zero_lo);                                                                   \
      load_scale_zero8(a, p + 8, scale_hi, zero_hi);                                                               \
      for (int64_t pm = 0; pm < rows; pm += kRowsPerPass) {                                                        \
        const int64_t n_pass = std::min<int64_t>(kRowsPerPass, rows - pm);                                        \
        const int32_t* xgroup = a.xpairs + (m0 + pm) * a.group_slot[g.groups()] * kHalf +                          \
                                a.group_slot[grp] * kHalf * n_pass;                                                \
        float* yt = &y[pm][tile * kTileCols];                                                                      \
        switch (n_pass) {                                                                                          \
          case 1: NAME##_pass<kBits, 1, kShared>(a, decoded, tile_words, r1 - r0, xgroup, m0 + pm, grp, scale_lo, zero_lo, scale_hi,    \
                                        zero_hi, yt, kBandCols); break;                                            \
          case 2: NAME##_pass<kBits, 2, kShared>(a, decoded, tile_words, r1 - r0, xgroup, m0 + pm, grp, scale_lo, zero_lo, scale_hi,    \
                                        zero_hi, yt, kBandCols); break;                                            \
          case 3: NAME##_pass<kBits, 3, kShared>(a, decoded, tile_words, r1 - r0, xgroup, m0 + pm, grp, scale_lo, zero_lo, scale_hi,    \
                                        zero_hi, yt, kBandCols); break;                                            \
          default: NAME##_pass<kBits, 4, kShared>(a, decoded, tile_words, r1 - r0, xgroup, m0 + pm, grp, scale_lo, zero_lo, scale_hi,   \
                                         zero_hi, yt, kBandCols); break;                                           \
        }                                                                                                          \
      }                                                                                                            \
    }                                                                                                              \
  }                                                                                                                \
  for (int64_t m = 0; m < rows; ++m)                                                                               \
    for (int c = 0; c < cols; c += 8) _mm256_storeu_ps(a.y + (m0 + m) * g.out + n0 + c, _mm256_load_ps(&y[m][c])); \
}

// One activation row, split by groups (split-K): the task's packed rows [grp0's first, grp1's last] are one
// contiguous stretch of qweight, walked in order across every full tile, so the hardware prefetchers stream it
// (the band walk's 1 KiB pieces at a stride of out * 4 bytes left a DRAM-resident layer at a third of the read
// bandwidth). A group is taken kSplitRows packed rows at a time across all tiles (a few streams the prefetchers
// follow), each tile's sums in registers over those rows; a group of more rows (long groups, e.g. ptq161's salient
// channels) carries its int32 sums from block to block in acc. y: this task's partial output over the full tiles.
#define BLOCKOPS_DEFINE_FIXED_SPLITK(NAME, TARGET, DOT)                                                             \
template <int kBits>                                                                                               \
TARGET void NAME(const GemvArgs& a, int64_t grp0, int64_t grp1, int tiles, int32_t* acc, float* y) {               \
  constexpr int kRows = 1;                                                                                         \
  BLOCKOPS_FIXED_BAND_CONSTANTS                                                                                    \
  (void)kBandCols;                                                                                                 \
  for (int c = 0; c < cols; ++c) y[c] = 0.f;                                                                       \
  for (int64_t grp = grp0; grp < grp1; ++grp) {                                                                    \
    const int64_t r0 = grp * g.group_size / kPer, r1 = ((grp + 1) * g.group_size + kPer - 1) / kPer;               \
    const int32_t* xgroup = a.xpairs + a.group_slot[grp] * kHalf;                                                  \
    const __m256 step = _mm256_broadcast_ss(a.xstep + grp);                                                        \
    const __m256 xs = _mm256_broadcast_ss(a.xsum + grp);                                                           \
    for (int64_t rb = r0; rb < r1; rb += kSplitRows) {                                                             \
      const int64_t re = std::min<int64_t>(r1, rb + kSplitRows);                                                   \
      for (int tile = 0; tile < tiles; ++tile) {                                                                   \
        __m256i s_lo[1] = {_mm256_setzero_si256()}, s_hi[1] = {_mm256_setzero_si256()};                           \
        const int32_t* w = a.qweight + rb * g.out + tile * kTileCols;                                              \
        const int32_t* xp = xgroup + (rb - r0) * kHalf;                                                            \
        for (int64_t r = rb; r < re; ++r, w += g.out, xp += kHalf) {                                               \
          __m256i w_lo, w_hi;                                                                                      \
          BLOCKOPS_FIXED_LOAD_WORDS(w, w_lo, w_hi)                                                                 \
          BLOCKOPS_FIXED_ROW_STEPS(DOT, BLOCKOPS_XPAIR_ONE)                                                        \
        }                                                                                                          \
        __m256i* at = reinterpret_cast<__m256i*>(acc + tile * kTileCols);                                          \
        if (rb != r0) { /* a long group: add the earlier blocks' sums */                                           \
          s_lo[0] = _mm256_add_epi32(s_lo[0], _mm256_loadu_si256(at));                                             \
          s_hi[0] = _mm256_add_epi32(s_hi[0], _mm256_loadu_si256(at + 1));                                         \
        }                                                                                                          \
        if (re != r1) {                                                                                            \
          _mm256_storeu_si256(at, s_lo[0]);                                                                        \
          _mm256_storeu_si256(at + 1, s_hi[0]);                                                                    \
          continue;                                                                                                \
        }                                                                                                          \
        const int64_t p = grp * a.param_stride + tile * kTileCols;                                                 \
        __m256 scale_lo, zero_lo, scale_hi, zero_hi;                                                               \
        load_scale_zero8(a, p, scale_lo, zero_lo);                                                          \
        load_scale_zero8(a, p + 8, scale_hi, zero_hi);                                                      \
        add_group8(y + tile * kTileCols, s_lo[0], step, xs, scale_lo, zero_lo);                                    \
        add_group8(y + tile * kTileCols + 8, s_hi[0], step, xs, scale_hi, zero_hi);                                \
      }                                                                                                            \
    }                                                                                                              \
  }                                                                                                                \
}

// The 2-bit split-K decode on AVX2 without VNNI (one row, groups of up to 128 inputs): bytes instead of int16 pairs.
// A packed 2-bit lane shifted right by 2 j and masked with 0x03 per byte holds codes 4 b + j in its bytes b, and
// _mm256_maddubs_epi16 multiplies those unsigned bytes by signed int8 activations, adding pairs into int16: with x16
// = 256 hi + lo split into two int8, two of them give what the int16 kernel's four steps give, for half the shifts
// and masks (4 steps of a word instead of 8). The int16 sums stay exact within a group: |code * int8| * 2 <= 768
// per product pair, 4 steps x 8 packed rows of them <= 24576; widened to int32 (x 256 for hi) once per group, they
// are the int16 kernel's sums exactly.
BLOCKOPS_TARGET_AVX2 void gemv_splitk_bytes_avx2(const GemvArgs& a, int64_t grp0, int64_t grp1, int tiles, float* y) {
  constexpr int kBits = 2;
  constexpr int kPer = 16;
  const Geometry& g = a.g;
  const __m256i mask = _mm256_set1_epi32(0x03030303);
  const __m256i times256 = _mm256_set1_epi16(256), ones = _mm256_set1_epi16(1);
  for (int c = 0; c < tiles * kTileCols; ++c) y[c] = 0.f;
  for (int64_t grp = grp0; grp < grp1; ++grp) {
    const int64_t r0 = grp * g.group_size / kPer, r1 = (grp + 1) * g.group_size / kPer;
    const __m256 step = _mm256_broadcast_ss(a.xstep + grp);
    const __m256 xs = _mm256_broadcast_ss(a.xsum + grp);
    for (int tile = 0; tile < tiles; ++tile) {
      __m256i hi_lo = _mm256_setzero_si256(), lo_lo = _mm256_setzero_si256();   // [high/low part][column half]
      __m256i hi_hi = _mm256_setzero_si256(), lo_hi = _mm256_setzero_si256();
      const int32_t* w = a.qweight + r0 * g.out + tile * kTileCols;
      const int32_t* xb = a.xbytes + r0 * 8;
      for (int64_t r = r0; r < r1; ++r, w += g.out, xb += 8) {
        __m256i w_lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
        __m256i w_hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 8));
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) {
          const __m256i c_lo = _mm256_and_si256(w_lo, mask), c_hi = _mm256_and_si256(w_hi, mask);
          w_lo = _mm256_srli_epi32(w_lo, kBits);
          w_hi = _mm256_srli_epi32(w_hi, kBits);
          const __m256i xh = _mm256_set1_epi32(xb[2 * j]), xl = _mm256_set1_epi32(xb[2 * j + 1]);
          hi_lo = _mm256_add_epi16(hi_lo, _mm256_maddubs_epi16(c_lo, xh));
          lo_lo = _mm256_add_epi16(lo_lo, _mm256_maddubs_epi16(c_lo, xl));
          hi_hi = _mm256_add_epi16(hi_hi, _mm256_maddubs_epi16(c_hi, xh));
          lo_hi = _mm256_add_epi16(lo_hi, _mm256_maddubs_epi16(c_hi, xl));
          asm("" : "+x"(hi_lo), "+x"(lo_lo), "+x"(hi_hi), "+x"(lo_hi));   // one register chain each
        }
      }
      const __m256i s_lo = _mm256_add_epi32(_mm256_madd_epi16(hi_lo, times256), _mm256_madd_epi16(lo_lo, ones));
      const __m256i s_hi = _mm256_add_epi32(_mm256_madd_epi16(hi_hi, times256), _mm256_madd_epi16(lo_hi, ones));
      const int64_t p = grp * a.param_stride + tile * kTileCols;
      __m256 scale_lo, zero_lo, scale_hi, zero_hi;
      load_scale_zero8(a, p, scale_lo, zero_lo);
      load_scale_zero8(a, p + 8, scale_hi, zero_hi);
      add_group8(y + tile * kTileCols, s_lo, step, xs, scale_lo, zero_lo);
      add_group8(y + tile * kTileCols + 8, s_hi, step, xs, scale_hi, zero_hi);
    }
  }
}

#define BLOCKOPS_DOT_AVX2(acc, codes, x) _mm256_add_epi32(acc, _mm256_madd_epi16(codes, x))
#define BLOCKOPS_DOT_VNNI(acc, codes, x) _mm256_dpwssd_epi32(acc, codes, x)
BLOCKOPS_DEFINE_FIXED_BATCH(gemm_band_fixed_avx2, BLOCKOPS_TARGET_AVX2, BLOCKOPS_DOT_AVX2)
BLOCKOPS_DEFINE_FIXED_BATCH(gemm_band_fixed_vnni, BLOCKOPS_TARGET_AVX512_VNNI, BLOCKOPS_DOT_VNNI)
BLOCKOPS_DEFINE_FIXED_SPLITK(gemv_splitk_fixed_avx2, BLOCKOPS_TARGET_AVX2, BLOCKOPS_DOT_AVX2)
BLOCKOPS_DEFINE_FIXED_SPLITK(gemv_splitk_fixed_vnni, BLOCKOPS_TARGET_AVX512_VNNI, BLOCKOPS_DOT_VNNI)

// One band of the fixed-point path, 2 or more rows: passes of the batched kernel.
template <int kBits>
void band_fixed(const GemvArgs& a, int64_t n0, int tiles, int64_t rows) {
  const bool vnni = cpu_has_avx512_vnni();
  // 2-bit codes cost two instructions a step to decode: each pass decodes its own in registers (from L1 memory they
  // ran 6% slower with VNNI); 3- and 4-bit ones are decoded once per super-pass (3-bit: also the spread).
  constexpr bool kShared = kBits != 2;
  constexpr int64_t kSuperRows = kSuperPasses * kRowsPerPass;
  for (int64_t m0 = 0; m0 < rows; m0 += kSuperRows) {
    const int64_t n = std::min(kSuperRows, rows - m0);
    vnni ? gemm_band_fixed_vnni<kBits, kShared>(a, n0, tiles, m0, n)
         : gemm_band_fixed_avx2<kBits, kShared>(a, n0, tiles, m0, n);
  }
}

template <int kBits>
BLOCKOPS_TARGET_AVX2 void gemv_rows_avx2(const GemvArgs& a, int64_t n0, int64_t m0, int rows) {
  switch (rows) {
    case 1: return gemv_tile_avx2<kBits, 1>(a, n0, m0);
    case 2: return gemv_tile_avx2<kBits, 2>(a, n0, m0);
    case 3: return gemv_tile_avx2<kBits, 3>(a, n0, m0);
    default: return gemv_tile_avx2<kBits, 4>(a, n0, m0);
  }
}
#endif

#if BLOCKOPS_X86_DISPATCH
// One row on the fixed-point path, split by groups (split-K): up to kSplitPieces pieces of consecutive groups, cut by
// the shape alone (not the thread count), each into its own partial output over the full tiles; the partials are
// added in piece order, so the result does not depend on which thread ran which piece (quant_linear runs the pieces
// in a parallel_for of their own, ptq161 beside its binary part: RowProduct). Measured, AVX2 path, one thread,
// w2g64 4096 x 11008 (the band kernel's walk before): tight loop 1.10 ms (1.3-1.6), after another layer's fp32
// F.linear 1.40 ms (2.3).
class SplitKRow {
 public:
  explicit SplitKRow(const GemvArgs& a)
      : a_(a),
        per_piece_((a.g.groups() + kSplitPieces - 1) / kSplitPieces),
        pieces_((a.g.groups() + per_piece_ - 1) / per_piece_),
        tiles_(a.g.out / kTileCols),
        partial_(std::make_unique_for_overwrite<float[]>(static_cast<size_t>(pieces_ * width()))),
        long_groups_((a.g.group_size + a.g.per_word() - 1) / a.g.per_word() + 1 > kSplitRows) {}
  int64_t pieces() const { return pieces_; }
  int64_t width() const { return tiles_ * kTileCols; }  // the full tiles' columns

  // Piece `piece` into its partial output; distinct pieces may run at once.
  void run(int64_t piece) const {
    // Sums carried between row blocks of a long group (not zero-filled: written before they are read).
    const auto acc = long_groups_ ? std::make_unique_for_overwrite<int32_t[]>(static_cast<size_t>(width())) : nullptr;
    const int64_t grp0 = piece * per_piece_, grp1 = std::min(a_.g.groups(), grp0 + per_piece_);
    float* y = partial_.get() + piece * width();
    const int tiles = static_cast<int>(tiles_);
    const bool vnni = cpu_has_avx512_vnni();
    switch (a_.g.bits) {
      case 2:
        if (a_.xbytes != nullptr) return gemv_splitk_bytes_avx2(a_, grp0, grp1, tiles, y);
        return vnni ? gemv_splitk_fixed_vnni<2>(a_, grp0, grp1, tiles, acc.get(), y)
                    : gemv_splitk_fixed_avx2<2>(a_, grp0, grp1, tiles, acc.get(), y);
      case 3:
        return vnni ? gemv_splitk_fixed_vnni<3>(a_, grp0, grp1, tiles, acc.get(), y)
                    : gemv_splitk_fixed_avx2<3>(a_, grp0, grp1, tiles, acc.get(), y);
      default:
        return vnni ? gemv_splitk_fixed_vnni<4>(a_, grp0, grp1, tiles, acc.get(), y)
                    : gemv_splitk_fixed_avx2<4>(a_, grp0, grp1, tiles, acc.get(), y);
    }
  }
  // y[c] for full-tile columns [c0, c1): the partials in piece order.
  void sum(float* y, int64_t c0, int64_t c1) const {
    for (int64_t c = c0; c < c1; ++c) {
      float total = partial_[c];
      for (int64_t piece = 1; piece < pieces_; ++piece) total += partial_[piece * width() + c];
      y[c] = total;
    }
  }

 private:
  const GemvArgs& a_;
  int64_t per_piece_, pieces_, tiles_;
  std::unique_ptr<float[]> partial_;
  bool long_groups_;
};

// The columns past the last full tile (out % 16), all rows: the portable kernel.
template <int kBits>
void gemv_partial_tile(const GemvArgs& a, int64_t rows) {
  const int64_t n0 = a.g.out / kTileCols * kTileCols;
  if (n0 == a.g.out) return;
  for (int64_t m0 = 0; m0 < rows; m0 += kRowsPerPass) {
    gemv_tile_portable<kBits>(a, n0, static_cast<int>(a.g.out - n0),
                              m0, static_cast<int>(std::min<int64_t>(kRowsPerPass, rows - m0)));
  }
}

// The fixed-point path (a.xpairs set): one row split-K, more rows in bands of full tiles; the partial tile at the
// end (out % 16 columns) goes to the portable kernel.
template <int kBits>
void gemv_fixed_point(const GemvArgs& a, int64_t rows) {
  const Geometry& g = a.g;
  const int64_t full = g.out / kTileCols;
  if (rows == 1 && full > 0) {
    const SplitKRow split(a);
    at::parallel_for(0, split.pieces(), 1, [&](int64_t begin, int64_t end) {
      for (int64_t piece = begin; piece < end; ++piece) split.run(piece);
    });
    at::parallel_for(0, split.width(), 4096, [&](int64_t c0, int64_t c1) { split.sum(a.y, c0, c1); });
  } else {
    const int64_t bands = (full + kBandTiles - 1) / kBandTiles;
    at::parallel_for(0, bands, 1, [&](int64_t begin, int64_t end) {
      for (int64_t band = begin; band < end; ++band) {
        band_fixed<kBits>(a, band * kBandTiles * kTileCols,
                          static_cast<int>(std::min<int64_t>(kBandTiles, full - band * kBandTiles)), rows);
      }
    });
  }
  gemv_partial_tile<kBits>(a, rows);
}
#endif

template <int kBits>
void gemv(const GemvArgs& a, int64_t rows) {
  const Geometry& g = a.g;
  const int64_t tiles = (g.out + kTileCols - 1) / kTileCols;
#if BLOCKOPS_X86_DISPATCH
  const bool avx2 = cpu_has_avx2_fma();
  if (a.xpairs != nullptr) return gemv_fixed_point<kBits>(a, rows);
#endif
  // One task per tile at least 16 tiles' worth of work: tiles are small, but the threads must not share
  // cache lines of y (a tile's outputs are 64 bytes, one line).
  at::parallel_for(0, tiles, 4, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t n0 = tile * kTileCols;
      const int ncols = static_cast<int>(std::min<int64_t>(kTileCols, g.out - n0));
      for (int64_t m0 = 0; m0 < rows; m0 += kRowsPerPass) {
        const int chunk = static_cast<int>(std::min<int64_t>(kRowsPerPass, rows - m0));
#if BLOCKOPS_X86_DISPATCH
        if (avx2 && ncols == kTileCols) {
          gemv_rows_avx2<kBits>(a, n0, m0, chunk);
          continue;
        }
#endif
        gemv_tile_portable<kBits>(a, n0, ncols, m0, chunk);
      }
    }
  });
}

// Inputs of the fixed-point kernels: int16 activations paired as they read them (xpairs int32: per pass of up to
// kRowsPerPass rows, [slots, p/2, rows of the pass], the rows interleaved so a step's broadcasts sit side by side;
// one row: [slots, p/2]), each group's first slot (group_slot [groups + 1] int64) and the fixed-point step per
// (row, group) (xstep [rows, groups]). The slots of group grp are the packed rows touching it,
// grp * g / p .. ceil((grp + 1) * g / p); inputs of another group in them are 0. With 2/4 bits p divides g, so a
// group's slots are exactly its rows; 3-bit rows (10 inputs) can straddle two groups and then sit in both, with
// complementary halves zeroed. Also the per-(row, group) sums of x (xsum [rows, groups], summed in 8 lanes in the
// pass that finds the groups' peaks: a reduction op of its own cost a few microseconds a call at one row).
void prepare_fixed_point(const at::Tensor& x32, const Geometry& g, at::Tensor& xpairs, at::Tensor& group_slot,
                         at::Tensor& xstep, at::Tensor& xsum, at::Tensor* xbytes = nullptr) {
  const int64_t rows = x32.size(0), gs = g.group_size;
  const int per = g.per_word(), half = per / 2;
  group_slot = at::empty({g.groups() + 1}, x32.options().dtype(at::kLong));
  int64_t* slot = group_slot.mutable_data_ptr<int64_t>();
  slot[0] = 0;
  for (int64_t grp = 0; grp < g.groups(); ++grp) slot[grp + 1] = slot[grp] + ((grp + 1) * gs + per - 1) / per - grp * gs / per;
  xpairs = at::empty({rows, slot[g.groups()], half}, x32.options().dtype(at::kInt));
  xstep = at::empty({rows, g.groups()}, x32.options());
  xsum = at::empty({rows, g.groups()}, x32.options());
  const float* x = x32.const_data_ptr<float>();
  int32_t* pairs = xpairs.mutable_data_ptr<int32_t>();
  float* steps = xstep.mutable_data_ptr<float>();
  float* sums = xsum.mutable_data_ptr<float>();
  int32_t* bytes = nullptr;
  if (xbytes != nullptr) {   // one row, 2-bit: [words][4 steps][high, low]
    *xbytes = at::empty({g.words(), 4, 2}, x32.options().dtype(at::kInt));
    bytes = xbytes->mutable_data_ptr<int32_t>();
  }
  // Rows are independent: one task per row (a decode call's single row stays on the calling thread).
  at::parallel_for(0, rows, 1, [&](int64_t row_begin, int64_t row_end) {
    std::vector<int16_t> fixed(g.in);
    for (int64_t m = row_begin; m < row_end; ++m) {
      const int64_t pass_m0 = m - m % kRowsPerPass, pass_rows = std::min<int64_t>(kRowsPerPass, rows - pass_m0);
      const int64_t pass_base = pass_m0 * slot[g.groups()] * half;
      const float* xm = x + m * g.in;
      for (int64_t grp = 0; grp < g.groups(); ++grp) {
        // 8 lanes each (groups are multiples of 16 inputs), so that the compiler vectorizes both.
        float peaks[8] = {}, parts[8] = {};
        for (int64_t k = grp * gs; k < (grp + 1) * gs; k += 8) {
          for (int l = 0; l < 8; ++l) {
            peaks[l] = std::max(peaks[l], std::abs(xm[k + l]));
            parts[l] += xm[k + l];
          }
        }
        float peak = 0.f, sum = 0.f;
        for (int l = 0; l < 8; ++l) {
          peak = std::max(peak, peaks[l]);
          sum += parts[l];
        }
        sums[m * g.groups() + grp] = sum;
        const float step = peak > 0.f ? peak / kFixedMax : 1.f;
        steps[m * g.groups() + grp] = step;
        for (int64_t k = grp * gs; k < (grp + 1) * gs; ++k) {
          fixed[k] = static_cast<int16_t>(std::nearbyint(xm[k] / step));
        }
      }
      // The byte kernel reads only xbytes: its xpairs stays allocated (the fixed-point path's marker, GemvArgs) but
      // unwritten.
      for (int64_t grp = 0; bytes == nullptr && grp < g.groups(); ++grp) {
        const int64_t r0 = grp * gs / per;
        auto in_group = [&](int64_t k) -> uint32_t {   // input k's int16 bits, 0 outside the group
          return k >= grp * gs && k < (grp + 1) * gs ? static_cast<uint16_t>(fixed[k]) : 0u;
        };
        for (int64_t s = slot[grp]; s < slot[grp + 1]; ++s) {
          const int64_t r = r0 + s - slot[grp];
          for (int j = 0; j < half; ++j) {
            pairs[pass_base + ((s * half) + j) * pass_rows + m - pass_m0] =
                static_cast<int32_t>(in_group(r * per + j) | (in_group(r * per + half + j) << 16));
          }
        }
      }
      if (bytes != nullptr) {
        for (int64_t r = 0; r < g.words(); ++r) {
          for (int j = 0; j < 4; ++j) {
            uint32_t high = 0, low = 0;
            for (int b = 0; b < 4; ++b) {
              const int32_t v = fixed[r * 16 + 4 * b + j];
              const int32_t h = (v + 128) >> 8;   // |v| <= kFixedMax: h and v - 256 h fit in int8
              high |= static_cast<uint32_t>(static_cast<uint8_t>(h)) << (8 * b);
              low |= static_cast<uint32_t>(static_cast<uint8_t>(v - 256 * h)) << (8 * b);
            }
            bytes[(r * 4 + j) * 2] = static_cast<int32_t>(high);
            bytes[(r * 4 + j) * 2 + 1] = static_cast<int32_t>(low);
          }
        }
      }
    }
  });
}

// Dequantizes output columns [n0, n0 + nb) of W_hat^T into out ([in, nb] fp32, row-major): the packed
// rows are walked in order and the loop over columns is unit-stride (vectorised). Scales and zeros are fp32
// [groups, out].
template <int kBits, typename T = float>
__attribute__((always_inline)) inline void dequant_cols_body(const int32_t* qweight, const T* scales,
                                                             const T* zeros, const Geometry& g, int64_t n0,
                                                             int64_t nb, T* out, int64_t r_begin, int64_t r_end) {
  constexpr int kPer = 32 / kBits;
  for (int64_t r = r_begin; r < r_end; ++r) {
    const uint32_t* w = reinterpret_cast<const uint32_t*>(qweight + r * g.out + n0);
    const int lanes = static_cast<int>(std::min<int64_t>(kPer, g.in - r * kPer));
    for (int t = 0; t < lanes; ++t) {
      const int64_t k = r * kPer + t;
      const T* s = scales + (k / g.group_size) * g.out + n0;
      const T* z = zeros + (k / g.group_size) * g.out + n0;
      T* dst = out + k * nb;
      for (int64_t c = 0; c < nb; ++c) {
        dst[c] = (static_cast<T>((w[c] >> (kBits * t)) & ((1u << kBits) - 1u)) - z[c]) * s[c];
      }
    }
  }
}

template <int kBits>
BLOCKOPS_TARGET_AVX2 void dequant_cols_avx2(const int32_t* q, const float* s, const float* z, const Geometry& g,
                                            int64_t n0, int64_t nb, float* out, int64_t rb, int64_t re) {
  dequant_cols_body<kBits>(q, s, z, g, n0, nb, out, rb, re);
}

template <int kBits>
void dequant_cols_portable(const int32_t* q, const float* s, const float* z, const Geometry& g, int64_t n0,
                           int64_t nb, float* out, int64_t rb, int64_t re) {
  dequant_cols_body<kBits>(q, s, z, g, n0, nb, out, rb, re);
}

// T = float: the AVX2 or portable copy; T = double (the fp64 path): the portable loop.
template <typename T>
void dequant_cols(const int32_t* qweight, const T* scales, const T* zeros, const Geometry& g, int64_t n0, int64_t nb,
                  T* out) {
  const bool avx2 = cpu_has_avx2_fma();
  BLOCKOPS_WEIGHT_BITS_SWITCH(g.bits, kBits, TORCH_INTERNAL_ASSERT(false, "bits ", g.bits), [&] {
    at::parallel_for(0, g.words(), 4, [&](int64_t rb, int64_t re) {
      if constexpr (std::is_same_v<T, float>) {
        avx2 ? dequant_cols_avx2<kBits>(qweight, scales, zeros, g, n0, nb, out, rb, re)
             : dequant_cols_portable<kBits>(qweight, scales, zeros, g, n0, nb, out, rb, re);
      } else {
        dequant_cols_body<kBits, T>(qweight, scales, zeros, g, n0, nb, out, rb, re);
      }
    });
  });
}


// Runs f(n0, nb, w) over blocks of kBlockRows output columns, w = W_hat^T[:, n0:n0+nb] as T [in, nb] (scales32
// and zeros32 in T: fp32, or fp64 on the fp64 path); one block buffer is reused, so at most kBlockRows * in
// values of W_hat exist at a time. With unit scales the block holds q - z instead (what the scales' gradient needs).
template <typename T = float, typename F>
void for_each_dequantized_block(const at::Tensor& qweight, const at::Tensor& scales32, const at::Tensor& zeros32,
                                const Geometry& g, F&& f) {
  at::Tensor buffer = at::empty({g.in * std::min(kBlockRows, g.out)}, scales32.options());
  for (int64_t n0 = 0; n0 < g.out; n0 += kBlockRows) {
    const int64_t nb = std::min(kBlockRows, g.out - n0);
    at::Tensor w = buffer.narrow(0, 0, g.in * nb).view({g.in, nb});
    dequant_cols<T>(qweight.const_data_ptr<int32_t>(), scales32.const_data_ptr<T>(), zeros32.const_data_ptr<T>(), g,
                    n0, nb, w.mutable_data_ptr<T>());
    f(n0, nb, w);
  }
}

// The decode kernels' inputs for x32 [rows, in] fp32 contiguous, output y [rows, out]: the per-group sums, the
// fixed-point activations where that path runs (fixed_point), fp32 copies of scales and zeros where a float or
// portable kernel reads them (the fixed-point kernel converts as it goes; the portable one takes the partial tile of
// columns at the end). The tensors own what args points to.
struct GemvInputs {
  at::Tensor x32, xsum, xpairs, group_slot, xstep, xbytes, s32, z32;
  GemvArgs args;
};

GemvInputs prepare_gemv(const at::Tensor& x32, const at::Tensor& qweight, const at::Tensor& scales,
                        const at::Tensor& zeros, const Geometry& g, bool fixed_point, float* y) {
  GemvInputs in;
  const int64_t rows = x32.size(0);
  in.x32 = x32;
  // The 2-bit byte kernel: one row, AVX2 without VNNI (vpdpwssd does the int16 steps in one instruction each),
  // groups of up to 128 inputs (its int16 sums' bound).
  const bool byte_kernel = fixed_point && rows == 1 && g.bits == 2 && g.group_size <= 128 && !cpu_has_avx512_vnni();
  if (fixed_point) {
    prepare_fixed_point(x32, g, in.xpairs, in.group_slot, in.xstep, in.xsum, byte_kernel ? &in.xbytes : nullptr);
  } else {
    in.xsum = x32.view({rows, g.groups(), g.group_size}).sum(-1).contiguous();
  }
  const bool need_f32 = !fixed_point || g.out % kTileCols != 0;
  if (need_f32) {
    in.s32 = contiguous_fp32(scales);
    in.z32 = contiguous_fp32(zeros);
  }
  in.args = GemvArgs{x32.const_data_ptr<float>(),
                     in.xsum.const_data_ptr<float>(),
                     fixed_point ? in.xpairs.const_data_ptr<int32_t>() : nullptr,
                     fixed_point ? in.group_slot.const_data_ptr<int64_t>() : nullptr,
                     fixed_point ? in.xstep.const_data_ptr<float>() : nullptr,
                     byte_kernel ? in.xbytes.const_data_ptr<int32_t>() : nullptr,
                     qweight.const_data_ptr<int32_t>(),
                     need_f32 ? in.s32.const_data_ptr<float>() : nullptr,
                     need_f32 ? in.z32.const_data_ptr<float>() : nullptr,
                     scales.const_data_ptr(),
                     zeros.const_data_ptr(),
                     dtype_of(scales.scalar_type()),
                     scales.size(0) == 1 ? 0 : g.out,
                     y,
                     g};
  return in;
}

at::Tensor quant_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                            const at::Tensor& zeros, int64_t bits, int64_t group_size,
                            const c10::optional<at::Tensor>& bias) {
  const Geometry g = check_weight(kLinear, qweight, scales, zeros, bits, group_size);
  check_activation(kLinear, "x", x, g.in, qweight);
  check_bias(bias, g.out, kLinear, qweight, "qweight");
  std::vector<int64_t> out_sizes = x.sizes().vec();
  out_sizes.back() = g.out;
  const int64_t rows = rows_of(x);
  if (rows == 0 || g.out == 0 || g.in == 0) return linear_without_products(out_sizes, bias, x.options());
  linear_counter.hit();
  const at::Tensor x2 = x.reshape({rows, g.in});
  if (any_fp64({&x, &scales})) {
    // The fp64 path: blocks of W_hat and the GEMM in fp64, y in x's dtype.
    const at::Tensor x64 = x2.to(at::kDouble).contiguous();
    at::Tensor y64 = at::empty({rows, g.out}, x64.options());
    for_each_dequantized_block<double>(qweight, contiguous_as<double>(scales), contiguous_as<double>(zeros), g,
                                       [&](int64_t n0, int64_t nb, const at::Tensor& w) {
                                         y64.narrow(1, n0, nb).copy_(at::mm(x64, w));
                                       });
    if (bias.has_value()) y64.add_(contiguous_as<double>(*bias));
    return y64.to(x.scalar_type()).view(out_sizes);
  }
  at::Tensor y32 = at::empty({rows, g.out}, x.options().dtype(at::kFloat));
  // bf16 activations on a CPU with bf16 dot products (cpu_has_bf16_gemm) above kCpuGemvMaxRows rows: the blocks
  // are rounded to bf16 too and multiplied by ATen's bf16 GEMM (what F.linear in bf16 does, with its accuracy),
  // 2-3x faster than the fp32 one there; elsewhere (AVX2) that GEMM is emulated and up to 20x slower.
  const bool bf16_gemm = x.scalar_type() == at::kBFloat16 && cpu_has_bf16_gemm();
  const bool fixed_point = cpu_has_avx2_fma() && g.group_size <= kCpuFixedPointMaxGroup;
  // The fixed-point kernels at any row count (measured on the AVX2 path, 4096 x 4096, one thread: 1.6x / 1.4x /
  // 1.35x faster than dequantized blocks + fp32 GEMM at 128 / 256 / 512 rows); the fp32 and portable decode
  // kernels up to kCpuGemvMaxRows.
  if (rows <= kCpuGemvMaxRows || (fixed_point && !bf16_gemm)) {
    const GemvInputs in = prepare_gemv(contiguous_fp32(x2), qweight, scales, zeros, g, fixed_point,
                                       y32.mutable_data_ptr<float>());
    const GemvArgs& a = in.args;
    switch (g.bits) {
      case 2: gemv<2>(a, rows); break;
      case 3: gemv<3>(a, rows); break;
      default: gemv<4>(a, rows); break;
    }
  } else {
    const at::Tensor xb = bf16_gemm ? x2 : contiguous_fp32(x2);
    for_each_dequantized_block(qweight, contiguous_fp32(scales), contiguous_fp32(zeros), g,
                               [&](int64_t n0, int64_t nb, const at::Tensor& w) {
                                 y32.narrow(1, n0, nb).copy_(at::mm(xb, bf16_gemm ? w.to(at::kBFloat16) : w));
                               });
  }
  if (bias.has_value()) y32.add_(contiguous_fp32(*bias));
  return y32.to(x.scalar_type()).view(out_sizes);
}

// W_hat [out, in] written directly: tasks take tiles of kTileCols output rows (one cache line of each packed
// row), and each packed word fills p consecutive entries of one output row, so reads and writes both stream.
template <typename T>
void dequant_rows(const int32_t* qweight, const T* scales, const T* zeros, const Geometry& g, T* out) {
  const int per = g.per_word();
  const uint32_t mask = (1u << g.bits) - 1u;
  const int64_t tiles = (g.out + kTileCols - 1) / kTileCols;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t n_end = std::min<int64_t>(g.out, (tile + 1) * kTileCols);
      for (int64_t r = 0; r < g.words(); ++r) {
        const int64_t k0 = r * per;
        const int lanes = static_cast<int>(std::min<int64_t>(per, g.in - k0));
        const int64_t grp0 = k0 / g.group_size;
        // A 3-bit word can cross one group boundary: lanes from `split` on belong to the next group.
        const int split = static_cast<int>(std::min<int64_t>(lanes, (grp0 + 1) * g.group_size - k0));
        for (int64_t n = tile * kTileCols; n < n_end; ++n) {
          const uint32_t w = static_cast<uint32_t>(qweight[r * g.out + n]);
          T* dst = out + n * g.in + k0;
          T s = scales[grp0 * g.out + n], z = zeros[grp0 * g.out + n];
          for (int t = 0; t < lanes; ++t) {
            if (t == split) {
              s = scales[(grp0 + 1) * g.out + n];
              z = zeros[(grp0 + 1) * g.out + n];
            }
            dst[t] = dequant(static_cast<int>((w >> (g.bits * t)) & mask), s, z);
          }
        }
      }
    }
  });
}

at::Tensor quant_dequantize_cpu(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
                                int64_t bits, int64_t group_size) {
  const Geometry g = check_weight(kDequant, qweight, scales, zeros, bits, group_size);
  dequant_counter.hit();
  return BLOCKOPS_FLOAT_SWITCH(scales.scalar_type() == at::kDouble, T, [&] {
    at::Tensor out = at::empty({g.out, g.in}, scales.options().dtype(c10::CppTypeToScalarType<T>::value));
    if (out.numel() == 0) return out.to(scales.scalar_type());
    const at::Tensor s32 = contiguous_as<T>(scales), z32 = contiguous_as<T>(zeros);
    dequant_rows<T>(qweight.const_data_ptr<int32_t>(), s32.const_data_ptr<T>(), z32.const_data_ptr<T>(), g,
                    out.mutable_data_ptr<T>());
    return out.to(scales.scalar_type());
  });
}

at::Tensor quant_linear_grad_input_cpu(const at::Tensor& grad_out, const at::Tensor& qweight, const at::Tensor& scales,
                                       const at::Tensor& zeros, int64_t bits, int64_t group_size) {
  const Geometry g = check_weight(kGradInput, qweight, scales, zeros, bits, group_size);
  check_activation(kGradInput, "grad_out", grad_out, g.out, qweight);
  std::vector<int64_t> out_sizes = grad_out.sizes().vec();
  out_sizes.back() = g.in;
  const int64_t rows = grad_out.numel() / std::max<int64_t>(g.out, 1);
  if (rows == 0 || g.in == 0) return at::zeros(out_sizes, grad_out.options());
  grad_input_counter.hit();
  // fp32, or fp64 when grad_out or the scales are (the fp64 path).
  return BLOCKOPS_FLOAT_SWITCH(any_fp64({&grad_out, &scales}), T, [&] {
    const at::Tensor gy = contiguous_as<T>(grad_out).reshape({rows, g.out});
    at::Tensor gx = at::zeros({rows, g.in}, gy.options());
    for_each_dequantized_block<T>(qweight, contiguous_as<T>(scales), contiguous_as<T>(zeros), g,
                                  [&](int64_t n0, int64_t nb, const at::Tensor& w) {
                                    gx.addmm_(gy.narrow(1, n0, nb), w.t());
                                  });
    return gx.to(grad_out.scalar_type()).view(out_sizes);
  });
}

at::Tensor quant_grad_scales_cpu(const at::Tensor& t, const at::Tensor& qweight, const at::Tensor& zeros, int64_t bits,
                                 int64_t group_size) {
  // zeros stands in for scales: the same shape and dtype rules apply to both.
  const Geometry g = check_weight(kGradScales, qweight, zeros, zeros, bits, group_size);
  check_t(kGradScales, t, g, qweight);
  grad_scales_counter.hit();
  // In t's dtype: fp32, or fp64 on the fp64 path (check_t allows fp64 t on the CPU only).
  return BLOCKOPS_FLOAT_SWITCH(t.scalar_type() == at::kDouble, T, [&] {
    at::Tensor grad = at::empty({g.groups(), g.out}, t.options());
    if (grad.numel() == 0) return grad;
    const at::Tensor ones = at::ones({g.groups(), g.out}, t.options());
    // Block of (q - z) [in, nb] times t^T, summed within each group.
    for_each_dequantized_block<T>(qweight, ones, contiguous_as<T>(zeros), g,
                                  [&](int64_t n0, int64_t nb, const at::Tensor& qz) {
                                    grad.narrow(1, n0, nb).copy_(at::mul(qz, t.narrow(0, n0, nb).t())
                                                                     .view({g.groups(), g.group_size, nb})
                                                                     .sum(1));
                                  });
    return grad;
  });
}

}  // namespace

// RowProduct (lowbit_cpu.h): the inputs prepare_gemv makes and the split-K plan over them, kept together. Without
// the x86 kernels nothing applies, so callers never construct one.
#if BLOCKOPS_X86_DISPATCH
struct RowProduct::State {
  GemvInputs in;
  std::unique_ptr<SplitKRow> split;
};

bool RowProduct::applies(const Geometry& g) {
  return cpu_has_avx2_fma() && g.group_size <= kCpuFixedPointMaxGroup && g.out >= kTileCols;
}

RowProduct::RowProduct(const at::Tensor& x32, const at::Tensor& qweight, const at::Tensor& scales,
                       const at::Tensor& zeros, const Geometry& g)
    : state_(std::make_unique<State>()) {
  TORCH_INTERNAL_ASSERT(applies(g) && x32.dim() == 2 && x32.size(0) == 1 && x32.scalar_type() == at::kFloat &&
                        x32.is_contiguous());
  linear_counter.hit();  // a quant_linear product, run by another family's op
  state_->in = prepare_gemv(x32, qweight, scales, zeros, g, /*fixed_point=*/true, /*y=*/nullptr);
  state_->split = std::make_unique<SplitKRow>(state_->in.args);
}

int64_t RowProduct::pieces() const { return state_->split->pieces(); }

void RowProduct::run(int64_t piece) const { state_->split->run(piece); }

int64_t RowProduct::width() const { return state_->split->width(); }

void RowProduct::sum(float* y, int64_t c0, int64_t c1) const { state_->split->sum(y, c0, c1); }

void RowProduct::partial_tile(float* y) const {
  GemvArgs a = state_->in.args;
  a.y = y;
  switch (a.g.bits) {
    case 2: gemv_partial_tile<2>(a, 1); break;
    case 3: gemv_partial_tile<3>(a, 1); break;
    default: gemv_partial_tile<4>(a, 1); break;
  }
}
#else
struct RowProduct::State {};
bool RowProduct::applies(const Geometry&) { return false; }
RowProduct::RowProduct(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const Geometry&) {
  TORCH_INTERNAL_ASSERT(false, "lowbit::RowProduct: this build has no x86 fixed-point kernels");
}
int64_t RowProduct::pieces() const { return 0; }
void RowProduct::run(int64_t) const {}
int64_t RowProduct::width() const { return 0; }
void RowProduct::sum(float*, int64_t, int64_t) const {}
void RowProduct::partial_tile(float*) const {}
#endif

RowProduct::~RowProduct() = default;

TORCH_LIBRARY_IMPL(blockops, CPU, m) {
  m.impl("quant_linear", &quant_linear_cpu);
  m.impl("quant_dequantize", &quant_dequantize_cpu);
  m.impl("quant_linear_grad_input", &quant_linear_grad_input_cpu);
  m.impl("quant_grad_scales", &quant_grad_scales_cpu);
}

}  // namespace blockops::lowbit
