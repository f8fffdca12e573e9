// Cached-block skipping on the CPU (family "block_cache"; layout and numerics in csrc/block_cache.h, argument checks
// in block_cache_op.cpp): the CPU kernels and their glue.
//
// relative_l1 / relative_l1_residual -- at::parallel_for hands out (sample, chunk) tasks; a task walks its
// chunk's tokens row by row, 16 elements per step in two 8-float vectors, one pass over every input:
//
//     token t of the chunk:  residual[t, :] = output[t, :] - input[t, :]          (residual op, every token)
//                            if t % stride == 0:
//                              x = residual or output;  |x - ref| -> num lanes,  |ref| -> den lanes
//
// Element c of a row goes to lane c % 16 (body: the two vector accumulators; row tails: 16 scalar
// accumulators), the lanes are added in a fixed tree at the end of the chunk. The portable kernel is the same
// code on 8-float structs, so both ISAs give bit-identical partials (no FMA is involved).
// apply_residual -- elementwise, 8 at a time. cache_update -- a gated parallel copy.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "block_cache_op.h"
#include "cpu_common.h"
#include "cpu_features.h"
#include "dtype.h"
#include "glue.h"
#include "introspection.h"
#include "static_switch.h"

namespace blockops::block_cache {
namespace {

KernelCounter relative_l1_counter(kFamily, "relative_l1.cpu");
KernelCounter relative_l1_residual_counter(kFamily, "relative_l1_residual.cpu");
KernelCounter apply_residual_counter(kFamily, "apply_residual.cpu");
KernelCounter cache_update_counter(kFamily, "cache_update.cpu");
FamilyRegistration family(kFamily, cpu_isa_name);

// ---- element access: scalar (both paths' row tails) -------------------------------------------------------

template <DType kT>
inline float load1(const void* p, int64_t i) {
  if constexpr (kT == DType::kF16) {
    return static_cast<float>(c10::Half(static_cast<const uint16_t*>(p)[i], c10::Half::from_bits()));
  } else if constexpr (kT == DType::kBF16) {
    return static_cast<float>(c10::BFloat16(static_cast<const uint16_t*>(p)[i], c10::BFloat16::from_bits()));
  } else {
    return static_cast<const float*>(p)[i];
  }
}

// Round to nearest even, as torch's own conversions do.
template <DType kT>
inline void store1(void* p, int64_t i, float v) {
  if constexpr (kT == DType::kF16) {
    static_cast<uint16_t*>(p)[i] = c10::Half(v).x;
  } else if constexpr (kT == DType::kBF16) {
    static_cast<uint16_t*>(p)[i] = c10::BFloat16(v).x;
  } else {
    static_cast<float*>(p)[i] = v;
  }
}

// ---- 8-float vectors: the portable struct and AVX2 --------------------------------------------------------

struct Portable {
  struct V {
    float v[8];
  };
  static V zero() { return V{}; }
  template <DType kT>
  static V load(const void* p, int64_t i) {
    V r;
    for (int j = 0; j < 8; ++j) r.v[j] = load1<kT>(p, i + j);
    return r;
  }
  template <DType kT>
  static void store(void* p, int64_t i, const V& a) {
    for (int j = 0; j < 8; ++j) store1<kT>(p, i + j, a.v[j]);
  }
  static V add(const V& a, const V& b) {
    V r;
    for (int j = 0; j < 8; ++j) r.v[j] = a.v[j] + b.v[j];
    return r;
  }
  static V sub(const V& a, const V& b) {
    V r;
    for (int j = 0; j < 8; ++j) r.v[j] = a.v[j] - b.v[j];
    return r;
  }
  static V abs(const V& a) {
    V r;
    for (int j = 0; j < 8; ++j) r.v[j] = std::fabs(a.v[j]);
    return r;
  }
  static void spill(const V& a, float* out) { std::memcpy(out, a.v, sizeof(a.v)); }
};

#if BLOCKOPS_X86_DISPATCH
// The __m256 helpers are only ever inlined into BLOCKOPS_TARGET_AVX2 callers, so no __m256 crosses a call
// boundary compiled for the baseline ISA: the ABI note GCC prints for the templates does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
struct Avx2 {
  using V = __m256;
  BLOCKOPS_TARGET_AVX2 static V zero() { return _mm256_setzero_ps(); }
  template <DType kT>
  BLOCKOPS_TARGET_AVX2 static V load(const void* p, int64_t i) {
    if constexpr (kT == DType::kF16) {
      return load8_f16_avx2(static_cast<const uint16_t*>(p) + i);
    } else if constexpr (kT == DType::kBF16) {
      return load8_bf16_avx2(static_cast<const uint16_t*>(p) + i);
    } else {
      return _mm256_loadu_ps(static_cast<const float*>(p) + i);
    }
  }
  template <DType kT>
  BLOCKOPS_TARGET_AVX2 static void store(void* p, int64_t i, V a) {
    if constexpr (kT == DType::kF16) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(p) + i),
                       _mm256_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else if constexpr (kT == DType::kBF16) {
      // Round to nearest even on the bits (c10::BFloat16's rule), NaN -> the canonical quiet NaN 0x7FC0.
      const __m256i bits = _mm256_castps_si256(a);
      const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
      __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), odd), 16);
      const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(a, a, _CMP_UNORD_Q));
      rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
      const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(p) + i), packed);
    } else {
      _mm256_storeu_ps(static_cast<float*>(p) + i, a);
    }
  }
  BLOCKOPS_TARGET_AVX2 static V add(V a, V b) { return _mm256_add_ps(a, b); }
  BLOCKOPS_TARGET_AVX2 static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  BLOCKOPS_TARGET_AVX2 static V abs(V a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
  BLOCKOPS_TARGET_AVX2 static void spill(V a, float* out) { _mm256_storeu_ps(out, a); }
};
#endif

