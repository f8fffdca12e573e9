// Run-time CPU feature detection for the per-function AVX2/FMA kernels.
#pragma once
#include "macros.h"

namespace blockops {

// True when this process may run the BLOCKOPS_TARGET_AVX2 functions. BLOCKOPS_CPU_ISA=portable in the
// environment forces the portable paths (used by tests to exercise both).
bool cpu_has_avx2_fma();

// "avx2+fma" or "portable": the ISA the CPU kernels use in this process.
const char* cpu_isa_name();

}  // namespace blockops
