// CPU-emulation test of the block-sparse attention CUDA kernels (attention.cu, attention_mma_{fwd,bwd}.cu through
// gen_emu.py) against an fp64 reference built from a dense token mask. The block lists are built here from
// the dense mask (independently of block_mask.py), optionally with invalid entries that the kernels must skip.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "attention_launch.h"
#include "harness.h"

extern bool emu_allow_mma;
using namespace blockops;
using namespace blockops::attention;

static std::mt19937 rng(1234);
static double urand(double a, double b) { return std::uniform_real_distribution<double>(a, b)(rng); }

enum MaskKind { kRandom, kCausal, kEmptyRows, kDense, kNone };

struct Case {
  int B, H, Hk, Tq, Tk, D, Dv, bq, bkv;
  DType dt;
  MaskKind kind;
  bool mb, mh;        // mask has the batch / head dim (else broadcast)
  bool strided;       // q as a [B, T, H, D] transpose, k / v with padded rows
  bool invalid;       // invalid entries inside the counts
  bool bwd;
  bool mma;           // allow the tensor-core forward
  double qscale;      // input magnitude (larger: more online-softmax rescaling)
  bool garbage = false;  // counts beyond the list width or negative: only "no out-of-bounds access" is checked
  bool glse = false;     // a gradient arriving at lse too
  int poison = 0;        // forward only: 1 a NaN in q (b 0, h 0, row Tq / 2), 2 a NaN in k (b 0, key head 0, key Tk / 3),
                         // 3 a NaN in v (the same key, column 2: NaN in that output column of the rows that see it)
  bool wgmma = false;    // forward only: the Hopper forward (attention_wgmma.cu), which must take the case
  bool kv_bthd = false;  // k / v stored as [B, Tk, Hk, D] transposes (q too when strided)
};

static double worst_ratio = 0;  // max over checks of error / bound: how close the passing cases come

struct Lists {
  std::vector<int32_t> num, idx, full_num, full_idx, tile_ids;
  BlockLists view(int64_t n, int64_t width) const {
    return BlockLists{num.data(), idx.data(), full_num.data(), full_idx.data(), tile_ids.data(), n, width};
  }
};

