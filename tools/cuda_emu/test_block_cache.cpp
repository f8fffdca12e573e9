// CPU-emulation test of the block_cache CUDA kernels (block_cache.cu through gen_emu.py): the relative L1 indicator
// in its three modes (plain, + residual, comparing the residual) on awkward shapes, strides, per-sample and batch
// reductions, every dtype; run-to-run bit identity; apply_residual; cache_update with every gate dtype and value.
// References in fp64 (the indicator) or exact (residual, sum, copy).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "block_cache_launch.h"
#include "harness.h"
using namespace blockops::block_cache;
using blockops::DType;

static std::mt19937 rng(4321);
static float urand(float a, float b) { return std::uniform_real_distribution<float>(a, b)(rng); }

template <typename T>
static std::vector<T> random_tensor(int64_t n) {
  std::vector<T> v(n);
  for (auto& x : v) x = cvt<T>(urand(-2, 2));
  return v;
}

enum Mode { kPlain, kResidual, kCompareResidual };

template <typename T>
static void test_indicator(int64_t B, int64_t T_, int64_t C, int64_t stride, bool per_sample, Mode mode) {
  const int64_t n = B * T_ * C;
  const Geometry g{B, T_, C, clamp_stride(T_, stride)};  // as check_indicator_args builds it
  auto out = random_tensor<T>(n), in = random_tensor<T>(n), ref = random_tensor<T>(n);
  std::vector<T> residual(n, cvt<T>(777.f));
  std::vector<Partial> partials(partials_count(g) + 1, Partial{-1.f, -1.f});
  const int64_t outputs = per_sample ? B : 1;
  std::vector<float> ind(outputs, -5.f), again(outputs, -6.f);
  IndicatorParams p{out.data(), mode == kPlain ? nullptr : in.data(), ref.data(),
                    mode == kPlain ? nullptr : residual.data(), dt<T>(), g, per_sample, mode == kCompareResidual,
                    partials.data(), ind.data()};
  char cfg[160];
  snprintf(cfg, sizeof cfg, "B=%ld T=%ld C=%ld stride=%ld per_sample=%d mode=%d dtype=%d chunks=%ld", (long)B,
           (long)T_, (long)C, (long)stride, per_sample, int(mode), int(dt<T>()), (long)g.chunks());
  if (launch_indicator(p, nullptr) != cudaSuccess) { report(false, "launch", cfg); return; }
  // fp64 reference of the same definition.
  std::vector<double> num(B, 0.0), den(B, 0.0);
  bool residual_ok = true;
  for (int64_t b = 0; b < B; ++b) for (int64_t t = 0; t < T_; ++t) for (int64_t c = 0; c < C; ++c) {
    const int64_t i = (b * T_ + t) * C + c;
    float x = back(out[i]);
    if (mode != kPlain) {
      const float d = back(out[i]) - back(in[i]);
      residual_ok &= back(residual[i]) == back(cvt<T>(d));
      if (mode == kCompareResidual) x = d;
    }
    if (t % stride != 0) continue;
    num[b] += std::fabs(double(x) - double(back(ref[i])));
    den[b] += std::fabs(double(back(ref[i])));
  }
  if (mode != kPlain) report(residual_ok, "residual", cfg);
  bool ok = true;
  for (int64_t o = 0; o < outputs; ++o) {
    double nn = 0, dd = 0;
    for (int64_t b = per_sample ? o : 0; b < (per_sample ? o + 1 : B); ++b) nn += num[b], dd += den[b];
    const double want = nn == 0 && dd == 0 ? 0.0 : nn / dd;
    ok &= std::fabs(ind[o] - want) <= 2e-6 * std::fabs(want) + 1e-30;
    if (std::fabs(ind[o] - want) > 2e-6 * std::fabs(want) + 1e-30) printf("  o=%ld got %.9g want %.9g\n", (long)o, ind[o], want);
  }
  report(ok, "indicator", cfg);
  // Run-to-run bit identity (a fixed reduction order, no atomics).
  p.indicator = again.data();
  launch_indicator(p, nullptr);
  report(outputs == 0 || memcmp(ind.data(), again.data(), outputs * sizeof(float)) == 0, "deterministic", cfg);
}

