// PaTH attention on the CPU: the chunked forward and backward kernels, the key cache and the decode step, and the
// argument checks shared with the CUDA glue (path_attention_op.h). The math and the chunked algorithm are in path_attention.h. The matrix products (64 x 64 x D tiles)
// and the exponentials run on AVX2/FMA micro-kernels where the CPU has them, else on portable loops.
//
// Work partition (forward):
//
//   pass 0  G = cumsum(g) per (sequence, query head), fp64 running sum      (only with the forget gate)
//   pass 1  one task per (key head, chunk): the chunk's UT transform, into a per-chunk fp32 block
//             WT [D, C] | TDW [C, D] | KT [D, C] | KbarT [D, C] | U [C, C] | V [C, Dv]
//           (transposed where the kernel multiplies by them from the right, so every inner loop is unit-stride)
//   pass 2  one task per (sequence, query head, query chunk), heaviest (latest) chunks first, taken from a
//           shared counter:
//             QW = Q W^T, M = Q K^T - tril(QW) U, Q0 = Q - tril(QW) TDW       intra-chunk logits, carried queries
//             online softmax over M (causal), then for key chunks c = cq-1 .. 0:
//               S = Q0 Kbar_c^T -> online softmax with V_c;  Q0 -= (Q0 W_c^T) TDW_c
//             o = acc / l, lse = m + log l
//
// Backward (path_attention_backward): pass 1 as above (plus the other orientation of each operand), then one
// task per (sequence, key head), which owns that head's dk, dv, dw, dbeta and the dq and dG of its query heads
// (deterministic, no atomics). Per query chunk cq of each query head of the group:
//   recompute QW, M and the carried queries Q0^(c) for c = cq-1 .. 0 (kept: cq x C x D floats)
//   P = exp(scale * (logit + gate) - lse), dL = scale * P * (dO V^T - Delta)     per key chunk, as in FA-2
//   left to right over c = 0 .. cq-1 with R = d loss / d Q0^(c):
//     back through Q0^(c-1) = Q0^(c) - (Q0^(c) W_c^T) TDW_c  ->  dTDW_c, dW_c, R
//     dV_c += P^T dO,  dKbar_c += dL^T Q0^(c),  R += dL Kbar_c
//   diagonal chunk: dQ = dM K + R + dQW W, and dK, dU, dTDW, dW of the chunk
// then each key chunk's accumulated dKbar, dTDW, dU go through the UT backward (path_attention.h, ut_backward).
//
// Key cache (path_key_cache): one task per (sequence, key head), chunks right to left, carrying the running
// product A = P_last ... P_{c+1} (P_c = I - W_c^T TDW_c, a D x D matrix) so each chunk's keys become A Kbar_c:
// O(T D^2) instead of applying every later chunk to every key.
//
// Decode step (path_decode_step): one task per (row, key head): one pass over the row's cached keys applies the
// new token's rank-1 update and takes the dots with the group's queries, a second pass over the values forms the
// outputs (path_attention.h, DecodeParams).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"
#include "cpu_features.h"
#include "glue.h"
#include "introspection.h"
#include "macros.h"
#include "path_attention.h"
#include "path_attention_op.h"

#if BLOCKOPS_X86_DISPATCH
#include <immintrin.h>
#endif

namespace blockops::path_attention {
namespace {

constexpr const char* kForward = "blockops.path_attention";
constexpr const char* kKeyCache = "blockops.path_key_cache";
constexpr const char* kBackward = "blockops.path_attention_backward";
constexpr const char* kDecode = "blockops.path_decode_step";
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

constexpr const char* kFamily = "path_attention";

KernelCounter forward_counter(kFamily, "path_attention.cpu");
KernelCounter key_cache_counter(kFamily, "path_key_cache.cpu");
KernelCounter backward_counter(kFamily, "path_attention_backward.cpu");
KernelCounter decode_counter(kFamily, "path_decode_step.cpu");
FamilyRegistration family(kFamily, cpu_isa_name);

// ---------------------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------------------

// n elements of a fp16/bf16/fp32 tensor from element offset `off`, widened to fp32.
void load_row(const void* base, DType dt, int64_t off, int n, float* dst) {
  switch (dt) {
    case DType::kF32: std::copy_n(static_cast<const float*>(base) + off, n, dst); break;
    case DType::kF16: {
      const c10::Half* src = static_cast<const c10::Half*>(base) + off;
      for (int x = 0; x < n; ++x) dst[x] = static_cast<float>(src[x]);
      break;
    }
    case DType::kBF16: {
      const c10::BFloat16* src = static_cast<const c10::BFloat16*>(base) + off;
      for (int x = 0; x < n; ++x) dst[x] = static_cast<float>(src[x]);
      break;
    }
  }
}

float load_one(const void* base, DType dt, int64_t off) {
  float x;
  load_row(base, dt, off, 1, &x);
  return x;
}

void store_row(void* base, DType dt, int64_t off, int n, const float* src) {
  switch (dt) {
    case DType::kF32: std::copy_n(src, n, static_cast<float*>(base) + off); break;
    case DType::kF16: {
      c10::Half* dst = static_cast<c10::Half*>(base) + off;
      for (int x = 0; x < n; ++x) dst[x] = static_cast<c10::Half>(src[x]);
      break;
    }
    case DType::kBF16: {
      c10::BFloat16* dst = static_cast<c10::BFloat16*>(base) + off;
      for (int x = 0; x < n; ++x) dst[x] = static_cast<c10::BFloat16>(src[x]);
      break;
    }
  }
}

// ---- portable primitives: the innermost loop runs along a row of B and C, unit-stride, so the compiler
// vectorizes it without reassociating any sum.

// C [m, n] += alpha * op(A) B with op(A) = A [m, k] row-major, or with kTransA, A stored [k, m] (op(A) = A^T).
template <bool kTransA>
void gemm_portable(int m, int n, int k, float alpha, const float* A, int lda, const float* B, int ldb, float* C,
                   int ldc) {
  for (int i = 0; i < m; ++i) {
    float* c = C + static_cast<int64_t>(i) * ldc;
    for (int kk = 0; kk < k; ++kk) {
      const float a = alpha * (kTransA ? A[static_cast<int64_t>(kk) * lda + i] : A[static_cast<int64_t>(i) * lda + kk]);
      const float* b = B + static_cast<int64_t>(kk) * ldb;
      for (int j = 0; j < n; ++j) c[j] += a * b[j];
    }
  }
}

// y[i] = exp(x[i] * mul - sub), exactly 0 where the argument is below -86 (or -inf: hidden keys).
constexpr float kExpFloor = -86.f;
float exp_or_zero(float v) { return v < kExpFloor ? 0.f : std::exp(v); }

void exp_portable(const float* x, float* y, int n, float mul, float sub) {
  for (int i = 0; i < n; ++i) y[i] = exp_or_zero(x[i] * mul - sub);
}

#if BLOCKOPS_X86_DISPATCH
// ---- AVX2/FMA primitives

// An MB x (8 NV) block of C += alpha * op(A) B, accumulated over k in MB x NV registers (4 x 2: 8 of the 16 ymm),
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
  for (; i + 4 <= m; i += 4) gemm_rows_avx2<4, kTransA>(n, k, alpha, rows(i), lda, B, ldb, C + static_cast<int64_t>(i) * ldc, ldc);
  for (; i < m; ++i) gemm_rows_avx2<1, kTransA>(n, k, alpha, rows(i), lda, B, ldb, C + static_cast<int64_t>(i) * ldc, ldc);
}

// exp_portable, 8 lanes at a time: round to the nearest power of 2, Cody-Waite reduction to |r| <= ln2 / 2, a
// degree-6 Taylor polynomial (relative error about 2e-7, below the fp32 rounding of the sums it feeds), and 2^e
// added to the exponent bits (e >= -124 after the clamp, so the result stays normal).
BLOCKOPS_TARGET_AVX2 void exp_avx2(const float* x, float* y, int n, float mul, float sub) {
  const __m256 vmul = _mm256_set1_ps(mul), vsub = _mm256_set1_ps(sub), floor = _mm256_set1_ps(kExpFloor);
  const __m256 log2e = _mm256_set1_ps(1.44269504f), ln2_hi = _mm256_set1_ps(0.693359375f),
               ln2_lo = _mm256_set1_ps(-2.12194440e-4f);
  constexpr float kCoef[] = {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f};
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_fmsub_ps(_mm256_loadu_ps(x + i), vmul, vsub);
    const __m256 c = _mm256_max_ps(v, floor);
    const __m256 e = _mm256_round_ps(_mm256_mul_ps(c, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 r = _mm256_fnmadd_ps(e, ln2_lo, _mm256_fnmadd_ps(e, ln2_hi, c));
    __m256 p = _mm256_set1_ps(kCoef[0]);
    for (int t = 1; t < 7; ++t) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kCoef[t]));
    const __m256i bits = _mm256_add_epi32(_mm256_castps_si256(p), _mm256_slli_epi32(_mm256_cvtps_epi32(e), 23));
    const __m256 keep = _mm256_cmp_ps(v, floor, _CMP_GE_OQ);
    _mm256_storeu_ps(y + i, _mm256_and_ps(_mm256_castsi256_ps(bits), keep));
  }
  for (; i < n; ++i) y[i] = exp_or_zero(x[i] * mul - sub);
}
#endif

