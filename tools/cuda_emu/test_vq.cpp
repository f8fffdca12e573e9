// CPU-emulation test of the vector-quantized GEMM CUDA kernels (vq.cu through gen_emu.py) against fp64
// references: the GEMV (replicated / global codebook, position splits, wide and narrow code loads), the tensor-core
// kernel (fp16 / bf16, 32 / 64 / 128-row tiles), the CUDA-core tiled kernel, dequantize, and both gradients.
// Sections: `linear`, `backward`, `garbage` (codes >= k: clamped, meaningful under ASan); none: all.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "harness.h"
#include "vq_launch.h"
using namespace blockops::vq;
using blockops::DType;

static std::mt19937 rng(4321);
static float urand(float a, float b) { return std::uniform_real_distribution<float>(a, b)(rng); }

// A device-style buffer of one float dtype (movable, unlike Buf); values are rounded to the dtype on the way in.
struct DTypeBuf {
  DType t = DType::kF32;
  std::vector<uint8_t> bytes;
  DTypeBuf() = default;
  DTypeBuf(DType type, size_t n) : t(type), bytes(n * esize(type) + 16) {}
  void set(size_t i, float v) { put(t, bytes.data(), i, v); }
  double get(size_t i) const { return ::get(t, bytes.data(), i); }
  void* data() { return bytes.data(); }
};

struct Case {
  int64_t out, groups, K, k, d;
  CodeType code_type;
  DType cb_type;
  bool scales;
};

// Weights with codes over [0, k) (plus `garbage` codes >= k when asked), and the fp64 W_hat of the clamped codes.
struct Weights {
  Case c;
  std::vector<uint8_t> code_bytes;  // [out, P] (+ slack for the misaligned copy)
  size_t code_offset = 0;           // bytes: 1 or 2 codes off the allocation's alignment when misaligned
  DTypeBuf codebooks, scales;
  std::vector<double> w_hat;        // [out, in]
  DeviceWeights dev() const {
    DeviceWeights w{};
    w.codes = code_bytes.data() + code_offset;
    w.code_type = c.code_type;
    w.codebooks = codebooks.bytes.data();
    w.cb_type = c.cb_type;
    w.scales = c.scales ? scales.bytes.data() : nullptr;
    w.scale_type = c.cb_type;
    w.g = Geometry{c.out, c.groups, c.K, c.k, c.d};
    return w;
  }
  uint32_t code(int64_t flat) const {
    const uint8_t* p = code_bytes.data() + code_offset;
    if (c.code_type == CodeType::kU8) return p[flat];
    uint16_t v; memcpy(&v, p + 2 * flat, 2); return v;
  }
};

static Weights make_weights(const Case& c, bool misalign, bool garbage) {
  Weights w;
  w.c = c;
  const int64_t P = c.groups * c.K, in = c.groups * c.d;
  const int cs = c.code_type == CodeType::kU8 ? 1 : 2;
  w.code_offset = misalign ? cs : 0;
  w.code_bytes.assign(c.out * P * cs + 16, 0);
  const uint32_t capacity = c.code_type == CodeType::kU8 ? 256 : 65536;
  for (int64_t i = 0; i < c.out * P; ++i) {
    uint32_t v = rng() % c.k;
    if (garbage && i % 7 == 3) v = c.k + rng() % (capacity - c.k);  // out of range: read as k - 1
    if (cs == 1) w.code_bytes[w.code_offset + i] = uint8_t(v);
    else { const uint16_t h = uint16_t(v); memcpy(&w.code_bytes[w.code_offset + 2 * i], &h, 2); }
  }
  w.codebooks = DTypeBuf(c.cb_type, c.K * c.k * c.d);
  for (int64_t i = 0; i < c.K * c.k * c.d; ++i) w.codebooks.set(i, urand(-1, 1));
  w.scales = DTypeBuf(c.cb_type, c.out);
  for (int64_t n = 0; n < c.out; ++n) w.scales.set(n, urand(0.5f, 1.5f));
  w.w_hat.assign(c.out * in, 0.0);
  for (int64_t n = 0; n < c.out; ++n) {
    const double s = c.scales ? w.scales.get(n) : 1.0;
    for (int64_t j = 0; j < c.groups; ++j) {
      for (int64_t b = 0; b < c.K; ++b) {
        const uint32_t code = std::min<uint32_t>(w.code(n * P + j * c.K + b), uint32_t(c.k - 1));
        for (int64_t t = 0; t < c.d; ++t) w.w_hat[n * in + j * c.d + t] += w.codebooks.get((b * c.k + code) * c.d + t);
      }
      for (int64_t t = 0; t < c.d; ++t) w.w_hat[n * in + j * c.d + t] *= s;
    }
  }
  return w;
}

