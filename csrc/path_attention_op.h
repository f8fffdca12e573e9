// Torch-facing argument handling for the PaTH attention ops, shared by the CPU and CUDA glue (implemented in
// path_attention_op.cpp): the op names, the sequences and their chunks, and the checks that turn the tensors into
// the kernels' parameters (path_attention.h). Every check names the op, the argument and the sizes.
#pragma once
#include <ATen/core/Tensor.h>

#include <type_traits>
#include <vector>

#include "path_attention.h"

namespace blockops::path_attention {

constexpr const char* kFamily = "path_attention";   // introspection.h: counters and build_info
constexpr const char* kForward = "blockops.path_attention";
constexpr const char* kKeyCache = "blockops.path_key_cache";
constexpr const char* kBackward = "blockops.path_attention_backward";
constexpr const char* kDecode = "blockops.path_decode_step";

// The sequences of one call and the global numbering of their chunks.
struct Chunking {
  std::vector<Span> spans;
  std::vector<int64_t> first_chunk;   // global index of each span's first chunk; back() = total chunks

  // One entry per global chunk (path_attention.h, ChunkRef), for the CUDA kernels.
  std::vector<ChunkRef> chunk_refs() const;
  int64_t max_chunks_per_span() const;
};

inline int64_t chunks_of(int64_t len) { return (len + kChunk - 1) / kChunk; }

// B rows of T tokens, or the packed sequences of cu_seqlens (a CPU tensor; its values are checked: start 0, end
// T, non-decreasing). Empty sequences are dropped.
Chunking make_chunking(const char* op, int64_t batch, int64_t seq_len, const c10::optional<at::Tensor>& cu_seqlens);

// The dtype of the compute type S (path_attention.h: float, or double for fp64 inputs on the CPU): of lse,
// grad_lse, the decode step's cache and the CPU kernels' buffers.
template <typename S>
constexpr at::ScalarType kComputeDtype = std::is_same_v<S, double> ? at::kDouble : at::kFloat;

// Dtypes (every check below): q, k, v (q_t, k_t, v_t) share one of fp16/bf16/fp32, or fp64 on the CPU only (for
// gradcheck; the CUDA kernels are fp32-accumulating only); w, beta, g are fp32 or q's dtype, and fp64 when q is
// (the fp64 path computes in fp64 throughout). The glue picks S from q's (k's) dtype: double for fp64, else float
// (the CUDA glue: always float, the default). Instantiated for float and double in path_attention_op.cpp.

// Checks k, w, beta and cu_seqlens (dtype, shape, on k's device, B = 1); fills the key-side fields of ParamsT.
template <typename S = float>
ParamsT<S> describe_keys(const char* op, const at::Tensor& k, const at::Tensor& w, const at::Tensor& beta,
                         const c10::optional<at::Tensor>& cu_seqlens);

// Checks every forward argument; fills ParamsT except the outputs. Reads no tensor values (no device sync).
template <typename S = float>
ParamsT<S> describe_forward(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& w, const at::Tensor& beta, const c10::optional<at::Tensor>& g,
                            const c10::optional<at::Tensor>& cu_seqlens, double scale);

// Checks the backward's extra inputs against the forward's parameters: grad_o and o [B, T, HQ, Dv] in q's dtype,
// lse and grad_lse (optional) [B, HQ, T] in kComputeDtype<S>, all contiguous and on q's device.
template <typename S>
void check_backward_inputs(const char* op, const ParamsT<S>& p, const at::Tensor& q, const at::Tensor& grad_o,
                           const at::Tensor& o, const at::Tensor& lse, const c10::optional<at::Tensor>& grad_lse);

// Checks the decode step's arguments (shapes, dtypes, devices, contiguity; lengths copied to the host and each
// checked against the capacity) and fills DecodeParamsT except o; lengths_host receives the host copy. The cache
// (keys, values, gates, g_last) is in kComputeDtype<S>.
template <typename S = float>
DecodeParamsT<S> describe_decode(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& w, const at::Tensor& beta, const c10::optional<at::Tensor>& g,
                                 const at::Tensor& keys, const at::Tensor& values, const at::Tensor& lengths,
                                 const c10::optional<at::Tensor>& gates, const c10::optional<at::Tensor>& g_last,
                                 double scale, at::Tensor& lengths_host);

}  // namespace blockops::path_attention
