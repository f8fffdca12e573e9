// The argument checks of the PTQ1.61 ops and what the CPU and CUDA glue share around them (ptq161_op.h): the
// checked and converted arguments of ptq161_linear and its backward, the factors' gradients, and the salient part on
// the lowbit family's 4-bit kernels through the dispatcher.
#include "ptq161_op.h"

#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "checks.h"
#include "glue.h"
#include "lowbit.h"

namespace blockops::ptq161 {

// ---------------------------------------------------------------------------------------------------------
// Argument checks
// ---------------------------------------------------------------------------------------------------------

void check_factor(const char* op, const char* arg, const at::Tensor& t, int64_t size, const at::Tensor& ref) {
  check_float_dtype(t, op, arg);  // fp64 on the CPU only
  check_same_device(t, ref, op, arg, "perm");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == size, op, ": ", arg, " must have shape [", size, "], got ", t.sizes());
  check_contiguous(t, op, arg);
}

Geometry check_weight(const char* op, const at::Tensor& perm, const at::Tensor& qsalient, const at::Tensor& scale,
                      const at::Tensor& zero, const at::Tensor& signs, const at::Tensor& zero_signs,
                      const at::Tensor& alpha, const at::Tensor& mu, const at::Tensor& r1, const at::Tensor& r2,
                      int64_t num_salient, Factors* factors) {
  check_dtype(perm, {at::kInt}, op, "perm");
  check_dtype(qsalient, {at::kInt}, op, "qsalient");
  check_dtype(signs, {at::kInt}, op, "signs");
  check_dtype(zero_signs, {at::kLong}, op, "zero_signs");
  TORCH_CHECK(perm.dim() == 1, op, ": perm must be 1-D [in], got shape ", perm.sizes());
  TORCH_CHECK(alpha.dim() == 1, op, ": alpha must be 1-D [out], got shape ", alpha.sizes());
  const Geometry g{perm.size(0), alpha.size(0), num_salient};
  TORCH_CHECK(num_salient >= 0 && num_salient <= g.in, op, ": num_salient must be in [0, in = ", g.in, "], got ",
              num_salient);
  const std::pair<const at::Tensor*, const char*> packed[] = {
      {&qsalient, "qsalient"}, {&signs, "signs"}, {&zero_signs, "zero_signs"}};
  for (const auto& [t, name] : packed) {
    check_same_device(*t, perm, op, name, "perm");
    check_contiguous(*t, op, name);
  }
  check_contiguous(perm, op, "perm");
  TORCH_CHECK(qsalient.dim() == 2 && qsalient.size(0) == g.salient_words() && qsalient.size(1) == g.out, op,
              ": qsalient must have shape [", g.salient_words(), ", ", g.out, "] (", num_salient,
              " salient channels padded to ", g.salient_padded(), ", 8 codes per word), got ", qsalient.sizes());
  TORCH_CHECK(signs.dim() == 2 && signs.size(0) == g.sign_words() && signs.size(1) == g.out, op,
              ": signs must have shape [", g.sign_words(), ", ", g.out, "] (", g.plain(),
              " non-salient channels, 32 per word), got ", signs.sizes());
  TORCH_CHECK(zero_signs.dim() == 1, op, ": zero_signs must be 1-D, got shape ", zero_signs.sizes());
  check_factor(op, "salient_scale", scale, g.out, perm);
  check_factor(op, "salient_zero", zero, g.out, perm);
  check_factor(op, "alpha", alpha, g.out, perm);
  check_factor(op, "mu", mu, g.out, perm);
  check_factor(op, "r1", r1, g.out, perm);
  check_factor(op, "r2", r2, g.in, perm);
  // perm must be a permutation of [0, in): every channel exactly once (O(in), cheap next to any product; device
  // tensors are checked through a host copy).
  const at::Tensor perm_host = perm.is_cpu() ? perm : perm.cpu();
  const int32_t* p = perm_host.const_data_ptr<int32_t>();
  std::vector<char> seen(g.in, 0);
  for (int64_t c = 0; c < g.in; ++c) {
    TORCH_CHECK(p[c] >= 0 && p[c] < g.in, op, ": perm[", c, "] = ", p[c], " is out of range [0, ", g.in, ")");
    TORCH_CHECK(!seen[p[c]], op, ": perm is not a permutation: channel ", p[c], " appears twice");
    seen[p[c]] = 1;
  }
  const at::Tensor zero_host = zero_signs.is_cpu() ? zero_signs : zero_signs.cpu();
  const int64_t* z = zero_host.const_data_ptr<int64_t>();
  const int64_t limit = g.plain() * g.out;
  for (int64_t e = 0; e < zero_signs.numel(); ++e) {
    TORCH_CHECK(z[e] >= 0 && z[e] < limit, op, ": zero_signs[", e, "] = ", z[e], " is out of range [0, N * out = ",
                limit, ")");
    TORCH_CHECK(e == 0 || z[e] > z[e - 1], op, ": zero_signs must be strictly increasing, but zero_signs[", e,
                "] = ", z[e], " follows ", z[e - 1]);
  }
  if (factors != nullptr) {
    *factors = Factors{contiguous_fp32(scale), contiguous_fp32(zero), contiguous_fp32(alpha), contiguous_fp32(mu), contiguous_fp32(r1), contiguous_fp32(r2)};
  }
  return g;
}

