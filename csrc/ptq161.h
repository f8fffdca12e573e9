// PTQ1.61 (1.61-bit) weight numerics, torch-free, shared by the CPU kernels (ptq161_cpu.cpp), the CUDA kernels and
// therefore by the tests of both. Formulas: ../shared/reference/lowbit.md, PTQ1.61 section.
//
// A weight W [out, in] splits its input channels into S salient ones (the largest activations, kept at 4 bits)
// and N = in - S non-salient ones (binarized). The packed format ("ours": the paper ships dense fake-quant weights):
//
//   perm        [in]              int32   channel permutation: perm[0, S) the salient input channels, perm[S, in)
//                                         the non-salient ones (the quantizer keeps each part ascending). Kernels
//                                         gather x through it, so both parts are read contiguously.
//   qsalient    [S_pad / 8, out]  int32   4-bit codes q[k, i] of salient channel perm[k], row i, packed along k as
//                                         blockops.pack_bits(q, 4, dim=0) (the lowbit family's qweight layout with a
//                                         single group of S_pad = S rounded up to a multiple of 16; padding codes
//                                         are ignored).
//   salient_scale, salient_zero [out] float  per-row asymmetric min-max: W_high[i, perm[k]] = s_i (q[k, i] - z_i)
//   signs       [ceil(N / 32), out] int32  sign bits b[j, i] of non-salient channel perm[S + j], row i, packed
//                                         along j as pack_bits(b, 1, dim=0): bit 1 = +1, bit 0 = -1. One 64-byte
//                                         line holds one word of 16 consecutive rows, what the GEMV kernels load.
//   zero_signs  [Z]               int64   sign(0) = 0 (torch.sign, as the reference): the strictly increasing flat
//                                         indices j * out + i of the entries whose sign is 0 (W[i, perm[S+j]] ==
//                                         mu_i exactly). Their stored bit is ignored. Usually empty (Z = 0).
//   alpha, mu, r1 [out], r2 [in]  float   W_low[i, c] = r1_i r2_c (alpha_i b + mu_i), c = perm[S + j]
//   bias        [out] (optional)
//
//   W_hat = mask * W_high + (1 - mask) * W_low
//
// The mixed GEMM y[m, i] = sum_c x[m, c] W_hat[i, c] is computed in the decomposed form
//   y[m, i] = r1_i [alpha_i U[m, i] + mu_i V[m]]  +  s_i [D[m, i] - z_i X[m]]
//   U[m, i] = sum_j b[j, i] x'[m, j],  V[m] = sum_j x'[m, j],  x'[m, j] = r2_c x[m, c] over non-salient c = perm[S + j]
//   D[m, i] = sum_k q[k, i] x[m, perm[k]],  X[m] = sum_k x[m, perm[k]]   over salient channels
// so the +-1 part needs no multiplication per weight and the 4-bit part is the lowbit family's integer GEMV.
//
// Bits per weight, every stored tensor counted (factors in `factor_bits`-wide floats, perm int32):
//   (4 S_pad + 32 ceil(N / 32) + 5 factor_bits) / in   (per row: codes, signs, s, z, alpha, mu, r1)
//   + (32 + factor_bits) / out                        (per column: perm, r2)
//   + (64 Z + bias_bits * out) / (out * in)
// = 0.2 * 4 + 0.8 * 1 + 0.0195 + 0.0117 = 1.631 for 4096 x 4096 at ratio 0.2 with fp16 factors.
#pragma once
#include <cstdint>

#include "bitpack.h"
#include "macros.h"

namespace blockops::ptq161 {

constexpr int kSalientBits = 4;
constexpr int kSalientMaxCode = (1 << kSalientBits) - 1;
constexpr int kSalientAlign = 16;  // S_pad: the lowbit kernels' group granularity
constexpr int kSignsPerWord = 32;

struct Geometry {
  int64_t in;       // input features
  int64_t out;      // output features
  int64_t salient;  // S

  BLOCKOPS_HD int64_t plain() const { return in - salient; }  // N
  BLOCKOPS_HD int64_t salient_padded() const { return (salient + kSalientAlign - 1) / kSalientAlign * kSalientAlign; }
  BLOCKOPS_HD int64_t salient_words() const { return bitpack::packed_length(salient_padded(), kSalientBits); }
  BLOCKOPS_HD int64_t sign_words() const { return bitpack::packed_length(plain(), 1); }
};

// The 4-bit code of salient position k (0 <= k < S), row i.
BLOCKOPS_HD int salient_code(const int32_t* qsalient, const Geometry& g, int64_t k, int64_t i) {
  const uint32_t word = static_cast<uint32_t>(qsalient[(k / 8) * g.out + i]);
  return static_cast<int>(bitpack::extract(word, static_cast<int>(k % 8), kSalientBits));
}

// The stored sign bit (1 = +1, 0 = -1) of non-salient position j, row i.
BLOCKOPS_HD int sign_bit(const int32_t* signs, const Geometry& g, int64_t j, int64_t i) {
  return static_cast<int>((static_cast<uint32_t>(signs[(j / kSignsPerWord) * g.out + i]) >> (j % kSignsPerWord)) & 1u);
}

BLOCKOPS_HD float sign_value(int bit) { return bit ? 1.f : -1.f; }

// W_high entry from the row's scale and zero, in the compute type T (fp32; fp64 on the CPU's fp64 path).
template <typename T>
BLOCKOPS_HD T high_weight(int code, T scale, T zero) { return scale * (static_cast<T>(code) - zero); }

// W_low entry without its column factor r2: r1 (alpha b + mu), b in {-1, 0, +1}, in T as above.
template <typename T>
BLOCKOPS_HD T low_weight_unscaled(T b, T alpha, T mu, T r1) { return r1 * (alpha * b + mu); }

}  // namespace blockops::ptq161
