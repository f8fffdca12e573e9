// Vector-quantized weights (VQ4DiT; AQLM with out_group_size 1): layout, code reading, bits per weight and the
// rule that picks the CPU small-batch kernel. Torch-free, shared by the CPU and CUDA kernels and their tests.
//
//   codes     [out, G, K]  uint8 or int16, G = in / d input groups, K in {1, 2} additive codebooks
//                          (for K = 1 also [out, G]). AQLM's tensor layout with out_group_size = 1.
//   codebooks [K, k, d]    fp16 / bf16 / fp32, k in [16, 65536] codewords of d in {2, 4, 8} weights
//   scales    [out]        optional per-output-row scale (AQLM's scales [out, 1, 1, 1] flattened)
//
//   W_hat[n, j*d + t] = scales[n] * sum_K codebooks[K, codes[n, j, K], t]
//
// int16 codes hold 16-bit unsigned values in two's complement, as AQLM stores them: a code is the int16's bit
// pattern read as uint16 (value mod 65536), so -1 means 65535 and codes 32768..65535 are negative int16s.
// uint8 codes are read as they are. A code >= k is an error (checked before any kernel reads a codeword).
#pragma once
#include <cstdint>

#include "macros.h"

namespace blockops::vq {

enum class CodeType { kU8, kU16 };  // uint8 codes; int16 codes read as uint16

struct Geometry {
  int64_t out;     // output features (rows of W_hat)
  int64_t groups;  // G: input groups of d weights per row
  int64_t K;       // additive codebooks
  int64_t k;       // codewords per codebook
  int64_t d;       // weights per codeword
  BLOCKOPS_HD int64_t in() const { return groups * d; }
  BLOCKOPS_HD int64_t positions() const { return groups * K; }  // codes per output row, p = j * K + c
};

// Code p of row n (flat index n * positions + p), as an unsigned value.
BLOCKOPS_HD uint32_t read_code(const void* codes, CodeType type, int64_t flat) {
  return type == CodeType::kU8 ? static_cast<const uint8_t*>(codes)[flat]
                               : static_cast<const uint16_t*>(codes)[flat];
}

// Largest code a dtype can hold plus one: codes of a dtype need a range check only when k is below this.
BLOCKOPS_HD int64_t code_capacity(CodeType type) { return type == CodeType::kU8 ? 256 : 65536; }

// The CPU's small-batch kernels take up to this many rows at once: the tables hold up to 8 rows' sums side by side
// (one AVX2 vector per gather); 16 side by side (16 MB of tables for k = 256) ran 4x slower. (The CUDA GEMV's
// limit: kCudaGemvMaxRows in kernels/vq_launch.h.)
constexpr int64_t kCpuSmallBatchRows = 8;
// Up to this many rows the table kernel runs in passes of up to kCpuSmallBatchRows rows (each pass builds its
// tables and reads every code again). Measured at 4096 x 11008, AVX2 path, one thread (CPU time), 2-bit k256 d4:
// 8 rows 11.4 ms in one pass, where dequantized blocks + fp32 GEMM took 72 ms at 16 rows (fp32 F.linear: 32 ms at
// 8 rows, 38 ms at 16).
constexpr int64_t kCpuLutMaxRows = 32;

// Small batches (rows <= kCpuSmallBatchRows): lookup table or direct dequantize-dot, chosen per call by an
// operation count. The table costs rows * P * k * d multiply-adds to build (P = G * K) and P * out gathers to
// read: the CPU kernel keeps the rows' sums of a codeword side by side (up to 8 of them, one AVX2 vector), so a
// gather serves every activation row at once. The direct kernel dequantizes each weight row once (out * P * d
// adds, shared by all rows) and multiplies it with every activation row (out * G * d multiply-adds per row). A
// gather (rotate, mask and a dependent load) costs about kGatherCost of those units: measured on Zen 4, one
// thread, 0.52 ns per gather (2-bit, 4096 x 11008) against 0.22 ns per unit of the direct kernel (3-bit).
// The table also has to stay below kLutMaxBytes, so a large k on a small layer (AQLM 1x16, k = 65536) always
// goes direct.
constexpr int64_t kGatherCost = 3;
constexpr int64_t kLutMaxBytes = int64_t{64} << 20;

inline bool use_lookup_table(const Geometry& g, int64_t rows) {
  const int64_t p = g.positions();
  if (rows * p * g.k * static_cast<int64_t>(sizeof(float)) > kLutMaxBytes) return false;
  const double lut = static_cast<double>(rows) * p * g.k * g.d + static_cast<double>(kGatherCost) * p * g.out;
  const double direct = static_cast<double>(g.out) * p * g.d + static_cast<double>(rows) * g.out * g.groups * g.d;
  return lut < direct;
}

// One row of W_hat in T (fp32; fp64 on the CPU's fp64 path): dst[j*d + t] = scale * sum_K cb[K][code][t], cb the
// codebooks [K, k, d] in T and codes the row's G * K codes (uint8_t, or uint16_t for int16 codes). D and the code
// type are template parameters so that the copy and sum of one codeword compile to a few vector moves without
// branches.
template <int D, typename CodeT, typename T>
inline void dequant_row(const CodeT* codes, const T* cb, const Geometry& g, T scale, T* dst) {
  if (g.K == 1) {
    for (int64_t j = 0; j < g.groups; ++j) {
      const T* c0 = cb + static_cast<int64_t>(codes[j]) * D;
      for (int t = 0; t < D; ++t) dst[j * D + t] = scale * c0[t];
    }
    return;
  }
  const T* cb1 = cb + g.k * D;  // K = 2: the second codebook
  for (int64_t j = 0; j < g.groups; ++j) {
    const T* c0 = cb + static_cast<int64_t>(codes[2 * j]) * D;
    const T* c1 = cb1 + static_cast<int64_t>(codes[2 * j + 1]) * D;
    for (int t = 0; t < D; ++t) dst[j * D + t] = scale * (c0[t] + c1[t]);
  }
}

}  // namespace blockops::vq
