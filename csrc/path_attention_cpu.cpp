// PaTH attention on the CPU: the chunked forward, the key cache, pass 1 (shared with the backward), and the CPU
// glue registration of every PaTH op (the backward and the decode step are path_attention_cpu_backward.cpp and
// path_attention_cpu_decode.cpp; what the pieces share is path_attention_cpu.h, the argument checks
// path_attention_op.cpp). The math and the chunked algorithm are in path_attention.h. The matrix products
// (64 x 64 x D tiles) and the exponentials run on AVX2/FMA micro-kernels where the CPU has them, else on portable
// loops. Every kernel is a template on the compute type S: float, or double for fp64 inputs (gradcheck; the
// portable loops, fp64 throughout).
//
// Work partition (forward):
//
//   pass 0  G = cumsum(g) per (sequence, query head), fp64 running sum      (only with the forget gate)
//   pass 1  one task per (key head, chunk): the chunk's UT transform, into a per-chunk block (in S)
//             WT [D, C] | TDW [C, D] | KT [D, C] | KbarT [D, C] | U [C, C] | V [C, Dv]
//           (transposed where the kernel multiplies by them from the right, so every inner loop is unit-stride);
//           then, for D < 2C (carry_by_matrix), P_c = I - W_c^T TDW_c [D, D] per (key head, chunk)
//   pass 2  one task per (sequence, query head, query chunk), heaviest (latest) chunks first, taken from a
//           shared counter:
//             QW = Q W^T, M = Q K^T - tril(QW) U, Q0 = Q - tril(QW) TDW       intra-chunk logits, carried queries
//             online softmax over M (causal), then for key chunks c = cq-1 .. 0:
//               S = Q0 Kbar_c^T -> online softmax with V_c;  Q0 <- Q0 P_c (D >= 2C: Q0 -= (Q0 W_c^T) TDW_c)
//             o = acc / l, lse = m + log l
//
// Key cache (path_key_cache): one task per (sequence, key head), chunks right to left, carrying the running
// product A = P_last ... P_{c+1} (P_c = I - W_c^T TDW_c, a D x D matrix) so each chunk's keys become A Kbar_c:
// O(T D^2) instead of applying every later chunk to every key.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "introspection.h"
#include "path_attention_cpu.h"

