// What the tensor-core attention kernels share (attention_mma_fwd.cu: forward; attention_mma_bwd.cu: dK/dV and dQ):
// the smem tile layout, the walk over one list row, the chunk loads, the ldmatrix lane offsets, the bit-tile words of
// a thread's rows, and the one warp GEMM every product of the three kernels goes through. fp16/bf16 operands,
// mma.sync.m16n8k16 with fp32 accumulators, cp.async double-buffered chunks, numerics of csrc/attention.h.
//
// Smem rows: every operand tile is stored row-major with kHead + kPad elements per row (stride_of): columns in
// [D, round16(D)) are zero-filled, so any head dim that is a multiple of 8 works and a k-step never reads garbage.
// Keys (or queries) are streamed in chunks of up to kChunk rows, two stages.
//
// Fragment map (PTX ISA "Matrix Fragments for mma.m16n8k16"; gid = lane / 4, tig = lane % 4): accumulator
// register e of n-tile j is row gid + 8 (e / 2), column 8 j + 2 tig + e % 2; A register r is row gid + 8 (r % 2),
// k 2 tig + 8 (r / 2) + {0, 1}. So accumulator n-tiles 2 kk and 2 kk + 1 of one product are exactly the A fragment
// of k-step kk of the next (P from S, dS from dP): AccFragA.
//
// Head dims: kHead in {64, 128, 256} bounds max(D, Dv) rounded up to 16 (the backward takes 64 and 128); the
// k-steps / output n-tiles beyond the real dims are skipped (block-uniform branches).
//
// Everything here has internal linkage (anonymous namespace), as when the kernels were one file: each kernel file
// compiles its own copy, and the CPU emulator (tools/cuda_emu/gen_emu.py inlines this header into the kernel file
// that includes it) can plant a bug in one kernel file's copy.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "attention_launch.h"
#include "device_common.cuh"
#include "mma_ptx.cuh"

