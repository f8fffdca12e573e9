// PaTH attention numerics, torch-free, shared by the CPU kernels (path_attention_cpu*.cpp) and the CUDA kernels
// (kernels/path_attention.cu): the parameters, the per-chunk block layout, the UT transform of one chunk and its
// backward, the online-softmax bookkeeping and its exponential. The UT helpers come as one function per output
// entry (or row), so the CPU loops over them in order while a CUDA block spreads them over its threads, with one
// summation order for both.
//
// Math (../shared/reference/attention.md, PaTH section): H_t = I - beta_t w_t w_t^T; the logit of query i and
// key j <= i is q_i^T H_i H_{i-1} ... H_{j+1} k_j (no transform on the diagonal); with the forget gate,
// G = cumsum(g) per sequence and query head and s_ij = scale * (logit_ij + G_i - G_j); causal softmax.
//
// Chunked algorithm, chunks of C = kChunk tokens starting at each sequence's start. For one chunk with rows
// W [n, D] (ascending token order), Dg = diag(beta), K [n, D]:
//   T    = (I + strictLower(Dg W W^T))^{-1}          (unit lower triangular, forward substitution)
//   H_{n-1} ... H_0 = I - W^T (T Dg W)                (the UT / compact WY form; TDW = T Dg W [n, D])
//   U    = T Dg strictLower(W K^T)                    [n, n]; column b holds the coefficients u_e (e > b) with
//          H_{n-1} ... H_{b+1} k_b = k_b - sum_e u_e w_e, and H_a ... H_{b+1} k_b = k_b - sum_{e<=a} u_e w_e
//   Kbar = K - U^T W                                  keys carried to the chunk's last token
//   intra logits  M = QK^T - tril(Q W^T) U            (for b <= a; exact)
//   Q0   = Q - tril(Q W^T) TDW                        queries carried to the chunk's first token
// A query chunk then walks the earlier key chunks right to left: logits Q0 Kbar_c^T, then Q0 <- Q0 - (Q0 W_c^T)
// TDW_c (the row vector times H_{end-1} ... H_start of chunk c), with an online softmax over all key chunks.
//
// Backward (P = softmax probabilities recomputed from lse, dO the output gradient, Delta_i = dO_i . O_i - grad_lse_i):
//   dV += P^T dO;  dL = scale * P * (dO V^T - Delta) (gradient at the logits);  dG_i += sum_j dL_ij and
//   dG_j -= sum_i dL_ij, dg = reverse cumsum of dG per sequence. dL flows back through the chunked forward in
//   reverse (the carried queries, Kbar, the intra-chunk logits) and then through each chunk's UT transform
//   (the ut_grad_phase* entries below, run by the CUDA kernels; the CPU runs the same five phases as whole matrix
//   products, ut_backward_cpu in path_attention_cpu_backward.cpp) to W, K and beta.
//
// Tensors (contiguous, element strides implied by the shapes):
//   q [B, T, HQ, D], k and w [B, T, H, D], v [B, T, H, Dv], beta [B, T, H], g [B, T, HQ] (optional);
//   HQ a multiple of H (query head hq reads key head hq / (HQ / H)); D and Dv multiples of 8 up to 256.
//   q, k, v: one of fp16/bf16/fp32; w, beta, g: fp32 or q's dtype; everything is computed in fp32. On the CPU
//   also fp64 (then all of q, k, v, w, beta, g: for torch.autograd.gradcheck), computed in fp64 throughout: the
//   helpers and structs below are templates on the compute type S (float, or double for fp64 on the CPU); the
//   CUDA kernels use S = float (Params, UtGrad, QueryChunkScratch and DecodeParams name those).
//   o [B, T, HQ, Dv] in q's dtype; lse [B, HQ, T] in S (natural log-sum-exp of the scaled scores).
//   Sequences: B rows of T tokens, or with cu_seqlens (B = 1) the packed spans [cu[n], cu[n + 1]).
#pragma once
#include <cmath>
#include <cstdint>

#include "dtype.h"
#include "macros.h"

namespace blockops::path_attention {

constexpr int kChunk = 64;          // tokens per chunk: the UT solve is O(C^3), the inter-chunk work O(C^2 D)
constexpr int kMaxHeadDim = 256;
constexpr int kMaxDecodeGroup = 64;   // query heads per key head in path_decode_step (a per-thread array)

template <typename S>
struct ParamsT {
  const void* q;
  const void* k;
  const void* v;
  const void* w;
  const void* beta;
  const void* g;          // null: no forget gate
  DType dtype;            // of q, k, v and o
  DType w_dtype, beta_dtype, g_dtype;
  void* o;                // [B, T, HQ, Dv]
  S* lse;                 // [B, HQ, T]
  int64_t batch, seq_len, heads, kv_heads;
  int head_dim, v_dim;
  S scale;                // fp32 for the float kernels (both backends), the caller's exact value for fp64