// ---- dispatch (cpu_features.h: AVX2/FMA unless the CPU lacks it or BLOCKOPS_CPU_ISA=portable)

// C [m, n] += alpha * A [m, k] B [k, n] (row-major, leading dims given; n a multiple of 8).
void matmul_acc(int m, int n, int k, float alpha, const float* A, int lda, const float* B, int ldb, float* C,
                int ldc) {
#if BLOCKOPS_X86_DISPATCH
  if (cpu_has_avx2_fma()) return gemm_avx2<false>(m, n, k, alpha, A, lda, B, ldb, C, ldc);
#endif
  gemm_portable<false>(m, n, k, alpha, A, lda, B, ldb, C, ldc);
}

// C [m, n] += alpha * A^T B with A [k, m], B [k, n] row-major: the gradient products summed over query rows.
void matmul_tn_acc(int m, int n, int k, float alpha, const float* A, int lda, const float* B, int ldb, float* C,
                   int ldc) {
#if BLOCKOPS_X86_DISPATCH
  if (cpu_has_avx2_fma()) return gemm_avx2<true>(m, n, k, alpha, A, lda, B, ldb, C, ldc);
#endif
  gemm_portable<true>(m, n, k, alpha, A, lda, B, ldb, C, ldc);
}

void exp_row(const float* x, float* y, int n, float mul, float sub) {
#if BLOCKOPS_X86_DISPATCH
  if (cpu_has_avx2_fma()) return exp_avx2(x, y, n, mul, sub);
#endif
  exp_portable(x, y, n, mul, sub);
}

float dot(const float* a, const float* b, int n) {
  float s = 0.f;
  for (int x = 0; x < n; ++x) s += a[x] * b[x];
  return s;
}

// ---------------------------------------------------------------------------------------------------------
// Per-chunk block (pass 1)
// ---------------------------------------------------------------------------------------------------------

void transpose_into(int n, int d, const float* src, float* dst_t) {   // src [n, d] -> dst_t [d, kChunk]
  for (int a = 0; a < n; ++a)
    for (int x = 0; x < d; ++x) dst_t[static_cast<int64_t>(x) * kChunk + a] = src[a * d + x];
}

// One chunk's inputs in fp32 and its UT quantities (path_attention.h), row-major [n, *] / [n, n].
struct ChunkMath {
  std::vector<float> W, K, beta, gram, wk, T, U, TDW, Kbar;

  // The n tokens starting at (b, t0) of key head hk.
  void compute(const Params& p, int64_t b, int64_t t0, int n, int64_t hk) {
    const int d = p.head_dim;
    for (auto* m : {&W, &K, &TDW, &Kbar}) m->resize(static_cast<size_t>(n) * d);
    for (auto* m : {&gram, &wk, &T, &U}) m->resize(static_cast<size_t>(n) * n);
    beta.resize(n);
    for (int a = 0; a < n; ++a) {
      const int64_t tok = (b * p.seq_len + t0 + a) * p.kv_heads + hk;
      load_row(p.w, p.w_dtype, tok * d, d, W.data() + a * d);
      load_row(p.k, p.dtype, tok * d, d, K.data() + a * d);
      beta[a] = load_one(p.beta, p.beta_dtype, tok);
    }
    for (int a = 0; a < n; ++a) {
      for (int c = 0; c < n; ++c) {
        gram[a * n + c] = c < a ? dot(W.data() + a * d, W.data() + c * d, d) : 0.f;
        wk[a * n + c] = c < a ? dot(W.data() + a * d, K.data() + c * d, d) : 0.f;
      }
    }
    ut_inverse(n, gram.data(), beta.data(), T.data());
    ut_tdw(n, d, T.data(), beta.data(), W.data(), TDW.data());
    ut_key_coefficients(n, T.data(), beta.data(), wk.data(), U.data());
    ut_carry_keys(n, d, U.data(), W.data(), K.data(), Kbar.data());
  }
};

// Fills `block` (zeroed by the caller: padded rows/columns of a short last chunk must read as 0) for the n
// tokens starting at (b, t0) of key head hk.
void prepare_chunk(const Params& p, int64_t b, int64_t t0, int n, int64_t hk, const ChunkLayout& lay,
                   float* block, ChunkMath& cm) {
  const int d = p.head_dim, dv = p.v_dim;
  cm.compute(p, b, t0, n, hk);
  for (int a = 0; a < n; ++a)
    load_row(p.v, p.dtype, ((b * p.seq_len + t0 + a) * p.kv_heads + hk) * dv, dv, block + lay.v() + a * dv);
  std::copy_n(cm.TDW.data(), n * d, block + lay.tdw());
  for (int a = 0; a < n; ++a) std::copy_n(cm.U.data() + a * n, n, block + lay.u() + a * kChunk);
  transpose_into(n, d, cm.W.data(), block + lay.wt());
  transpose_into(n, d, cm.K.data(), block + lay.kt());
  transpose_into(n, d, cm.Kbar.data(), block + lay.kbart());
  if (lay.backward) {
    std::copy_n(cm.W.data(), n * d, block + lay.w());
    std::copy_n(cm.K.data(), n * d, block + lay.k());
    std::copy_n(cm.Kbar.data(), n * d, block + lay.kbar());
    transpose_into(n, d, cm.TDW.data(), block + lay.tdwt());
    transpose_into(n, n, cm.U.data(), block + lay.ut());
    transpose_into(n, dv, block + lay.v(), block + lay.vt());
  }
}

// ---------------------------------------------------------------------------------------------------------
// Sequences and chunks
// ---------------------------------------------------------------------------------------------------------

