// What the tensor-core low-bit harnesses (test_lowbit_mma.cpp, test_lowbit_wgmma.cpp) share: a random packed weight
// and the check of a kernel's output against an fp64 reference and against the numerics of the path the kernels
// replace (dequantize: W_hat rounded once to x's dtype, then an fp32-accumulating GEMM, y rounded once).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "harness.h"
#include "lowbit.h"

struct LowbitWeight {
  blockops::lowbit::Geometry g;
  std::vector<int> codes;  // [in][out]
  std::vector<int32_t> qweight;
  std::vector<float> s, z;
};

// Codes uniform over [0, 2^bits), scales in [0.005, 0.05], zeros integral or (frac_zero) fractional.
inline LowbitWeight make_lowbit_weight(std::mt19937& rng, int64_t in, int64_t out, int bits, int gs, bool frac_zero) {
  auto urand = [&](float a, float b) { return std::uniform_real_distribution<float>(a, b)(rng); };
  LowbitWeight w;
  w.g = blockops::lowbit::Geometry{in, out, bits, gs};
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

struct LowbitVerdict {
  bool ok;
  double rel;            // mean |y - ref| / mean |ref| against the fp64 reference
  double rel_base;       // the same for the dequantize path's result
  bool same_what;        // the kernel's W_hat equals the dequantize path's (s, z of x's dtype, integral z)
  double worst_vs_base;  // where same_what: worst |y - base| in units of y's rounding + fp32 accumulation
};

// y [m, out] of a kernel for x [m, in], scales / zeros s, z [groups, out] in TS, bias b [out] in TB (bias: used).
template <typename TX, typename TS, typename TB>
LowbitVerdict check_lowbit_output(const LowbitWeight& w, int64_t m, const TypedBuf<TX>& x, const TypedBuf<TS>& s,
                                  const TypedBuf<TS>& z, const TypedBuf<TB>& b, bool bias, const TypedBuf<TX>& y,
                                  bool frac_zero) {
  const int64_t in = w.g.in, out = w.g.out, gs = w.g.group_size;
  double sum_err = 0, sum_ref = 0, sum_base = 0, worst_vs_base = 0;
  bool finite = true;
  std::vector<double> what(in), wref(in);
  for (int64_t n = 0; n < out; ++n) {
    for (int64_t k = 0; k < in; ++k) {
      const int64_t gi = (k / gs) * out + n;
      const int code = w.codes[k * out + n];
      wref[k] = (double(code) - back(z[gi])) * back(s[gi]);
      what[k] = back(cvt<TX>((float(code) - float(back(z[gi]))) * float(back(s[gi]))));
    }
    for (int64_t r = 0; r < m; ++r) {
      double ref = bias ? back(b[n]) : 0, base = ref, mag = 0;
      for (int64_t k = 0; k < in; ++k) {
        const double xv = back(x[r * in + k]);
        ref += xv * wref[k];
        base += xv * what[k];
        mag += std::fabs(xv * what[k]);
      }
      const double got = back(y[r * out + n]);
      finite = finite && std::isfinite(got);
      sum_err += std::fabs(got - ref);
      sum_ref += std::fabs(ref);
      sum_base += std::fabs(back(cvt<TX>(float(base))) - ref);
      // Kernel vs the exact product of the dequantize path's W_hat: y's rounding (<= 1/2 ulp) plus fp32
      // accumulation (<= 2^-20 of the magnitude sum, generous for 16-term fp32 mma steps).
      const double ulp = std::ldexp(
          1.0, std::ilogb(std::max(std::fabs(base), 1e-30)) - (dt<TX>() == blockops::DType::kF16 ? 10 : 7));
      worst_vs_base = std::max(worst_vs_base, std::fabs(got - base) / (0.5 * ulp + std::ldexp(mag, -20)));
    }
  }
  LowbitVerdict v{};
  v.rel = sum_err / sum_ref;
  v.rel_base = sum_base / sum_ref;
  const double cap = dt<TX>() == blockops::DType::kF16 ? 1e-3 : 8e-3;  // relative mean error bound
  v.same_what = dt<TS>() == dt<TX>() && !frac_zero;
  v.worst_vs_base = worst_vs_base;
  v.ok = finite && v.rel <= cap && v.rel <= 2 * v.rel_base + 1e-7 && (!v.same_what || worst_vs_base <= 1.0);
  return v;
}

// One case of a `reject` section: the kernel's support verdict `supported` against `want`; where it refuses, its
// launcher (`launch`, called only then) must refuse too, with cudaErrorInvalidValue.
template <typename Launch>
void expect_support(bool want, bool supported, Launch launch, const char* what) {
  ++cases;
  if (supported != want || (!supported && launch() != cudaErrorInvalidValue)) {
    ++failures;
    printf("FAIL reject: %s\n", what);
  } else {
    printf("ok   reject: %s -> %s\n", what, supported ? "supported" : "refused");
  }
}
