// CPU-emulation test of the PaTH attention CUDA kernels (path_attention.cu through gen_emu.py) against an fp64
// brute-force reference that applies every Householder factor H_t = I - beta_t w_t w_t^T to every key, one
// token at a time (no chunking, no UT transform), with a hand-written fp64 backward through the same chain. The
// reference's gradients are themselves checked against central finite differences (section "selftest").
//
// Sections: selftest, fwd (o, lse, k_cache), bwd (dq, dk, dv, dw, dbeta, dg), decode (one path_decode_step over a
// batched cache: keys, values, gates, g_last, o), all (default). EMU_QUICK drops the two longest attention cases
// (T = 200 and a varlen 65 + 130) and shortens the longest decode row (300 -> 100 cached keys, 8 -> 2 query heads).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "harness.h"
#include "path_attention_launch.h"

using namespace blockops;
using namespace blockops::path_attention;

static std::mt19937 rng(4321);
static double urand(double a, double b) { return std::uniform_real_distribution<double>(a, b)(rng); }
static double nrand() { return std::normal_distribution<double>(0, 1)(rng); }

// ---------------------------------------------------------------------------------------------------------
// fp64 reference
// ---------------------------------------------------------------------------------------------------------

struct Problem {
  int B, T, HQ, H, D, Dv;
  std::vector<std::pair<int64_t, int64_t>> seqs;   // (b, start, len) flattened: b * T + start, len
  std::vector<int> seq_b;
  double scale;
  bool gate;
  // inputs (already rounded to the kernels' input dtypes), row-major as the op's tensors
  std::vector<double> q, k, v, w, beta, g;   // q [B,T,HQ,D], k/w [B,T,H,D], v [B,T,H,Dv], beta [B,T,H], g [B,T,HQ]
};

struct RefOut {
  std::vector<double> o, lse, kcache;                // o [B,T,HQ,Dv], lse [B,HQ,T], kcache [B,T,H,D]
  std::vector<double> dq, dk, dv, dw, dbeta, dg;     // as the inputs
};