namespace blockops::attention {
namespace {

constexpr int kChunk = 32;            // keys per pipeline stage: 4 n-tiles of S per warp, 2 k-steps of P V
constexpr int kMaxWarps = 8;          // block_q = 128; launch bounds (32 kMaxWarps, 1): without the minimum CTA
                                      // count ptxas (CUDA 13, sm_90a) caps registers and spills in dq_mma_kernel
constexpr int kPad = 8;               // elements after each smem row: a 16 B (mod 128) row shift keeps the 8 rows
                                      // of an ldmatrix on distinct banks
constexpr int kMaxGridYZ = 65535;

__host__ __device__ constexpr int round16(int x) { return (x + 15) / 16 * 16; }
__host__ __device__ constexpr int stride_of(int head) { return head + kPad; }

// The PTX wrappers (mma_ptx.cuh) the kernels use.
using mma::cp_async16;
using mma::cp_async_commit;
using mma::cp_async_wait;
using mma::ldmatrix_x4;
using mma::ldmatrix_x4_trans;
using mma::mma_16816;

// ---- loads -----------------------------------------------------------------------------------------------

// Issues the copies of `rows` smem rows from global rows row0.. of `src` (stride in elements): rows past `valid`
// and 16-byte chunks past `dim` are zero-filled, chunks up to round16(dim) written (the k-steps read them).
template <typename T, int kHead>
__device__ __forceinline__ void load_rows(T* dst, const T* src, int64_t stride, int64_t row0, int rows, int64_t valid,
                                          int dim) {
  const int chunks = round16(dim) / 8;
  for (int i = threadIdx.x; i < rows * chunks; i += blockDim.x) {
    const int r = i / chunks;
    const int cc = i % chunks;
    const bool ok = r < valid && 8 * cc < dim;  // dim % 8 == 0: a chunk is all in or all out
    cp_async16(dst + r * stride_of(kHead) + 8 * cc, ok ? src + (row0 + r) * stride + 8 * cc : src, ok);
  }
}

// K and V rows of chunk `sub` (w keys) of key block kb into stage s of k_s / v_s; keys past Tk zero-filled. k and v
// point at the (batch, key head) of p.
template <typename T, int kHead>
__device__ __forceinline__ void load_kv_chunk(T* k_s, T* v_s, int s, const T* k, const T* v, const FwdParams& p,
                                              int64_t kb, int sub, int w) {
  constexpr int kStride = stride_of(kHead);
  const int64_t key0 = kb * p.mask.block_kv + sub * w;
  load_rows<T, kHead>(k_s + s * kChunk * kStride, k, p.k_stride_t, key0, w, p.kv_len - key0, p.head_dim);
  load_rows<T, kHead>(v_s + s * kChunk * kStride, v, p.v_stride_t, key0, w, p.kv_len - key0, p.v_dim);
}

// ---- lists -----------------------------------------------------------------------------------------------

// The bit-tile words of this thread's two query rows (16 warp + gid and + 8 of the block) for the keys of a chunk
// starting at column c0 of the tile, shifted so that bit c is key c0 + c; all ones for a full block (tile < 0).
__device__ __forceinline__ void row_bits(uint32_t (&bits)[2], const int32_t* tiles, const MaskDims& m, int tile,
                                         int warp, int gid, int c0) {
  bits[0] = bits[1] = ~0u;
  if (tile >= 0) {
    const int32_t* t_rows = tiles + (int64_t{tile} * m.block_q + 16 * warp + gid) * m.words() + c0 / 32;
    bits[0] = static_cast<uint32_t>(t_rows[0]) >> (c0 % 32);
    bits[1] = static_cast<uint32_t>(t_rows[8 * m.words()]) >> (c0 % 32);
  }
}

// ---- the warp GEMM ----------------------------------------------------------------------------------------

// ldmatrix.x4 row address of this lane, in elements from a 16 x 16 tile's first element (kStride elements per
// row). a_lane_offset: A operands and transposed B (smem rows = k), matrices (rows 0-7, cols 0-7), (8-15, 0-7),
// (0-7, 8-15), (8-15, 8-15), the order of the A fragment's registers. b_lane_offset: B stored [n][k] (smem rows =
// n, e.g. K for Q K^T), matrices (n 0-7, k 0-7), (0-7, 8-15), (8-15, 0-7), (8-15, 8-15): registers 0, 1 are the
// B fragment of n-tile 0, registers 2, 3 of n-tile 1.
template <int kStride>
__device__ __forceinline__ int a_lane_offset(int lane) {
  return ((lane & 7) + ((lane >> 3) & 1) * 8) * kStride + (lane >> 4) * 8;
}
template <int kStride>
__device__ __forceinline__ int b_lane_offset(int lane) {
  return ((lane & 7) + (lane >> 4) * 8) * kStride + ((lane >> 3) & 1) * 8;
}

// Where warp_gemm takes the A fragment of k-step ks (rows: the warp's 16 rows) from:
// smem rows at `lane` (the warp's first row plus a_lane_offset) ...
template <typename T>
struct SmemFragA {
  const T* lane;
  __device__ __forceinline__ void operator()(int ks, uint32_t (&a)[4]) const { ldmatrix_x4(a, lane + ks * 16); }
};
// ... fragments loaded before the loop (the forward's Q) ...
template <int kSteps>
struct RegFragA {
  const uint32_t (&frags)[kSteps][4];
  __device__ __forceinline__ void operator()(int ks, uint32_t (&a)[4]) const {
#pragma unroll
    for (int r = 0; r < 4; ++r) a[r] = frags[ks][r];
  }
};
// ... or the fp32 accumulators of a previous product of the warp (fragment map above: n-tiles 2 ks, 2 ks + 1 are
// the A fragment of k-step ks), rounded to T pairs.
template <typename T, int kNTiles>
struct AccFragA {
  const float (&acc)[kNTiles][4];
  __device__ __forceinline__ void operator()(int kk, uint32_t (&a)[4]) const {
    a[0] = pack2<T>(acc[2 * kk][0], acc[2 * kk][1]);
    a[1] = pack2<T>(acc[2 * kk][2], acc[2 * kk][3]);
    a[2] = pack2<T>(acc[2 * kk + 1][0], acc[2 * kk + 1][1]);
    a[3] = pack2<T>(acc[2 * kk + 1][2], acc[2 * kk + 1][3]);
  }
};
template <typename T, int kNTiles>
__device__ __forceinline__ AccFragA<T, kNTiles> acc_frags(const float (&acc)[kNTiles][4]) {
  return {acc};
}

// A head dim (a multiple of 8) as the loops over it count it: 16-column k-steps (round16(dim) / 16) or 8-column
// n-tiles (dim / 8), computed once at the top of a kernel. The bounds keep the forms the kernels had before they
// shared warp_gemm (k-step < steps, 2 * n-tile pair < tiles, 16 * step < chunk): an equivalent form (16 * step <
// dim) changes ptxas's register allocation by up to 20 registers.
struct HeadAxis {
  int steps, tiles;
};
__device__ __forceinline__ HeadAxis head_axis(int dim) { return {round16(dim) / 16, dim / 8}; }

// One k-step ks of a product for one pair of n-tiles np: B's fragments from a chunk of smem rows [chunk][head]
// (`b` = its first element plus this lane's offset), then two mma into acc[2 np], acc[2 np + 1]. The product
// contracts
//   the head axis  (kOverChunk false): acc [16 x chunk] += A [16 x head] B^T, e.g. S = Q K^T: ldmatrix.x4 at
//                  b_lane_offset, rows 16 np, columns 16 ks;
//   the chunk axis (kOverChunk true):  acc [16 x head] += A [16 x chunk] B, e.g. O = P V: ldmatrix.x4.trans at
//                  a_lane_offset, rows 16 ks, columns 16 np.
template <int kStride, bool kOverChunk, typename T, int kNTiles>
__device__ __forceinline__ void mma_pair(float (&acc)[kNTiles][4], const uint32_t (&a)[4], const T* b, int ks,
                                         int np) {
  uint32_t bf[4];
  if constexpr (kOverChunk) {
    ldmatrix_x4_trans(bf, b + ks * 16 * kStride + np * 16);
  } else {
    ldmatrix_x4(bf, b + np * 16 * kStride + ks * 16);
  }
  mma_16816<T>(acc[2 * np], a, bf[0], bf[1]);
  mma_16816<T>(acc[2 * np + 1], a, bf[2], bf[3]);
}

// acc += A B for the warp's 16 rows (every product of the kernels but the dK/dV kernel's interleaved pair): per
// k-step the A fragment from a_frag (SmemFragA / RegFragA / AccFragA), then mma_pair for each n-tile pair. kSteps
// 16-wide k-steps and kNTiles 8-wide n-tiles at most; only those within `head` and within `chunk` rows (16 or 32)
// run (block-uniform branches).
template <int kStride, int kSteps, bool kOverChunk, typename T, int kNTiles, typename FragA>
__device__ __forceinline__ void warp_gemm(float (&acc)[kNTiles][4], const FragA& a_frag, const T* b, HeadAxis head,
                                          int chunk) {
  static_assert(kNTiles % 2 == 0, "n-tiles come in pairs (one ldmatrix.x4 of B)");
#pragma unroll
  for (int ks = 0; ks < kSteps; ++ks) {
    if (kOverChunk ? 16 * ks >= chunk : ks >= head.steps) break;
    uint32_t a[4];
    a_frag(ks, a);
#pragma unroll
    for (int np = 0; np < kNTiles / 2; ++np) {
      if (kOverChunk ? 2 * np >= head.tiles : 16 * np >= chunk) break;
      mma_pair<kStride, kOverChunk>(acc, a, b, ks, np);
    }
  }
}

// ---- non-finite values in a partial block (csrc/attention.h "NaN / Inf") -----------------------------------

// This thread's share of the test "does a chunk in smem (rows [0, rows), columns [0, dim)) hold a NaN or Inf?";
// the block ORs the shares with __syncthreads_or.
template <typename T, int kHead>
__device__ __forceinline__ bool chunk_share_nonfinite(const T* chunk, int rows, int dim) {
  const int per_row = dim / 8;   // dim % 8 == 0: 16-byte pieces, as load_rows copies them
  bool found = false;
  for (int i = threadIdx.x; i < rows * per_row; i += blockDim.x) {
    const T* e = chunk + (i / per_row) * stride_of(kHead) + 8 * (i % per_row);
#pragma unroll
    for (int x = 0; x < 8; ++x) found |= !(fabsf(to_float(e[x])) <= 3.402823466e38f);   // NaN fails too
  }
  return found;
}

// O += P V over the visible (query, key) pairs of a chunk only: the path of a partial block whose V chunk holds a
// NaN / Inf, where the mma would add P = 0 times it (0 * NaN = NaN) into rows that cannot see the key. For each
// key c the quad lane holding P[row][c] (fragment map above) shares it, rounded to T as the mma's A fragment is,
// and each lane adds it times V[c] into the output elements it owns, skipping hidden pairs (bit of `bits`, key
// past `keys_left`). A visible pair multiplies as the mma would (P = 0 times NaN is NaN there, as in softmax).
// Scalar and slow; only a non-finite V in a partial block takes it.
template <typename T, int kNTiles>
__device__ __forceinline__ void pv_visible_pairs(float (&o)[kNTiles][4], const float (&s)[4][4], const T* v_chunk,
                                                 int stride, const uint32_t (&bits)[2], int64_t keys_left,
                                                 HeadAxis dv, int w, int lane) {
  const int tig = lane % 4;
  for (int c = 0; c < w; ++c) {
    const int src = (lane & ~3) | ((c % 8) / 2);   // the quad lane of column c: c = 8 j + 2 tig + e
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float mine = 0.0f;   // s[c / 8][2 hr + c % 2] without indexing the registers by a runtime value
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float even = s[j][2 * hr], odd = s[j][2 * hr + 1];   // values: a select of addresses puts s on the stack
        if (j == c / 8) mine = c % 2 ? odd : even;
      }
      const float pr = to_float(from_float<T>(__shfl_sync(0xffffffffu, mine, src)));
      if (c >= keys_left || !((bits[hr] >> c) & 1u)) continue;   // after the shuffle: every lane takes part
      const T* v_row = v_chunk + c * stride + 2 * tig;
#pragma unroll
      for (int j = 0; j < kNTiles; ++j) {
        if (j >= dv.tiles) break;
        o[j][2 * hr] += pr * to_float(v_row[8 * j]);
        o[j][2 * hr + 1] += pr * to_float(v_row[8 * j + 1]);
      }
    }
  }
}

// ---- launch ------------------------------------------------------------------------------------------------

// kHead of the kernels for p: round16(max(D, Dv)) rounded up to 64, 128 or 256.
int head_bucket(const FwdParams& p) {
  const int dim = round16(p.head_dim > p.v_dim ? p.head_dim : p.v_dim);
  return dim <= 64 ? 64 : dim <= 128 ? 128 : 256;
}

// Sets the opt-in when `smem` exceeds the default, then launches.
template <typename Kernel, typename Params>
cudaError_t launch_with_smem(Kernel kernel, dim3 grid, int threads, size_t smem, const Params& p,
                             cudaStream_t stream) {
  const cudaError_t err = allow_dynamic_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  kernel<<<grid, threads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace
}  // namespace blockops::attention
