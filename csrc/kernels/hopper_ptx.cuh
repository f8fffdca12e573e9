// Hopper (sm_90a) instructions for the wgmma + TMA kernels (attention_wgmma.cu, lowbit_wgmma.cu), in namespace
// blockops::hopper: mbarriers, TMA tensor loads and their tensor maps, wgmma (shared x shared and registers x
// shared) with its fence / commit / wait, setmaxnreg, the async-proxy fence. The device side is CuTe's and
// CUTLASS's arch layer (cute/arch/mma_sm90_gmma.hpp, copy_sm90_tma.hpp, cutlass/arch/barrier.h), so no kernel
// carries asm of its own. Like mma_ptx.cuh, the CPU emulation (tools/cuda_emu) swaps this header for
// fake/hopper_ptx.cuh, which maps the same names onto hopper_emu.h: a wrapper added here needs its emulation
// there, and a kernel uses nothing of Hopper's but what is declared here.
//
// Compiled only where the build found the CUTLASS headers (BLOCKOPS_HAVE_CUTE); the instructions exist only on
// sm_90a, so device code for other architectures sees BLOCKOPS_HOPPER_DEVICE == 0 and kernels compile an empty
// body there (the host dispatch never launches them on such a GPU).
#pragma once
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

#include <cute/arch/copy_sm90_desc.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/arch/mma_sm90_gmma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include "hopper_layout.cuh"

#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define BLOCKOPS_HOPPER_DEVICE 0
#else
#define BLOCKOPS_HOPPER_DEVICE 1
#endif

namespace blockops::hopper {

using TensorMap = CUtensorMap;

// ---------------------------------------------------------------------------------------------------------------
// Shared memory
// The shared-window address of a pointer into shared memory (what descriptors and mbarrier operands take).
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// Orders this thread's earlier generic-proxy writes to shared memory before later async-proxy reads of it
// (wgmma operands, TMA stores): fence.proxy.async.shared::cta.
__device__ __forceinline__ void fence_proxy_async_shared() { cutlass::arch::fence_view_async_shared(); }

// ---------------------------------------------------------------------------------------------------------------
// mbarrier (one 8-byte word in shared memory)
// Sets the expected arrivals of each phase; the current phase is 0. One thread initialises, then
// mbarrier_init_fence() and a __syncthreads() publish the barrier before anyone (or any TMA) uses it.
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, uint32_t arrivals) {
  cutlass::arch::ClusterBarrier::init(bar, arrivals);
}
__device__ __forceinline__ void mbarrier_init_fence() { cutlass::arch::fence_barrier_init(); }
// One arrival on the current phase.
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) { cutlass::arch::ClusterBarrier::arrive(bar); }
// One arrival that also adds `bytes` to the transaction count the phase waits for (the bytes the TMA loads that
// signal this barrier will deliver).
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(bar, bytes);
}
// True once the phase with this parity has completed (all arrivals and all transaction bytes). A phase's data may
// be read only after a wait on its parity returned true.
__device__ __forceinline__ bool mbarrier_try_wait(uint64_t* bar, uint32_t parity) {
  return cutlass::arch::ClusterBarrier::try_wait(bar, parity);
}
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
  cutlass::arch::ClusterBarrier::wait(bar, parity);
}

// ---------------------------------------------------------------------------------------------------------------
// TMA: a box of a tensor (described by a TensorMap built on the host with encode_tensor_map) copied to shared
// memory; the copy adds its bytes to `bar`'s transaction count when it lands. Coordinates are element indices,
// innermost dimension first; elements outside the tensor arrive as zeros (and still count as bytes).
// The TensorMap must live in kernel-parameter, constant or global memory (pass it as a __grid_constant__ const
// kernel parameter and take its address).
__device__ __forceinline__ void tma_prefetch_descriptor(const TensorMap* map) {
  cute::prefetch_tma_descriptor(reinterpret_cast<const cute::TmaDescriptor*>(map));
}
__device__ __forceinline__ void tma_load_2d(void* smem, const TensorMap* map, uint64_t* bar, int c0, int c1) {
  cute::SM90_TMA_LOAD_2D::copy(map, bar, static_cast<uint64_t>(cute::TMA::CacheHintSm90::EVICT_NORMAL), smem, c0,
                               c1);
}
__device__ __forceinline__ void tma_load_3d(void* smem, const TensorMap* map, uint64_t* bar, int c0, int c1,
                                            int c2) {
  cute::SM90_TMA_LOAD_3D::copy(map, bar, static_cast<uint64_t>(cute::TMA::CacheHintSm90::EVICT_NORMAL), smem, c0,
                               c1, c2);
}

