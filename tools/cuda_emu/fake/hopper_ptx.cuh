// Emulated stand-in for csrc/kernels/hopper_ptx.cuh: found first on the emulation's include path (-I fake), it puts
// hopper_emu.h's wgmma / TMA / mbarrier / setmaxnreg emulation under the names the Hopper kernels call
// (blockops::hopper::...), next to the real hopper_layout.cuh (the kernels' descriptor encoder, which the emulator's
// decoder does not use). TensorMap is CUtensorMap as in the real header: here an opaque, 64-byte aligned 128-byte
// struct (fake/cuda.h) that encode_tensor_map fills.
#pragma once
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include "cuda.h"
#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "cuda_runtime.h"
#include "hopper_layout.cuh"

#define BLOCKOPS_HOPPER_DEVICE 1

namespace blockops::hopper {
using TensorMap = CUtensorMap;
static_assert(sizeof(TensorMap) == 128 && alignof(TensorMap) == 64, "CUtensorMap: 128 bytes, 64-byte aligned");
#include "hopper_emu.h"
}  // namespace blockops::hopper
