// CPU-emulation test of the bitpack CUDA kernels (bitpack.cu through gen_emu.py): pack_bits for every bit width and
// element type on awkward [outer, length, inner] geometries against an independent reference (written here from the
// layout, not from bitpack.h's helpers), the out-of-range flag (too large and negative values, and no false
// alarms), and unpack_bits (garbage in the unused high bits and in the padding of the last word is ignored).
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "bitpack_launch.h"
#include "harness.h"
using namespace blockops::bitpack;

static std::mt19937 rng(2718);

struct Shape {
  int64_t outer, length, inner;
};

// Word r of lane (o, i): value j = r * p + t at bits [bits * t, bits * t + bits), j < length.
static uint32_t reference_word(const std::vector<int64_t>& v, const Shape& s, int bits, int64_t o, int64_t r,
                               int64_t i) {
  const int p = 32 / bits;
  uint32_t word = 0;
  for (int t = 0; t < p && r * p + t < s.length; ++t)
    word |= static_cast<uint32_t>(v[(o * s.length + r * p + t) * s.inner + i]) << (bits * t);
  return word;
}

static std::string config(const char* what, const Shape& s, int bits, const char* type) {
  char buf[160];
  snprintf(buf, sizeof buf, "%s bits=%d type=%s outer=%ld length=%ld inner=%ld", what, bits, type, (long)s.outer,
           (long)s.length, (long)s.inner);
  return buf;
}

template <typename T>
static void test_pack(const Shape& s, int bits, IntType type, const char* name) {
  const Geometry g{s.outer, s.length, s.inner, bits};
  const int64_t n = s.outer * s.length * s.inner, words = s.outer * g.words() * s.inner;
  std::vector<int64_t> values(n);
  TypedBuf<T> in(n);
  for (int64_t k = 0; k < n; ++k) {
    values[k] = std::uniform_int_distribution<int64_t>(0, (1 << bits) - 1)(rng);
    in[k] = static_cast<T>(values[k]);
  }
  TypedBuf<int32_t> out(words);
  int32_t bad = 0;
  const std::string cfg = config("pack", s, bits, name);
  report(launch_pack_bits(in.p, type, out.p, &bad, g, nullptr) == cudaSuccess, "launch", cfg);
  bool same = true;
  for (int64_t o = 0; o < s.outer; ++o)
    for (int64_t r = 0; r < g.words(); ++r)
      for (int64_t i = 0; i < s.inner; ++i)
        same &= static_cast<uint32_t>(out[(o * g.words() + r) * s.inner + i]) == reference_word(values, s, bits, o, r, i);
  report(same, "packed words", cfg);
  report(bad == 0, "no range error for in-range values", cfg);
  if (n == 0) return;
  // One value out of range, at a random place: the flag is raised (its word's other values stay intact: masked).
  const int64_t at = std::uniform_int_distribution<int64_t>(0, n - 1)(rng);
  const bool is_signed = static_cast<T>(-1) < static_cast<T>(0);
  if (bits < 8 * static_cast<int>(sizeof(T))) {
    in[at] = static_cast<T>(int64_t{1} << bits);
    bad = 0;
    launch_pack_bits(in.p, type, out.p, &bad, g, nullptr);
    report(bad == 1, "range error for 2^bits", cfg);
  }
  if (is_signed) {
    in[at] = static_cast<T>(-1);
    bad = 0;
    launch_pack_bits(in.p, type, out.p, &bad, g, nullptr);
    report(bad == 1, "range error for -1", cfg);
  }
}

static void test_unpack(const Shape& s, int bits) {
  const Geometry g{s.outer, s.length, s.inner, bits};
  const int64_t n = s.outer * s.length * s.inner, words = s.outer * g.words() * s.inner;
  TypedBuf<int32_t> in(words);
  for (int64_t k = 0; k < words; ++k) in[k] = static_cast<int32_t>(rng());  // garbage in unused bits and padding
  TypedBuf<uint8_t> out(n);  // exact size: a write past the last value is an ASan error
  const std::string cfg = config("unpack", s, bits, "int32");
  report(launch_unpack_bits(in.p, out.p, g, nullptr) == cudaSuccess, "launch", cfg);
  const int p = 32 / bits;
  bool same = true;
  for (int64_t o = 0; o < s.outer; ++o)
    for (int64_t j = 0; j < s.length; ++j)
      for (int64_t i = 0; i < s.inner; ++i) {
        const uint32_t word = static_cast<uint32_t>(in[(o * g.words() + j / p) * s.inner + i]);
        same &= out[(o * s.length + j) * s.inner + i] == ((word >> (bits * (j % p))) & ((1u << bits) - 1u));
      }
  report(same, "unpacked values", cfg);
}

int main() {
  const bool quick = getenv("EMU_QUICK") != nullptr;
  std::vector<Shape> shapes = {{1, 1, 1}, {1, 10, 1}, {2, 37, 3}, {3, 33, 5}, {1, 100, 1}, {0, 5, 2}, {2, 0, 3}};
  if (!quick) shapes.push_back({4, 321, 9});
  for (int bits = 1; bits <= 8; ++bits) {
    for (const Shape& s : shapes) {
      test_pack<uint8_t>(s, bits, IntType::kU8, "u8");
      test_unpack(s, bits);
      if (quick && bits % 3 != 1) continue;  // the quick list still covers every type (bits 1, 4, 7)
      test_pack<int8_t>(s, bits, IntType::kI8, "i8");
      test_pack<int16_t>(s, bits, IntType::kI16, "i16");
      test_pack<int32_t>(s, bits, IntType::kI32, "i32");
      test_pack<int64_t>(s, bits, IntType::kI64, "i64");
    }
  }
  return summary();
}
