// Torch-facing argument handling of the block-sparse attention ops (attention_op.h), the one place both the CPU
// glue (attention_cpu.cpp) and the CUDA glue (kernels/attention_cuda.cpp) take it from: the checks of dtypes,
// devices, shapes, strides and block sizes, the building of the kernel parameters, and the value checks of
// hand-built lists that only the CPU glue runs (its tensors can be read for free).
#include <ATen/core/Tensor.h>

#include <array>
#include <cmath>
#include <initializer_list>
#include <utility>

#include "attention_op.h"
#include "checks.h"
#include "glue.h"

namespace blockops::attention {

namespace {

void check_block_size(const char* op, const char* arg, int64_t size) {
  TORCH_CHECK(size == 16 || size == 32 || size == 64 || size == 128, op, ": ", arg,
              " must be one of 16, 32, 64, 128, got ", size);
}

void check_list(const char* op, const char* arg, const at::Tensor& t, std::initializer_list<int64_t> shape,
                const at::Tensor& ref) {
  check_dtype(t, {at::kInt}, op, arg);
  check_same_device(t, ref, op, arg, "q");
  check_contiguous(t, op, arg);
  TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), op, ": ", arg, " must have shape ", at::IntArrayRef(shape),
              " (from the mask's batch/head dims, q's and k's lengths and the block sizes), got ", t.sizes());
}

// Strides of a [B, H, T, D] operand: only the last dim must be contiguous (q from a [B, T, H, D] projection
// viewed as [B, H, T, D] works as is).
void check_operand(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& q) {
  check_dtype(t, {at::kHalf, at::kBFloat16, at::kFloat}, op, arg);
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", arg, " has dtype ", t.scalar_type(), " but q has ",
              q.scalar_type(), "; q, k and v must share one dtype");
  check_same_device(t, q, op, arg, "q");
  TORCH_CHECK(t.dim() == 4, op, ": ", arg, " must be [B, H, T, D], got shape ", t.sizes());
  TORCH_CHECK(t.size(3) % 8 == 0 && t.size(3) >= 8 && t.size(3) <= kMaxHeadDim, op, ": ", arg,
              " head dim must be a multiple of 8 in [8, ", kMaxHeadDim, "], got ", t.size(3));
  TORCH_CHECK(t.stride(3) == 1, op, ": ", arg, " must be contiguous in its last (head) dim, got strides ",
              t.strides(), "; call .contiguous() first");
}

// Reads one direction's partial or full lists (CPU tensors): counts in [0, width], the first `count` indices in
// [0, width) and, with tile_ids, their tile ids in [0, num_tiles).
void check_list_values(const char* op, const char* which, const at::Tensor& num, const at::Tensor& idx,
                       const at::Tensor* tile_ids, int64_t num_tiles) {
  const int64_t rows = num.numel(), width = idx.size(-1);
  const int32_t* n = num.data_ptr<int32_t>();
  const int32_t* ix = idx.data_ptr<int32_t>();
  const int32_t* ti = tile_ids ? tile_ids->data_ptr<int32_t>() : nullptr;
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(n[r] >= 0 && n[r] <= width, op, ": ", which, " count ", n[r], " at flat position ", r,
                " is out of range [0, ", width, "]");
    for (int i = 0; i < n[r]; ++i) {
      const int32_t e = ix[r * width + i];
      TORCH_CHECK(e >= 0 && e < width, op, ": ", which, " index ", e, " (list ", r, ", entry ", i,
                  ") is out of range [0, ", width, ")");
      if (ti != nullptr) {
        const int32_t id = ti[r * width + i];
        TORCH_CHECK(id >= 0 && id < num_tiles, op, ": ", which, " tile id ", id, " (list ", r, ", entry ", i,
                    ") is out of range [0, ", num_tiles, ")");
      }
    }
  }
}

}  // namespace