// ---- relative L1 (+ residual) over one chunk --------------------------------------------------------------

struct IndicatorArgs {
  const void* x;          // output (or the tensor compared, relative_l1)
  const void* input;      // residual op: the block's input
  const void* reference;  // the cached tensor compared against
  void* residual;         // residual op: written output - input
};

constexpr int kLanes = 16;

// The 16 lanes added in a fixed tree (8, 4, 2, 1 apart), the same on both paths.
inline float reduce_lanes(float* lanes) {
  for (int width = kLanes / 2; width >= 1; width /= 2)
    for (int j = 0; j < width; ++j) lanes[j] += lanes[j + width];
  return lanes[0];
}

// kResidual: write residual = x - input for every token; kCompareResidual: compare that difference (else x).
template <class Ops, DType kT, bool kResidual, bool kCompareResidual>
__attribute__((always_inline)) inline Partial chunk_sums(const IndicatorArgs& a, const Geometry& g, int64_t b,
                                                         int64_t k) {
  using V = typename Ops::V;
  V num0 = Ops::zero(), num1 = Ops::zero(), den0 = Ops::zero(), den1 = Ops::zero();
  float num_tail[kLanes] = {}, den_tail[kLanes] = {};
  const int64_t C = g.channels, body = C / kLanes * kLanes;
  for (int64_t t = g.chunk_begin(k); t < g.chunk_end(k); ++t) {
    const int64_t row = (b * g.tokens + t) * C;
    const bool counted = t % g.stride == 0;
    if (!counted && !kResidual) continue;
    for (int64_t c = 0; c < body; c += kLanes) {
      V x0 = Ops::template load<kT>(a.x, row + c), x1 = Ops::template load<kT>(a.x, row + c + 8);
      if constexpr (kResidual) {
        const V d0 = Ops::sub(x0, Ops::template load<kT>(a.input, row + c));
        const V d1 = Ops::sub(x1, Ops::template load<kT>(a.input, row + c + 8));
        Ops::template store<kT>(a.residual, row + c, d0);
        Ops::template store<kT>(a.residual, row + c + 8, d1);
        if constexpr (kCompareResidual) x0 = d0, x1 = d1;
      }
      if (!counted) continue;
      const V r0 = Ops::template load<kT>(a.reference, row + c), r1 = Ops::template load<kT>(a.reference, row + c + 8);
      num0 = Ops::add(num0, Ops::abs(Ops::sub(x0, r0)));
      num1 = Ops::add(num1, Ops::abs(Ops::sub(x1, r1)));
      den0 = Ops::add(den0, Ops::abs(r0));
      den1 = Ops::add(den1, Ops::abs(r1));
    }
    for (int64_t c = body; c < C; ++c) {
      float x = load1<kT>(a.x, row + c);
      if constexpr (kResidual) {
        const float d = x - load1<kT>(a.input, row + c);
        store1<kT>(a.residual, row + c, d);
        if constexpr (kCompareResidual) x = d;
      }
      if (!counted) continue;
      const float r = load1<kT>(a.reference, row + c);
      num_tail[c % kLanes] += std::fabs(x - r);
      den_tail[c % kLanes] += std::fabs(r);
    }
  }
  float num[kLanes], den[kLanes];
  Ops::spill(num0, num), Ops::spill(num1, num + 8), Ops::spill(den0, den), Ops::spill(den1, den + 8);
  for (int j = 0; j < kLanes; ++j) num[j] += num_tail[j], den[j] += den_tail[j];
  return Partial{reduce_lanes(num), reduce_lanes(den)};
}

