// Fake CUDA driver header for the CPU emulation: only the tensor map type (filled by the emulated
// blockops::hopper::encode_tensor_map, fake/hopper_ptx.cuh); nothing else of the driver API is emulated.
#pragma once
#include "cuda_runtime_api.h"

struct alignas(64) CUtensorMap_st {
  unsigned long long opaque[16];
};
typedef CUtensorMap_st CUtensorMap;
