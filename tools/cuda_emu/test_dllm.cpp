// CPU-emulation test of the dllm CUDA kernels (dllm.cu through gen_emu.py): the unmasking statistics (argmax, first
// index on ties, softmax confidence) and selection (threshold and factor rules, min_tokens, block bounds), and the
// per-row KV slot overwrite, against references written here from the rules' text (fp64 softmax, a sort).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "dllm_launch.h"
#include "harness.h"
using namespace blockops::dllm;
using blockops::DType;

static std::mt19937 rng(4321);
static float urand(float a, float b) { return std::uniform_real_distribution<float>(a, b)(rng); }

struct Case {
  int64_t B, L, V;
  bool factor_rule;
  float threshold, factor;
  bool with_min_tokens;
  int ties;      // > 0: plant this many equal maxima per row at random indices
  float scale;   // logit spread
  bool same_rows = false;   // every position of a batch row gets the same logits: confidences tie, rank by position
  int nans = 0;             // > 0: plant this many NaN logits in about a third of the rows (the first one is the argmax)
};

template <typename T>
static void test_unmask(const Case& c, int64_t pad) {
  cases++;
  const int64_t B = c.B, L = c.L, V = c.V, stride_l = V + pad, stride_b = L * stride_l + 3 * pad;
  std::vector<T> logits(B * stride_b + 1, cvt<T>(1e4f));   // padding holds a huge logit: read it and the test fails
  std::vector<float> vals(B * L * V);
  for (int64_t b = 0; b < B; ++b) for (int64_t l = 0; l < L; ++l) {
    float* row = &vals[(b * L + l) * V];
    for (int64_t v = 0; v < V; ++v) row[v] = back(cvt<T>(urand(-c.scale, c.scale)));
    for (int t = 0; t < c.ties; ++t) row[rng() % V] = back(cvt<T>(c.scale * 1.5f));
    if (rng() % 3 == 0)
      for (int t = 0; t < c.nans; ++t) row[rng() % V] = NAN;
    for (int64_t v = 0; v < V; ++v) logits[b * stride_b + l * stride_l + v] = cvt<T>(row[v]);
  }
  // identical positions 0 and 1 of batch row 0 (or all positions): equal confidences rank by position
  for (int64_t b = 0; b < B; ++b) for (int64_t l = 0; l < L; ++l) {
    if (!(c.same_rows || (b == 0 && l == 1))) continue;
    for (int64_t v = 0; v < V; ++v) {
      logits[b * stride_b + l * stride_l + v] = logits[b * stride_b + v];
      vals[(b * L + l) * V + v] = vals[b * L * V + v];
    }
  }
  std::vector<uint8_t> masked_bytes(B * L);
  for (auto& m : masked_bytes) m = (rng() % 10) < 7;
  std::vector<bool> masked(B * L);
  bool* masked_p = reinterpret_cast<bool*>(masked_bytes.data());
  for (int64_t i = 0; i < B * L; ++i) masked[i] = masked_bytes[i];
  std::vector<int64_t> bounds(2 * B), min_tokens(B);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t lo = int64_t(rng() % (L + 2)) - 1;       // -1 .. L: bounds may reach past the row
    bounds[2 * b] = lo;
    bounds[2 * b + 1] = lo + int64_t(rng() % (L + 2));
    min_tokens[b] = int64_t(rng() % 4) - 1;                // -1 .. 2: k = max(1, .)
  }
  std::vector<int64_t> tokens(B * L, 777);
  std::vector<float> conf(B * L, 777.f);
  std::vector<uint8_t> unmask_bytes(B * L, 7);
  UnmaskParams p{};
  p.logits = logits.data();
  p.stride_b = stride_b;
  p.stride_l = stride_l;
  p.masked = masked_p;
  p.bounds = bounds.data();
  p.min_tokens = c.with_min_tokens ? min_tokens.data() : nullptr;
  p.tokens = tokens.data();
  p.unmask = reinterpret_cast<bool*>(unmask_bytes.data());
  p.conf = conf.data();
  p.B = B;
  p.L = L;
  p.V = V;
  p.rule = UnmaskRule{c.factor_rule ? Rule::kFactor : Rule::kThreshold, c.threshold, c.factor};
  char cfg[200];
  snprintf(cfg, sizeof cfg, "B=%ld L=%ld V=%ld pad=%ld dtype=%d factor=%d thr=%g f=%g min=%d ties=%d same=%d", (long)B,
           (long)L, (long)V, (long)pad, int(dt<T>()), c.factor_rule, c.threshold, c.factor, c.with_min_tokens, c.ties,
           c.same_rows);
  if (launch_dllm_unmask(p, dt<T>(), nullptr) != cudaSuccess) return fail("launch", cfg);
  for (int64_t b = 0; b < B; ++b) {
    std::vector<int64_t> cand;
    for (int64_t l = 0; l < L; ++l) {
      const int64_t i = b * L + l;
      const bool is_cand = masked[i] && l >= bounds[2 * b] && l < bounds[2 * b + 1];
      if (!is_cand) {
        if (tokens[i] != -1 || conf[i] != -INFINITY || unmask_bytes[i] != 0) return fail("non-candidate", cfg);
        continue;
      }
      cand.push_back(l);
      const float* row = &vals[i * V];
      int64_t arg = 0;
      for (int64_t v = 1; v < V; ++v) if (row[v] > row[arg]) arg = v;   // first index of the maximum
      const int64_t first_nan = std::find_if(row, row + V, [](float x) { return x != x; }) - row;
      if (first_nan < V) {   // torch.argmax / softmax: the first NaN, a NaN confidence
        if (tokens[i] != first_nan) return fail("argmax (NaN row)", cfg);
        if (!std::isnan(conf[i])) return fail("confidence (NaN row)", cfg);
        continue;
      }
      double sum = 0;
      for (int64_t v = 0; v < V; ++v) sum += std::exp(double(row[v]) - row[arg]);
      if (tokens[i] != arg) return fail("argmax", cfg);
      if (!(std::abs(conf[i] - 1.0 / sum) <= 2e-6 / sum + 1e-7)) return fail("confidence", cfg);
    }
    // selection from the kernel's own confidences: sort descending, ties by position, then the rule's text
    auto key = [&](int64_t l) { return std::isnan(conf[b * L + l]) ? -INFINITY : conf[b * L + l]; };   // NaN last
    std::stable_sort(cand.begin(), cand.end(), [&](int64_t x, int64_t y) { return key(x) > key(y); });
    const int64_t k = c.with_min_tokens ? std::max<int64_t>(1, min_tokens[b]) : 1;
    std::vector<uint8_t> want(L, 0);
    for (size_t r = 0; r < cand.size(); ++r) {
      const float cf = conf[b * L + cand[r]];
      const int64_t n = int64_t(r) + 1;
      bool take = n <= k;
      if (!c.factor_rule) take |= cf > c.threshold;
      else take |= float(n + 1) * (1.f - cf) < c.factor;
      want[cand[r]] = take;
    }
    for (int64_t l = 0; l < L; ++l) {
      if (unmask_bytes[b * L + l] != want[l]) return fail("selection", cfg);
    }
  }
}