namespace blockops::path_attention {
namespace {

KernelCounter forward_counter(kFamily, "path_attention.cpu");
KernelCounter key_cache_counter(kFamily, "path_key_cache.cpu");
FamilyRegistration family(kFamily, cpu_isa_name);

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// Pass 1 (each chunk's UT transform into its block) and the gate prefix
// ---------------------------------------------------------------------------------------------------------

template <typename S>
void ChunkMath<S>::compute(const ParamsT<S>& p, int64_t b, int64_t t0, int n, int64_t hk) {
  const int d = p.head_dim;
  for (auto* m : {&W, &K, &TDW, &Kbar}) m->resize(static_cast<size_t>(n) * d);
  for (auto* m : {&gram, &wk, &T, &U}) m->resize(static_cast<size_t>(n) * n);
  for (auto* m : {&WT, &KT}) m->resize(static_cast<size_t>(d) * kChunk);
  for (auto* m : {&full, &Z}) m->resize(static_cast<size_t>(n) * kChunk);
  BW.resize(static_cast<size_t>(n) * d);
  beta.resize(n);
  for (int a = 0; a < n; ++a) {
    const int64_t tok = (b * p.seq_len + t0 + a) * p.kv_heads + hk;
    load_row(p.w, p.w_dtype, tok * d, d, W.data() + a * d);
    load_row(p.k, p.dtype, tok * d, d, K.data() + a * d);
    beta[a] = load_one<S>(p.beta, p.beta_dtype, tok);
  }
  // The products run on the gemm micro-kernels (AVX2/FMA for fp32) rather than path_attention.h's one-entry
  // helpers (which the CUDA kernels spread over threads): as scalar dot products and strided sums, pass 1 was 18%
  // of the forward and 16% of the backward at B=1 H=8 T=4096 D=64. The same quantities, other summation orders.
  // Full [n, kChunk] products whose unused triangle is then dropped cost at most twice the triangle's FMAs, at the
  // micro-kernel's speed; the dropped entries are never read (a NaN there goes nowhere).
  std::fill(WT.begin(), WT.end(), S(0));
  std::fill(KT.begin(), KT.end(), S(0));
  for (int a = 0; a < n; ++a)
    for (int x = 0; x < d; ++x) {
      WT[x * kChunk + a] = W[a * d + x];
      KT[x * kChunk + a] = K[a * d + x];
    }
  // gram = W W^T and wk = W K^T, strictly lower parts.
  std::fill(full.begin(), full.end(), S(0));
  matmul_acc(n, kChunk, d, 1, W.data(), d, WT.data(), kChunk, full.data(), kChunk);
  for (int a = 0; a < n; ++a)
    for (int c = 0; c < n; ++c) gram[a * n + c] = c < a ? full[a * kChunk + c] : S(0);
  std::fill(full.begin(), full.end(), S(0));
  matmul_acc(n, kChunk, d, 1, W.data(), d, KT.data(), kChunk, full.data(), kChunk);
  for (int a = 0; a < n; ++a)
    for (int c = 0; c < n; ++c) wk[a * n + c] = c < a ? full[a * kChunk + c] : S(0);
  // T = (I + Dg strictLower(gram))^{-1}: ut_inverse's sums (c ascending), as row updates along b <= c.
  for (int a = 0; a < n; ++a) {
    S* Ta = T.data() + a * n;
    std::fill(Ta, Ta + n, S(0));
    Ta[a] = 1;
    for (int c = 0; c < a; ++c) {
      const S coef = beta[a] * gram[a * n + c];
      const S* Tc = T.data() + c * n;
      for (int bb = 0; bb <= c; ++bb) Ta[bb] -= coef * Tc[bb];
    }
  }
  // TDW = T (Dg W); U = T Z with Z = Dg strictLower(wk) (T, Z zero outside their triangles); Kbar = K - U^T W.
  for (int a = 0; a < n; ++a)
    for (int x = 0; x < d; ++x) BW[a * d + x] = beta[a] * W[a * d + x];
  std::fill(TDW.begin(), TDW.end(), S(0));
  matmul_acc(n, d, n, 1, T.data(), n, BW.data(), d, TDW.data(), d);
  std::fill(Z.begin(), Z.end(), S(0));
  for (int e = 0; e < n; ++e)
    for (int c = 0; c < e; ++c) Z[e * kChunk + c] = beta[e] * wk[e * n + c];
  std::fill(full.begin(), full.end(), S(0));
  matmul_acc(n, kChunk, n, 1, T.data(), n, Z.data(), kChunk, full.data(), kChunk);
  for (int a = 0; a < n; ++a)
    for (int c = 0; c < n; ++c) U[a * n + c] = c < a ? full[a * kChunk + c] : S(0);
  std::copy(K.begin(), K.end(), Kbar.begin());
  matmul_tn_acc(n, d, n, -1, U.data(), n, W.data(), d, Kbar.data(), d);
}

template struct ChunkMath<float>;
template struct ChunkMath<double>;

namespace {

template <typename S>
void transpose_into(int n, int d, const S* src, S* dst_t) {   // src [n, d] -> dst_t [d, kChunk]
  for (int a = 0; a < n; ++a)
    for (int x = 0; x < d; ++x) dst_t[static_cast<int64_t>(x) * kChunk + a] = src[a * d + x];
}

}  // namespace

// Fills `block` (zeroed by the caller: padded rows/columns of a short last chunk must read as 0) for the n
// tokens starting at (b, t0) of key head hk.
template <typename S>
void prepare_chunk(const ParamsT<S>& p, int64_t b, int64_t t0, int n, int64_t hk, const ChunkLayout& lay, S* block,
                   ChunkMath<S>& cm) {
  const int d = p.head_dim, dv = p.v_dim;
  cm.compute(p, b, t0, n, hk);
  for (int a = 0; a < n; ++a)
    load_row(p.v, p.dtype, ((b * p.seq_len + t0 + a) * p.kv_heads + hk) * dv, dv, block + lay.v() + a * dv);
  std::copy_n(cm.TDW.data(), n * d, block + lay.tdw());
  for (int a = 0; a < n; ++a) std::copy_n(cm.U.data() + a * n, n, block + lay.u() + a * kChunk);
  std::copy(cm.WT.begin(), cm.WT.end(), block + lay.wt());   // [d, kChunk], zero-padded like the block
  std::copy(cm.KT.begin(), cm.KT.end(), block + lay.kt());
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

template <typename S>
at::Tensor prepare_all_chunks(const ParamsT<S>& p, const Chunking& ch, const ChunkLayout& lay) {
  const int64_t total = ch.first_chunk.back();
  // Zeroed block by block by the task that fills it (prepare_chunk needs the padding zero): one pass over this
  // large buffer (about 230 KB per chunk in the backward) instead of at::zeros' and then the task's.
  at::Tensor blocks = at::empty({p.kv_heads, total, lay.size()}, kComputeDtype<S>);
  S* base = blocks.data_ptr<S>();
  at::parallel_for(0, p.kv_heads * total, 1, [&](int64_t begin, int64_t end) {
    ChunkMath<S> cm;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t hk = task / total, gc = task % total;
      const int64_t s = std::upper_bound(ch.first_chunk.begin(), ch.first_chunk.end(), gc) - ch.first_chunk.begin() - 1;
      const Span& sp = ch.spans[s];
      const int64_t t0 = sp.start + (gc - ch.first_chunk[s]) * kChunk;
      const int n = static_cast<int>(std::min<int64_t>(kChunk, sp.start + sp.len - t0));
      std::fill_n(base + task * lay.size(), lay.size(), S(0));
      prepare_chunk(p, sp.b, t0, n, hk, lay, base + task * lay.size(), cm);
    }
  });
  return blocks;
}

template <typename S>
void prepare_span_chunks(const ParamsT<S>& p, const Span& sp, int64_t hk, const ChunkLayout& lay, S* blocks,
                         ChunkMath<S>& cm, S* extra) {
  for (int64_t c = 0; c < chunks_of(sp.len); ++c) {
    const int64_t t0 = sp.start + c * kChunk;
    const int n = static_cast<int>(std::min<int64_t>(kChunk, sp.start + sp.len - t0));
    S* block = blocks + c * lay.size();
    std::fill_n(block, lay.size(), S(0));
    prepare_chunk(p, sp.b, t0, n, hk, lay, block, cm);
    if (extra != nullptr) {
      const UtExtra<S> e = ut_extra(extra + c * kUtExtraFloats);
      std::copy_n(cm.beta.data(), n, e.beta);
      std::copy_n(cm.gram.data(), n * n, e.gram);
      std::copy_n(cm.wk.data(), n * n, e.wk);
      std::copy_n(cm.T.data(), n * n, e.T);
    }
  }
}

template <typename S>
void carry_matrix(const S* blk, const ChunkLayout& lay, bool transposed, S* P) {
  const int d = lay.d;
  std::fill_n(P, (transposed ? 2 : 1) * d * d, S(0));
  for (int x = 0; x < d; ++x) P[x * d + x] = 1;
  matmul_acc(d, d, kChunk, -1, blk + lay.wt(), kChunk, blk + lay.tdw(), d, P, d);   // rows of TDW past n are 0
  if (transposed)
    for (int x = 0; x < d; ++x)
      for (int y = 0; y < d; ++y) P[d * d + y * d + x] = P[x * d + y];
}

template <typename S>
at::Tensor carry_matrices(const at::Tensor& blocks, const ChunkLayout& lay, bool transposed) {
  const int64_t per = (transposed ? 2 : 1) * static_cast<int64_t>(lay.d) * lay.d;
  at::Tensor out = at::empty({blocks.size(0), blocks.size(1), per}, blocks.options());
  const S* base = blocks.data_ptr<S>();
  S* P0 = out.data_ptr<S>();
  at::parallel_for(0, blocks.size(0) * blocks.size(1), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) carry_matrix(base + i * lay.size(), lay, transposed, P0 + i * per);
  });
  return out;
}