// Forward (and, with dO, the backward) of one problem. o_used: the o the backward's Delta is computed from (the
// kernel's input, rounded to the dtype); grad_lse optional.
static void reference(const Problem& P, RefOut& R, const std::vector<double>* dO, const std::vector<double>* o_used,
                      const std::vector<double>* grad_lse) {
  const int T = P.T, HQ = P.HQ, H = P.H, D = P.D, Dv = P.Dv, group = HQ / H;
  R.o.assign(size_t(P.B) * T * HQ * Dv, 0);
  R.lse.assign(size_t(P.B) * HQ * T, 0);
  R.kcache.assign(size_t(P.B) * T * H * D, 0);
  if (dO) {
    R.dq.assign(P.q.size(), 0); R.dk.assign(P.k.size(), 0); R.dv.assign(P.v.size(), 0);
    R.dw.assign(P.w.size(), 0); R.dbeta.assign(P.beta.size(), 0); R.dg.assign(size_t(P.B) * T * HQ, 0);
  }
  auto qi = [&](int b, int t, int h) { return ((size_t(b) * T + t) * HQ + h); };
  auto ki = [&](int b, int t, int h) { return ((size_t(b) * T + t) * H + h); };
  for (size_t s = 0; s < P.seqs.size(); ++s) {
    const int b = P.seq_b[s], st = int(P.seqs[s].first), L = int(P.seqs[s].second);
    for (int hk = 0; hk < H; ++hk) {
      // kt[j][i] = H_i ... H_{j+1} k_j for i >= j (i, j relative to the sequence start), [L][L][D]
      std::vector<double> kt(size_t(L) * L * D, 0);
      for (int j = 0; j < L; ++j) {
        double* cur = &kt[(size_t(j) * L + j) * D];
        for (int x = 0; x < D; ++x) cur[x] = P.k[ki(b, st + j, hk) * D + x];
        for (int i = j + 1; i < L; ++i) {
          const double* prev = &kt[(size_t(j) * L + i - 1) * D];
          double* nxt = &kt[(size_t(j) * L + i) * D];
          const double* wi = &P.w[ki(b, st + i, hk) * D];
          double dot = 0;
          for (int x = 0; x < D; ++x) dot += wi[x] * prev[x];
          const double bt = P.beta[ki(b, st + i, hk)];
          for (int x = 0; x < D; ++x) nxt[x] = prev[x] - bt * dot * wi[x];
        }
        for (int x = 0; x < D; ++x) R.kcache[ki(b, st + j, hk) * D + x] = kt[(size_t(j) * L + L - 1) * D + x];
      }
      std::vector<double> dkt_direct;   // d loss / d kt[j][i] from the logits, [L][L][D]
      if (dO) dkt_direct.assign(size_t(L) * L * D, 0);
      for (int hq = hk * group; hq < (hk + 1) * group; ++hq) {
        std::vector<double> G(L, 0);
        double run = 0;
        for (int t = 0; t < L; ++t) { if (P.gate) run += P.g[qi(b, st + t, hq)]; G[t] = run; }
        std::vector<double> dG(L, 0);
        for (int i = 0; i < L; ++i) {
          const double* qv = &P.q[qi(b, st + i, hq) * D];
          std::vector<double> s(i + 1);
          double mx = -INFINITY;
          for (int j = 0; j <= i; ++j) {
            const double* kv = &kt[(size_t(j) * L + i) * D];
            double dot = 0;
            for (int x = 0; x < D; ++x) dot += qv[x] * kv[x];
            s[j] = P.scale * (dot + G[i] - G[j]);
            mx = std::max(mx, s[j]);
          }
          double sum = 0;
          for (int j = 0; j <= i; ++j) sum += std::exp(s[j] - mx);
          const double lse = mx + std::log(sum);
          R.lse[(size_t(b) * HQ + hq) * T + st + i] = lse;
          std::vector<double> pr(i + 1);
          for (int j = 0; j <= i; ++j) pr[j] = std::exp(s[j] - lse);
          double* ov = &R.o[qi(b, st + i, hq) * Dv];
          for (int j = 0; j <= i; ++j)
            for (int x = 0; x < Dv; ++x) ov[x] += pr[j] * P.v[ki(b, st + j, hk) * Dv + x];
          if (!dO) continue;
          const double* dov = &(*dO)[qi(b, st + i, hq) * Dv];
          const double* ou = &(*o_used)[qi(b, st + i, hq) * Dv];
          double delta = 0;
          for (int x = 0; x < Dv; ++x) delta += dov[x] * ou[x];
          if (grad_lse) delta -= (*grad_lse)[(size_t(b) * HQ + hq) * T + st + i];
          for (int j = 0; j <= i; ++j) {
            double dp = 0;
            for (int x = 0; x < Dv; ++x) dp += dov[x] * P.v[ki(b, st + j, hk) * Dv + x];
            for (int x = 0; x < Dv; ++x) R.dv[ki(b, st + j, hk) * Dv + x] += pr[j] * dov[x];
            const double dl = P.scale * pr[j] * (dp - delta);   // d loss / d logit_ij
            dG[i] += dl;
            dG[j] -= dl;
            const double* kv = &kt[(size_t(j) * L + i) * D];
            double* dkd = &dkt_direct[(size_t(j) * L + i) * D];
            for (int x = 0; x < D; ++x) {
              R.dq[qi(b, st + i, hq) * D + x] += dl * kv[x];
              dkd[x] += dl * qv[x];
            }
          }
        }
        double acc = 0;
        if (dO)
          for (int t = L - 1; t >= 0; --t) { acc += dG[t]; R.dg[qi(b, st + t, hq)] = acc; }
      }
      if (!dO) continue;
      // Back through kt[j][i] = H_i kt[j][i-1]: adj = d loss / d kt[j][i] (total), i from L-1 down to j+1.
      std::vector<double> adj(D);
      for (int j = 0; j < L; ++j) {
        std::fill(adj.begin(), adj.end(), 0.0);
        for (int i = L - 1; i > j; --i) {
          const double* dkd = &dkt_direct[(size_t(j) * L + i) * D];
          for (int x = 0; x < D; ++x) adj[x] += dkd[x];
          const double* prev = &kt[(size_t(j) * L + i - 1) * D];
          const double* wi = &P.w[ki(b, st + i, hk) * D];
          const double bt = P.beta[ki(b, st + i, hk)];
          double wp = 0, wa = 0;
          for (int x = 0; x < D; ++x) { wp += wi[x] * prev[x]; wa += wi[x] * adj[x]; }
          R.dbeta[ki(b, st + i, hk)] -= wp * wa;
          for (int x = 0; x < D; ++x) R.dw[ki(b, st + i, hk) * D + x] -= bt * (wp * adj[x] + wa * prev[x]);
          for (int x = 0; x < D; ++x) adj[x] -= bt * wa * wi[x];
        }
        const double* dkd = &dkt_direct[(size_t(j) * L + j) * D];
        for (int x = 0; x < D; ++x) R.dk[ki(b, st + j, hk) * D + x] = adj[x] + dkd[x];
      }
    }
  }
}