static bool run_case(const Case& c) {
  ++cases;
  const int Bm = c.mb ? c.B : 1, Hm = c.mh ? c.H : 1;
  const int QB = (c.Tq + c.bq - 1) / c.bq, KB = (c.Tk + c.bkv - 1) / c.bkv, W = (c.bkv + 31) / 32;
  // Dense mask per (b', h').
  std::vector<uint8_t> dense(size_t(Bm) * Hm * c.Tq * c.Tk);
  auto vis = [&](int mb, int mh, int i, int j) -> uint8_t& { return dense[((size_t(mb) * Hm + mh) * c.Tq + i) * c.Tk + j]; };
  for (int mb = 0; mb < Bm; ++mb)
    for (int mh = 0; mh < Hm; ++mh)
      for (int qb = 0; qb < QB; ++qb)
        for (int kb = 0; kb < KB; ++kb) {
          const int cls = rng() % 10;  // random kinds: 40% empty, 30% full, 30% partial blocks
          for (int r = 0; r < c.bq; ++r)
            for (int cc = 0; cc < c.bkv; ++cc) {
              const int i = qb * c.bq + r, j = kb * c.bkv + cc;
              if (i >= c.Tq || j >= c.Tk) continue;
              bool v = false;
              switch (c.kind) {
                case kRandom: case kEmptyRows: v = cls >= 4 && (cls < 7 || rng() % 2); break;
                case kCausal: v = j <= i; break;
                case kDense: v = true; break;
                case kNone: v = false; break;
              }
              if (c.kind == kEmptyRows && i % 5 == 1) v = false;
              vis(mb, mh, i, j) = v;
            }
        }

  // Block lists in both directions and tiles.
  Lists fw, tr;
  const size_t rows = size_t(Bm) * Hm;
  fw.num.assign(rows * QB, 0); fw.full_num.assign(rows * QB, 0);
  fw.idx.assign(rows * QB * KB, 0); fw.full_idx.assign(rows * QB * KB, 0); fw.tile_ids.assign(rows * QB * KB, 0);
  tr.num.assign(rows * KB, 0); tr.full_num.assign(rows * KB, 0);
  tr.idx.assign(rows * KB * QB, 0); tr.full_idx.assign(rows * KB * QB, 0); tr.tile_ids.assign(rows * KB * QB, 0);
  std::vector<int32_t> tiles;
  std::vector<int> cls_of(rows * QB * KB, 0), tile_of(rows * QB * KB, -1);  // 0 empty, 1 partial, 2 full
  for (size_t m = 0; m < rows; ++m)
    for (int qb = 0; qb < QB; ++qb)
      for (int kb = 0; kb < KB; ++kb) {
        int in = 0, seen = 0;
        std::vector<int32_t> bits(size_t(c.bq) * W, 0);
        for (int r = 0; r < c.bq; ++r)
          for (int cc = 0; cc < c.bkv; ++cc) {
            const int i = qb * c.bq + r, j = kb * c.bkv + cc;
            if (i >= c.Tq || j >= c.Tk) continue;
            ++in;
            if (dense[(m * c.Tq + i) * c.Tk + j]) { ++seen; bits[r * W + cc / 32] |= int32_t(1u << (cc % 32)); }
          }
        const size_t at = (m * QB + qb) * KB + kb;
        if (seen == 0) continue;
        if (seen == in) { cls_of[at] = 2; continue; }
        cls_of[at] = 1;
        tile_of[at] = int(tiles.size() / (size_t(c.bq) * W));
        tiles.insert(tiles.end(), bits.begin(), bits.end());
      }
  const int num_tiles = int(tiles.size() / (size_t(c.bq) * W));
  if (tiles.empty()) tiles.assign(size_t(c.bq) * W, 0);  // a valid pointer; no entry refers to it
  for (size_t m = 0; m < rows; ++m) {
    for (int qb = 0; qb < QB; ++qb) {
      const size_t base = (m * QB + qb) * KB;
      int np = 0, nf = 0;
      for (int kb = 0; kb < KB; ++kb) {
        const int k = cls_of[base + kb];
        if (k == 1) { fw.idx[base + np] = kb; fw.tile_ids[base + np] = tile_of[base + kb]; ++np; }
        if (k == 2) fw.full_idx[base + nf++] = kb;
      }
      // Invalid entries the kernels must skip, inserted within the counts where the row has room.
      if (c.invalid && np + 4 <= KB) {
        const int32_t bad_idx[4] = {-1, KB + 3, 0, KB - 1};
        const int32_t bad_tile[4] = {0, 0, num_tiles + 5, -2};
        for (int e = 0; e < 4; ++e) {
          const int pos = np ? int(rng() % (np + 1)) : 0;
          for (int x = np; x > pos; --x) { fw.idx[base + x] = fw.idx[base + x - 1]; fw.tile_ids[base + x] = fw.tile_ids[base + x - 1]; }
          fw.idx[base + pos] = bad_idx[e]; fw.tile_ids[base + pos] = bad_tile[e]; ++np;
        }
      }
      if (c.invalid && nf + 1 <= KB) fw.full_idx[base + nf++] = (qb % 2) ? -7 : KB;
      fw.num[m * QB + qb] = np; fw.full_num[m * QB + qb] = nf;
    }
    for (int kb = 0; kb < KB; ++kb) {
      const size_t base = (m * KB + kb) * QB;
      int np = 0, nf = 0;
      for (int qb = 0; qb < QB; ++qb) {
        const size_t at = (m * QB + qb) * KB + kb;
        if (cls_of[at] == 1) { tr.idx[base + np] = qb; tr.tile_ids[base + np] = tile_of[at]; ++np; }
        if (cls_of[at] == 2) tr.full_idx[base + nf++] = qb;
      }
      if (c.invalid && np + 2 <= QB) {
        tr.idx[base + np] = QB; tr.tile_ids[base + np] = 0; ++np;
        tr.idx[base + np] = 0; tr.tile_ids[base + np] = -1; ++np;
      }
      if (c.invalid && nf + 1 <= QB) tr.full_idx[base + nf++] = -1;
      tr.num[m * KB + kb] = np; tr.full_num[m * KB + kb] = nf;
    }
  }

  if (c.garbage) {  // counts clamp to [0, width]: the 0-padding entries are then read (valid block 0, tile 0)
    for (size_t i = 0; i < fw.num.size(); ++i) { fw.num[i] = i % 2 ? KB + 5 : -3; fw.full_num[i] = i % 3 ? KB + 1 : -1; }
    for (size_t i = 0; i < tr.num.size(); ++i) { tr.num[i] = i % 2 ? -2 : QB + 9; tr.full_num[i] = i % 2 ? QB + 1 : -5; }
  }

  // Operands (values rounded to the dtype; doubles keep the rounded values).
  const int es = esize(c.dt);
  const int64_t kpad = c.strided ? 8 : 0;
  std::vector<double> glse(size_t(c.B) * c.H * c.Tq, 0.0);
  if (c.glse) for (auto& g : glse) g = urand(-0.5, 0.5);
  std::vector<double> q(size_t(c.B) * c.H * c.Tq * c.D), k(size_t(c.B) * c.Hk * c.Tk * c.D),
      v(size_t(c.B) * c.Hk * c.Tk * c.Dv), dO(size_t(c.B) * c.H * c.Tq * c.Dv);
  for (auto& x : q) x = round_to(c.dt, urand(-c.qscale, c.qscale));
  for (auto& x : k) x = round_to(c.dt, urand(-c.qscale, c.qscale));
  for (auto& x : v) x = round_to(c.dt, urand(-1, 1));
  for (auto& x : dO) x = round_to(c.dt, urand(-1, 1));
  FwdParams p{};
  p.dtype = c.dt;
  p.batch = c.B; p.heads = c.H; p.kv_heads = c.Hk; p.q_len = c.Tq; p.kv_len = c.Tk; p.head_dim = c.D; p.v_dim = c.Dv;
  if (c.strided) { p.q_stride_t = int64_t(c.H) * c.D; p.q_stride_h = c.D; p.q_stride_b = int64_t(c.Tq) * c.H * c.D; }
  else { p.q_stride_t = c.D; p.q_stride_h = int64_t(c.Tq) * c.D; p.q_stride_b = int64_t(c.H) * c.Tq * c.D; }
  p.k_stride_t = c.D + kpad; p.k_stride_h = int64_t(c.Tk) * p.k_stride_t; p.k_stride_b = c.Hk * p.k_stride_h;
  p.v_stride_t = c.Dv + kpad; p.v_stride_h = int64_t(c.Tk) * p.v_stride_t; p.v_stride_b = c.Hk * p.v_stride_h;
  if (c.kv_bthd) {
    p.k_stride_h = c.D; p.k_stride_t = int64_t(c.Hk) * c.D; p.k_stride_b = int64_t(c.Tk) * p.k_stride_t;
    p.v_stride_h = c.Dv; p.v_stride_t = int64_t(c.Hk) * c.Dv; p.v_stride_b = int64_t(c.Tk) * p.v_stride_t;
  }
  Buf qb_(size_t(c.B) * c.H * c.Tq * c.D * es), kb_(size_t(c.B) * p.k_stride_b * es), vb_(size_t(c.B) * p.v_stride_b * es);
  for (int b = 0; b < c.B; ++b) for (int h = 0; h < c.H; ++h) for (int t = 0; t < c.Tq; ++t) for (int d = 0; d < c.D; ++d)
    put(c.dt, qb_.p, b * p.q_stride_b + h * p.q_stride_h + t * p.q_stride_t + d, q[((size_t(b) * c.H + h) * c.Tq + t) * c.D + d]);
  for (int b = 0; b < c.B; ++b) for (int h = 0; h < c.Hk; ++h) for (int t = 0; t < c.Tk; ++t) {
    for (int d = 0; d < c.D; ++d) put(c.dt, kb_.p, b * p.k_stride_b + h * p.k_stride_h + t * p.k_stride_t + d, k[((size_t(b) * c.Hk + h) * c.Tk + t) * c.D + d]);
    for (int d = 0; d < c.Dv; ++d) put(c.dt, vb_.p, b * p.v_stride_b + h * p.v_stride_h + t * p.v_stride_t + d, v[((size_t(b) * c.Hk + h) * c.Tk + t) * c.Dv + d]);
  }
  // NaN (csrc/attention.h): the poisoned q row, and every row that sees the poisoned key, must come out NaN (out
  // and lse); rows that do not see it must match the clean reference (a hidden NaN key must not leak).
  const int poison_row = c.Tq / 2, poison_key = c.Tk / 3;
  if (c.poison == 1) put(c.dt, qb_.p, poison_row * p.q_stride_t, NAN);
  if (c.poison == 2) put(c.dt, kb_.p, poison_key * p.k_stride_t + 1, NAN);
  if (c.poison == 3) put(c.dt, vb_.p, poison_key * p.v_stride_t + 2, NAN);
  p.q = qb_.p; p.k = kb_.p; p.v = vb_.p;
  p.scale = float(1.0 / std::sqrt(double(c.D)));
  p.mask = MaskDims{Bm, Hm, QB, KB, c.bq, c.bkv, num_tiles};
  p.kv = fw.view(QB, KB);
  p.tiles = tiles.data();
  const size_t out_elems = size_t(c.B) * c.H * c.Tq * c.Dv, rows_q = size_t(c.B) * c.H * c.Tq;
  Buf out(out_elems * es), lse(rows_q * 4);
  p.out = out.p; p.lse = static_cast<float*>(lse.p);

  emu_allow_mma = c.mma;
  const bool mma_ran = c.mma && forward_path(p) == CudaPath::kMma;
  bool bwd_mma_ran = false;
  if (c.wgmma && !fwd_wgmma_supported(p)) {
    printf("FAIL B%d H%d/%d Tq%d Tk%d D%d blk %dx%d %s: the Hopper forward does not take it\n", c.B, c.H, c.Hk, c.Tq, c.Tk,
           c.D, c.bq, c.bkv, dname(c.dt));
    ++failures;
    return false;
  }
  const cudaError_t fwd_err = c.wgmma ? launch_fwd_wgmma(p, nullptr) : launch_block_sparse_attention_fwd(p, nullptr);
  if (fwd_err != cudaSuccess) { printf("launch failed\n"); ++failures; return false; }

  // fp64 reference.
  const int G = c.H / c.Hk;
  const double sc = p.scale;
  std::vector<double> ro(out_elems, 0), rl(rows_q), rdq(q.size(), 0), rdk(k.size(), 0), rdv(v.size(), 0);
  for (int b = 0; b < c.B; ++b) for (int h = 0; h < c.H; ++h) {
    const int hk = h / G;
    const int mrow = (c.mb ? b : 0) * Hm + (c.mh ? h : 0);
    for (int i = 0; i < c.Tq; ++i) {
      const double* qi = &q[((size_t(b) * c.H + h) * c.Tq + i) * c.D];
      std::vector<double> s(c.Tk, -INFINITY);
      double mx = -INFINITY;
      for (int j = 0; j < c.Tk; ++j) {
        if (!dense[(size_t(mrow) * c.Tq + i) * c.Tk + j]) continue;
        const double* kj = &k[((size_t(b) * c.Hk + hk) * c.Tk + j) * c.D];
        double a = 0; for (int d = 0; d < c.D; ++d) a += qi[d] * kj[d];
        s[j] = a * sc; mx = std::max(mx, s[j]);
      }
      const size_t row = (size_t(b) * c.H + h) * c.Tq + i;
      if (mx == -INFINITY) { rl[row] = -INFINITY; continue; }
      double l = 0; for (int j = 0; j < c.Tk; ++j) if (s[j] != -INFINITY) l += std::exp(s[j] - mx);
      rl[row] = mx + std::log(l);
      std::vector<double> P(c.Tk, 0);
      for (int j = 0; j < c.Tk; ++j) if (s[j] != -INFINITY) P[j] = std::exp(s[j] - rl[row]);
      double* o = &ro[row * c.Dv];
      for (int j = 0; j < c.Tk; ++j) if (P[j] != 0) for (int d = 0; d < c.Dv; ++d) o[d] += P[j] * v[((size_t(b) * c.Hk + hk) * c.Tk + j) * c.Dv + d];
      if (!c.bwd) continue;
      const double* doi = &dO[row * c.Dv];
      double delta = -glse[row]; for (int d = 0; d < c.Dv; ++d) delta += doi[d] * o[d];
      for (int j = 0; j < c.Tk; ++j) {
        if (P[j] == 0) continue;
        const double* vj = &v[((size_t(b) * c.Hk + hk) * c.Tk + j) * c.Dv];
        const double* kj = &k[((size_t(b) * c.Hk + hk) * c.Tk + j) * c.D];
        double dp = 0; for (int d = 0; d < c.Dv; ++d) dp += doi[d] * vj[d];
        const double ds = P[j] * (dp - delta);
        for (int d = 0; d < c.D; ++d) { rdq[row * c.D + d] += sc * ds * kj[d]; rdk[((size_t(b) * c.Hk + hk) * c.Tk + j) * c.D + d] += sc * ds * qi[d]; }
        for (int d = 0; d < c.Dv; ++d) rdv[((size_t(b) * c.Hk + hk) * c.Tk + j) * c.Dv + d] += P[j] * doi[d];
      }
    }
  }

  if (c.poison) {
    for (int b = 0; b < c.B; ++b) for (int h = 0; h < c.H; ++h) for (int i = 0; i < c.Tq; ++i) {
      const size_t row = (size_t(b) * c.H + h) * c.Tq + i;
      const int mrow = (c.mb ? b : 0) * Hm + (c.mh ? h : 0);
      const bool hit = b == 0 && (c.poison == 1 ? h == 0 && i == poison_row && rl[row] != -INFINITY
                                                : h / G == 0 && dense[(size_t(mrow) * c.Tq + i) * c.Tk + poison_key]);
      if (!hit) continue;
      if (c.poison == 3) {   // a NaN value: that column only; the softmax (lse) does not see values
        ro[row * c.Dv + 2] = NAN;
        continue;
      }
      rl[row] = NAN;
      for (int d = 0; d < c.Dv; ++d) ro[row * c.Dv + d] = NAN;
    }
  }

  // Error: max |got - ref| / max(|ref|, floor), against a per-dtype bound (a few ulps of the output dtype; the mma
  // path also rounds P to the input dtype before P V).
  const double eps = c.dt == DType::kF32 ? 1.2e-7 : c.dt == DType::kF16 ? 9.8e-4 : 7.8e-3;
  const double tol = (c.dt == DType::kF32 ? 100 : 4) * eps;
  bool ok = true;
  std::string what;
  auto compare = [&](const char* name, const void* got, DType t, const std::vector<double>& ref) {
    if (c.garbage) return;
    double mref = 1e-3, merr = 0; size_t at = 0;
    for (size_t i = 0; i < ref.size(); ++i) mref = std::max(mref, std::fabs(ref[i]));
    for (size_t i = 0; i < ref.size(); ++i) {
      const double g = get(t, got, i);
      const double e = std::isnan(ref[i]) ? (std::isnan(g) ? 0 : INFINITY) : std::isfinite(g) ? std::fabs(g - ref[i]) : INFINITY;
      if (e > merr || !(e <= merr)) { merr = e; at = i; }
    }
    worst_ratio = std::max(worst_ratio, merr / (tol * mref));
    if (!(merr <= tol * mref)) {
      ok = false;
      char buf[256]; snprintf(buf, sizeof buf, " %s err %.3g (max ref %.3g) at %zu got %g ref %g;", name, merr, mref, at, get(t, got, at), ref[at]);
      what += buf;
    }
  };
  compare("out", out.p, c.dt, ro);
  if (!c.garbage) {  // lse: -inf exactly where the reference has it, else close in absolute terms (natural log of sums)
    for (size_t i = 0; i < rows_q; ++i) {
      const double g = static_cast<float*>(lse.p)[i];
      const bool bad = std::isnan(rl[i]) ? !std::isnan(g)
                       : std::isinf(rl[i]) ? !(std::isinf(g) && g < 0) : !(std::fabs(g - rl[i]) <= 1e-4 * (1 + std::fabs(rl[i])));
      if (bad) { ok = false; char buf[128]; snprintf(buf, sizeof buf, " lse[%zu] got %g ref %g;", i, g, rl[i]); what += buf; break; }
    }
  }

  if (c.bwd) {
    BwdParams bp{};
    bp.fwd = p;
    bp.fwd.kv = fw.view(QB, KB);
    Buf dob(out_elems * es), delta(rows_q * 4), gq(q.size() * es), gk(k.size() * es), gv(v.size() * es);
    for (size_t i = 0; i < out_elems; ++i) put(c.dt, dob.p, i, dO[i]);
    bp.grad_out = dob.p;
    bp.do_stride_t = c.Dv; bp.do_stride_h = int64_t(c.Tq) * c.Dv; bp.do_stride_b = int64_t(c.H) * c.Tq * c.Dv;
    bp.delta = static_cast<float*>(delta.p);
    std::vector<float> glse_f(glse.begin(), glse.end());
    bp.grad_lse = c.glse ? glse_f.data() : nullptr;
    bp.grad_q = gq.p; bp.grad_k = gk.p; bp.grad_v = gv.p;
    bp.q = tr.view(KB, QB);
    bwd_mma_ran = c.mma && backward_path(bp) == CudaPath::kMma;
    if (launch_block_sparse_attention_bwd(bp, nullptr) != cudaSuccess) { printf("bwd launch failed\n"); ++failures; return false; }
    const double gtol_mult = 2;  // gradients pass through more roundings (O, dO in the dtype)
    auto cmp2 = [&](const char* n, const void* g, const std::vector<double>& r) {
      if (c.garbage) return;
      double mref = 0.1, merr = 0; size_t at = 0;
      for (double x : r) mref = std::max(mref, std::fabs(x));
      for (size_t i = 0; i < r.size(); ++i) { const double gg = get(c.dt, g, i); const double e = std::isfinite(gg) ? std::fabs(gg - r[i]) : INFINITY; if (!(e <= merr)) { merr = e; at = i; } }
      worst_ratio = std::max(worst_ratio, merr / (gtol_mult * tol * mref));
      if (!(merr <= gtol_mult * tol * mref)) { ok = false; char buf[256]; snprintf(buf, sizeof buf, " %s err %.3g (max ref %.3g) at %zu got %g ref %g;", n, merr, mref, at, get(c.dt, g, at), r[at]); what += buf; }
    };
    cmp2("dq", gq.p, rdq); cmp2("dk", gk.p, rdk); cmp2("dv", gv.p, rdv);
  }
  if (c.garbage) what = " (garbage counts: ran without out-of-bounds access; no comparison)";
  if (!ok || getenv("EMU_VERBOSE")) {
    printf("%s B%d H%d/%d Tq%d Tk%d D%d Dv%d blk %dx%d %s kind%d mask[%d,%d] strided%d invalid%d glse%d %s%s:%s\n", ok ? "ok  " : "FAIL",
           c.B, c.H, c.Hk, c.Tq, c.Tk, c.D, c.Dv, c.bq, c.bkv, dname(c.dt), int(c.kind), Bm, Hm, int(c.strided), int(c.invalid), int(c.glse),
           c.wgmma ? "wgmma" : mma_ran ? "mma" : "simple", c.bwd ? (bwd_mma_ran ? "+bwd(mma)" : "+bwd(simple)") : "", what.c_str());
    fflush(stdout);
  }
  if (!ok) ++failures;
  return ok;
}