template <typename S>
at::Tensor gate_prefix(const ParamsT<S>& p, const Chunking& ch) {
  at::Tensor G = at::zeros({p.batch, p.heads, p.seq_len}, kComputeDtype<S>);
  S* out = G.data_ptr<S>();
  const int64_t n_spans = static_cast<int64_t>(ch.spans.size());
  at::parallel_for(0, n_spans * p.heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const Span& sp = ch.spans[task / p.heads];
      const int64_t hq = task % p.heads;
      double run = 0.0;
      for (int64_t t = sp.start; t < sp.start + sp.len; ++t) {
        run += load_one<S>(p.g, p.g_dtype, (sp.b * p.seq_len + t) * p.heads + hq);
        out[(sp.b * p.heads + hq) * p.seq_len + t] = static_cast<S>(run);
      }
    }
  });
  return G;
}

template at::Tensor prepare_all_chunks<float>(const ParamsT<float>&, const Chunking&, const ChunkLayout&);
template at::Tensor prepare_all_chunks<double>(const ParamsT<double>&, const Chunking&, const ChunkLayout&);
template void prepare_span_chunks<float>(const ParamsT<float>&, const Span&, int64_t, const ChunkLayout&, float*,
                                         ChunkMath<float>&, float*);
template void prepare_span_chunks<double>(const ParamsT<double>&, const Span&, int64_t, const ChunkLayout&, double*,
                                          ChunkMath<double>&, double*);
