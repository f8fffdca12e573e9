// Tiny portability macros shared by the torch-free numerics headers, the CPU kernels and the CUDA kernels.
#pragma once

#if defined(__CUDACC__)
#define BLOCKOPS_HD __host__ __device__ __forceinline__
#else
#define BLOCKOPS_HD inline
#endif

// AVX2/FMA code paths are compiled per function and selected at run time (cpu_features.h), so one binary
// runs on every x86-64 and the rest of the file keeps the portable baseline ISA.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__)
#define BLOCKOPS_X86_DISPATCH 1
#define BLOCKOPS_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))  // every AVX2 CPU has F16C
#define BLOCKOPS_TARGET_AVX512_VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")))
#define BLOCKOPS_TARGET_AVX512_VBMI \
  __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512dq,avx512vnni,avx512vbmi")))
#else
#define BLOCKOPS_X86_DISPATCH 0
#define BLOCKOPS_TARGET_AVX2
#define BLOCKOPS_TARGET_AVX512_VNNI
#define BLOCKOPS_TARGET_AVX512_VBMI
#endif
