// The PaTH attention ops' argument checks and chunk tables (path_attention_op.h), shared by the CPU glue
// (path_attention_cpu*.cpp) and the CUDA glue (kernels/path_attention_cuda.cpp). Every check names the op, the
// argument and the sizes; nothing here reads a device tensor's values except what the header says (cu_seqlens,
// the decode step's lengths).
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <utility>
#include <vector>

#include "checks.h"
#include "glue.h"
#include "path_attention_op.h"

namespace blockops::path_attention {
namespace {

void check_head_dim(const char* op, const char* arg, int64_t d) {
  TORCH_CHECK(d % 8 == 0 && d >= 8 && d <= kMaxHeadDim, op, ": ", arg, " head dim must be a multiple of 8 in [8, ",
              kMaxHeadDim, "], got ", d);
}

// t must have `shape`, be contiguous, on ref's device (ref: q, or k for the key cache), with ref's dtype, or fp32
// where fp32_allowed (w, beta, g) unless ref is fp64: the fp64 path computes in fp64 throughout.
void check_tensor(const char* op, const char* arg, const at::Tensor& t, at::IntArrayRef shape, const at::Tensor& ref,
                  const char* ref_arg, bool fp32_allowed) {
  const at::ScalarType want = ref.scalar_type();
  if (fp32_allowed && want != at::kDouble) {
    check_dtype(t, {at::kFloat, want}, op, arg);
  } else {
    TORCH_CHECK(t.scalar_type() == want, op, ": ", arg, " has dtype ", t.scalar_type(), " but ", ref_arg, " has ",
                want, fp32_allowed ? "; with float64 inputs every floating argument must be float64"
                                   : "; q, k and v must share one dtype");
  }
  check_same_device(t, ref, op, arg, ref_arg);
  TORCH_CHECK(t.sizes() == shape, op, ": ", arg, " must have shape ", shape, ", got ", t.sizes());
  check_contiguous(t, op, arg);
}

// The glue picked S from the dtype of `t` (q, or k): after the checks above (every tensor on t's device, fp64
// only on the CPU), only a library bug could make them disagree.
template <typename S>
void assert_compute_type(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT((t.scalar_type() == at::kDouble) == (std::is_same_v<S, double>),
                        "path_attention: compute type does not match the inputs' dtype ", t.scalar_type());
}

}  // namespace

// Checks k, w, beta (and the optional cu_seqlens) shared by both ops; fills the key-side fields of p.
template <typename S>
ParamsT<S> describe_keys(const char* op, const at::Tensor& k, const at::Tensor& w, const at::Tensor& beta,
                         const c10::optional<at::Tensor>& cu_seqlens) {
  check_float_dtype(k, op, "k");
  TORCH_CHECK(k.dim() == 4, op, ": k must be [B, T, H, D], got shape ", k.sizes());
  check_contiguous(k, op, "k");
  check_head_dim(op, "k", k.size(3));
  TORCH_CHECK(k.size(2) >= 1, op, ": k needs at least one head, got shape ", k.sizes());
  check_tensor(op, "w", w, k.sizes(), k, "k", true);
  check_tensor(op, "beta", beta, k.sizes().slice(0, 3), k, "k", true);
  if (cu_seqlens.has_value()) {
    const at::Tensor& c = *cu_seqlens;
    check_dtype(c, {at::kInt, at::kLong}, op, "cu_seqlens");
    check_same_device(c, k, op, "cu_seqlens", "k");
    TORCH_CHECK(c.dim() == 1 && c.numel() >= 2, op, ": cu_seqlens must be [N + 1] with N >= 1, got shape ", c.sizes());
    TORCH_CHECK(k.size(0) == 1, op, ": cu_seqlens needs batch size 1 (packed sequences), got B = ", k.size(0));
  }
  assert_compute_type<S>(k);
  ParamsT<S> p{};
  p.k = k.data_ptr();
  p.w = w.data_ptr();
  p.beta = beta.data_ptr();
  p.dtype = dtype_of(k.scalar_type());
  p.w_dtype = dtype_of(w.scalar_type());
  p.beta_dtype = dtype_of(beta.scalar_type());
  p.batch = k.size(0);
  p.seq_len = k.size(1);
  p.kv_heads = k.size(2);
  p.head_dim = static_cast<int>(k.size(3));
  return p;
}

// Checks every forward argument; fills p except the outputs.
template <typename S>
ParamsT<S> describe_forward(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& w, const at::Tensor& beta, const c10::optional<at::Tensor>& g,
                            const c10::optional<at::Tensor>& cu_seqlens, double scale) {
  check_float_dtype(q, op, "q");
  TORCH_CHECK(q.dim() == 4, op, ": q must be [B, T, HQ, D], got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4, op, ": k and v must be [B, T, H, D] and [B, T, H, Dv], got ", k.sizes(),
              " and ", v.sizes());
  check_contiguous(q, op, "q");
  check_head_dim(op, "q", q.size(3));
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), op, ": k has dtype ", k.scalar_type(), " but q has ",
              q.scalar_type(), "; q, k and v must share one dtype");
  check_same_device(k, q, op, "k", "q");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3), op,
              ": k must be [B, T, H, D] with q's B, T and D, got q ", q.sizes(), " and k ", k.sizes());
  TORCH_CHECK(k.size(2) >= 1 && q.size(2) % k.size(2) == 0, op, ": q's heads (", q.size(2),
              ") must be a multiple of k's heads (", k.size(2), ") for grouped-query attention");
  ParamsT<S> p = describe_keys<S>(op, k, w, beta, cu_seqlens);
  check_head_dim(op, "v", v.size(3));
  check_tensor(op, "v", v, {k.size(0), k.size(1), k.size(2), v.size(3)}, q, "q", false);
  if (g.has_value()) check_tensor(op, "g", *g, q.sizes().slice(0, 3), q, "q", true);
  checked_finite_float(scale, op, "scale");  // the float kernels take it as a float (one rule for every dtype)

  p.q = q.data_ptr();
  p.v = v.data_ptr();
  p.g = g.has_value() ? g->data_ptr() : nullptr;
  p.g_dtype = g.has_value() ? dtype_of(g->scalar_type()) : DType::kF32;
  p.heads = q.size(2);
  p.v_dim = static_cast<int>(v.size(3));
  p.scale = static_cast<S>(scale);
  return p;
}

