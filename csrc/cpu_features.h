// Run-time CPU feature detection for the per-function AVX2/FMA kernels.
#pragma once
#include "macros.h"

namespace blockops {

// True when this process may run the BLOCKOPS_TARGET_AVX2 functions. In the environment,
// BLOCKOPS_CPU_ISA=portable forces the portable paths and BLOCKOPS_CPU_ISA=avx2 stops at AVX2 (tests use
// both to exercise every path on one machine).
bool cpu_has_avx2_fma();

// True when this process may run the BLOCKOPS_TARGET_AVX512_VNNI functions (AVX512-VNNI with AVX512VL).
bool cpu_has_avx512_vnni();

// True when this process may run the BLOCKOPS_TARGET_AVX512_VBMI functions: the AVX512-VNNI set above plus
// AVX512-VBMI (byte permutes) and AVX512DQ.
bool cpu_has_avx512_vbmi();

// True when the CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16), so ATen's bf16 GEMM beats its fp32 one;
// without it (every AVX2-only CPU) the bf16 GEMM is emulated and several times slower than converting to fp32.
// The batched quantized paths multiply bf16 activations in bf16 only then. BLOCKOPS_CPU_ISA=avx2 / =portable
// say no, as such a CPU would.
bool cpu_has_bf16_gemm();

// "avx2+fma" or "portable": the ISA the CPU kernels use in this process.
const char* cpu_isa_name();

// The widest CPU path the kernels may take in this process: "avx512-vbmi", "avx512-vnni", "avx2" or "portable"
// (BLOCKOPS_CPU_ISA=avx2 or =portable caps it). Benchmarks quote it with every CPU figure.
const char* cpu_isa_path();

}  // namespace blockops
