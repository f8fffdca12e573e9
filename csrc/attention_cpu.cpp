// Block-sparse attention on the CPU: the CPU kernels of the attention family and their glue (the CPU dispatch
// registration); the argument checks it calls are attention_op.cpp's, shared with the CUDA glue.
//
// Forward, one task per (b, h, query block), tasks handed out dynamically (heaviest query blocks first is not
// knowable in general, so threads take the next task from a shared counter):
//
//   Qs = q_block * scale * log2(e)              [rows, D]   fp32
//   for kb in partial list, then full list:
//     S  = Qs @ K_kb^T                          [rows, bkv] (6x16 register-blocked FMA micro-kernel)
//     S  = -inf where the bit tile (partial) or the lengths hide a key
//     m' = max(m, rowmax S);  P = exp2(S - m');  l = l * exp2(m - m') + rowsum P;  O = O * exp2(m - m') + P @ V_kb
//   out = O / l,  lse = (m + log2 l) / log2(e)    (rows with no visible key: out = 0, lse = -inf)
//
// Backward (attention.h has the formulas): Delta = rowsum(dO * O); pass 1, one task per (b, key head, key
// block) walking the transposed lists of every query head of the group: dK, dV; pass 2, one task per
// (b, h, query block) walking the forward lists: dQ. Each output element belongs to one task: deterministic,
// no atomics, no per-thread copies of dQ.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention_op.h"
#include "cpu_common.h"  // also <immintrin.h> where the AVX2 paths are compiled
#include "cpu_features.h"
#include "introspection.h"
#include "static_switch.h"

