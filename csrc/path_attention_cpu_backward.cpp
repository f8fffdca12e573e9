// PaTH attention's backward on the CPU (path_attention_backward; the forward, pass 1 and the glue registration are
// path_attention_cpu.cpp, the shared primitives path_attention_cpu.h, the math path_attention.h).
//
// Pass 1 as in the forward (plus the other orientation of each operand: ChunkLayout::backward; in the task that
// reads it when every thread has a task, into a per-thread buffer reused task after task), then one
// task per (sequence, key head), which owns that head's dk, dv, dw, dbeta and the dq and dG of its query heads
// (deterministic, no atomics). Per query chunk cq of each query head of the group:
//   recompute QW, M and the carried queries Q0^(c) for c = cq-1 .. 0 (kept: cq x C x D elements; by P_c for
//   D < 2C, path_attention_cpu.h carry_by_matrix, else by two rank-C products whose Y_c = Q0^(c) W_c^T is kept)
//   P = exp(scale * (logit + gate) - lse), dL = scale * P * (dO V^T - Delta)     per key chunk, as in FA-2
//   left to right over c = 0 .. cq-1 with R = d loss / d Q0^(c):
//     back through Q0^(c-1) = Q0^(c) - (Q0^(c) W_c^T) TDW_c  ->  dTDW_c, dW_c, R
//       (P_c path: R <- R P_c^T, dP_c += Q0^(c)^T R; each dP_c goes to dTDW_c and dW_c once, before the UT backward)
//     dV_c += P^T dO,  dKbar_c += dL^T Q0^(c),  R += dL Kbar_c
//   diagonal chunk: dQ = dM K + R + dQW W, and dK, dU, dTDW, dW of the chunk
// then each key chunk's accumulated dKbar, dTDW, dU go through the UT backward (ut_backward_cpu: the phases of
// path_attention.h's UtGradT as whole products).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "introspection.h"
#include "path_attention_cpu.h"