// ---------------------------------------------------------------------------------------------------------------
// wgmma: one warpgroup (4 consecutive warps, 128 threads, the first warp's index a multiple of 4) computes
// D[64 x N] (+)= A[64 x 16] * B[16 x N] in fp32, asynchronously. Accumulator fragment of thread t (warp w = t / 32
// within the group, lane l): d[4 j + i] is row 16 w + l / 4 + 8 (i / 2), column 8 j + 2 (l % 4) + (i % 2), for
// j < N / 8 -- per warp the m16n8 C layout of mma.sync repeated over N. Register A (wgmma_rs): warp w holds rows
// 16 w .. 16 w + 15 in the m16n8k16 A fragment layout of mma.sync.
// Protocol (PTX ISA): wgmma_fence() before the first wgmma of a batch and after any other write to its
// accumulator or A registers; wgmma_commit() closes the batch; wgmma_wait<N>() returns once at most N batches are
// pending, and only then may d (or the shared memory read) be touched. All 128 threads issue each of these.
__device__ __forceinline__ void wgmma_fence() { cute::warpgroup_arrive(); }
__device__ __forceinline__ void wgmma_commit() { cute::warpgroup_commit_batch(); }
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  cute::warpgroup_wait<kPending>();
}
// A compiler-level fence on accumulator registers, so that nvcc keeps their reads and writes on the right side of
// the asynchronous wgmma (no instruction is emitted).
template <int kRegs>
__device__ __forceinline__ void fence_operands(float (&d)[kRegs]) {
#pragma unroll
  for (int i = 0; i < kRegs; ++i) cute::warpgroup_fence_operand(d[i]);
}

namespace detail {
template <typename T, int N, bool kTransB>
struct WgmmaOps;
#define BLOCKOPS_WGMMA_OPS(N)                                                                               \
  template <bool kTransB>                                                                                   \
  struct WgmmaOps<__nv_bfloat16, N, kTransB> {                                                              \
    static constexpr cute::SM90::GMMA::Major kB = kTransB ? cute::SM90::GMMA::Major::MN : cute::SM90::GMMA::Major::K;          \
    using SS = cute::SM90::GMMA::MMA_64x##N##x16_F32BF16BF16_SS<cute::SM90::GMMA::Major::K, kB>;                  \
    using RS = cute::SM90::GMMA::MMA_64x##N##x16_F32BF16BF16_RS<cute::SM90::GMMA::Major::K, kB>;                  \
  };                                                                                                        \
  template <bool kTransB>                                                                                   \
  struct WgmmaOps<__half, N, kTransB> {                                                                     \
    static constexpr cute::SM90::GMMA::Major kB = kTransB ? cute::SM90::GMMA::Major::MN : cute::SM90::GMMA::Major::K;          \
    using SS = cute::SM90::GMMA::MMA_64x##N##x16_F32F16F16_SS<cute::SM90::GMMA::Major::K, kB>;                    \
    using RS = cute::SM90::GMMA::MMA_64x##N##x16_F32F16F16_RS<cute::SM90::GMMA::Major::K, kB>;                    \
  };
BLOCKOPS_WGMMA_OPS(16)
BLOCKOPS_WGMMA_OPS(32)
BLOCKOPS_WGMMA_OPS(64)
BLOCKOPS_WGMMA_OPS(128)
BLOCKOPS_WGMMA_OPS(256)
#undef BLOCKOPS_WGMMA_OPS

template <typename Op, size_t... I>
__device__ __forceinline__ void wgmma_ss_unpacked(float* d, uint64_t desc_a, uint64_t desc_b, bool accumulate,
                                                  std::index_sequence<I...>) {
  Op::fma(desc_a, desc_b, d[I]..., accumulate ? cute::SM90::GMMA::ScaleOut::One : cute::SM90::GMMA::ScaleOut::Zero);
}
template <typename Op, size_t... I>
__device__ __forceinline__ void wgmma_rs_unpacked(float* d, const uint32_t (&a)[4], uint64_t desc_b,
                                                  bool accumulate, std::index_sequence<I...>) {
  Op::fma(a[0], a[1], a[2], a[3], desc_b, d[I]...,
          accumulate ? cute::SM90::GMMA::ScaleOut::One : cute::SM90::GMMA::ScaleOut::Zero);
}
}  // namespace detail

