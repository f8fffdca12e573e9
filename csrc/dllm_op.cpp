// The dllm ops' argument checks (dllm_op.h), shared by the CPU glue (dllm_cpu.cpp) and the CUDA glue
// (kernels/dllm_cuda.cpp): dtypes, shapes, devices and layouts, the outputs' allocation and the kernel parameters.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cmath>

#include "checks.h"
#include "dllm_op.h"
#include "glue.h"

namespace blockops::dllm {

UnmaskCall prepare_unmask(const at::Tensor& logits, const at::Tensor& masked, const at::Tensor& block_bounds,
                          const c10::optional<at::Tensor>& min_tokens, double threshold,
                          c10::optional<double> factor) {
  const char* op = kUnmask;
  check_dtype(logits, {at::kHalf, at::kBFloat16, at::kFloat}, op, "logits");
  TORCH_CHECK(logits.dim() == 3, op, ": logits must be [B, L, V], got shape ", logits.sizes());
  const int64_t B = logits.size(0), L = logits.size(1), V = logits.size(2);
  TORCH_CHECK(V >= 1, op, ": logits must have a non-empty vocabulary dim, got shape ", logits.sizes());
  // A size-1 vocabulary dim is read at index 0 only: its stride does not matter (e.g. torch.randn(0, 0, 1) * 4).
  TORCH_CHECK(V == 1 || logits.stride(2) == 1, op, ": logits must be contiguous in the vocabulary dim (got strides ",
              logits.strides(), "); other dims may be strided, e.g. a slice logits[:, a:b]");
  check_dtype(masked, {at::kBool}, op, "masked");
  TORCH_CHECK(masked.dim() == 2 && masked.size(0) == B && masked.size(1) == L, op, ": masked must be [", B, ", ",
              L, "] (logits are ", logits.sizes(), "), got ", masked.sizes());
  check_contiguous(masked, op, "masked");
  check_same_device(masked, logits, op, "masked", "logits");
  check_dtype(block_bounds, {at::kLong}, op, "block_bounds");
  TORCH_CHECK(block_bounds.dim() == 2 && block_bounds.size(0) == B && block_bounds.size(1) == 2, op,
              ": block_bounds must be [", B, ", 2] (lo, hi per row), got ", block_bounds.sizes());
  check_contiguous(block_bounds, op, "block_bounds");
  check_same_device(block_bounds, logits, op, "block_bounds", "logits");
  if (min_tokens) {
    check_dtype(*min_tokens, {at::kLong}, op, "min_tokens");
    TORCH_CHECK(min_tokens->dim() == 1 && min_tokens->size(0) == B, op, ": min_tokens must be [", B, "], got ",
                min_tokens->sizes());
    check_contiguous(*min_tokens, op, "min_tokens");
    check_same_device(*min_tokens, logits, op, "min_tokens", "logits");
  }
  TORCH_CHECK(!std::isnan(threshold), op, ": threshold must not be NaN");
  if (factor) TORCH_CHECK(*factor > 0.0, op, ": factor must be positive, got ", *factor);

  UnmaskCall c;
  const auto opts = logits.options();
  c.tokens = at::empty({B, L}, opts.dtype(at::kLong));
  c.unmask = at::empty({B, L}, opts.dtype(at::kBool));
  c.confidence = at::empty({B, L}, opts.dtype(at::kFloat));
  c.dtype = static_cast<int>(dtype_of(logits.scalar_type()));
  UnmaskParams& p = c.params;
  p.logits = logits.const_data_ptr();
  p.stride_b = logits.stride(0);
  p.stride_l = logits.stride(1);
  p.masked = masked.const_data_ptr<bool>();
  p.bounds = block_bounds.const_data_ptr<int64_t>();
  p.min_tokens = min_tokens ? min_tokens->const_data_ptr<int64_t>() : nullptr;
  p.tokens = c.tokens.mutable_data_ptr<int64_t>();
  p.unmask = c.unmask.mutable_data_ptr<bool>();
  p.conf = c.confidence.mutable_data_ptr<float>();
  p.B = B;
  p.L = L;
  p.V = V;
  // The threshold is compared in fp32 (confidences are fp32); values beyond fp32's range saturate to +-inf.
  p.rule = UnmaskRule{factor ? Rule::kFactor : Rule::kThreshold, static_cast<float>(threshold),
                      factor ? static_cast<float>(*factor) : 0.f};
  return c;
}

OverwriteParams prepare_overwrite(const at::Tensor& cache, const at::Tensor& src, const at::Tensor& positions) {
  const char* op = kOverwrite;
  check_dtype(cache, {at::kHalf, at::kBFloat16, at::kFloat}, op, "cache");
  TORCH_CHECK(cache.dim() == 4, op, ": cache must be [B, H, S, D], got shape ", cache.sizes());
  check_contiguous(cache, op, "cache");
  TORCH_CHECK(src.scalar_type() == cache.scalar_type(), op, ": new must have the cache's dtype ",
              cache.scalar_type(), ", got ", src.scalar_type());
  const int64_t B = cache.size(0), H = cache.size(1), S = cache.size(2), D = cache.size(3);
  TORCH_CHECK(src.dim() == 4 && src.size(0) == B && src.size(1) == H && src.size(3) == D, op, ": new must be [",
              B, ", ", H, ", n, ", D, "] to match the cache ", cache.sizes(), ", got ", src.sizes());
  TORCH_CHECK(src.stride(3) == 1 || D == 1, op, ": new must be contiguous in its last dim (got strides ",
              src.strides(), ")");
  check_same_device(src, cache, op, "new", "cache");
  const int64_t n = src.size(2);
  check_dtype(positions, {at::kLong}, op, "positions");
  TORCH_CHECK(positions.dim() == 2 && positions.size(0) == B && positions.size(1) == n, op,
              ": positions must be [", B, ", ", n, "] (one slot per row and new position), got ",
              positions.sizes());
  check_contiguous(positions, op, "positions");
  check_same_device(positions, cache, op, "positions", "cache");
  TORCH_CHECK(n <= S, op, ": ", n, " new positions per row do not fit a cache of ", S, " slots");
  OverwriteParams p;
  p.cache = cache.data_ptr();
  p.src = src.const_data_ptr();
  p.sb = src.stride(0);
  p.sh = src.stride(1);
  p.sj = src.stride(2);
  p.positions = positions.const_data_ptr<int64_t>();
  p.B = B;
  p.H = H;
  p.S = S;
  p.n = n;
  p.D = D;
  p.element_bytes = static_cast<int>(cache.element_size());
  return p;
}

void check_positions(const at::Tensor& positions, int64_t S) {
  if (positions.numel() == 0) return;
  at::Tensor bad = positions.lt(0).logical_or(positions.ge(S));
  if (positions.size(1) > 1) {
    const int64_t n = positions.size(1);
    bad.slice(1, 1, n).logical_or_(positions.slice(1, 1, n).le(positions.slice(1, 0, n - 1)));
  }
  if (!bad.any().item<bool>()) return;
  const at::Tensor host = positions.cpu(), where = bad.cpu().nonzero();
  const int64_t b = where[0][0].item<int64_t>(), j = where[0][1].item<int64_t>();
  const int64_t value = host[b][j].item<int64_t>();
  TORCH_CHECK(value >= 0 && value < S, kOverwrite, ": positions[", b, ", ", j, "] = ", value,
              " is outside the cache's slots [0, ", S, ")");
  TORCH_CHECK(false, kOverwrite, ": positions must be strictly increasing in each row, but positions[", b, ", ", j,
              "] = ", value, " follows ", host[b][j - 1].item<int64_t>());
}

}  // namespace blockops::dllm
