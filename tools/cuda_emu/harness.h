// Plumbing shared by the emulation drivers (tools/cuda_emu/test_*.cpp): the section argument, values of a DType
// read and written through untyped pointers, the typed conversions, an exact-size heap buffer, the case / failure
// tally and the summary line tests/test_cuda_emulation.py parses. The checks themselves stay in each driver.
// Every driver is one translation unit, so the definitions here are static.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>  // emu_launches

#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "dtype.h"

// The section named by the first argument; `all` (and a driver's default when none is named) selects
// sections as that driver defines them.
struct Sections {
  std::string chosen;
  Sections(int argc, char** argv, const char* fallback) : chosen(argc > 1 ? argv[1] : fallback) {}
  bool operator()(const char* name) const { return chosen == "all" || chosen == name; }
};

// Values of a float DType through untyped pointers, rounded to nearest even on the way in.
static const char* dname(blockops::DType t) {
  return t == blockops::DType::kF32 ? "f32" : t == blockops::DType::kF16 ? "f16" : "bf16";
}
static size_t esize(blockops::DType t) { return t == blockops::DType::kF32 ? 4 : 2; }
static double round_to(blockops::DType t, double v) {
  if (t == blockops::DType::kF32) return (float)v;
  if (t == blockops::DType::kF16) return __half2float(__float2half_rn((float)v));
  return __bfloat162float(__float2bfloat16_rn((float)v));
}
static void put(blockops::DType t, void* p, int64_t i, double v) {
  if (t == blockops::DType::kF32) static_cast<float*>(p)[i] = (float)v;
  else if (t == blockops::DType::kF16) static_cast<__half*>(p)[i] = __float2half_rn((float)v);
  else static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn((float)v);
}
static double get(blockops::DType t, const void* p, int64_t i) {
  if (t == blockops::DType::kF32) return static_cast<const float*>(p)[i];
  if (t == blockops::DType::kF16) return __half2float(static_cast<const __half*>(p)[i]);
  return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}

// The same for a static element type: cvt<T> rounds a float to T, back() widens it again, dt<T> is T's DType.
template <typename T> inline T cvt(float f);
template <> inline float cvt<float>(float f) { return f; }
template <> inline __half cvt<__half>(float f) { return __float2half_rn(f); }
template <> inline __nv_bfloat16 cvt<__nv_bfloat16>(float f) { return __float2bfloat16_rn(f); }
static float back(float f) { return f; }
static float back(__half h) { return __half2float(h); }
static float back(__nv_bfloat16 h) { return __bfloat162float(h); }
template <typename T> inline blockops::DType dt();
template <> inline blockops::DType dt<float>() { return blockops::DType::kF32; }
template <> inline blockops::DType dt<__half>() { return blockops::DType::kF16; }
template <> inline blockops::DType dt<__nv_bfloat16>() { return blockops::DType::kBF16; }

// Exact-size heap buffer, 64-byte aligned (ASan's redzone right after the last byte), filled with 0xFF (NaN in
// every float dtype: a kernel that reads what it never wrote fails) unless zeroed.
struct Buf {
  void* p = nullptr;
  explicit Buf(size_t bytes, bool zero = false) {
    if (posix_memalign(&p, 64, bytes ? bytes : 1) != 0) abort();
    memset(p, zero ? 0 : 0xFF, bytes);
  }
  ~Buf() { free(p); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  float* f() const { return static_cast<float*>(p); }
};

// The same holding `n` elements of T.
template <typename T> struct TypedBuf {
  Buf bytes;
  size_t n;
  T* p;
  explicit TypedBuf(size_t count) : bytes(count * sizeof(T)), n(count), p(static_cast<T*>(bytes.p)) {}
  T& operator[](size_t i) { return p[i]; }
  const T& operator[](size_t i) const { return p[i]; }
};

// The tally every driver keeps; a failing check prints one line starting with FAIL (tools/cuda_emu/mutations.sh
// counts those).
static int failures = 0, cases = 0;
static void fail(const char* what, const std::string& cfg) {
  ++failures;
  printf("FAIL %s %s\n", what, cfg.c_str());
}
static void report(bool ok, const char* what, const std::string& cfg) {
  ++cases;
  if (!ok) fail(what, cfg);
}
// An error against its bound (a NaN error fails); EMU_VERBOSE also lists the passing checks.
static void report(const char* what, double err, double tol, const std::string& cfg) {
  ++cases;
  const bool ok = err <= tol;
  if (!ok) ++failures;
  if (!ok || getenv("EMU_VERBOSE"))
    printf("%s %s %s err=%g tol=%g\n", ok ? "ok  " : "FAIL", what, cfg.c_str(), err, tol);
}

// The summary line, then a driver's own figures (printf-style); returns the exit status: non-zero on a failure.
__attribute__((format(printf, 1, 2))) static int summary(const char* figures_format, ...) {
  printf("cases: %d failures: %d launches: %ld", cases, failures, emu_launches);
  va_list figures;
  va_start(figures, figures_format);
  vprintf(figures_format, figures);
  va_end(figures);
  printf("\n");
  return failures != 0;
}
static int summary() { return summary("%s", ""); }