// Pass 1 for every (key head, chunk) into blocks [H, total chunks, lay.size()].
at::Tensor prepare_all_chunks(const Params& p, const Chunking& ch, const ChunkLayout& lay) {
  const int64_t total = ch.first_chunk.back();
  at::Tensor blocks = at::zeros({p.kv_heads, total, lay.size()}, at::kFloat);
  float* base = blocks.data_ptr<float>();
  at::parallel_for(0, p.kv_heads * total, 1, [&](int64_t begin, int64_t end) {
    ChunkMath cm;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t hk = task / total, gc = task % total;
      const int64_t s = std::upper_bound(ch.first_chunk.begin(), ch.first_chunk.end(), gc) - ch.first_chunk.begin() - 1;
      const Span& sp = ch.spans[s];
      const int64_t t0 = sp.start + (gc - ch.first_chunk[s]) * kChunk;
      const int n = static_cast<int>(std::min<int64_t>(kChunk, sp.start + sp.len - t0));
      prepare_chunk(p, sp.b, t0, n, hk, lay, base + task * lay.size(), cm);
    }
  });
  return blocks;
}

// ---------------------------------------------------------------------------------------------------------
// Forward (pass 2)
// ---------------------------------------------------------------------------------------------------------

// Running softmax state of up to kChunk query rows.
struct RowsState {
  std::vector<float> m, l, acc;   // [n], [n], [n, dv]
};

// Online-softmax update of rows [0, n) with scores S [n, kChunk] over nk keys (entries -inf where hidden) and
// values V [nk, dv]. S is overwritten with the probabilities.
void softmax_block(int n, int nk, int dv, float* S, const float* V, RowsState& st) {
  for (int a = 0; a < n; ++a) {
    float* s = S + a * kChunk;
    float bmax = kNegInf;
    for (int b = 0; b < nk; ++b) bmax = std::max(bmax, s[b]);
    if (bmax == kNegInf) continue;   // no visible key in this block
    const float f = softmax_rescale(st.m[a], bmax);
    float* acc = st.acc.data() + static_cast<int64_t>(a) * dv;
    if (f != 1.f) {
      st.l[a] *= f;
      for (int x = 0; x < dv; ++x) acc[x] *= f;
    }
    exp_row(s, s, nk, 1.f, st.m[a]);
    float sum = 0.f;
    for (int b = 0; b < nk; ++b) sum += s[b];
    st.l[a] += sum;
  }
  matmul_acc(n, dv, nk, 1.f, S, kChunk, V, dv, st.acc.data(), dv);
}

void forward_task(const Params& p, const Chunking& ch, const ChunkLayout& lay, const float* blocks,
                  const float* G, int64_t s, int64_t hq, int64_t cq, std::vector<float>& scratch, RowsState& st) {
  const int d = p.head_dim, dv = p.v_dim;
  const Span& sp = ch.spans[s];
  const int64_t hk = p.kv_head_of(hq);
  const int64_t t0 = sp.start + cq * kChunk;
  const int n = static_cast<int>(std::min<int64_t>(kChunk, sp.start + sp.len - t0));
  const int64_t total = ch.first_chunk.back();
  auto chunk = [&](int64_t c) { return blocks + (hk * total + ch.first_chunk[s] + c) * lay.size(); };
  const float* Grow = G == nullptr ? nullptr : G + (sp.b * p.heads + hq) * p.seq_len;

  scratch.assign(static_cast<size_t>(2 * kChunk * d + 2 * kChunk * kChunk), 0.f);
  float* Q = scratch.data();         // [n, d]
  float* Q0 = Q + kChunk * d;        // [n, d]
  float* QW = Q0 + kChunk * d;       // [n, kChunk]
  float* S = QW + kChunk * kChunk;   // [n, kChunk]
  for (int a = 0; a < n; ++a) load_row(p.q, p.dtype, ((sp.b * p.seq_len + t0 + a) * p.heads + hq) * d, d, Q + a * d);
  st.m.assign(n, kNegInf);
  st.l.assign(n, 0.f);
  st.acc.assign(static_cast<size_t>(n) * dv, 0.f);

  // Scores from logits: scale * (logit + G_i - G_j), keys of the block starting at token tk.
  auto finish_scores = [&](int64_t tk, int nk, bool causal) {
    for (int a = 0; a < n; ++a) {
      float* srow = S + a * kChunk;
      const float gi = Grow == nullptr ? 0.f : Grow[t0 + a];
      for (int b = 0; b < nk; ++b) {
        const float gate = Grow == nullptr ? 0.f : gi - Grow[tk + b];
        srow[b] = (causal && b > a) ? kNegInf : p.scale * (srow[b] + gate);
      }
    }
  };

  // Intra-chunk: M = Q K^T - tril(Q W^T) U;  Q0 = Q - tril(Q W^T) TDW.
  const float* blk = chunk(cq);
  matmul_acc(n, kChunk, d, 1.f, Q, d, blk + lay.wt(), kChunk, QW, kChunk);
  for (int a = 0; a < n; ++a) std::fill(QW + a * kChunk + a + 1, QW + (a + 1) * kChunk, 0.f);   // tril
  matmul_acc(n, kChunk, d, 1.f, Q, d, blk + lay.kt(), kChunk, S, kChunk);
  matmul_acc(n, kChunk, kChunk, -1.f, QW, kChunk, blk + lay.u(), kChunk, S, kChunk);
  std::copy_n(Q, n * d, Q0);
  matmul_acc(n, d, kChunk, -1.f, QW, kChunk, blk + lay.tdw(), d, Q0, d);
  finish_scores(t0, n, /*causal=*/true);
  softmax_block(n, n, dv, S, blk + lay.v(), st);

  // Earlier chunks, right to left (all of them full chunks).
  for (int64_t ck = cq - 1; ck >= 0; --ck) {
    const float* kb = chunk(ck);
    std::fill_n(S, n * kChunk, 0.f);
    matmul_acc(n, kChunk, d, 1.f, Q0, d, kb + lay.kbart(), kChunk, S, kChunk);
    finish_scores(sp.start + ck * kChunk, kChunk, /*causal=*/false);
    softmax_block(n, kChunk, dv, S, kb + lay.v(), st);
    if (ck > 0) {   // carry the queries across chunk ck: Q0 <- Q0 - (Q0 W^T) TDW
      std::fill_n(QW, n * kChunk, 0.f);
      matmul_acc(n, kChunk, d, 1.f, Q0, d, kb + lay.wt(), kChunk, QW, kChunk);
      matmul_acc(n, d, kChunk, -1.f, QW, kChunk, kb + lay.tdw(), d, Q0, d);
    }
  }

  for (int a = 0; a < n; ++a) {
    float* acc = st.acc.data() + static_cast<int64_t>(a) * dv;
    const float inv = 1.f / st.l[a];
    for (int x = 0; x < dv; ++x) acc[x] *= inv;
    const int64_t t = t0 + a;
    store_row(p.o, p.dtype, ((sp.b * p.seq_len + t) * p.heads + hq) * dv, dv, acc);
    p.lse[(sp.b * p.heads + hq) * p.seq_len + t] = st.m[a] + std::log(st.l[a]);
  }
}

// G [B, HQ, T] = cumsum(g) within each sequence, summed in fp64 so long sequences keep G_i - G_j accurate.
at::Tensor gate_prefix(const Params& p, const Chunking& ch) {
  at::Tensor G = at::zeros({p.batch, p.heads, p.seq_len}, at::kFloat);
  float* out = G.data_ptr<float>();
  const int64_t n_spans = static_cast<int64_t>(ch.spans.size());
  at::parallel_for(0, n_spans * p.heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const Span& sp = ch.spans[task / p.heads];
      const int64_t hq = task % p.heads;
      double run = 0.0;
      for (int64_t t = sp.start; t < sp.start + sp.len; ++t) {
        run += load_one(p.g, p.g_dtype, (sp.b * p.seq_len + t) * p.heads + hq);
        out[(sp.b * p.heads + hq) * p.seq_len + t] = static_cast<float>(run);
      }
    }
  });
  return G;
}

