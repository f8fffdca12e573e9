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
#include "lowbit_launch.h"

using namespace blockops::lowbit;
using blockops::DType;

static std::mt19937 rng(2121);
static float urand(float a, float b) { return std::uniform_real_distribution<float>(a, b)(rng); }

struct Weight {
  Geometry g;
  std::vector<int> codes;  // [in][out]
  std::vector<int32_t> qweight;
  std::vector<float> s, z;
};

static Weight make_weight(int64_t in, int64_t out, int bits, int gs, bool frac_zero) {
  Weight w;
  w.g = Geometry{in, out, bits, gs};
  w.codes.resize(in * out);
  for (auto& c : w.codes) c = int(rng() % (1u << bits));
  w.qweight.assign(w.g.words() * out, 0);
  const int p = 32 / bits;
  for (int64_t k = 0; k < in; ++k)
    for (int64_t n = 0; n < out; ++n)
      w.qweight[(k / p) * out + n] |= int32_t(uint32_t(w.codes[k * out + n]) << (bits * (k % p)));
  const int64_t G = in / gs;
  w.s.resize(G * out);
  w.z.resize(G * out);
  for (auto& v : w.s) v = urand(0.005f, 0.05f);
  for (auto& v : w.z) v = frac_zero ? urand(0, float((1 << bits) - 1)) : float(rng() % (1u << bits));
  return w;
}

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
  Weight w = make_weight(c.in, c.out, c.bits, c.gs, c.frac_zero);
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

  // fp64 reference; the dequantize path: W_hat_T = T((q - z) * s in fp32), an exact GEMM, y rounded once to T.
  double sum_err = 0, sum_ref = 0, sum_base = 0, worst_vs_base = 0;
  bool finite = true;
  std::vector<double> what(c.in), wref(c.in);
  for (int64_t n = 0; n < c.out; ++n) {
    for (int64_t k = 0; k < c.in; ++k) {
      const int64_t gi = (k / c.gs) * c.out + n;
      const int code = w.codes[k * c.out + n];
      wref[k] = (double(code) - back(z[gi])) * back(s[gi]);
      what[k] = back(cvt<TX>((float(code) - float(back(z[gi]))) * float(back(s[gi]))));
    }
    for (int64_t m = 0; m < c.m; ++m) {
      double ref = c.tb >= 0 ? back(b[n]) : 0, base = ref, mag = 0;
      for (int64_t k = 0; k < c.in; ++k) {
        const double xv = back(x[m * c.in + k]);
        ref += xv * wref[k];
        base += xv * what[k];
        mag += std::fabs(xv * what[k]);
      }
      const double got = back(y[m * c.out + n]);
      finite = finite && std::isfinite(got);
      sum_err += std::fabs(got - ref);
      sum_ref += std::fabs(ref);
      sum_base += std::fabs(back(cvt<TX>(float(base))) - ref);
      // Kernel vs the exact product of the dequantize path's W_hat: y's rounding (<= 1/2 ulp) plus fp32
      // accumulation (<= 2^-20 of the magnitude sum).
      const double ulp =
          std::ldexp(1.0, std::ilogb(std::max(std::fabs(base), 1e-30)) - (dt<TX>() == DType::kF16 ? 10 : 7));
      worst_vs_base = std::max(worst_vs_base, std::fabs(got - base) / (0.5 * ulp + std::ldexp(mag, -20)));
    }
  }
  const double rel = sum_err / sum_ref, rel_base = sum_base / sum_ref;
  const double cap = dt<TX>() == DType::kF16 ? 1e-3 : 8e-3;
  // The kernel's W_hat equals the dequantize path's when s and z are x-dtype values and z is integral.
  const bool same_what = dt<TS>() == dt<TX>() && !c.frac_zero;
  bool ok = finite && rel <= cap && rel <= 2 * rel_base + 1e-7;
  if (same_what) {
    ok = ok && worst_vs_base <= 1.0;
    worst_vs_base_all = std::max(worst_vs_base_all, worst_vs_base);
  }
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
      ++cases;
      const bool got = quant_wgmma_supported(p);
      if (got != want || (!got && launch_quant_wgmma(p, nullptr) != cudaErrorInvalidValue)) {
        ++failures;
        printf("FAIL reject: %s\n", what);
      } else {
        printf("ok   reject: %s -> %s\n", what, got ? "supported" : "refused");
      }
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
