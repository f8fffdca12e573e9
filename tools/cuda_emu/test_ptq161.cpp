// CPU-emulation test of the PTQ1.61 CUDA kernel (ptq161.cu through gen_emu.py): the +-1 GEMV U = signs^T x' for 1..8
// rows, against an fp64 reference, with awkward row counts (partial blocks), sign-word counts (partial x' tiles) and
// random bits including the zero padding of the last word.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "harness.h"
#include "ptq161_launch.h"
using namespace blockops::ptq161;

static std::mt19937 rng(161);

static void test_gemv(int64_t m, int64_t plain, int64_t out) {
  const Geometry g{plain, out, 0};  // no salient channels: N = in
  const int64_t words = g.sign_words(), stride = words * kSignsPerWord;
  std::vector<int32_t> signs(words * out);
  for (auto& w : signs) w = static_cast<int32_t>(rng());
  for (int64_t j = plain; j < stride; ++j)  // padding bits are zero in the format (pack_bits pads with 0)
    for (int64_t i = 0; i < out; ++i) signs[(j / 32) * out + i] &= ~static_cast<int32_t>(1u << (j % 32));
  std::vector<float> x(m * stride, 0.f);
  for (int64_t r = 0; r < m; ++r)
    for (int64_t j = 0; j < plain; ++j) x[r * stride + j] = std::uniform_real_distribution<float>(-1, 1)(rng);
  std::vector<float> u(m * out, 12345.f);
  BinaryGemvParams p{x.data(), signs.data(), u.data(), m, g};
  ++cases;
  if (launch_binary_gemv(p, nullptr) != cudaSuccess) { ++failures; printf("FAIL launch m=%ld\n", long(m)); return; }
  double max_err = 0, scale = 0;
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t i = 0; i < out; ++i) {
      double ref = 0, mag = 0;
      for (int64_t j = 0; j < plain; ++j) {
        const double b = sign_value(sign_bit(signs.data(), g, j, i));
        ref += b * x[r * stride + j];
        mag += std::fabs(x[r * stride + j]);
      }
      max_err = std::fmax(max_err, std::fabs(u[r * out + i] - ref));
      scale = std::fmax(scale, mag);
    }
  }
  if (!(max_err <= 1e-6 * scale + 1e-6)) {
    ++failures;
    printf("FAIL gemv m=%ld N=%ld out=%ld err=%g scale=%g\n", long(m), long(plain), long(out), max_err, scale);
  }
}

int main() {
  const bool quick = std::getenv("EMU_QUICK") != nullptr;
  // N: one partial word, one full word, a partial x' tile, several tiles with a partial last word;
  // out: one row, a partial block, several blocks with a partial last one.
  for (int64_t plain : {5, 32, 200, 1100}) {
    for (int64_t out : {1, 37, 300}) {
      for (int64_t m = 1; m <= kCudaGemvMaxRows; ++m) {
        if (quick && plain * out > 20000 && m % 3 != 1) continue;  // keeps m = 1, 4, 7 on the big shapes
        test_gemv(m, plain, out);
      }
    }
  }
  // a bad row count is refused, not run
  ++cases;
  std::vector<float> dummy(1);
  if (launch_binary_gemv(BinaryGemvParams{dummy.data(), nullptr, dummy.data(), 9, Geometry{32, 1, 0}}, nullptr) ==
      cudaSuccess) {
    ++failures;
    printf("FAIL m=9 accepted\n");
  }
  return summary();
}