// ---------------------------------------------------------------------------------------------------------
// Argument checks and glue
// ---------------------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> path_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const at::Tensor& w, const at::Tensor& beta,
                                                      const c10::optional<at::Tensor>& g,
                                                      const c10::optional<at::Tensor>& cu_seqlens, double scale) {
  Params p = describe_forward(kForward, q, k, v, w, beta, g, cu_seqlens, scale);
  at::Tensor o = at::empty({p.batch, p.seq_len, p.heads, p.v_dim}, q.options());
  at::Tensor lse = at::empty({p.batch, p.heads, p.seq_len}, q.options().dtype(at::kFloat));
  p.o = o.data_ptr();
  p.lse = lse.data_ptr<float>();

  const Chunking ch = make_chunking(kForward, p.batch, p.seq_len, cu_seqlens);
  forward_counter.hit();
  if (ch.spans.empty()) return {o, lse};
  const ChunkLayout lay{p.head_dim, p.v_dim};
  const at::Tensor blocks = prepare_all_chunks(p, ch, lay);
  const at::Tensor G = g.has_value() ? gate_prefix(p, ch) : at::Tensor();

  // Tasks (span, query head, query chunk), the latest query chunks (most key chunks to walk) first.
  struct Task {
    int64_t s, hq, cq;
  };
  std::vector<Task> tasks;
  for (int64_t s = 0; s < static_cast<int64_t>(ch.spans.size()); ++s)
    for (int64_t hq = 0; hq < p.heads; ++hq)
      for (int64_t cq = 0; cq < chunks_of(ch.spans[s].len); ++cq) tasks.push_back(Task{s, hq, cq});
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.cq > b.cq; });
  std::atomic<int64_t> next{0};
  const int64_t n_tasks = static_cast<int64_t>(tasks.size());
  const float* blocks_ptr = blocks.data_ptr<float>();
  const float* G_ptr = G.defined() ? G.data_ptr<float>() : nullptr;
  at::parallel_for(0, std::min<int64_t>(n_tasks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    std::vector<float> scratch;
    RowsState st;
    for (int64_t i = next.fetch_add(1); i < n_tasks; i = next.fetch_add(1)) {
      const Task& t = tasks[i];
      forward_task(p, ch, lay, blocks_ptr, G_ptr, t.s, t.hq, t.cq, scratch, st);
    }
  });
  return {o, lse};
}

at::Tensor path_key_cache_cpu(const at::Tensor& k, const at::Tensor& w, const at::Tensor& beta,
                              const c10::optional<at::Tensor>& cu_seqlens) {
  const char* op = kKeyCache;
  Params p = describe_keys(op, k, w, beta, cu_seqlens);
  // prepare_chunk reads v; the cache needs none, so v is a zero-width view of k.
  p.v = p.k;
  p.v_dim = 0;
  at::Tensor out = at::empty(k.sizes(), k.options());
  const Chunking ch = make_chunking(op, p.batch, p.seq_len, cu_seqlens);
  key_cache_counter.hit();
  const int d = p.head_dim;
  const ChunkLayout lay{d, 0};
  const int64_t n_tasks = static_cast<int64_t>(ch.spans.size()) * p.kv_heads;
  at::parallel_for(0, n_tasks, 1, [&](int64_t begin, int64_t end) {
    ChunkMath cm;
    std::vector<float> block(lay.size());
    std::vector<float> A(static_cast<size_t>(d) * d), AW(static_cast<size_t>(d) * kChunk), KC(AW.size()),
        row(d);
    for (int64_t task = begin; task < end; ++task) {
      const Span& sp = ch.spans[task / p.kv_heads];
      const int64_t hk = task % p.kv_heads;
      std::fill(A.begin(), A.end(), 0.f);
      for (int x = 0; x < d; ++x) A[x * d + x] = 1.f;   // A = P_last ... P_{c+1}, identity for the last chunk
      for (int64_t c = chunks_of(sp.len) - 1; c >= 0; --c) {
        const int64_t t0 = sp.start + c * kChunk;
        const int n = static_cast<int>(std::min<int64_t>(kChunk, sp.start + sp.len - t0));
        std::fill(block.begin(), block.end(), 0.f);
        prepare_chunk(p, sp.b, t0, n, hk, lay, block.data(), cm);
        std::fill(KC.begin(), KC.end(), 0.f);   // KC [d, kChunk] = A Kbar^T
        matmul_acc(d, kChunk, d, 1.f, A.data(), d, block.data() + lay.kbart(), kChunk, KC.data(), kChunk);
        for (int a = 0; a < n; ++a) {
          for (int x = 0; x < d; ++x) row[x] = KC[x * kChunk + a];
          store_row(out.data_ptr(), p.dtype, ((sp.b * p.seq_len + t0 + a) * p.kv_heads + hk) * d, d, row.data());
        }
        if (c > 0) {   // A <- A P_c = A - (A W^T) TDW
          std::fill(AW.begin(), AW.end(), 0.f);
          matmul_acc(d, kChunk, d, 1.f, A.data(), d, block.data() + lay.wt(), kChunk, AW.data(), kChunk);
          matmul_acc(d, d, kChunk, -1.f, AW.data(), kChunk, block.data() + lay.tdw(), d, A.data(), d);
        }
      }
    }
  });
  return out;
}


// ---------------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------------

struct BwdBuffers {
  const void* grad_o;          // [B, T, HQ, Dv], q's dtype
  const void* o;               // [B, T, HQ, Dv], q's dtype
  const float* lse;            // [B, HQ, T]
  const float* grad_lse;       // [B, HQ, T] or null
  const float* G;              // [B, HQ, T] or null (no gate)
  float* dq;                   // [B, T, HQ, D] fp32
  float* dk;                   // [B, T, H, D] fp32
  float* dv;                   // [B, T, H, Dv] fp32
  float* dw;                   // [B, T, H, D] fp32
  float* dbeta;                // [B, T, H] fp32
  float* dG;                   // [B, HQ, T] fp32 (gradient at G = cumsum(g))
};

// Gradient accumulators of one (sequence, key head): per chunk of the sequence, rows kChunk apart.
struct KeyGrads {
  std::vector<float> dKbar, dTDW, dU, dW, dK, dV;   // [nc * C, D] except dU [nc, C, C], dV [nc * C, Dv]
};

