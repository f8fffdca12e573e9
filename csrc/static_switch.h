// Turn a runtime choice into a template parameter (flash-attention's static_switch.h idiom), the one way blockops
// does it:
//   BLOCKOPS_BITS_SWITCH(bits, kBits, ON_OTHER, [&] { kernel<kBits>(...); });
// ON_OTHER is the statement run for a value outside the list: `return cudaErrorInvalidValue` in a CUDA launcher,
// TORCH_INTERNAL_ASSERT(false, ...) in torch-facing code. Torch-free, so CUDA kernel files use it too. Keep the
// lists short: every case is one more instantiation to compile.
#pragma once
#include "dtype.h"

#define BLOCKOPS_STATIC_CASE(N, NAME, ...) \
  case N: {                                \
    constexpr int NAME = N;                \
    return __VA_ARGS__();                  \
  }

// bits in 1..8 (the bitpack family).
#define BLOCKOPS_BITS_SWITCH(BITS, NAME, ON_OTHER, ...) \
  [&] {                                                 \
    switch (BITS) {                                     \
      BLOCKOPS_STATIC_CASE(1, NAME, __VA_ARGS__)        \
      BLOCKOPS_STATIC_CASE(2, NAME, __VA_ARGS__)        \
      BLOCKOPS_STATIC_CASE(3, NAME, __VA_ARGS__)        \
      BLOCKOPS_STATIC_CASE(4, NAME, __VA_ARGS__)        \
      BLOCKOPS_STATIC_CASE(5, NAME, __VA_ARGS__)        \
      BLOCKOPS_STATIC_CASE(6, NAME, __VA_ARGS__)        \
      BLOCKOPS_STATIC_CASE(7, NAME, __VA_ARGS__)        \
      BLOCKOPS_STATIC_CASE(8, NAME, __VA_ARGS__)        \
      default: ON_OTHER;                                \
    }                                                   \
  }()

// bits in {2, 3, 4} (the lowbit family's weights).
#define BLOCKOPS_WEIGHT_BITS_SWITCH(BITS, NAME, ON_OTHER, ...) \
  [&] {                                                        \
    switch (BITS) {                                            \
      BLOCKOPS_STATIC_CASE(2, NAME, __VA_ARGS__)               \
      BLOCKOPS_STATIC_CASE(3, NAME, __VA_ARGS__)               \
      BLOCKOPS_STATIC_CASE(4, NAME, __VA_ARGS__)               \
      default: ON_OTHER;                                       \
    }                                                          \
  }()

// ROWS in 1..8 rounded up to a power of two: 1, 2, 4 or 8 (GEMV row counts).
#define BLOCKOPS_POW2_ROWS_SWITCH(ROWS, NAME, ON_OTHER, ...)                                \
  [&] {                                                                                    \
    switch ((ROWS) <= 1 ? 1 : (ROWS) <= 2 ? 2 : (ROWS) <= 4 ? 4 : (ROWS) <= 8 ? 8 : 0) {     \
      BLOCKOPS_STATIC_CASE(1, NAME, __VA_ARGS__)                                           \
      BLOCKOPS_STATIC_CASE(2, NAME, __VA_ARGS__)                                           \
      BLOCKOPS_STATIC_CASE(4, NAME, __VA_ARGS__)                                           \
      BLOCKOPS_STATIC_CASE(8, NAME, __VA_ARGS__)                                           \
      default: ON_OTHER;                                                                   \
    }                                                                                      \
  }()

// ---- The element dtype (dtype.h DType) as `constexpr DType NAME`, for kernels templated on the dtype they load and
// store (cpu_common.h's cpu_element_t<NAME> is its C++ element type).
#define BLOCKOPS_DTYPE_CASE(VALUE, NAME, ...)    \
  case VALUE: {                                  \
    constexpr ::blockops::DType NAME = VALUE;    \
    return __VA_ARGS__();                        \
  }

#define BLOCKOPS_DTYPE_SWITCH(TYPE, NAME, ON_OTHER, ...)                \
  [&] {                                                                 \
    switch (TYPE) {                                                     \
      BLOCKOPS_DTYPE_CASE(::blockops::DType::kF32, NAME, __VA_ARGS__)   \
      BLOCKOPS_DTYPE_CASE(::blockops::DType::kF16, NAME, __VA_ARGS__)   \
      BLOCKOPS_DTYPE_CASE(::blockops::DType::kBF16, NAME, __VA_ARGS__)  \
      default: ON_OTHER;                                                \
    }                                                                   \
  }()

// ---- The compute type of a CPU kernel with a portable fp64 path (GEMM families, for gradcheck): `using NAME =
// double` when IS_F64, else `using NAME = float` (the fp32 kernels, unchanged). CPU-only: checks.h's
// check_float_dtype refuses fp64 on CUDA.
#define BLOCKOPS_FLOAT_SWITCH(IS_F64, NAME, ...) \
  [&] {                                          \
    if (IS_F64) {                                \
      using NAME = double;                       \
      return __VA_ARGS__();                      \
    }                                            \
    using NAME = float;                          \
    return __VA_ARGS__();                        \
  }()
