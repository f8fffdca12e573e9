// CUDA glue for the low-bit GEMM ops: argument checks (lowbit_op.h, shared with the CPU path), allocation, launch on
// the current stream, cuBLAS for the many-row products, and the CUDA dispatch registration. Compiled by the host
// compiler; the kernels themselves are in lowbit.cu, lowbit_mma.cu and lowbit_wgmma.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/matmul.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "../glue.h"
#include "../introspection.h"
#include "cuda_glue.h"
#include "../lowbit_op.h"
#include "lowbit_launch.h"

namespace blockops::lowbit {
namespace {

KernelCounter linear_counter(kFamily, "quant_linear.cuda");
KernelCounter linear_mma_counter(kFamily, "quant_linear_mma.cuda");  // the tensor-core path of quant_linear ran
KernelCounter linear_wgmma_counter(kFamily, "quant_linear_wgmma.cuda");  // its Hopper path (lowbit_wgmma.cu) ran
KernelCounter dequantize_counter(kFamily, "quant_dequantize.cuda");
KernelCounter grad_input_counter(kFamily, "quant_linear_grad_input.cuda");
KernelCounter grad_scales_counter(kFamily, "quant_grad_scales.cuda");

// W_hat [out, in] in `dtype` (rounded once from fp32), for the cuBLAS paths.
at::Tensor dequantize_to(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
                         const Geometry& g, at::ScalarType dtype, cudaStream_t stream) {
  at::Tensor w_hat = at::empty({g.out, g.in}, scales.options().dtype(dtype));
  if (w_hat.numel() == 0) return w_hat;
  C10_CUDA_CHECK(launch_quant_dequantize(qweight.const_data_ptr<int32_t>(), scales.const_data_ptr(),
                                         zeros.const_data_ptr(), dtype_of(scales.scalar_type()),
                                         w_hat.mutable_data_ptr(), dtype_of(dtype), g, stream));
  return w_hat;
}

at::Tensor quant_linear_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                             const at::Tensor& zeros, int64_t bits, int64_t group_size,
                             const c10::optional<at::Tensor>& bias) {
  constexpr const char* op = kLinear;
  const Geometry g = check_weight(op, qweight, scales, zeros, bits, group_size);
  check_activation(op, "x", x, g.in, qweight);
  check_bias(bias, g.out, op, qweight, "qweight");
  const KernelGuard guard(kFamily, op, x.device());
  const int64_t m = rows_of(x);
  if (m == 0 || g.out == 0 || g.in == 0) return linear_without_products(with_last_dim(x, g.out), bias, x.options());
  linear_counter.hit();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  // check_bias fixes dtype and shape, not strides; the kernels index the bias densely (a no-op when it is).
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  GemvParams p{};
  p.x = x.const_data_ptr();
  p.x_type = dtype_of(x.scalar_type());
  p.qweight = qweight.const_data_ptr<int32_t>();
  p.scales = scales.const_data_ptr();
  p.zeros = zeros.const_data_ptr();
  p.param_type = dtype_of(scales.scalar_type());
  p.bias = b.defined() ? b.const_data_ptr() : nullptr;
  p.bias_type = b.defined() ? dtype_of(b.scalar_type()) : DType::kF32;
  p.m = m;
  p.g = g;

  // Up to kCudaGemvMaxRows: the fused GEMV. Up to kCudaMmaMaxRows (fp16 / bf16 x, out % 8 == 0, aligned operands):
  // the fused tensor-core kernel, weights read once and dequantized in registers. Above it on an sm_90 GPU with this
  // build's sm_90a code (and BLOCKOPS_LOWBIT_WGMMA != 0): the Hopper wgmma + TMA kernel, same fusion.
  const bool gemv = m <= kCudaGemvMaxRows;
  if (m > kCudaMmaMaxRows && hopper_kernels_run(kFamily, x.device().index(), "BLOCKOPS_LOWBIT_WGMMA") &&
      quant_wgmma_supported(p)) {
    at::Tensor y = at::empty(with_last_dim(x, g.out), x.options());
    p.y = y.mutable_data_ptr();
    linear_wgmma_counter.hit();
    C10_CUDA_CHECK(launch_quant_wgmma(p, stream));
    return y;
  }
  if (!gemv && !quant_mma_supported(p)) {
    // Enough rows to amortise one pass writing W_hat (or an operand the fused kernel does not take):
    // dequantize, then a tensor-core GEMM.
    const at::Tensor w_hat = dequantize_to(qweight, scales, zeros, g, x.scalar_type(), stream);
    c10::optional<at::Tensor> bias_x;
    if (bias.has_value()) bias_x = bias->to(x.scalar_type());
    return at::linear(x, w_hat, bias_x);
  }

  at::Tensor y = at::empty(with_last_dim(x, g.out), x.options());
  const int splits = gemv ? quant_gemv_splits(g, m) : quant_mma_splits(g, m);
  at::Tensor workspace;
  if (splits > 1) workspace = at::empty({m, g.out}, x.options().dtype(at::kFloat));
  p.y = y.mutable_data_ptr();
  p.workspace = splits > 1 ? workspace.mutable_data_ptr<float>() : nullptr;
  if (gemv) {
    C10_CUDA_CHECK(launch_quant_gemv(p, splits, stream));
  } else {
    linear_mma_counter.hit();
    C10_CUDA_CHECK(launch_quant_mma(p, splits, stream));
  }
  return y;
}

at::Tensor quant_dequantize_cuda(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
                                 int64_t bits, int64_t group_size) {
  constexpr const char* op = kDequant;
  const Geometry g = check_weight(op, qweight, scales, zeros, bits, group_size);
  const KernelGuard guard(kFamily, op, qweight.device());
  if (g.out * g.in > 0) dequantize_counter.hit();
  return dequantize_to(qweight, scales, zeros, g, scales.scalar_type(), c10::cuda::getCurrentCUDAStream());
}

at::Tensor quant_linear_grad_input_cuda(const at::Tensor& grad_out, const at::Tensor& qweight,
                                        const at::Tensor& scales, const at::Tensor& zeros, int64_t bits,
                                        int64_t group_size) {
  constexpr const char* op = kGradInput;
  const Geometry g = check_weight(op, qweight, scales, zeros, bits, group_size);
  check_activation(op, "grad_out", grad_out, g.out, qweight);
  const KernelGuard guard(kFamily, op, grad_out.device());
  if (rows_of(grad_out) == 0 || g.in == 0) return at::empty(with_last_dim(grad_out, g.in), grad_out.options());
  grad_input_counter.hit();
  // grad_x = grad_out @ W_hat: W_hat [out, in] is already the right operand, no transpose.
  const at::Tensor w_hat =
      dequantize_to(qweight, scales, zeros, g, grad_out.scalar_type(), c10::cuda::getCurrentCUDAStream());
  return at::matmul(grad_out, w_hat);
}

at::Tensor quant_grad_scales_cuda(const at::Tensor& t, const at::Tensor& qweight, const at::Tensor& zeros,
                                  int64_t bits, int64_t group_size) {
  constexpr const char* op = kGradScales;
  // zeros stands in for scales: the same shape and dtype rules apply to both.
  const Geometry g = check_weight(op, qweight, zeros, zeros, bits, group_size);
  check_t(op, t, g, qweight);
  const KernelGuard guard(kFamily, op, qweight.device());
  at::Tensor grad = at::empty({g.groups(), g.out}, t.options());
  if (grad.numel() == 0) return grad;
  grad_scales_counter.hit();
  C10_CUDA_CHECK(launch_quant_grad_scales(t.const_data_ptr<float>(), qweight.const_data_ptr<int32_t>(),
                                          zeros.const_data_ptr(), dtype_of(zeros.scalar_type()),
                                          grad.mutable_data_ptr<float>(), g, c10::cuda::getCurrentCUDAStream()));
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(blockops, CUDA, m) {
  m.impl("quant_linear", &quant_linear_cuda);
  m.impl("quant_dequantize", &quant_dequantize_cuda);
  m.impl("quant_linear_grad_input", &quant_linear_grad_input_cuda);
  m.impl("quant_grad_scales", &quant_grad_scales_cuda);
}

}  // namespace blockops::lowbit
