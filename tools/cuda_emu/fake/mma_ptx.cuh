// Emulated stand-in for csrc/kernels/mma_ptx.cuh: found first on the emulation's include path (-I fake), it puts
// ptx_emu.h's cp.async / ldmatrix (.trans) / mma / lop3 under the names the kernels call (blockops::mma::...).
#pragma once
#include <cstring>
#include <type_traits>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "cuda_runtime.h"

namespace blockops::mma {
#include "ptx_emu.h"
}  // namespace blockops::mma