// One query chunk cq of query head hq (the sequence's chunk blocks prepared with lay.backward): recomputes the
// carried queries Q0^(c), the probabilities from lse, and sends the gradients to dq (written), the key chunks'
// accumulators g and dG (row of this head).
void backward_query_chunk(const Params& p, const BwdBuffers& bb, const Span& sp, const ChunkLayout& lay,
                          const float* blocks, int64_t hq, int64_t cq, KeyGrads& g, std::vector<float>& buf) {
  const int d = p.head_dim, dv = p.v_dim, C = kChunk;
  const int64_t t0 = sp.start + cq * C;
  const int n = static_cast<int>(std::min<int64_t>(C, sp.start + sp.len - t0));
  const int64_t row = (sp.b * p.heads + hq) * p.seq_len;
  auto chunk = [&](int64_t c) { return blocks + c * lay.size(); };
  buf.assign(static_cast<size_t>(query_chunk_scratch_floats(cq, d, dv)), 0.f);
  const auto [states, Q, R, dQ, Y, QW, S, dL, dM, dQW, dO, Ob, delta, lse, Gq] =
      query_chunk_scratch(buf.data(), cq, d, dv);
  for (int a = 0; a < n; ++a) {
    const int64_t tok = (sp.b * p.seq_len + t0 + a) * p.heads + hq;
    load_row(p.q, p.dtype, tok * d, d, Q + a * d);
    load_row(bb.grad_o, p.dtype, tok * dv, dv, dO + a * dv);
    load_row(bb.o, p.dtype, tok * dv, dv, Ob + a * dv);
    delta[a] = dot(dO + a * dv, Ob + a * dv, dv) - (bb.grad_lse ? bb.grad_lse[row + t0 + a] : 0.f);
    lse[a] = bb.lse[row + t0 + a];
    Gq[a] = bb.G ? bb.G[row + t0 + a] : 0.f;
  }

  // Probabilities of the logits in S (keys from token tk; causal within the diagonal chunk, whose n keys may be
  // fewer than C), then dL, dV, dG. Entries of hidden keys are 0.
  auto probs_and_grads = [&](const float* kb, int64_t tk, bool causal, int64_t c) {
    const int nk = causal ? n : C;
    for (int a = 0; a < n; ++a) {
      float* srow = S + a * C;
      const int visible = causal ? a + 1 : nk;
      if (bb.G)
        for (int b = 0; b < visible; ++b) srow[b] += Gq[a] - bb.G[row + tk + b];
      exp_row(srow, srow, visible, p.scale, lse[a]);
      std::fill(srow + visible, srow + C, 0.f);
    }
    std::fill_n(dL, n * C, 0.f);   // dP = dO V^T
    matmul_acc(n, C, dv, 1.f, dO, dv, kb + lay.vt(), C, dL, C);
    for (int a = 0; a < n; ++a) {
      float rowsum = 0.f;
      for (int b = 0; b < C; ++b) {
        dL[a * C + b] = p.scale * S[a * C + b] * (dL[a * C + b] - delta[a]);
        rowsum += dL[a * C + b];
      }
      bb.dG[row + t0 + a] += rowsum;
      for (int b = 0; b < nk; ++b) bb.dG[row + tk + b] -= dL[a * C + b];
    }
    matmul_tn_acc(C, dv, n, 1.f, S, C, dO, dv, g.dV.data() + c * C * dv, dv);
  };

  // Recompute: QW = tril(Q W^T), M = Q K^T - QW U (in S), Q0^(cq-1) = Q - QW TDW, then Q0^(c-1) from Q0^(c).
  const float* blk = chunk(cq);
  matmul_acc(n, C, d, 1.f, Q, d, blk + lay.wt(), C, QW, C);
  for (int a = 0; a < n; ++a) std::fill(QW + a * C + a + 1, QW + (a + 1) * C, 0.f);
  matmul_acc(n, C, d, 1.f, Q, d, blk + lay.kt(), C, S, C);
  matmul_acc(n, C, C, -1.f, QW, C, blk + lay.u(), C, S, C);
  if (cq > 0) {
    float* q0 = states + (cq - 1) * C * d;
    std::copy_n(Q, n * d, q0);
    matmul_acc(n, d, C, -1.f, QW, C, blk + lay.tdw(), d, q0, d);
    for (int64_t c = cq - 1; c > 0; --c) {
      const float* kb = chunk(c);
      float* prev = states + c * C * d;
      float* next = states + (c - 1) * C * d;
      std::fill_n(Y, n * C, 0.f);
      matmul_acc(n, C, d, 1.f, prev, d, kb + lay.wt(), C, Y, C);
      std::copy_n(prev, n * d, next);
      matmul_acc(n, d, C, -1.f, Y, C, kb + lay.tdw(), d, next, d);
    }
  }
  probs_and_grads(blk, t0, /*causal=*/true, cq);
  std::copy_n(dL, n * C, dM);

  // Earlier chunks, left to right: R arrives as d loss / d Q0^(c-1).
  for (int64_t c = 0; c < cq; ++c) {
    const float* kb = chunk(c);
    const float* q0 = states + c * C * d;
    float* Yc = Y;   // [n, C]
    if (c > 0) {     // back through Q0^(c-1) = Q0^(c) - Yc TDW_c, Yc = Q0^(c) W_c^T
      std::fill_n(Yc, n * C, 0.f);
      matmul_acc(n, C, d, 1.f, q0, d, kb + lay.wt(), C, Yc, C);
      matmul_tn_acc(C, d, n, -1.f, Yc, C, R, d, g.dTDW.data() + c * C * d, d);
      std::fill_n(dQW, n * C, 0.f);   // dYc = -R TDW_c^T
      matmul_acc(n, C, d, -1.f, R, d, kb + lay.tdwt(), C, dQW, C);
      matmul_tn_acc(C, d, n, 1.f, dQW, C, q0, d, g.dW.data() + c * C * d, d);
      matmul_acc(n, d, C, 1.f, dQW, C, kb + lay.w(), d, R, d);
    }
    std::fill_n(S, n * C, 0.f);
    matmul_acc(n, C, d, 1.f, q0, d, kb + lay.kbart(), C, S, C);
    probs_and_grads(kb, sp.start + c * C, /*causal=*/false, c);
    matmul_tn_acc(C, d, n, 1.f, dL, C, q0, d, g.dKbar.data() + c * C * d, d);
    matmul_acc(n, d, C, 1.f, dL, C, kb + lay.kbar(), d, R, d);
  }

  // Diagonal chunk: M = Q K^T - QW U and Q0^(cq-1) = Q - QW TDW (R is its gradient; zero when cq = 0).
  float* dUc = g.dU.data() + cq * C * C;
  std::copy_n(R, n * d, dQ);
  matmul_acc(n, d, C, 1.f, dM, C, blk + lay.k(), d, dQ, d);
  std::fill_n(dQW, n * C, 0.f);
  matmul_acc(n, C, C, -1.f, dM, C, blk + lay.ut(), C, dQW, C);
  matmul_acc(n, C, d, -1.f, R, d, blk + lay.tdwt(), C, dQW, C);
  for (int a = 0; a < n; ++a) std::fill(dQW + a * C + a + 1, dQW + (a + 1) * C, 0.f);
  matmul_acc(n, d, C, 1.f, dQW, C, blk + lay.w(), d, dQ, d);
  matmul_tn_acc(C, d, n, 1.f, dM, C, Q, d, g.dK.data() + cq * C * d, d);
  matmul_tn_acc(C, C, n, -1.f, QW, C, dM, C, dUc, C);
  matmul_tn_acc(C, d, n, -1.f, QW, C, R, d, g.dTDW.data() + cq * C * d, d);
  matmul_tn_acc(C, d, n, 1.f, dQW, C, Q, d, g.dW.data() + cq * C * d, d);
  for (int a = 0; a < n; ++a) std::copy_n(dQ + a * d, d, bb.dq + ((sp.b * p.seq_len + t0 + a) * p.heads + hq) * d);
}