// T is __half or __nv_bfloat16; N in {16, 32, 64, 128, 256}. A is K-major (row-major 64 x 16); B is K-major (stored
// [n][k], k contiguous) unless kTransB, then MN-major (stored [k][n], n contiguous). accumulate == false: D = A B.
template <typename T, int N, bool kTransB>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
  detail::wgmma_ss_unpacked<typename detail::WgmmaOps<T, N, kTransB>::SS>(d, desc_a, desc_b, accumulate,
                                                                           std::make_index_sequence<N / 2>{});
}
template <typename T, int N, bool kTransB>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b,
                                         bool accumulate) {
  detail::wgmma_rs_unpacked<typename detail::WgmmaOps<T, N, kTransB>::RS>(d, a, desc_b, accumulate,
                                                                           std::make_index_sequence<N / 2>{});
}

// ---------------------------------------------------------------------------------------------------------------
// setmaxnreg: a warpgroup's per-thread register budget (a multiple of 8 in 24..256); every warp of the warpgroup
// issues the same one. The producer gives registers back, the consumers take them.
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
  cutlass::arch::warpgroup_reg_alloc<kRegs>();
}
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
  cutlass::arch::warpgroup_reg_dealloc<kRegs>();
}

// ---------------------------------------------------------------------------------------------------------------
// Host: tensor maps (cuTensorMapEncodeTiled, reached through the runtime's driver entry point so that the library
// does not link libcuda).
enum class TmaElement : int { kF16, kBF16, kF32, kU8, kU32 };
enum class TmaSwizzle : int { kNone, k32B, k64B, k128B };

// A tiled map over a tensor of `rank` (1..5) dimensions, innermost first: dims[i] elements, byte_strides[i - 1]
// the stride of dimension i (i >= 1; multiples of 16), box[i] elements per copy (box[0] * element size <= the
// swizzle span when swizzled, and a multiple of 16 bytes). Elements past dims are zero-filled. Returns nullptr on
// success, else what failed.
inline const char* encode_tensor_map(TensorMap* map, TmaElement element, int rank, const void* base,
                                     const uint64_t* dims, const uint64_t* byte_strides, const uint32_t* box,
                                     TmaSwizzle swizzle) {
  using EncodeFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
  static EncodeFn encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess)
      fn = nullptr;
    return reinterpret_cast<EncodeFn>(fn);
  }();
  if (encode == nullptr) return "cuTensorMapEncodeTiled is not available from the CUDA driver";
  if (rank < 1 || rank > 5) return "tensor map rank must be 1..5";
  const CUtensorMapDataType types[] = {CU_TENSOR_MAP_DATA_TYPE_FLOAT16, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
                                       CU_TENSOR_MAP_DATA_TYPE_FLOAT32, CU_TENSOR_MAP_DATA_TYPE_UINT8,
                                       CU_TENSOR_MAP_DATA_TYPE_UINT32};
  const CUtensorMapSwizzle swizzles[] = {CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_SWIZZLE_32B,
                                         CU_TENSOR_MAP_SWIZZLE_64B, CU_TENSOR_MAP_SWIZZLE_128B};
  cuuint64_t d[5], s[5];
  cuuint32_t b[5], e[5];
  for (int i = 0; i < rank; ++i) {
    d[i] = dims[i];
    b[i] = box[i];
    e[i] = 1;
    if (i > 0) s[i - 1] = byte_strides[i - 1];
  }
  const CUresult r = encode(map, types[static_cast<int>(element)], static_cast<cuuint32_t>(rank),
                            const_cast<void*>(base), d, s, b, e, CU_TENSOR_MAP_INTERLEAVE_NONE,
                            swizzles[static_cast<int>(swizzle)], CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? nullptr : "cuTensorMapEncodeTiled rejected the tensor map (alignment, strides or box)";
}

}  // namespace blockops::hopper
