// PaTH attention numerics, torch-free, shared by the CPU kernels (path_attention_cpu.cpp) and, later, the CUDA
// kernels: the parameters, the UT transform of one chunk and the online-softmax bookkeeping.
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
//   (ut_backward below) to W, K and beta.
//
// Tensors (contiguous, element strides implied by the shapes):
//   q [B, T, HQ, D], k and w [B, T, H, D], v [B, T, H, Dv], beta [B, T, H], g [B, T, HQ] (optional);
//   HQ a multiple of H (query head hq reads key head hq / (HQ / H)); D and Dv multiples of 8 up to 256.
//   q, k, v: one of fp16/bf16/fp32; w, beta, g: fp32 or q's dtype; everything is computed in fp32.
//   o [B, T, HQ, Dv] in q's dtype; lse [B, HQ, T] fp32 (natural log-sum-exp of the scaled scores).
//   Sequences: B rows of T tokens, or with cu_seqlens (B = 1) the packed spans [cu[n], cu[n + 1]).
#pragma once
#include <cmath>
#include <cstdint>

#include "dtype.h"
#include "macros.h"

namespace blockops::path {

constexpr int kChunk = 64;          // tokens per chunk: the UT solve is O(C^3), the inter-chunk work O(C^2 D)
constexpr int kMaxHeadDim = 256;

struct Params {
  const void* q;
  const void* k;
  const void* v;
  const void* w;
  const void* beta;
  const void* g;          // null: no forget gate
  DType dtype;            // of q, k, v and o
  DType w_dtype, beta_dtype, g_dtype;
  void* o;                // [B, T, HQ, Dv]
  float* lse;             // [B, HQ, T]
  int64_t batch, seq_len, heads, kv_heads;
  int head_dim, v_dim;
  float scale;

