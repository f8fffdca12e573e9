// CUDA glue for the PaTH attention ops: the argument checks shared with the CPU op (path_attention_op.h), the chunk
// tables (built on the host: cu_seqlens is copied to the host, one small synchronous copy per call with varlen),
// allocation of the outputs and workspaces, launch on the current stream, and the CUDA dispatch registration for
// the same op names as the CPU kernels. The kernels are in path_attention.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../introspection.h"
#include "cuda_glue.h"
#include "../path_attention_op.h"
#include "path_attention_launch.h"

namespace blockops::path_attention {
namespace {

KernelCounter forward_counter(kFamily, "path_attention.cuda");
KernelCounter key_cache_counter(kFamily, "path_key_cache.cuda");
KernelCounter backward_counter(kFamily, "path_attention_backward.cuda");
KernelCounter decode_counter(kFamily, "path_decode_step.cuda");

// The chunk tables of one call on the device, and the plan pointing into them (blocks and G left to the caller).
struct DevicePlan {
  at::Tensor tables;   // int64: spans [S, 3] | first_chunk [S] | chunks [total, 5] | order [total]
  CudaPlan plan{};
};

DevicePlan make_plan(const char* op, const Params& p, const at::Tensor& like,
                     const c10::optional<at::Tensor>& cu_seqlens) {
  c10::optional<at::Tensor> cu_host;
  if (cu_seqlens.has_value()) cu_host = cu_seqlens->to(at::kCPU);
  const Chunking ch = make_chunking(op, p.batch, p.seq_len, cu_host);
  const std::vector<ChunkRef> refs = ch.chunk_refs();
  const int64_t n_spans = static_cast<int64_t>(ch.spans.size()), total = static_cast<int64_t>(refs.size());
  static_assert(sizeof(Span) == 3 * sizeof(int64_t) && sizeof(ChunkRef) == 5 * sizeof(int64_t));
  std::vector<int64_t> host(static_cast<size_t>(4 * n_spans + 6 * total));
  int64_t* at = host.data();
  std::copy_n(reinterpret_cast<const int64_t*>(ch.spans.data()), 3 * n_spans, at);
  std::copy_n(ch.first_chunk.data(), n_spans, at + 3 * n_spans);
  std::copy_n(reinterpret_cast<const int64_t*>(refs.data()), 5 * total, at + 4 * n_spans);
  int64_t* order = at + 4 * n_spans + 5 * total;
  for (int64_t g = 0; g < total; ++g) order[g] = g;
  // Latest chunks of their sequence first: they walk the most key chunks (a CTA-level longest-first schedule).
  std::stable_sort(order, order + total, [&](int64_t a, int64_t b) { return refs[a].index > refs[b].index; });
  DevicePlan dp;
  dp.tables = at::from_blob(host.data(), {static_cast<int64_t>(host.size())}, at::kLong)
                  .to(like.device(), /*non_blocking=*/false, /*copy=*/true);
  const int64_t* base = dp.tables.data_ptr<int64_t>();
  dp.plan.spans = reinterpret_cast<const Span*>(base);
  dp.plan.first_chunk = base + 3 * n_spans;
  dp.plan.chunks = reinterpret_cast<const ChunkRef*>(base + 4 * n_spans);
  dp.plan.order = base + 4 * n_spans + 5 * total;
  dp.plan.n_spans = n_spans;
  dp.plan.total_chunks = total;
  dp.plan.max_span_chunks = ch.max_chunks_per_span();
  dp.plan.tensor_cores = true;
  return dp;
}

// Chunk blocks and (with a gate) the G workspace, attached to the plan; the tensors must outlive the launch.
std::vector<at::Tensor> attach_workspaces(const Params& p, CudaPlan& plan, const at::Tensor& like) {
  const at::TensorOptions f32 = like.options().dtype(at::kFloat);
  at::Tensor blocks = at::zeros({p.kv_heads, plan.total_chunks, block_floats(p)}, f32);
  plan.blocks = blocks.data_ptr<float>();
  at::Tensor G;
  if (p.g != nullptr) {
    G = at::zeros({p.batch, p.heads, p.seq_len}, f32);
    plan.G = G.data_ptr<float>();
  }
  return {blocks, G};
}

void check_forward_smem(const char* op, const Params& p) {
  const int64_t need = forward_smem_bytes(p), limit = device_smem_optin();
  TORCH_CHECK(need <= limit, op, ": head dims D = ", p.head_dim, " and Dv = ", p.v_dim, " need ", need,
              " bytes of shared memory per block on CUDA, this device allows ", limit, "; use D + Dv <= ",
              max_forward_head_dims(limit));
}

std::tuple<at::Tensor, at::Tensor> path_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                       const at::Tensor& w, const at::Tensor& beta,
                                                       const c10::optional<at::Tensor>& g,
                                                       const c10::optional<at::Tensor>& cu_seqlens, double scale) {
  constexpr const char* op = kForward;
  Params p = describe_forward(op, q, k, v, w, beta, g, cu_seqlens, scale);
  const KernelGuard guard(kFamily, op, q.device());
  check_forward_smem(op, p);
  at::Tensor o = at::empty({p.batch, p.seq_len, p.heads, p.v_dim}, q.options());
  at::Tensor lse = at::empty({p.batch, p.heads, p.seq_len}, q.options().dtype(at::kFloat));
  p.o = o.data_ptr();
  p.lse = lse.data_ptr<float>();
  DevicePlan dp = make_plan(op, p, q, cu_seqlens);
  forward_counter.hit();
  if (dp.plan.total_chunks == 0 || p.heads == 0) return {o, lse};
  const std::vector<at::Tensor> keep = attach_workspaces(p, dp.plan, q);
  C10_CUDA_CHECK(launch_path_forward(p, dp.plan, c10::cuda::getCurrentCUDAStream()));
  return {o, lse};
}

at::Tensor path_key_cache_cuda(const at::Tensor& k, const at::Tensor& w, const at::Tensor& beta,
                               const c10::optional<at::Tensor>& cu_seqlens) {
  constexpr const char* op = kKeyCache;
  Params p = describe_keys(op, k, w, beta, cu_seqlens);
  p.v = p.k;   // pass 1 reads v; the cache needs none, so v is a zero-width view of k
  p.v_dim = 0;
  p.heads = p.kv_heads;
  const KernelGuard guard(kFamily, op, k.device());
  at::Tensor out = at::empty(k.sizes(), k.options());
  DevicePlan dp = make_plan(op, p, k, cu_seqlens);
  key_cache_counter.hit();
  if (dp.plan.total_chunks == 0 || p.kv_heads == 0) return out;
  const std::vector<at::Tensor> keep = attach_workspaces(p, dp.plan, k);
  at::Tensor scratch = at::empty({key_cache_scratch_floats(p, dp.plan)}, k.options().dtype(at::kFloat));
  C10_CUDA_CHECK(launch_path_key_cache(p, dp.plan, scratch.data_ptr<float>(), out.data_ptr(),
                                       c10::cuda::getCurrentCUDAStream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> path_attention_backward_cuda(
    const at::Tensor& grad_o, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
    const at::Tensor& beta, const c10::optional<at::Tensor>& g, const c10::optional<at::Tensor>& cu_seqlens,
    const at::Tensor& o, const at::Tensor& lse, const c10::optional<at::Tensor>& grad_lse, double scale) {
  constexpr const char* op = kBackward;
  Params p = describe_forward(op, q, k, v, w, beta, g, cu_seqlens, scale);
  check_backward_inputs(op, p, q, grad_o, o, lse, grad_lse);
  const KernelGuard guard(kFamily, op, q.device());
  const at::TensorOptions f32 = q.options().dtype(at::kFloat);
  // Rows outside every sequence (none without cu_seqlens; none with a valid one) stay zero.
  at::Tensor dq = at::zeros(q.sizes(), f32), dk = at::zeros(k.sizes(), f32), dv = at::zeros(v.sizes(), f32);
  at::Tensor dw = at::zeros(k.sizes(), f32), dbeta = at::zeros(beta.sizes(), f32);
  at::Tensor dG = at::zeros({p.batch, p.heads, p.seq_len}, f32);
  DevicePlan dp = make_plan(op, p, q, cu_seqlens);
  backward_counter.hit();
  if (dp.plan.total_chunks > 0 && p.heads > 0) {
    const std::vector<at::Tensor> keep = attach_workspaces(p, dp.plan, q);
    const GradLayout glay{p.head_dim, p.v_dim};
    at::Tensor grads = at::zeros({p.kv_heads, dp.plan.total_chunks, glay.size()}, f32);
    at::Tensor scratch = at::empty({dp.plan.n_spans * p.kv_heads, bwd_scratch_floats(p, dp.plan)}, f32);
    const BwdArgs bb{grad_o.data_ptr(), o.data_ptr(), lse.data_ptr<float>(),
                     grad_lse.has_value() ? grad_lse->data_ptr<float>() : nullptr, dq.data_ptr<float>(),
                     dk.data_ptr<float>(), dv.data_ptr<float>(), dw.data_ptr<float>(), dbeta.data_ptr<float>(),
                     dG.data_ptr<float>(), grads.data_ptr<float>(), scratch.data_ptr<float>()};
    C10_CUDA_CHECK(launch_path_backward(p, dp.plan, bb, c10::cuda::getCurrentCUDAStream()));
  }
  at::Tensor dg = dG.transpose(1, 2).contiguous();
  auto as = [](const at::Tensor& t, const at::Tensor& like) { return t.to(like.scalar_type()); };
  return {as(dq, q), as(dk, k), as(dv, v), as(dw, w), as(dbeta, beta), g.has_value() ? as(dg, *g) : dg};
}

at::Tensor path_decode_step_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
                                 const at::Tensor& beta, const c10::optional<at::Tensor>& g, const at::Tensor& keys,
                                 const at::Tensor& values, const at::Tensor& lengths,
                                 const c10::optional<at::Tensor>& gates, const c10::optional<at::Tensor>& g_last,
                                 double scale) {
  constexpr const char* op = kDecode;
  at::Tensor lengths_host;   // the lengths are checked on the host (one small synchronous copy per step)
  DecodeParams p = describe_decode(op, q, k, v, w, beta, g, keys, values, lengths, gates, g_last, scale, lengths_host);
  const KernelGuard guard(kFamily, op, q.device());
  at::Tensor o = at::empty({p.batch, p.heads, p.v_dim}, q.options());
  p.o = o.data_ptr();
  decode_counter.hit();
  if (o.numel() == 0) return o;
  at::Tensor scores = at::empty({p.batch, p.heads, p.capacity}, q.options().dtype(at::kFloat));
  C10_CUDA_CHECK(launch_path_decode_step(p, scores.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()));
  return o;
}

}  // namespace
}  // namespace blockops::path_attention

TORCH_LIBRARY_IMPL(blockops, CUDA, m) {
  m.impl("path_attention", &blockops::path_attention::path_attention_cuda);
  m.impl("path_key_cache", &blockops::path_attention::path_key_cache_cuda);
  m.impl("path_attention_backward", &blockops::path_attention::path_attention_backward_cuda);
  m.impl("path_decode_step", &blockops::path_attention::path_decode_step_cuda);
}