namespace blockops::attention {
namespace {

KernelCounter forward_counter(kFamily, "block_sparse_attention.cpu");
KernelCounter backward_counter(kFamily, "block_sparse_attention_backward.cpu");
FamilyRegistration family(kFamily, cpu_isa_name);

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

int64_t round_up8(int64_t n) { return (n + 7) / 8 * 8; }

// ---- the ISA-specific primitives ---------------------------------------------------------------------------
//
// Two score layouts are used, chosen so that no tile is ever transposed in memory:
//   S  [rows, keys]   (dK/dV pass: K^T and V^T are built once per key-block task and reused for every query block)
//   S^T [keys, lanes] (forward and dQ pass: Q^T and dO^T are built once per query-block task; the per-query
//                      softmax bookkeeping then runs across SIMD lanes, one lane per query, with no horizontal ops)
// The GEMM reads A through two strides, so a transposed operand (P^T, dS^T, V^T) is just a different stride.
// A is the accumulation type: float (fp32/fp16/bf16 operands, portable or AVX2) or double (fp64 operands,
// portable only).
template <typename A>
struct Primitives {
  // C[M, N] (+)= A[M, K] @ B[K, N] with A(i, k) = A[i * a_row + k * a_col], B and C row-major (ldb, ldc);
  // N a multiple of 8.
  void (*gemm)(int M, int N, int K, const A* a, int64_t a_row, int64_t a_col, const A* b, int64_t ldb, A* c,
               int64_t ldc, bool accumulate);
  // x[i] = exp2(x[i] * mul - sub) for i < n (a multiple of 8); exp2 of anything below -126 is exactly 0.
  void (*exp2_row)(A* x, int n, A mul, A sub);
  // x[c] = fill where bit c of `bits` is clear, c < n (a multiple of 8).
  void (*apply_bits)(A* x, const int32_t* bits, int n, A fill);
  // One online-softmax step on S^T [keys, lanes] (lanes a multiple of 8, row stride ld), in place:
  //   m_new = max(m, max_k S^T[k, :]);  P^T = exp2(S^T - m_new);  alpha = exp2(m - m_new);  l = l * alpha + sum_k P^T
  // Lanes whose m_new is -inf (nothing visible yet) get P = 0, alpha = 0. NaN (attention.h): exp2 of a NaN score
  // is NaN, so l turns NaN and stays NaN; m may drop the NaN (max), which is harmless.
  void (*softmax_step_t)(A* St, int64_t ld, int keys, int lanes, A* m, A* l, A* alpha);
  // P^T [keys, lanes] = exp2(S^T * mul - lse2[lane]), 0 on lanes with lse2 = -inf (NaN on lanes with NaN lse2).
  void (*probs_t)(A* St, int64_t ld, int keys, int lanes, A mul, const A* lse2);
};

template <typename F>
void gemm_portable(int M, int N, int K, const F* A, int64_t a_row, int64_t a_col, const F* B, int64_t ldb, F* C,
                   int64_t ldc, bool accumulate) {
  for (int i = 0; i < M; ++i) {
    F* c = C + i * ldc;
    if (!accumulate) std::fill(c, c + N, F(0));
    for (int k = 0; k < K; ++k) {
      const F a = A[i * a_row + k * a_col];
      const F* b = B + k * ldb;
      for (int j = 0; j < N; ++j) c[j] += a * b[j];
    }
  }
}

// NaN stays NaN (the comparison is false).
template <typename F>
F exp2_or_zero(F x) { return x < F(-126) ? F(0) : std::exp2(x); }

template <typename F>
void exp2_row_portable(F* x, int n, F mul, F sub) {
  for (int i = 0; i < n; ++i) x[i] = exp2_or_zero(x[i] * mul - sub);
}

template <typename F>
void apply_bits_portable(F* x, const int32_t* bits, int n, F fill) {
  for (int c = 0; c < n; ++c) {
    if (!tile_bit(bits, c)) x[c] = fill;
  }
}

template <typename F>
void softmax_step_t_portable(F* St, int64_t ld, int keys, int lanes, F* m, F* l, F* alpha) {
  constexpr F neg_inf = -std::numeric_limits<F>::infinity();
  for (int r = 0; r < lanes; ++r) {
    F mx = m[r];
    for (int k = 0; k < keys; ++k) mx = std::max(mx, St[k * ld + r]);
    const F use = mx == neg_inf ? F(0) : mx;
    alpha[r] = exp2_or_zero(m[r] - use);
    F sum = 0;
    for (int k = 0; k < keys; ++k) {
      const F e = exp2_or_zero(St[k * ld + r] - use);
      St[k * ld + r] = e;
      sum += e;
    }
    l[r] = l[r] * alpha[r] + sum;
    m[r] = mx;
  }
}

template <typename F>
void probs_t_portable(F* St, int64_t ld, int keys, int lanes, F mul, const F* lse2) {
  constexpr F neg_inf = -std::numeric_limits<F>::infinity();
  for (int k = 0; k < keys; ++k) {
    for (int r = 0; r < lanes; ++r) {
      St[k * ld + r] = lse2[r] == neg_inf ? F(0) : exp2_or_zero(St[k * ld + r] * mul - lse2[r]);
    }
  }
}

#if BLOCKOPS_X86_DISPATCH
// MR rows x 8*NV columns of C in registers (6 x 16 uses 12 of the 16 ymm registers: 2 for B, 1 broadcast).
template <int MR, int NV>
BLOCKOPS_TARGET_AVX2 inline void micro_avx2(int K, const float* A, int64_t a_row, int64_t a_col, const float* B,
                                             int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  // Every small loop is unrolled before GCC decides where the accumulators live; without the pragmas it keeps
  // the array in memory and stores all 12 accumulators on every k.
  __m256 c[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) c[r][v] = accumulate ? _mm256_loadu_ps(C + r * ldc + 8 * v) : _mm256_setzero_ps();
  }
  for (int k = 0; k < K; ++k) {
    __m256 b[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) b[v] = _mm256_loadu_ps(B + k * ldb + 8 * v);
    const float* a = A + k * a_col;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + r * a_row);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) c[r][v] = _mm256_fmadd_ps(av, b[v], c[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(C + r * ldc + 8 * v, c[r][v]);
  }
}

template <int NV>
BLOCKOPS_TARGET_AVX2 void gemm_panel_avx2(int M, int K, const float* A, int64_t a_row, int64_t a_col, const float* B,
                                          int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  int i = 0;
  for (; i + 6 <= M; i += 6) micro_avx2<6, NV>(K, A + i * a_row, a_row, a_col, B, ldb, C + i * ldc, ldc, accumulate);
  const float* a = A + i * a_row;
  float* c = C + i * ldc;
  switch (M - i) {
    case 5: micro_avx2<5, NV>(K, a, a_row, a_col, B, ldb, c, ldc, accumulate); break;
    case 4: micro_avx2<4, NV>(K, a, a_row, a_col, B, ldb, c, ldc, accumulate); break;
    case 3: micro_avx2<3, NV>(K, a, a_row, a_col, B, ldb, c, ldc, accumulate); break;
    case 2: micro_avx2<2, NV>(K, a, a_row, a_col, B, ldb, c, ldc, accumulate); break;
    case 1: micro_avx2<1, NV>(K, a, a_row, a_col, B, ldb, c, ldc, accumulate); break;
    default: break;
  }
}

BLOCKOPS_TARGET_AVX2 void gemm_avx2(int M, int N, int K, const float* A, int64_t a_row, int64_t a_col, const float* B,
                                    int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  int j = 0;
  for (; j + 16 <= N; j += 16) gemm_panel_avx2<2>(M, K, A, a_row, a_col, B + j, ldb, C + j, ldc, accumulate);
  if (j < N) gemm_panel_avx2<1>(M, K, A, a_row, a_col, B + j, ldb, C + j, ldc, accumulate);
}

BLOCKOPS_TARGET_AVX2 void exp2_row_avx2(float* x, int n, float mul, float sub) {
  const __m256 vm = _mm256_set1_ps(mul), vs = _mm256_set1_ps(sub);
  for (int i = 0; i < n; i += 8) _mm256_storeu_ps(x + i, exp2_avx2(_mm256_fmsub_ps(_mm256_loadu_ps(x + i), vm, vs)));
}

BLOCKOPS_TARGET_AVX2 void apply_bits_avx2(float* x, const int32_t* bits, int n, float fill) {
  const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256 hidden = _mm256_set1_ps(fill);
  for (int c = 0; c < n; c += 8) {
    const uint32_t byte = (static_cast<uint32_t>(bits[c >> 5]) >> (c & 31)) & 0xFFu;
    if (byte == 0xFFu) continue;
    const __m256i sel = _mm256_and_si256(_mm256_set1_epi32(static_cast<int>(byte)), lane_bit);
    const __m256 visible = _mm256_castsi256_ps(_mm256_cmpeq_epi32(sel, lane_bit));
    _mm256_storeu_ps(x + c, _mm256_blendv_ps(hidden, _mm256_loadu_ps(x + c), visible));
  }
}

BLOCKOPS_TARGET_AVX2 void softmax_step_t_avx2(float* St, int64_t ld, int keys, int lanes, float* m, float* l,
                                              float* alpha) {
  const __m256 neg_inf = _mm256_set1_ps(kNegInf);
  for (int r = 0; r < lanes; r += 8) {
    __m256 mx = _mm256_loadu_ps(m + r);
    for (int k = 0; k < keys; ++k) mx = _mm256_max_ps(mx, _mm256_loadu_ps(St + k * ld + r));
    const __m256 use = _mm256_andnot_ps(_mm256_cmp_ps(mx, neg_inf, _CMP_EQ_OQ), mx);   // -inf -> 0
    const __m256 a = exp2_avx2(_mm256_sub_ps(_mm256_loadu_ps(m + r), use));
    __m256 sum = _mm256_setzero_ps();
    for (int k = 0; k < keys; ++k) {
      const __m256 e = exp2_avx2(_mm256_sub_ps(_mm256_loadu_ps(St + k * ld + r), use));
      _mm256_storeu_ps(St + k * ld + r, e);
      sum = _mm256_add_ps(sum, e);
    }
    _mm256_storeu_ps(alpha + r, a);
    _mm256_storeu_ps(l + r, _mm256_fmadd_ps(_mm256_loadu_ps(l + r), a, sum));
    _mm256_storeu_ps(m + r, mx);
  }
}

BLOCKOPS_TARGET_AVX2 void probs_t_avx2(float* St, int64_t ld, int keys, int lanes, float mul, const float* lse2) {
  const __m256 vm = _mm256_set1_ps(mul);
  for (int r = 0; r < lanes; r += 8) {
    const __m256 sub = _mm256_loadu_ps(lse2 + r);
    const __m256 live = _mm256_cmp_ps(sub, _mm256_set1_ps(kNegInf), _CMP_NEQ_UQ);   // NaN lse2: live (P NaN)
    for (int k = 0; k < keys; ++k) {
      const __m256 e = exp2_avx2(_mm256_fmsub_ps(_mm256_loadu_ps(St + k * ld + r), vm, sub));
      _mm256_storeu_ps(St + k * ld + r, _mm256_and_ps(e, live));
    }
  }
}
#endif

template <typename A>
Primitives<A> primitives() {
#if BLOCKOPS_X86_DISPATCH
  if constexpr (std::is_same_v<A, float>) {
    if (cpu_has_avx2_fma()) return {gemm_avx2, exp2_row_avx2, apply_bits_avx2, softmax_step_t_avx2, probs_t_avx2};
  }
#endif
  return {gemm_portable<A>, exp2_row_portable<A>, apply_bits_portable<A>, softmax_step_t_portable<A>,
          probs_t_portable<A>};
}

// The score scale in the accumulation type: fp32 as the CUDA kernels use it, or the exact value for fp64.
template <typename A>
A scale_of(const FwdParams& p) {
  if constexpr (std::is_same_v<A, double>) return p.scale_f64;
  return p.scale;
}

// ---- operand access ---------------------------------------------------------------------------------------


// An accumulation-type (fp32, or fp64 for fp64 operands) view of `rows` rows of n elements (row stride
// `stride`): the tensor itself when it has that type, else a converted copy in `scratch` (row stride n). Returns
// the pointer; *ld receives the row stride.
template <typename T, typename A>
const A* fp32_rows(const T* src, int64_t stride, int rows, int n, A* scratch, int64_t* ld) {
  if constexpr (std::is_same_v<T, A>) {
    *ld = stride;
    return src;
  } else {
    for (int r = 0; r < rows; ++r) {
      for (int i = 0; i < n; ++i) scratch[r * n + i] = static_cast<A>(src[r * stride + i]);
    }
    *ld = n;
    return scratch;
  }
}

// dst [n, ld] = (src rows [rows, n])^T * mul, columns rows..ld zero-filled (ld a multiple of 8 >= rows).
template <typename T, typename A>
void load_transposed(const T* src, int64_t stride, int rows, int n, A mul, A* dst, int64_t ld) {
  for (int i = 0; i < n; ++i) std::fill(dst + i * ld + rows, dst + i * ld + ld, A(0));
  for (int r = 0; r < rows; ++r) {
    const T* s = src + r * stride;
    for (int i = 0; i < n; ++i) dst[i * ld + r] = static_cast<A>(s[i]) * mul;
  }
}

// ---- tasks ----------------------------------------------------------------------------------------------------

// Runs task(t, scratch) for t in [0, n) on ATen's thread pool, handing tasks out one at a time (block-sparse
// rows differ in cost, so static ranges would leave threads idle). Each worker builds its scratch once.
template <typename Scratch, typename Task>
void run_tasks(int64_t n, const Scratch& prototype, const Task& task) {
  if (n == 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(n, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch = prototype;
    for (int64_t w = begin; w < end; ++w) {
      for (int64_t t = next.fetch_add(1); t < n; t = next.fetch_add(1)) task(t, scratch);
    }
  });
}

// One listed key (or query) block: its index and its bit tile (null for a full block).
struct Listed {
  int64_t block;
  const int32_t* tile;
};

// Calls fn(Listed) for the partial then the full blocks of lists row `row` (= mask row * n + block), skipping
// entries a hand-built mask got wrong (the glue has reported them already; this keeps reads in bounds).
template <typename Fn>
void for_each_listed(const BlockLists& lists, const MaskDims& m, int64_t row, const int32_t* tiles, Fn&& fn) {
  const int tile_words = m.block_q * m.words();
  const int np = list_count(lists.num[row], lists.width);
  for (int i = 0; i < np; ++i) {
    const int32_t* id = lists.tile_ids + row * lists.width + i;
    const int32_t idx = lists.idx[row * lists.width + i];
    if (list_entry_ok(idx, lists.width, id, m.num_tiles)) fn(Listed{idx, tiles + int64_t{*id} * tile_words});
  }
  const int nf = list_count(lists.full_num[row], lists.width);
  for (int i = 0; i < nf; ++i) {
    const int32_t idx = lists.full_idx[row * lists.width + i];
    if (list_entry_ok(idx, lists.width, nullptr, 0)) fn(Listed{idx, nullptr});
  }
}

// S^T layout [keys, lanes]: entry (key c, query r) = fill where the bit tile hides it (partial blocks only; key
// and query lengths are handled by computing only `keys` rows and never storing lanes >= rows).
template <typename A>
void mask_scores_t(A* St, int64_t ld, int rows, int keys, const int32_t* tile, int words, A fill) {
  if (tile == nullptr) return;
  for (int r = 0; r < rows; ++r) {
    const int32_t* bits = tile + r * words;
    for (int c = 0; c < keys; ++c) {
      if (!tile_bit(bits, c)) St[c * ld + r] = fill;
    }
  }
}

// S layout [rows, cols_pad]: the bit tile's zeros and the columns past the key length become `fill`.
template <typename A>
void mask_scores(const Primitives<A>& prim, A* S, int64_t ld, int rows, int cols, int cols_pad, const int32_t* tile,
                 int words, A fill) {
  for (int r = 0; r < rows; ++r) {
    A* s = S + r * ld;
    if (tile != nullptr) prim.apply_bits(s, tile + r * words, cols_pad, fill);
    for (int c = cols; c < cols_pad; ++c) s[c] = fill;
  }
}

// The query-block task t of run_tasks: (b, h, query block), later query blocks first (under causal-like masks they
// carry the most work); rows = queries in the block, lanes = rows rounded up to the SIMD width.
struct QueryTask {
  int64_t b, h, hk, qb, q0;
  int rows, lanes;
};

QueryTask query_task(const FwdParams& p, int64_t t) {
  const int64_t QB = p.mask.q_blocks, qb = QB - 1 - t % QB, bh = t / QB, h = bh % p.heads;
  const int64_t q0 = qb * p.mask.block_q;
  const int rows = static_cast<int>(std::min<int64_t>(p.mask.block_q, p.q_len - q0));
  return {bh / p.heads, h, p.kv_head_of(h), qb, q0, rows, static_cast<int>(round_up8(rows))};
}

// Key block `block` of one (b, key head): its first key, its length and accumulation-type views of its K and V
// rows (the tensors themselves for fp32 / fp64, else converted copies in kbuf / vbuf), for the forward and dQ passes.
template <typename A>
struct KeyBlock {
  int64_t c0;
  int keys;
  const A* k;
  int64_t ldk;
  const A* v;
  int64_t ldv;
};

template <typename T, typename A>
KeyBlock<A> key_block(const FwdParams& p, const T* k_bh, const T* v_bh, int64_t block, A* kbuf, A* vbuf) {
  KeyBlock<A> kb{};
  kb.c0 = block * p.mask.block_kv;
  kb.keys = static_cast<int>(std::min<int64_t>(p.mask.block_kv, p.kv_len - kb.c0));
  kb.k = fp32_rows(k_bh + kb.c0 * p.k_stride_t, p.k_stride_t, kb.keys, p.head_dim, kbuf, &kb.ldk);
  kb.v = fp32_rows(v_bh + kb.c0 * p.v_stride_t, p.v_stride_t, kb.keys, p.v_dim, vbuf, &kb.ldv);
  return kb;
}

// One worker's buffers of the forward (run_tasks copies the prototype).
template <typename A>
struct FwdScratch {
  std::vector<A> qt, k, v, st, ot, m, l, alpha;

