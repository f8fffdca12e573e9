// Bit packing numerics, torch-free and shared by the CPU kernels (bitpack_cpu.cpp), the CUDA kernels
// (kernels/bitpack.cu) and, through the ops, the Python reference tests.
//
// Layout (the GPTQ / EfficientQAT qweight layout): a tensor is viewed as [outer, length, inner] row-major,
// packing along the middle axis. With p = 32 / bits values per int32 word (bits = 3 gives 10, leaving the
// two high bits unused), value j of a lane lands in word j / p at bits [bits * (j % p), bits * (j % p + 1)):
//
//     word r of lane (o, i):  | unused | v[r*p + p-1] | ... | v[r*p + 1] | v[r*p + 0] |   (LSB on the right)
//
// The last word of a lane is zero-padded when length is not a multiple of p.
#pragma once
#include <cstdint>

#include "macros.h"

namespace blockops::bitpack {

constexpr int kMinBits = 1;
constexpr int kMaxBits = 8;

BLOCKOPS_HD constexpr int values_per_word(int bits) { return 32 / bits; }
BLOCKOPS_HD constexpr uint32_t value_mask(int bits) { return (1u << bits) - 1u; }
BLOCKOPS_HD constexpr int64_t packed_length(int64_t length, int bits) {
  return (length + values_per_word(bits) - 1) / values_per_word(bits);
}

// A tensor seen as [outer, length, inner], packed along `length`.
struct Geometry {
  int64_t outer;
  int64_t length;  // unpacked length along the packed dim
  int64_t inner;
  int bits;

  BLOCKOPS_HD int per_word() const { return values_per_word(bits); }
  BLOCKOPS_HD int64_t words() const { return packed_length(length, bits); }
  // Values of word r that exist (the last word of a lane may be partial).
  BLOCKOPS_HD int values_in_word(int64_t r) const {
    const int64_t left = length - r * per_word();
    return left < per_word() ? static_cast<int>(left) : per_word();
  }
};

// True when v cannot be stored in `bits` bits (negative or too large). Values are widened to int64 first,
// so a negative value becomes a huge unsigned one.
template <typename T>
BLOCKOPS_HD bool out_of_range(T v, int bits) {
  return (static_cast<uint64_t>(static_cast<int64_t>(v)) >> bits) != 0;
}

// Places value t (0-based within its word) into the word. The value is masked so an out-of-range value
// cannot corrupt its neighbours even before the range error is raised.
template <typename T>
BLOCKOPS_HD uint32_t place(T v, int t, int bits) {
  return (static_cast<uint32_t>(static_cast<int64_t>(v)) & value_mask(bits)) << (bits * t);
}

BLOCKOPS_HD uint32_t extract(uint32_t word, int t, int bits) { return (word >> (bits * t)) & value_mask(bits); }

// Packs word r of lane (o, i); sets *bad when a value is out of range.
template <typename T>
BLOCKOPS_HD uint32_t pack_word(const T* values, const Geometry& g, int64_t o, int64_t r, int64_t i, bool* bad) {
  const T* src = values + (o * g.length + r * g.per_word()) * g.inner + i;
  const int count = g.values_in_word(r);
  uint32_t word = 0;
  bool any_bad = false;
  for (int t = 0; t < count; ++t) {
    const T v = src[t * g.inner];
    any_bad |= out_of_range(v, g.bits);
    word |= place(v, t, g.bits);
  }
  *bad |= any_bad;
  return word;
}

// Unpacks word r of lane (o, i) into its values.
BLOCKOPS_HD void unpack_word(uint32_t word, const Geometry& g, int64_t o, int64_t r, int64_t i, uint8_t* out) {
  uint8_t* dst = out + (o * g.length + r * g.per_word()) * g.inner + i;
  const int count = g.values_in_word(r);
  for (int t = 0; t < count; ++t) dst[t * g.inner] = static_cast<uint8_t>(extract(word, t, g.bits));
}

}  // namespace blockops::bitpack