void check_activation(const char* op, const char* arg, const at::Tensor& t, int64_t features, const at::Tensor& perm) {
  check_features(t, features, op, arg, perm, "perm");
  check_contiguous(t, op, arg);
}

Linear begin_linear(const char* op, const at::Tensor& x, const at::Tensor& perm, const at::Tensor& qsalient,
                    const at::Tensor& salient_scale, const at::Tensor& salient_zero, const at::Tensor& signs,
                    const at::Tensor& zero_signs, const at::Tensor& alpha, const at::Tensor& mu, const at::Tensor& r1,
                    const at::Tensor& r2, int64_t num_salient, const c10::optional<at::Tensor>& bias,
                    bool convert_factors) {
  Linear ln;
  ln.g = check_weight(op, perm, qsalient, salient_scale, salient_zero, signs, zero_signs, alpha, mu, r1, r2,
                      num_salient, convert_factors ? &ln.f : nullptr);
  check_activation(op, "x", x, ln.g.in, perm);
  if (bias.has_value()) check_factor(op, "bias", *bias, ln.g.out, perm);
  ln.out_sizes = x.sizes().vec();
  ln.out_sizes.back() = ln.g.out;
  ln.rows = rows_of(x);
  if (ln.rows == 0 || ln.g.out == 0 || ln.g.in == 0) return ln;  // done(): the glue returns the bias (or zeros)
  ln.x32 = contiguous_fp32(x.reshape({ln.rows, ln.g.in}));
  return ln;
}