// One (sequence, key head): every query chunk of every query head of the group, then each key chunk's UT
// backward. The task owns all the gradient rows it writes.
void backward_task(const Params& p, const BwdBuffers& bb, const Span& sp, int64_t hk, const ChunkLayout& lay,
                   const float* blocks) {
  const int d = p.head_dim, dv = p.v_dim, C = kChunk;
  const int64_t nc = chunks_of(sp.len), group = p.heads / p.kv_heads;
  KeyGrads g;
  for (auto* m : {&g.dKbar, &g.dTDW, &g.dW, &g.dK}) m->assign(static_cast<size_t>(nc * C * d), 0.f);
  g.dU.assign(static_cast<size_t>(nc * C * C), 0.f);
  g.dV.assign(static_cast<size_t>(nc * C * dv), 0.f);
  std::vector<float> buf;
  for (int64_t hq = hk * group; hq < (hk + 1) * group; ++hq)
    for (int64_t cq = 0; cq < nc; ++cq) backward_query_chunk(p, bb, sp, lay, blocks, hq, cq, g, buf);

  ChunkMath cm;
  std::vector<float> dU(C * C), dT(C * C), dZ(C * C), tmp(C * C), dA(C * C), dY(C * d), dbeta(C);
  for (int64_t c = 0; c < nc; ++c) {
    const int64_t t0 = sp.start + c * C;
    const int n = static_cast<int>(std::min<int64_t>(C, sp.start + sp.len - t0));
    cm.compute(p, sp.b, t0, n, hk);
    for (int a = 0; a < n; ++a) std::copy_n(g.dU.data() + (c * C + a) * C, n, dU.data() + a * n);   // [n, n]
    float* dW = g.dW.data() + c * C * d;
    float* dK = g.dK.data() + c * C * d;
    std::fill(dbeta.begin(), dbeta.end(), 0.f);
    const UtGrad ug{n, d, cm.W.data(), cm.K.data(), cm.beta.data(), cm.gram.data(), cm.wk.data(), cm.T.data(),
                    cm.U.data(), g.dKbar.data() + c * C * d, g.dTDW.data() + c * C * d, dU.data(), dT.data(),
                    dZ.data(), tmp.data(), dA.data(), dY.data()};
    ut_backward(ug, dW, dK, dbeta.data());
    for (int a = 0; a < n; ++a) {
      const int64_t tok = (sp.b * p.seq_len + t0 + a) * p.kv_heads + hk;
      std::copy_n(dW + a * d, d, bb.dw + tok * d);
      std::copy_n(dK + a * d, d, bb.dk + tok * d);
      std::copy_n(g.dV.data() + (c * C + a) * dv, dv, bb.dv + tok * dv);
      bb.dbeta[tok] = dbeta[a];
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> path_attention_backward_cpu(
    const at::Tensor& grad_o, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
    const at::Tensor& beta, const c10::optional<at::Tensor>& g, const c10::optional<at::Tensor>& cu_seqlens,
    const at::Tensor& o, const at::Tensor& lse, const c10::optional<at::Tensor>& grad_lse, double scale) {
  const char* op = kBackward;
  Params p = describe_forward(op, q, k, v, w, beta, g, cu_seqlens, scale);
  check_backward_inputs(op, p, q, grad_o, o, lse, grad_lse);
  backward_counter.hit();
  const at::TensorOptions f32 = q.options().dtype(at::kFloat);
  at::Tensor dq = at::zeros(q.sizes(), f32), dk = at::zeros(k.sizes(), f32), dv = at::zeros(v.sizes(), f32);
  at::Tensor dw = at::zeros(k.sizes(), f32), dbeta = at::zeros(beta.sizes(), f32);
  at::Tensor dG = at::zeros({p.batch, p.heads, p.seq_len}, f32);
  const Chunking ch = make_chunking(op, p.batch, p.seq_len, cu_seqlens);
  const at::Tensor G = g.has_value() ? gate_prefix(p, ch) : at::Tensor();
  BwdBuffers bb{grad_o.data_ptr(), o.data_ptr(), lse.data_ptr<float>(),
                grad_lse.has_value() ? grad_lse->data_ptr<float>() : nullptr,
                G.defined() ? G.data_ptr<float>() : nullptr, dq.data_ptr<float>(), dk.data_ptr<float>(),
                dv.data_ptr<float>(), dw.data_ptr<float>(), dbeta.data_ptr<float>(), dG.data_ptr<float>()};
  if (!ch.spans.empty()) {
    ChunkLayout lay{p.head_dim, p.v_dim};
    lay.backward = true;
    const at::Tensor blocks = prepare_all_chunks(p, ch, lay);
    const int64_t total = ch.first_chunk.back();
    const int64_t n_tasks = static_cast<int64_t>(ch.spans.size()) * p.kv_heads;
    at::parallel_for(0, n_tasks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t s = task / p.kv_heads, hk = task % p.kv_heads;
        backward_task(p, bb, ch.spans[s], hk, lay, blocks.data_ptr<float>() + (hk * total + ch.first_chunk[s]) * lay.size());
      }
    });
  }
  // dg_t = sum_{u >= t} dG_u within each sequence (G = cumsum(g)), then [B, HQ, T] -> [B, T, HQ].
  float* dGp = dG.data_ptr<float>();
  for (const Span& sp : ch.spans) {
    for (int64_t hq = 0; hq < p.heads; ++hq) {
      float* row = dGp + (sp.b * p.heads + hq) * p.seq_len;
      for (int64_t t = sp.start + sp.len - 2; t >= sp.start; --t) row[t] += row[t + 1];
    }
  }
  at::Tensor dg = dG.transpose(1, 2).contiguous();
  auto as = [](const at::Tensor& t, const at::Tensor& like) { return t.to(like.scalar_type()); };
  return {as(dq, q), as(dk, k), as(dv, v), as(dw, w), as(dbeta, beta), g.has_value() ? as(dg, *g) : dg};
}


// ---------------------------------------------------------------------------------------------------------
// Decode step (path_decode_step)
// ---------------------------------------------------------------------------------------------------------

// Dot product in 8 independent lanes (n a multiple of 8): the compiler turns it into one vector FMA chain where
// the ISA has one, without reassociating a single running sum.
[[gnu::always_inline]] inline float dot8(const float* a, const float* b, int n) {
  float acc[8] = {};
  for (int x = 0; x < n; x += 8)
    for (int l = 0; l < 8; ++l) acc[l] += a[x + l] * b[x + l];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// One (row b, key head hk): one pass over the cached keys applies the rank-1 update and takes the group's query
// dots, a second pass over the values accumulates the outputs. scratch: (group + 1) * (len + 1) + group * D + D +
// Dv floats.
[[gnu::always_inline]] inline void decode_task_body(const DecodeParams& p, int64_t b, int64_t hk, float* scratch) {
  const int d = p.head_dim, dv = p.v_dim;
  const int64_t group = p.heads / p.kv_heads, len = p.lengths[b], L = p.capacity;
  float* scores = scratch;                  // [group, len + 1]
  float* q = scores + group * (len + 1);    // [group, d]
  float* w = q + group * d;                 // [d]
  float* acc = w + d;                       // [dv]
  const int64_t kv_tok = b * p.kv_heads + hk;
  load_row(p.w, p.w_dtype, kv_tok * d, d, w);
  const float beta = load_one(p.beta, p.beta_dtype, kv_tok);
  float g_last[kMaxDecodeGroup];
  for (int64_t gi = 0; gi < group; ++gi) {
    const int64_t hq = hk * group + gi;
    load_row(p.q, p.dtype, (b * p.heads + hq) * d, d, q + gi * d);
    if (p.gates != nullptr) {
      float& gl = p.g_last[b * p.heads + hq];
      gl += load_one(p.g, p.g_dtype, b * p.heads + hq);
      p.gates[(b * p.heads + hq) * L + len] = gl;
      g_last[gi] = gl;
    }
  }
  float* keys = p.keys + kv_tok * L * d;
  float* values = p.values + kv_tok * L * dv;
  load_row(p.k, p.dtype, kv_tok * d, d, keys + len * d);
  load_row(p.v, p.dtype, kv_tok * dv, dv, values + len * dv);
  for (int64_t j = 0; j <= len; ++j) {
    float* kj = keys + j * d;
    if (j < len) {
      const float c = beta * dot8(kj, w, d);
      for (int x = 0; x < d; ++x) kj[x] -= c * w[x];
    }
    for (int64_t gi = 0; gi < group; ++gi) scores[gi * (len + 1) + j] = dot8(q + gi * d, kj, d);
  }
  for (int64_t gi = 0; gi < group; ++gi) {
    const int64_t hq = hk * group + gi;
    float* s = scores + gi * (len + 1);
    const float* gates = p.gates == nullptr ? nullptr : p.gates + (b * p.heads + hq) * L;
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j <= len; ++j) {
      s[j] = p.scale * (s[j] + (gates == nullptr ? 0.f : g_last[gi] - gates[j]));
      mx = std::max(mx, s[j]);
    }
    float sum = 0.f;
    for (int64_t j = 0; j <= len; ++j) sum += (s[j] = std::exp(s[j] - mx));
    std::fill_n(acc, dv, 0.f);
    for (int64_t j = 0; j <= len; ++j) {
      const float pj = s[j];
      const float* vj = values + j * dv;
      for (int x = 0; x < dv; ++x) acc[x] += pj * vj[x];
    }
    const float inv = 1.f / sum;
    for (int x = 0; x < dv; ++x) acc[x] *= inv;
    store_row(p.o, p.dtype, (b * p.heads + hq) * dv, dv, acc);
  }
}

void decode_task_portable(const DecodeParams& p, int64_t b, int64_t hk, float* scratch) {
  decode_task_body(p, b, hk, scratch);
}
#if BLOCKOPS_X86_DISPATCH
BLOCKOPS_TARGET_AVX2 void decode_task_avx2(const DecodeParams& p, int64_t b, int64_t hk, float* scratch) {
  decode_task_body(p, b, hk, scratch);
}
#endif

at::Tensor path_decode_step_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
                                const at::Tensor& beta, const c10::optional<at::Tensor>& g, const at::Tensor& keys,
                                const at::Tensor& values, const at::Tensor& lengths,
                                const c10::optional<at::Tensor>& gates, const c10::optional<at::Tensor>& g_last,
                                double scale) {
  at::Tensor lengths_host;
  DecodeParams p = describe_decode(kDecode, q, k, v, w, beta, g, keys, values, lengths, gates, g_last, scale,
                                   lengths_host);
  at::Tensor o = at::empty({p.batch, p.heads, p.v_dim}, q.options());
  p.o = o.data_ptr();
  decode_counter.hit();
  const int64_t group = p.heads / p.kv_heads;
#if BLOCKOPS_X86_DISPATCH
  const bool avx2 = cpu_has_avx2_fma();
#endif
  at::parallel_for(0, p.batch * p.kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / p.kv_heads, hk = task % p.kv_heads;
      scratch.resize(static_cast<size_t>((group + 1) * (p.lengths[b] + 1) + group * p.head_dim + p.head_dim + p.v_dim));
#if BLOCKOPS_X86_DISPATCH
      if (avx2) {
        decode_task_avx2(p, b, hk, scratch.data());
        continue;
      }
#endif
      decode_task_portable(p, b, hk, scratch.data());
    }
  });
  return o;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// Argument checks and sequences, shared with the CUDA glue (path_attention_op.h)