  BLOCKOPS_HD int64_t kv_head_of(int64_t hq) const { return hq / (heads / kv_heads); }
};
using Params = ParamsT<float>;

// One sequence: batch row, first token, length (tokens [start, start + len) of row b).
struct Span {
  int64_t b, start, len;
};

// One chunk of one sequence, in the global chunk numbering (all sequences' chunks one after the other): the
// CUDA kernels index their work by it. Chunk g's earlier chunks of the same sequence are g - index .. g - 1.
struct ChunkRef {
  int64_t b;           // batch row
  int64_t t0;          // first token of the chunk (within row b)
  int64_t seq_start;   // first token of its sequence
  int64_t n;           // tokens in the chunk, 1..kChunk
  int64_t index;       // position of the chunk within its sequence (0: first)
};

// Offsets (in elements of S) of the parts of one chunk's block, the product of pass 1 (the chunk's UT transform)
// read by the forward, backward and key-cache passes. Operands multiplied from the right are kept transposed too,
// so every inner loop is unit-stride; rows beyond the chunk's n tokens are zero. The backward (and the CUDA
// kernels, which always build the full block) also keep the other orientation of each operand.
struct ChunkLayout {
  int d, dv;
  bool backward = false;
  BLOCKOPS_HD int64_t cd() const { return static_cast<int64_t>(d) * kChunk; }
  BLOCKOPS_HD int64_t wt() const { return 0; }                        // W^T    [D, C]
  BLOCKOPS_HD int64_t tdw() const { return cd(); }                     // TDW    [C, D]
  BLOCKOPS_HD int64_t kt() const { return 2 * cd(); }                  // K^T    [D, C]
  BLOCKOPS_HD int64_t kbart() const { return 3 * cd(); }               // Kbar^T [D, C]
  BLOCKOPS_HD int64_t u() const { return 4 * cd(); }                   // U      [C, C]
  BLOCKOPS_HD int64_t v() const { return u() + kChunk * kChunk; }      // V      [C, Dv]
  BLOCKOPS_HD int64_t w() const { return v() + static_cast<int64_t>(kChunk) * dv; }   // backward: W [C, D]
  BLOCKOPS_HD int64_t k() const { return w() + cd(); }                 // K      [C, D]
  BLOCKOPS_HD int64_t kbar() const { return k() + cd(); }              // Kbar   [C, D]
  BLOCKOPS_HD int64_t tdwt() const { return kbar() + cd(); }           // TDW^T  [D, C]
  BLOCKOPS_HD int64_t ut() const { return tdwt() + cd(); }             // U^T    [C, C]
  BLOCKOPS_HD int64_t vt() const { return ut() + kChunk * kChunk; }    // V^T    [Dv, C]
  BLOCKOPS_HD int64_t size() const { return backward ? vt() + static_cast<int64_t>(dv) * kChunk : w(); }
};

// T = (I + strictLower(Dg W W^T))^{-1} for one chunk of n <= kChunk rows: T [n, n] row-major, unit lower
// triangular. gram [n, n] holds W W^T (only the strictly lower part is read).
// Row a of (I + A) T = I gives T[a] = e_a - sum_{c < a} A[a][c] T[c]: forward substitution, O(n^3 / 6).
// ut_inverse_entry is T[a][b] for b <= a, from rows 0 .. a - 1 of T (row by row; a row's entries in any order).
template <typename S>
BLOCKOPS_HD S ut_inverse_entry(int a, int b, int n, const S* gram, const S* beta, const S* T) {
  S t = (a == b) ? S(1) : S(0);
  for (int c = b; c < a; ++c) t -= beta[a] * gram[a * n + c] * T[c * n + b];
  return t;
}

template <typename S>
BLOCKOPS_HD void ut_inverse(int n, const S* gram, const S* beta, S* T) {
  for (int a = 0; a < n; ++a)
    for (int b = 0; b < n; ++b) T[a * n + b] = b <= a ? ut_inverse_entry(a, b, n, gram, beta, T) : S(0);
}

// TDW [n, d] = T Dg W: the rank-n factor of the chunk's product, I - W^T TDW. Entry (a, x).
template <typename S>
BLOCKOPS_HD S ut_tdw_entry(int a, int x, int n, int d, const S* T, const S* beta, const S* W) {
  S acc = 0;
  for (int c = 0; c <= a; ++c) acc += T[a * n + c] * beta[c] * W[c * d + x];
  return acc;
}

template <typename S>
BLOCKOPS_HD void ut_tdw(int n, int d, const S* T, const S* beta, const S* W, S* TDW) {
  for (int a = 0; a < n; ++a)
    for (int x = 0; x < d; ++x) TDW[a * d + x] = ut_tdw_entry(a, x, n, d, T, beta, W);
}

// U [n, n] = T Dg strictLower(W K^T), from wk [n, n] = W K^T (only e > b read): U[a][b] = sum_{b < e <= a}
// T[a][e] beta_e wk[e][b] (T is lower triangular, so U is strictly lower triangular).
template <typename S>
BLOCKOPS_HD S ut_key_coefficient(int a, int b, int n, const S* T, const S* beta, const S* wk) {
  S acc = 0;
  for (int e = b + 1; e <= a; ++e) acc += T[a * n + e] * beta[e] * wk[e * n + b];
  return acc;
}

template <typename S>
BLOCKOPS_HD void ut_key_coefficients(int n, const S* T, const S* beta, const S* wk, S* U) {
  for (int a = 0; a < n; ++a)
    for (int b = 0; b < n; ++b) U[a * n + b] = ut_key_coefficient(a, b, n, T, beta, wk);
}

// Kbar [n, d] = K - U^T W: every key of the chunk carried to the chunk's last token. Entry (b, x).
template <typename S>
BLOCKOPS_HD S ut_carried_key(int b, int x, int n, int d, const S* U, const S* W, const S* K) {
  S acc = K[b * d + x];
  for (int e = b + 1; e < n; ++e) acc -= U[e * n + b] * W[e * d + x];
  return acc;
}

template <typename S>
BLOCKOPS_HD void ut_carry_keys(int n, int d, const S* U, const S* W, const S* K, S* Kbar) {
  for (int b = 0; b < n; ++b)
    for (int x = 0; x < d; ++x) Kbar[b * d + x] = ut_carried_key(b, x, n, d, U, W, K);
}

// Backward of one chunk's UT transform: from the gradients at Kbar (dKbar [n, d]), TDW (dTDW [n, d]) and U
// (dU [n, n], accumulated by the attention passes) to W, K and beta. W, K, beta are the chunk's inputs;
// gram = W W^T and wk = W K^T (strictly lower parts read), T and U as computed by the forward helpers above.
// With Z = Dg strictLower(W K^T) and Y = Dg W (so U = T Z, TDW = T Y) and A = Dg strictLower(W W^T)
// (T = (I + A)^{-1}, so dA = -T^T dT T^T):
//   Kbar = K - U^T W:  dK += dKbar,  dU -= W dKbar^T,  dW -= U dKbar
//   U = T Z:           dT += dU Z^T, dZ = T^T dU  ->  dbeta_e += sum_b dZ_eb wk_eb,  d(wk) = Dg dZ
//   TDW = T Y:         dT += dTDW Y^T, dY = T^T dTDW  ->  dW += Dg dY,  dbeta_c += dY_c . w_c
//   A:                 dA = strictLower(-T^T dT T^T)  ->  dbeta_a += sum_c dA_ac gram_ac,  d(gram) = Dg dA
// with d(wk) and d(gram) sent to W and K through the strictly lower products. Five phases, each a set of
// independent entries (a CUDA block syncs between phases); the UtGradT struct holds the inputs and scratch.
template <typename S>
struct UtGradT {
  int n, d;
  const S *W, *K, *beta, *gram, *wk, *T, *U;   // the chunk's forward quantities
  const S* dKbar;                               // [n, d]
  const S* dTDW;                                // [n, d]
  S* dU;      // [n, n], in: from the attention passes; phase 1 adds the Kbar term (in place)
  S* dT;      // [n, n] scratch (lower triangle)
  S* dZ;      // [n, n] scratch (strictly lower)
  S* tmp;     // [n, n] scratch: dT T^T
  S* dA;      // [n, n] scratch (strictly lower)
  S* dY;      // [n, d] scratch
};
using UtGrad = UtGradT<float>;

// Phase 1, entry (e, b) with b < e: dU_eb -= W_e . dKbar_b.
template <typename S>
BLOCKOPS_HD void ut_grad_phase1(const UtGradT<S>& g, int e, int b) {
  S acc = 0;
  for (int x = 0; x < g.d; ++x) acc += g.W[e * g.d + x] * g.dKbar[b * g.d + x];
  g.dU[e * g.n + b] -= acc;
}

// Phase 2 (after phase 1): entries (a, e), e <= a, of dT = dU Z^T + dTDW Y^T; (e, b), b < e, of dZ = T^T dU;
// (c, x) of dY = T^T dTDW. `which` selects the matrix: 0 dT, 1 dZ, 2 dY.
template <typename S>
BLOCKOPS_HD void ut_grad_phase2(const UtGradT<S>& g, int which, int r, int c) {
  const int n = g.n, d = g.d;
  S acc = 0;
  if (which == 0) {   // dT[r][c], c <= r
    for (int b = 0; b < c; ++b) acc += g.dU[r * n + b] * g.beta[c] * g.wk[c * n + b];
    S dot = 0;
    for (int x = 0; x < d; ++x) dot += g.dTDW[r * d + x] * g.W[c * d + x];
    g.dT[r * n + c] = acc + dot * g.beta[c];
  } else if (which == 1) {   // dZ[r][c], c < r
    for (int a = r; a < n; ++a) acc += g.T[a * n + r] * g.dU[a * n + c];
    g.dZ[r * n + c] = acc;
  } else {   // dY[r][c] (row r, dim c)
    for (int a = r; a < n; ++a) acc += g.T[a * n + r] * g.dTDW[a * d + c];
    g.dY[r * d + c] = acc;
  }
}

// Phase 3 (after phase 2), entry (x, c): tmp = dT T^T (dT lower, T lower: y <= min(x, c)).
template <typename S>
BLOCKOPS_HD void ut_grad_phase3(const UtGradT<S>& g, int xr, int c) {
  const int n = g.n, hi = xr < c ? xr : c;
  S acc = 0;
  for (int y = 0; y <= hi; ++y) acc += g.dT[xr * n + y] * g.T[c * n + y];
  g.tmp[xr * n + c] = acc;
}

// Phase 4 (after phase 3), entry (a, c) with c < a: dA = -T^T tmp.
template <typename S>
BLOCKOPS_HD void ut_grad_phase4(const UtGradT<S>& g, int a, int c) {
  const int n = g.n;
  S acc = 0;
  for (int xr = a; xr < n; ++xr) acc -= g.T[xr * n + a] * g.tmp[xr * n + c];
  g.dA[a * n + c] = acc;
}

// Phase 5 (after phase 4): row r's gradients, accumulated. dK and dW entry (r, x); dbeta_r with x = -1.
template <typename S>
BLOCKOPS_HD void ut_grad_phase5(const UtGradT<S>& g, int r, int x, S* dW, S* dK, S* dbeta) {
  const int n = g.n, d = g.d;
  if (x < 0) {
    S acc = 0;
    for (int b = 0; b < r; ++b) acc += g.dZ[r * n + b] * g.wk[r * n + b] + g.dA[r * n + b] * g.gram[r * n + b];
    for (int y = 0; y < d; ++y) acc += g.dY[r * d + y] * g.W[r * d + y];
    dbeta[r] += acc;
    return;
  }
  S dk = g.dKbar[r * d + x];
  for (int e = r + 1; e < n; ++e) dk += g.beta[e] * g.dZ[e * n + r] * g.W[e * d + x];
  S dw = g.beta[r] * g.dY[r * d + x];
  for (int b = 0; b < r; ++b) {
    dw -= g.U[r * n + b] * g.dKbar[b * d + x];
    dw += g.beta[r] * (g.dZ[r * n + b] * g.K[b * d + x] + g.dA[r * n + b] * g.W[b * d + x]);
  }
  for (int a = r + 1; a < n; ++a) dw += g.beta[a] * g.dA[a * n + r] * g.W[a * d + x];
  dK[r * d + x] += dk;
  dW[r * d + x] += dw;
}

// Scratch of one query chunk's backward (backward_query_chunk of both kernels) with `chunks_before` earlier chunks
// in its sequence: the queries carried to each earlier chunk, then this chunk's row matrices.
template <typename S>
struct QueryChunkScratchT {
  S* states;   // Q0^(c) [chunks_before][C, d]
  S* Q;        // [n, d]
  S* R;        // d loss / d Q0^(c) [n, d]
  S* dQ;       // [n, d]
  S* Y;        // Q0^(c) W_c^T [n, C]
  S* QW;       // tril(Q W^T) [n, C]
  S* scores;   // scores, then probabilities [n, C]
  S* dL;       // d loss / d logit [n, C]
  S* dM;       // intra-chunk dL [n, C]
  S* dQW;      // [n, C]
  S* dO;       // [n, dv]
  S* Ob;       // [n, dv]
  S* delta;    // [n]
  S* lse;      // [n]
  S* Gq;       // [n]
};
using QueryChunkScratch = QueryChunkScratchT<float>;

// Its size in elements (of S).
BLOCKOPS_HD int64_t query_chunk_scratch_floats(int64_t chunks_before, int d, int dv) {
  const int64_t C = kChunk;
  return (chunks_before + 3) * C * d + 6 * C * C + 2 * C * dv + 3 * C;
}

// Carves `buf` (query_chunk_scratch_floats(chunks_before, d, dv) elements) in the order above.
template <typename S>
BLOCKOPS_HD QueryChunkScratchT<S> query_chunk_scratch(S* buf, int64_t chunks_before, int d, int dv) {
  const int64_t C = kChunk;
  QueryChunkScratchT<S> s;
  s.states = buf;
  s.Q = s.states + chunks_before * C * d;
  s.R = s.Q + C * d;
  s.dQ = s.R + C * d;
  s.Y = s.dQ + C * d;
  s.QW = s.Y + C * C;
  s.scores = s.QW + C * C;
  s.dL = s.scores + C * C;
  s.dM = s.dL + C * C;
  s.dQW = s.dM + C * C;
  s.dO = s.dQW + C * C;
  s.Ob = s.dO + C * dv;
  s.delta = s.Ob + C * dv;
  s.lse = s.delta + C;
  s.Gq = s.lse + C;
  return s;
}

// One decoding step (path_decode_step), for every row b and key head h: each cached key j < len_b takes the new
// token's transform, k_j <- k_j - beta (k_j . w) w (so the cache stays carried to the newest position); the token's
// own key and value are appended at position len_b (untransformed: the diagonal); with a gate, G_last += g and
// gates[len_b] = G_last; then each query head of the group attends over the len_b + 1 keys with
// s_j = scale * (q . k_j + G_last - G_j). The cache is in S (fp32; fp64 for fp64 inputs on the CPU); the caller
// grows it (capacity > every len_b) and increments the lengths afterwards.
template <typename S>
struct DecodeParamsT {
  const void* q;          // [B, HQ, D]
  const void* k;          // [B, H, D]
  const void* v;          // [B, H, Dv]
  const void* w;          // [B, H, D]
  const void* beta;       // [B, H]
  const void* g;          // [B, HQ] or null
  DType dtype, w_dtype, beta_dtype, g_dtype;
  S* keys;                // [B, H, L, D]
  S* values;              // [B, H, L, Dv]
  const int64_t* lengths; // [B], each in [0, L)
  S* gates;               // [B, HQ, L] or null
  S* g_last;              // [B, HQ] or null
  void* o;                // [B, HQ, Dv] in dtype
  int64_t batch, heads, kv_heads, capacity;
  int head_dim, v_dim;
  S scale;                // as ParamsT::scale
};
using DecodeParams = DecodeParamsT<float>;

// Online softmax (FlashAttention-2) for one row: a new block of scores with maximum `block_max` arrives; returns
// the factor by which the row's running sum and accumulator must be multiplied, and updates the running max.
// Rows always see their own diagonal key first, so the max is finite after the first block.
template <typename S>
BLOCKOPS_HD S softmax_rescale(S& row_max, S block_max) {
  const S m_new = block_max > row_max ? block_max : row_max;
  const S factor = std::exp(row_max - m_new);   // exp(-inf) = 0 for the first block
  row_max = m_new;
  return factor;
}

// The maximum of a block of scores for the `no visible key in this block` test, kept NaN once a score is NaN (std::max
// and fmaxf drop it): a block whose scores are all NaN / -inf must not be skipped, the NaN has to reach the row's
// sum so the row's output and lse come out NaN, as softmax (and F.scaled_dot_product_attention) give them.
// softmax_rescale then keeps the running max finite (NaN > m is false); exp_or_zero(NaN) is NaN.
template <typename S>
BLOCKOPS_HD S nan_max(S a, S b) { return (b > a || b != b) ? b : a; }

// The forward's and backward's softmax exponentials, on both backends: exactly 0 below kExpFloor (and for -inf:
// hidden keys), so a negligible score never yields a denormal (e^-86 ~ 4e-38 is near fp32's smallest normal). The
// fp64 path keeps the same floor: a term below e^-86 of the row's largest changes nothing at fp64's 1e-16 either.
constexpr float kExpFloor = -86.f;
template <typename S>
BLOCKOPS_HD S exp_or_zero(S v) { return v < S(kExpFloor) ? S(0) : std::exp(v); }   // NaN -> NaN

}  // namespace blockops::path_attention
