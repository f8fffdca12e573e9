// CPU-emulation test of the low-bit CUDA-core kernels (lowbit.cu through gen_emu.py): the fused GEMV (split-K,
// awkward shapes, misaligned qweight, dtype mixes), dequantize and the scales' gradient, against fp64 references.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "harness.h"
#include "lowbit_launch.h"
using namespace blockops::lowbit;
using blockops::DType;  // dtype.h: shared by every kernel family

static std::mt19937 rng(1234);
static float urand(float a, float b) { return std::uniform_real_distribution<float>(a, b)(rng); }

struct Weight {
  Geometry g; std::vector<int> codes;  // [in, out]
  std::vector<int32_t> qweight; std::vector<float> s, z;
};
static Weight make_weight(int64_t in, int64_t out, int bits, int gs, bool frac_zero) {
  Weight w; w.g = Geometry{in, out, bits, gs};
  w.codes.resize(in * out);
  for (auto& c : w.codes) c = rng() % (1 << bits);
  w.qweight.assign(w.g.words() * out, 0);
  int p = 32 / bits;
  for (int64_t k = 0; k < in; ++k) for (int64_t n = 0; n < out; ++n)
    w.qweight[(k / p) * out + n] |= int32_t(uint32_t(w.codes[k * out + n]) << (bits * (k % p)));
  int64_t G = in / gs;
  w.s.resize(G * out); w.z.resize(G * out);
  for (auto& v : w.s) v = urand(0.01f, 0.1f);
  for (auto& v : w.z) v = frac_zero ? urand(0, (1 << bits) - 1) : float(rng() % (1 << bits));
  return w;
}

template <typename TX, typename TS, typename TB>
static void test_gemv(int64_t m, int64_t in, int64_t out, int bits, int gs, bool bias, int sms, bool misalign) {
  emu_sms = sms;
  Weight w = make_weight(in, out, bits, gs, true);
  std::vector<TS> s(w.s.size()), z(w.z.size());
  for (size_t i = 0; i < s.size(); ++i) { s[i] = cvt<TS>(w.s[i]); z[i] = cvt<TS>(w.z[i]); }
  std::vector<TX> x(m * in);
  for (auto& v : x) v = cvt<TX>(urand(-1, 1));
  std::vector<TB> b(out);
  for (auto& v : b) v = cvt<TB>(urand(-1, 1));
  std::vector<TX> y(m * out, cvt<TX>(12345.f));
  std::vector<float> ws(m * out, 777.f);
  std::vector<int32_t> qbuf(w.qweight.size() + 1);
  int32_t* qp = qbuf.data() + (misalign ? 1 : 0);
  if (!misalign && reinterpret_cast<uintptr_t>(qp) % 16) { printf("host alloc misaligned\n"); }
  memcpy(qp, w.qweight.data(), w.qweight.size() * 4);
  GemvParams p{};
  p.x = x.data(); p.x_type = dt<TX>(); p.qweight = qp; p.scales = s.data(); p.zeros = z.data(); p.param_type = dt<TS>();
  p.bias = bias ? b.data() : nullptr; p.bias_type = dt<TB>(); p.y = y.data(); p.workspace = ws.data(); p.m = m; p.g = w.g;
  int splits = quant_gemv_splits(w.g, m);
  if (launch_quant_gemv(p, splits, nullptr) != cudaSuccess) { ++failures; printf("launch failed\n"); return; }
  double maxerr = 0, maxref = 0;
  for (int64_t i = 0; i < m; ++i) for (int64_t n = 0; n < out; ++n) {
    double acc = bias ? back(b[n]) : 0;
    for (int64_t k = 0; k < in; ++k) {
      int64_t gi = (k / gs) * out + n;
      acc += double(back(x[i * in + k])) * (double(w.codes[k * out + n]) - back(z[gi])) * back(s[gi]);
    }
    maxerr = std::max(maxerr, std::abs(acc - back(y[i * out + n])));
    maxref = std::max(maxref, std::abs(acc));
  }
  char cfg[256];
  snprintf(cfg, sizeof cfg, "m=%ld in=%ld out=%ld bits=%d g=%d bias=%d sms=%d splits=%d mis=%d tx=%d ts=%d", (long)m, (long)in,
           (long)out, bits, gs, bias, sms, splits, misalign, int(dt<TX>()), int(dt<TS>()));
  double tol = (dt<TX>() == DType::kF32 ? 1e-5 : dt<TX>() == DType::kF16 ? 2e-3 : 1.6e-2) * (maxref + 1);
  report("gemv", maxerr, tol, cfg);
  printf("ok? %s maxerr=%.3g maxref=%.3g\n", cfg, maxerr, maxref);
}

