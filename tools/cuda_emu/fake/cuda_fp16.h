#pragma once
#include "cuda_runtime_api.h"
// fp16 for the CPU emulation. Arithmetic is done in double (exact for sums / products of two fp16 values) and
// rounded once to fp16 (GCC's double -> _Float16 conversion, libgcc __truncdfhf2, rounds to nearest even), which
// is what the single-rounding PTX add/sub/mul.rn.f16x2 do.
struct __half { _Float16 v; };
struct __half2 { __half x, y; };
inline float __half2float(__half h) { return (float)h.v; }
inline __half __float2half_rn(float f) { return __half{(_Float16)f}; }
inline __half emu_half_rn(double d) { return __half{(_Float16)d}; }
inline __half2 __float2half2_rn(float f) { __half h = __float2half_rn(f); return __half2{h, h}; }
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__float2half_rn(a), __float2half_rn(b)}; }
inline __half2 __hsub2(__half2 a, __half2 b) {
  return __half2{emu_half_rn((double)a.x.v - (double)b.x.v), emu_half_rn((double)a.y.v - (double)b.y.v)};
}
inline __half2 __hmul2(__half2 a, __half2 b) {
  return __half2{emu_half_rn((double)a.x.v * (double)b.x.v), emu_half_rn((double)a.y.v * (double)b.y.v)};
}
inline double emu_to_double(__half h) { return (double)h.v; }
inline float __low2float(__half2 a) { return (float)a.x.v; }
// fma.rn.f16x2: a * b is exact in double, the sum is exact in double for the magnitudes the kernels meet.
inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) {
  return __half2{emu_half_rn((double)a.x.v * (double)b.x.v + (double)c.x.v),
                 emu_half_rn((double)a.y.v * (double)b.y.v + (double)c.y.v)};
}
