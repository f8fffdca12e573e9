// Device-side loads, stores and packing of the floating dtypes, shared by every CUDA kernel family.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../dtype.h"

namespace blockops {

// Scales, zeros, bias and activations come in three dtypes. Reading them through a switch on a grid-uniform
// value, away from the inner loops, keeps the kernel instantiations few.
__device__ __forceinline__ float load_float(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::kF16: return __half2float(static_cast<const __half*>(p)[i]);
    case DType::kBF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

// The single rounding of an fp32 result to the output dtype (round to nearest even, as torch does).
__device__ __forceinline__ void store_float(void* p, DType t, int64_t i, float v) {
  switch (t) {
    case DType::kF16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    case DType::kBF16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    default: static_cast<float*>(p)[i] = v; break;
  }
}

// Two fp32 values rounded to T (__half or __nv_bfloat16) and packed as one 32-bit register, lo in the low half:
// the register an mma operand fragment (or a 4-byte store) takes.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t u;
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 v = __floats2half2_rn(lo, hi);
    memcpy(&u, &v, sizeof(u));
  } else {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    memcpy(&u, &v, sizeof(u));
  }
  return u;
}

}  // namespace blockops
