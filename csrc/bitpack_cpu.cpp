// Bit packing on the CPU: the CPU kernels and their glue (the CPU dispatch registration); the argument checks it
// calls are bitpack_op.cpp's, shared with the CUDA glue.
//
// Work split: the packed tensor has outer * words rows of `inner` int32 words; at::parallel_for hands out
// ranges of rows. Inside a row the loop over `inner` is unit-stride, so the compiler vectorises it
// (AVX2 variant chosen at run time); with inner == 1 (packing the last dim) each word gathers its p
// consecutive values.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "bitpack_op.h"
#include "cpu_features.h"
#include "introspection.h"
#include "static_switch.h"

namespace blockops::bitpack {

namespace {

KernelCounter pack_counter(kFamily, "pack_bits.cpu");
KernelCounter unpack_counter(kFamily, "unpack_bits.cpu");
FamilyRegistration family(kFamily, cpu_isa_name);

// Rows [begin, end) of the packed tensor, each `inner` words wide. kBits is a template parameter so the
// per-word loops have constant trip counts and shifts (unrolled, vectorised). Returns true if a value was
// out of range.
template <int kBits, typename T>
__attribute__((always_inline)) inline bool pack_rows(const T* values, int32_t* out, const Geometry& g,
                                                      int64_t begin, int64_t end) {
  constexpr int kPer = values_per_word(kBits);
  uint64_t high = 0;  // OR of every value's bits above kBits: non-zero means out of range
  uint32_t* words = reinterpret_cast<uint32_t*>(out);
  // (o, r) of the row advance incrementally: a 64-bit division per word would cost more than the packing.
  for (int64_t row = begin, o = begin / g.words(), r = begin % g.words(); row < end;
       ++row, r = (r + 1 == g.words()) ? 0 : r + 1, o += (r == 0)) {
    const T* src = values + (o * g.length + r * kPer) * g.inner;
    uint32_t* dst = words + row * g.inner;
    const int count = g.values_in_word(r);
    if (g.inner == 1) {
      uint32_t word = 0;
      if (count == kPer) {
#pragma GCC unroll 32
        for (int t = 0; t < kPer; ++t) {
          high |= static_cast<uint64_t>(static_cast<int64_t>(src[t])) >> kBits;
          word |= place(src[t], t, kBits);
        }
      } else {
        for (int t = 0; t < count; ++t) {
          high |= static_cast<uint64_t>(static_cast<int64_t>(src[t])) >> kBits;
          word |= place(src[t], t, kBits);
        }
      }
      dst[0] = word;
      continue;
    }
    for (int64_t i = 0; i < g.inner; ++i) dst[i] = 0;
    for (int t = 0; t < count; ++t) {
      const T* lane = src + t * g.inner;
      for (int64_t i = 0; i < g.inner; ++i) {
        high |= static_cast<uint64_t>(static_cast<int64_t>(lane[i])) >> kBits;
        dst[i] |= place(lane[i], t, kBits);
      }
    }
  }
  return high != 0;
}

template <int kBits, typename T>
BLOCKOPS_TARGET_AVX2 bool pack_rows_avx2(const T* values, int32_t* out, const Geometry& g, int64_t b, int64_t e) {
  return pack_rows<kBits>(values, out, g, b, e);
}

template <int kBits, typename T>
bool pack_rows_portable(const T* values, int32_t* out, const Geometry& g, int64_t b, int64_t e) {
  return pack_rows<kBits>(values, out, g, b, e);
}

template <int kBits>
__attribute__((always_inline)) inline void unpack_rows(const int32_t* packed, uint8_t* out, const Geometry& g,
                                                        int64_t begin, int64_t end) {
  constexpr int kPer = values_per_word(kBits);
  const uint32_t* words = reinterpret_cast<const uint32_t*>(packed);
  for (int64_t row = begin, o = begin / g.words(), r = begin % g.words(); row < end;
       ++row, r = (r + 1 == g.words()) ? 0 : r + 1, o += (r == 0)) {
    const uint32_t* src = words + row * g.inner;
    uint8_t* dst = out + (o * g.length + r * kPer) * g.inner;
    const int count = g.values_in_word(r);
    if (g.inner == 1) {
      const uint32_t word = src[0];
      if (count == kPer) {
#pragma GCC unroll 32
        for (int t = 0; t < kPer; ++t) dst[t] = static_cast<uint8_t>(extract(word, t, kBits));
      } else {
        for (int t = 0; t < count; ++t) dst[t] = static_cast<uint8_t>(extract(word, t, kBits));
      }
      continue;
    }
    for (int t = 0; t < count; ++t) {
      uint8_t* lane = dst + t * g.inner;
      for (int64_t i = 0; i < g.inner; ++i) lane[i] = static_cast<uint8_t>((src[i] >> (kBits * t)) & value_mask(kBits));
    }
  }
}

template <int kBits>
BLOCKOPS_TARGET_AVX2 void unpack_rows_avx2(const int32_t* p, uint8_t* out, const Geometry& g, int64_t b, int64_t e) {
  unpack_rows<kBits>(p, out, g, b, e);
}

template <int kBits>
void unpack_rows_portable(const int32_t* p, uint8_t* out, const Geometry& g, int64_t b, int64_t e) {
  unpack_rows<kBits>(p, out, g, b, e);
}

// Rows per task: enough values that thread start-up is amortised (~64K values per task).
int64_t grain_rows(const Geometry& g) {
  const int64_t values_per_row = g.inner * g.per_word();
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, values_per_row));
}

