// CUDA glue for the vector-quantized GEMM ops: argument checks (vq_op.h, shared with the CPU ops), allocation,
// launch on the current stream and the CUDA dispatch registration. Compiled by the host compiler; the kernels are
// in vq.cu. Codes >= k are not an error here (checking would need a device-to-host sync per call): the kernels
// read them as k - 1 (vq_launch.h).
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "../glue.h"
#include "../introspection.h"
#include "cuda_glue.h"
#include "../vq_op.h"
#include "vq_launch.h"

namespace blockops::vq {
namespace {

KernelCounter linear_counter(kFamily, "vq_linear.cuda");
KernelCounter linear_gemv_counter(kFamily, "vq_linear_gemv.cuda");  // which vq_linear kernel ran (tests check the paths)
KernelCounter linear_mma_counter(kFamily, "vq_linear_mma.cuda");
KernelCounter linear_simt_counter(kFamily, "vq_linear_simt.cuda");
KernelCounter dequant_counter(kFamily, "vq_dequantize.cuda");
KernelCounter grad_input_counter(kFamily, "vq_linear_grad_input.cuda");
KernelCounter grad_codebooks_counter(kFamily, "vq_grad_codebooks.cuda");
KernelCounter grad_scales_counter(kFamily, "vq_grad_scales.cuda");

// Contiguous and 16-byte aligned (the kernels' vector loads): a view at an odd offset is copied.
at::Tensor aligned(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.const_data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

// The kernels' view of validated weights; `codebooks` and `scales` must outlive the launch.
DeviceWeights device_weights(const Weights& w, const at::Tensor& codes, const at::Tensor& codebooks,
                             const at::Tensor& scales) {
  DeviceWeights d{};
  d.codes = codes.const_data_ptr();
  d.code_type = w.type;
  d.codebooks = codebooks.const_data_ptr();
  d.cb_type = dtype_of(codebooks.scalar_type());
  d.scales = scales.defined() ? scales.const_data_ptr() : nullptr;
  d.scale_type = scales.defined() ? dtype_of(scales.scalar_type()) : DType::kF32;
  d.g = w.g;
  return d;
}

at::Tensor optional_contiguous(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

// W_hat [out, in] in `dtype`.
at::Tensor dequantize_to(const DeviceWeights& w, const at::Tensor& like, at::ScalarType dtype) {
  at::Tensor w_hat = at::empty({w.g.out, w.g.in()}, like.options().dtype(dtype));
  C10_CUDA_CHECK(launch_vq_dequantize(w, w_hat.mutable_data_ptr(), dtype_of(dtype), c10::cuda::getCurrentCUDAStream()));
  return w_hat;
}

at::Tensor vq_linear_cuda(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& codebooks,
                          const c10::optional<at::Tensor>& scales, const c10::optional<at::Tensor>& bias) {
  constexpr const char* op = kLinear;
  const Weights w = check_weights(op, codes, codebooks, scales);
  check_activation(op, "x", x, w.g.in(), codes);
  check_bias(bias, w.g.out, op, codes, "codes");
  const KernelGuard guard(kFamily, op, x.device());
  linear_counter.hit();
  const int64_t m = rows_of(x);
  if (m == 0 || w.g.out == 0 || w.g.in() == 0) return linear_without_products(with_last_dim(x, w.g.out), bias, x.options());
  at::Tensor y = at::empty(with_last_dim(x, w.g.out), x.options());

  const at::Tensor xc = aligned(x);
  const at::Tensor cb = aligned(codebooks);
  const at::Tensor s = optional_contiguous(scales);
  const at::Tensor b = optional_contiguous(bias);
  LinearParams p{};
  p.w = device_weights(w, codes, cb, s);
  p.x = xc.const_data_ptr();
  p.x_type = dtype_of(x.scalar_type());
  p.bias = b.defined() ? b.const_data_ptr() : nullptr;
  p.bias_type = b.defined() ? dtype_of(b.scalar_type()) : DType::kF32;
  p.y = y.mutable_data_ptr();
  p.m = m;

  const LinearPath path = linear_path(p);
  const int splits = path == LinearPath::kGemv ? gemv_splits(p) : 1;
  at::Tensor workspace;
  if (splits > 1) {
    workspace = at::empty({splits, m, w.g.out}, x.options().dtype(at::kFloat));
    p.workspace = workspace.mutable_data_ptr<float>();
  }
  (path == LinearPath::kGemv ? linear_gemv_counter : path == LinearPath::kMma ? linear_mma_counter
                                                                              : linear_simt_counter).hit();
  C10_CUDA_CHECK(launch_vq_linear(p, path, splits, c10::cuda::getCurrentCUDAStream()));
  return y;
}

at::Tensor vq_dequantize_cuda(const at::Tensor& codes, const at::Tensor& codebooks,
                              const c10::optional<at::Tensor>& scales) {
  const Weights w = check_weights(kDequant, codes, codebooks, scales);
  const KernelGuard guard(kFamily, kDequant, codes.device());
  dequant_counter.hit();
  const at::Tensor s = optional_contiguous(scales);
  return dequantize_to(device_weights(w, codes, codebooks, s), codebooks, codebooks.scalar_type());
}

// grad_x = grad_out @ W_hat: W_hat is dequantized into a temporary in grad_out's dtype (one rounding, as the
// forward's tensor-core path) and multiplied by cuBLAS through at::matmul. Training-only; a fused kernel would
// save the temporary's write and read.
at::Tensor vq_linear_grad_input_cuda(const at::Tensor& grad_out, const at::Tensor& codes, const at::Tensor& codebooks,
                                     const c10::optional<at::Tensor>& scales) {
  constexpr const char* op = kGradInput;
  const Weights w = check_weights(op, codes, codebooks, scales);
  check_activation(op, "grad_out", grad_out, w.g.out, codes);
  const KernelGuard guard(kFamily, op, grad_out.device());
  grad_input_counter.hit();
  if (rows_of(grad_out) == 0 || w.g.in() == 0 || w.g.out == 0) {
    return at::zeros(with_last_dim(grad_out, w.g.in()), grad_out.options());
  }
  const at::Tensor s = optional_contiguous(scales);
  const at::Tensor w_hat = dequantize_to(device_weights(w, codes, codebooks, s), codebooks, grad_out.scalar_type());
  return at::matmul(grad_out, w_hat);
}

// Deterministic scatter-add: the code positions are grouped by codeword with a stable sort (key book * k + clamped
// code, flat index order inside a key), and one warp per codeword sums its list in a fixed order (vq.cu).
at::Tensor vq_grad_codebooks_cuda(const at::Tensor& t, const at::Tensor& codes, const at::Tensor& codebooks,
                                  const c10::optional<at::Tensor>& scales) {
  constexpr const char* op = kGradCodebooks;
  const Weights w = check_weights(op, codes, codebooks, scales);
  check_t(op, t, w.g, codes);
  const KernelGuard guard(kFamily, op, codes.device());
  grad_codebooks_counter.hit();
  const Geometry& g = w.g;
  at::Tensor grad = at::empty({g.K, g.k, g.d}, t.options());
  at::Tensor keys = codes.to(at::kLong);
  if (w.type == CodeType::kU16) keys = keys.bitwise_and(0xFFFF);  // int16 codes are read as uint16
  keys = keys.clamp_max(g.k - 1).reshape({-1, g.K}).add(at::arange(g.K, keys.options()).mul_(g.k));
  // The optional<bool> is spelled out: a bare `true` would pick the sort(int64_t dim, bool descending) overload
  // (dim 1 of a 1-D tensor: the first GPU run failed with "Dimension out of range").
  const auto sorted = keys.reshape({-1}).sort(/*stable=*/std::optional<bool>(true), /*dim=*/0);
  const at::Tensor order = std::get<1>(sorted);
  const at::Tensor offsets = at::searchsorted(std::get<0>(sorted), at::arange(g.K * g.k + 1, keys.options()));
  const at::Tensor s = optional_contiguous(scales);
  C10_CUDA_CHECK(launch_vq_grad_codebooks(t.const_data_ptr<float>(), device_weights(w, codes, codebooks, s),
                                          order.const_data_ptr<int64_t>(), offsets.const_data_ptr<int64_t>(),
                                          grad.mutable_data_ptr<float>(), c10::cuda::getCurrentCUDAStream()));
  return grad;
}

at::Tensor vq_grad_scales_cuda(const at::Tensor& t, const at::Tensor& codes, const at::Tensor& codebooks) {
  constexpr const char* op = kGradScales;
  const Weights w = check_weights(op, codes, codebooks, c10::nullopt);
  check_t(op, t, w.g, codes);
  const KernelGuard guard(kFamily, op, codes.device());
  grad_scales_counter.hit();
  at::Tensor grad = at::empty({w.g.out}, t.options());
  C10_CUDA_CHECK(launch_vq_grad_scales(t.const_data_ptr<float>(), device_weights(w, codes, codebooks, at::Tensor()),
                                       grad.mutable_data_ptr<float>(), c10::cuda::getCurrentCUDAStream()));
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(blockops, CUDA, m) {
  m.impl("vq_linear", &vq_linear_cuda);
  m.impl("vq_dequantize", &vq_dequantize_cuda);
  m.impl("vq_linear_grad_input", &vq_linear_grad_input_cuda);
  m.impl("vq_grad_codebooks", &vq_grad_codebooks_cuda);
  m.impl("vq_grad_scales", &vq_grad_scales_cuda);
}

}  // namespace blockops::vq