// max() that keeps a NaN (std::max drops it: a kernel reading unwritten smem yields NaN, which must fail).
static double worst(double a, double b) { return std::isnan(a) || std::isnan(b) ? NAN : std::max(a, b); }

static std::string describe(const Case& c, int64_t m, DType x, const char* extra) {
  char s[256];
  snprintf(s, sizeof s, "m=%ld out=%ld G=%ld K=%ld k=%ld d=%ld codes=%s cb=%s scales=%d x=%s %s", long(m), long(c.out),
           long(c.groups), long(c.K), long(c.k), long(c.d), c.code_type == CodeType::kU8 ? "u8" : "u16",
           dname(c.cb_type), int(c.scales), dname(x), extra);
  return s;
}

// Runs vq_linear on every path that takes these arguments (GEMV when m <= kCudaGemvMaxRows, tensor cores when
// supported, CUDA-core tiles always) and compares each with x . W_hat^T + bias in fp64.
static bool skip_simt = false;      // run the CUDA-core tiled path only when the caller allows it
static bool expect_splits = false;  // the GEMV must split its positions (the split cases must not go stale)

static void test_linear(const Case& c, int64_t m, DType x_type, bool bias, int sms, bool misalign_codes,
                        bool garbage = false) {
  emu_sms = sms;
  const Weights w = make_weights(c, misalign_codes, garbage);
  const int64_t in = c.groups * c.d;
  DTypeBuf x(x_type, m * in), b(DType::kF32, c.out);
  for (int64_t i = 0; i < m * in; ++i) x.set(i, urand(-1, 1));
  for (int64_t n = 0; n < c.out; ++n) b.set(n, urand(-1, 1));
  std::vector<double> ref(m * c.out);
  double maxref = 0;
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t n = 0; n < c.out; ++n) {
      double acc = bias ? b.get(n) : 0.0;
      for (int64_t i = 0; i < in; ++i) acc += x.get(r * in + i) * w.w_hat[n * in + i];
      ref[r * c.out + n] = acc;
      maxref = std::max(maxref, std::abs(acc));
    }
  }
  LinearParams p{};
  p.w = w.dev();
  p.x = x.data();
  p.x_type = x_type;
  p.bias = bias ? b.data() : nullptr;
  p.bias_type = DType::kF32;
  p.m = m;
  std::vector<LinearPath> paths;
  if (m <= kCudaGemvMaxRows) paths.push_back(LinearPath::kGemv);
  const LinearPath chosen = linear_path(p);
  if (chosen == LinearPath::kMma) paths.push_back(LinearPath::kMma);
  if (!skip_simt || paths.empty()) paths.push_back(LinearPath::kSimt);
  for (LinearPath path : paths) {
    DTypeBuf y(x_type, m * c.out);
    for (int64_t i = 0; i < m * c.out; ++i) y.set(i, 12345.0f);
    const int splits = path == LinearPath::kGemv ? gemv_splits(p) : 1;
    if (path == LinearPath::kGemv && expect_splits && splits < 2) {
      report("gemv_splits", 1.0, 0.0, describe(c, m, x_type, "expected a position split"));
    }
    std::vector<float> ws(splits * m * c.out, 777.0f);
    p.y = y.data();
    p.workspace = ws.data();
    const char* pname = path == LinearPath::kGemv ? "gemv" : path == LinearPath::kMma ? "mma" : "simt";
    char extra[96];
    snprintf(extra, sizeof extra, "bias=%d sms=%d splits=%d mis=%d garbage=%d", int(bias), sms, splits,
             int(misalign_codes), int(garbage));
    const std::string cfg = describe(c, m, x_type, extra);
    if (launch_vq_linear(p, path, splits, nullptr) != cudaSuccess) {
      ++failures;
      printf("FAIL launch %s %s\n", pname, cfg.c_str());
      continue;
    }
    double maxerr = 0;
    for (int64_t i = 0; i < m * c.out; ++i) maxerr = worst(maxerr, std::abs(y.get(i) - ref[i]));
    // Output rounding to x's dtype, plus (tensor cores) W_hat rounded once to it; fp32 accumulation otherwise.
    const double unit = x_type == DType::kF32 ? 2e-6 : x_type == DType::kF16 ? 2e-3 : 1.6e-2;
    report(pname, maxerr, unit * (maxref + 1), cfg);
  }
}

