// Bit packing CUDA kernels. One thread per packed int32 word; consecutive threads take consecutive words
// of the packed tensor ([outer, words, inner] row-major), so with inner > 1 neighbouring threads read
// neighbouring values of each input row (coalesced) and write neighbouring words. The numerics (which bits
// go where) are the shared header's, the same code the CPU kernel and the tests exercise.
//
//   grid-stride loop over w in [0, outer * words * inner):
//       i = w % inner, r = (w / inner) % words, o = w / (inner * words)
//       pack:   out[w] = pack_word(values, o, r, i)      (p reads, 1 write)
//       unpack: unpack_word(packed[w], o, r, i)           (1 read, p writes)
#include "bitpack_launch.h"

namespace blockops::bitpack {
namespace {

constexpr int kThreads = 256;  // a full warp multiple; the kernels are memory-bound, occupancy is what matters

// Enough blocks to fill any current GPU several times over; the grid-stride loop does the rest.
int blocks_for(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 65536 ? blocks : 65536);
}

template <typename T>
__global__ void pack_bits_kernel(const T* __restrict__ values, int32_t* __restrict__ out,
                                 int32_t* __restrict__ bad_flag, Geometry g) {
  const int64_t total = g.outer * g.words() * g.inner;
  bool bad = false;
  for (int64_t w = blockIdx.x * int64_t{kThreads} + threadIdx.x; w < total; w += int64_t{gridDim.x} * kThreads) {
    const int64_t i = w % g.inner;
    const int64_t r = (w / g.inner) % g.words();
    const int64_t o = w / (g.inner * g.words());
    out[w] = static_cast<int32_t>(pack_word(values, g, o, r, i, &bad));
  }
  if (bad) *bad_flag = 1;  // benign race: every writer stores the same value
}

__global__ void unpack_bits_kernel(const int32_t* __restrict__ packed, uint8_t* __restrict__ out, Geometry g) {
  const int64_t total = g.outer * g.words() * g.inner;
  for (int64_t w = blockIdx.x * int64_t{kThreads} + threadIdx.x; w < total; w += int64_t{gridDim.x} * kThreads) {
    const int64_t i = w % g.inner;
    const int64_t r = (w / g.inner) % g.words();
    const int64_t o = w / (g.inner * g.words());
    unpack_word(static_cast<uint32_t>(packed[w]), g, o, r, i, out);
  }
}

template <typename T>
cudaError_t launch_pack(const void* values, int32_t* out, int32_t* bad_flag, const Geometry& g, cudaStream_t s) {
  const int64_t total = g.outer * g.words() * g.inner;
  if (total == 0) return cudaSuccess;  // a grid of 0 blocks is a launch error
  pack_bits_kernel<T><<<blocks_for(total), kThreads, 0, s>>>(static_cast<const T*>(values), out, bad_flag, g);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_pack_bits(const void* values, IntType type, int32_t* out, int32_t* bad_flag,
                             const Geometry& g, cudaStream_t stream) {
  switch (type) {
    case IntType::kU8: return launch_pack<uint8_t>(values, out, bad_flag, g, stream);
    case IntType::kI8: return launch_pack<int8_t>(values, out, bad_flag, g, stream);
    case IntType::kI16: return launch_pack<int16_t>(values, out, bad_flag, g, stream);
    case IntType::kI32: return launch_pack<int32_t>(values, out, bad_flag, g, stream);
    case IntType::kI64: return launch_pack<int64_t>(values, out, bad_flag, g, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_unpack_bits(const int32_t* packed, uint8_t* out, const Geometry& g, cudaStream_t stream) {
  const int64_t total = g.outer * g.words() * g.inner;
  if (total == 0) return cudaSuccess;
  unpack_bits_kernel<<<blocks_for(total), kThreads, 0, stream>>>(packed, out, g);
  return cudaGetLastError();
}

}  // namespace blockops::bitpack
