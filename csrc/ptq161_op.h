// Torch-facing argument handling for the PTQ1.61 ops, shared by the CPU glue (ptq161_cpu.cpp) and the CUDA glue
// (kernels/ptq161_cuda.cpp); implemented in ptq161_op.cpp. Every check names the op, the argument and the sizes.
#pragma once
#include <ATen/core/Tensor.h>

#include <tuple>
#include <vector>

#include "ptq161.h"

namespace blockops::ptq161 {

constexpr const char* kFamily = "ptq161";

// The ops' names in error messages (their schemas are in ops.cpp).
constexpr const char* kLinear = "blockops.ptq161_linear";
constexpr const char* kDequant = "blockops.ptq161_dequantize";
constexpr const char* kBackward = "blockops.ptq161_linear_backward";

// fp32 copies of the per-row / per-column factors (O(in + out): converting costs nothing next to a product).
struct Factors {
  at::Tensor scale, zero, alpha, mu, r1, r2;
};

// A float factor of shape [size] on ref's device, contiguous.
void check_factor(const char* op, const char* arg, const at::Tensor& t, int64_t size, const at::Tensor& ref);

// Validates the packed weight (dtypes, shapes, devices, contiguity; perm a permutation of [0, in); zero_signs
// strictly increasing and in range, both read through host copies for device tensors) and returns its geometry;
// fills *factors with fp32 copies when factors != nullptr.
Geometry check_weight(const char* op, const at::Tensor& perm, const at::Tensor& qsalient, const at::Tensor& scale,
                      const at::Tensor& zero, const at::Tensor& signs, const at::Tensor& zero_signs,
                      const at::Tensor& alpha, const at::Tensor& mu, const at::Tensor& r1, const at::Tensor& r2,
                      int64_t num_salient, Factors* factors);

// The salient part runs on the lowbit family's 4-bit kernels through the dispatcher (blockops::quant_linear and
// quant_linear_grad_input with one scale / zero per row, so it works on every device those ops support): S_pad
// channels in `groups` equal groups of at most lowbit::kCpuFixedPointMaxGroup (lowbit.h: the CPU fixed-point decode
// kernel's largest group), each repeating the row's scale and zero.
struct SalientParams {
  at::Tensor scales, zeros;  // [groups, out] fp32
  int64_t group_size;
};

int64_t salient_groups(const Geometry& g);
int64_t salient_group_size(const Geometry& g);  // S_pad / salient_groups(g)
SalientParams salient_params(const Factors& f, const Geometry& g);
// x [rows, S_pad] fp32 (zero padded) -> s_i (D - z_i X) [rows, out] fp32.
at::Tensor lowbit_linear(const at::Tensor& x, const at::Tensor& qweight, const SalientParams& p);
// gy [rows, out] fp32 -> gy @ W_high (in perm order, padded) [rows, S_pad] fp32.
at::Tensor lowbit_grad_input(const at::Tensor& gy, const at::Tensor& qweight, const SalientParams& p);

// An activation-like tensor [..., features]: fp16/bf16/fp32, perm's device, contiguous.
void check_activation(const char* op, const char* arg, const at::Tensor& t, int64_t features, const at::Tensor& perm);

// What ptq161_linear's CPU and CUDA kernels share: every argument checked, the output's sizes, x as fp32 [rows, in]
// (undefined when done(): the output is all zeros).
struct Linear {
  Factors f;
  Geometry g;
  std::vector<int64_t> out_sizes;
  int64_t rows;
  at::Tensor x32;
  bool done() const { return !x32.defined(); }
};

// convert_factors false: ln.f is left empty for the caller to fill (the CPU op converts the six in one buffer).
Linear begin_linear(const char* op, const at::Tensor& x, const at::Tensor& perm, const at::Tensor& qsalient,
                    const at::Tensor& salient_scale, const at::Tensor& salient_zero, const at::Tensor& signs,
                    const at::Tensor& zero_signs, const at::Tensor& alpha, const at::Tensor& mu, const at::Tensor& r1,
                    const at::Tensor& r2, int64_t num_salient, const c10::optional<at::Tensor>& bias,
                    bool convert_factors = true);

// What ptq161_linear_backward's CPU and CUDA kernels share: every argument checked, the outputs allocated (zeros
// where asked for, empty otherwise), x and grad_out as fp32 [rows, in] / [rows, out] (undefined when done()).
struct Backward {
  Factors f;
  Geometry g;
  int64_t rows;
  at::Tensor grad_x, grad_alpha, grad_r1, grad_r2;
  at::Tensor x32, gy;
  bool done() const { return !x32.defined(); }   // nothing to compute: the outputs are final
  // The four outputs; grad_x takes grad_x32 [rows, in] (fp32) when given.
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> outputs(const at::Tensor& grad_x32 = {}) const;
  // grad_alpha and grad_r1 from U = x'^T b [rows, out] and V = the row sums of x' [rows, 1].
  void factor_grads(const at::Tensor& u, const at::Tensor& v);
};

Backward begin_backward(const char* op, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& perm,
                        const at::Tensor& qsalient, const at::Tensor& salient_scale, const at::Tensor& salient_zero,
                        const at::Tensor& signs, const at::Tensor& zero_signs, const at::Tensor& alpha,
                        const at::Tensor& mu, const at::Tensor& r1, const at::Tensor& r2, int64_t num_salient,
                        bool need_input, bool need_factors);

}  // namespace blockops::ptq161
