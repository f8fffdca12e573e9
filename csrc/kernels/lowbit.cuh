// What the fused tensor-core low-bit kernels (lowbit_mma.cu on mma.sync, lowbit_wgmma.cu on Hopper's wgmma) share
// to turn codes into the W_hat pairs an A register holds: the element type's pair and magic, the bit casts, one
// group's constants and the dequantization of a pair of codes (lowbit.h defines W_hat). Device code only, no PTX;
// gen_emu.py inlines it into each kernel file that includes it, so a planted bug here reaches one kernel at a time.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "device_common.cuh"

namespace blockops::lowbit {
namespace {

// The tensor-core input type T (__half or __nv_bfloat16): its pair type and the magic whose mantissa takes a code:
// ULP 1 on [magic, 2 magic), so magic | q == magic + q exactly for q < magic (fp16: 1024, 11-bit significand;
// bf16: 128, 8-bit).
template <typename T>
struct MmaType {
  static constexpr bool kHalf = std::is_same_v<T, __half>;
  using T2 = std::conditional_t<kHalf, __half2, __nv_bfloat162>;
  static constexpr uint32_t kMagic = kHalf ? 0x64006400u : 0x43004300u;
  // {v, v}, rounded to T once.
  static __device__ __forceinline__ T2 splat(float v) {
    if constexpr (kHalf) {
      return __float2half2_rn(v);
    } else {
      return __float2bfloat162_rn(v);
    }
  }
};

// A pair <-> the 32-bit register the mma takes (memcpy: the aliasing-safe bit cast, compiled to nothing).
template <typename T2>
__device__ __forceinline__ uint32_t to_bits(T2 v) {
  uint32_t u;
  memcpy(&u, &v, sizeof(u));
  return u;
}
template <typename T2>
__device__ __forceinline__ T2 from_bits(uint32_t u) {
  T2 v;
  memcpy(&v, &u, sizeof(v));
  return v;
}

// Two small integer codes {lo, hi} in the 16-bit halves of `codes` as exact T values (OR into the magic's
// mantissa, subtract the magic).
template <typename T>
__device__ __forceinline__ uint32_t exact_pair(uint32_t codes) {
  using T2 = typename MmaType<T>::T2;
  return to_bits(__hsub2(from_bits<T2>(codes | MmaType<T>::kMagic), from_bits<T2>(MmaType<T>::kMagic)));
}

// One group's dequantization constants for a thread's kCols columns (out features), as T pairs {v, v}: s, z rounded
// to T, and -(z - T(z)) * s, the part of z * s that T(z) misses (0 when z is a T value, e.g. integral zeros).
template <typename T, int kCols>
struct GroupParams {
  typename MmaType<T>::T2 s[kCols];
  typename MmaType<T>::T2 z[kCols];
  typename MmaType<T>::T2 corr[kCols];
};

// Columns col .. col + kCols - 1 of a scale row and a zero row (elements of `type`).
template <typename T, int kCols>
__device__ __forceinline__ void load_group(GroupParams<T, kCols>& gp, const uint8_t* s_row, const uint8_t* z_row,
                                           DType type, int col) {
#pragma unroll
  for (int j = 0; j < kCols; ++j) {
    const float s = load_float(s_row, type, col + j);
    const float z = load_float(z_row, type, col + j);
    gp.s[j] = MmaType<T>::splat(s);
    gp.z[j] = MmaType<T>::splat(z);
    gp.corr[j] = MmaType<T>::splat((__low2float(gp.z[j]) - z) * s);
  }
}

// W_hat of a pair of exact codes in T (exact_pair) of column j: fma(q - T(z), s, corr). With integral zeros q - z is
// exact and the fma rounds once, as the dequantize path's single rounding of (q - z) * s. A fractional zero costs at
// most one more rounding (of q - T(z)); corr keeps z's own rounding out of W_hat.
template <typename T, int kCols>
__device__ __forceinline__ uint32_t dequant_pair(uint32_t codes, const GroupParams<T, kCols>& gp, int j) {
  using T2 = typename MmaType<T>::T2;
  return to_bits(__hfma2(__hsub2(from_bits<T2>(codes), gp.z[j]), gp.s[j], gp.corr[j]));
}

}  // namespace
}  // namespace blockops::lowbit