// fwd_wgmma_supported: the shapes it leaves to the Ampere kernels.
static void reject_checks() {
  Buf buf(1 << 16);
  const int32_t zero[1] = {0};
  auto base = [&]() {
    FwdParams p{};
    p.q = p.k = p.v = buf.p;
    p.dtype = DType::kF16;
    p.batch = 1; p.heads = 2; p.kv_heads = 1; p.q_len = 64; p.kv_len = 64; p.head_dim = 64; p.v_dim = 64;
    p.q_stride_t = p.k_stride_t = p.v_stride_t = 64;
    p.q_stride_h = p.k_stride_h = p.v_stride_h = 64 * 64;
    p.q_stride_b = p.k_stride_b = p.v_stride_b = 2 * 64 * 64;
    p.scale = 0.125f;
    p.mask = MaskDims{1, 1, 1, 1, 64, 64, 0};
    p.kv = BlockLists{zero, zero, zero, zero, zero, 1, 1};
    p.tiles = zero;
    return p;
  };
  struct { const char* what; bool want; void (*edit)(FwdParams&); } checks[] = {
    {"baseline", true, [](FwdParams&) {}},
    {"fp32", false, [](FwdParams& p) { p.dtype = DType::kF32; }},
    {"D 40", false, [](FwdParams& p) { p.head_dim = p.v_dim = 40; }},
    {"D != Dv", false, [](FwdParams& p) { p.v_dim = 128; }},
    {"block_q 32", false, [](FwdParams& p) { p.mask.block_q = 32; }},
    {"block_kv 16", false, [](FwdParams& p) { p.mask.block_kv = 16; }},
    {"row stride not 16-byte", false, [](FwdParams& p) { p.k_stride_t = 68; }},
    {"q misaligned", false, [](FwdParams& p) { p.q = static_cast<const char*>(p.q) + 8; }},
    {"B, H not mergeable", false, [](FwdParams& p) { p.batch = 2; p.kv_heads = 2; p.v_stride_b = 3 * 64 * 64 + 8; }},
    {"Tk 0", false, [](FwdParams& p) { p.kv_len = 0; }},
  };
  for (const auto& c : checks) {
    FwdParams p = base();
    c.edit(p);
    report(fwd_wgmma_supported(p) == c.want, c.what, "fwd_wgmma_supported");
  }
}

