// Turn a runtime choice into a template parameter (flash-attention's static_switch.h idiom):
//   BITS_SWITCH(bits, kBits, [&] { kernel<kBits>(...); });
// Keep the lists short: every case is one more instantiation to compile. BLOCKOPS_STATIC_CASE is torch-free
// (CUDA kernel files build their own switches from it); BITS_SWITCH reports an unsupported value through
// torch and is for the torch-facing files.
#pragma once

#define BLOCKOPS_STATIC_CASE(N, NAME, ...) \
  case N: {                                \
    constexpr int NAME = N;                \
    return __VA_ARGS__();                  \
  }

// bits in 1..8 (the bitpack family).
#define BITS_SWITCH(BITS, NAME, ...)                                             \
  [&] {                                                                          \
    switch (BITS) {                                                              \
      BLOCKOPS_STATIC_CASE(1, NAME, __VA_ARGS__)                                   \
      BLOCKOPS_STATIC_CASE(2, NAME, __VA_ARGS__)                                   \
      BLOCKOPS_STATIC_CASE(3, NAME, __VA_ARGS__)                                   \
      BLOCKOPS_STATIC_CASE(4, NAME, __VA_ARGS__)                                   \
      BLOCKOPS_STATIC_CASE(5, NAME, __VA_ARGS__)                                   \
      BLOCKOPS_STATIC_CASE(6, NAME, __VA_ARGS__)                                   \
      BLOCKOPS_STATIC_CASE(7, NAME, __VA_ARGS__)                                   \
      BLOCKOPS_STATIC_CASE(8, NAME, __VA_ARGS__)                                   \
      default: TORCH_INTERNAL_ASSERT(false, "BITS_SWITCH: unsupported bits ", BITS); \
    }                                                                            \
  }()