template <typename T>
static void test_apply(int64_t n) {
  auto in = random_tensor<T>(n), res = random_tensor<T>(n);
  std::vector<T> out(n, cvt<T>(5.f));
  launch_apply_residual(in.data(), res.data(), out.data(), dt<T>(), n, nullptr);
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) ok &= back(out[i]) == back(cvt<T>(back(in[i]) + back(res[i])));
  char cfg[64]; snprintf(cfg, sizeof cfg, "n=%ld dtype=%d", (long)n, int(dt<T>()));
  report(ok, "apply_residual", cfg);
}

template <typename G>
static void test_update(G gate_value, GateType type, bool use_gate, bool expect_copy) {
  const int64_t n = 3001;
  auto value = random_tensor<__half>(n);
  std::vector<__half> cache(n, cvt<__half>(9.f));
  G gate = gate_value;
  launch_cache_update(cache.data(), value.data(), n * 2, use_gate ? &gate : nullptr, type, nullptr);
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) ok &= back(cache[i]) == (expect_copy ? back(value[i]) : 9.f);
  char cfg[64]; snprintf(cfg, sizeof cfg, "gate type=%d use=%d expect=%d", int(type), use_gate, expect_copy);
  report(ok, "cache_update", cfg);
}

template <typename T>
static void indicator_grid(bool quick) {
  // (B, T, C): one element; a 16-lane tail; several chunks per sample (chunk_tokens(72) = 227, (1152) = 14).
  const int64_t shapes[][3] = {{1, 1, 1}, {3, 37, 19}, {2, 97, 40}, {2, 300, 72}, {1, 40, 1152}};
  int k = 0;
  for (auto& s : shapes) for (int64_t stride : {1, 3}) for (bool per_sample : {false, true})
    for (Mode mode : {kPlain, kResidual, kCompareResidual}) {
      if (quick && k++ % 3 != 0) continue;  // every third case: 3 is co-prime with the 2 x 2 inner choices' cycle
      test_indicator<T>(s[0], s[1], s[2], stride, per_sample, mode);
    }
}

int main() {
  const bool quick = getenv("EMU_QUICK") != nullptr;
  indicator_grid<float>(quick);
  indicator_grid<__half>(quick);
  indicator_grid<__nv_bfloat16>(quick);
  test_indicator<float>(2, 1000, 40, 7, true, kCompareResidual);   // many chunks, stride 7, both kinds of token
  test_indicator<__nv_bfloat16>(0, 5, 8, 1, true, kPlain);          // empty batch: no launch of pass 1
  // Strides >= T (token 0 only), up to ones whose unclamped chunk size overflowed int64 (issue 17).
  for (int64_t stride : {int64_t{37}, int64_t{1} << 49, int64_t{1} << 50, INT64_MAX}) {
    test_indicator<float>(2, 37, 19, stride, true, kPlain);
    test_indicator<__half>(2, 37, 19, stride, false, kCompareResidual);
  }
  for (int64_t n : {1, 7, 8, 1025, 300000}) {
    test_apply<float>(n);
    test_apply<__half>(n);
    test_apply<__nv_bfloat16>(n);
  }
  test_update<uint8_t>(0, GateType::kBool, false, true);
  test_update<uint8_t>(1, GateType::kBool, true, true);
  test_update<uint8_t>(0, GateType::kBool, true, false);
  test_update<float>(0.5f, GateType::kF32, true, true);
  test_update<float>(0.0f, GateType::kF32, true, false);
  test_update<double>(-2.0, GateType::kF64, true, true);
  test_update<double>(0.0, GateType::kF64, true, false);
  test_update<__half>(cvt<__half>(1.f), GateType::kF16, true, true);
  test_update<__half>(cvt<__half>(0.f), GateType::kF16, true, false);
  test_update<__nv_bfloat16>(cvt<__nv_bfloat16>(0.f), GateType::kBF16, true, false);
  test_update<__nv_bfloat16>(cvt<__nv_bfloat16>(3.f), GateType::kBF16, true, true);
  return summary();
}
