// Torch-facing argument handling for the block-sparse attention ops, shared by the CPU and CUDA glue
// (implemented in attention_op.cpp). Every check names the op, the argument and the sizes.
#pragma once
#include <ATen/core/Tensor.h>

#include "attention.h"

namespace blockops::attention {

constexpr const char* kFamily = "attention";   // introspection.h: counters and build_info
constexpr const char* kForward = "blockops.block_sparse_attention";
constexpr const char* kBackward = "blockops.block_sparse_attention_backward";

// lse's dtype (and grad_lse's, and the backward's Delta workspace): fp32, fp64 for fp64 operands (CPU only).
inline at::ScalarType lse_dtype(at::ScalarType operands) {
  return operands == at::kDouble ? at::kDouble : at::kFloat;
}

// The mask tensors of one direction as the op receives them.
struct ListTensors {
  const at::Tensor& num;
  const at::Tensor& idx;
  const at::Tensor& full_num;
  const at::Tensor& full_idx;
  const at::Tensor& tile_ids;
};

// Validates q, k, v, the forward lists and the tiles (dtypes, devices, shapes, strides, block sizes) and
// returns the kernel parameters with out / lse left null. Does not read tensor values (no device sync).
FwdParams describe_forward(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const ListTensors& kv_lists, const at::Tensor& tiles, int64_t block_q, int64_t block_kv,
                           double scale);

// Validates the backward's extra inputs (grad_out, out, lse, the transposed lists) against `fwd` and fills
// everything but the output and workspace pointers. grad_out, out and grad_lse (optional) must already be
// contiguous.
BwdParams describe_backward(const char* op, const FwdParams& fwd, const at::Tensor& grad_out, const at::Tensor& out,
                            const at::Tensor& lse, const c10::optional<at::Tensor>& grad_lse,
                            const ListTensors& q_lists);

// Reads the values of one direction's lists (CPU tensors only: the CPU glue runs it, where reading them is free;
// the CUDA kernels skip such entries instead, list_entry_ok) and raises on a count outside [0, width], a listed
// index outside [0, width) or a partial entry's tile id outside [0, num_tiles). `partial` and `full` name the
// index tensors in the message.
void check_lists(const char* op, const char* partial, const char* full, const ListTensors& lists, int64_t num_tiles);

}  // namespace blockops::attention
