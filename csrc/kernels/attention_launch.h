// Launchers of the block-sparse attention CUDA kernels (kernels/attention.cu, kernels/attention_mma_{fwd,bwd}.cu,
// kernels/attention_wgmma.cu).
// Torch-free: the glue in attention_cuda.cpp checks the arguments (attention_op.h), allocates the outputs and
// workspaces and passes raw device pointers in FwdParams / BwdParams (csrc/attention.h documents every field).
#pragma once
#include <cuda_runtime_api.h>

#include "../attention.h"

namespace blockops::attention {

// Which kernel a call runs: the tensor-core (mma.sync) kernels for fp16/bf16, the CUDA-core kernels (every
// dtype, the simple reference the fast ones are tested against) otherwise.
enum class CudaPath { kSimple, kMma };
CudaPath forward_path(const FwdParams& p);
CudaPath backward_path(const BwdParams& p);

// The tensor-core forward (attention_mma_fwd.cu), for attention.cu's dispatch: whether it takes these arguments
// (fp16/bf16, 16-byte aligned operands and strides, shared memory within the device's opt-in limit), and its
// launcher (writes p.out and p.lse).
bool fwd_mma_supported(const FwdParams& p);
cudaError_t launch_fwd_mma(const FwdParams& p, cudaStream_t stream);

// The Hopper forward (attention_wgmma.cu: wgmma + TMA, sm_90a only), which the glue (attention_cuda.cpp) picks
// before the others on a GPU that runs this build's sm_90a kernels (hopper_kernels_run; BLOCKOPS_ATTENTION_WGMMA=0
// turns it off): whether it takes these arguments (fp16/bf16, D == Dv in {64, 128, 256}, block_q and block_kv in
// {64, 128}, q / k / v viewable as 3-D TMA tensors, shared memory within the opt-in limit; always false in a build
// without the CuTe headers), and its launcher (writes p.out and p.lse).
bool fwd_wgmma_supported(const FwdParams& p);
cudaError_t launch_fwd_wgmma(const FwdParams& p, cudaStream_t stream);

// The tensor-core backward (attention_mma_bwd.cu): whether it takes these arguments (as above, and max(D, Dv) <= 128),
// and its launcher, which reads p.delta (computed first by launch_block_sparse_attention_bwd) and writes
// p.grad_k, p.grad_v (one CTA per key block) and p.grad_q (one CTA per query block).
bool bwd_mma_supported(const BwdParams& p);
cudaError_t launch_bwd_mma(const BwdParams& p, cudaStream_t stream);

// Writes p.out and p.lse.
cudaError_t launch_block_sparse_attention_fwd(const FwdParams& p, cudaStream_t stream);

// Writes p.delta (workspace), then p.grad_q, p.grad_k, p.grad_v.
cudaError_t launch_block_sparse_attention_bwd(const BwdParams& p, cudaStream_t stream);

}  // namespace blockops::attention
