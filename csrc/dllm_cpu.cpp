// Masked diffusion LM decoding on the CPU (family "dllm"; numerics in csrc/dllm.h, argument checks in dllm_op.cpp):
// the CPU kernels and their glue.
//
// dllm_unmask, two phases:
//   1. statistics, threads over candidate positions (masked and inside the row's block; every other position
//      is never read). A position's vocabulary row is walked in chunks of kChunk logits:
//
//        row  | chunk 0 | chunk 1 | ... |      per chunk: converted to fp32 (fp16/bf16) into an L1 buffer,
//                                              chunk max (vectorised); if it beats the running max: first index
//                                              of it in the chunk, sum *= exp(old - new); then sum += exp(x - max)
//                                              over the chunk, read again from L1 (AVX2 exp2 polynomial)
//
//      so the logits are read from memory once and no softmax tensor exists.
//   2. selection, threads over rows: the row's candidates are ranked (conf descending, position ascending) and
//      accepted by dllm.h's rule.
// dllm_kv_overwrite: threads over (row, slot), one contiguous copy of D elements per head.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_common.h"
#include "cpu_features.h"
#include "dllm_op.h"
#include "introspection.h"

namespace blockops::dllm {
namespace {

KernelCounter unmask_counter(kFamily, "dllm_unmask.cpu");
KernelCounter overwrite_counter(kFamily, "dllm_kv_overwrite.cpu");
FamilyRegistration family(kFamily, cpu_isa_name);

constexpr int64_t kChunk = 2048;   // logits per chunk: 8 KiB of fp32, read twice from L1
constexpr float kLog2e = 1.4426950408889634f;

// Chunk primitives, one set per ISA. `first_index_of` and the bookkeeping are shared (scalar, rare).
struct ChunkOps {
  float (*max)(const float* x, int64_t n);
  float (*sum_exp)(const float* x, int64_t n, float m);  // sum exp(x - m), m finite
};

float chunk_max_portable(const float* x, int64_t n) {
  float m = -INFINITY;
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

float chunk_sum_exp_portable(const float* x, int64_t n, float m) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += std::exp(x[i] - m);
  return s;
}

#if BLOCKOPS_X86_DISPATCH
BLOCKOPS_TARGET_AVX2 float chunk_max_avx2(const float* x, int64_t n) {
  __m256 m0 = _mm256_set1_ps(-INFINITY), m1 = m0, m2 = m0, m3 = m0;  // four chains hide the max latency
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    m0 = _mm256_max_ps(m0, _mm256_loadu_ps(x + i));
    m1 = _mm256_max_ps(m1, _mm256_loadu_ps(x + i + 8));
    m2 = _mm256_max_ps(m2, _mm256_loadu_ps(x + i + 16));
    m3 = _mm256_max_ps(m3, _mm256_loadu_ps(x + i + 24));
  }
  for (; i + 8 <= n; i += 8) m0 = _mm256_max_ps(m0, _mm256_loadu_ps(x + i));
  float m = hmax_avx2(_mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3)));
  for (; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

BLOCKOPS_TARGET_AVX2 float chunk_sum_exp_avx2(const float* x, int64_t n, float m) {
  const __m256 vm = _mm256_set1_ps(m), l2e = _mm256_set1_ps(kLog2e);
  __m256 s0 = _mm256_setzero_ps(), s1 = s0;
  int64_t i = 0;
  // (x - m) first, then the scale: exact subtraction keeps the exponent's error at fp32 rounding of a value <= 0
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_add_ps(s0, exp2_avx2(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm), l2e)));
    s1 = _mm256_add_ps(s1, exp2_avx2(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i + 8), vm), l2e)));
  }
  float s = hsum_avx2(_mm256_add_ps(s0, s1));
  for (; i < n; ++i) s += std::exp(x[i] - m);
  return s;
}

#endif

// fp32 view of logits[c0, c0 + n): the row itself for fp32, else a converted copy in buf.
template <typename T>
const float* chunk_as_float(const T* src, int64_t n, float* buf, bool avx2) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    convert_to_fp32(src, buf, n, avx2);
    return buf;
  }
}

// Index of the first NaN of x[0, n), or -1.
int64_t first_nan(const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (x[i] != x[i]) return i;
  return -1;
}

// Online softmax statistics of one vocabulary row (dllm.h's RowStats, chunk by chunk).
template <typename T>
RowStats row_stats(const T* row, int64_t V, float* buf, const ChunkOps& ops, bool avx2) {
  RowStats s = empty_stats();
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    const int64_t n = std::min(kChunk, V - c0);
    const float* x = chunk_as_float(row + c0, n, buf, avx2);
    const float cm = ops.max(x, n);   // the max instructions may drop a NaN: the sum below does not
    if (cm > s.max) {  // a new maximum: its first index in this chunk (earlier chunks only had smaller values)
      int64_t i = 0;
      while (i + 1 < n && !(x[i] == cm)) ++i;
      s.sum *= rescale(s.max, cm);
      s.max = cm;
      s.argmax = c0 + i;
    }
    const float add = s.max != -INFINITY ? ops.sum_exp(x, n, s.max) : 0.f;
    // A NaN sum (a NaN logit, or inf - inf under a +inf max), a NaN max or a chunk with no finite maximum yet:
    // look for a NaN, which decides the row (dllm.h nan_stats). Rare, and the chunk is still in L1.
    if (add != add || cm != cm || s.max == -INFINITY) {
      const int64_t i = first_nan(x, n);
      if (i >= 0) return nan_stats(c0 + i);
    }
    s.sum += add;
  }
  return s;
}