template <DType kT, bool kResidual, bool kCompareResidual>
void chunks_portable(const IndicatorArgs& a, const Geometry& g, Partial* partials, int64_t begin, int64_t end) {
  for (int64_t task = begin; task < end; ++task)
    partials[task] = chunk_sums<Portable, kT, kResidual, kCompareResidual>(a, g, task / g.chunks(), task % g.chunks());
}

#if BLOCKOPS_X86_DISPATCH
template <DType kT, bool kResidual, bool kCompareResidual>
BLOCKOPS_TARGET_AVX2 void chunks_avx2(const IndicatorArgs& a, const Geometry& g, Partial* partials, int64_t begin,
                                      int64_t end) {
  for (int64_t task = begin; task < end; ++task)
    partials[task] = chunk_sums<Avx2, kT, kResidual, kCompareResidual>(a, g, task / g.chunks(), task % g.chunks());
}
#endif

// Tasks [begin, end) on the AVX2 path when `avx2` (cpu_has_avx2_fma), else on the portable one.
template <DType kT, bool kResidual, bool kCompareResidual>
void chunks_dispatch(bool avx2, const IndicatorArgs& a, const Geometry& g, Partial* partials, int64_t begin,
                     int64_t end) {
#if BLOCKOPS_X86_DISPATCH
  if (avx2) return chunks_avx2<kT, kResidual, kCompareResidual>(a, g, partials, begin, end);
#endif
  (void)avx2;
  chunks_portable<kT, kResidual, kCompareResidual>(a, g, partials, begin, end);
}

template <bool kResidual, bool kCompareResidual>
at::Tensor indicator_cpu(const IndicatorArgs& a, DType type, const Geometry& g, bool per_sample,
                         const at::TensorOptions& options) {
  std::vector<Partial> partials(static_cast<size_t>(g.batch * g.chunks()));
  const bool avx2 = cpu_has_avx2_fma();
  BLOCKOPS_DTYPE_SWITCH(type, kT, TORCH_INTERNAL_ASSERT(false, "unsupported dtype"), [&] {
    at::parallel_for(0, g.batch * g.chunks(), 1, [&](int64_t begin, int64_t end) {
      chunks_dispatch<kT, kResidual, kCompareResidual>(avx2, a, g, partials.data(), begin, end);
    });
  });
  at::Tensor out = at::empty(indicator_sizes(g, per_sample), options.dtype(at::kFloat));
  float* dst = out.mutable_data_ptr<float>();
  if (per_sample) {
    for (int64_t b = 0; b < g.batch; ++b) dst[b] = reduce_partials(partials.data(), g, b, true);
  } else {
    dst[0] = reduce_partials(partials.data(), g, 0, false);
  }
  return out;
}

at::Tensor relative_l1_cpu(const at::Tensor& current, const at::Tensor& reference, int64_t stride, bool per_sample) {
  const Geometry g = check_indicator_args({&current, &reference}, {"current", "reference"}, stride, kRelativeL1);
  relative_l1_counter.hit();
  const IndicatorArgs a{current.const_data_ptr(), nullptr, reference.const_data_ptr(), nullptr};
  return indicator_cpu<false, false>(a, dtype_of(current.scalar_type()), g, per_sample, current.options());
}

at::Tensor relative_l1_residual_cpu(const at::Tensor& output, const at::Tensor& input, const at::Tensor& reference,
                                    at::Tensor& residual, int64_t stride, bool per_sample, bool compare_residual) {
  const Geometry g = check_indicator_args({&output, &input, &reference, &residual},
                                          {"output", "input", "reference", "residual"}, stride, kRelativeL1Residual);
  relative_l1_residual_counter.hit();
  const IndicatorArgs a{output.const_data_ptr(), input.const_data_ptr(), reference.const_data_ptr(),
                        residual.mutable_data_ptr()};
  const DType type = dtype_of(output.scalar_type());
  return compare_residual ? indicator_cpu<true, true>(a, type, g, per_sample, output.options())
                          : indicator_cpu<true, false>(a, type, g, per_sample, output.options());
}

