#pragma once
#include "cuda_runtime_api.h"
// bf16 for the CPU emulation; arithmetic in double, rounded once to bf16 (round to nearest even), as the PTX
// fma.rn.bf16x2 that sm_80 uses for __hsub2 / __hmul2 does.
struct __nv_bfloat16 { uint16_t b; };
struct __nv_bfloat162 { __nv_bfloat16 x, y; };
inline float __bfloat162float(__nv_bfloat16 h) { uint32_t u = uint32_t(h.b) << 16; float f; memcpy(&f, &u, 4); return f; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { uint32_t u; memcpy(&u, &f, 4); u += 0x7FFF + ((u >> 16) & 1); return __nv_bfloat16{uint16_t(u >> 16)}; }
// double -> bf16 with a single rounding (normal range; the tests never reach bf16 subnormals or overflow).
inline __nv_bfloat16 emu_bf16_rn(double d) {
  if (d == 0.0) return __float2bfloat16_rn((float)d);
  int e;
  const double m = std::frexp(d, &e);                       // |m| in [0.5, 1)
  const double r = std::nearbyint(std::ldexp(m, 8));        // 8 significant bits, ties to even
  const double v = std::ldexp(r, e - 8);
  if (std::fabs(v) < 0x1p-126 || std::fabs(v) > 0x1p127) { fprintf(stderr, "emu_bf16_rn: out of normal range\n"); abort(); }
  const float f = (float)v;                                  // exact: 8 significant bits
  uint32_t u; memcpy(&u, &f, 4);
  if (u & 0xFFFF) { fprintf(stderr, "emu_bf16_rn: not representable\n"); abort(); }
  return __nv_bfloat16{uint16_t(u >> 16)};
}
inline __nv_bfloat162 __float2bfloat162_rn(float f) { __nv_bfloat16 h = __float2bfloat16_rn(f); return __nv_bfloat162{h, h}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return __nv_bfloat162{__float2bfloat16_rn(a), __float2bfloat16_rn(b)}; }
inline double emu_to_double(__nv_bfloat16 h) { return (double)__bfloat162float(h); }
inline __nv_bfloat162 __hsub2(__nv_bfloat162 a, __nv_bfloat162 b) {
  return __nv_bfloat162{emu_bf16_rn(emu_to_double(a.x) - emu_to_double(b.x)), emu_bf16_rn(emu_to_double(a.y) - emu_to_double(b.y))};
}
inline __nv_bfloat162 __hmul2(__nv_bfloat162 a, __nv_bfloat162 b) {
  return __nv_bfloat162{emu_bf16_rn(emu_to_double(a.x) * emu_to_double(b.x)), emu_bf16_rn(emu_to_double(a.y) * emu_to_double(b.y))};
}
inline float __low2float(__nv_bfloat162 a) { return __bfloat162float(a.x); }
inline __nv_bfloat162 __hfma2(__nv_bfloat162 a, __nv_bfloat162 b, __nv_bfloat162 c) {
  return __nv_bfloat162{emu_bf16_rn(emu_to_double(a.x) * emu_to_double(b.x) + emu_to_double(c.x)),
                        emu_bf16_rn(emu_to_double(a.y) * emu_to_double(b.y) + emu_to_double(c.y))};
}
