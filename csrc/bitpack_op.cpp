// Torch-facing argument handling of the bitpack ops (bitpack_op.h), the one place both the CPU glue
// (bitpack_cpu.cpp) and the CUDA glue (kernels/bitpack_cuda.cpp) take it from.
#include <ATen/core/Tensor.h>

#include "bitpack_op.h"
#include "checks.h"

namespace blockops::bitpack {

namespace {

// Geometry of `sizes` packed along dim, given the (unpacked) length along it.
Geometry geometry_of(at::IntArrayRef sizes, int64_t dim, int64_t length, int bits) {
  Geometry g{1, length, 1, bits};
  for (int64_t d = 0; d < dim; ++d) g.outer *= sizes[d];
  for (int64_t d = dim + 1; d < static_cast<int64_t>(sizes.size()); ++d) g.inner *= sizes[d];
  return g;
}

void check_bits(int64_t bits, const char* op) {
  TORCH_CHECK(bits >= kMinBits && bits <= kMaxBits, op, ": bits must be in [", kMinBits, ", ", kMaxBits,
              "], got ", bits);
}
}  // namespace

Problem check_pack(const at::Tensor& values, int64_t bits, int64_t dim) {
  check_bits(bits, kPack);
  check_dtype(values, {at::kByte, at::kChar, at::kShort, at::kInt, at::kLong}, kPack, "values");
  check_ndim_at_least(values, 1, kPack, "values");
  check_contiguous(values, kPack, "values");
  dim = normalize_dim(dim, values.dim(), kPack);
  Problem p{geometry_of(values.sizes(), dim, values.size(dim), static_cast<int>(bits)), values.sizes().vec()};
  p.output_sizes[dim] = p.geometry.words();
  return p;
}

Problem check_unpack(const at::Tensor& packed, int64_t bits, int64_t size, int64_t dim) {
  check_bits(bits, kUnpack);
  check_dtype(packed, {at::kInt}, kUnpack, "packed");
  check_ndim_at_least(packed, 1, kUnpack, "packed");
  check_contiguous(packed, kUnpack, "packed");
  dim = normalize_dim(dim, packed.dim(), kUnpack);
  TORCH_CHECK(size >= 0, kUnpack, ": size must be non-negative, got ", size);
  TORCH_CHECK(packed_length(size, static_cast<int>(bits)) == packed.size(dim), kUnpack, ": ", size,
              " values of ", bits, " bits need ", packed_length(size, static_cast<int>(bits)), " words (",
              values_per_word(static_cast<int>(bits)), " per word) along dim ", dim, ", but packed has ",
              packed.size(dim), " (shape ", packed.sizes(), ")");
  Problem p{geometry_of(packed.sizes(), dim, size, static_cast<int>(bits)), packed.sizes().vec()};
  p.output_sizes[dim] = size;
  return p;
}

void raise_out_of_range(const at::Tensor& values, int bits) {
  const at::Tensor v = values.to(at::kLong);
  TORCH_CHECK(false, kPack, ": values must lie in [0, ", (1 << bits) - 1, "] for bits=", bits, ", got min ",
              v.min().item<int64_t>(), " and max ", v.max().item<int64_t>());
}

}  // namespace blockops::bitpack