Backward begin_backward(const char* op, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& perm,
                        const at::Tensor& qsalient, const at::Tensor& salient_scale, const at::Tensor& salient_zero,
                        const at::Tensor& signs, const at::Tensor& zero_signs, const at::Tensor& alpha,
                        const at::Tensor& mu, const at::Tensor& r1, const at::Tensor& r2, int64_t num_salient,
                        bool need_input, bool need_factors) {
  Backward b;
  b.g = check_weight(op, perm, qsalient, salient_scale, salient_zero, signs, zero_signs, alpha, mu, r1, r2,
                     num_salient, &b.f);
  const Geometry& g = b.g;
  check_activation(op, "x", x, g.in, perm);
  check_activation(op, "grad_out", grad_out, g.out, perm);
  b.rows = rows_of(x);
  TORCH_CHECK(grad_out.numel() == b.rows * g.out, op, ": grad_out ", grad_out.sizes(), " does not match x ", x.sizes(),
              " (", b.rows, " rows of ", g.out, " outputs)");
  b.grad_x = need_input ? at::zeros(x.sizes(), x.options()) : at::empty({0}, x.options());
  b.grad_alpha = need_factors ? at::zeros({g.out}, alpha.options()) : at::empty({0}, alpha.options());
  b.grad_r1 = need_factors ? at::zeros({g.out}, r1.options()) : at::empty({0}, r1.options());
  b.grad_r2 = need_factors ? at::zeros({g.in}, r2.options()) : at::empty({0}, r2.options());
  if (b.rows == 0 || g.in == 0 || g.out == 0 || !(need_input || need_factors)) return b;
  b.x32 = contiguous_fp32(x.reshape({b.rows, g.in}));
  b.gy = contiguous_fp32(grad_out.reshape({b.rows, g.out}));
  return b;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> Backward::outputs(const at::Tensor& grad_x32) const {
  if (grad_x32.defined()) grad_x.copy_(grad_x32.view(grad_x.sizes()));
  return {grad_x, grad_alpha, grad_r1, grad_r2};
}

void Backward::factor_grads(const at::Tensor& u, const at::Tensor& v) {
  grad_alpha.copy_(f.r1 * (gy * u).sum(0));
  grad_r1.copy_((gy * (f.alpha * u + f.mu * v)).sum(0));
}

// ---------------------------------------------------------------------------------------------------------
// The salient part through the lowbit family's 4-bit kernels
// ---------------------------------------------------------------------------------------------------------

// Groups of at most lowbit::kCpuFixedPointMaxGroup salient channels (multiples of 16) splitting S_pad evenly, so that
// the lowbit CPU decode kernel runs its fixed-point path; every group repeats the row's scale and zero. At least
// kSalientMinGroups groups where they stay kSalientMinGroupChannels wide: the one-row decode splits its work by
// groups (split-K), so a single group ran on one thread. Measured, AVX2 path, 2 threads, batch 1: 4096 x 4096
// 0.25-0.29 -> 0.24 ms, 11008 in x 4096 out 0.63-0.65 -> 0.55 ms (832 and 2208 salient channels: 1 -> 4 groups).
constexpr int64_t kSalientMinGroups = 4;
constexpr int64_t kSalientMinGroupChannels = 128;
int64_t salient_groups(const Geometry& g) {
  const int64_t units = g.salient_padded() / kSalientAlign;
  int64_t fewest = 0;
  for (int64_t k = 1; k <= units; ++k) {
    if (units % k != 0 || units / k * kSalientAlign > lowbit::kCpuFixedPointMaxGroup) continue;
    if (fewest == 0) fewest = k;
    if (k >= kSalientMinGroups || units / k * kSalientAlign < kSalientMinGroupChannels) break;
    fewest = k;
  }
  return fewest;
}

int64_t salient_group_size(const Geometry& g) { return g.salient_padded() / salient_groups(g); }

SalientParams salient_params(const Factors& f, const Geometry& g) {
  const int64_t groups = salient_groups(g);
  return {f.scale.view({1, g.out}).expand({groups, g.out}).contiguous(),
          f.zero.view({1, g.out}).expand({groups, g.out}).contiguous(), salient_group_size(g)};
}

at::Tensor lowbit_linear(const at::Tensor& x, const at::Tensor& qweight, const SalientParams& p) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("blockops::quant_linear", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, int64_t, int64_t, const c10::optional<at::Tensor>&)>();
  return op.call(x, qweight, p.scales, p.zeros, kSalientBits, p.group_size, c10::nullopt);
}

at::Tensor lowbit_grad_input(const at::Tensor& gy, const at::Tensor& qweight, const SalientParams& p) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("blockops::quant_linear_grad_input", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, int64_t, int64_t)>();
  return op.call(gy, qweight, p.scales, p.zeros, kSalientBits, p.group_size);
}

}  // namespace blockops::ptq161