namespace blockops::path_attention {
namespace {

KernelCounter backward_counter(kFamily, "path_attention_backward.cpu");

// The gradient buffers are in S (fp32, or fp64 for fp64 inputs); the glue converts them to the inputs' dtypes.
template <typename S>
struct BwdBuffers {
  const void* grad_o;          // [B, T, HQ, Dv], q's dtype
  const void* o;               // [B, T, HQ, Dv], q's dtype
  const S* lse;                // [B, HQ, T]
  const S* grad_lse;           // [B, HQ, T] or null
  const S* G;                  // [B, HQ, T] or null (no gate)
  S* dq;                       // [B, T, HQ, D]
  S* dk;                       // [B, T, H, D]
  S* dv;                       // [B, T, H, Dv]
  S* dw;                       // [B, T, H, D]
  S* dbeta;                    // [B, T, H]
  S* dG;                       // [B, HQ, T] (gradient at G = cumsum(g))
};

// Gradient accumulators of one (sequence, key head): per chunk of the sequence, rows kChunk apart.
template <typename S>
struct KeyGrads {
  std::vector<S> dKbar, dTDW, dU, dW, dK, dV;   // [nc * C, D] except dU [nc, C, C], dV [nc * C, Dv]
  std::vector<S> dP;                            // [nc, D, D]: gradient at P_c (carry_by_matrix path)
};

// One query chunk cq of query head hq (the sequence's chunk blocks prepared with lay.backward): recomputes the
// carried queries Q0^(c), the probabilities from lse, and sends the gradients to dq (written), the key chunks'
// accumulators g and dG (row of this head).
template <typename S>
void backward_query_chunk(const ParamsT<S>& p, const BwdBuffers<S>& bb, const Span& sp, const ChunkLayout& lay,
                          const S* blocks, const S* carry, int64_t hq, int64_t cq, KeyGrads<S>& g,
                          std::vector<S>& buf, std::vector<S>& ybuf) {
  const int d = p.head_dim, dv = p.v_dim, C = kChunk;
  const int64_t t0 = sp.start + cq * C;
  const int n = static_cast<int>(std::min<int64_t>(C, sp.start + sp.len - t0));
  const int64_t row = (sp.b * p.heads + hq) * p.seq_len;
  auto chunk = [&](int64_t c) { return blocks + c * lay.size(); };
  buf.assign(static_cast<size_t>(query_chunk_scratch_floats(cq, d, dv)), S(0));
  // Y_c = Q0^(c) W_c^T [C, C] for c = 1 .. cq-1, kept from the recompute for the way back (one product per pair
  // of chunks fewer than recomputing it there).
  // (With carry, P_c then P_c^T for each chunk c, [2, d, d]: Q0^(c-1) = Q0^(c) P_c, no Y_c.)
  if (carry == nullptr) ybuf.assign(static_cast<size_t>(cq * C * C), S(0));
  auto P = [&](int64_t c) { return carry + c * 2 * d * d; };
  const auto [states, Q, R0, dQ, Y, QW, Sc, dL, dM, dQW, dO, Ob, delta, lse, Gq] =
      query_chunk_scratch(buf.data(), cq, d, dv);
  for (int a = 0; a < n; ++a) {
    const int64_t tok = (sp.b * p.seq_len + t0 + a) * p.heads + hq;
    load_row(p.q, p.dtype, tok * d, d, Q + a * d);
    load_row(bb.grad_o, p.dtype, tok * dv, dv, dO + a * dv);
    load_row(bb.o, p.dtype, tok * dv, dv, Ob + a * dv);
    delta[a] = dot(dO + a * dv, Ob + a * dv, dv) - (bb.grad_lse ? bb.grad_lse[row + t0 + a] : S(0));
    lse[a] = bb.lse[row + t0 + a];
    Gq[a] = bb.G ? bb.G[row + t0 + a] : S(0);
  }

  // Probabilities of the logits in Sc (keys from token tk; causal within the diagonal chunk, whose n keys may be
  // fewer than C), then dL, dV, dG. Entries of hidden keys are 0.
  auto probs_and_grads = [&](const S* kb, int64_t tk, bool causal, int64_t c) {
    const int nk = causal ? n : C;
    for (int a = 0; a < n; ++a) {
      S* srow = Sc + a * C;
      const int visible = causal ? a + 1 : nk;
      if (bb.G)
        for (int b = 0; b < visible; ++b) srow[b] += Gq[a] - bb.G[row + tk + b];
      exp_row(srow, srow, visible, p.scale, lse[a]);
      std::fill(srow + visible, srow + C, S(0));
    }
    std::fill_n(dL, n * C, S(0));   // dP = dO V^T
    matmul_acc(n, C, dv, 1, dO, dv, kb + lay.vt(), C, dL, C);
    for (int a = 0; a < n; ++a) {
      S* dl = dL + a * C;
      const S* pr = Sc + a * C;
      const S da = delta[a];
      for (int b = 0; b < C; ++b) dl[b] = p.scale * pr[b] * (dl[b] - da);
      bb.dG[row + t0 + a] += row_sum(dl, C);
      S* dgk = bb.dG + row + tk;
      for (int b = 0; b < nk; ++b) dgk[b] -= dl[b];
    }
    matmul_tn_acc(C, dv, n, 1, Sc, C, dO, dv, g.dV.data() + c * C * dv, dv);
  };

  // Recompute: QW = tril(Q W^T), M = Q K^T - QW U (in Sc), Q0^(cq-1) = Q - QW TDW, then Q0^(c-1) from Q0^(c).
  const S* blk = chunk(cq);
  matmul_acc(n, C, d, 1, Q, d, blk + lay.wt(), C, QW, C);
  for (int a = 0; a < n; ++a) std::fill(QW + a * C + a + 1, QW + (a + 1) * C, S(0));
  matmul_acc(n, C, d, 1, Q, d, blk + lay.kt(), C, Sc, C);
  matmul_acc(n, C, C, -1, QW, C, blk + lay.u(), C, Sc, C);
  if (cq > 0) {
    S* q0 = states + (cq - 1) * C * d;
    std::copy_n(Q, n * d, q0);
    matmul_acc(n, d, C, -1, QW, C, blk + lay.tdw(), d, q0, d);
    for (int64_t c = cq - 1; c > 0; --c) {
      const S* kb = chunk(c);
      S* prev = states + c * C * d;
      S* next = states + (c - 1) * C * d;   // zero from buf.assign
      if (carry != nullptr) {
        matmul_acc(n, d, d, 1, prev, d, P(c), d, next, d);
        continue;
      }
      S* Yc = ybuf.data() + c * C * C;
      matmul_acc(n, C, d, 1, prev, d, kb + lay.wt(), C, Yc, C);
      std::copy_n(prev, n * d, next);
      matmul_acc(n, d, C, -1, Yc, C, kb + lay.tdw(), d, next, d);
    }
  }
  probs_and_grads(blk, t0, /*causal=*/true, cq);
  std::copy_n(dL, n * C, dM);

  // Earlier chunks, left to right: R arrives as d loss / d Q0^(c-1). On the P_c path R and dQ (free until the
  // diagonal chunk) take turns holding it.
  S* R = R0;
  S* spare = dQ;
  for (int64_t c = 0; c < cq; ++c) {
    const S* kb = chunk(c);
    const S* q0 = states + c * C * d;
    if (c > 0 && carry != nullptr) {   // back through Q0^(c-1) = Q0^(c) P_c: dP_c += Q0^(c)^T R, R <- R P_c^T
      matmul_tn_acc(d, d, n, 1, q0, d, R, d, g.dP.data() + c * d * d, d);
      std::fill_n(spare, n * d, S(0));
      matmul_acc(n, d, d, 1, R, d, P(c) + d * d, d, spare, d);
      std::swap(R, spare);
    } else if (c > 0) {     // back through Q0^(c-1) = Q0^(c) - Yc TDW_c, Yc = Q0^(c) W_c^T
      const S* Yc = ybuf.data() + c * C * C;   // [n, C]
      matmul_tn_acc(C, d, n, -1, Yc, C, R, d, g.dTDW.data() + c * C * d, d);
      std::fill_n(dQW, n * C, S(0));   // dYc = -R TDW_c^T
      matmul_acc(n, C, d, -1, R, d, kb + lay.tdwt(), C, dQW, C);
      matmul_tn_acc(C, d, n, 1, dQW, C, q0, d, g.dW.data() + c * C * d, d);
      matmul_acc(n, d, C, 1, dQW, C, kb + lay.w(), d, R, d);
    }
    std::fill_n(Sc, n * C, S(0));
    matmul_acc(n, C, d, 1, q0, d, kb + lay.kbart(), C, Sc, C);
    probs_and_grads(kb, sp.start + c * C, /*causal=*/false, c);
    matmul_tn_acc(C, d, n, 1, dL, C, q0, d, g.dKbar.data() + c * C * d, d);
    matmul_acc(n, d, C, 1, dL, C, kb + lay.kbar(), d, R, d);
  }

  // Diagonal chunk: M = Q K^T - QW U and Q0^(cq-1) = Q - QW TDW (R is its gradient; zero when cq = 0).
  if (R == dQ) {
    std::copy_n(dQ, n * d, R0);
    R = R0;
  }
  S* dUc = g.dU.data() + cq * C * C;
  std::copy_n(R, n * d, dQ);
  matmul_acc(n, d, C, 1, dM, C, blk + lay.k(), d, dQ, d);
  std::fill_n(dQW, n * C, S(0));
  matmul_acc(n, C, C, -1, dM, C, blk + lay.ut(), C, dQW, C);
  matmul_acc(n, C, d, -1, R, d, blk + lay.tdwt(), C, dQW, C);
  for (int a = 0; a < n; ++a) std::fill(dQW + a * C + a + 1, dQW + (a + 1) * C, S(0));
  matmul_acc(n, d, C, 1, dQW, C, blk + lay.w(), d, dQ, d);
  matmul_tn_acc(C, d, n, 1, dM, C, Q, d, g.dK.data() + cq * C * d, d);
  matmul_tn_acc(C, C, n, -1, QW, C, dM, C, dUc, C);
  matmul_tn_acc(C, d, n, -1, QW, C, R, d, g.dTDW.data() + cq * C * d, d);
  matmul_tn_acc(C, d, n, 1, dQW, C, Q, d, g.dW.data() + cq * C * d, d);
  for (int a = 0; a < n; ++a) std::copy_n(dQ + a * d, d, bb.dq + ((sp.b * p.seq_len + t0 + a) * p.heads + hq) * d);
}

// Scratch of ut_backward_cpu: [C, C] matrices (rows of C, zero beyond the chunk's n), [d, C] and [n, d] ones.
template <typename S>
struct UtScratch {
  std::vector<S> dU, full, dT, dZ, tmp, dA, wkT, TT, BdZ, BdA, dKbarT, dY, M;
  void reset(int d) {
    const size_t cc = static_cast<size_t>(kChunk) * kChunk, cd = static_cast<size_t>(kChunk) * d;
    for (auto* m : {&dU, &full, &dT, &dZ, &tmp, &dA, &wkT, &TT, &BdZ, &BdA}) m->assign(cc, S(0));
    for (auto* m : {&dKbarT, &dY, &M}) m->assign(cd, S(0));
  }
};

// One chunk's UT backward (path_attention.h, UtGradT: the same five phases and quantities), each phase as whole
// products on the gemm micro-kernels instead of the one-entry helpers the CUDA kernel spreads over its threads
// (the helpers' strided scalar sums were 15% of the backward at B=1 H=8 T=4096 D=64). dKbar, dTDW [n, d] (rows d
// apart), dU_in [n, C] (rows C apart, only the strictly lower n x n part read); dW, dK [n, d] and dbeta [n]
// accumulated. [n, C] products are computed whole, then masked to their triangle.
// The chunk's pass-1 quantities, from a ChunkMath or from its block and UtExtra (no second pass 1):
// W, K [n, d]; WT [d, C]; U [n, n] rows ldu apart; beta [n], gram, wk, T [n, n].
template <typename S>
struct UtIn {
  const S *W, *K, *WT, *U;
  int ldu;
  UtExtra<const S> x;
};

template <typename S>
void ut_backward_cpu(const UtIn<S>& in, int n, int d, const S* dKbar, const S* dTDW, const S* dU_in, S* dW,
                     S* dK, S* dbeta, UtScratch<S>& ws) {
  constexpr int C = kChunk;
  const S *W = in.W, *K = in.K, *beta = in.x.beta, *gram = in.x.gram, *wk = in.x.wk, *T = in.x.T, *U = in.U;
  ws.reset(d);
  S *dU = ws.dU.data(), *full = ws.full.data(), *dT = ws.dT.data(), *dZ = ws.dZ.data(), *tmp = ws.tmp.data(),
    *dA = ws.dA.data(), *wkT = ws.wkT.data(), *TT = ws.TT.data(), *BdZ = ws.BdZ.data(), *BdA = ws.BdA.data(),
    *dKbarT = ws.dKbarT.data(), *dY = ws.dY.data(), *M = ws.M.data();
  for (int b = 0; b < n; ++b)
    for (int x = 0; x < d; ++x) dKbarT[x * C + b] = dKbar[b * d + x];
  for (int r = 0; r < n; ++r)
    for (int c = 0; c < n; ++c) {
      wkT[c * C + r] = wk[r * n + c];
      TT[c * C + r] = T[r * n + c];
    }
  // Phase 1: dU = dU_in - strictLower(W dKbar^T).
  matmul_acc(n, C, d, 1, W, d, dKbarT, C, full, C);
  for (int e = 0; e < n; ++e)
    for (int b = 0; b < e; ++b) dU[e * C + b] = dU_in[e * C + b] - full[e * C + b];
  // Phase 2: dT = lower((dU Z'^T + dTDW W^T) Dg) with Z' = strictLower(wk); dZ = strictLower(T^T dU);
  // dY = T^T dTDW.
  std::fill_n(full, n * C, S(0));
  matmul_acc(n, C, n, 1, dU, C, wkT, C, full, C);
  matmul_acc(n, C, d, 1, dTDW, d, in.WT, C, full, C);
  for (int r = 0; r < n; ++r)
    for (int c = 0; c <= r; ++c) dT[r * C + c] = full[r * C + c] * beta[c];
  std::fill_n(full, n * C, S(0));
  matmul_tn_acc(n, C, n, 1, T, n, dU, C, full, C);
  for (int r = 0; r < n; ++r)
    for (int c = 0; c < r; ++c) dZ[r * C + c] = full[r * C + c];
  matmul_tn_acc(n, d, n, 1, T, n, dTDW, d, dY, d);
  // Phase 3: tmp = dT T^T.  Phase 4: dA = strictLower(-T^T tmp).
  matmul_acc(n, C, n, 1, dT, C, TT, C, tmp, C);
  std::fill_n(full, n * C, S(0));
  matmul_tn_acc(n, C, n, -1, T, n, tmp, C, full, C);
  for (int a = 0; a < n; ++a)
    for (int c = 0; c < a; ++c) dA[a * C + c] = full[a * C + c];
  // Phase 5: dbeta_r += sum_b (dZ wk + dA gram)_rb + dY_r . W_r;  dK += dKbar + (Dg dZ)^T W;
  // dW += Dg (dY + dZ K + dA W) - U dKbar + (Dg dA)^T W.
  for (int r = 0; r < n; ++r) {
    S acc = 0;
    for (int b = 0; b < r; ++b) acc += dZ[r * C + b] * wk[r * n + b] + dA[r * C + b] * gram[r * n + b];
    dbeta[r] += acc + dot(dY + r * d, W + r * d, d);
    for (int b = 0; b < r; ++b) {
      BdZ[r * C + b] = beta[r] * dZ[r * C + b];
      BdA[r * C + b] = beta[r] * dA[r * C + b];
    }
  }
  for (int i = 0; i < n * d; ++i) dK[i] += dKbar[i];
  matmul_tn_acc(n, d, n, 1, BdZ, C, W, d, dK, d);
  matmul_acc(n, d, n, 1, dZ, C, K, d, M, d);
  matmul_acc(n, d, n, 1, dA, C, W, d, M, d);
  for (int r = 0; r < n; ++r)
    for (int x = 0; x < d; ++x) dW[r * d + x] += beta[r] * (dY[r * d + x] + M[r * d + x]);
  matmul_acc(n, d, n, -1, U, in.ldu, dKbar, d, dW, d);
  matmul_tn_acc(n, d, n, 1, BdA, C, W, d, dW, d);
}

// One (sequence, key head): every query chunk of every query head of the group, then each key chunk's UT
// backward. The task owns all the gradient rows it writes.
template <typename S>
void backward_task(const ParamsT<S>& p, const BwdBuffers<S>& bb, const Span& sp, int64_t hk, const ChunkLayout& lay,
                   const S* blocks, const S* carry, const S* extra, KeyGrads<S>& g) {
  const int d = p.head_dim, dv = p.v_dim, C = kChunk;
  const int64_t nc = chunks_of(sp.len), group = p.heads / p.kv_heads;
  for (auto* m : {&g.dKbar, &g.dTDW, &g.dW, &g.dK}) m->assign(static_cast<size_t>(nc * C * d), S(0));
  g.dU.assign(static_cast<size_t>(nc * C * C), S(0));
  g.dV.assign(static_cast<size_t>(nc * C * dv), S(0));
  if (carry != nullptr) g.dP.assign(static_cast<size_t>(nc * d * d), S(0));
  // Scratch sized once for the largest query chunk (it grows with cq): not re-allocated query chunk by chunk.
  std::vector<S> buf, ybuf;
  buf.reserve(static_cast<size_t>(query_chunk_scratch_floats(nc - 1, d, dv)));
  if (carry == nullptr) ybuf.reserve(static_cast<size_t>(nc * C * C));
  for (int64_t hq = hk * group; hq < (hk + 1) * group; ++hq)
    for (int64_t cq = 0; cq < nc; ++cq) backward_query_chunk(p, bb, sp, lay, blocks, carry, hq, cq, g, buf, ybuf);

  ChunkMath<S> cm;
  UtScratch<S> ws;
  std::vector<S> dbeta(C), dPT(carry != nullptr ? static_cast<size_t>(d) * d : 0);
  for (int64_t c = 0; c < nc; ++c) {
    const int64_t t0 = sp.start + c * C;
    const int n = static_cast<int>(std::min<int64_t>(C, sp.start + sp.len - t0));
    UtIn<S> in;
    if (extra != nullptr) {   // pass 1 kept by the task (prepare_span_chunks)
      const S* blk = blocks + c * lay.size();
      in = {blk + lay.w(), blk + lay.k(), blk + lay.wt(), blk + lay.u(), C, ut_extra(extra + c * kUtExtraFloats)};
    } else {
      cm.compute(p, sp.b, t0, n, hk);
      in = {cm.W.data(), cm.K.data(), cm.WT.data(), cm.U.data(), n,
            {cm.beta.data(), cm.gram.data(), cm.wk.data(), cm.T.data()}};
    }
    S* dW = g.dW.data() + c * C * d;
    S* dK = g.dK.data() + c * C * d;
    if (carry != nullptr && c > 0) {   // P_c = I - W_c^T TDW_c: dTDW_c -= W_c dP_c, dW_c -= TDW_c dP_c^T
      const S* dP = g.dP.data() + c * d * d;
      const S* blk = blocks + c * lay.size();
      for (int x = 0; x < d; ++x)
        for (int y = 0; y < d; ++y) dPT[y * d + x] = dP[x * d + y];
      matmul_acc(n, d, d, -1, blk + lay.w(), d, dP, d, g.dTDW.data() + c * C * d, d);
      matmul_acc(n, d, d, -1, blk + lay.tdw(), d, dPT.data(), d, dW, d);
    }
    std::fill(dbeta.begin(), dbeta.end(), S(0));
    ut_backward_cpu(in, n, d, g.dKbar.data() + c * C * d, g.dTDW.data() + c * C * d, g.dU.data() + c * C * C, dW, dK,
                    dbeta.data(), ws);
    for (int a = 0; a < n; ++a) {
      const int64_t tok = (sp.b * p.seq_len + t0 + a) * p.kv_heads + hk;
      std::copy_n(dW + a * d, d, bb.dw + tok * d);
      std::copy_n(dK + a * d, d, bb.dk + tok * d);
      std::copy_n(g.dV.data() + (c * C + a) * dv, dv, bb.dv + tok * dv);
      bb.dbeta[tok] = dbeta[a];
    }
  }
}

// S from q's dtype: double for fp64, else float. The gradients come back in their inputs' dtypes (dg without a
// gate, which autograd drops, in S).
template <typename S>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_o, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
    const at::Tensor& beta, const c10::optional<at::Tensor>& g, const c10::optional<at::Tensor>& cu_seqlens,
    const at::Tensor& o, const at::Tensor& lse, const c10::optional<at::Tensor>& grad_lse, double scale) {
  const char* op = kBackward;
  ParamsT<S> p = describe_forward<S>(op, q, k, v, w, beta, g, cu_seqlens, scale);
  check_backward_inputs(op, p, q, grad_o, o, lse, grad_lse);
  backward_counter.hit();
  const at::TensorOptions fs = q.options().dtype(kComputeDtype<S>);
  at::Tensor dq = at::zeros(q.sizes(), fs), dk = at::zeros(k.sizes(), fs), dv = at::zeros(v.sizes(), fs);
  at::Tensor dw = at::zeros(k.sizes(), fs), dbeta = at::zeros(beta.sizes(), fs);
  at::Tensor dG = at::zeros({p.batch, p.heads, p.seq_len}, fs);
  const Chunking ch = make_chunking(op, p.batch, p.seq_len, cu_seqlens);
  const at::Tensor G = g.has_value() ? gate_prefix(p, ch) : at::Tensor();
  BwdBuffers<S> bb{grad_o.data_ptr(), o.data_ptr(), lse.data_ptr<S>(),
                   grad_lse.has_value() ? grad_lse->data_ptr<S>() : nullptr,
                   G.defined() ? G.data_ptr<S>() : nullptr, dq.data_ptr<S>(), dk.data_ptr<S>(),
                   dv.data_ptr<S>(), dw.data_ptr<S>(), dbeta.data_ptr<S>(), dG.data_ptr<S>()};
  if (!ch.spans.empty()) {
    ChunkLayout lay{p.head_dim, p.v_dim};
    lay.backward = true;
    const bool by_matrix = carry_by_matrix(p.head_dim);
    const int64_t total = ch.first_chunk.back(), dd2 = 2 * static_cast<int64_t>(p.head_dim) * p.head_dim;
    const int64_t n_tasks = static_cast<int64_t>(ch.spans.size()) * p.kv_heads;
    const int64_t n_workers = std::min<int64_t>(n_tasks, at::get_num_threads());
    // Pass 1 in the task that reads it when every thread has a task: each thread's blocks (about 230 KB a chunk
    // at D = 64) live in one buffer reused task after task, so a call pages in one (sequence, key head)'s worth
    // per thread instead of every head's (117 MB at B=1 H=8 T=4096 D=64: 5-7% of the backward in page faults).
    // With fewer tasks than threads, pass 1 stays a parallel step of its own (its chunks spread over all
    // threads). The blocks' bits are the same either way.
    const bool pass1_in_task = n_workers == at::get_num_threads();
    at::Tensor blocks, carry;
    if (!pass1_in_task) {
      blocks = prepare_all_chunks(p, ch, lay);
      if (by_matrix) carry = carry_matrices<S>(blocks, lay, true);
    }
    // Tasks taken from a shared counter, not split in fixed halves: with few (sequence, key head) tasks per
    // thread, a thread slowed by another process would otherwise hold up the call by a whole share.
    std::atomic<int64_t> next{0};
    at::parallel_for(0, n_workers, 1, [&](int64_t, int64_t) {
      KeyGrads<S> g;   // one per thread, re-zeroed per task: MBs a task, not paged in afresh each time
      std::vector<S> own_blocks, own_carry, own_extra;
      ChunkMath<S> cm;
      for (int64_t task = next.fetch_add(1); task < n_tasks; task = next.fetch_add(1)) {
        const int64_t s = task / p.kv_heads, hk = task % p.kv_heads;
        const Span& sp = ch.spans[s];
        const S* blk = nullptr;
        const S* car = nullptr;
        const S* ext = nullptr;   // with pass 1 in the task, what the UT backward reads beyond the blocks
        if (pass1_in_task) {
          const int64_t nc = chunks_of(sp.len);
          own_blocks.resize(static_cast<size_t>(nc * lay.size()));   // grows to the longest span; never shrinks
          own_extra.resize(static_cast<size_t>(nc * kUtExtraFloats));
          prepare_span_chunks(p, sp, hk, lay, own_blocks.data(), cm, own_extra.data());
          ext = own_extra.data();
          blk = own_blocks.data();
          if (by_matrix) {
            own_carry.resize(static_cast<size_t>(nc * dd2));
            for (int64_t c = 0; c < nc; ++c)
              carry_matrix(blk + c * lay.size(), lay, true, own_carry.data() + c * dd2);
            car = own_carry.data();
          }
        } else {
          const int64_t first = hk * total + ch.first_chunk[s];
          blk = blocks.data_ptr<S>() + first * lay.size();
          car = carry.defined() ? carry.data_ptr<S>() + first * dd2 : nullptr;
        }
        backward_task(p, bb, sp, hk, lay, blk, car, ext, g);
      }
    });
  }
  // dg_t = sum_{u >= t} dG_u within each sequence (G = cumsum(g)), then [B, HQ, T] -> [B, T, HQ].
  S* dGp = dG.data_ptr<S>();
  for (const Span& sp : ch.spans) {
    for (int64_t hq = 0; hq < p.heads; ++hq) {
      S* row = dGp + (sp.b * p.heads + hq) * p.seq_len;
      for (int64_t t = sp.start + sp.len - 2; t >= sp.start; --t) row[t] += row[t + 1];
    }
  }
  at::Tensor dg = dG.transpose(1, 2).contiguous();
  auto as = [](const at::Tensor& t, const at::Tensor& like) { return t.to(like.scalar_type()); };
  return {as(dq, q), as(dk, k), as(dv, v), as(dw, w), as(dbeta, beta), g.has_value() ? as(dg, *g) : dg};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> path_attention_backward_cpu(
    const at::Tensor& grad_o, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
    const at::Tensor& beta, const c10::optional<at::Tensor>& g, const c10::optional<at::Tensor>& cu_seqlens,
    const at::Tensor& o, const at::Tensor& lse, const c10::optional<at::Tensor>& grad_lse, double scale) {
  return q.scalar_type() == at::kDouble
             ? backward<double>(grad_o, q, k, v, w, beta, g, cu_seqlens, o, lse, grad_lse, scale)
             : backward<float>(grad_o, q, k, v, w, beta, g, cu_seqlens, o, lse, grad_lse, scale);
}

}  // namespace blockops::path_attention