// Builds a problem: lens (one per sequence; varlen packs them into one row of B = 1, else B rows of equal length).
static Problem make_problem(int B, const std::vector<int>& lens, bool varlen, int HQ, int H, int D, int Dv, bool gate,
                            DType dt, DType wdt, DType bdt, DType gdt, double beta_lo, double beta_hi) {
  Problem P;
  P.HQ = HQ; P.H = H; P.D = D; P.Dv = Dv; P.gate = gate;
  P.scale = 1.0 / std::sqrt(double(D));
  if (varlen) {
    P.B = 1;
    P.T = std::accumulate(lens.begin(), lens.end(), 0);
    int at = 0;
    for (int L : lens) { P.seqs.push_back({at, L}); P.seq_b.push_back(0); at += L; }
  } else {
    P.B = B;
    P.T = lens[0];
    for (int b = 0; b < B; ++b) { P.seqs.push_back({0, P.T}); P.seq_b.push_back(b); }
  }
  const size_t tok = size_t(P.B) * P.T;
  P.q.resize(tok * HQ * D); P.k.resize(tok * H * D); P.v.resize(tok * H * Dv); P.w.resize(tok * H * D);
  P.beta.resize(tok * H); P.g.resize(gate ? tok * HQ : 0);
  for (auto& x : P.q) x = round_to(dt, nrand());
  for (auto& x : P.k) x = round_to(dt, nrand());
  for (auto& x : P.v) x = round_to(dt, nrand());
  for (size_t r = 0; r < tok * H; ++r) {
    double n2 = 0;
    std::vector<double> row(D);
    for (auto& x : row) { x = nrand(); n2 += x * x; }
    for (int x = 0; x < D; ++x) P.w[r * D + x] = round_to(wdt, row[x] / std::sqrt(n2));
    P.beta[r] = round_to(bdt, urand(beta_lo, beta_hi));
  }
  for (auto& x : P.g) x = round_to(gdt, std::log(1.0 / (1.0 + std::exp(-urand(1.0, 5.0)))));   // logsigmoid
  return P;
}

// ---------------------------------------------------------------------------------------------------------
// Kernel runs
// ---------------------------------------------------------------------------------------------------------

struct Tables {
  std::vector<Span> spans;
  std::vector<int64_t> first;
  std::vector<ChunkRef> chunks;
  std::vector<int64_t> order;
  int64_t max_span_chunks = 0;
};

static Tables make_tables(const Problem& P) {
  Tables t;
  for (size_t s = 0; s < P.seqs.size(); ++s) {
    const int64_t st = P.seqs[s].first, L = P.seqs[s].second;
    if (L == 0) continue;
    t.spans.push_back(Span{P.seq_b[s], st, L});
    t.first.push_back(int64_t(t.chunks.size()));
    const int64_t nc = (L + kChunk - 1) / kChunk;
    t.max_span_chunks = std::max(t.max_span_chunks, nc);
    for (int64_t c = 0; c < nc; ++c) {
      const int64_t t0 = st + c * kChunk;
      t.chunks.push_back(ChunkRef{P.seq_b[s], t0, st, std::min<int64_t>(kChunk, st + L - t0), c});
    }
  }
  t.order.resize(t.chunks.size());
  std::iota(t.order.begin(), t.order.end(), 0);
  std::shuffle(t.order.begin(), t.order.end(), rng);   // any order of the forward's CTAs must give the same result
  return t;
}

struct Inputs {
  Buf q, k, v, w, beta, g;
  Inputs(const Problem& P, DType dt, DType wdt, DType bdt, DType gdt)
      : q(P.q.size() * esize(dt)), k(P.k.size() * esize(dt)), v(P.v.size() * esize(dt)), w(P.w.size() * esize(wdt)),
        beta(P.beta.size() * esize(bdt)), g(P.g.size() * esize(gdt)) {
    for (size_t i = 0; i < P.q.size(); ++i) put(dt, q.p, i, P.q[i]);
    for (size_t i = 0; i < P.k.size(); ++i) put(dt, k.p, i, P.k[i]);
    for (size_t i = 0; i < P.v.size(); ++i) put(dt, v.p, i, P.v[i]);
    for (size_t i = 0; i < P.w.size(); ++i) put(wdt, w.p, i, P.w[i]);
    for (size_t i = 0; i < P.beta.size(); ++i) put(bdt, beta.p, i, P.beta[i]);
    for (size_t i = 0; i < P.g.size(); ++i) put(gdt, g.p, i, P.g[i]);
  }
};

static Params make_params(const Problem& P, const Inputs& in, DType dt, DType wdt, DType bdt, DType gdt) {
  Params p{};
  p.q = in.q.p; p.k = in.k.p; p.v = in.v.p; p.w = in.w.p; p.beta = in.beta.p;
  p.g = P.gate ? in.g.p : nullptr;
  p.dtype = dt; p.w_dtype = wdt; p.beta_dtype = bdt; p.g_dtype = gdt;
  p.batch = P.B; p.seq_len = P.T; p.heads = P.HQ; p.kv_heads = P.H;
  p.head_dim = P.D; p.v_dim = P.Dv;
  p.scale = float(P.scale);
  return p;
}

