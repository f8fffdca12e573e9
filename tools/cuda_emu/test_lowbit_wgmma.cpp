// CPU-emulation test of the Hopper low-bit prefill GEMM (lowbit_wgmma.cu through gen_emu.py, wgmma / TMA / mbarrier
// from hopper_emu.h) against an fp64 reference and against the numerics of the path it replaces (dequantize: W_hat
// rounded once to x's dtype, then an fp32-accumulating GEMM). Awkward shapes: m not a multiple of the token tile
// (65, 100, 257, both tiles 64 and 128 through the SM count the launcher sees), out not a multiple of 128 or 64,
// in with several groups and a K tail (in % 64 != 0), groups 16 / 48 / 64 / 128, 2 / 3 / 4 bits, fp16 and bf16 x,
// fp16 / bf16 / fp32 scales, bias of each dtype or none, integral and fractional zeros.
// Sections: `grid` (the cases), `reject` (what quant_wgmma_supported refuses); none: all.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "harness.h"
#include "lowbit_check.h"
#include "lowbit_launch.h"

using namespace blockops::lowbit;
using blockops::DType;

static std::mt19937 rng(2121);
static float urand(float a, float b) { return std::uniform_real_distribution<float>(a, b)(rng); }

struct Case {
  int bits, gs;
  int64_t m, in, out;
  int tx, ts, tb;  // x: 0 f16, 1 bf16; scales: 0 f16, 1 bf16, 2 f32; bias: -1 none, 0 f32, 1 f16, 2 bf16
  bool frac_zero;
  int sms;         // SM count the launcher sees (picks the 64-, 128- or 256-token tile)
};

static double worst_rel = 0, worst_vs_base_all = 0;

template <typename TX, typename TS, typename TB>
static void run_case(const Case& c) {
  ++cases;
  emu_sms = c.sms;
  const LowbitWeight w = make_lowbit_weight(rng, c.in, c.out, c.bits, c.gs, c.frac_zero);
  TypedBuf<TS> s(w.s.size()), z(w.z.size());
  for (size_t i = 0; i < w.s.size(); ++i) {
    s[i] = cvt<TS>(w.s[i]);
    z[i] = cvt<TS>(w.z[i]);
  }
  TypedBuf<TX> x(c.m * c.in);
  for (size_t i = 0; i < x.n; ++i) x[i] = cvt<TX>(urand(-1, 1));
  TypedBuf<TB> b(c.out);
  for (size_t i = 0; i < b.n; ++i) b[i] = cvt<TB>(urand(-1, 1));
  TypedBuf<TX> y(c.m * c.out);
  for (size_t i = 0; i < y.n; ++i) y[i] = cvt<TX>(12345.f);
  TypedBuf<int32_t> q(w.qweight.size());
  memcpy(q.p, w.qweight.data(), w.qweight.size() * 4);

  GemvParams p{};
  p.x = x.p;
  p.x_type = dt<TX>();
  p.qweight = q.p;
  p.scales = s.p;
  p.zeros = z.p;
  p.param_type = dt<TS>();
  p.bias = c.tb >= 0 ? b.p : nullptr;
  p.bias_type = dt<TB>();
  p.y = y.p;
  p.workspace = nullptr;
  p.m = c.m;
  p.g = w.g;
  // The token tile the launcher picks (tokens_per_block): the widest that still gives every SM a block.
  const int64_t col_blocks = (c.out + 127) / 128;
  const int tile = (c.m + 255) / 256 * col_blocks >= c.sms ? 256 : (c.m + 127) / 128 * col_blocks >= c.sms ? 128 : 64;
  char cfg[320];
  snprintf(cfg, sizeof cfg, "bits=%d g=%d m=%ld in=%ld out=%ld x=%s s=%s bias=%s tile=%d%s", c.bits, c.gs, (long)c.m,
           (long)c.in, (long)c.out, dname(dt<TX>()), dname(dt<TS>()), c.tb >= 0 ? dname(dt<TB>()) : "none",
           tile, c.frac_zero ? " fracz" : "");
  if (!quant_wgmma_supported(p)) {
    ++failures;
    printf("FAIL unsupported %s\n", cfg);
    return;
  }
  if (launch_quant_wgmma(p, nullptr) != cudaSuccess) {
    ++failures;
    printf("FAIL launch %s\n", cfg);
    return;
  }

  const LowbitVerdict v = check_lowbit_output(w, c.m, x, s, z, b, c.tb >= 0, y, c.frac_zero);
  const double rel = v.rel, rel_base = v.rel_base, worst_vs_base = v.worst_vs_base;
  const bool ok = v.ok, same_what = v.same_what;
  if (same_what) worst_vs_base_all = std::max(worst_vs_base_all, worst_vs_base);
  worst_rel = std::max(worst_rel, rel);
  if (!ok) ++failures;
  printf("%s %s rel_mean=%.2e dequant_path=%.2e", ok ? "ok  " : "FAIL", cfg, rel, rel_base);
  if (same_what) printf(" vs_dequant_path=%.2f", worst_vs_base);
  printf("\n");
  fflush(stdout);
}

