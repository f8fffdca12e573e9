// Launchers of the dllm CUDA kernels (kernels/dllm.cu). Torch-free: the glue in dllm_cuda.cpp checks the arguments
// (dllm_op.h), allocates the outputs and passes raw device pointers in UnmaskParams / OverwriteParams (csrc/dllm.h).
#pragma once
#include <cuda_runtime_api.h>

#include "../dllm.h"
#include "../dtype.h"

namespace blockops::dllm {

// Writes p.tokens, p.conf (statistics kernel, one CTA per position) and then p.unmask (selection, one CTA per row).
// Requires p.V < 2^31.
cudaError_t launch_dllm_unmask(const UnmaskParams& p, DType logits_type, cudaStream_t stream);

// cache[b, h, positions[b, j], :] = src[b, h, j, :]; out-of-range positions are skipped.
cudaError_t launch_dllm_kv_overwrite(const OverwriteParams& p, cudaStream_t stream);

}  // namespace blockops::dllm