ChunkOps chunk_ops(bool avx2) {
#if BLOCKOPS_X86_DISPATCH
  if (avx2) return {chunk_max_avx2, chunk_sum_exp_avx2};
#endif
  (void)avx2;
  return {chunk_max_portable, chunk_sum_exp_portable};
}

template <typename T>
void unmask_statistics(const UnmaskParams& p, const std::vector<int64_t>& candidates) {
  const bool avx2 = cpu_has_avx2_fma();
  const ChunkOps ops = chunk_ops(avx2);
  const T* logits = static_cast<const T*>(p.logits);
  // ~64K logits per task: thread start-up is amortised, small vocabularies still spread over the threads.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / p.V);
  at::parallel_for(0, static_cast<int64_t>(candidates.size()), grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(std::is_same_v<T, float> ? 0 : kChunk);
    for (int64_t c = begin; c < end; ++c) {
      const int64_t flat = candidates[c], b = flat / p.L, l = flat % p.L;
      const RowStats s = row_stats(logits + b * p.stride_b + l * p.stride_l, p.V, buf.data(), ops, avx2);
      p.tokens[flat] = s.argmax;
      p.conf[flat] = confidence(s);
    }
  });
}

// Phase 2 for rows [begin, end): rank each row's candidates and apply the rule.
void unmask_select(const UnmaskParams& p, int64_t begin, int64_t end) {
  std::vector<int64_t> order;
  for (int64_t b = begin; b < end; ++b) {
    order.clear();
    for (int64_t l = 0; l < p.L; ++l) {
      if (is_candidate(p, b, l)) order.push_back(l);
    }
    const float* conf = p.conf + b * p.L;
    std::sort(order.begin(), order.end(),
              [&](int64_t x, int64_t y) { return ranks_before(conf[x], x, conf[y], y); });
    const int64_t k = min_tokens_of(p.min_tokens, b);
    for (size_t r = 0; r < order.size(); ++r) {
      p.unmask[b * p.L + order[r]] = accept(static_cast<int64_t>(r), conf[order[r]], k, p.rule);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dllm_unmask_cpu(const at::Tensor& logits, const at::Tensor& masked,
                                                                 const at::Tensor& block_bounds,
                                                                 const c10::optional<at::Tensor>& min_tokens,
                                                                 double threshold, c10::optional<double> factor) {
  UnmaskCall c = prepare_unmask(logits, masked, block_bounds, min_tokens, threshold, factor);
  const UnmaskParams& p = c.params;
  unmask_counter.hit();
  std::fill_n(p.tokens, p.B * p.L, int64_t{-1});
  std::fill_n(p.conf, p.B * p.L, -INFINITY);
  std::fill_n(p.unmask, p.B * p.L, false);
  std::vector<int64_t> candidates;
  for (int64_t b = 0; b < p.B; ++b) {
    for (int64_t l = 0; l < p.L; ++l) {
      if (is_candidate(p, b, l)) candidates.push_back(b * p.L + l);
    }
  }
  if (candidates.empty()) return {c.tokens, c.unmask, c.confidence};
  switch (logits.scalar_type()) {
    case at::kHalf: unmask_statistics<c10::Half>(p, candidates); break;
    case at::kBFloat16: unmask_statistics<c10::BFloat16>(p, candidates); break;
    default: unmask_statistics<float>(p, candidates); break;
  }
  at::parallel_for(0, p.B, 1, [&](int64_t begin, int64_t end) { unmask_select(p, begin, end); });
  return {c.tokens, c.unmask, c.confidence};
}

void dllm_kv_overwrite_cpu(at::Tensor& cache, const at::Tensor& src, const at::Tensor& positions,
                           bool check_indices) {
  const OverwriteParams p = prepare_overwrite(cache, src, positions);
  if (check_indices) check_positions(positions, p.S);
  if (p.B * p.n * p.H * p.D == 0) return;
  overwrite_counter.hit();
  const int64_t bytes = p.D * p.element_bytes;
  char* dst = static_cast<char*>(p.cache);
  const char* from = static_cast<const char*>(p.src);
  at::parallel_for(0, p.B * p.n, std::max<int64_t>(1, 4096 / (p.H * bytes) + 1), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / p.n, j = t % p.n, slot = p.positions[t];
      if (slot < 0 || slot >= p.S) continue;  // unchecked call: out-of-range entries are skipped, never written
      for (int64_t h = 0; h < p.H; ++h) {
        std::memcpy(dst + ((b * p.H + h) * p.S + slot) * bytes,
                    from + (b * p.sb + h * p.sh + j * p.sj) * p.element_bytes, bytes);
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(blockops, CPU, m) {
  m.impl("dllm_unmask", &dllm_unmask_cpu);
  m.impl("dllm_kv_overwrite", &dllm_kv_overwrite_cpu);
}

}  // namespace blockops::dllm
