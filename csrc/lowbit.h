// Low-bit (2/3/4-bit) group-wise asymmetric weight numerics, torch-free, shared by the CPU kernels
// (lowbit_cpu.cpp), the CUDA kernels (kernels/lowbit.cu, kernels/lowbit_mma.cu) and therefore by the tests of both.
//
// Format (the GPTQ-v2 / EfficientQAT layout, used by blockops' kernels as is):
//   weight W [out, in], bits b in {2, 3, 4}, group size g (a multiple of 16 dividing in), p = 32 / b
//   qweight [ceil(in / p), out] int32   q[k, n] sits in word (k / p, n) at bits [b * (k % p), b * (k % p) + b)
//                                        (= pack_bits(q^T, b, dim=0); 3-bit: 10 per word, EfficientQAT's)
//   scales  [in / g, out]  fp16 / bf16 / fp32
//   zeros   [in / g, out]  same dtype as scales; integral for round-to-nearest / GPTQ weights, fractional
//                          values are allowed (trained zero points)
//   W_hat[n, k] = (q[k, n] - zeros[k / g, n]) * scales[k / g, n]
//
// A linear layer computes y[m, n] = sum_k x[m, k] W_hat[n, k]. Per group the kernels use the factored form
//   y[m, n] = sum_grp scales[grp, n] * ( sum_{k in grp} x[m, k] q[k, n]  -  zeros[grp, n] * sum_{k in grp} x[m, k] )
// so the inner loop is integer-valued weights times activations, and scale/zero are applied once per group.
#pragma once
#include <cstdint>

#include "bitpack.h"
#include "macros.h"

namespace blockops::lowbit {

constexpr int kGroupQuantum = 16;  // group sizes are positive multiples of this (the kernels' k granularity)

// The largest group the CPU decode kernel's 16-bit fixed-point path takes (lowbit_cpu.cpp): its int32 group sums
// stay exact, |code * x16| * group_size <= 15 * 32767 * 1024 < 2^31. Larger groups take the fp32 kernel. ptq161
// cuts its salient channels into groups of at most this many so that they run on the fixed-point path.
constexpr int64_t kCpuFixedPointMaxGroup = 1024;

struct Geometry {
  int64_t in;        // input features (K)
  int64_t out;       // output features (N)
  int bits;          // 2, 3 or 4
  int group_size;    // g

  BLOCKOPS_HD int per_word() const { return bitpack::values_per_word(bits); }
  BLOCKOPS_HD int64_t words() const { return bitpack::packed_length(in, bits); }  // rows of qweight
  BLOCKOPS_HD int64_t groups() const { return in / group_size; }                 // rows of scales/zeros
  BLOCKOPS_HD int max_code() const { return (1 << bits) - 1; }
};

// The format's rules every kernel relies on: 2, 3 or 4 bits, g a positive multiple of kGroupQuantum dividing in.
BLOCKOPS_HD bool valid_geometry(const Geometry& g) {
  return (g.bits == 2 || g.bits == 3 || g.bits == 4) && g.group_size >= kGroupQuantum &&
         g.group_size % kGroupQuantum == 0 && g.in >= 0 && g.out >= 0 && g.in % g.group_size == 0;
}

// The integer code q[k, n] from qweight (row-major [words, out] int32).
BLOCKOPS_HD int code_at(const int32_t* qweight, const Geometry& g, int64_t k, int64_t n) {
  const uint32_t word = static_cast<uint32_t>(qweight[(k / g.per_word()) * g.out + n]);
  return static_cast<int>(bitpack::extract(word, static_cast<int>(k % g.per_word()), g.bits));
}

// W_hat[n, k] in the compute type T (fp32; fp64 on the CPU's fp64 path), given the group's scale and zero in T.
template <typename T>
BLOCKOPS_HD T dequant(int code, T scale, T zero) { return (static_cast<T>(code) - zero) * scale; }

}  // namespace blockops::lowbit