template ParamsT<float> describe_keys<float>(const char*, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                             const c10::optional<at::Tensor>&);
template ParamsT<double> describe_keys<double>(const char*, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const c10::optional<at::Tensor>&);
template ParamsT<float> describe_forward<float>(const char*, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, const at::Tensor&,
                                                const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
                                                double);
template ParamsT<double> describe_forward<double>(const char*, const at::Tensor&, const at::Tensor&,
                                                  const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                  const c10::optional<at::Tensor>&,
                                                  const c10::optional<at::Tensor>&, double);

Chunking make_chunking(const char* op, int64_t batch, int64_t seq_len, const c10::optional<at::Tensor>& cu) {
  Chunking ch;
  if (cu.has_value()) {
    const at::Tensor c = cu->to(at::kLong).contiguous();
    const int64_t* v = c.data_ptr<int64_t>();
    const int64_t n = c.numel();
    TORCH_CHECK(v[0] == 0 && v[n - 1] == seq_len, op, ": cu_seqlens must start at 0 and end at T = ", seq_len,
                ", got first ", v[0], " and last ", v[n - 1]);
    for (int64_t i = 0; i + 1 < n; ++i) {
      TORCH_CHECK(v[i + 1] >= v[i], op, ": cu_seqlens must be non-decreasing, got ", v[i], " then ", v[i + 1],
                  " at index ", i);
      if (v[i + 1] > v[i]) ch.spans.push_back(Span{0, v[i], v[i + 1] - v[i]});
    }
  } else if (seq_len > 0) {
    for (int64_t b = 0; b < batch; ++b) ch.spans.push_back(Span{b, 0, seq_len});
  }
  ch.first_chunk.push_back(0);
  for (const Span& s : ch.spans) ch.first_chunk.push_back(ch.first_chunk.back() + chunks_of(s.len));
  return ch;
}

std::vector<ChunkRef> Chunking::chunk_refs() const {
  std::vector<ChunkRef> refs;
  for (const Span& sp : spans)
    for (int64_t c = 0; c < chunks_of(sp.len); ++c) {
      const int64_t t0 = sp.start + c * kChunk;
      refs.push_back(ChunkRef{sp.b, t0, sp.start, std::min<int64_t>(kChunk, sp.start + sp.len - t0), c});
    }
  return refs;
}

int64_t Chunking::max_chunks_per_span() const {
  int64_t m = 0;
  for (const Span& sp : spans) m = std::max(m, chunks_of(sp.len));
  return m;
}

template <typename S>
void check_backward_inputs(const char* op, const ParamsT<S>& p, const at::Tensor& q, const at::Tensor& grad_o,
                           const at::Tensor& o, const at::Tensor& lse, const c10::optional<at::Tensor>& grad_lse) {
  const std::array<int64_t, 4> o_dims{p.batch, p.seq_len, p.heads, p.v_dim};
  check_tensor(op, "grad_o", grad_o, o_dims, q, "q", false);
  check_tensor(op, "o", o, o_dims, q, "q", false);
  const std::array<int64_t, 3> lse_dims{p.batch, p.heads, p.seq_len};
  for (auto [arg, t] : {std::pair<const char*, const at::Tensor*>{"lse", &lse}, {"grad_lse", grad_lse ? &*grad_lse : nullptr}}) {
    if (t == nullptr) continue;
    check_dtype(*t, {kComputeDtype<S>}, op, arg);
    check_same_device(*t, q, op, arg, "q");
    TORCH_CHECK(t->sizes() == at::IntArrayRef(lse_dims), op, ": ", arg, " must have shape ", at::IntArrayRef(lse_dims),
                ", got ", t->sizes());
    check_contiguous(*t, op, arg);
  }
}

template void check_backward_inputs<float>(const char*, const ParamsT<float>&, const at::Tensor&, const at::Tensor&,
                                           const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&);