  BLOCKOPS_HD int64_t kv_head_of(int64_t hq) const { return hq / (heads / kv_heads); }
};

// One sequence: batch row, first token, length (tokens [start, start + len) of row b).
struct Span {
  int64_t b, start, len;
};

// T = (I + strictLower(Dg W W^T))^{-1} for one chunk of n <= kChunk rows: T [n, n] row-major, unit lower
// triangular. gram [n, n] holds W W^T on entry (only the strictly lower part is read).
// Row a of (I + A) T = I gives T[a] = e_a - sum_{c < a} A[a][c] T[c]: forward substitution, O(n^3 / 6).
BLOCKOPS_HD void ut_inverse(int n, const float* gram, const float* beta, float* T) {
  for (int a = 0; a < n; ++a) {
    float* ta = T + a * n;
    for (int b = 0; b < n; ++b) ta[b] = (a == b) ? 1.f : 0.f;
    for (int c = 0; c < a; ++c) {
      const float coef = beta[a] * gram[a * n + c];
      const float* tc = T + c * n;
      for (int b = 0; b <= c; ++b) ta[b] -= coef * tc[b];
    }
  }
}

// TDW [n, d] = T Dg W: the rank-n factor of the chunk's product, I - W^T TDW.
BLOCKOPS_HD void ut_tdw(int n, int d, const float* T, const float* beta, const float* W, float* TDW) {
  for (int a = 0; a < n; ++a) {
    float* out = TDW + a * d;
    for (int x = 0; x < d; ++x) out[x] = 0.f;
    for (int c = 0; c <= a; ++c) {
      const float coef = T[a * n + c] * beta[c];
      const float* wc = W + c * d;
      for (int x = 0; x < d; ++x) out[x] += coef * wc[x];
    }
  }
}

// U [n, n] = T Dg strictLower(W K^T), from wk [n, n] = W K^T (only e > b read): U[a][b] = sum_{b < e <= a}
// T[a][e] beta_e wk[e][b] (T is lower triangular, so U is strictly lower triangular).
BLOCKOPS_HD void ut_key_coefficients(int n, const float* T, const float* beta, const float* wk, float* U) {
  for (int a = 0; a < n; ++a) {
    for (int b = 0; b < n; ++b) {
      float acc = 0.f;
      for (int e = b + 1; e <= a; ++e) acc += T[a * n + e] * beta[e] * wk[e * n + b];
      U[a * n + b] = acc;
    }
  }
}

// Kbar [n, d] = K - U^T W: every key of the chunk carried to the chunk's last token.
BLOCKOPS_HD void ut_carry_keys(int n, int d, const float* U, const float* W, const float* K, float* Kbar) {
  for (int b = 0; b < n; ++b) {
    float* out = Kbar + b * d;
    for (int x = 0; x < d; ++x) out[x] = K[b * d + x];
    for (int e = b + 1; e < n; ++e) {
      const float coef = U[e * n + b];
      const float* we = W + e * d;
      for (int x = 0; x < d; ++x) out[x] -= coef * we[x];
    }
  }
}

// Backward of one chunk's UT transform: from the gradients at Kbar (dKbar [n, d]), TDW (dTDW [n, d]) and U
// (dU [n, n], overwritten) to W, K (accumulated into dW, dK [n, d]) and beta (accumulated into dbeta [n]).
// W, K, beta are the chunk's inputs; gram = W W^T and wk = W K^T (strictly lower parts read), T and U as computed
// by the forward helpers above. Scratch: dT [n, n], tmp [n, n], dY [n, d]. With Z = Dg strictLower(W K^T) and
// Y = Dg W (so U = T Z, TDW = T Y) and A = Dg strictLower(W W^T) (T = (I + A)^{-1}, so dA = -T^T dT T^T):
//   Kbar = K - U^T W:  dK += dKbar,  dU -= W dKbar^T,  dW -= U dKbar
//   U = T Z:           dT += dU Z^T, dZ = T^T dU  ->  dbeta_e += sum_b dZ_eb wk_eb,  d(wk) = Dg dZ
//   TDW = T Y:         dT += dTDW Y^T, dY = T^T dTDW  ->  dW += Dg dY,  dbeta_c += dY_c . w_c
//   A:                 dA = strictLower(-T^T dT T^T)  ->  dbeta_a += sum_c dA_ac gram_ac,  d(gram) = Dg dA
// with d(wk) and d(gram) sent to W and K through the strictly lower products.
BLOCKOPS_HD void ut_backward(int n, int d, const float* W, const float* K, const float* beta, const float* gram,
                             const float* wk, const float* T, const float* U, const float* dKbar,
                             const float* dTDW, float* dU, float* dW, float* dK, float* dbeta, float* dT,
                             float* tmp, float* dY) {
  // Kbar = K - U^T W
  for (int x = 0; x < n * d; ++x) dK[x] += dKbar[x];
  for (int e = 0; e < n; ++e) {
    for (int b = 0; b < e; ++b) {
      float acc = 0.f;
      for (int x = 0; x < d; ++x) acc += W[e * d + x] * dKbar[b * d + x];
      dU[e * n + b] -= acc;
      const float u = U[e * n + b];
      for (int x = 0; x < d; ++x) dW[e * d + x] -= u * dKbar[b * d + x];
    }
  }
  // U = T Z (T lower, Z strictly lower: only a >= e > b contribute)
  for (int x = 0; x < n * n; ++x) dT[x] = 0.f;
  for (int a = 0; a < n; ++a)
    for (int e = 0; e <= a; ++e) {
      float acc = 0.f;
      for (int b = 0; b < e; ++b) acc += dU[a * n + b] * beta[e] * wk[e * n + b];
      dT[a * n + e] += acc;
    }
  for (int e = 1; e < n; ++e) {
    for (int b = 0; b < e; ++b) {
      float dz = 0.f;
      for (int a = e; a < n; ++a) dz += T[a * n + e] * dU[a * n + b];
      dbeta[e] += dz * wk[e * n + b];
      const float dwk = beta[e] * dz;   // wk_eb = w_e . k_b
      for (int x = 0; x < d; ++x) {
        dW[e * d + x] += dwk * K[b * d + x];
        dK[b * d + x] += dwk * W[e * d + x];
      }
    }
  }
  // TDW = T Y, Y = Dg W
  for (int a = 0; a < n; ++a)
    for (int c = 0; c <= a; ++c) {
      float acc = 0.f;
      for (int x = 0; x < d; ++x) acc += dTDW[a * d + x] * W[c * d + x];
      dT[a * n + c] += acc * beta[c];
    }
  for (int c = 0; c < n; ++c) {
    float* dy = dY + c * d;
    for (int x = 0; x < d; ++x) dy[x] = 0.f;
    for (int a = c; a < n; ++a) {
      const float t = T[a * n + c];
      for (int x = 0; x < d; ++x) dy[x] += t * dTDW[a * d + x];
    }
    float acc = 0.f;
    for (int x = 0; x < d; ++x) {
      acc += dy[x] * W[c * d + x];
      dW[c * d + x] += beta[c] * dy[x];
    }
    dbeta[c] += acc;
  }
  // T = (I + A)^{-1}: tmp = dT T^T (dT lower, T lower), dA = -T^T tmp, strictly lower part only
  for (int xr = 0; xr < n; ++xr)
    for (int c = 0; c < n; ++c) {
      float acc = 0.f;
      const int hi = xr < c ? xr : c;   // y <= x (dT lower) and y <= c (T lower)
      for (int y = 0; y <= hi; ++y) acc += dT[xr * n + y] * T[c * n + y];
      tmp[xr * n + c] = acc;
    }
  for (int a = 1; a < n; ++a) {
    for (int c = 0; c < a; ++c) {
      float da = 0.f;
      for (int xr = a; xr < n; ++xr) da -= T[xr * n + a] * tmp[xr * n + c];
      dbeta[a] += da * gram[a * n + c];
      const float dg = beta[a] * da;   // gram_ac = w_a . w_c
      for (int x = 0; x < d; ++x) {
        dW[a * d + x] += dg * W[c * d + x];
        dW[c * d + x] += dg * W[a * d + x];
      }
    }
  }
}

// Online softmax (FlashAttention-2) for one row: a new block of scores with maximum `block_max` arrives; returns
// the factor by which the row's running sum and accumulator must be multiplied, and updates the running max.
// Rows always see their own diagonal key first, so the max is finite after the first block.
BLOCKOPS_HD float softmax_rescale(float& row_max, float block_max) {
  const float m_new = block_max > row_max ? block_max : row_max;
  const float factor = std::exp(row_max - m_new);   // exp(-inf) = 0 for the first block
  row_max = m_new;
  return factor;
}

}  // namespace blockops::path
