// What the pieces of the vq family's CPU kernels share (internal: include only from csrc/vq_cpu*.cpp):
//   vq_cpu.cpp              the CPU glue (ops, counters) with the dequantize, direct-dot and blocked-GEMM paths
//   vq_cpu_lut.cpp          small batches: the lookup-table GEMV (fp32 tables, any code dtype)
//   vq_cpu_byte_planes.cpp  small batches, uint8 codes: the tables in byte planes (AVX-512 VBMI; AVX2 for k <= 64)
//   vq_cpu_codewords.cpp    1-2 rows, uint8 codes, k = 256, d 4 or 8 on AVX2 without VBMI: int16 codewords, no tables
// Layout, numerics and the table-or-direct rule (use_lookup_table, kCpuSmallBatchRows) are vq.h's.
#pragma once
#include <cstdint>
#include <vector>

#include "vq.h"

namespace blockops::vq {

// The codebooks cb32 [K][k][d] transposed to [K][d][width] (width >= k, zeros past k), for the table builds: a
// vector of consecutive codewords' weights is one load.
std::vector<float> transposed_codebooks(const float* cb32, const Geometry& g, int64_t width);

constexpr int64_t kBuildGrain = 1 << 22;  // table multiply-adds per task of either table build (~0.3 ms on one
                                          // thread): a small build stays on the calling thread

// y [rows, out] fp32 = x [rows, in] fp32 @ W_hat^T through lookup tables, rows <= kCpuSmallBatchRows. cb32: the
// codebooks in fp32 [K, k, d]; scales [out] fp32; avx2: run the AVX2 copies of the loops (cpu_has_avx2_fma()).
// uint8 codes are not range-checked beforehand: the tables are padded so that every code a byte can hold reads
// inside them, and the kernel returns the OR of every code it read (>= the largest, so a result < k proves them
// all in range; otherwise the caller runs check_code_range, which names the first code out of range). Other code
// types must be checked before the call (the result is then meaningless).
uint32_t lut_gemv(bool avx2, const float* x, const void* codes, CodeType type, const float* cb32, const float* scales,
                  const Geometry& g, int64_t rows, float* y);

// Whether vq_linear takes the byte-plane kernel for these weights and rows (fp32_x: fp32 activations, which need
// exact tables on AVX-512 VBMI). Always false without BLOCKOPS_X86_DISPATCH. k <= 64 and 1-2 rows take the AVX2
// sub-table variant on every CPU with AVX2 (VBMI ones included: faster there too); the rest needs VBMI.
bool use_byte_planes(const Geometry& g, CodeType type, bool fp32_x, int64_t rows);

// y = x @ W_hat^T on the byte-plane kernel (only where use_byte_planes). The VBMI variant: exact = fp32 tables (for
// fp32 activations), else int16 tables; the AVX2 sub-table variant: int16 tables for every activation dtype. Returns
// the largest code: codes >= k read zero tables (never out of bounds) and the caller reports them. Returns -1
// without writing y where the AVX2 variant's int16 tables cannot hold the activations (a NaN or infinity): the
// caller runs the exact table kernel instead.
int plane_gemv(const float* x, const uint8_t* codes, const float* cb32, const float* scales, const Geometry& g,
               int64_t rows, bool exact, float* y);

// Whether vq_linear takes the codeword kernel: AVX2 without AVX-512 VBMI (whose byte-plane kernel takes these),
// uint8 codes, k = 256, d = 4 or 8, K = 1 or 2, inputs a multiple of 64, 1 to kCodewordMaxRows activation rows.
// Always false without BLOCKOPS_X86_DISPATCH.
// (4 rows ran 1.5-2.5x slower than the table kernel, whose one gather serves 4 rows: 2 rows 1.2-1.5x faster.)
constexpr int64_t kCodewordMaxRows = 2;
bool use_codewords(const Geometry& g, CodeType type, int64_t rows);

// y [rows, out] = x [rows, in] @ W_hat^T with codewords and activations in int16 fixed point (only where
// use_codewords; every uint8 code is < k = 256: no range check). Returns false without writing y where x or the
// codebooks hold a NaN or an infinity (no fixed-point value): the caller runs the exact table kernel.
bool codeword_gemv(const float* x, const uint8_t* codes, const float* cb32, const float* scales, const Geometry& g,
                   int64_t rows, float* y);

}  // namespace blockops::vq