template void check_backward_inputs<double>(const char*, const ParamsT<double>&, const at::Tensor&, const at::Tensor&,
                                            const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&);

template <typename S>
DecodeParamsT<S> describe_decode(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& w, const at::Tensor& beta, const c10::optional<at::Tensor>& g,
                                 const at::Tensor& keys, const at::Tensor& values, const at::Tensor& lengths,
                                 const c10::optional<at::Tensor>& gates, const c10::optional<at::Tensor>& g_last,
                                 double scale, at::Tensor& lengths_host) {
  check_float_dtype(q, op, "q_t");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, op, ": q_t, k_t and v_t must be [B, HQ, D], [B, H, D] and ",
              "[B, H, Dv], got ", q.sizes(), ", ", k.sizes(), " and ", v.sizes());
  check_contiguous(q, op, "q_t");
  const int64_t B = q.size(0), HQ = q.size(1), D = q.size(2), H = k.size(1), Dv = v.size(2);
  check_head_dim(op, "q_t", D);
  check_head_dim(op, "v_t", Dv);
  TORCH_CHECK(H >= 1 && HQ % H == 0 && HQ / H <= kMaxDecodeGroup, op, ": q_t's heads (", HQ,
              ") must be a multiple of k_t's heads (", H, "), at most ", kMaxDecodeGroup, " per key head");
  check_tensor(op, "k_t", k, {B, H, D}, q, "q_t", false);
  check_tensor(op, "v_t", v, {B, H, Dv}, q, "q_t", false);
  check_tensor(op, "w_t", w, {B, H, D}, q, "q_t", true);
  check_tensor(op, "beta_t", beta, {B, H}, q, "q_t", true);
  TORCH_CHECK(keys.dim() == 4, op, ": keys must be [B, H, L, D], got shape ", keys.sizes());
  const int64_t L = keys.size(2);
  auto check_cache = [&](const char* arg, const at::Tensor& t, at::IntArrayRef shape) {
    check_dtype(t, {kComputeDtype<S>}, op, arg);   // fp32, fp64 for fp64 inputs
    check_same_device(t, q, op, arg, "q_t");
    TORCH_CHECK(t.sizes() == shape, op, ": ", arg, " must have shape ", shape, ", got ", t.sizes());
    check_contiguous(t, op, arg);
  };
  check_cache("keys", keys, {B, H, L, D});
  check_cache("values", values, {B, H, L, Dv});
  TORCH_CHECK(g.has_value() == gates.has_value() && gates.has_value() == g_last.has_value(), op,
              ": pass g_t, gates and g_last together (a cache built with a forget gate) or none of them");
  if (g.has_value()) {
    check_tensor(op, "g_t", *g, {B, HQ}, q, "q_t", true);
    check_cache("gates", *gates, {B, HQ, L});
    check_cache("g_last", *g_last, {B, HQ});
  }
  check_dtype(lengths, {at::kLong}, op, "lengths");
  check_same_device(lengths, q, op, "lengths", "q_t");
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == B, op, ": lengths must be [B] = [", B, "], got ", lengths.sizes());
  check_contiguous(lengths, op, "lengths");
  checked_finite_float(scale, op, "scale");  // the float kernels take it as a float (one rule for every dtype)
  lengths_host = lengths.to(at::kCPU).contiguous();
  const int64_t* len = lengths_host.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(len[b] >= 0 && len[b] < L, op, ": lengths[", b, "] = ", len[b], " leaves no room in a cache of capacity ",
                L, " (grow keys/values/gates first; PathCache does)");
  assert_compute_type<S>(q);
  DecodeParamsT<S> p{};
  p.q = q.data_ptr(); p.k = k.data_ptr(); p.v = v.data_ptr(); p.w = w.data_ptr(); p.beta = beta.data_ptr();
  p.g = g.has_value() ? g->data_ptr() : nullptr;
  p.dtype = dtype_of(q.scalar_type());
  p.w_dtype = dtype_of(w.scalar_type());
  p.beta_dtype = dtype_of(beta.scalar_type());
  p.g_dtype = g.has_value() ? dtype_of(g->scalar_type()) : DType::kF32;
  p.keys = keys.data_ptr<S>();
  p.values = values.data_ptr<S>();
  p.lengths = lengths.device().is_cpu() ? len : lengths.data_ptr<int64_t>();
  p.gates = gates.has_value() ? gates->data_ptr<S>() : nullptr;
  p.g_last = g_last.has_value() ? g_last->data_ptr<S>() : nullptr;
  p.batch = B; p.heads = HQ; p.kv_heads = H; p.capacity = L;
  p.head_dim = static_cast<int>(D); p.v_dim = static_cast<int>(Dv);
  p.scale = static_cast<S>(scale);
  return p;
}

template DecodeParamsT<float> describe_decode<float>(
    const char*, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const c10::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, double, at::Tensor&);
template DecodeParamsT<double> describe_decode<double>(
    const char*, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const c10::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, double, at::Tensor&);

}  // namespace blockops::path_attention
