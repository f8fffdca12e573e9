// CPU-emulation test of the tensor-core low-bit kernel (lowbit_mma.cu through gen_emu.py) against an fp64
// reference, and against the dequantize + GEMM path's numerics (W_hat rounded once to x's dtype). The generated
// source is included, not linked, for its internals (tile_k, the emulated fragment maps); the split-K epilogue
// comes from the emulated lowbit.cu, linked in.
#include "lowbit_mma_emu.cpp"
#include "harness.h"
#include "lowbit_check.h"
#include <algorithm>
#include <cstdio>
#include <random>
#include <string>
using namespace blockops::lowbit;
using blockops::DType;  // dtype.h: shared by every kernel family
using blockops::mma::emu_a_coord, blockops::mma::emu_b_coord, blockops::mma::emu_c_coord;  // ptx_emu.h

static std::mt19937 rng(4321);
static float urand(float a, float b) { return std::uniform_real_distribution<float>(a, b)(rng); }

static double worst_rel = 0, worst_ratio = 0;

struct Case { int bits, gs; int64_t m, in, out; bool bias; int splits; bool frac_zero; const char* note; };

template <typename TX, typename TS, typename TB>
static void run_case(const Case& c) {
  ++cases;
  const LowbitWeight w = make_lowbit_weight(rng, c.in, c.out, c.bits, c.gs, c.frac_zero);
  TypedBuf<TS> s(w.s.size()), z(w.z.size());
  for (size_t i = 0; i < w.s.size(); ++i) { s[i] = cvt<TS>(w.s[i]); z[i] = cvt<TS>(w.z[i]); }
  TypedBuf<TX> x(c.m * c.in);
  for (size_t i = 0; i < x.n; ++i) x[i] = cvt<TX>(urand(-1, 1));
  TypedBuf<TB> b(c.out);
  for (size_t i = 0; i < b.n; ++i) b[i] = cvt<TB>(urand(-1, 1));
  TypedBuf<TX> y(c.m * c.out);
  for (size_t i = 0; i < y.n; ++i) y[i] = cvt<TX>(12345.f);
  TypedBuf<float> ws(c.m * c.out);
  for (size_t i = 0; i < ws.n; ++i) ws[i] = 777.f;
  TypedBuf<int32_t> q(w.qweight.size());
  if (!w.qweight.empty()) memcpy(q.p, w.qweight.data(), w.qweight.size() * 4);

  GemvParams p{};
  p.x = x.p; p.x_type = dt<TX>(); p.qweight = q.p; p.scales = s.p; p.zeros = z.p; p.param_type = dt<TS>();
  p.bias = c.bias ? b.p : nullptr; p.bias_type = dt<TB>(); p.y = y.p; p.workspace = ws.p; p.m = c.m; p.g = w.g;
  const int splits = c.splits > 0 ? c.splits : quant_mma_splits(w.g, c.m);
  char cfg[320];
  snprintf(cfg, sizeof cfg, "bits=%d g=%d m=%ld in=%ld out=%ld x=%s s=%s bias=%s splits=%d%s%s", c.bits, c.gs, (long)c.m,
           (long)c.in, (long)c.out, dname(dt<TX>()), dname(dt<TS>()), c.bias ? dname(dt<TB>()) : "none", splits,
           c.frac_zero ? " fracz" : "", c.note);
  if (!quant_mma_supported(p)) { ++failures; printf("FAIL unsupported %s\n", cfg); return; }
  if (launch_quant_mma(p, splits, nullptr) != cudaSuccess) { ++failures; printf("FAIL launch %s\n", cfg); return; }

  const LowbitVerdict v = check_lowbit_output(w, c.m, x, s, z, b, c.bias, y, c.frac_zero);
  const double rel = v.rel, rel_base = v.rel_base, worst_vs_base = v.worst_vs_base;
  const bool ok = v.ok, same_what = v.same_what;
  worst_rel = std::max(worst_rel, rel);
  worst_ratio = std::max(worst_ratio, rel / std::max(rel_base, 1e-12));
  if (!ok) ++failures;
  printf("%s %s rel_mean=%.2e dequant_path=%.2e ratio=%.2f", ok ? "ok  " : "FAIL", cfg, rel, rel_base, rel / std::max(rel_base, 1e-12));
  if (same_what) printf(" vs_dequant_path=%.2f", worst_vs_base);
  printf("\n");
}

