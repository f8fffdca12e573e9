// CUDA glue for the dllm ops: argument checks (shared with the CPU path, dllm_op.h), allocation, launch on the current
// stream, and the CUDA dispatch registration. Compiled by the host compiler; the kernels are in dllm.cu.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "../dllm_op.h"
#include "../introspection.h"
#include "cuda_glue.h"
#include "dllm_launch.h"

namespace blockops::dllm {
namespace {

KernelCounter unmask_counter(kFamily, "dllm_unmask.cuda");
KernelCounter overwrite_counter(kFamily, "dllm_kv_overwrite.cuda");

std::tuple<at::Tensor, at::Tensor, at::Tensor> dllm_unmask_cuda(const at::Tensor& logits, const at::Tensor& masked,
                                                                  const at::Tensor& block_bounds,
                                                                  const c10::optional<at::Tensor>& min_tokens,
                                                                  double threshold, c10::optional<double> factor) {
  const KernelGuard guard(kFamily, kUnmask, logits.device());
  UnmaskCall c = prepare_unmask(logits, masked, block_bounds, min_tokens, threshold, factor);
  TORCH_CHECK(c.params.V < std::numeric_limits<int32_t>::max(), kUnmask, ": the CUDA kernel takes vocabularies below "
              "2^31, got ", c.params.V);
  TORCH_CHECK(c.params.B * c.params.L < std::numeric_limits<int32_t>::max(), kUnmask, ": B * L must be below 2^31");
  unmask_counter.hit();
  C10_CUDA_CHECK(launch_dllm_unmask(c.params, static_cast<DType>(c.dtype), c10::cuda::getCurrentCUDAStream()));
  return {c.tokens, c.unmask, c.confidence};
}

void dllm_kv_overwrite_cuda(at::Tensor& cache, const at::Tensor& src, const at::Tensor& positions,
                            bool check_indices) {
  const KernelGuard guard(kFamily, kOverwrite, cache.device());
  const OverwriteParams p = prepare_overwrite(cache, src, positions);
  TORCH_CHECK(p.B <= 65535, kOverwrite, ": the CUDA kernel takes at most 65535 rows, got ", p.B);
  if (check_indices) check_positions(positions, p.S);
  overwrite_counter.hit();
  C10_CUDA_CHECK(launch_dllm_kv_overwrite(p, c10::cuda::getCurrentCUDAStream()));
}

}  // namespace

TORCH_LIBRARY_IMPL(blockops, CUDA, m) {
  m.impl("dllm_unmask", &dllm_unmask_cuda);
  m.impl("dllm_kv_overwrite", &dllm_kv_overwrite_cuda);
}

}  // namespace blockops::dllm