  FwdScratch(int D, int Dv, int bq, int bkv)
      : qt(D * bq), k(bkv * D), v(bkv * Dv), st(bkv * bq), ot(Dv * bq), m(bq), l(bq), alpha(bq) {}
};

// Whether V has a NaN / Inf in a key block, per (b, key head, key block), scanned on the first visit of the block as
// a partial one (0 not scanned yet, 1 finite, 2 not). A hidden key's P is 0, but 0 * NaN is NaN, so the GEMM
// O += P V would leak a hidden key's NaN v into the rows of its block that cannot see it; partial blocks whose V
// is not all finite take the per-pair path instead. Full blocks hide no key and never scan. Two tasks may scan
// one block at once: both store the same answer (relaxed atomics, no lock).
class FiniteV {
 public:
  explicit FiniteV(int64_t blocks) : state_(blocks) {}

  template <typename A>
  bool bad(int64_t block, const A* v, int64_t ldv, int keys, int dv) {
    uint8_t s = state_[block].load(std::memory_order_relaxed);
    if (s == 0) {
      int nonfinite = 0;
      for (int c = 0; c < keys; ++c) {
        // !(|x| <= max) is true for +-inf and NaN; branch-free, so the loop vectorises
        for (int d = 0; d < dv; ++d) nonfinite |= !(std::abs(v[c * ldv + d]) <= std::numeric_limits<A>::max());
      }
      s = nonfinite ? 2 : 1;
      state_[block].store(s, std::memory_order_relaxed);
    }
    return s == 2;
  }