// ---------------------------------------------------------------------------------------------------------

namespace {

void check_head_dim(const char* op, const char* arg, int64_t d) {

  TORCH_CHECK(d % 8 == 0 && d >= 8 && d <= kMaxHeadDim, op, ": ", arg, " head dim must be a multiple of 8 in [8, ",
              kMaxHeadDim, "], got ", d);
}

// t must have `shape`, be contiguous, on q's device, with q's dtype (or fp32 where fp32_allowed).
void check_tensor(const char* op, const char* arg, const at::Tensor& t, at::IntArrayRef shape, const at::Tensor& q,
                  bool fp32_allowed) {
  if (fp32_allowed) {
    check_dtype(t, {at::kFloat, q.scalar_type()}, op, arg);
  } else {
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", arg, " has dtype ", t.scalar_type(), " but q has ",
                q.scalar_type(), "; q, k and v must share one dtype");
  }
  check_same_device(t, q, op, arg, "q");
  TORCH_CHECK(t.sizes() == shape, op, ": ", arg, " must have shape ", shape, ", got ", t.sizes());
  check_contiguous(t, op, arg);
}

}  // namespace

// Checks k, w, beta (and the optional cu_seqlens) shared by both ops; fills the key-side fields of p.
Params describe_keys(const char* op, const at::Tensor& k, const at::Tensor& w, const at::Tensor& beta,
                     const c10::optional<at::Tensor>& cu_seqlens) {
  check_dtype(k, {at::kHalf, at::kBFloat16, at::kFloat}, op, "k");
  TORCH_CHECK(k.dim() == 4, op, ": k must be [B, T, H, D], got shape ", k.sizes());
  check_contiguous(k, op, "k");
  check_head_dim(op, "k", k.size(3));
  TORCH_CHECK(k.size(2) >= 1, op, ": k needs at least one head, got shape ", k.sizes());
  check_tensor(op, "w", w, k.sizes(), k, true);
  check_tensor(op, "beta", beta, k.sizes().slice(0, 3), k, true);
  if (cu_seqlens.has_value()) {
    const at::Tensor& c = *cu_seqlens;
    check_dtype(c, {at::kInt, at::kLong}, op, "cu_seqlens");
    check_same_device(c, k, op, "cu_seqlens", "k");
    TORCH_CHECK(c.dim() == 1 && c.numel() >= 2, op, ": cu_seqlens must be [N + 1] with N >= 1, got shape ", c.sizes());
    TORCH_CHECK(k.size(0) == 1, op, ": cu_seqlens needs batch size 1 (packed sequences), got B = ", k.size(0));
  }
  Params p{};
  p.k = k.data_ptr();
  p.w = w.data_ptr();
  p.beta = beta.data_ptr();
  p.dtype = dtype_of(k.scalar_type());
  p.w_dtype = dtype_of(w.scalar_type());
  p.beta_dtype = dtype_of(beta.scalar_type());
  p.batch = k.size(0);
  p.seq_len = k.size(1);
  p.kv_heads = k.size(2);
  p.head_dim = static_cast<int>(k.size(3));
  return p;
}

// Checks every forward argument; fills p except the outputs.
Params describe_forward(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& w, const at::Tensor& beta, const c10::optional<at::Tensor>& g,
                        const c10::optional<at::Tensor>& cu_seqlens, double scale) {
  check_dtype(q, {at::kHalf, at::kBFloat16, at::kFloat}, op, "q");
  TORCH_CHECK(q.dim() == 4, op, ": q must be [B, T, HQ, D], got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4, op, ": k and v must be [B, T, H, D] and [B, T, H, Dv], got ", k.sizes(),
              " and ", v.sizes());
  check_contiguous(q, op, "q");
  check_head_dim(op, "q", q.size(3));
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), op, ": k has dtype ", k.scalar_type(), " but q has ",
              q.scalar_type(), "; q, k and v must share one dtype");
  check_same_device(k, q, op, "k", "q");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3), op,
              ": k must be [B, T, H, D] with q's B, T and D, got q ", q.sizes(), " and k ", k.sizes());
  TORCH_CHECK(k.size(2) >= 1 && q.size(2) % k.size(2) == 0, op, ": q's heads (", q.size(2),
              ") must be a multiple of k's heads (", k.size(2), ") for grouped-query attention");
  Params p = describe_keys(op, k, w, beta, cu_seqlens);
  check_head_dim(op, "v", v.size(3));
  check_tensor(op, "v", v, {k.size(0), k.size(1), k.size(2), v.size(3)}, q, false);
  if (g.has_value()) check_tensor(op, "g", *g, q.sizes().slice(0, 3), q, true);
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);

  p.q = q.data_ptr();
  p.v = v.data_ptr();
  p.g = g.has_value() ? g->data_ptr() : nullptr;
  p.g_dtype = g.has_value() ? dtype_of(g->scalar_type()) : DType::kF32;
  p.heads = q.size(2);
  p.v_dim = static_cast<int>(v.size(3));
  p.scale = static_cast<float>(scale);
  return p;
}

