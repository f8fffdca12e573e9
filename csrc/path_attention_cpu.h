// What the pieces of the PaTH attention CPU kernels share (internal to path_attention_cpu*.cpp): fp16/bf16/fp32/fp64
// row conversions, the matrix products and softmax exponentials on AVX2/FMA micro-kernels where the CPU has them
// (fp32; else, and for fp64, portable loops), pass 1 (each chunk's UT transform into its block, path_attention.h
// ChunkLayout) and the gate prefix; all templates on the compute type S (float, or double for fp64 inputs). The
// kernels themselves:
//   path_attention_cpu.cpp           forward, key cache, pass 1, the CPU glue registration
//   path_attention_cpu_backward.cpp  backward
//   path_attention_cpu_decode.cpp    decode step
// The argument checks are path_attention_op.cpp's, the math path_attention.h's.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu_common.h"
#include "cpu_features.h"
#include "macros.h"
#include "path_attention.h"
#include "path_attention_op.h"

namespace blockops::path_attention {

// The kernels are templates on the compute type S (path_attention.h): float for fp16/bf16/fp32 inputs, double for
// fp64 ones. The double instantiation runs the portable loops (the AVX2/FMA micro-kernels are fp32 only); fp64 is
// for gradcheck at tiny sizes, not for speed.
template <typename S>
constexpr S kNegInf = -std::numeric_limits<S>::infinity();

// ---------------------------------------------------------------------------------------------------------
// Rows of the inputs and outputs (each tensor in its own dtype, path_attention.h ParamsT)
// ---------------------------------------------------------------------------------------------------------

// n elements converted from src to dst (a plain copy when the types agree).
template <typename From, typename To>
inline void convert_n(const From* src, int n, To* dst) {
  if constexpr (std::is_same_v<From, To>) {
    std::copy_n(src, n, dst);
  } else {
    for (int x = 0; x < n; ++x) dst[x] = static_cast<To>(src[x]);
  }
}

// n elements of a tensor from element offset `off`, converted to S: fp16/bf16/fp32 for the float kernels, fp64
// for the double ones (the checks let fp64 through only with every floating input fp64: path_attention_op.h).
template <typename S>
inline void load_row(const void* base, DType dt, int64_t off, int n, S* dst) {
  if constexpr (std::is_same_v<S, double>) {
    TORCH_INTERNAL_ASSERT(dt == DType::kF64, "path_attention: a non-fp64 tensor reached the fp64 kernels");
    convert_n(static_cast<const double*>(base) + off, n, dst);
  } else {
    switch (dt) {
      case DType::kF32: return convert_n(static_cast<const float*>(base) + off, n, dst);
      case DType::kF16: return convert_n(static_cast<const c10::Half*>(base) + off, n, dst);
      case DType::kBF16: return convert_n(static_cast<const c10::BFloat16*>(base) + off, n, dst);
      case DType::kF64: TORCH_INTERNAL_ASSERT(false, "path_attention: an fp64 tensor reached the fp32 kernels");
    }
  }
}

template <typename S>
inline S load_one(const void* base, DType dt, int64_t off) {
  S x;
  load_row(base, dt, off, 1, &x);
  return x;
}

template <typename S>
inline void store_row(void* base, DType dt, int64_t off, int n, const S* src) {
  if constexpr (std::is_same_v<S, double>) {
    TORCH_INTERNAL_ASSERT(dt == DType::kF64, "path_attention: the fp64 kernels write fp64 outputs only");
    convert_n(src, n, static_cast<double*>(base) + off);
  } else {
    switch (dt) {
      case DType::kF32: return convert_n(src, n, static_cast<float*>(base) + off);
      case DType::kF16: return convert_n(src, n, static_cast<c10::Half*>(base) + off);
      case DType::kBF16: return convert_n(src, n, static_cast<c10::BFloat16*>(base) + off);
      case DType::kF64: TORCH_INTERNAL_ASSERT(false, "path_attention: the fp32 kernels write no fp64 output");
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Matrix products and exponentials
// ---------------------------------------------------------------------------------------------------------

// ---- portable primitives (any S): the innermost loop runs along a row of B and C, unit-stride, so the compiler
// vectorizes it without reassociating any sum.

// C [m, n] += alpha * op(A) B with op(A) = A [m, k] row-major, or with kTransA, A stored [k, m] (op(A) = A^T).
template <bool kTransA, typename S>
void gemm_portable(int m, int n, int k, S alpha, const S* A, int lda, const S* B, int ldb, S* C, int ldc) {
  for (int i = 0; i < m; ++i) {
    S* c = C + static_cast<int64_t>(i) * ldc;
    for (int kk = 0; kk < k; ++kk) {
      const S a = alpha * (kTransA ? A[static_cast<int64_t>(kk) * lda + i] : A[static_cast<int64_t>(i) * lda + kk]);
      const S* b = B + static_cast<int64_t>(kk) * ldb;
      for (int j = 0; j < n; ++j) c[j] += a * b[j];
    }
  }
}

// y[i] = exp(x[i] * mul - sub), exactly 0 where the argument is below kExpFloor (path_attention.h exp_or_zero).
template <typename S>
inline void exp_portable(const S* x, S* y, int n, S mul, S sub) {
  for (int i = 0; i < n; ++i) y[i] = exp_or_zero(x[i] * mul - sub);
}

#if BLOCKOPS_X86_DISPATCH
// ---- AVX2/FMA primitives

// An MB x (8 NV) block of C += alpha * op(A) B, accumulated over k in MB x NV registers (6 x 2: 12 of the 16 ymm,
// enough independent FMAs to cover their latency on two FMA pipes; 4 x 2 for the rest),
// so each row of B is loaded once per MB rows of A.
template <int MB, int NV, bool kTransA>
BLOCKOPS_TARGET_AVX2 inline void gemm_block_avx2(int k, float alpha, const float* A, int lda, const float* B, int ldb,
                                                 float* C, int ldc) {
  __m256 acc[MB][NV];
  for (int r = 0; r < MB; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
  for (int kk = 0; kk < k; ++kk) {
    __m256 b[NV];
    for (int v = 0; v < NV; ++v) b[v] = _mm256_loadu_ps(B + static_cast<int64_t>(kk) * ldb + 8 * v);
    for (int r = 0; r < MB; ++r) {
      const __m256 a = _mm256_set1_ps(kTransA ? A[static_cast<int64_t>(kk) * lda + r] : A[static_cast<int64_t>(r) * lda + kk]);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(a, b[v], acc[r][v]);
    }
  }
  const __m256 va = _mm256_set1_ps(alpha);
  for (int r = 0; r < MB; ++r)
    for (int v = 0; v < NV; ++v) {
      float* c = C + static_cast<int64_t>(r) * ldc + 8 * v;
      _mm256_storeu_ps(c, _mm256_fmadd_ps(va, acc[r][v], _mm256_loadu_ps(c)));
    }
}

template <int MB, bool kTransA>
BLOCKOPS_TARGET_AVX2 inline void gemm_rows_avx2(int n, int k, float alpha, const float* A, int lda, const float* B,
                                                int ldb, float* C, int ldc) {
  int j = 0;
  for (; j + 16 <= n; j += 16) gemm_block_avx2<MB, 2, kTransA>(k, alpha, A, lda, B + j, ldb, C + j, ldc);
  for (; j < n; j += 8) gemm_block_avx2<MB, 1, kTransA>(k, alpha, A, lda, B + j, ldb, C + j, ldc);
}

// Same contract as gemm_portable; n must be a multiple of 8 (C, D and Dv all are).
template <bool kTransA>
BLOCKOPS_TARGET_AVX2 void gemm_avx2(int m, int n, int k, float alpha, const float* A, int lda, const float* B, int ldb,
                                    float* C, int ldc) {
  auto rows = [&](int i) { return kTransA ? A + i : A + static_cast<int64_t>(i) * lda; };
  int i = 0;
  for (; i + 6 <= m; i += 6) gemm_rows_avx2<6, kTransA>(n, k, alpha, rows(i), lda, B, ldb, C + static_cast<int64_t>(i) * ldc, ldc);
  for (; i + 4 <= m; i += 4) gemm_rows_avx2<4, kTransA>(n, k, alpha, rows(i), lda, B, ldb, C + static_cast<int64_t>(i) * ldc, ldc);
  for (; i < m; ++i) gemm_rows_avx2<1, kTransA>(n, k, alpha, rows(i), lda, B, ldb, C + static_cast<int64_t>(i) * ldc, ldc);
}

// exp_portable, 8 lanes at a time: exp(v) = 2^(v log2 e) on cpu_common.h's exp2_avx2, masked to exactly 0 below
// kExpFloor (and for -inf) and NaN for NaN, as exp_or_zero (a NaN score or lse gives NaN probabilities). Relative error about 2e-7 + 6e-8 |v| (the polynomial, then
// the rounding of v log2 e), 4e-6 at the floor; v <= 0 here (scores minus their row's max, or lse), so the
// absolute error stays below about 2.5e-7 of the row's largest term, 1.
BLOCKOPS_TARGET_AVX2 inline void exp_avx2(const float* x, float* y, int n, float mul, float sub) {
  const __m256 vmul = _mm256_set1_ps(mul), vsub = _mm256_set1_ps(sub), floor = _mm256_set1_ps(kExpFloor);
  const __m256 log2e = _mm256_set1_ps(1.44269504f);
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_fmsub_ps(_mm256_loadu_ps(x + i), vmul, vsub);
    const __m256 keep = _mm256_cmp_ps(v, floor, _CMP_NLT_UQ);   // unordered (NaN) kept: NaN stays NaN
    _mm256_storeu_ps(y + i, _mm256_and_ps(exp2_avx2(_mm256_mul_ps(v, log2e)), keep));
  }
  for (; i < n; ++i) y[i] = exp_or_zero(x[i] * mul - sub);
}

// The largest of x[0, n), NaN when any is NaN (nan_max's fold; maxps alone would drop a NaN): max in 8 lanes,
// unordered lanes remembered apart.
BLOCKOPS_TARGET_AVX2 inline float row_max_avx2(const float* x, int n) {
  __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity()), nan = _mm256_setzero_ps();
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    m = _mm256_max_ps(m, v);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  if (_mm256_movemask_ps(nan) != 0) return std::numeric_limits<float>::quiet_NaN();
  float r = hmax_avx2(m);
  for (; i < n; ++i) r = nan_max(r, x[i]);
  return r;
}

// Sum of x[0, n) in 8 lanes.
BLOCKOPS_TARGET_AVX2 inline float row_sum_avx2(const float* x, int n) {
  __m256 acc = _mm256_setzero_ps();
  int i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(x + i));
  float r = hsum_avx2(acc);
  for (; i < n; ++i) r += x[i];
  return r;
}
#endif

// ---- dispatch (cpu_features.h: AVX2/FMA unless the CPU lacks it or BLOCKOPS_CPU_ISA=portable; fp32 only)

// C [m, n] += alpha * op(A) B as gemm_portable (n a multiple of 8), on the AVX2/FMA kernel for fp32 where the CPU
// has it. alpha is not deduced (a literal such as -1 serves both instantiations).
template <bool kTransA, typename S>
inline void gemm(int m, int n, int k, std::type_identity_t<S> alpha, const S* A, int lda, const S* B, int ldb, S* C,
                 int ldc) {
#if BLOCKOPS_X86_DISPATCH
  if constexpr (std::is_same_v<S, float>) {
    if (cpu_has_avx2_fma()) return gemm_avx2<kTransA>(m, n, k, alpha, A, lda, B, ldb, C, ldc);
  }
#endif
  gemm_portable<kTransA>(m, n, k, alpha, A, lda, B, ldb, C, ldc);
}

// C [m, n] += alpha * A [m, k] B [k, n] (row-major, leading dims given; n a multiple of 8).
template <typename S>
inline void matmul_acc(int m, int n, int k, std::type_identity_t<S> alpha, const S* A, int lda, const S* B, int ldb,
                       S* C, int ldc) {
  gemm<false, S>(m, n, k, alpha, A, lda, B, ldb, C, ldc);
}

// C [m, n] += alpha * A^T B with A [k, m], B [k, n] row-major: the gradient products summed over query rows.
template <typename S>
inline void matmul_tn_acc(int m, int n, int k, std::type_identity_t<S> alpha, const S* A, int lda, const S* B,
                          int ldb, S* C, int ldc) {
  gemm<true, S>(m, n, k, alpha, A, lda, B, ldb, C, ldc);
}

template <typename S>
inline void exp_row(const S* x, S* y, int n, std::type_identity_t<S> mul, std::type_identity_t<S> sub) {
#if BLOCKOPS_X86_DISPATCH
  if constexpr (std::is_same_v<S, float>) {
    if (cpu_has_avx2_fma()) return exp_avx2(x, y, n, mul, sub);
  }
#endif
  exp_portable(x, y, n, mul, sub);
}

// The largest of x[0, n), NaN when any is NaN (path_attention.h nan_max), -inf when n = 0 or all are -inf.
template <typename S>
inline S row_max(const S* x, int n) {
#if BLOCKOPS_X86_DISPATCH
  if constexpr (std::is_same_v<S, float>) {
    if (cpu_has_avx2_fma()) return row_max_avx2(x, n);
  }
#endif
  S m = kNegInf<S>;
  for (int i = 0; i < n; ++i) m = nan_max(m, x[i]);
  return m;
}

// Sum of x[0, n) (8 partial sums on the AVX2 path).
template <typename S>
inline S row_sum(const S* x, int n) {
#if BLOCKOPS_X86_DISPATCH
  if constexpr (std::is_same_v<S, float>) {
    if (cpu_has_avx2_fma()) return row_sum_avx2(x, n);
  }
#endif
  S s = 0;
  for (int i = 0; i < n; ++i) s += x[i];
  return s;
}

template <typename S>
inline S dot(const S* a, const S* b, int n) {
  S s = 0;
  for (int x = 0; x < n; ++x) s += a[x] * b[x];
  return s;
}

// ---------------------------------------------------------------------------------------------------------
// Pass 1 and the gate prefix (path_attention_cpu.cpp), shared by the forward, key cache and backward
// ---------------------------------------------------------------------------------------------------------

// One chunk's inputs in S and its UT quantities (path_attention.h), row-major [n, *] / [n, n].
// (The templates of this section are instantiated for float and double in path_attention_cpu.cpp.)
template <typename S>
struct ChunkMath {
  std::vector<S> W, K, beta, gram, wk, T, U, TDW, Kbar;
  std::vector<S> WT, KT;        // W^T, K^T [d, kChunk], zero beyond column n
  std::vector<S> full, Z, BW;   // scratch: [n, kChunk] products, Dg strictLower(wk) [n, kChunk], Dg W [n, d]

  // The n tokens starting at (b, t0) of key head hk.
  void compute(const ParamsT<S>& p, int64_t b, int64_t t0, int n, int64_t hk);
};

// Pass 1 for every (key head, chunk) into blocks [H, total chunks, lay.size()] (dtype kComputeDtype<S>,
// path_attention_op.h).
template <typename S>
at::Tensor prepare_all_chunks(const ParamsT<S>& p, const Chunking& ch, const ChunkLayout& lay);

// What the UT backward reads of a chunk's pass 1 beyond its block: beta [C], then gram, wk, T [n, n] (ChunkMath's
// layout), in kUtExtraFloats elements per chunk.
constexpr int64_t kUtExtraFloats = 3 * static_cast<int64_t>(kChunk) * kChunk + kChunk;

template <typename S>   // S or const S
struct UtExtra {
  S *beta, *gram, *wk, *T;
};

template <typename S>
inline UtExtra<S> ut_extra(S* e) {
  constexpr int64_t C = kChunk;
  return {e, e + C, e + C + C * C, e + C + 2 * C * C};
}

// Pass 1 for the chunks of one (sequence, key head), one after the other, into blocks [chunks_of(sp.len),
// lay.size()] (zeroed here block by block): what prepare_all_chunks computes for them, bit for bit. For callers
// whose tasks are (sequence, key head) (the backward): a per-thread buffer reused task after task, instead of one
// buffer for all heads paged in afresh every call. With `extra` (kUtExtraFloats per chunk), each chunk's beta,
// gram, wk and T too, so the backward's UT step need not run pass 1 again.
template <typename S>
void prepare_span_chunks(const ParamsT<S>& p, const Span& sp, int64_t hk, const ChunkLayout& lay, S* blocks,
                         ChunkMath<S>& cm, S* extra = nullptr);

// Carrying a query block of n rows across chunk c, Q0 <- Q0 - (Q0 W_c^T) TDW_c, costs 2 n C d FMAs as two rank-C
// products, or n d^2 as one product with P_c = I - W_c^T TDW_c [d, d], built once per (key head, chunk) for all
// the query chunks and heads that cross it: fewer for d < 2C (at d = 64 the forward does 3 instead of 4 products
// per pair of chunks, the backward 8 instead of 11). The kernels take the P_c path when this is true.
inline bool carry_by_matrix(int d) { return d < 2 * kChunk; }

// P_c for every (key head, chunk) of `blocks` (prepare_all_chunks): [H, total chunks, d * d] (with `transposed`,
// [H, total, 2 * d * d]: P_c, then P_c^T), dtype kComputeDtype<S>.
template <typename S>
at::Tensor carry_matrices(const at::Tensor& blocks, const ChunkLayout& lay, bool transposed);

// One chunk's P_c (then P_c^T with `transposed`) from its block, into P [(transposed ? 2 : 1) * d * d].
template <typename S>
void carry_matrix(const S* blk, const ChunkLayout& lay, bool transposed, S* P);

// G [B, HQ, T] = cumsum(g) within each sequence, summed in fp64 so long sequences keep G_i - G_j accurate
// (dtype kComputeDtype<S>).
template <typename S>
at::Tensor gate_prefix(const ParamsT<S>& p, const Chunking& ch);

// ---------------------------------------------------------------------------------------------------------
// The CPU entry points (registered in path_attention_cpu.cpp; schemas in ops.cpp)
// ---------------------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> path_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const at::Tensor& w, const at::Tensor& beta,
                                                      const c10::optional<at::Tensor>& g,
                                                      const c10::optional<at::Tensor>& cu_seqlens, double scale);

at::Tensor path_key_cache_cpu(const at::Tensor& k, const at::Tensor& w, const at::Tensor& beta,
                              const c10::optional<at::Tensor>& cu_seqlens);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> path_attention_backward_cpu(
    const at::Tensor& grad_o, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
    const at::Tensor& beta, const c10::optional<at::Tensor>& g, const c10::optional<at::Tensor>& cu_seqlens,
    const at::Tensor& o, const at::Tensor& lse, const c10::optional<at::Tensor>& grad_lse, double scale);

at::Tensor path_decode_step_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
                                const at::Tensor& beta, const c10::optional<at::Tensor>& g, const at::Tensor& keys,
                                const at::Tensor& values, const at::Tensor& lengths,
                                const c10::optional<at::Tensor>& gates, const c10::optional<at::Tensor>& g_last,
                                double scale);

}  // namespace blockops::path_attention
