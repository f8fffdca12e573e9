// What every CUDA kernel family shares: device-side loads, stores and packing of the floating dtypes, warp
// reductions, and the host-side queries their launchers share (device attributes, operand alignment). A helper
// two kernel files need goes here, not into a copy.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cuda_runtime_api.h>

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

// Typed conversions for kernels templated on the element type T (float, __half or __nv_bfloat16).
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

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

// Butterfly reductions over the 32 lanes of a warp: every lane gets the result (both sides of each exchange add
// the same two numbers, so all lanes agree bit for bit). Callers keep the whole warp converged.
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

// An attribute of the current device, or `fallback` when the query fails (no device, no context) or reports
// nothing: launchers size their grids and shared memory from it.
inline int device_attribute(cudaDeviceAttr attr, int fallback) {
  int device = 0;
  int value = 0;
  if (cudaGetDevice(&device) != cudaSuccess || cudaDeviceGetAttribute(&value, attr, device) != cudaSuccess ||
      value <= 0) {
    (void)cudaGetLastError();  // the failed query's error is ours; do not leave it for the next launch check
    return fallback;
  }
  return value;
}

// 16-byte alignment: what cp.async, ldmatrix and the vector loads of the tensor-core kernels need.
inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// ---- Launch arithmetic and device limits (shared by the lowbit and vq kernels) -----------------------------------

// std::min is not a device function without --expt-relaxed-constexpr everywhere; keep int64 explicit.
__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Bytes of one element of a float dtype.
__host__ __device__ __forceinline__ int dtype_bytes(DType t) { return t == DType::kF32 ? 4 : 2; }

constexpr int kDefaultSmem = 48 * 1024;  // dynamic shared memory a launch gets without the per-kernel opt-in
constexpr int kFallbackSms = 132;        // H100 / H200: the SM count grids are sized for when the query fails

inline int multiprocessor_count() { return device_attribute(cudaDevAttrMultiProcessorCount, kFallbackSms); }

// The largest dynamic shared memory a kernel may opt in to on the current device.
inline int max_dynamic_smem() { return device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, kDefaultSmem); }

// The opt-in a launch with `smem` bytes of dynamic shared memory above kDefaultSmem needs (nothing below it).
template <typename Kernel>
cudaError_t allow_dynamic_smem(Kernel kernel, size_t smem) {
  if (smem <= size_t{kDefaultSmem}) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
}

}  // namespace blockops