at::Tensor pack_bits_cpu(const at::Tensor& values, int64_t bits, int64_t dim) {
  const Problem p = check_pack(values, bits, dim);
  const Geometry& g = p.geometry;
  at::Tensor out = at::empty(p.output_sizes, values.options().dtype(at::kInt));
  if (out.numel() == 0) return out;
  pack_counter.hit();
  std::atomic<bool> bad{false};
  AT_DISPATCH_INTEGRAL_TYPES(values.scalar_type(), "pack_bits_cpu", [&] {
    const scalar_t* src = values.const_data_ptr<scalar_t>();
    int32_t* dst = out.mutable_data_ptr<int32_t>();
    const bool avx2 = cpu_has_avx2_fma();
    BLOCKOPS_BITS_SWITCH(g.bits, kBits, TORCH_INTERNAL_ASSERT(false, "unsupported bits ", g.bits), [&] {
      at::parallel_for(0, g.outer * g.words(), grain_rows(g), [&](int64_t begin, int64_t end) {
        const bool chunk_bad = avx2 ? pack_rows_avx2<kBits>(src, dst, g, begin, end)
                                    : pack_rows_portable<kBits>(src, dst, g, begin, end);
        if (chunk_bad) bad.store(true, std::memory_order_relaxed);
      });
    });
  });
  if (bad.load()) raise_out_of_range(values, g.bits);
  return out;
}

at::Tensor unpack_bits_cpu(const at::Tensor& packed, int64_t bits, int64_t size, int64_t dim) {
  const Problem p = check_unpack(packed, bits, size, dim);
  const Geometry& g = p.geometry;
  at::Tensor out = at::empty(p.output_sizes, packed.options().dtype(at::kByte));
  if (out.numel() == 0) return out;
  unpack_counter.hit();
  const int32_t* src = packed.const_data_ptr<int32_t>();
  uint8_t* dst = out.mutable_data_ptr<uint8_t>();
  const bool avx2 = cpu_has_avx2_fma();
  BLOCKOPS_BITS_SWITCH(g.bits, kBits, TORCH_INTERNAL_ASSERT(false, "unsupported bits ", g.bits), [&] {
    at::parallel_for(0, g.outer * g.words(), grain_rows(g), [&](int64_t begin, int64_t end) {
      avx2 ? unpack_rows_avx2<kBits>(src, dst, g, begin, end) : unpack_rows_portable<kBits>(src, dst, g, begin, end);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(blockops, CPU, m) {
  m.impl("pack_bits", &pack_bits_cpu);
  m.impl("unpack_bits", &unpack_bits_cpu);
}

}  // namespace blockops::bitpack