 private:
  std::vector<std::atomic<uint8_t>> state_;
};

template <typename T, typename A>
void forward_kernel(const FwdParams& p) {
  const Primitives<A> prim = primitives<A>();
  const MaskDims& md = p.mask;
  const int D = p.head_dim, Dv = p.v_dim, bq = md.block_q, bkv = md.block_kv, words = md.words();
  const int64_t QB = md.q_blocks, KB = md.kv_blocks;
  const A qmul = scale_of<A>(p) * log2e<A>();
  const A neg_inf = -std::numeric_limits<A>::infinity();
  const FwdScratch<A> proto(D, Dv, bq, bkv);
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  T* out = static_cast<T*>(p.out);
  FiniteV finite_v(p.batch * p.kv_heads * KB);

  run_tasks(p.batch * p.heads * QB, proto, [&](int64_t t, FwdScratch<A>& sc) {
    const auto [b, h, hk, qb, q0, rows, lanes] = query_task(p, t);
    load_transposed(q + b * p.q_stride_b + h * p.q_stride_h + q0 * p.q_stride_t, p.q_stride_t, rows, D, qmul,
                    sc.qt.data(), lanes);
    std::fill(sc.ot.begin(), sc.ot.end(), A(0));
    std::fill(sc.m.begin(), sc.m.end(), neg_inf);
    std::fill(sc.l.begin(), sc.l.end(), A(0));
    const T* kbh = k + b * p.k_stride_b + hk * p.k_stride_h;
    const T* vbh = v + b * p.v_stride_b + hk * p.v_stride_h;
    for_each_listed(p.kv, md, md.row(b, h) * QB + qb, p.tiles, [&](Listed blk) {
      const auto [c0, keys, kf, ldk, vf, ldv] = key_block(p, kbh, vbh, blk.block, sc.k.data(), sc.v.data());
      prim.gemm(keys, lanes, D, kf, ldk, 1, sc.qt.data(), lanes, sc.st.data(), lanes, false);    // S^T = K Q^T
      mask_scores_t(sc.st.data(), lanes, rows, keys, blk.tile, words, neg_inf);
      prim.softmax_step_t(sc.st.data(), lanes, keys, lanes, sc.m.data(), sc.l.data(), sc.alpha.data());
      for (int d = 0; d < Dv; ++d) {
        A* o = sc.ot.data() + d * lanes;
        for (int r = 0; r < lanes; ++r) o[r] *= sc.alpha[r];
      }
      if (blk.tile != nullptr && finite_v.bad((b * p.kv_heads + hk) * KB + blk.block, vf, ldv, keys, Dv)) {
        // Visible pairs only: a hidden key's NaN / Inf v must not reach this block's other rows (0 * NaN).
        for (int c = 0; c < keys; ++c) {
          for (int r = 0; r < rows; ++r) {
            if (!tile_bit(blk.tile + r * words, c)) continue;
            const A pr = sc.st[c * lanes + r];
            for (int d = 0; d < Dv; ++d) sc.ot[d * lanes + r] += pr * vf[c * ldv + d];
          }
        }
      } else {
        prim.gemm(Dv, lanes, keys, vf, 1, ldv, sc.st.data(), lanes, sc.ot.data(), lanes, true);  // O^T += V^T P^T
      }
    });
    T* o_dst = out + ((b * p.heads + h) * p.q_len + q0) * Dv;
    A* lse = static_cast<A*>(p.lse) + (b * p.heads + h) * p.q_len + q0;
    for (int r = 0; r < rows; ++r) {
      // attention.h: empty rows (l == 0) get exactly 0 (not 0 * O, NaN when a -inf-score key's v is NaN); NaN
      // rows (l NaN) get NaN output and lse.
      const A scale = row_out_scale(sc.l[r]);
      const bool empty = row_empty(sc.l[r]);
      for (int d = 0; d < Dv; ++d) o_dst[r * Dv + d] = static_cast<T>(empty ? A(0) : sc.ot[d * lanes + r] * scale);
      lse[r] = row_lse(sc.m[r], sc.l[r]);
    }
  });
}

// One worker's buffers of both backward passes: operand tiles a..d and accumulators of up to max(bq, bkv) rows by
// max(D, Dv), score tiles of max(bq, bkv)^2, row statistics of a query block.
template <typename A>
struct BwdScratch {
  std::vector<A> a, b, c, d, s, dp, acc1, acc2, lse2, delta;