template <typename T>
static void test_overwrite(int64_t B, int64_t H, int64_t S, int64_t D, int64_t n, bool out_of_range) {
  cases++;
  std::vector<T> cache(B * H * S * D), src(B * n * H * D);   // src stored [B, n, H, D]: strided as [B, H, n, D]
  for (auto& v : cache) v = cvt<T>(urand(-1, 1));
  for (auto& v : src) v = cvt<T>(urand(-1, 1));
  std::vector<T> want = cache;
  std::vector<int64_t> positions(B * n);
  for (int64_t b = 0; b < B; ++b) {
    std::vector<int64_t> slots(S);
    std::iota(slots.begin(), slots.end(), 0);
    std::shuffle(slots.begin(), slots.end(), rng);
    std::sort(slots.begin(), slots.begin() + n);
    for (int64_t j = 0; j < n; ++j) positions[b * n + j] = slots[j];
    if (out_of_range) {
      positions[b * n] = -1 - b;
      positions[b * n + n - 1] = S + b;
    }
    for (int64_t j = 0; j < n; ++j) {
      const int64_t s = positions[b * n + j];
      if (s < 0 || s >= S) continue;
      for (int64_t h = 0; h < H; ++h) for (int64_t d = 0; d < D; ++d)
        want[((b * H + h) * S + s) * D + d] = src[((b * n + j) * H + h) * D + d];
    }
  }
  OverwriteParams p{};
  p.cache = cache.data();
  p.src = src.data();
  p.sb = n * H * D;
  p.sh = D;
  p.sj = H * D;
  p.positions = positions.data();
  p.B = B;
  p.H = H;
  p.S = S;
  p.n = n;
  p.D = D;
  p.element_bytes = sizeof(T);
  char cfg[128];
  snprintf(cfg, sizeof cfg, "B=%ld H=%ld S=%ld D=%ld n=%ld oor=%d bytes=%d", (long)B, (long)H, (long)S, (long)D, (long)n,
           out_of_range, int(sizeof(T)));
  if (launch_dllm_kv_overwrite(p, nullptr) != cudaSuccess) return fail("launch", cfg);
  if (memcmp(cache.data(), want.data(), cache.size() * sizeof(T)) != 0) fail("overwrite", cfg);
}

int main(int argc, char** argv) {
  const bool quick = getenv("EMU_QUICK") != nullptr;
  const Sections section(argc, argv, "all");
  if (section("unmask")) {
    const Case grid[] = {
        {1, 1, 1, false, 0.9f, 0, false, 0, 3},          // one logit: confidence 1
        {2, 9, 31, false, 0.3f, 0, true, 0, 3},          // V below a warp
        {3, 17, 257, true, 0, 1.0f, true, 0, 8},         // factor rule
        {2, 33, 1000, false, 0.5f, 0, false, 3, 6},       // planted equal maxima in different threads' strides
        {1, 40, 600, true, 0, 0.3f, false, 2, 10},
        {2, 5, 5003, false, -1.f, 0, true, 0, 4},         // threshold below every confidence: all candidates
        {2, 12, 2100, false, 2.f, 0, true, 4, 5},         // threshold above one: only the top k
        {3, 21, 300, false, 2.f, 0, true, 0, 5, true},    // all confidences tie: the top k are the first k
        {2, 16, 130, true, 0, 0.5f, true, 0, 5, true},
        {3, 19, 1000, false, 0.2f, 0, true, 2, 5, false, 1},   // NaN logits: one per NaN row
        {2, 23, 700, true, 0, 0.8f, true, 0, 5, false, 3},     // several NaNs per row, across threads' strides
    };
    int n = 0;
    for (const Case& c : grid) {
      for (int64_t pad : {0, 5}) {
        if (quick && n++ % 2) continue;
        test_unmask<float>(c, pad);
        test_unmask<__half>(c, pad);
        test_unmask<__nv_bfloat16>(c, pad);
      }
    }
  }
  if (section("overwrite")) {
    for (bool oor : {false, true}) {
      test_overwrite<float>(3, 2, 19, 24, 5, oor);
      test_overwrite<__half>(2, 3, 8, 72, 8, oor);
      test_overwrite<__nv_bfloat16>(1, 1, 33, 40, 1, oor);
    }
  }
  return summary();
}