template <typename TS, typename TO>
static void test_dequant(int64_t in, int64_t out, int bits, int gs) {
  Weight w = make_weight(in, out, bits, gs, true);
  std::vector<TS> s(w.s.size()), z(w.z.size());
  for (size_t i = 0; i < s.size(); ++i) { s[i] = cvt<TS>(w.s[i]); z[i] = cvt<TS>(w.z[i]); }
  std::vector<TO> o(in * out, cvt<TO>(999.f));
  launch_quant_dequantize(w.qweight.data(), s.data(), z.data(), dt<TS>(), o.data(), dt<TO>(), w.g, nullptr);
  double maxerr = 0;
  for (int64_t n = 0; n < out; ++n) for (int64_t k = 0; k < in; ++k) {
    int64_t gi = (k / gs) * out + n;
    float ref = back(cvt<TO>((float(w.codes[k * out + n]) - back(z[gi])) * back(s[gi])));
    maxerr = std::max(maxerr, double(std::abs(ref - back(o[n * in + k]))));
  }
  char cfg[128]; snprintf(cfg, sizeof cfg, "in=%ld out=%ld bits=%d g=%d", (long)in, (long)out, bits, gs);
  report("dequant", maxerr, 0, cfg);
}

template <typename TZ>
static void test_grad(int64_t in, int64_t out, int bits, int gs) {
  Weight w = make_weight(in, out, bits, gs, true);
  std::vector<TZ> z(w.z.size());
  for (size_t i = 0; i < z.size(); ++i) z[i] = cvt<TZ>(w.z[i]);
  std::vector<float> t(out * in);
  for (auto& v : t) v = urand(-1, 1);
  std::vector<float> gr(in / gs * out, 999.f);
  launch_quant_grad_scales(t.data(), w.qweight.data(), z.data(), dt<TZ>(), gr.data(), w.g, nullptr);
  double maxerr = 0;
  for (int64_t G = 0; G < in / gs; ++G) for (int64_t n = 0; n < out; ++n) {
    double acc = 0;
    for (int64_t k = G * gs; k < (G + 1) * gs; ++k) acc += (w.codes[k * out + n] - double(back(z[G * out + n]))) * t[n * in + k];
    maxerr = std::max(maxerr, std::abs(acc - gr[G * out + n]));
  }
  char cfg[128]; snprintf(cfg, sizeof cfg, "in=%ld out=%ld bits=%d g=%d", (long)in, (long)out, bits, gs);
  report("grad_scales", maxerr, 1e-3, cfg);
}

int main() {
  // EMU_QUICK (CI): every 5th case of the shape grid (5 is co-prime with the 4 widths and the 3 row counts, so
  // every pair still meets) and only m = 2 of the split-K cases; the rest runs in full.
  const bool quick = getenv("EMU_QUICK") != nullptr;
  // GEMV: awkward shapes, 3-bit groups that straddle words, padding, split-K, scalar fallback.
  int n = 0;
  for (int bits : {2, 3, 4}) {
    for (int gs : {16, 48, 128}) {
      for (int64_t in : {int64_t(gs), int64_t(gs * 3), int64_t(gs * 17)}) {
        for (int64_t out : {4, 12, 7, 520}) {
          for (int64_t m : {1, 3, 8}) {
            if (!quick || n++ % 5 == 0) test_gemv<float, float, float>(m, in, out, bits, gs, m != 3, 4, false);
          }
        }
      }
    }
  }
  for (int bits : {2, 3, 4}) for (int gs : {16, 48, 128}) for (int64_t m : {2, 4, 6}) {
    if (quick && m != 2) continue;
    test_gemv<float, float, float>(m, gs * 23, 600, bits, gs, true, 1, false);   // splits == 1, several x tiles
    test_gemv<__half, float, float>(m, gs * 23, 37, bits, gs, true, 1, false);   // split-K, several tiles per split
  }
  // Split-K heavy (many SMs), misaligned qweight, dtype mix.
  test_gemv<float, float, float>(2, 128 * 40, 12, 3, 128, true, 132, false);
  test_gemv<float, float, float>(5, 64 * 50, 8, 2, 64, true, 132, true);
  test_gemv<__half, __nv_bfloat16, float>(4, 48 * 30, 20, 3, 48, true, 64, false);
  test_gemv<__nv_bfloat16, __half, __half>(7, 16 * 70, 9, 4, 16, true, 64, false);
  test_gemv<__half, __half, __half>(1, 128 * 12, 1030, 4, 128, true, 8, false);
  test_gemv<float, float, float>(8, 32 * 80, 513, 3, 32, true, 2, false);
  test_gemv<float, float, float>(1, 160 * 20, 64, 3, 160, false, 132, false);
  for (int bits : {2, 3, 4}) for (int gs : {16, 48, 128}) {
    test_dequant<float, float>(gs * 5, 13, bits, gs);
    test_dequant<__half, __nv_bfloat16>(gs * 3, 8, bits, gs);
    test_dequant<__nv_bfloat16, __half>(gs * 2, 3, bits, gs);
    test_grad<float>(gs * 5, 13, bits, gs);
    test_grad<__half>(gs * 3, 40, bits, gs);
  }
  return summary();
}
