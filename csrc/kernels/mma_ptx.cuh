// Inline-PTX wrappers for the tensor-core kernels (cp.async, ldmatrix, mma.sync.m16n8k16, lop3), in namespace
// blockops::mma; every kernel that issues PTX (lowbit_mma.cu, attention_mma.cuh, path_attention.cu, vq.cu) takes
// it from here, none carries its own asm. The CPU emulation (tools/cuda_emu) swaps this header for
// fake/mma_ptx.cuh, which maps the same names onto ptx_emu.h: a wrapper added here needs its emulation there.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace blockops::mma {

// The shared-state-space address the cp.async / ldmatrix operands take.
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared without a register round trip; .cg skips L1 (tiles are read once per block).
// full == false zero-fills the 16 bytes and reads nothing (src-size 0), for rows and columns past the matrix.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool full) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(full ? 16 : 0));
}

// Closes the group of copies issued since the last commit; wait<N> returns once at most N groups are pending.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, d[i] is this lane's part of it
// (row lane / 4, columns 2 (lane % 4) + {0, 1}).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&d)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
               : "r"(smem_addr(row)));
}

// The same four matrices transposed: d[i] holds rows 2 (lane % 4) + {0, 1}, column lane / 4 of matrix i, which is
// the B fragment of a row-major [k][n] operand (attention's V stored [key][dv]).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&d)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
               : "r"(smem_addr(row)));
}

// Any 3-input bitwise function of a and two constants in one instruction; kLut is F(0xF0, 0xCC, 0xAA).
// Needed because ptxas splits C++ like (a & mask) | magic into two LOP3s (a SASS LOP3 takes one immediate).
// Not volatile: a pure function the compiler may move or merge.
template <int kLut, uint32_t kB, uint32_t kC>
__device__ __forceinline__ uint32_t lop3(uint32_t a) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, %4;\n" : "=r"(d) : "r"(a), "n"(kB), "n"(kC), "n"(kLut));
  return d;
}

// d += A (16x16, row-major) * B (16x8, column-major), fp32 accumulate; fp16 or bf16 inputs.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

}  // namespace blockops::mma