  BwdScratch(int maxb, int maxd, int bq)
      : a(maxb * maxd), b(maxb * maxd), c(maxb * maxd), d(maxb * maxd), s(maxb * maxb), dp(maxb * maxb),
        acc1(maxb * maxd), acc2(maxb * maxd), lse2(bq), delta(bq) {}
};

template <typename T, typename A>
void backward_kernel(const BwdParams& p) {
  const FwdParams& f = p.fwd;
  const Primitives<A> prim = primitives<A>();
  const MaskDims& md = f.mask;
  const int D = f.head_dim, Dv = f.v_dim, bq = md.block_q, bkv = md.block_kv, words = md.words();
  const int64_t QB = md.q_blocks, KB = md.kv_blocks, group = f.heads / f.kv_heads;
  const A smul = scale_of<A>(f) * log2e<A>();
  const A neg_inf = -std::numeric_limits<A>::infinity();
  const A* lse = static_cast<const A*>(f.lse);
  const A* grad_lse = static_cast<const A*>(p.grad_lse);
  A* delta = static_cast<A*>(p.delta);
  const T* q = static_cast<const T*>(f.q);
  const T* k = static_cast<const T*>(f.k);
  const T* v = static_cast<const T*>(f.v);
  const T* o = static_cast<const T*>(f.out);
  const T* dout = static_cast<const T*>(p.grad_out);

  // Delta = rowsum(dO * O) - grad_lse (dO, O contiguous [B, H, Tq, Dv]).
  const int64_t total_rows = f.batch * f.heads * f.q_len;
  at::parallel_for(0, total_rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      A acc = 0;
      for (int i = 0; i < Dv; ++i) acc += static_cast<A>(dout[r * Dv + i]) * static_cast<A>(o[r * Dv + i]);
      delta[r] = grad_lse != nullptr ? acc - grad_lse[r] : acc;
    }
  });

  const BwdScratch<A> proto(std::max(bq, bkv), std::max(D, Dv), bq);

  // lse2 = lse * log2(e) and Delta of rows [q0, q0 + rows) of (b, h), zero-padded to `lanes`.
  auto load_row_stats = [&](BwdScratch<A>& sc, int64_t b, int64_t h, int64_t q0, int rows, int lanes) {
    const int64_t row0 = (b * f.heads + h) * f.q_len + q0;
    for (int r = 0; r < lanes; ++r) {
      // -inf stays -inf: the row gets P = 0; NaN stays NaN: the row's gradients are NaN, as its output.
      sc.lse2[r] = r < rows ? lse[row0 + r] * log2e<A>() : neg_inf;
      sc.delta[r] = r < rows ? delta[row0 + r] : A(0);
    }
  };

  // Pass 1: dK, dV per (b, key head, key block), S in [rows, keys] layout; K^T and V^T built once per task. The
  // query heads of the group are summed here, in order.
  T* gk = static_cast<T*>(p.grad_k);
  T* gv = static_cast<T*>(p.grad_v);
  run_tasks(f.batch * f.kv_heads * KB, proto, [&](int64_t t, BwdScratch<A>& sc) {
    const int64_t kb = t % KB, bhk = t / KB, b = bhk / f.kv_heads, hk = bhk % f.kv_heads;
    const int64_t c0 = kb * bkv;
    const int keys = static_cast<int>(std::min<int64_t>(bkv, f.kv_len - c0));
    const int cols = static_cast<int>(round_up8(keys));
    A* kt = sc.a.data();   // [D, cols]
    A* vt = sc.b.data();   // [Dv, cols]
    load_transposed(k + b * f.k_stride_b + hk * f.k_stride_h + c0 * f.k_stride_t, f.k_stride_t, keys, D, A(1), kt,
                    cols);
    load_transposed(v + b * f.v_stride_b + hk * f.v_stride_h + c0 * f.v_stride_t, f.v_stride_t, keys, Dv, A(1), vt,
                    cols);
    A* dk = sc.acc1.data();   // [keys, D]
    A* dv = sc.acc2.data();   // [keys, Dv]
    std::fill(dk, dk + keys * D, A(0));
    std::fill(dv, dv + keys * Dv, A(0));
    for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
      for_each_listed(p.q, md, md.row(b, h) * KB + kb, f.tiles, [&](Listed blk) {
        const int64_t q0 = blk.block * bq;
        const int rows = static_cast<int>(std::min<int64_t>(bq, f.q_len - q0));
        int64_t ldq, ldo;
        const A* qf = fp32_rows(q + b * f.q_stride_b + h * f.q_stride_h + q0 * f.q_stride_t, f.q_stride_t, rows, D,
                                    sc.c.data(), &ldq);
        const A* of = fp32_rows(dout + b * p.do_stride_b + h * p.do_stride_h + q0 * p.do_stride_t,
                                    p.do_stride_t, rows, Dv, sc.d.data(), &ldo);
        load_row_stats(sc, b, h, q0, rows, rows);
        A* S = sc.s.data();     // [rows, cols]
        A* dP = sc.dp.data();   // [rows, cols]
        prim.gemm(rows, cols, D, qf, ldq, 1, kt, cols, S, cols, false);                    // S = Q K^T
        for (int r = 0; r < rows; ++r) {
          A* s = S + r * cols;
          if (sc.lse2[r] == neg_inf) {
            std::fill(s, s + cols, A(0));
          } else {
            prim.exp2_row(s, cols, smul, sc.lse2[r]);                                       // P
          }
        }
        mask_scores(prim, S, cols, rows, keys, cols, blk.tile, words, A(0));
        prim.gemm(keys, Dv, rows, S, 1, cols, of, ldo, dv, Dv, true);                     // dV += P^T dO
        prim.gemm(rows, cols, Dv, of, ldo, 1, vt, cols, dP, cols, false);                 // dP = dO V^T
        for (int r = 0; r < rows; ++r) {
          for (int c = 0; c < cols; ++c) dP[r * cols + c] = S[r * cols + c] * (dP[r * cols + c] - sc.delta[r]);
        }
        prim.gemm(keys, D, rows, dP, 1, cols, qf, ldq, dk, D, true);                      // dK += dS^T Q
      });
    }
    const int64_t row0 = (b * f.kv_heads + hk) * f.kv_len + c0;
    for (int c = 0; c < keys; ++c) {
      for (int d = 0; d < D; ++d) gk[(row0 + c) * D + d] = static_cast<T>(dk[c * D + d] * scale_of<A>(f));
      for (int d = 0; d < Dv; ++d) gv[(row0 + c) * Dv + d] = static_cast<T>(dv[c * Dv + d]);
    }
  });

  // Pass 2: dQ per (b, h, query block) over the forward lists, S in [keys, lanes] layout; Q^T and dO^T built once
  // per task.
  T* gq = static_cast<T*>(p.grad_q);
  run_tasks(f.batch * f.heads * QB, proto, [&](int64_t t, BwdScratch<A>& sc) {
    const auto [b, h, hk, qb, q0, rows, lanes] = query_task(f, t);
    A* qt = sc.a.data();    // [D, lanes]
    A* dot = sc.b.data();   // [Dv, lanes]
    load_transposed(q + b * f.q_stride_b + h * f.q_stride_h + q0 * f.q_stride_t, f.q_stride_t, rows, D, A(1), qt,
                    lanes);
    load_transposed(dout + b * p.do_stride_b + h * p.do_stride_h + q0 * p.do_stride_t, p.do_stride_t, rows, Dv, A(1),
                    dot, lanes);
    load_row_stats(sc, b, h, q0, rows, lanes);
    A* dqt = sc.acc1.data();   // dQ^T [D, lanes]
    std::fill(dqt, dqt + D * lanes, A(0));
    const T* kbh = k + b * f.k_stride_b + hk * f.k_stride_h;
    const T* vbh = v + b * f.v_stride_b + hk * f.v_stride_h;
    for_each_listed(f.kv, md, md.row(b, h) * QB + qb, f.tiles, [&](Listed blk) {
      const auto [c0, keys, kf, ldk, vf, ldv] = key_block(f, kbh, vbh, blk.block, sc.c.data(), sc.d.data());
      A* St = sc.s.data();     // [keys, lanes]
      A* dPt = sc.dp.data();   // [keys, lanes]
      prim.gemm(keys, lanes, D, kf, ldk, 1, qt, lanes, St, lanes, false);                 // S^T = K Q^T
      prim.probs_t(St, lanes, keys, lanes, smul, sc.lse2.data());                          // P^T
      mask_scores_t(St, lanes, rows, keys, blk.tile, words, A(0));
      prim.gemm(keys, lanes, Dv, vf, ldv, 1, dot, lanes, dPt, lanes, false);              // dP^T = V dO^T
      for (int c = 0; c < keys; ++c) {
        for (int r = 0; r < lanes; ++r) {
          dPt[c * lanes + r] = St[c * lanes + r] * (dPt[c * lanes + r] - sc.delta[r]);    // dS^T
        }
      }
      prim.gemm(D, lanes, keys, kf, 1, ldk, dPt, lanes, dqt, lanes, true);                // dQ^T += K^T dS^T
    });
    T* dst = gq + ((b * f.heads + h) * f.q_len + q0) * D;
    for (int r = 0; r < rows; ++r) {
      for (int d = 0; d < D; ++d) dst[r * D + d] = static_cast<T>(dqt[d * lanes + r] * scale_of<A>(f));
    }
  });
}

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const at::Tensor& kv_num, const at::Tensor& kv_idx,
                                               const at::Tensor& full_kv_num, const at::Tensor& full_kv_idx,
                                               const at::Tensor& kv_tile_ids, const at::Tensor& /*q_num*/,
                                               const at::Tensor& /*q_idx*/, const at::Tensor& /*full_q_num*/,
                                               const at::Tensor& /*full_q_idx*/, const at::Tensor& /*q_tile_ids*/,
                                               const at::Tensor& tiles, int64_t block_q, int64_t block_kv,
                                               double scale) {
  const ListTensors lists{kv_num, kv_idx, full_kv_num, full_kv_idx, kv_tile_ids};
  FwdParams p = describe_forward(kForward, q, k, v, lists, tiles, block_q, block_kv, scale);
  check_lists(kForward, "kv_indices", "full_kv_indices", lists, p.mask.num_tiles);
  at::Tensor out = at::empty({p.batch, p.heads, p.q_len, p.v_dim}, q.options());
  at::Tensor lse = at::empty({p.batch, p.heads, p.q_len}, q.options().dtype(lse_dtype(q.scalar_type())));
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();
  forward_counter.hit();
  if (p.dtype == DType::kF64) {
    forward_kernel<double, double>(p);   // the portable path, in fp64 throughout (gradcheck)
  } else {
    BLOCKOPS_DTYPE_SWITCH(p.dtype, kT, TORCH_INTERNAL_ASSERT(false, "unsupported dtype"),
                          [&] { forward_kernel<cpu_element_t<kT>, float>(p); });
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const c10::optional<at::Tensor>& grad_lse, const at::Tensor& kv_num, const at::Tensor& kv_idx, const at::Tensor& full_kv_num,
    const at::Tensor& full_kv_idx, const at::Tensor& kv_tile_ids, const at::Tensor& q_num, const at::Tensor& q_idx,
    const at::Tensor& full_q_num, const at::Tensor& full_q_idx, const at::Tensor& q_tile_ids, const at::Tensor& tiles,
    int64_t block_q, int64_t block_kv, double scale) {
  const ListTensors kv_lists{kv_num, kv_idx, full_kv_num, full_kv_idx, kv_tile_ids};
  const ListTensors q_lists{q_num, q_idx, full_q_num, full_q_idx, q_tile_ids};
  const FwdParams fwd = describe_forward(kBackward, q, k, v, kv_lists, tiles, block_q, block_kv, scale);
  const at::Tensor dout = grad_out.contiguous();
  const at::Tensor o = out.contiguous();
  const c10::optional<at::Tensor> glse =
      grad_lse.has_value() ? c10::optional<at::Tensor>(grad_lse->contiguous()) : c10::nullopt;
  BwdParams p = describe_backward(kBackward, fwd, dout, o, lse, glse, q_lists);
  check_lists(kBackward, "kv_indices", "full_kv_indices", kv_lists, fwd.mask.num_tiles);
  check_lists(kBackward, "q_indices", "full_q_indices", q_lists, fwd.mask.num_tiles);
  at::Tensor delta = at::empty({fwd.batch, fwd.heads, fwd.q_len}, lse.options());
  at::Tensor gq = at::empty({fwd.batch, fwd.heads, fwd.q_len, fwd.head_dim}, q.options());
  at::Tensor gk = at::empty({fwd.batch, fwd.kv_heads, fwd.kv_len, fwd.head_dim}, q.options());
  at::Tensor gv = at::empty({fwd.batch, fwd.kv_heads, fwd.kv_len, fwd.v_dim}, q.options());
  p.delta = delta.data_ptr();
  p.grad_q = gq.data_ptr();
  p.grad_k = gk.data_ptr();
  p.grad_v = gv.data_ptr();
  backward_counter.hit();
  if (fwd.dtype == DType::kF64) {
    backward_kernel<double, double>(p);
  } else {
    BLOCKOPS_DTYPE_SWITCH(fwd.dtype, kT, TORCH_INTERNAL_ASSERT(false, "unsupported dtype"),
                          [&] { backward_kernel<cpu_element_t<kT>, float>(p); });
  }
  return {gq, gk, gv};
}

}  // namespace
}  // namespace blockops::attention

TORCH_LIBRARY_IMPL(blockops, CPU, m) {
  m.impl("block_sparse_attention", &blockops::attention::forward_cpu);
  m.impl("block_sparse_attention_backward", &blockops::attention::backward_cpu);
}