static void test_dequantize(const Case& c, DType out_type) {
  const Weights w = make_weights(c, false, false);
  const int64_t in = c.groups * c.d;
  DTypeBuf o(out_type, c.out * in);
  for (int64_t i = 0; i < c.out * in; ++i) o.set(i, 999.0f);
  launch_vq_dequantize(w.dev(), o.data(), out_type, nullptr);
  // Bit-exact: fp32 scale * (c0 + c1) rounded once, the CPU op's arithmetic.
  DTypeBuf expect(out_type, c.out * in);
  const int64_t P = c.groups * c.K;
  for (int64_t n = 0; n < c.out; ++n) {
    const float s = c.scales ? float(w.scales.get(n)) : 1.0f;
    for (int64_t j = 0; j < c.groups; ++j) {
      for (int64_t t = 0; t < c.d; ++t) {
        float v = float(w.codebooks.get(w.code(n * P + j * c.K) * c.d + t));
        if (c.K == 2) v += float(w.codebooks.get((c.k + w.code(n * P + j * c.K + 1)) * c.d + t));
        expect.set(n * in + j * c.d + t, s * v);
      }
    }
  }
  double maxerr = 0;
  for (int64_t i = 0; i < c.out * in; ++i) maxerr = worst(maxerr, std::abs(o.get(i) - expect.get(i)));
  report("dequantize", maxerr, 0.0, describe(c, 0, out_type, ""));
}

static void test_grads(const Case& c, bool garbage) {
  const Weights w = make_weights(c, false, garbage);
  const int64_t in = c.groups * c.d, P = c.groups * c.K;
  std::vector<float> t(c.out * in);
  for (auto& v : t) v = urand(-1, 1);
  const std::string cfg = describe(c, 0, DType::kF32, garbage ? "garbage" : "");

  // Scales: unscaled W_hat . t per row.
  std::vector<float> gs(c.out, 999.0f);
  DeviceWeights unscaled = w.dev();
  launch_vq_grad_scales(t.data(), unscaled, gs.data(), nullptr);
  double err = 0, mag = 0;
  for (int64_t n = 0; n < c.out; ++n) {
    const double s = c.scales ? w.scales.get(n) : 1.0;
    double acc = 0;
    for (int64_t i = 0; i < in; ++i) acc += w.w_hat[n * in + i] / s * t[n * in + i];
    err = worst(err, std::abs(acc - gs[n]));
    mag = std::max(mag, std::abs(acc));
  }
  report("grad_scales", err, 1e-5 * (mag + 1), cfg);

  // Codebooks: the glue's stable sort of keys book * k + clamped code, then the warp-per-codeword kernel.
  std::vector<int64_t> keys(c.out * P), order(c.out * P), offsets(c.K * c.k + 1);
  for (int64_t e = 0; e < c.out * P; ++e) keys[e] = (e % c.K) * c.k + std::min<int64_t>(w.code(e), c.k - 1);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return keys[a] < keys[b]; });
  for (int64_t s = 0, i = 0; s <= c.K * c.k; ++s) {
    while (i < c.out * P && keys[order[i]] < s) ++i;
    offsets[s] = i;
  }
  std::vector<double> ref(c.K * c.k * c.d, 0.0);
  for (int64_t e = 0; e < c.out * P; ++e) {
    const int64_t n = e / P, j = (e % P) / c.K;
    const double s = c.scales ? w.scales.get(n) : 1.0;
    for (int64_t q = 0; q < c.d; ++q) ref[keys[e] * c.d + q] += s * t[n * in + j * c.d + q];
  }
  std::vector<float> gc(c.K * c.k * c.d, 999.0f), again(gc.size(), 555.0f);
  launch_vq_grad_codebooks(t.data(), w.dev(), order.data(), offsets.data(), gc.data(), nullptr);
  launch_vq_grad_codebooks(t.data(), w.dev(), order.data(), offsets.data(), again.data(), nullptr);
  err = 0, mag = 0;
  for (size_t i = 0; i < gc.size(); ++i) {
    err = worst(err, std::abs(ref[i] - gc[i]));
    mag = std::max(mag, std::abs(ref[i]));
  }
  report("grad_codebooks", err, 1e-5 * (mag + 1), cfg);
  report("grad_codebooks_repeat", memcmp(gc.data(), again.data(), gc.size() * 4) == 0 ? 0.0 : 1.0, 0.0, cfg);
}