int main(int argc, char** argv) {
  const Sections section(argc, argv, "simple");
  // EMU_QUICK (CI): in "simple", the block-size pairs (bq, bkv) with an even sum of indices (every bq and every
  // bkv, all three dtypes) and no 30 s causal fp32 case (causal masks stay covered by "mma").
  const bool quick = getenv("EMU_QUICK") != nullptr;
  std::vector<Case> cs;
  const DType dts[3] = {DType::kF32, DType::kF16, DType::kBF16};
  if (section("simple")) {
    // Every block-size pair once (random partial/full mask, invalid entries, backward), dtypes rotating.
    const int bs[4] = {16, 32, 64, 128};
    int n = 0;
    for (int bq : bs) for (int bkv : bs) {
      const DType dt = dts[n % 3];
      const int lens[4] = {1, 17, 97, 130};
      if (quick && (n / 4 + n % 4) % 2 == 1) { ++n; continue; }
      cs.push_back({1, 2, 1, lens[(n + 2) % 4] == 1 ? 17 : lens[(n + 2) % 4], lens[(n + 3) % 4], n % 2 ? 40 : 24, n % 2 ? 24 : 40,
                    bq, bkv, dt, kRandom, false, true, n % 3 == 0, true, true, false, 1.5, false, n % 3 == 1});
      ++n;
    }
    if (!quick) cs.push_back({2, 4, 2, 97, 130, 64, 64, 32, 64, DType::kF32, kCausal, true, false, true, false, true, false, 1.0});
    cs.push_back({2, 4, 2, 33, 70, 72, 32, 16, 32, DType::kF16, kEmptyRows, true, true, false, true, true, false, 2.0, false, true});
    cs.push_back({1, 2, 2, 17, 1, 8, 8, 16, 16, DType::kBF16, kDense, false, false, false, false, true, false, 1.0});
    cs.push_back({1, 1, 1, 1, 17, 128, 8, 128, 16, DType::kF32, kRandom, false, false, false, true, true, false, 1.0});
    cs.push_back({1, 2, 1, 20, 40, 16, 16, 16, 32, DType::kF32, kNone, false, false, false, false, true, false, 1.0});
    cs.push_back({1, 1, 1, 40, 50, 256, 256, 32, 32, DType::kF16, kRandom, false, false, true, false, true, false, 1.0});
    cs.push_back({1, 2, 1, 64, 64, 32, 32, 64, 16, DType::kF32, kRandom, false, true, false, false, true, false, 6.0});
  }
  if (section("garbage")) {
    for (const bool mma : {false, true})
      for (const DType dt : {DType::kF16, DType::kBF16, DType::kF32}) {
        if (mma && dt == DType::kF32) continue;
        cs.push_back({1, 2, 1, 40, 70, 40, 24, 16, 32, dt, kRandom, false, true, false, true, true, mma, 1.0, true});
        cs.push_back({1, 2, 2, 70, 40, 64, 64, 32, 16, dt, kRandom, false, true, true, false, true, mma, 1.0, true});
      }
  }
  if (section("mma")) {
    // Tensor-core forward and backward: every block-size pair, head dims across the buckets, fp16 and bf16.
    const int bs[4] = {16, 32, 64, 128};
    const int dims[6][2] = {{64, 64}, {128, 128}, {40, 72}, {72, 40}, {8, 16}, {96, 128}};
    int n = 0;
    for (int bq : bs) for (int bkv : bs) {
      const int* dd = dims[n % 6];
      const int lens[4] = {17, 97, 130, 1};
      cs.push_back({1, 2, 1, lens[n % 3], lens[(n + 1) % 4], dd[0], dd[1], bq, bkv, n % 2 ? DType::kF16 : DType::kBF16,
                    n % 4 == 3 ? kCausal : kRandom, false, true, n % 3 == 0, n % 2 == 0, true, true, 2.0, false, n % 3 == 1});
      ++n;
    }
    cs.push_back({2, 4, 2, 97, 130, 64, 64, 64, 64, DType::kF16, kEmptyRows, true, true, true, true, true, true, 1.0, false, true});
    cs.push_back({1, 2, 1, 130, 97, 128, 128, 128, 128, DType::kBF16, kCausal, false, false, false, false, true, true, 3.0});
    cs.push_back({1, 1, 1, 40, 70, 256, 256, 32, 32, DType::kF16, kRandom, false, false, true, true, true, true, 1.0});
    cs.push_back({1, 1, 1, 40, 70, 160, 200, 64, 32, DType::kBF16, kDense, false, false, false, false, true, true, 1.0});
    cs.push_back({1, 2, 1, 20, 40, 64, 64, 16, 32, DType::kF16, kNone, false, false, false, false, true, true, 1.0});
    cs.push_back({1, 2, 2, 48, 64, 64, 64, 16, 64, DType::kF16, kRandom, false, true, false, false, true, true, 8.0});
  }
  if (section("nan")) {
    // NaN in q, in a key or in a value, CUDA-core and tensor-core forward: NaN rows (columns) exactly where softmax
    // has them; a NaN value of a key hidden inside a listed partial block never reaches the rows that cannot see it.
    for (const int poison : {1, 2, 3})
      for (const bool mma : {false, true})
        for (const MaskKind kind : {kCausal, kRandom, kEmptyRows}) {
          const DType dt = mma ? (kind == kRandom ? DType::kBF16 : DType::kF16) : DType::kF32;
          Case c{1, 2, 1, 70, 70, 32, 32, 16, 32, dt, kind, false, true, false, false, false, mma, 1.0};
          c.poison = poison;
          cs.push_back(c);
        }
  }
  if (section("wgmma")) {
    // The Hopper forward (attention_wgmma.cu: TMA, mbarriers, wgmma) on awkward shapes: Tq / Tk not multiples of the
    // blocks (TMA zero-fill, keys past Tk hidden), partial and full blocks, invalid entries, GQA, D 64 / 128 / 256,
    // block_q 64 (one consumer warpgroup) and 128 (two), block_kv 64 and 128 (two chunks per block), q as a
    // [B, T, H, D] transpose (its (D, H, B * T) tensor map) and k / v with padded rows, fp16 and bf16, empty rows,
    // large scores (online rescaling), NaN in q, k and v (a hidden key's NaN v in a partial block must not leak).
    reject_checks();
    const size_t first = cs.size();
    cs.push_back({1, 2, 1, 97, 130, 64, 64, 64, 64, DType::kF16, kRandom, false, true, false, true, false, false, 2.0});
    cs.push_back({1, 2, 2, 130, 97, 128, 128, 128, 128, DType::kBF16, kCausal, false, false, true, false, false, false, 1.0});
    cs.push_back({2, 4, 2, 70, 100, 64, 64, 128, 64, DType::kF16, kEmptyRows, true, true, true, false, false, false, 1.0});
    cs.push_back({1, 1, 1, 40, 150, 256, 256, 64, 128, DType::kBF16, kRandom, false, false, false, true, false, false, 1.0});
    cs.push_back({1, 1, 1, 65, 64, 256, 256, 128, 64, DType::kF16, kDense, false, false, true, false, false, false, 1.0});
    cs.push_back({1, 2, 1, 20, 40, 64, 64, 64, 64, DType::kF16, kNone, false, false, false, false, false, false, 1.0});
    cs.push_back({1, 2, 2, 128, 200, 128, 128, 64, 128, DType::kBF16, kRandom, false, true, false, false, false, false, 8.0});
    cs.push_back({1, 1, 1, 1, 1, 128, 128, 128, 64, DType::kF16, kDense, false, false, false, false, false, false, 1.0});
    cs.push_back({1, 3, 3, 150, 90, 128, 128, 128, 64, DType::kF16, kRandom, false, true, false, true, false, false, 4.0});
    cs.push_back({1, 2, 1, 90, 190, 64, 64, 128, 128, DType::kBF16, kEmptyRows, false, true, true, false, false, false, 1.0});
    {
      Case c{2, 4, 1, 70, 90, 256, 256, 64, 64, DType::kBF16, kCausal, true, false, true, false, false, false, 1.0};
      c.kv_bthd = true;  // [B, Tk, 1, D]: one key head, so still the (D, T, B Hk) view
      cs.push_back(c);
      Case d{2, 4, 2, 100, 130, 64, 64, 128, 128, DType::kF16, kRandom, false, true, true, true, false, false, 2.0};
      d.kv_bthd = true;  // (D, Hk, B T) maps for k and v: batch 0's last chunk reads batch 1's first keys (hidden)
      cs.push_back(d);
    }
    for (const int poison : {1, 2, 3})
      for (const MaskKind kind : {kCausal, kRandom}) {
        Case c{1, 2, 1, 70, 100, 64, 64, 64, 64, kind == kRandom ? DType::kBF16 : DType::kF16, kind, false, true, false,
               false, false, false, 1.0};
        c.poison = poison;
        cs.push_back(c);
      }
    {
      Case c{1, 2, 1, 100, 250, 128, 128, 128, 128, DType::kF16, kRandom, false, true, false, false, false, false, 1.0};
      c.poison = 3;  // a hidden NaN value in the second chunk of a 128-key block
      cs.push_back(c);
      Case d{1, 2, 1, 70, 130, 256, 256, 64, 64, DType::kBF16, kRandom, false, true, false, false, false, false, 1.0};
      d.poison = 3;  // the same at D = 256 (one product at a time instead of the overlapped pair)
      cs.push_back(d);
    }
    // Counts out of range (clamped): only "no out-of-bounds access" is checked, meaningful under ASan.
    cs.push_back({1, 2, 1, 70, 130, 64, 64, 64, 128, DType::kBF16, kRandom, false, true, false, true, false, false, 1.0, true});
    for (size_t n = first; n < cs.size(); ++n) cs[n].wgmma = true;
  }
  for (const Case& c : cs) {
    const auto t0 = std::chrono::steady_clock::now();
    run_case(c);
    if (getenv("EMU_VERBOSE")) printf("  %.1f s\n", std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return summary(" section %s, worst error / bound %.3f", section.chosen.c_str(), worst_ratio);
}
