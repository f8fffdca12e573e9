// CUDA glue for the bitpack ops: argument checks (shared with the CPU path), allocation, launch on the
// current stream, and the CUDA dispatch registration. Compiled by the host compiler; the kernels themselves
// are in bitpack.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../bitpack_op.h"
#include "../introspection.h"
#include "cuda_glue.h"
#include "bitpack_launch.h"

namespace blockops::bitpack {
namespace {

KernelCounter pack_counter(kFamily, "pack_bits.cuda");
KernelCounter unpack_counter(kFamily, "unpack_bits.cuda");

IntType int_type_of(at::ScalarType s) {
  switch (s) {
    case at::kByte: return IntType::kU8;
    case at::kChar: return IntType::kI8;
    case at::kShort: return IntType::kI16;
    case at::kInt: return IntType::kI32;
    case at::kLong: return IntType::kI64;
    default: TORCH_INTERNAL_ASSERT(false, "check_pack let an unsupported dtype through: ", s);
  }
}

at::Tensor pack_bits_cuda(const at::Tensor& values, int64_t bits, int64_t dim) {
  const Problem p = check_pack(values, bits, dim);
  const KernelGuard guard(kFamily, kPack, values.device());
  at::Tensor out = at::empty(p.output_sizes, values.options().dtype(at::kInt));
  if (out.numel() == 0) return out;
  pack_counter.hit();
  at::Tensor bad = at::zeros({1}, values.options().dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(launch_pack_bits(values.const_data_ptr(), int_type_of(values.scalar_type()),
                                  out.mutable_data_ptr<int32_t>(), bad.mutable_data_ptr<int32_t>(), p.geometry,
                                  stream));
  // Packing is an offline step, so the range check may synchronise: a silently wrong weight is worse.
  if (bad.item<int32_t>() != 0) raise_out_of_range(values, p.geometry.bits);
  return out;
}

at::Tensor unpack_bits_cuda(const at::Tensor& packed, int64_t bits, int64_t size, int64_t dim) {
  const Problem p = check_unpack(packed, bits, size, dim);
  const KernelGuard guard(kFamily, kUnpack, packed.device());
  at::Tensor out = at::empty(p.output_sizes, packed.options().dtype(at::kByte));
  if (out.numel() == 0) return out;
  unpack_counter.hit();
  C10_CUDA_CHECK(launch_unpack_bits(packed.const_data_ptr<int32_t>(), out.mutable_data_ptr<uint8_t>(),
                                    p.geometry, c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(blockops, CUDA, m) {
  m.impl("pack_bits", &pack_bits_cuda);
  m.impl("unpack_bits", &unpack_bits_cuda);
}

}  // namespace blockops::bitpack
