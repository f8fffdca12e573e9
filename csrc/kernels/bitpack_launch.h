// Launchers of the bitpack CUDA kernels (kernels/bitpack.cu). Torch-free: the glue in bitpack_cuda.cpp
// passes raw pointers, the geometry and the stream.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "../bitpack.h"

namespace blockops::bitpack {

// Element types pack_bits accepts, in the order of the glue's dispatch.
enum class IntType { kU8, kI8, kI16, kI32, kI64 };

// Packs `values` (IntType, [outer, length, inner]) into `out` ([outer, words, inner] int32). Sets
// *bad_flag (device memory, zeroed by the caller) to 1 if a value is out of range.
cudaError_t launch_pack_bits(const void* values, IntType type, int32_t* out, int32_t* bad_flag,
                             const Geometry& g, cudaStream_t stream);

cudaError_t launch_unpack_bits(const int32_t* packed, uint8_t* out, const Geometry& g, cudaStream_t stream);

}  // namespace blockops::bitpack