// ---- apply_residual and cache_update ----------------------------------------------------------------------

constexpr int64_t kElementwiseGrain = 1 << 15;  // elements per task: thread start-up amortised

template <class Ops, DType kT>
__attribute__((always_inline)) inline void add_range(const void* in, const void* res, void* out, int64_t begin,
                                                     int64_t end) {
  int64_t i = begin;
  for (; i + 8 <= end; i += 8)
    Ops::template store<kT>(out, i, Ops::add(Ops::template load<kT>(in, i), Ops::template load<kT>(res, i)));
  for (; i < end; ++i) store1<kT>(out, i, load1<kT>(in, i) + load1<kT>(res, i));
}

template <DType kT>
void add_range_portable(const void* in, const void* res, void* out, int64_t b, int64_t e) {
  add_range<Portable, kT>(in, res, out, b, e);
}

#if BLOCKOPS_X86_DISPATCH
template <DType kT>
BLOCKOPS_TARGET_AVX2 void add_range_avx2(const void* in, const void* res, void* out, int64_t b, int64_t e) {
  add_range<Avx2, kT>(in, res, out, b, e);
}
#endif

// Elements [b, e) on the AVX2 path when `avx2` (cpu_has_avx2_fma), else on the portable one.
template <DType kT>
void add_range_dispatch(bool avx2, const void* in, const void* res, void* out, int64_t b, int64_t e) {
#if BLOCKOPS_X86_DISPATCH
  if (avx2) return add_range_avx2<kT>(in, res, out, b, e);
#endif
  (void)avx2;
  add_range_portable<kT>(in, res, out, b, e);
}

at::Tensor apply_residual_cpu(const at::Tensor& input, const at::Tensor& residual) {
  check_same_layout(input, residual, kApplyResidual, "input", "residual");
  at::Tensor out = at::empty(input.sizes(), input.options());
  if (out.numel() == 0) return out;
  apply_residual_counter.hit();
  const void* in = input.const_data_ptr();
  const void* res = residual.const_data_ptr();
  void* dst = out.mutable_data_ptr();
  if (input.scalar_type() == at::kDouble) {
    // fp64 (CPU only; gradcheck of the ops with a backward): a plain loop, added in fp64.
    const double* a = static_cast<const double*>(in);
    const double* r = static_cast<const double*>(res);
    double* o = static_cast<double*>(dst);
    at::parallel_for(0, input.numel(), kElementwiseGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) o[i] = a[i] + r[i];
    });
    return out;
  }
  const bool avx2 = cpu_has_avx2_fma();
  BLOCKOPS_DTYPE_SWITCH(dtype_of(input.scalar_type()), kT, TORCH_INTERNAL_ASSERT(false, "unsupported dtype"), [&] {
    at::parallel_for(0, input.numel(), kElementwiseGrain, [&](int64_t begin, int64_t end) {
      add_range_dispatch<kT>(avx2, in, res, dst, begin, end);
    });
  });
  return out;
}

bool gate_is_open(const at::Tensor& gate) {
  if (gate.scalar_type() == at::kBool) return *gate.const_data_ptr<bool>();
  return gate.item<double>() != 0.0;  // a CPU tensor: reading it is not a device synchronisation
}

void cache_update_cpu(at::Tensor& cache, const at::Tensor& value, const std::optional<at::Tensor>& gate) {
  check_same_layout(cache, value, kCacheUpdate, "cache", "value");
  if (gate.has_value()) check_gate(*gate, cache, kCacheUpdate);
  cache_update_counter.hit();
  if (gate.has_value() && !gate_is_open(*gate)) return;
  const int64_t bytes = value.numel() * value.element_size();
  const char* src = static_cast<const char*>(value.const_data_ptr());
  char* dst = static_cast<char*>(cache.mutable_data_ptr());
  at::parallel_for(0, bytes, kElementwiseGrain * 4, [&](int64_t begin, int64_t end) {
    std::memcpy(dst + begin, src + begin, end - begin);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(blockops, CPU, m) {
  m.impl("relative_l1", &relative_l1_cpu);
  m.impl("relative_l1_residual", &relative_l1_residual_cpu);
  m.impl("apply_residual", &apply_residual_cpu);
  m.impl("cache_update", &cache_update_cpu);
}

}  // namespace blockops::block_cache
