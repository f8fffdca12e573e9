// Hopper (sm_90a) shared-memory layouts: the wgmma matrix descriptor and the 128-byte swizzle, as pure bit
// arithmetic (no PTX, no torch). The Hopper kernels (attention_wgmma.cu, lowbit_wgmma.cu) encode with these; the
// CPU emulation (tools/cuda_emu/hopper_emu.h) decodes descriptors with its own code written from the PTX ISA, so a
// misreading here is caught there instead of being shared.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace blockops::hopper {

// PTX ISA "Matrix Descriptor Format" (wgmma): bits 62-63 of the descriptor.
enum class SmemSwizzle : uint32_t { kNone = 0, k128B = 1, k64B = 2, k32B = 3 };

// The 64-bit shared-memory matrix descriptor of wgmma.mma_async: start address (bits 0-13), leading dimension
// byte offset (16-29), stride dimension byte offset (32-45), each stored >> 4; base offset (49-51) left 0, which
// requires the swizzle pattern's repeat (1024 bytes for 128B) to start at an aligned address; swizzle (62-63).
// `smem_addr` is the shared-window address (hopper::smem_u32), not a generic pointer.
__host__ __device__ constexpr uint64_t smem_descriptor(uint32_t smem_addr, uint32_t leading_byte_offset,
                                                       uint32_t stride_byte_offset, SmemSwizzle swizzle) {
  return (uint64_t((smem_addr & 0x3FFFF) >> 4)) | (uint64_t((leading_byte_offset & 0x3FFFF) >> 4) << 16) |
         (uint64_t((stride_byte_offset & 0x3FFFF) >> 4) << 32) | (uint64_t(swizzle) << 62);
}

// Byte offset of 16-byte chunk `chunk` (0..7) of row `row` in a tile stored with the 128-byte swizzle: rows of 128
// bytes, chunk c of row r at position c ^ (r % 8). This is the pattern TMA writes with
// CU_TENSOR_MAP_SWIZZLE_128B and wgmma reads with SmemSwizzle::k128B when the tile starts 1024-byte aligned.
__host__ __device__ constexpr uint32_t sw128_offset(uint32_t row, uint32_t chunk) {
  return row * 128 + ((chunk ^ (row & 7)) << 4);
}

}  // namespace blockops::hopper