template <typename TX, typename TS>
static void run_tb(const Case& c, int tb) {
  if (tb == 0) run_case<TX, TS, float>(c);
  else if (tb == 1) run_case<TX, TS, __half>(c);
  else run_case<TX, TS, __nv_bfloat16>(c);
}
static void run(const Case& c, int tx, int ts, int tb) {
  auto go = [&](auto xtag) {
    using TX = decltype(xtag);
    if (ts == 0) run_tb<TX, __half>(c, tb);
    else if (ts == 1) run_tb<TX, __nv_bfloat16>(c, tb);
    else run_tb<TX, float>(c, tb);
  };
  if (tx == 0) go(__half{}); else go(__nv_bfloat16{});
}


// Self-test of the emulated mma / ldmatrix coordinate maps: every element of A, B, C covered exactly once.
static void check_fragment_maps() {
  int a[16][16] = {}, bm[16][8] = {}, cm[16][8] = {};
  for (int l = 0; l < 32; ++l) {
    for (int i = 0; i < 8; ++i) { int r, c; emu_a_coord(l, i, r, c); ++a[r][c]; }
    for (int i = 0; i < 4; ++i) { int r, c; emu_b_coord(l, i, r, c); ++bm[r][c]; emu_c_coord(l, i, r, c); ++cm[r][c]; }
  }
  for (auto& r : a) for (int v : r) if (v != 1) { printf("A map broken\n"); exit(1); }
  for (auto& r : bm) for (int v : r) if (v != 1) { printf("B map broken\n"); exit(1); }
  for (auto& r : cm) for (int v : r) if (v != 1) { printf("C map broken\n"); exit(1); }
}

