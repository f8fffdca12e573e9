// The argument checks of the vector-quantized GEMM ops (vq_op.h), the one implementation the CPU and CUDA glue call.
#include "vq_op.h"

#include <algorithm>

#include "checks.h"

namespace blockops::vq {

Weights check_weights(const char* op, const at::Tensor& codes, const at::Tensor& codebooks,
                      const c10::optional<at::Tensor>& scales) {
  check_dtype(codes, {at::kByte, at::kShort}, op, "codes");
  check_float_dtype(codebooks, op, "codebooks");  // fp64 on the CPU only
  TORCH_CHECK(codebooks.dim() == 3, op, ": codebooks must be [K, k, d], got shape ", codebooks.sizes());
  const int64_t K = codebooks.size(0), k = codebooks.size(1), d = codebooks.size(2);
  TORCH_CHECK(K == 1 || K == 2, op, ": codebooks.size(0) (additive codebooks K) must be 1 or 2, got ", K,
              " (shape ", codebooks.sizes(), ")");
  TORCH_CHECK(d == 2 || d == 4 || d == 8, op, ": codebooks.size(2) (vector dim d) must be 2, 4 or 8, got ", d);
  TORCH_CHECK(k >= 16 && k <= 65536, op, ": codebooks.size(1) (codebook size k) must be in [16, 65536], got ", k);
  TORCH_CHECK((codes.dim() == 3 && codes.size(2) == K) || (codes.dim() == 2 && K == 1), op,
              ": codes must be [out, in/d, K] = [out, in/d, ", K, "]", K == 1 ? " or [out, in/d]" : "",
              " for codebooks of shape ", codebooks.sizes(), ", got ", codes.sizes());
  check_same_device(codebooks, codes, op, "codebooks", "codes");
  check_contiguous(codes, op, "codes");
  check_contiguous(codebooks, op, "codebooks");
  const Geometry g{codes.size(0), codes.size(1), K, k, d};
  if (scales.has_value()) {
    check_float_dtype(*scales, op, "scales");
    check_same_device(*scales, codes, op, "scales", "codes");
    TORCH_CHECK(scales->dim() == 1 && scales->size(0) == g.out, op, ": scales must have shape [", g.out,
                "] (one per output row), got ", scales->sizes());
  }
  return {g, codes.scalar_type() == at::kByte ? CodeType::kU8 : CodeType::kU16};
}

void check_activation(const char* op, const char* arg, const at::Tensor& t, int64_t features, const at::Tensor& codes) {
  check_features(t, features, op, arg, codes, "codes");
}

void check_t(const char* op, const at::Tensor& t, const Geometry& g, const at::Tensor& codes) {
  check_grad_product(t, g.out, g.in(), op, codes, "codes");
}

void check_code_range(const char* op, const at::Tensor& codes, const Weights& w) {
  if (w.g.k >= code_capacity(w.type)) return;
  const int64_t n = codes.numel();
  const void* p = codes.const_data_ptr();
  const uint32_t k = static_cast<uint32_t>(w.g.k);
  // The maximum in the codes' own width, so that the compiler vectorises it (16 bytes per pmaxub with SSE2 alone;
  // a uint32_t maximum of widened bytes stayed scalar: 2.9 instructions per code under callgrind).
  uint32_t mx = 0;
  if (w.type == CodeType::kU8) {
    const uint8_t* c = static_cast<const uint8_t*>(p);
    uint8_t m8 = 0;
    for (int64_t i = 0; i < n; ++i) m8 = std::max(m8, c[i]);
    mx = m8;
  } else {
    const uint16_t* c = static_cast<const uint16_t*>(p);
    uint16_t m16 = 0;
    for (int64_t i = 0; i < n; ++i) m16 = std::max(m16, c[i]);
    mx = m16;
  }
  if (mx < k) return;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t c = read_code(p, w.type, i);
    TORCH_CHECK(c < k, op, ": code ", c, " at codes[", i / w.g.positions(), ", ", (i % w.g.positions()) / w.g.K, ", ",
                i % w.g.K, "] is out of range for a codebook of k = ", k, " codewords (codes shape ", codes.sizes(),
                w.type == CodeType::kU16 ? "; int16 codes are read as uint16" : "", ")");
  }
}

}  // namespace blockops::vq