template <typename TX, typename TS>
static void run_tb(const Case& c) {
  if (c.tb == 1) run_case<TX, TS, __half>(c);
  else if (c.tb == 2) run_case<TX, TS, __nv_bfloat16>(c);
  else run_case<TX, TS, float>(c);  // tb 0, or -1 (no bias)
}
static void run(const Case& c) {
  auto go = [&](auto xtag) {
    using TX = decltype(xtag);
    if (c.ts == 0) run_tb<TX, __half>(c);
    else if (c.ts == 1) run_tb<TX, __nv_bfloat16>(c);
    else run_tb<TX, float>(c);
  };
  if (c.tx == 0) go(__half{});
  else go(__nv_bfloat16{});
}

int main(int argc, char** argv) {
  const Sections section(argc, argv, "all");
  const bool quick = getenv("EMU_QUICK") != nullptr;
  if (section("grid")) {
    // {bits, g, m, in, out, x, scales, bias, fracz, sms}. Every bit width meets fp16 and bf16 x, the 64-, 128- and
    // 256-token tiles, a K tail and several groups per tile (g = 16, 48) or several tiles per group (g = 128).
    const Case list[] = {
        {4, 64, 65, 320, 200, 0, 0, -1, false, 132},   // tile 64, 5 k tiles (4 slabs of words per tile)
        {4, 128, 100, 384, 72, 1, 1, 2, false, 1},     // tile 256, out < 128, bf16
        {4, 16, 257, 80, 136, 0, 2, 0, true, 5},       // tile 128; g 16: 4 groups a tile; K tail 80; fp32 scales
        {3, 64, 65, 320, 200, 1, 1, 0, true, 132},     // 3-bit: words straddle tiles (k0 % 10 = 0, 4, 8, 2, 6)
        {3, 48, 100, 336, 136, 0, 0, 1, false, 2},     // tile 256; g 48 (straddles tiles), K tail 336 = 5 * 64 + 16
        {3, 128, 257, 256, 72, 0, 2, -1, false, 3},    // 3 token tiles of 128 (m tail 1)
        {2, 64, 65, 192, 200, 0, 0, 1, false, 1},      // 2-bit, tile 256 with 65 rows
        {2, 16, 100, 144, 72, 1, 0, 2, true, 132},     // 2-bit g 16, K tail, bf16 x with fp16 scales
        {2, 128, 257, 256, 136, 1, 1, -1, false, 5},   // 2-bit bf16, tile 128, 3 token tiles
        {4, 48, 129, 96, 64, 1, 2, 1, false, 132},     // in 96 (one and a half tiles), out = one consumer's 64
        {3, 16, 70, 64, 8, 0, 0, 0, false, 132},       // out 8: the second consumer and most of the first see zeros
        {2, 32, 65, 32, 128, 0, 1, -1, true, 1},       // in 32 < one tile, fp16 x with bf16 fractional zeros
    };
    const Case extra[] = {
        {4, 64, 200, 512, 264, 0, 0, 0, false, 132},
        {3, 32, 130, 320, 136, 1, 1, 2, false, 132},
        {2, 48, 300, 240, 200, 0, 2, 1, true, 3},
        {4, 16, 65, 48, 72, 1, 0, -1, true, 132},
        {3, 64, 66, 640, 72, 0, 1, 0, true, 1},
    };
    for (const Case& c : list) run(c);
    if (!quick)
      for (const Case& c : extra) run(c);
  }
  if (section("reject")) {
    TypedBuf<__half> x(64 * 256), s(4 * 64), z(4 * 64);
    TypedBuf<float> xf(64 * 256);
    TypedBuf<int32_t> q(32 * 64);
    GemvParams p{};
    p.x = x.p; p.x_type = DType::kF16; p.qweight = q.p; p.scales = s.p; p.zeros = z.p; p.param_type = DType::kF16;
    p.y = nullptr; p.m = 65; p.g = Geometry{256, 64, 4, 64};
    auto expect = [&](bool want, const char* what) {
      expect_support(want, quant_wgmma_supported(p), [&] { return launch_quant_wgmma(p, nullptr); }, what);
    };
    expect(true, "m=65 baseline");
    p.m = 64; expect(false, "m=64 (the mma kernel's)"); p.m = 1 << 20; expect(true, "m=2^20"); p.m = 65;
    p.g.out = 60; expect(false, "out=60 (not a multiple of 8)"); p.g.out = 64;
    p.x = x.p + 1; expect(false, "x not 16-byte aligned"); p.x = x.p;
    p.qweight = q.p + 1; expect(false, "qweight not 16-byte aligned"); p.qweight = q.p;
    p.zeros = z.p + 1; expect(false, "zeros not 16-byte aligned"); p.zeros = z.p;
    p.x = xf.p; p.x_type = DType::kF32; expect(false, "fp32 x"); p.x = x.p; p.x_type = DType::kF16;
    p.g.group_size = 24; expect(false, "g=24"); p.g.group_size = 64;
    p.g.bits = 5; expect(false, "bits=5"); p.g.bits = 4;
    emu_smem_optin = 48 * 1024; expect(false, "smem over the device opt-in (48 KiB device)");
    emu_smem_optin = 227 * 1024; expect(true, "same on a 227 KiB device");
  }
  return summary(" worst rel_mean %.2e worst vs dequant path %.2f", worst_rel, worst_vs_base_all);
}
