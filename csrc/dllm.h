// Masked diffusion LM decoding (family "dllm", Fast-dLLM v1/v2): the numerics shared by the CPU kernels
// (dllm_cpu.cpp), the CUDA kernels (kernels/dllm.cu) and, through the ops, the Python references. Torch-free.
//
// Confidence-aware unmasking (docs: /shared/reference/caching.md, "Diffusion LLMs"). For row b of logits [B, L, V]:
//
//   candidates  C_b = { l : masked[b, l] and lo_b <= l < hi_b }      (block_bounds[b] = (lo_b, hi_b), any integers)
//   per l in C_b, one pass over the vocabulary (online max / sum-exp, no softmax tensor):
//       tokens[b, l] = argmax_v logits[b, l, v]       (first index among equal maxima, as torch.argmax)
//       conf[b, l]   = softmax(logits[b, l])[tokens] = 1 / sum_v exp(logits[b, l, v] - max)
//       (a row with a NaN logit: tokens = its first NaN, conf = NaN, as torch.argmax and softmax give)
//   rank every candidate by (conf descending, position ascending) -- NaN confidence ranks as -inf -- then
//   accept the candidate of rank r (0-based, so it is the n-th most confident with n = r + 1) iff
//       r < k_b                                         (k_b = max(1, min_tokens[b]): "at least one", or a schedule)
//       or, threshold rule:  conf > threshold
//       or, factor rule:     (n + 1) * (1 - conf) < factor
//   The factor rule is caching.md's "sort confidences descending and accept the top n while (n + 1)(1 - c_n) < f"
//   (Fast-dLLM v1's factor-based parallel decoding: the n-th token needs c_n > 1 - f / (n + 1)). Because c_n
//   does not increase with n, (n + 1)(1 - c_n) does not decrease, so the accepted set is always a prefix of the
//   ranking and each candidate can decide from its own rank: no sort is needed, only ranks.
//   Outside C_b: tokens = -1, conf = -inf, not accepted.
//
// KV slot overwrite (dual cache): cache [B, H, S, D], new [B, H, n, D], positions [B, n] (strictly increasing per
// row, each in [0, S)): cache[b, h, positions[b, j], :] = new[b, h, j, :]. Rows may use different positions.
#pragma once
#include <cmath>
#include <cstdint>

#include "macros.h"

