// Turn a runtime choice into a template parameter (flash-attention's static_switch.h idiom):
//   BITS_SWITCH(bits, kBits, [&] { kernel<kBits>(...); });
// Keep the lists short: every case is one more instantiation to compile.
#pragma once

#define BLOCKOPS_BITS_CASE(N, NAME, ...) \
  case N: {                              \
    constexpr int NAME = N;              \
    return __VA_ARGS__();                \
  }

// bits in 1..8 (the bitpack family).
#define BITS_SWITCH(BITS, NAME, ...)                                             \
  [&] {                                                                          \
    switch (BITS) {                                                              \
      BLOCKOPS_BITS_CASE(1, NAME, __VA_ARGS__)                                   \
      BLOCKOPS_BITS_CASE(2, NAME, __VA_ARGS__)                                   \
      BLOCKOPS_BITS_CASE(3, NAME, __VA_ARGS__)                                   \
      BLOCKOPS_BITS_CASE(4, NAME, __VA_ARGS__)                                   \
      BLOCKOPS_BITS_CASE(5, NAME, __VA_ARGS__)                                   \
      BLOCKOPS_BITS_CASE(6, NAME, __VA_ARGS__)                                   \
      BLOCKOPS_BITS_CASE(7, NAME, __VA_ARGS__)                                   \
      BLOCKOPS_BITS_CASE(8, NAME, __VA_ARGS__)                                   \
      default: TORCH_INTERNAL_ASSERT(false, "BITS_SWITCH: unsupported bits ", BITS); \
    }                                                                            \
  }()
