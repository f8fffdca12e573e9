// PaTH attention's decode step on the CPU (path_decode_step; registered in path_attention_cpu.cpp with the other
// PaTH ops, the row conversions in path_attention_cpu.h, DecodeParamsT in path_attention.h).
//
// One task per (row, key head): one pass over the row's cached keys applies the new token's rank-1 update and takes
// the dots with the group's queries, a second pass over the values forms the outputs. fp32 (and fp16/bf16 inputs)
// run the body compiled for AVX2/FMA where the CPU has it; fp64 inputs (an fp64 cache) the portable body in double.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "introspection.h"
#include "path_attention_cpu.h"

namespace blockops::path_attention {
namespace {

KernelCounter decode_counter(kFamily, "path_decode_step.cpu");

// Dot product in 8 independent lanes (n a multiple of 8): the compiler turns it into one vector FMA chain where
// the ISA has one, without reassociating a single running sum.
template <typename S>
[[gnu::always_inline]] inline S dot8(const S* a, const S* b, int n) {
  S acc[8] = {};
  for (int x = 0; x < n; x += 8)
    for (int l = 0; l < 8; ++l) acc[l] += a[x + l] * b[x + l];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// One (row b, key head hk): one pass over the cached keys applies the rank-1 update and takes the group's query
// dots, a second pass over the values accumulates the outputs. scratch: (group + 1) * (len + 1) + group * D + D +
// Dv elements.
template <typename S>
[[gnu::always_inline]] inline void decode_task_body(const DecodeParamsT<S>& p, int64_t b, int64_t hk, S* scratch) {
  const int d = p.head_dim, dv = p.v_dim;
  const int64_t group = p.heads / p.kv_heads, len = p.lengths[b], L = p.capacity;
  S* scores = scratch;                  // [group, len + 1]
  S* q = scores + group * (len + 1);    // [group, d]
  S* w = q + group * d;                 // [d]
  S* acc = w + d;                       // [dv]
  const int64_t kv_tok = b * p.kv_heads + hk;
  load_row(p.w, p.w_dtype, kv_tok * d, d, w);
  const S beta = load_one<S>(p.beta, p.beta_dtype, kv_tok);
  S g_last[kMaxDecodeGroup];
  for (int64_t gi = 0; gi < group; ++gi) {
    const int64_t hq = hk * group + gi;
    load_row(p.q, p.dtype, (b * p.heads + hq) * d, d, q + gi * d);
    if (p.gates != nullptr) {
      S& gl = p.g_last[b * p.heads + hq];
      gl += load_one<S>(p.g, p.g_dtype, b * p.heads + hq);
      p.gates[(b * p.heads + hq) * L + len] = gl;
      g_last[gi] = gl;
    }
  }
  S* keys = p.keys + kv_tok * L * d;
  S* values = p.values + kv_tok * L * dv;
  load_row(p.k, p.dtype, kv_tok * d, d, keys + len * d);
  load_row(p.v, p.dtype, kv_tok * dv, dv, values + len * dv);
  for (int64_t j = 0; j <= len; ++j) {
    S* kj = keys + j * d;
    if (j < len) {
      const S c = beta * dot8(kj, w, d);
      for (int x = 0; x < d; ++x) kj[x] -= c * w[x];
    }
    for (int64_t gi = 0; gi < group; ++gi) scores[gi * (len + 1) + j] = dot8(q + gi * d, kj, d);
  }
  for (int64_t gi = 0; gi < group; ++gi) {
    const int64_t hq = hk * group + gi;
    S* s = scores + gi * (len + 1);
    const S* gates = p.gates == nullptr ? nullptr : p.gates + (b * p.heads + hq) * L;
    S mx = -std::numeric_limits<S>::infinity();
    for (int64_t j = 0; j <= len; ++j) {
      s[j] = p.scale * (s[j] + (gates == nullptr ? S(0) : g_last[gi] - gates[j]));
      mx = std::max(mx, s[j]);
    }
    S sum = 0;
    for (int64_t j = 0; j <= len; ++j) sum += (s[j] = std::exp(s[j] - mx));
    std::fill_n(acc, dv, S(0));
    for (int64_t j = 0; j <= len; ++j) {
      const S pj = s[j];
      const S* vj = values + j * dv;
      for (int x = 0; x < dv; ++x) acc[x] += pj * vj[x];
    }
    const S inv = S(1) / sum;
    for (int x = 0; x < dv; ++x) acc[x] *= inv;
    store_row(p.o, p.dtype, (b * p.heads + hq) * dv, dv, acc);
  }
}

template <typename S>
void decode_task_portable(const DecodeParamsT<S>& p, int64_t b, int64_t hk, S* scratch) {
  decode_task_body(p, b, hk, scratch);
}
#if BLOCKOPS_X86_DISPATCH
BLOCKOPS_TARGET_AVX2 void decode_task_avx2(const DecodeParams& p, int64_t b, int64_t hk, float* scratch) {
  decode_task_body(p, b, hk, scratch);
}
#endif

// S from q_t's dtype: double for fp64 (an fp64 cache; the portable body), else float.
template <typename S>
at::Tensor decode_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
                       const at::Tensor& beta, const c10::optional<at::Tensor>& g, const at::Tensor& keys,
                       const at::Tensor& values, const at::Tensor& lengths, const c10::optional<at::Tensor>& gates,
                       const c10::optional<at::Tensor>& g_last, double scale) {
  at::Tensor lengths_host;
  DecodeParamsT<S> p = describe_decode<S>(kDecode, q, k, v, w, beta, g, keys, values, lengths, gates, g_last, scale,
                                   lengths_host);
  at::Tensor o = at::empty({p.batch, p.heads, p.v_dim}, q.options());
  p.o = o.data_ptr();
  decode_counter.hit();
  const int64_t group = p.heads / p.kv_heads;
#if BLOCKOPS_X86_DISPATCH
  const bool avx2 = std::is_same_v<S, float> && cpu_has_avx2_fma();
#endif
  at::parallel_for(0, p.batch * p.kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<S> scratch;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / p.kv_heads, hk = task % p.kv_heads;
      scratch.resize(static_cast<size_t>((group + 1) * (p.lengths[b] + 1) + group * p.head_dim + p.head_dim + p.v_dim));
#if BLOCKOPS_X86_DISPATCH
      if constexpr (std::is_same_v<S, float>) {
        if (avx2) {
          decode_task_avx2(p, b, hk, scratch.data());
          continue;
        }
      }
#endif
      decode_task_portable(p, b, hk, scratch.data());
    }
  });
  return o;
}

}  // namespace

at::Tensor path_decode_step_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
                                const at::Tensor& beta, const c10::optional<at::Tensor>& g, const at::Tensor& keys,
                                const at::Tensor& values, const at::Tensor& lengths,
                                const c10::optional<at::Tensor>& gates, const c10::optional<at::Tensor>& g_last,
                                double scale) {
  return q.scalar_type() == at::kDouble
             ? decode_step<double>(q, k, v, w, beta, g, keys, values, lengths, gates, g_last, scale)
             : decode_step<float>(q, k, v, w, beta, g, keys, values, lengths, gates, g_last, scale);
}

}  // namespace blockops::path_attention