int main(int argc, char** argv) {
  check_fragment_maps();
  const Sections section(argc, argv, "all");
  // EMU_QUICK (CI): every 3rd case of the grid; the factors cycle with periods co-prime to 3, so every bits,
  // group size, row count, width and dtype still appears.
  const bool quick = getenv("EMU_QUICK") != nullptr;
  const int bits_list[] = {2, 3, 4};
  const int g_list[] = {32, 64, 128, 48};
  const int64_t m_list[] = {9, 16, 17, 33, 64};
  const int64_t out_list[] = {8, 24, 136, 520};
  int idx = 0;
  if (section("grid")) {
    for (int bits : bits_list) for (int gs : g_list) for (int64_t m : m_list) {
      for (int v = 0; v < 2; ++v, ++idx) {
        // in: a multiple of g that leaves a K tail where the format allows (g = 128 and 4-bit never can), with
        // 3..7 k tiles so both the prologue and the ring wrap-around run.
        const int tk = tile_k(bits);
        const int want_tiles = 3 + (idx % 5);
        int64_t in = std::max<int64_t>(gs, (int64_t(want_tiles) * tk / gs) * gs);
        for (int t = 0; t < 8 && in % tk == 0; ++t) in += gs;
        // The other factors cycle with co-prime periods over the 120 cases, so every pair of their values meets.
        const int out_i = (idx + idx / 8) % 4, tx = (idx / 2 + v) % 2, ts = (idx / 4 + idx) % 3;
        const bool bias = (idx / 3) % 2 == 0;
        const int tb = (idx / 5) % 3;
        Case c{bits, gs, m, in, out_list[out_i], bias, v == 0 ? 1 : 3, (idx / 7) % 3 == 1, ""};
        if (!quick || idx % 3 == 0) run(c, tx, ts, tb);
      }
    }
  }
  if (section("extra")) {
    // Split rule of the launcher (many SMs, narrow layer), more tiles than stages per split, uneven splits.
    emu_sms = 132;
    run(Case{4, 64, 24, 64 * 30, 8, true, 0, false, " rule"}, 0, 0, 1);
    run(Case{2, 128, 40, 128 * 20, 24, false, 0, true, " rule"}, 1, 1, 0);
    run(Case{3, 32, 12, 32 * 45, 16, true, 0, false, " rule"}, 1, 2, 2);
    emu_sms = 4;
    run(Case{4, 32, 64, 32 * 29, 264, true, 2, false, " 15 tiles / 2"}, 0, 2, 0);
    run(Case{2, 48, 10, 48 * 13, 128, true, 4, true, " 5 tiles / 4"}, 1, 0, 1);
    run(Case{3, 16, 64, 16 * 37, 40, true, 5, false, " g=16"}, 0, 1, 2);
    run(Case{4, 16, 48, 16 * 11, 200, false, 1, true, " g=16"}, 1, 2, 0);
    run(Case{2, 16, 56, 16 * 9, 8, true, 1, false, " g=16 1 tile"}, 0, 0, 0);
    run(Case{3, 160, 20, 160 * 3, 520, true, 2, false, " g=160"}, 1, 0, 1);
    run(Case{4, 64, 17, 0, 24, true, 1, false, " in=0: y = bias"}, 0, 0, 2);
    run(Case{2, 32, 33, 0, 8, true, 3, false, " in=0, splits asked"}, 1, 1, 0);
  }
  if (section("reject")) {
    // quant_mma_supported / launch_quant_mma refuse what the kernel does not take (the glue then falls back).
    const LowbitWeight w = make_lowbit_weight(rng, 256, 64, 4, 64, false);
    TypedBuf<__half> s(w.s.size()), z(w.z.size()), x(65 * 256 + 8), y(65 * 64);
    TypedBuf<float> xf(65 * 256);
    TypedBuf<int32_t> q(w.qweight.size() + 4);
    GemvParams p{};
    p.x = x.p; p.x_type = DType::kF16; p.qweight = q.p; p.scales = s.p; p.zeros = z.p; p.param_type = DType::kF16;
    p.y = y.p; p.m = 16; p.g = w.g;
    auto expect = [&](bool want, const char* what) {
      expect_support(want, quant_mma_supported(p), [&] { return launch_quant_mma(p, 1, nullptr); }, what);
    };
    expect(true, "m=16 baseline");
    p.m = 8; expect(false, "m=8 (GEMV's)"); p.m = 65; expect(false, "m=65"); p.m = 64; expect(true, "m=64"); p.m = 16;
    p.g.out = 60; expect(false, "out=60 (not a multiple of 8)"); p.g.out = 64;
    p.x = x.p + 1; expect(false, "x not 16-byte aligned"); p.x = x.p;
    p.qweight = q.p + 1; expect(false, "qweight not 16-byte aligned"); p.qweight = q.p;
    p.scales = s.p + 1; expect(false, "scales not 16-byte aligned"); p.scales = s.p;
    p.x = xf.p; p.x_type = DType::kF32; expect(false, "fp32 x"); p.x = x.p; p.x_type = DType::kF16;
    p.g.group_size = 24; expect(false, "g=24"); p.g.group_size = 64;
    p.g.bits = 5; expect(false, "bits=5"); p.g.bits = 4;
    p.g.bits = 2; p.g.in = 128 * 40; p.m = 64;
    emu_smem_optin = 48 * 1024; expect(false, "smem over the device opt-in (2-bit, 64 rows, 48 KiB device)");
    emu_smem_optin = 227 * 1024; expect(true, "same on a 227 KiB device");
  }
  return summary(" worst rel_mean %.2e worst ratio to dequant path %.2f cp.async left at exit %ld", worst_rel,
                 worst_ratio, emu_cp_left_at_exit.load());
}