FwdParams describe_forward(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const ListTensors& kv_lists, const at::Tensor& tiles, int64_t block_q, int64_t block_kv,
                           double scale) {
  check_operand(op, "q", q, q);
  check_operand(op, "k", k, q);
  check_operand(op, "v", v, q);
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), op, ": q, k and v must have one batch size, got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(v.size(1) == k.size(1) && v.size(2) == k.size(2), op, ": v must have k's heads and length, got k ",
              k.sizes(), " and v ", v.sizes());
  TORCH_CHECK(q.size(1) % k.size(1) == 0, op, ": q's heads (", q.size(1), ") must be a multiple of k's heads (",
              k.size(1), ") for grouped-query attention");
  TORCH_CHECK(k.size(3) == q.size(3), op, ": k head dim ", k.size(3), " must equal q head dim ", q.size(3));
  TORCH_CHECK(q.size(2) >= 1 && k.size(2) >= 1, op, ": q and k need at least one position, got q ", q.sizes(),
              " and k ", k.sizes());
  checked_finite_float(scale, op, "scale");  // the kernels take it as a float
  check_block_size(op, "block_q", block_q);
  check_block_size(op, "block_kv", block_kv);

  FwdParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.dtype = dtype_of(q.scalar_type());
  p.batch = q.size(0);
  p.heads = q.size(1);
  p.kv_heads = k.size(1);
  p.q_len = q.size(2);
  p.kv_len = k.size(2);
  p.head_dim = static_cast<int>(q.size(3));
  p.v_dim = static_cast<int>(v.size(3));
  p.q_stride_b = q.stride(0), p.q_stride_h = q.stride(1), p.q_stride_t = q.stride(2);
  p.k_stride_b = k.stride(0), p.k_stride_h = k.stride(1), p.k_stride_t = k.stride(2);
  p.v_stride_b = v.stride(0), p.v_stride_h = v.stride(1), p.v_stride_t = v.stride(2);
  p.scale = static_cast<float>(scale);

  MaskDims& m = p.mask;
  m.block_q = static_cast<int>(block_q);
  m.block_kv = static_cast<int>(block_kv);
  m.q_blocks = (p.q_len + block_q - 1) / block_q;
  m.kv_blocks = (p.kv_len + block_kv - 1) / block_kv;
  const at::Tensor& num = kv_lists.num;
  TORCH_CHECK(num.dim() == 3, op, ": kv_num_blocks must be [B', H', QB], got shape ", num.sizes());
  m.batch = num.size(0);
  m.heads = num.size(1);
  TORCH_CHECK(m.batch == 1 || m.batch == p.batch, op, ": the mask's batch dim is ", m.batch, " but q has batch ",
              p.batch, " (must be 1 to broadcast, or equal)");
  TORCH_CHECK(m.heads == 1 || m.heads == p.heads, op, ": the mask's head dim is ", m.heads, " but q has ", p.heads,
              " heads (must be 1 to broadcast, or equal)");
  const int64_t qb = m.q_blocks, kb = m.kv_blocks;
  check_list(op, "kv_num_blocks", num, {m.batch, m.heads, qb}, q);
  check_list(op, "kv_indices", kv_lists.idx, {m.batch, m.heads, qb, kb}, q);
  check_list(op, "full_kv_num_blocks", kv_lists.full_num, {m.batch, m.heads, qb}, q);
  check_list(op, "full_kv_indices", kv_lists.full_idx, {m.batch, m.heads, qb, kb}, q);
  check_list(op, "kv_tile_ids", kv_lists.tile_ids, {m.batch, m.heads, qb, kb}, q);
  check_dtype(tiles, {at::kInt}, op, "tiles");
  check_same_device(tiles, q, op, "tiles", "q");
  check_contiguous(tiles, op, "tiles");
  TORCH_CHECK(tiles.dim() == 3 && tiles.size(1) == block_q && tiles.size(2) == m.words(), op,
              ": tiles must be [num_tiles, ", block_q, ", ", m.words(), "] for blocks of ", block_q, " x ", block_kv,
              ", got ", tiles.sizes());
  m.num_tiles = tiles.size(0);
  p.kv = BlockLists{num.data_ptr<int32_t>(), kv_lists.idx.data_ptr<int32_t>(), kv_lists.full_num.data_ptr<int32_t>(),
                    kv_lists.full_idx.data_ptr<int32_t>(), kv_lists.tile_ids.data_ptr<int32_t>(), qb, kb};
  p.tiles = tiles.data_ptr<int32_t>();
  return p;
}