Chunking make_chunking(const char* op, int64_t batch, int64_t seq_len, const c10::optional<at::Tensor>& cu) {
  Chunking ch;
  if (cu.has_value()) {
    const at::Tensor c = cu->to(at::kLong).contiguous();
    const int64_t* v = c.data_ptr<int64_t>();
    const int64_t n = c.numel();
    TORCH_CHECK(v[0] == 0 && v[n - 1] == seq_len, op, ": cu_seqlens must start at 0 and end at T = ", seq_len,
                ", got first ", v[0], " and last ", v[n - 1]);
    for (int64_t i = 0; i + 1 < n; ++i) {
      TORCH_CHECK(v[i + 1] >= v[i], op, ": cu_seqlens must be non-decreasing, got ", v[i], " then ", v[i + 1],
                  " at index ", i);
      if (v[i + 1] > v[i]) ch.spans.push_back(Span{0, v[i], v[i + 1] - v[i]});
    }
  } else if (seq_len > 0) {
    for (int64_t b = 0; b < batch; ++b) ch.spans.push_back(Span{b, 0, seq_len});
  }
  ch.first_chunk.push_back(0);
  for (const Span& s : ch.spans) ch.first_chunk.push_back(ch.first_chunk.back() + chunks_of(s.len));
  return ch;
}


std::vector<ChunkRef> Chunking::chunk_refs() const {
  std::vector<ChunkRef> refs;
  for (const Span& sp : spans)
    for (int64_t c = 0; c < chunks_of(sp.len); ++c) {
      const int64_t t0 = sp.start + c * kChunk;
      refs.push_back(ChunkRef{sp.b, t0, sp.start, std::min<int64_t>(kChunk, sp.start + sp.len - t0), c});
    }
  return refs;
}

int64_t Chunking::max_chunks_per_span() const {
  int64_t m = 0;
  for (const Span& sp : spans) m = std::max(m, chunks_of(sp.len));
  return m;
}

void check_backward_inputs(const char* op, const Params& p, const at::Tensor& q, const at::Tensor& grad_o,
                           const at::Tensor& o, const at::Tensor& lse, const c10::optional<at::Tensor>& grad_lse) {
  const std::array<int64_t, 4> o_dims{p.batch, p.seq_len, p.heads, p.v_dim};
  check_tensor(op, "grad_o", grad_o, o_dims, q, false);
  check_tensor(op, "o", o, o_dims, q, false);
  const std::array<int64_t, 3> lse_dims{p.batch, p.heads, p.seq_len};
  for (auto [arg, t] : {std::pair<const char*, const at::Tensor*>{"lse", &lse}, {"grad_lse", grad_lse ? &*grad_lse : nullptr}}) {
    if (t == nullptr) continue;
    check_dtype(*t, {at::kFloat}, op, arg);
    check_same_device(*t, q, op, arg, "q");
    TORCH_CHECK(t->sizes() == at::IntArrayRef(lse_dims), op, ": ", arg, " must have shape ", at::IntArrayRef(lse_dims),
                ", got ", t->sizes());
    check_contiguous(*t, op, arg);
  }
}

DecodeParams describe_decode(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& w, const at::Tensor& beta, const c10::optional<at::Tensor>& g,
                             const at::Tensor& keys, const at::Tensor& values, const at::Tensor& lengths,
                             const c10::optional<at::Tensor>& gates, const c10::optional<at::Tensor>& g_last,
                             double scale, at::Tensor& lengths_host) {
  check_dtype(q, {at::kHalf, at::kBFloat16, at::kFloat}, op, "q_t");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, op, ": q_t, k_t and v_t must be [B, HQ, D], [B, H, D] and ",
              "[B, H, Dv], got ", q.sizes(), ", ", k.sizes(), " and ", v.sizes());
  check_contiguous(q, op, "q_t");
  const int64_t B = q.size(0), HQ = q.size(1), D = q.size(2), H = k.size(1), Dv = v.size(2);
  check_head_dim(op, "q_t", D);
  check_head_dim(op, "v_t", Dv);
  TORCH_CHECK(H >= 1 && HQ % H == 0 && HQ / H <= kMaxDecodeGroup, op, ": q_t's heads (", HQ,
              ") must be a multiple of k_t's heads (", H, "), at most ", kMaxDecodeGroup, " per key head");
  check_tensor(op, "k_t", k, {B, H, D}, q, false);
  check_tensor(op, "v_t", v, {B, H, Dv}, q, false);
  check_tensor(op, "w_t", w, {B, H, D}, q, true);
  check_tensor(op, "beta_t", beta, {B, H}, q, true);
  TORCH_CHECK(keys.dim() == 4, op, ": keys must be [B, H, L, D], got shape ", keys.sizes());
  const int64_t L = keys.size(2);
  auto check_cache = [&](const char* arg, const at::Tensor& t, at::IntArrayRef shape) {
    check_dtype(t, {at::kFloat}, op, arg);
    check_same_device(t, q, op, arg, "q_t");
    TORCH_CHECK(t.sizes() == shape, op, ": ", arg, " must have shape ", shape, ", got ", t.sizes());
    check_contiguous(t, op, arg);
  };
  check_cache("keys", keys, {B, H, L, D});
  check_cache("values", values, {B, H, L, Dv});
  TORCH_CHECK(g.has_value() == gates.has_value() && gates.has_value() == g_last.has_value(), op,
              ": pass g_t, gates and g_last together (a cache built with a forget gate) or none of them");
  if (g.has_value()) {
    check_tensor(op, "g_t", *g, {B, HQ}, q, true);
    check_cache("gates", *gates, {B, HQ, L});
    check_cache("g_last", *g_last, {B, HQ});
  }
  check_dtype(lengths, {at::kLong}, op, "lengths");
  check_same_device(lengths, q, op, "lengths", "q_t");
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == B, op, ": lengths must be [B] = [", B, "], got ", lengths.sizes());
  check_contiguous(lengths, op, "lengths");
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  lengths_host = lengths.to(at::kCPU).contiguous();
  const int64_t* len = lengths_host.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(len[b] >= 0 && len[b] < L, op, ": lengths[", b, "] = ", len[b], " leaves no room in a cache of capacity ",
                L, " (grow keys/values/gates first; PathCache does)");
  DecodeParams p{};
  p.q = q.data_ptr(); p.k = k.data_ptr(); p.v = v.data_ptr(); p.w = w.data_ptr(); p.beta = beta.data_ptr();
  p.g = g.has_value() ? g->data_ptr() : nullptr;
  p.dtype = dtype_of(q.scalar_type());
  p.w_dtype = dtype_of(w.scalar_type());
  p.beta_dtype = dtype_of(beta.scalar_type());
  p.g_dtype = g.has_value() ? dtype_of(g->scalar_type()) : DType::kF32;
  p.keys = keys.data_ptr<float>();
  p.values = values.data_ptr<float>();
  p.lengths = lengths.device().is_cpu() ? len : lengths.data_ptr<int64_t>();
  p.gates = gates.has_value() ? gates->data_ptr<float>() : nullptr;
  p.g_last = g_last.has_value() ? g_last->data_ptr<float>() : nullptr;
  p.batch = B; p.heads = HQ; p.kv_heads = H; p.capacity = L;
  p.head_dim = static_cast<int>(D); p.v_dim = static_cast<int>(Dv);
  p.scale = static_cast<float>(scale);
  return p;
}

}  // namespace blockops::path_attention

TORCH_LIBRARY_IMPL(blockops, CPU, m) {
  m.impl("path_attention", &blockops::path_attention::path_attention_cpu);
  m.impl("path_key_cache", &blockops::path_attention::path_key_cache_cpu);
  m.impl("path_attention_backward", &blockops::path_attention::path_attention_backward_cpu);
  m.impl("path_decode_step", &blockops::path_attention::path_decode_step_cpu);
}
