// Launchers of the PaTH attention CUDA kernels (kernels/path_attention.cu). Torch-free: the glue in
// path_attention_cuda.cpp checks the arguments (path_attention_op.h), builds the chunk tables on the host,
// allocates the outputs and workspaces (sizes below) and passes raw device pointers.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "../path_attention.h"

namespace blockops::path_attention {

// The sequences and chunks of one call, on the device, plus the per-chunk UT blocks (pass 1's output).
struct CudaPlan {
  const Span* spans;            // [n_spans]
  const int64_t* first_chunk;   // [n_spans]: global index of each span's first chunk
  const ChunkRef* chunks;       // [total_chunks]
  const int64_t* order;         // [total_chunks]: global chunk indices, latest within their sequence first
  int64_t n_spans, total_chunks, max_span_chunks;
  float* blocks;                // [H, total_chunks, block_floats(p)], zero-filled by the caller
  float* G;                     // [B, HQ, T] fp32 workspace for cumsum(g) (written by the launchers), or null
  bool tensor_cores;            // fp16/bf16 q: the forward's products on mma.sync (operands rounded to q's dtype)
};

// The full (backward-orientation) chunk block: the CUDA kernels always build it.
BLOCKOPS_HD ChunkLayout cuda_chunk_layout(const Params& p) { return ChunkLayout{p.head_dim, p.v_dim, true}; }
BLOCKOPS_HD int64_t block_floats(const Params& p) { return cuda_chunk_layout(p).size(); }

// Dynamic shared memory of the forward kernel (fp32 Q0 [C, D], QW and S [C, C], acc [C, Dv], 3 row vectors) and
// of the per-chunk UT kernels (gram, wk, T, U [C, C] and beta [C]). The glue compares them with the device's
// opt-in limit (device_smem_optin) to give a clear error first.
inline int64_t forward_smem_bytes(const Params& p) {
  return 4 * (static_cast<int64_t>(kChunk) * (p.head_dim + p.v_dim) + 2 * kChunk * kChunk + 3 * kChunk);
}
// The largest D + Dv whose forward fits in smem_bytes (the inverse of forward_smem_bytes), for the glue's error.
inline int64_t max_forward_head_dims(int64_t smem_bytes) {
  return (smem_bytes / 4 - 2 * kChunk * kChunk - 3 * kChunk) / kChunk;
}
constexpr int64_t kUtSmemBytes = 4 * (4 * kChunk * kChunk + kChunk);
int device_smem_optin();

// Writes p.o and p.lse (and plan.G, plan.blocks).
cudaError_t launch_path_forward(const Params& p, const CudaPlan& plan, cudaStream_t stream);

// Keys carried to the last position of their sequence into out ([B, T, H, D], p.dtype). p.v_dim may be 0 (no v).
// scratch: key_cache_scratch_floats(p, plan) fp32.
inline int64_t key_cache_scratch_floats(const Params& p, const CudaPlan& plan) {
  const int64_t d = p.head_dim;
  return plan.n_spans * p.kv_heads * (d * d + 2 * d * kChunk);
}
cudaError_t launch_path_key_cache(const Params& p, const CudaPlan& plan, float* scratch, void* out,
                                  cudaStream_t stream);

// Gradient accumulators of one chunk (the backward's second workspace), in floats: dKbar, dTDW, dW, dK, dY [C, D];
// dU (ld C), dUc (ld n), dT, dZ, tmp, dA [C, C]; dV [C, Dv]; dbeta [C].
struct GradLayout {
  int d, dv;
  BLOCKOPS_HD int64_t cd() const { return static_cast<int64_t>(d) * kChunk; }
  BLOCKOPS_HD int64_t dkbar() const { return 0; }
  BLOCKOPS_HD int64_t dtdw() const { return cd(); }
  BLOCKOPS_HD int64_t dw() const { return 2 * cd(); }
  BLOCKOPS_HD int64_t dk() const { return 3 * cd(); }
  BLOCKOPS_HD int64_t dy() const { return 4 * cd(); }
  BLOCKOPS_HD int64_t du() const { return 5 * cd(); }
  BLOCKOPS_HD int64_t duc() const { return du() + kChunk * kChunk; }
  BLOCKOPS_HD int64_t dt() const { return duc() + kChunk * kChunk; }
  BLOCKOPS_HD int64_t dz() const { return dt() + kChunk * kChunk; }
  BLOCKOPS_HD int64_t tmp() const { return dz() + kChunk * kChunk; }
  BLOCKOPS_HD int64_t da() const { return tmp() + kChunk * kChunk; }
  BLOCKOPS_HD int64_t dvals() const { return da() + kChunk * kChunk; }
  BLOCKOPS_HD int64_t dbeta() const { return dvals() + static_cast<int64_t>(kChunk) * dv; }
  BLOCKOPS_HD int64_t size() const { return dbeta() + kChunk; }
};

struct BwdArgs {
  const void* grad_o;      // [B, T, HQ, Dv], p.dtype
  const void* o;           // [B, T, HQ, Dv], p.dtype
  const float* lse;        // [B, HQ, T]
  const float* grad_lse;   // [B, HQ, T] or null
  float* dq;               // [B, T, HQ, D] fp32 (every row of a sequence written)
  float* dk;               // [B, T, H, D] fp32 (idem)
  float* dv;               // [B, T, H, Dv] fp32
  float* dw;               // [B, T, H, D] fp32
  float* dbeta;            // [B, T, H] fp32
  float* dG;               // [B, HQ, T] fp32, zero-filled; holds d loss / d g on return ([B, HQ, T] order)
  float* grads;            // [H, total_chunks, GradLayout.size()] fp32, zero-filled
  float* scratch;          // [n_spans * H, bwd_scratch_floats] fp32
};

// Per (sequence, key head) scratch of the backward: one query chunk's (path_attention.h, QueryChunkScratch) for
// the longest sequence.
BLOCKOPS_HD int64_t bwd_scratch_floats(const Params& p, const CudaPlan& plan) {
  return query_chunk_scratch_floats(plan.max_span_chunks, p.head_dim, p.v_dim);
}
cudaError_t launch_path_backward(const Params& p, const CudaPlan& plan, const BwdArgs& bb, cudaStream_t stream);

// One decoding step (path_attention.h, DecodeParams; p.lengths on the device, each checked < capacity by the
// glue). scores: [B, HQ, capacity] fp32 workspace.
cudaError_t launch_path_decode_step(const DecodeParams& p, float* scores, cudaStream_t stream);

}  // namespace blockops::path_attention