BwdParams describe_backward(const char* op, const FwdParams& fwd, const at::Tensor& grad_out, const at::Tensor& out,
                            const at::Tensor& lse, const c10::optional<at::Tensor>& grad_lse,
                            const ListTensors& q_lists) {
  const std::array<int64_t, 4> out_dims{fwd.batch, fwd.heads, fwd.q_len, fwd.v_dim};
  const at::IntArrayRef out_shape(out_dims);
  for (auto [arg, t] : {std::pair<const char*, const at::Tensor*>{"grad_out", &grad_out}, {"out", &out}}) {
    TORCH_CHECK(t->scalar_type() == scalar_type_of(fwd.dtype), op, ": ", arg, " must have q's dtype, got ",
                t->scalar_type());
    TORCH_CHECK(t->sizes() == out_shape, op, ": ", arg, " must have shape ", out_shape, ", got ", t->sizes());
    TORCH_CHECK(t->device().type() == lse.device().type(), op, ": ", arg, " is on ", t->device(), ", lse on ",
                lse.device());
    check_contiguous(*t, op, arg);
  }
  check_dtype(lse, {at::kFloat}, op, "lse");
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({fwd.batch, fwd.heads, fwd.q_len}), op, ": lse must have shape [",
              fwd.batch, ", ", fwd.heads, ", ", fwd.q_len, "], got ", lse.sizes());
  check_contiguous(lse, op, "lse");
  if (grad_lse.has_value()) {
    check_dtype(*grad_lse, {at::kFloat}, op, "grad_lse");
    check_same_device(*grad_lse, lse, op, "grad_lse", "lse");
    TORCH_CHECK(grad_lse->sizes() == lse.sizes(), op, ": grad_lse must have lse's shape ", lse.sizes(), ", got ",
                grad_lse->sizes());
    check_contiguous(*grad_lse, op, "grad_lse");
  }
  const MaskDims& m = fwd.mask;
  check_list(op, "q_num_blocks", q_lists.num, {m.batch, m.heads, m.kv_blocks}, lse);
  check_list(op, "q_indices", q_lists.idx, {m.batch, m.heads, m.kv_blocks, m.q_blocks}, lse);
  check_list(op, "full_q_num_blocks", q_lists.full_num, {m.batch, m.heads, m.kv_blocks}, lse);
  check_list(op, "full_q_indices", q_lists.full_idx, {m.batch, m.heads, m.kv_blocks, m.q_blocks}, lse);
  check_list(op, "q_tile_ids", q_lists.tile_ids, {m.batch, m.heads, m.kv_blocks, m.q_blocks}, lse);

  BwdParams p{};
  p.fwd = fwd;
  p.fwd.out = const_cast<void*>(out.data_ptr());
  p.fwd.lse = const_cast<float*>(lse.data_ptr<float>());
  p.grad_out = grad_out.data_ptr();
  p.grad_lse = grad_lse.has_value() ? grad_lse->data_ptr<float>() : nullptr;
  p.do_stride_b = grad_out.stride(0), p.do_stride_h = grad_out.stride(1), p.do_stride_t = grad_out.stride(2);
  p.q = BlockLists{q_lists.num.data_ptr<int32_t>(), q_lists.idx.data_ptr<int32_t>(),
                   q_lists.full_num.data_ptr<int32_t>(), q_lists.full_idx.data_ptr<int32_t>(),
                   q_lists.tile_ids.data_ptr<int32_t>(), m.kv_blocks, m.q_blocks};
  return p;
}

void check_lists(const char* op, const char* partial, const char* full, const ListTensors& l, int64_t num_tiles) {
  check_list_values(op, partial, l.num, l.idx, &l.tile_ids, num_tiles);
  check_list_values(op, full, l.full_num, l.full_idx, nullptr, 0);
}

}  // namespace blockops::attention
