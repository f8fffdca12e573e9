// What the CPU kernels of every family share: element conversions and the AVX2 math more than one family needs
// (softmax exponentials, horizontal reductions). Include only from CPU sources. A helper two kernel files need goes
// here, not into a copy. The AVX2 functions are compiled for AVX2/FMA (BLOCKOPS_TARGET_AVX2) and must only be
// called when cpu_has_avx2_fma() is true.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <atomic>
#include <cstdint>
#include <type_traits>

#include "dtype.h"
#include "macros.h"

namespace blockops {

// The C++ element type of a DType (BLOCKOPS_DTYPE_SWITCH gives the DType as a constant).
template <DType T> struct cpu_element { using type = float; };
template <> struct cpu_element<DType::kF16> { using type = c10::Half; };
template <> struct cpu_element<DType::kBF16> { using type = c10::BFloat16; };
template <DType T> using cpu_element_t = typename cpu_element<T>::type;

// Typed element -> fp32, for kernels templated on the element type (float, c10::Half or c10::BFloat16).
inline float to_float(float v) { return v; }
inline float to_float(c10::Half v) { return static_cast<float>(v); }
inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }

// Spins until counter >= target: the barrier between two phases of one parallel region whose items are handed out
// from shared counters (every thread that took an item of the first phase finishes it without waiting, so this
// never waits on a thread that is itself waiting).
inline void spin_until_at_least(const std::atomic<int64_t>& counter, int64_t target) {
  while (counter.load(std::memory_order_acquire) < target) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }
}

}  // namespace blockops

#if BLOCKOPS_X86_DISPATCH
#include <immintrin.h>

namespace blockops {

// 2^x: 2^round(x) (exponent bits) times a degree-6 polynomial of 2^f, |f| <= 1/2 (Taylor series of e^(f ln 2):
// relative error < 2e-7). Inputs below -126 (including -inf) give exactly 0; inputs are clamped at 127.
BLOCKOPS_TARGET_AVX2 inline __m256 exp2_avx2(__m256 x) {
  // NaN in, NaN out (softmax rows with a NaN score must come out NaN): the clamps take x as their second operand,
  // which maxps / minps return when either is NaN, and `keep` is true for unordered x; the NaN then survives the
  // polynomial and the exponent add (cvtps(NaN) << 23 is 0). Same instructions as the NaN-dropping order.
  const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(-126.f), _CMP_NLT_UQ);
  x = _mm256_min_ps(_mm256_set1_ps(127.f), _mm256_max_ps(_mm256_set1_ps(-126.f), x));
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(x, n);
  __m256 p = _mm256_set1_ps(1.5403530393381606e-4f);                       // ln2^6 / 720
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146428443e-3f));       // ln2^5 / 120
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618129107628477e-3f));        // ln2^4 / 24
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550410866482158e-2f));        // ln2^3 / 6
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402265069591007e-1f));        // ln2^2 / 2
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931471805599453e-1f));        // ln2
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
  const __m256 r = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
  return _mm256_and_ps(r, keep);
}

// Sum and maximum of the 8 lanes.
BLOCKOPS_TARGET_AVX2 inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

BLOCKOPS_TARGET_AVX2 inline float hmax_avx2(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// ---- 8 fp16 or bf16 values (from src, any alignment) widened to fp32 lanes: F16C for fp16; bf16 is the high half
// of an fp32. (dllm and block_cache CPU kernels.)
BLOCKOPS_TARGET_AVX2 inline __m256 load8_f16_avx2(const void* src) {
  return _mm256_cvtph_ps(_mm_loadu_si128(static_cast<const __m128i*>(src)));
}

BLOCKOPS_TARGET_AVX2 inline __m256 load8_bf16_avx2(const void* src) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(static_cast<const __m128i*>(src)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

// n fp16 / bf16 values -> fp32 (convert_to_fp32 below picks this where the CPU has AVX2).
BLOCKOPS_TARGET_AVX2 inline void convert_to_fp32_avx2(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, load8_f16_avx2(src + i));
  for (; i < n; ++i) dst[i] = to_float(src[i]);
}

BLOCKOPS_TARGET_AVX2 inline void convert_to_fp32_avx2(const c10::BFloat16* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, load8_bf16_avx2(src + i));
  for (; i < n; ++i) dst[i] = to_float(src[i]);
}

}  // namespace blockops

#endif  // BLOCKOPS_X86_DISPATCH

namespace blockops {

// n fp16 / bf16 / fp32 values -> fp32: the AVX2 loop where `avx2` (cpu_has_avx2_fma()), else element by element.
template <typename T>
inline void convert_to_fp32(const T* src, float* dst, int64_t n, bool avx2) {
#if BLOCKOPS_X86_DISPATCH
  if constexpr (!std::is_same_v<T, float>) {
    if (avx2) return convert_to_fp32_avx2(src, dst, n);
  }
#endif
  (void)avx2;
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}

}  // namespace blockops
