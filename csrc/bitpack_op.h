// Torch-facing argument handling for the bitpack ops, shared by the CPU and CUDA glue (implemented in
// bitpack_op.cpp).
#pragma once
#include <ATen/core/Tensor.h>

#include <vector>

#include "bitpack.h"

namespace blockops::bitpack {

constexpr const char* kFamily = "bitpack";   // introspection.h: counters and build_info
constexpr const char* kPack = "blockops.pack_bits";
constexpr const char* kUnpack = "blockops.unpack_bits";

struct Problem {
  Geometry geometry;
  std::vector<int64_t> output_sizes;
};

// Validates pack_bits' arguments; the output is int32 with output_sizes.
Problem check_pack(const at::Tensor& values, int64_t bits, int64_t dim);
// Validates unpack_bits' arguments; the output is uint8 with output_sizes.
Problem check_unpack(const at::Tensor& packed, int64_t bits, int64_t size, int64_t dim);
// Raises the range error for pack_bits, naming the offending extremes.
[[noreturn]] void raise_out_of_range(const at::Tensor& values, int bits);

}  // namespace blockops::bitpack