static CudaPlan make_plan(const Tables& t) {
  CudaPlan plan{};
  plan.spans = t.spans.data();
  plan.first_chunk = t.first.data();
  plan.chunks = t.chunks.data();
  plan.order = t.order.data();
  plan.n_spans = int64_t(t.spans.size());
  plan.total_chunks = int64_t(t.chunks.size());
  plan.max_span_chunks = t.max_span_chunks;
  return plan;
}

static double worst_ratio = 0;

// Relative RMS error rms(got - ref) / rms(ref) (ref of RMS below `floor` counts as floor).
static double rel_rms(const std::vector<double>& ref, const std::vector<double>& got, double floor = 1e-6) {
  double e = 0, r = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double d = std::isfinite(got[i]) ? got[i] - ref[i] : 1e30;
    e += d * d;
    r += ref[i] * ref[i];
  }
  const double n = double(std::max<size_t>(ref.size(), 1));
  return std::sqrt(e / n) / std::max(std::sqrt(r / n), floor);
}

struct Case {
  int B;
  std::vector<int> lens;
  bool varlen;
  int HQ, H, D, Dv;
  bool gate;
  DType dt, wdt, bdt, gdt;
  double beta_lo = 0.05, beta_hi = 1.95;
  bool glse = false;
};

static void run_case(const Case& c, bool bwd) {
  ++cases;
  Problem P = make_problem(c.B, c.lens, c.varlen, c.HQ, c.H, c.D, c.Dv, c.gate, c.dt, c.wdt, c.bdt, c.gdt, c.beta_lo,
                           c.beta_hi);
  Inputs in(P, c.dt, c.wdt, c.bdt, c.gdt);
  Params p = make_params(P, in, c.dt, c.wdt, c.bdt, c.gdt);
  const Tables tab = make_tables(P);
  CudaPlan plan = make_plan(tab);
  const size_t tok = size_t(P.B) * P.T;
  std::string what;
  bool ok = true;
  auto check = [&](const char* name, const std::vector<double>& ref, const std::vector<double>& got, double tol) {
    const double e = rel_rms(ref, got);
    worst_ratio = std::max(worst_ratio, e / tol);
    if (getenv("EMU_VERBOSE")) {
      char buf[96];
      snprintf(buf, sizeof buf, " %s %.2g", name, e);
      what += buf;
    }
    if (!(e <= tol)) {
      ok = false;
      char buf[160];
      snprintf(buf, sizeof buf, " %s rel-rms %.3g > %.3g;", name, e, tol);
      what += buf;
    }
  };
  RefOut R;
  if (!bwd) {
    reference(P, R, nullptr, nullptr, nullptr);
    // The CUDA-core forward for every dtype; for fp16 / bf16 also the tensor-core one (operands rounded to the
    // dtype: the tolerance is flash-linear-attention's for bf16 and 2.5x tighter for fp16).
    for (const bool mma : {false, true}) {
      if (mma && c.dt == DType::kF32) continue;
      Buf blocks(size_t(P.H) * plan.total_chunks * block_floats(p) * 4, true);
      Buf G(tok * P.HQ * 4, true);
      Buf o(tok * P.HQ * P.Dv * esize(c.dt)), lse(tok * P.HQ * 4);
      plan.blocks = blocks.f();
      plan.G = P.gate ? G.f() : nullptr;
      plan.tensor_cores = mma;
      p.o = o.p;
      p.lse = lse.f();
      if (launch_path_forward(p, plan, nullptr) != cudaSuccess) { printf("forward launch failed\n"); ++failures; return; }
      std::vector<double> got_o(R.o.size()), got_lse(R.lse.size());
      for (size_t i = 0; i < got_o.size(); ++i) got_o[i] = get(c.dt, o.p, i);
      for (size_t i = 0; i < got_lse.size(); ++i) got_lse[i] = lse.f()[i];
      const double otol = c.dt == DType::kF32 ? 2e-5 : mma ? (c.dt == DType::kF16 ? 2e-3 : 5e-3)
                                                           : (c.dt == DType::kF16 ? 1e-3 : 6e-3);
      check(mma ? "o(mma)" : "o", R.o, got_o, otol);
      check(mma ? "lse(mma)" : "lse", R.lse, got_lse, mma ? 1e-3 : 2e-6);
    }
    // Key cache (its own launch: fresh blocks built without v).
    Params pk = p;
    pk.v = pk.k; pk.v_dim = 0; pk.heads = pk.kv_heads; pk.g = nullptr;
    Buf kblocks(size_t(P.H) * plan.total_chunks * block_floats(pk) * 4, true);
    Buf scratch(size_t(key_cache_scratch_floats(pk, plan)) * 4);
    Buf kc(tok * P.H * P.D * esize(c.dt));
    CudaPlan kplan = plan;
    kplan.blocks = kblocks.f();
    kplan.G = nullptr;
    if (launch_path_key_cache(pk, kplan, scratch.f(), kc.p, nullptr) != cudaSuccess) { printf("key cache launch failed\n"); ++failures; return; }
    std::vector<double> got_kc(R.kcache.size());
    for (size_t i = 0; i < got_kc.size(); ++i) got_kc[i] = get(c.dt, kc.p, i);
    check("k_cache", R.kcache, got_kc, c.dt == DType::kF32 ? 2e-5 : c.dt == DType::kF16 ? 1e-3 : 6e-3);
  } else {
    // The backward's inputs: dO and (optionally) grad_lse random, o and lse from the reference (o rounded to the
    // dtype, as the forward would store it); the reference's Delta uses that same rounded o.
    reference(P, R, nullptr, nullptr, nullptr);
    std::vector<double> dO(R.o.size()), o_used(R.o.size()), glse(R.lse.size());
    for (auto& x : dO) x = round_to(c.dt, nrand());
    for (size_t i = 0; i < o_used.size(); ++i) o_used[i] = round_to(c.dt, R.o[i]);
    for (auto& x : glse) x = (float)nrand();
    const std::vector<double> lse_ref = R.lse;
    reference(P, R, &dO, &o_used, c.glse ? &glse : nullptr);
    Buf dob(dO.size() * esize(c.dt)), ob(dO.size() * esize(c.dt)), lseb(lse_ref.size() * 4), glseb(glse.size() * 4);
    for (size_t i = 0; i < dO.size(); ++i) { put(c.dt, dob.p, i, dO[i]); put(c.dt, ob.p, i, o_used[i]); }
    for (size_t i = 0; i < lse_ref.size(); ++i) { lseb.f()[i] = float(lse_ref[i]); glseb.f()[i] = float(glse[i]); }
    Buf blocks(size_t(P.H) * plan.total_chunks * block_floats(p) * 4, true);
    Buf G(tok * P.HQ * 4, true);
    plan.blocks = blocks.f();
    plan.G = P.gate ? G.f() : nullptr;
    const GradLayout glay{P.D, P.Dv};
    Buf grads(size_t(P.H) * plan.total_chunks * glay.size() * 4, true);
    Buf scratch(size_t(plan.n_spans) * P.H * bwd_scratch_floats(p, plan) * 4);
    Buf dq(P.q.size() * 4, true), dk(P.k.size() * 4, true), dv(P.v.size() * 4, true), dw(P.w.size() * 4, true),
        dbeta(P.beta.size() * 4, true), dG(tok * P.HQ * 4, true);
    const BwdArgs bb{dob.p, ob.p, lseb.f(), c.glse ? glseb.f() : nullptr, dq.f(), dk.f(), dv.f(), dw.f(), dbeta.f(),
                     dG.f(), grads.f(), scratch.f()};
    if (launch_path_backward(p, plan, bb, nullptr) != cudaSuccess) { printf("backward launch failed\n"); ++failures; return; }
    auto as_vec = [](const Buf& b, size_t n) { return std::vector<double>(b.f(), b.f() + n); };
    // dG comes back [B, HQ, T]; the reference's dg is [B, T, HQ].
    std::vector<double> got_dg(tok * P.HQ);
    for (int b = 0; b < P.B; ++b)
      for (int h = 0; h < P.HQ; ++h)
        for (int t = 0; t < P.T; ++t) got_dg[(size_t(b) * P.T + t) * P.HQ + h] = dG.f()[(size_t(b) * P.HQ + h) * P.T + t];
    const double tol = 1e-4;   // fp32 arithmetic on identical (rounded) inputs
    check("dq", R.dq, as_vec(dq, R.dq.size()), tol);
    check("dk", R.dk, as_vec(dk, R.dk.size()), tol);
    check("dv", R.dv, as_vec(dv, R.dv.size()), tol);
    check("dw", R.dw, as_vec(dw, R.dw.size()), 2 * tol);
    check("dbeta", R.dbeta, as_vec(dbeta, R.dbeta.size()), 2 * tol);
    check("dg", R.dg, got_dg, 2 * tol);
  }
  std::string lens;
  for (int L : c.lens) lens += std::to_string(L) + ",";
  if (!ok || getenv("EMU_VERBOSE")) {
    printf("%s %s B%d T[%s]%s HQ%d H%d D%d Dv%d gate%d %s w%s beta%s g%s beta[%.2f,%.2f] glse%d:%s\n", ok ? "ok  " : "FAIL",
           bwd ? "bwd" : "fwd", P.B, lens.c_str(), c.varlen ? " varlen" : "", c.HQ, c.H, c.D, c.Dv, int(c.gate),
           dname(c.dt), dname(c.wdt), dname(c.bdt), dname(c.gdt), c.beta_lo, c.beta_hi, int(c.glse), what.c_str());
    fflush(stdout);
  }
  if (!ok) ++failures;
}