int main(int argc, char** argv) {
  const Sections section(argc, argv, "all");
  const bool quick = getenv("EMU_QUICK") != nullptr;
  const DType F32 = DType::kF32, F16 = DType::kF16, BF16 = DType::kBF16;
  const CodeType U8 = CodeType::kU8, U16 = CodeType::kU16;

  if (section("linear")) {
    // Every (k, d, K) with awkward out / groups; codebook dtype and x dtype rotate, scales and bias alternate.
    // k = 4096 at d = 8, K = 2 (128 KiB in fp16) and k = 65536 read the codebook from global memory in the GEMV.
    const int64_t outs[] = {37, 70, 5}, groups[] = {13, 20, 33};
    int i = 0;
    for (int64_t k : {16, 64, 256, 4096, 65536}) {
      for (int64_t d : {2, 4, 8}) {
        for (int64_t K : {1, 2}) {
          const DType cb = i % 3 == 0 ? F32 : i % 3 == 1 ? F16 : BF16;
          const DType x = (i / 3) % 3 == 0 ? F16 : (i / 3) % 3 == 1 ? BF16 : F32;
          const Case c{outs[i % 3], groups[(i / 2) % 3], K, k, d,
                       k <= 256 ? U8 : U16, cb, i % 2 == 0};
          skip_simt = quick && i % 3 != 0;  // quick: the CUDA-core path on every third (k, d, K)
          for (int64_t m : {1, 3, 8}) {
            if (quick && (m + i) % 3 != 0) continue;
            test_linear(c, m, x, i % 4 < 2, 4, false);
          }
          if (!quick || i % 3 == 0) test_linear(c, 19, x == F32 ? F16 : x, i % 2 == 1, 4, false);
          skip_simt = false;
          ++i;
        }
      }
    }
    // Position splits (many SMs, few rows; 2..4 splits) with wide and narrow code loads, int16 codes, misaligned
    // codes. The CUDA-core path is skipped here (in up to 8192 makes it slow to emulate; covered above).
    skip_simt = true;
    expect_splits = true;
    test_linear({40, 2048, 1, 256, 4, U8, F16, true}, 1, F16, true, 132, false);
    test_linear({40, 1024, 2, 256, 8, U8, F16, true}, 5, BF16, true, 132, false);
    test_linear({24, 1025, 1, 64, 2, U8, BF16, false}, 2, F32, false, 132, false);  // P % 4 != 0: narrow loads
    test_linear({33, 2048, 1, 256, 4, U8, F16, true}, 4, F16, true, 132, true);    // misaligned: narrow loads
    test_linear({17, 1024, 2, 1024, 4, U16, F32, true}, 8, F32, true, 132, false);
    if (!quick) test_linear({17, 1024, 2, 1024, 4, U16, F32, true}, 7, F16, true, 132, true);
    expect_splits = false;
    skip_simt = false;
    // Tensor cores: 32 / 64 / 128-row tiles, several column tiles and k tiles, a K tail (in % 32 != 0).
    test_linear({130, 36, 1, 256, 4, U8, F16, true}, 40, F16, true, 4, false);     // in = 144: K tail
    test_linear({200, 16, 2, 256, 8, U8, BF16, true}, 100, BF16, true, 4, false);
    if (!quick) test_linear({129, 20, 1, 64, 2, U8, F32, false}, 131, F16, false, 4, false);
    test_linear({72, 64, 1, 65536, 4, U16, F16, true}, 24, BF16, true, 4, false);  // codebook from global
  }
  if (section("backward")) {
    const int64_t outs[] = {9, 40, 3}, groups[] = {7, 12, 5};
    int i = 0;
    for (int64_t k : {16, 256, 512}) {  // grad_codebooks runs a block per 8 codewords: small k keeps it fast
      for (int64_t d : {2, 4, 8}) {
        for (int64_t K : {1, 2}) {
          const DType cb = i % 3 == 0 ? F32 : i % 3 == 1 ? F16 : BF16;
          const Case c{outs[i % 3], groups[i % 3], K, k, d, k <= 256 ? U8 : U16, cb, i % 2 == 0};
          if (!quick || i % 5 == 0) test_grads(c, false);  // quick: i = 0, 5, 10, 15 cover every d and K
          test_dequantize(c, i % 2 ? cb : (cb == F32 ? BF16 : F32));
          ++i;
        }
      }
    }
    if (!quick) test_grads({64, 40, 1, 65536, 8, U16, F16, true}, false);
  }
  if (section("garbage")) {
    // Codes >= k: every kernel reads codeword k - 1 (the reference clamps the same way); under ASan an unclamped
    // read past the codebook aborts even where the values would happen to agree.
    test_linear({37, 13, 1, 16, 4, U8, F16, true}, 1, F16, true, 4, false, true);
    test_linear({37, 13, 2, 100, 2, U8, F32, true}, 3, F32, false, 4, false, true);
    test_linear({37, 16, 1, 4000, 8, U16, BF16, true}, 20, BF16, true, 4, false, true);
    test_linear({70, 16, 2, 40000, 4, U16, F16, false}, 9, F32, true, 4, false, true);
    test_grads({20, 10, 2, 16, 4, U8, F32, true}, true);
    test_grads({20, 10, 1, 1000, 2, U16, F16, false}, true);
  }
  return summary();
}