template void carry_matrix<float>(const float*, const ChunkLayout&, bool, float*);
template void carry_matrix<double>(const double*, const ChunkLayout&, bool, double*);
template at::Tensor carry_matrices<float>(const at::Tensor&, const ChunkLayout&, bool);
template at::Tensor carry_matrices<double>(const at::Tensor&, const ChunkLayout&, bool);
template at::Tensor gate_prefix<float>(const ParamsT<float>&, const Chunking&);
template at::Tensor gate_prefix<double>(const ParamsT<double>&, const Chunking&);

// ---------------------------------------------------------------------------------------------------------
// Forward (pass 2)
// ---------------------------------------------------------------------------------------------------------

namespace {

// Running softmax state of up to kChunk query rows.
template <typename S>
struct RowsState {
  std::vector<S> m, l, acc;   // [n], [n], [n, dv]
};

// Online-softmax update of rows [0, n) with scores S [n, kChunk] over nk keys (entries -inf where hidden) and
// values V [nk, dv]. S is overwritten with the probabilities.
template <typename S>
void softmax_block(int n, int nk, int dv, S* Sc, const S* V, RowsState<S>& st) {
  for (int a = 0; a < n; ++a) {
    S* s = Sc + a * kChunk;
    const S bmax = row_max(s, nk);
    if (bmax == kNegInf<S>) continue;   // no visible key in this block (a NaN score is not skipped: nan_max)
    const S f = softmax_rescale(st.m[a], bmax);
    S* acc = st.acc.data() + static_cast<int64_t>(a) * dv;
    if (f != S(1)) {
      st.l[a] *= f;
      for (int x = 0; x < dv; ++x) acc[x] *= f;
    }
    exp_row(s, s, nk, 1, st.m[a]);
    st.l[a] += row_sum(s, nk);
  }
  matmul_acc(n, dv, nk, 1, Sc, kChunk, V, dv, st.acc.data(), dv);
}

// Out of line on purpose: this file is small enough that GCC would inline it into the parallel_for body below,
// and the forward then ran 12% slower (B=1 T=1024 H=4 D=64, one thread) than as a function of its own.
template <typename S>
[[gnu::noinline]] void forward_task(const ParamsT<S>& p, const Chunking& ch, const ChunkLayout& lay, const S* blocks,
                                    const S* carry, const S* G, int64_t s, int64_t hq, int64_t cq,
                                    std::vector<S>& scratch, RowsState<S>& st) {
  const int d = p.head_dim, dv = p.v_dim;
  const Span& sp = ch.spans[s];
  const int64_t hk = p.kv_head_of(hq);
  const int64_t t0 = sp.start + cq * kChunk;
  const int n = static_cast<int>(std::min<int64_t>(kChunk, sp.start + sp.len - t0));
  const int64_t total = ch.first_chunk.back();
  auto chunk = [&](int64_t c) { return blocks + (hk * total + ch.first_chunk[s] + c) * lay.size(); };
  const S* Grow = G == nullptr ? nullptr : G + (sp.b * p.heads + hq) * p.seq_len;

  scratch.assign(static_cast<size_t>(2 * kChunk * d + 2 * kChunk * kChunk), S(0));
  S* Q = scratch.data();              // [n, d]
  S* Q0 = Q + kChunk * d;             // [n, d]
  S* QW = Q0 + kChunk * d;            // [n, kChunk]
  S* Sc = QW + kChunk * kChunk;       // scores [n, kChunk]
  for (int a = 0; a < n; ++a) load_row(p.q, p.dtype, ((sp.b * p.seq_len + t0 + a) * p.heads + hq) * d, d, Q + a * d);
  st.m.assign(n, kNegInf<S>);
  st.l.assign(n, S(0));
  st.acc.assign(static_cast<size_t>(n) * dv, S(0));

  // Scores from logits: scale * (logit + G_i - G_j), keys of the block starting at token tk.
  // (Branch-free inner loops, so the compiler vectorizes them.)
  auto finish_scores = [&](int64_t tk, int nk, bool causal) {
    for (int a = 0; a < n; ++a) {
      S* srow = Sc + a * kChunk;
      const int visible = causal ? std::min(a + 1, nk) : nk;
      if (Grow != nullptr) {
        const S gi = Grow[t0 + a];
        const S* gk = Grow + tk;
        for (int b = 0; b < visible; ++b) srow[b] = p.scale * (srow[b] + (gi - gk[b]));
      } else {
        for (int b = 0; b < visible; ++b) srow[b] = p.scale * srow[b];
      }
      std::fill(srow + visible, srow + nk, kNegInf<S>);
    }
  };

  // Intra-chunk: M = Q K^T - tril(Q W^T) U;  Q0 = Q - tril(Q W^T) TDW.
  const S* blk = chunk(cq);
  matmul_acc(n, kChunk, d, 1, Q, d, blk + lay.wt(), kChunk, QW, kChunk);
  for (int a = 0; a < n; ++a) std::fill(QW + a * kChunk + a + 1, QW + (a + 1) * kChunk, S(0));   // tril
  matmul_acc(n, kChunk, d, 1, Q, d, blk + lay.kt(), kChunk, Sc, kChunk);
  matmul_acc(n, kChunk, kChunk, -1, QW, kChunk, blk + lay.u(), kChunk, Sc, kChunk);
  std::copy_n(Q, n * d, Q0);
  matmul_acc(n, d, kChunk, -1, QW, kChunk, blk + lay.tdw(), d, Q0, d);
  finish_scores(t0, n, /*causal=*/true);
  softmax_block(n, n, dv, Sc, blk + lay.v(), st);

  // Earlier chunks, right to left (all of them full chunks). Q (no longer needed) and Q0 take turns holding the
  // carried queries on the P_c path.
  S* q0 = Q0;
  S* spare = Q;
  for (int64_t ck = cq - 1; ck >= 0; --ck) {
    const S* kb = chunk(ck);
    std::fill_n(Sc, n * kChunk, S(0));
    matmul_acc(n, kChunk, d, 1, q0, d, kb + lay.kbart(), kChunk, Sc, kChunk);
    finish_scores(sp.start + ck * kChunk, kChunk, /*causal=*/false);
    softmax_block(n, kChunk, dv, Sc, kb + lay.v(), st);
    if (ck > 0 && carry != nullptr) {   // carry the queries across chunk ck: Q0 <- Q0 P_ck
      std::fill_n(spare, n * d, S(0));
      matmul_acc(n, d, d, 1, q0, d, carry + (hk * total + ch.first_chunk[s] + ck) * d * d, d, spare, d);
      std::swap(q0, spare);
    } else if (ck > 0) {   // the same as two rank-C products: Q0 <- Q0 - (Q0 W^T) TDW
      std::fill_n(QW, n * kChunk, S(0));
      matmul_acc(n, kChunk, d, 1, q0, d, kb + lay.wt(), kChunk, QW, kChunk);
      matmul_acc(n, d, kChunk, -1, QW, kChunk, kb + lay.tdw(), d, q0, d);
    }
  }

  for (int a = 0; a < n; ++a) {
    S* acc = st.acc.data() + static_cast<int64_t>(a) * dv;
    const S inv = S(1) / st.l[a];
    for (int x = 0; x < dv; ++x) acc[x] *= inv;
    const int64_t t = t0 + a;
    store_row(p.o, p.dtype, ((sp.b * p.seq_len + t) * p.heads + hq) * dv, dv, acc);
    p.lse[(sp.b * p.heads + hq) * p.seq_len + t] = st.m[a] + std::log(st.l[a]);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Glue: forward and key cache (S from q's / k's dtype: double for fp64, else float)
// ---------------------------------------------------------------------------------------------------------

template <typename S>
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& w, const at::Tensor& beta,
                                           const c10::optional<at::Tensor>& g,
                                           const c10::optional<at::Tensor>& cu_seqlens, double scale) {
  ParamsT<S> p = describe_forward<S>(kForward, q, k, v, w, beta, g, cu_seqlens, scale);
  at::Tensor o = at::empty({p.batch, p.seq_len, p.heads, p.v_dim}, q.options());
  at::Tensor lse = at::empty({p.batch, p.heads, p.seq_len}, q.options().dtype(kComputeDtype<S>));
  p.o = o.data_ptr();
  p.lse = lse.data_ptr<S>();

  const Chunking ch = make_chunking(kForward, p.batch, p.seq_len, cu_seqlens);
  forward_counter.hit();
  if (ch.spans.empty()) return {o, lse};
  const ChunkLayout lay{p.head_dim, p.v_dim};
  const at::Tensor blocks = prepare_all_chunks(p, ch, lay);
  const at::Tensor G = g.has_value() ? gate_prefix(p, ch) : at::Tensor();
  const at::Tensor carry = carry_by_matrix(p.head_dim) ? carry_matrices<S>(blocks, lay, false) : at::Tensor();

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
  const S* blocks_ptr = blocks.data_ptr<S>();
  const S* G_ptr = G.defined() ? G.data_ptr<S>() : nullptr;
  const S* carry_ptr = carry.defined() ? carry.data_ptr<S>() : nullptr;
  at::parallel_for(0, std::min<int64_t>(n_tasks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    std::vector<S> scratch;
    RowsState<S> st;
    for (int64_t i = next.fetch_add(1); i < n_tasks; i = next.fetch_add(1)) {
      const Task& t = tasks[i];
      forward_task(p, ch, lay, blocks_ptr, carry_ptr, G_ptr, t.s, t.hq, t.cq, scratch, st);
    }
  });
  return {o, lse};
}

template <typename S>
at::Tensor key_cache(const at::Tensor& k, const at::Tensor& w, const at::Tensor& beta,
                     const c10::optional<at::Tensor>& cu_seqlens) {
  const char* op = kKeyCache;
  ParamsT<S> p = describe_keys<S>(op, k, w, beta, cu_seqlens);
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
    ChunkMath<S> cm;
    std::vector<S> block(lay.size());
    std::vector<S> A(static_cast<size_t>(d) * d), AW(static_cast<size_t>(d) * kChunk), KC(AW.size()), row(d);
    for (int64_t task = begin; task < end; ++task) {
      const Span& sp = ch.spans[task / p.kv_heads];
      const int64_t hk = task % p.kv_heads;
      std::fill(A.begin(), A.end(), S(0));
      for (int x = 0; x < d; ++x) A[x * d + x] = 1;   // A = P_last ... P_{c+1}, identity for the last chunk
      for (int64_t c = chunks_of(sp.len) - 1; c >= 0; --c) {
        const int64_t t0 = sp.start + c * kChunk;
        const int n = static_cast<int>(std::min<int64_t>(kChunk, sp.start + sp.len - t0));
        std::fill(block.begin(), block.end(), S(0));
        prepare_chunk(p, sp.b, t0, n, hk, lay, block.data(), cm);
        std::fill(KC.begin(), KC.end(), S(0));   // KC [d, kChunk] = A Kbar^T
        matmul_acc(d, kChunk, d, 1, A.data(), d, block.data() + lay.kbart(), kChunk, KC.data(), kChunk);
        for (int a = 0; a < n; ++a) {
          for (int x = 0; x < d; ++x) row[x] = KC[x * kChunk + a];
          store_row(out.data_ptr(), p.dtype, ((sp.b * p.seq_len + t0 + a) * p.kv_heads + hk) * d, d, row.data());
        }
        if (c > 0) {   // A <- A P_c = A - (A W^T) TDW
          std::fill(AW.begin(), AW.end(), S(0));
          matmul_acc(d, kChunk, d, 1, A.data(), d, block.data() + lay.wt(), kChunk, AW.data(), kChunk);
          matmul_acc(d, d, kChunk, -1, AW.data(), kChunk, block.data() + lay.tdw(), d, A.data(), d);
        }
      }
    }
  });
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> path_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const at::Tensor& w, const at::Tensor& beta,
                                                      const c10::optional<at::Tensor>& g,
                                                      const c10::optional<at::Tensor>& cu_seqlens, double scale) {
  return q.scalar_type() == at::kDouble ? forward<double>(q, k, v, w, beta, g, cu_seqlens, scale)
                                        : forward<float>(q, k, v, w, beta, g, cu_seqlens, scale);
}

at::Tensor path_key_cache_cpu(const at::Tensor& k, const at::Tensor& w, const at::Tensor& beta,
                              const c10::optional<at::Tensor>& cu_seqlens) {
  return k.scalar_type() == at::kDouble ? key_cache<double>(k, w, beta, cu_seqlens)
                                        : key_cache<float>(k, w, beta, cu_seqlens);
}

}  // namespace blockops::path_attention

TORCH_LIBRARY_IMPL(blockops, CPU, m) {
  m.impl("path_attention", &blockops::path_attention::path_attention_cpu);
  m.impl("path_key_cache", &blockops::path_attention::path_key_cache_cpu);
  m.impl("path_attention_backward", &blockops::path_attention::path_attention_backward_cpu);
  m.impl("path_decode_step", &blockops::path_attention::path_decode_step_cpu);
}