// The fp64 reference's gradients against central differences of its forward (loss = sum(dO * o) + sum(glse * lse)).
static void selftest() {
  const DType f = DType::kF32;
  for (const bool gate : {false, true}) {
    ++cases;
    Problem P = make_problem(1, {3, 4}, true, 2, 1, 8, 8, gate, f, f, f, f, 0.1, 1.9);
    RefOut R;
    reference(P, R, nullptr, nullptr, nullptr);
    std::vector<double> dO(R.o.size()), glse(R.lse.size());
    for (auto& x : dO) x = nrand();
    for (auto& x : glse) x = nrand();
    std::vector<double> o_used = R.o;
    reference(P, R, &dO, &o_used, &glse);
    auto loss = [&](const Problem& Q) {
      RefOut S;
      reference(Q, S, nullptr, nullptr, nullptr);
      double l = 0;
      for (size_t i = 0; i < S.o.size(); ++i) l += dO[i] * S.o[i];
      for (size_t i = 0; i < S.lse.size(); ++i) l += glse[i] * S.lse[i];
      return l;
    };
    double worst = 0;
    auto fd = [&](std::vector<double> Problem::*field, const std::vector<double>& grad) {
      for (size_t i = 0; i < grad.size(); ++i) {
        Problem a = P, b = P;
        const double h = 1e-6;
        (a.*field)[i] += h;
        (b.*field)[i] -= h;
        const double num = (loss(a) - loss(b)) / (2 * h);
        worst = std::max(worst, std::fabs(num - grad[i]) / (1e-3 + std::fabs(num)));
      }
    };
    fd(&Problem::q, R.dq); fd(&Problem::k, R.dk); fd(&Problem::v, R.dv); fd(&Problem::w, R.dw);
    fd(&Problem::beta, R.dbeta);
    if (gate) fd(&Problem::g, R.dg);
    const bool ok = worst < 1e-5;   // finite differences in fp64 with h = 1e-6: about 1e-6 of noise
    if (!ok || getenv("EMU_VERBOSE")) printf("%s selftest gate%d: worst relative finite-difference error %.3g\n", ok ? "ok  " : "FAIL", int(gate), worst);
    if (!ok) ++failures;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Decode step
// ---------------------------------------------------------------------------------------------------------

struct DecodeCase {
  std::vector<int64_t> lengths;
  int64_t L;
  int HQ, H, D, Dv;
  bool gate;
  DType dt, wdt;
};

// A random fp32 cache and one token per row; the kernel's step against an fp64 step on the same values. Entries
// beyond each row's new length must come back bit-identical (the kernel may not touch them).
static void run_decode_case(const DecodeCase& c) {
  ++cases;
  const int64_t B = int64_t(c.lengths.size()), L = c.L, HQ = c.HQ, H = c.H, D = c.D, Dv = c.Dv, group = HQ / H;
  std::vector<float> keys(B * H * L * D), values(B * H * L * Dv), gates(c.gate ? B * HQ * L : 0), g_last(c.gate ? B * HQ : 0);
  for (auto& x : keys) x = float(nrand());
  for (auto& x : values) x = float(nrand());
  for (auto& x : gates) x = float(-urand(0, 3));
  for (auto& x : g_last) x = float(-urand(0, 3));
  std::vector<double> q(B * HQ * D), k(B * H * D), v(B * H * Dv), w(B * H * D), beta(B * H), g(B * HQ);
  for (auto& x : q) x = round_to(c.dt, nrand());
  for (auto& x : k) x = round_to(c.dt, nrand());
  for (auto& x : v) x = round_to(c.dt, nrand());
  for (int64_t r = 0; r < B * H; ++r) {
    double n2 = 0;
    std::vector<double> row(D);
    for (auto& x : row) { x = nrand(); n2 += x * x; }
    for (int64_t x = 0; x < D; ++x) w[r * D + x] = round_to(c.wdt, row[x] / std::sqrt(n2));
    beta[r] = round_to(c.wdt, urand(0.05, 1.95));
  }
  for (auto& x : g) x = round_to(c.wdt, -urand(0, 1));
  const double scale = 1.0 / std::sqrt(double(D));
  // fp64 step
  std::vector<double> rk(keys.begin(), keys.end()), rv(values.begin(), values.end()), rg(gates.begin(), gates.end()),
      rgl(g_last.begin(), g_last.end()), ro(B * HQ * Dv, 0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = c.lengths[b];
    for (int64_t hk = 0; hk < H; ++hk) {
      double* K = &rk[(b * H + hk) * L * D];
      double* V = &rv[(b * H + hk) * L * Dv];
      const double* wv = &w[(b * H + hk) * D];
      for (int64_t j = 0; j < len; ++j) {
        double dot = 0;
        for (int64_t x = 0; x < D; ++x) dot += K[j * D + x] * wv[x];
        for (int64_t x = 0; x < D; ++x) K[j * D + x] -= beta[b * H + hk] * dot * wv[x];
      }
      for (int64_t x = 0; x < D; ++x) K[len * D + x] = k[(b * H + hk) * D + x];
      for (int64_t x = 0; x < Dv; ++x) V[len * Dv + x] = v[(b * H + hk) * Dv + x];
      for (int64_t gi = 0; gi < group; ++gi) {
        const int64_t bh = b * HQ + hk * group + gi;
        if (c.gate) { rgl[bh] += g[bh]; rg[bh * L + len] = rgl[bh]; }
        std::vector<double> s(len + 1);
        double mx = -INFINITY;
        for (int64_t j = 0; j <= len; ++j) {
          double dot = 0;
          for (int64_t x = 0; x < D; ++x) dot += q[bh * D + x] * K[j * D + x];
          s[j] = scale * (dot + (c.gate ? rgl[bh] - rg[bh * L + j] : 0));
          mx = std::max(mx, s[j]);
        }
        double sum = 0;
        for (auto& x : s) sum += (x = std::exp(x - mx));
        for (int64_t j = 0; j <= len; ++j)
          for (int64_t x = 0; x < Dv; ++x) ro[bh * Dv + x] += s[j] / sum * V[j * Dv + x];
      }
    }
  }
  // kernel
  Buf qb(q.size() * esize(c.dt)), kb(k.size() * esize(c.dt)), vb(v.size() * esize(c.dt)), wb(w.size() * esize(c.wdt)),
      bb(beta.size() * esize(c.wdt)), gb(g.size() * esize(c.wdt)), ob(ro.size() * esize(c.dt));
  for (size_t i = 0; i < q.size(); ++i) put(c.dt, qb.p, i, q[i]);
  for (size_t i = 0; i < k.size(); ++i) put(c.dt, kb.p, i, k[i]);
  for (size_t i = 0; i < v.size(); ++i) put(c.dt, vb.p, i, v[i]);
  for (size_t i = 0; i < w.size(); ++i) put(c.wdt, wb.p, i, w[i]);
  for (size_t i = 0; i < beta.size(); ++i) put(c.wdt, bb.p, i, beta[i]);
  for (size_t i = 0; i < g.size(); ++i) put(c.wdt, gb.p, i, g[i]);
  Buf kc(keys.size() * 4), vc(values.size() * 4), gc(gates.size() * 4), glc(g_last.size() * 4), sc(B * HQ * L * 4);
  memcpy(kc.p, keys.data(), keys.size() * 4);
  memcpy(vc.p, values.data(), values.size() * 4);
  if (c.gate) {
    memcpy(gc.p, gates.data(), gates.size() * 4);
    memcpy(glc.p, g_last.data(), g_last.size() * 4);
  }
  DecodeParams p{};
  p.q = qb.p; p.k = kb.p; p.v = vb.p; p.w = wb.p; p.beta = bb.p; p.g = c.gate ? gb.p : nullptr;
  p.dtype = c.dt; p.w_dtype = c.wdt; p.beta_dtype = c.wdt; p.g_dtype = c.wdt;
  p.keys = kc.f(); p.values = vc.f(); p.lengths = c.lengths.data();
  p.gates = c.gate ? gc.f() : nullptr; p.g_last = c.gate ? glc.f() : nullptr;
  p.o = ob.p;
  p.batch = B; p.heads = HQ; p.kv_heads = H; p.capacity = L; p.head_dim = c.D; p.v_dim = c.Dv;
  p.scale = float(scale);
  bool ok = true;
  std::string what;
  if (launch_path_decode_step(p, sc.f(), nullptr) != cudaSuccess) { printf("decode launch failed\n"); ++failures; return; }
  auto compare = [&](const char* name, const std::vector<double>& ref, const float* got, const std::vector<float>& before,
                     int64_t row_len, int64_t rows_per_b, int64_t L_axis) {
    // entries [.., pos, ..] with pos <= len_b are compared (tolerance), later ones must equal `before` exactly
    double err = 0, mref = 1e-3;
    for (size_t i = 0; i < ref.size(); ++i) {
      const int64_t b = int64_t(i) / (rows_per_b * L_axis * row_len), pos = (int64_t(i) / row_len) % L_axis;
      if (pos <= c.lengths[b]) {
        err = std::max(err, std::isfinite(got[i]) ? std::fabs(got[i] - ref[i]) : INFINITY);
        mref = std::max(mref, std::fabs(ref[i]));
      } else if (std::memcmp(&got[i], &before[i], 4) != 0) {
        ok = false;
        what += std::string(" ") + name + " touched beyond the row's length;";
        return;
      }
    }
    worst_ratio = std::max(worst_ratio, err / (2e-6 * mref));
    if (!(err <= 2e-6 * mref)) { ok = false; what += std::string(" ") + name + " differs;"; }
  };
  compare("keys", rk, kc.f(), keys, D, H, L);
  compare("values", rv, vc.f(), values, Dv, H, L);
  if (c.gate) {
    compare("gates", rg, gc.f(), gates, 1, HQ, L);
    compare("g_last", rgl, glc.f(), g_last, 1, HQ, 1);
  }
  std::vector<double> got_o(ro.size());
  for (size_t i = 0; i < ro.size(); ++i) got_o[i] = get(c.dt, ob.p, i);
  const double otol = c.dt == DType::kF32 ? 2e-5 : c.dt == DType::kF16 ? 1e-3 : 6e-3, e = rel_rms(ro, got_o);
  worst_ratio = std::max(worst_ratio, e / otol);
  if (!(e <= otol)) { ok = false; what += " o rel-rms " + std::to_string(e) + ";"; }
  if (!ok || getenv("EMU_VERBOSE")) {
    std::string lens;
    for (int64_t n : c.lengths) lens += std::to_string(n) + ",";
    printf("%s decode lengths[%s] L%lld HQ%d H%d D%d Dv%d gate%d %s w%s:%s\n", ok ? "ok  " : "FAIL", lens.c_str(),
           (long long)L, c.HQ, c.H, c.D, c.Dv, int(c.gate), dname(c.dt), dname(c.wdt), what.c_str());
  }
  if (!ok) ++failures;
}

int main(int argc, char** argv) {
  const Sections section(argc, argv, "all");
  const bool quick = getenv("EMU_QUICK") != nullptr;
  const DType F = DType::kF32, H16 = DType::kF16, BF = DType::kBF16;
  // Lengths around the chunk (1, 63, 64, 65, ~200), head dims 40/64/72/128 (and D != Dv), GQA, varlen with an
  // empty and a one-token sequence, gate on/off, every activation dtype with w/beta/g in fp32 or that dtype, beta
  // near 0 and near 2, a gradient at lse.
  std::vector<Case> cs = {
      {1, {1}, false, 1, 1, 64, 64, false, F, F, F, F},
      {2, {63}, false, 4, 2, 40, 40, true, H16, H16, F, H16},
      {1, {65}, false, 2, 1, 72, 64, true, BF, F, BF, F},
      {1, {70, 0, 1, 64}, true, 2, 2, 64, 40, true, F, F, F, F},
      {1, {130}, false, 2, 1, 128, 128, false, BF, BF, BF, BF, 0.01, 0.05},
      {1, {129}, false, 1, 1, 40, 72, true, H16, F, F, F, 1.9, 1.999, true},
      {1, {200}, false, 3, 1, 64, 64, true, F, F, F, F, 0.05, 1.95, true},
      {1, {65, 130}, true, 2, 1, 72, 72, false, BF, F, F, F},
  };
  if (quick) cs.resize(6);   // EMU_QUICK (CI): up to T = 130; every dtype, gate on and off, varlen, GQA stay
  const auto t0 = std::chrono::steady_clock::now();
  if (section("selftest")) selftest();
  if (section("fwd"))
    for (const Case& c : cs) run_case(c, false);
  if (section("bwd"))
    for (const Case& c : cs) run_case(c, true);
  if (section("decode")) {
    const std::vector<DecodeCase> ds = {
        {{0, 1, 37, 70}, 80, 4, 2, 40, 24, true, F, F},
        {{5, 0}, 6, 2, 2, 64, 64, false, H16, H16},
        quick ? DecodeCase{{100}, 101, 2, 1, 128, 72, true, BF, F} : DecodeCase{{300}, 301, 8, 1, 128, 72, true, BF, F},
        {{3, 9, 1}, 12, 3, 1, 256, 256, true, H16, F},
    };
    for (const DecodeCase& d : ds) run_decode_case(d);
  }
  return summary(" section %s, worst error / bound %.3f (%.1f s)", section.chosen.c_str(), worst_ratio,
                 std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
}
