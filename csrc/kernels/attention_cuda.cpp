// CUDA glue for the block-sparse attention ops: the shared argument checks (attention_op.h), allocation of the
// outputs and the Delta workspace, launch on the current stream, and the CUDA dispatch registration. Compiled by
// the host compiler; the kernels are in attention.cu (CUDA cores, every dtype), attention_mma_fwd.cu /
// attention_mma_bwd.cu (tensor cores) and attention_wgmma.cu (the Hopper forward).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../attention_op.h"
#include "../introspection.h"
#include "cuda_glue.h"
#include "attention_launch.h"

namespace blockops::attention {
namespace {

KernelCounter fwd_counter(kFamily, "block_sparse_attention.cuda");
KernelCounter fwd_mma_counter(kFamily, "block_sparse_attention_mma.cuda");  // the tensor-core forward ran
KernelCounter fwd_wgmma_counter(kFamily, "block_sparse_attention_wgmma.cuda");  // the Hopper forward ran
KernelCounter bwd_counter(kFamily, "block_sparse_attention_backward.cuda");
KernelCounter bwd_mma_counter(kFamily, "block_sparse_attention_backward_mma.cuda");  // the tensor-core backward ran

std::tuple<at::Tensor, at::Tensor> block_sparse_attention_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& kv_num_blocks,
    const at::Tensor& kv_indices, const at::Tensor& full_kv_num_blocks, const at::Tensor& full_kv_indices,
    const at::Tensor& kv_tile_ids, const at::Tensor& /*q_num_blocks*/, const at::Tensor& /*q_indices*/,
    const at::Tensor& /*full_q_num_blocks*/, const at::Tensor& /*full_q_indices*/, const at::Tensor& /*q_tile_ids*/,
    const at::Tensor& tiles, int64_t block_q, int64_t block_kv, double scale) {
  // The transposed lists are the op's inputs only for its registered autograd; the forward reads the kv lists.
  constexpr const char* op = kForward;
  FwdParams p = describe_forward(op, q, k, v, {kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
                                               kv_tile_ids}, tiles, block_q, block_kv, scale);
  const KernelGuard guard(kFamily, op, q.device());
  at::Tensor out = at::empty({p.batch, p.heads, p.q_len, p.v_dim}, q.options());
  at::Tensor lse = at::empty({p.batch, p.heads, p.q_len}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};  // B or H is 0
  p.out = out.mutable_data_ptr();
  p.lse = lse.mutable_data_ptr<float>();
  fwd_counter.hit();
  // An sm_90 GPU running this build's sm_90a kernels takes the Hopper forward where it fits (attention_launch.h).
  if (hopper_kernels_run(kFamily, q.device().index(), "BLOCKOPS_ATTENTION_WGMMA") && fwd_wgmma_supported(p)) {
    fwd_wgmma_counter.hit();
    C10_CUDA_CHECK(launch_fwd_wgmma(p, c10::cuda::getCurrentCUDAStream()));
    return {out, lse};
  }
  if (forward_path(p) == CudaPath::kMma) fwd_mma_counter.hit();
  C10_CUDA_CHECK(launch_block_sparse_attention_fwd(p, c10::cuda::getCurrentCUDAStream()));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_sparse_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const c10::optional<at::Tensor>& grad_lse, const at::Tensor& kv_num_blocks,
    const at::Tensor& kv_indices,
    const at::Tensor& full_kv_num_blocks, const at::Tensor& full_kv_indices, const at::Tensor& kv_tile_ids,
    const at::Tensor& q_num_blocks, const at::Tensor& q_indices, const at::Tensor& full_q_num_blocks,
    const at::Tensor& full_q_indices, const at::Tensor& q_tile_ids, const at::Tensor& tiles, int64_t block_q,
    int64_t block_kv, double scale) {
  constexpr const char* op = kBackward;
  const FwdParams fwd = describe_forward(op, q, k, v, {kv_num_blocks, kv_indices, full_kv_num_blocks,
                                                       full_kv_indices, kv_tile_ids}, tiles, block_q, block_kv, scale);
  const KernelGuard guard(kFamily, op, q.device());
  // The kernels index O and grad_lse densely (dO with its strides); describe_backward wants all three contiguous.
  const at::Tensor grad_out_c = grad_out.contiguous();
  const at::Tensor out_c = out.contiguous();
  const c10::optional<at::Tensor> grad_lse_c =
      grad_lse.has_value() ? c10::optional<at::Tensor>(grad_lse->contiguous()) : c10::nullopt;
  BwdParams p = describe_backward(op, fwd, grad_out_c, out_c, lse, grad_lse_c,
                                  {q_num_blocks, q_indices, full_q_num_blocks, full_q_indices, q_tile_ids});
  at::Tensor grad_q = at::empty({fwd.batch, fwd.heads, fwd.q_len, fwd.head_dim}, q.options());
  at::Tensor grad_k = at::empty({fwd.batch, fwd.kv_heads, fwd.kv_len, fwd.head_dim}, q.options());
  at::Tensor grad_v = at::empty({fwd.batch, fwd.kv_heads, fwd.kv_len, fwd.v_dim}, q.options());
  if (grad_q.numel() == 0) {  // B or H is 0: no query reads k or v (H = 0 may still leave kv heads)
    return {grad_q, grad_k.zero_(), grad_v.zero_()};
  }
  at::Tensor delta = at::empty({fwd.batch, fwd.heads, fwd.q_len}, q.options().dtype(at::kFloat));
  p.delta = delta.mutable_data_ptr<float>();
  p.grad_q = grad_q.mutable_data_ptr();
  p.grad_k = grad_k.mutable_data_ptr();
  p.grad_v = grad_v.mutable_data_ptr();
  bwd_counter.hit();
  if (backward_path(p) == CudaPath::kMma) bwd_mma_counter.hit();
  C10_CUDA_CHECK(launch_block_sparse_attention_bwd(p, c10::cuda::getCurrentCUDAStream()));
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(blockops, CUDA, m) {
  m.impl("block_sparse_attention", &block_sparse_attention_cuda);
  m.impl("block_sparse_attention_backward", &block_sparse_attention_backward_cuda);
}

}  // namespace blockops::attention