namespace blockops::dllm {

// Running (max, first argmax, sum of exp(x - max)) over part of a vocabulary row: the online softmax state.
struct RowStats {
  float max;
  int64_t argmax;
  float sum;
};

BLOCKOPS_HD RowStats empty_stats() { return RowStats{-INFINITY, 0, 0.f}; }

// exp(from - to) for to >= from, with exp(-inf - (-inf)) read as 0 (a part with no finite logit adds nothing).
BLOCKOPS_HD float rescale(float from, float to) { return from == -INFINITY ? 0.f : expf(from - to); }

// A NaN logit decides its row as torch.argmax / softmax do: the first NaN is the argmax and the confidence is NaN.
BLOCKOPS_HD RowStats nan_stats(int64_t v) { return RowStats{NAN, v, NAN}; }

// True when a state whose maximum mx sits at index ix beats one with (my, iy): NaN above every number
// (torch.argmax), then the larger maximum; equal maxima (and two NaNs) keep the lower index.
BLOCKOPS_HD bool beats(float mx, int64_t ix, float my, int64_t iy) {
  const bool x_nan = mx != mx, y_nan = my != my;
  if (x_nan || y_nan) return x_nan && (!y_nan || ix < iy);
  return mx > my || (mx == my && ix < iy);
}

// Two states over disjoint index ranges -> the state over their union. Equal maxima keep the lower index,
// so the merged argmax is the first one whatever order the parts are merged in (a NaN max gives a NaN sum).
BLOCKOPS_HD RowStats merge(const RowStats& a, const RowStats& b) {
  const bool b_wins = beats(b.max, b.argmax, a.max, a.argmax);
  const float m = b_wins ? b.max : a.max;
  if (m != m) return b_wins ? b : a;
  const float sum = a.sum * rescale(a.max, m) + b.sum * rescale(b.max, m);
  return RowStats{m, b_wins ? b.argmax : a.argmax, sum};
}

// Adds one logit x at index v, visited in increasing index order (so ties keep the earlier index).
BLOCKOPS_HD void push(RowStats& s, float x, int64_t v) {
  if (s.max != s.max) return;          // an earlier NaN decided the row
  if (x != x) {
    s = nan_stats(v);
  } else if (x > s.max) {
    s.sum = s.sum * rescale(s.max, x) + 1.f;
    s.max = x;
    s.argmax = v;
  } else if (s.max != -INFINITY) {
    s.sum += expf(x - s.max);
  }
}

// Softmax probability of the argmax: exp(max - max) / sum. NaN when the row has no finite logit or a NaN one (as
// softmax).
BLOCKOPS_HD float confidence(const RowStats& s) { return s.max == -INFINITY ? NAN : 1.f / s.sum; }

enum class Rule : int { kThreshold = 0, kFactor = 1 };

struct UnmaskRule {
  Rule rule;
  float threshold;  // threshold rule: accept conf > threshold
  float factor;     // factor rule: accept (n + 1)(1 - conf) < factor
};

// The ranking key: NaN confidences rank last (with -inf).
BLOCKOPS_HD float rank_key(float conf) { return conf != conf ? -INFINITY : conf; }

// True when candidate (conf_a, pos_a) ranks before candidate (conf_b, pos_b).
BLOCKOPS_HD bool ranks_before(float conf_a, int64_t pos_a, float conf_b, int64_t pos_b) {
  const float ka = rank_key(conf_a), kb = rank_key(conf_b);
  return ka > kb || (ka == kb && pos_a < pos_b);
}

// Whether the candidate of 0-based rank r is unmasked; k = max(1, min_tokens of the row).
BLOCKOPS_HD bool accept(int64_t r, float conf, int64_t k, const UnmaskRule& u) {
  if (r < k) return true;
  if (u.rule == Rule::kThreshold) return conf > u.threshold;
  return static_cast<float>(r + 2) * (1.f - conf) < u.factor;
}

BLOCKOPS_HD int64_t min_tokens_of(const int64_t* min_tokens, int64_t b) {
  const int64_t k = min_tokens == nullptr ? 1 : min_tokens[b];
  return k < 1 ? 1 : k;
}

// Geometry and pointers of one dllm_unmask call (flash-attention's params-struct idiom).
struct UnmaskParams {
  const void* logits;        // [B, L, V], element (b, l, v) at b * stride_b + l * stride_l + v
  int64_t stride_b, stride_l;
  const bool* masked;        // [B, L] contiguous
  const int64_t* bounds;     // [B, 2] contiguous: (lo, hi)
  const int64_t* min_tokens; // [B] or null (k = 1)
  int64_t* tokens;           // [B, L] out
  bool* unmask;              // [B, L] out
  float* conf;               // [B, L] out
  int64_t B, L, V;
  UnmaskRule rule;
};

BLOCKOPS_HD bool is_candidate(const UnmaskParams& p, int64_t b, int64_t l) {
  return p.masked[b * p.L + l] && l >= p.bounds[2 * b] && l < p.bounds[2 * b + 1];
}

// Geometry and pointers of one dllm_kv_overwrite call.
struct OverwriteParams {
  void* cache;                // [B, H, S, D] contiguous
  const void* src;            // [B, H, n, D], element (b, h, j, d) at b * sb + h * sh + j * sj + d
  int64_t sb, sh, sj;
  const int64_t* positions;   // [B, n] contiguous
  int64_t B, H, S, n, D;
  int element_bytes;          // 2 or 4
};

}  // namespace blockops::dllm
