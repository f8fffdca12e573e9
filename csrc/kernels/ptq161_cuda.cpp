// CUDA glue for the PTQ1.61 ops: argument checks (shared with the CPU path), activations gathered through perm with
// ATen, the +-1 GEMV kernel (ptq161.cu) for up to kCudaGemvMaxRows rows, the salient 4-bit part on the lowbit
// family's CUDA kernels (through the dispatcher), and, for more rows, dequantize and the backward, sign bits and
// codes decoded with ATen element-wise ops + cuBLAS. Compiled by the host compiler.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "../glue.h"
#include "../introspection.h"
#include "cuda_glue.h"
#include "../ptq161_op.h"
#include "ptq161_launch.h"

namespace blockops::ptq161 {
namespace {

KernelCounter linear_counter(kFamily, "ptq161_linear.cuda");
KernelCounter gemv_counter(kFamily, "ptq161_linear_gemv.cuda");  // the fused +-1 GEMV kernel ran
KernelCounter dequant_counter(kFamily, "ptq161_dequantize.cuda");
KernelCounter backward_counter(kFamily, "ptq161_linear_backward.cuda");

// Activations through perm: salient [rows, S_pad] (zero padded), plain [rows, words * 32] = r2 x over the
// non-salient channels (zero padded), raw [rows, N] = x there.
struct Gathered {
  at::Tensor salient, plain, raw;
};

Gathered gather(const at::Tensor& x32, const at::Tensor& perm, const at::Tensor& r2, const Geometry& g) {
  const at::Tensor p = perm.to(at::kLong);
  const at::Tensor sal = p.narrow(0, 0, g.salient), rest = p.narrow(0, g.salient, g.plain());
  Gathered out;
  out.salient = at::constant_pad_nd(x32.index_select(1, sal), {0, g.salient_padded() - g.salient});
  out.raw = x32.index_select(1, rest);
  out.plain = at::constant_pad_nd(out.raw * r2.index_select(0, rest), {0, g.sign_words() * kSignsPerWord - g.plain()})
                  .contiguous();
  return out;
}

// Fields of `bits` width of every int32 word of `packed` [words, out], LSB first: [words * (32 / bits), out].
at::Tensor unpack_fields(const at::Tensor& packed, int bits) {
  const int per = 32 / bits;
  const at::Tensor shifts = at::arange(per, packed.options()).mul_(bits).view({1, per, 1});
  return packed.unsqueeze(1).bitwise_right_shift(shifts).bitwise_and_((1 << bits) - 1).reshape({-1, packed.size(1)});
}

// b [N, out] fp32: +1 / -1 from the sign bits, 0 at the sign(0) entries.
at::Tensor decode_signs(const at::Tensor& signs, const at::Tensor& zero_signs, const Geometry& g) {
  at::Tensor b = unpack_fields(signs, 1).narrow(0, 0, g.plain()).to(at::kFloat).mul_(2).sub_(1).contiguous();
  if (zero_signs.numel() > 0) b.view(-1).index_fill_(0, zero_signs, 0.f);
  return b;
}

// W_high [S, out] fp32 in perm order: s_i (q[k, i] - z_i).
at::Tensor decode_high(const at::Tensor& qsalient, const Factors& f, const Geometry& g) {
  return (unpack_fields(qsalient, kSalientBits).narrow(0, 0, g.salient).to(at::kFloat) - f.zero) * f.scale;
}

// U [rows, out] = b^T plain, with b = 0 at the sign(0) entries.
at::Tensor sign_dot(const at::Tensor& plain, const at::Tensor& signs, const at::Tensor& zero_signs, const Geometry& g) {
  const int64_t rows = plain.size(0);
  if (g.plain() == 0) return at::zeros({rows, g.out}, plain.options());
  if (rows > kCudaGemvMaxRows) return at::mm(plain.narrow(1, 0, g.plain()), decode_signs(signs, zero_signs, g));
  gemv_counter.hit();
  at::Tensor u = at::empty({rows, g.out}, plain.options());
  const BinaryGemvParams p{plain.const_data_ptr<float>(), signs.const_data_ptr<int32_t>(), u.mutable_data_ptr<float>(),
                           rows, g};
  C10_CUDA_CHECK(launch_binary_gemv(p, c10::cuda::getCurrentCUDAStream()));
  if (zero_signs.numel() > 0) {  // the kernel read every stored bit: take the sign(0) entries back out
    const at::Tensor j = zero_signs.div(g.out, "floor"), i = zero_signs.remainder(g.out);
    const at::Tensor words = signs.view(-1).index_select(0, j.div(kSignsPerWord, "floor").mul(g.out).add(i));
    const at::Tensor b = words.bitwise_right_shift(j.remainder(kSignsPerWord)).bitwise_and(1).to(at::kFloat).mul(2).sub(1);
    u.index_add_(1, i, plain.index_select(1, j) * b, -1);
  }
  return u;
}

at::Tensor ptq161_linear_cuda(const at::Tensor& x, const at::Tensor& perm, const at::Tensor& qsalient,
                              const at::Tensor& salient_scale, const at::Tensor& salient_zero, const at::Tensor& signs,
                              const at::Tensor& zero_signs, const at::Tensor& alpha, const at::Tensor& mu,
                              const at::Tensor& r1, const at::Tensor& r2, int64_t num_salient,
                              const c10::optional<at::Tensor>& bias) {
  const Linear ln = begin_linear(kLinear, x, perm, qsalient, salient_scale, salient_zero, signs,
                                 zero_signs, alpha, mu, r1, r2, num_salient, bias);
  const KernelGuard guard(kFamily, kLinear, x.device());
  if (ln.done()) return linear_without_products(ln.out_sizes, bias, x.options());
  linear_counter.hit();
  const Factors& f = ln.f;
  const Geometry& g = ln.g;
  const Gathered xg = gather(ln.x32, perm, f.r2, g);
  const at::Tensor u = sign_dot(xg.plain, signs, zero_signs, g);
  at::Tensor y = f.r1 * (f.alpha * u + f.mu * xg.plain.sum(1, /*keepdim=*/true));
  if (g.salient > 0) y.add_(lowbit_linear(xg.salient, qsalient, salient_params(f, g)));
  if (bias.has_value()) y.add_(contiguous_fp32(*bias));
  return y.to(x.scalar_type()).view(ln.out_sizes);
}

// W_hat [out, in] fp32, original channel order.
at::Tensor dequantize(const at::Tensor& perm, const at::Tensor& qsalient, const at::Tensor& signs,
                      const at::Tensor& zero_signs, const Factors& f, const Geometry& g) {
  const at::Tensor p = perm.to(at::kLong);
  const at::Tensor rest = p.narrow(0, g.salient, g.plain());
  at::Tensor w = at::zeros({g.out, g.in}, f.alpha.options());
  if (w.numel() == 0) return w;
  if (g.salient > 0) w.index_copy_(1, p.narrow(0, 0, g.salient), decode_high(qsalient, f, g).t());
  if (g.plain() > 0) {
    const at::Tensor low = f.r1 * (f.alpha * decode_signs(signs, zero_signs, g) + f.mu);  // [N, out]
    w.index_copy_(1, rest, low.t() * f.r2.index_select(0, rest));
  }
  return w;
}

at::Tensor ptq161_dequantize_cuda(const at::Tensor& perm, const at::Tensor& qsalient, const at::Tensor& salient_scale,
                                  const at::Tensor& salient_zero, const at::Tensor& signs, const at::Tensor& zero_signs,
                                  const at::Tensor& alpha, const at::Tensor& mu, const at::Tensor& r1,
                                  const at::Tensor& r2, int64_t num_salient) {
  Factors f;
  const Geometry g = check_weight(kDequant, perm, qsalient, salient_scale, salient_zero, signs,
                                  zero_signs, alpha, mu, r1, r2, num_salient, &f);
  const KernelGuard guard(kFamily, kDequant, perm.device());
  dequant_counter.hit();
  return dequantize(perm, qsalient, signs, zero_signs, f, g);
}

// The CPU op's formulas (ptq161_cpu.cpp), on decoded b and W_high.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ptq161_linear_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& perm, const at::Tensor& qsalient,
    const at::Tensor& salient_scale, const at::Tensor& salient_zero, const at::Tensor& signs,
    const at::Tensor& zero_signs, const at::Tensor& alpha, const at::Tensor& mu, const at::Tensor& r1,
    const at::Tensor& r2, int64_t num_salient, bool need_input, bool need_factors) {
  Backward bw = begin_backward(kBackward, grad_out, x, perm, qsalient, salient_scale,
                               salient_zero, signs, zero_signs, alpha, mu, r1, r2, num_salient, need_input,
                               need_factors);
  const KernelGuard guard(kFamily, kBackward, x.device());
  backward_counter.hit();
  if (bw.done()) return bw.outputs();
  const Factors& f = bw.f;
  const Geometry& g = bw.g;
  const at::Tensor& gy = bw.gy;
  const Gathered xg = gather(bw.x32, perm, f.r2, g);
  const at::Tensor p = perm.to(at::kLong);
  const at::Tensor rest = p.narrow(0, g.salient, g.plain());
  const at::Tensor b = decode_signs(signs, zero_signs, g);                     // [N, out]
  const at::Tensor zn = at::mm(gy, (f.r1 * (f.alpha * b + f.mu)).t());        // [rows, N]
  if (need_factors) {
    bw.factor_grads(at::mm(xg.plain.narrow(1, 0, g.plain()), b), xg.plain.sum(1, /*keepdim=*/true));
    bw.grad_r2.index_copy_(0, rest, (xg.raw * zn).sum(0).to(r2.scalar_type()));
  }
  at::Tensor gx32;
  if (need_input) {
    gx32 = at::zeros({bw.rows, g.in}, bw.x32.options());
    if (g.salient > 0) gx32.index_copy_(1, p.narrow(0, 0, g.salient), at::mm(gy, decode_high(qsalient, f, g).t()));
    gx32.index_copy_(1, rest, zn * f.r2.index_select(0, rest));
  }
  return bw.outputs(gx32);
}

}  // namespace

TORCH_LIBRARY_IMPL(blockops, CUDA, m) {
  m.impl("ptq161_linear", &ptq161_linear_cuda);
  m.impl("ptq161_dequantize", &ptq161_dequantize_cuda);
  m.impl("ptq161_linear_backward", &ptq161_linear_backward_cuda);
}

}  // namespace blockops::ptq161
