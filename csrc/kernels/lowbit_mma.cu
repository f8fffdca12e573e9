// Low-bit (2/3/4-bit, group-wise asymmetric) GEMM on tensor cores for 8 < m <= 64 rows of fp16/bf16 x: the
// Marlin approach (weights streamed once per block column, dequantized in registers into mma fragments) on the
// GPTQ layout exactly as stored (lowbit.h), with no repacking pass. fp32 x keeps dequantize + cuBLAS.
//
// y^T = W_hat @ x^T on mma.sync.m16n8k16 (fp32 accumulators): the weights are the A operand (16 output columns n
// by 16 codes k), x the B operand (16 k by 8 rows m), so the row tile is 8 (m = 9 pads to 16, 33 to 48).
//
// quant_mma_kernel<kBits, kMTiles, T>: block = 4 warps = 128 output columns, all kMTiles * 8 rows of x.
//
//                 n ->   blockIdx.x = 0                                   blockIdx.x = 1
//               +-------------------------------------------------------+-------------
//   qweight     | warp 0: n 0..31 | warp 1: 32..63 | warp 2 | warp 3     | ...
//   [words, out]|  k tile 0: kTileWords word rows --cp.async 16 B--> smem stage 0 (with x[:, tile], s, z rows)
//     blockIdx.y|  k tile 1                                  --> stage 1     kStages-deep ring: tile i + 3 is
//     = split 0 |  ...                                           ...         in flight while tile i is used
//     split 1   |  ...   (tiles_per_split tiles per split)
//               +-------------------------------------------------------+-------------
//
//   per k chunk of 16 codes, per warp: 2 A fragments (its 32 columns) dequantized from the staged words,
//   kMTiles / 2 ldmatrix.x4 of staged x (B fragments, 2 row tiles each), 2 * kMTiles mma.
//
// Fragment map (PTX ISA "Matrix Fragments for mma.m16n8k16"; gid = lane / 4, tig = lane % 4). A register r
// holds rows gid (r = 0, 2) or gid + 8 (r = 1, 3) at k = 2 tig + {0, 1} (r = 0, 1) or + 8 (r = 2, 3). The thread's
// rows are mapped to 4 adjacent columns n = warp_n0 + 4 gid + j, so one 16-byte smem load per word row feeds
// both fragments and the epilogue stores 4 adjacent outputs:
//     j = 0: fragment 0 row gid    j = 1: fragment 1 row gid
//     j = 2: fragment 0 row gid + 8    j = 3: fragment 1 row gid + 8
// and a register needs the codes k = 2 tig, 2 tig + 1 (+ 8) of one column: adjacent codes of one GPTQ word.
//   4-bit: chunk = word rows 2c, 2c + 1; the pair is byte tig of each.   2-bit: chunk = word row c; nibbles
//   tig and tig + 4.   3-bit: 10 codes per word, words straddle chunks: per code (word k / 10, bit 3 (k % 10)).
// Codes become exact T values by OR-ing them into the mantissa of fp16 1024 / bf16 128 and subtracting (decode_pair),
// then W_hat = fma(q - T(z), s, (T(z) - z) s) in T: one rounding, as in the dequantize path, when z is integral and
// s a T value. Groups are multiples of 16, so a chunk lies in one group: s and z change between chunks.
//
// K tail: in is a multiple of 16, so the last tile just has fewer chunks. Split-K: gridDim.y > 1 accumulates
// into a zeroed fp32 workspace with atomicAdd; an epilogue kernel adds the bias and rounds to T once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "device_common.cuh"
#include "lowbit.cuh"
#include "lowbit_launch.h"
#include "mma_ptx.cuh"

namespace blockops::lowbit {
namespace {

constexpr int kThreads = 128;            // 4 warps: 128 columns per block keep the x tile shared by enough warps
constexpr int kWarps = kThreads / 32;
constexpr int kFrags = 2;                // A fragments (16 columns each) per warp: 64 accumulators at 64 rows
constexpr int kWarpCols = 16 * kFrags;
constexpr int kBlockCols = kWarps * kWarpCols;
constexpr int kMmaK = 16;                // k of mma.m16n8k16; also the format's group granularity
constexpr int kTileWords = 8;            // word rows per k tile: 4 KiB of qweight per stage at every bit width,
                                         // and 8 p = 128 / 80 / 64 codes, a multiple of kMmaK for p = 16 / 10 / 8
constexpr int kStages = 4;               // cp.async ring depth: 3 tiles (12 KiB of weights) in flight per block
constexpr int kXPad = 8;                 // halves after each staged x row: a 16 B (mod 128) row shift keeps the 8
                                         // rows of an ldmatrix on distinct banks
constexpr int kMaxMTiles = static_cast<int>(kCudaMmaMaxRows / 8);
constexpr int kBlocksPerSm = 2;          // split K until the grid has this many blocks per SM

static_assert(kBlockCols % 8 == 0, "a column tile must hold whole 16-byte chunks of fp16 scales");
static_assert(kMaxMTiles % 2 == 0, "ldmatrix.x4 loads row tiles in pairs");
static_assert(kGroupQuantum % kMmaK == 0, "a k chunk of 16 codes must lie in one group");

__host__ __device__ constexpr int tile_k(int bits) { return kTileWords * (32 / bits); }  // codes per k tile

// Byte offsets inside one pipeline stage; the same function sizes the launch and carves smem in the kernel.
struct StageLayout {
  int x_off;        // x tile [kMTiles * 8][tile_k + kXPad] T (the weights [kTileWords][kBlockCols] int32 are at 0)
  int s_off;        // scales [groups][kBlockCols] param dtype
  int z_off;        // zeros, same
  int group_bytes;  // one row of scales or zeros
  int bytes;        // whole stage, a multiple of 16
};

// A tile [k0, k0 + tile_k) with k0 and the group boundaries multiples of 16 spans at most
// (tile_k - 32) / g + 2 groups, and never more than its tile_k / 16 chunks.
__host__ __device__ __forceinline__ StageLayout stage_layout(int bits, int mtiles, int64_t group_size, DType param) {
  const int tk = tile_k(bits);
  const int64_t by_size = (tk - 2 * kMmaK) / group_size + 2;
  const int groups = static_cast<int>(min64(tk / kMmaK, by_size));
  StageLayout L;
  L.x_off = kTileWords * kBlockCols * 4;
  L.s_off = L.x_off + mtiles * 8 * (tk + kXPad) * 2;
  L.group_bytes = kBlockCols * dtype_bytes(param);
  L.z_off = L.s_off + groups * L.group_bytes;
  L.bytes = L.z_off + groups * L.group_bytes;
  return L;
}

// Row tiles of 8 instantiated: m rounded up to 16, 32, 48 or 64.
int mtiles_for(int64_t m) { return m <= 16 ? 2 : m <= 32 ? 4 : m <= 48 ? 6 : 8; }

// The PTX wrappers (mma_ptx.cuh) this kernel uses.
using mma::cp_async16;
using mma::cp_async_commit;
using mma::cp_async_wait;
using mma::ldmatrix_x4;
using mma::lop3;
using mma::mma_16816;

// ---- element helpers -------------------------------------------------------------------------------------

// Word rows are staged [kTileWords][kBlockCols]; a thread reads its 4 adjacent columns in one 16-byte load.
__device__ __forceinline__ void load_words(uint32_t (&w)[4], const uint32_t* p) {
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  w[0] = v.x;
  w[1] = v.y;
  w[2] = v.z;
  w[3] = v.w;
}

// (a & kMask) | kOr in one instruction (see lop3): the LUT is that expression evaluated on F(0xF0, 0xCC, 0xAA).
template <uint32_t kMask, uint32_t kOr>
__device__ __forceinline__ uint32_t and_or(uint32_t a) {
  return lop3<(0xF0 & 0xCC) | 0xAA, kMask, kOr>(a);
}

// Two adjacent b-bit codes, lo in bits [8 i, 8 i + b) and hi in [8 i + b, 8 i + 2b) of `word`, as exact T values
// (the register the magic trick builds, minus the magic). Byte i is moved by one PRMT, then:
//   fp16: byte i to bytes 0 and 2; (x & mask) | magic keeps lo in the low half's mantissa and hi, still shifted
//         by b, in the high half's: (1024 + lo, 1024 + 2^b hi). One fma with (1, 2^-b), (-1024, -1024 2^-b) is exact.
//   bf16: its 7-bit mantissa cannot take a shifted nibble, so byte i goes to byte 0 alone and x * (1 + 2^(16-b))
//         adds a copy of it with hi on bit 16 (no overlap: x < 2^8 <= 2^(16-b)); mask, OR the magic, subtract it.
template <int kBits, typename T>
__device__ __forceinline__ uint32_t decode_pair(uint32_t word, uint32_t i) {
  constexpr uint32_t kCode = bitpack::value_mask(kBits);
  if constexpr (std::is_same_v<T, __half>) {
    constexpr uint32_t kMask = kCode | (kCode << (16 + kBits));
    constexpr uint32_t kScale = kBits == 4 ? 0x2C003C00u : 0x34003C00u;   // (1, 2^-b): 1/16 or 1/4 in the high half
    constexpr uint32_t kOffset = kBits == 4 ? 0xD400E400u : 0xDC00E400u;  // (-1024, -1024 2^-b): -64 or -256
    static_assert(kBits == 2 || kBits == 4, "the byte-pair decoders serve 2 and 4 bits");
    const uint32_t r = and_or<kMask, MmaType<T>::kMagic>(__byte_perm(word, 0u, 0x4040u | i | (i << 8)));
    return to_bits(__hfma2(from_bits<__half2>(r), from_bits<__half2>(kScale), from_bits<__half2>(kOffset)));
  } else {
    using T2 = typename MmaType<T>::T2;
    const uint32_t x = __byte_perm(word, 0u, 0x4440u | i);
    const uint32_t r = and_or<kCode * 0x10001u, MmaType<T>::kMagic>(x * (1u + (1u << (16 - kBits))));
    return to_bits(__hsub2(from_bits<T2>(r), from_bits<T2>(MmaType<T>::kMagic)));
  }
}

// The thread's two A fragments for chunk c (codes 16c .. 16c + 15 of the tile), from the staged words. See the
// fragment map in the header: pair[j][h] = column j, codes 2 tig + 8 h + {0, 1} of the chunk.
template <int kBits, typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[kFrags][4], const uint32_t* words, int c, int col, int tig,
                                       const GroupParams<T, 4>& gp) {
  uint32_t pair[4][2];
  if constexpr (kBits == 4) {  // word rows 2c + h; codes 2 tig, 2 tig + 1 are byte tig
    uint32_t w0[4], w1[4];
    load_words(w0, words + (2 * c) * kBlockCols + col);
    load_words(w1, words + (2 * c + 1) * kBlockCols + col);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      pair[j][0] = decode_pair<4, T>(w0[j], static_cast<uint32_t>(tig));
      pair[j][1] = decode_pair<4, T>(w1[j], static_cast<uint32_t>(tig));
    }
  } else if constexpr (kBits == 2) {  // word row c; codes 2 tig + 8 h, +1 are nibble tig + 4 h: after a shift
    uint32_t w[4];                    // by 4 tig, the low nibble of byte 2 h
    load_words(w, words + c * kBlockCols + col);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t shifted = w[j] >> (4 * tig);
      pair[j][0] = decode_pair<2, T>(shifted, 0u);
      pair[j][1] = decode_pair<2, T>(shifted, 2u);
    }
  } else {  // 3-bit: per code; code k of the tile is in word row k / 10 at bit 3 (k % 10)
    static_assert(kBits == 3, "2, 3 or 4 bits");
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint32_t code[2][4];
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int k = kMmaK * c + 2 * tig + 8 * h + e;
        uint32_t w[4];
        load_words(w, words + (k / 10) * kBlockCols + col);
#pragma unroll
        for (int j = 0; j < 4; ++j) code[e][j] = (w[j] >> (3 * (k % 10))) & 7u;
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        using T2 = typename MmaType<T>::T2;
        const uint32_t magic_pair = code[0][j] | (code[1][j] << 16) | MmaType<T>::kMagic;
        pair[j][h] = to_bits(__hsub2(from_bits<T2>(magic_pair), from_bits<T2>(MmaType<T>::kMagic)));
      }
    }
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
#pragma unroll
    for (int h = 0; h < 2; ++h) pair[j][h] = dequant_pair<T>(pair[j][h], gp, j);
  }
#pragma unroll
  for (int f = 0; f < kFrags; ++f) {
    a[f][0] = pair[f][0];      // row gid,     k 2 tig + {0, 1}
    a[f][1] = pair[2 + f][0];  // row gid + 8, k 2 tig + {0, 1}
    a[f][2] = pair[f][1];      // row gid,     k 2 tig + 8 + {0, 1}
    a[f][3] = pair[2 + f][1];  // row gid + 8, k 2 tig + 8 + {0, 1}
  }
}

// Issues the copies of k tile `tile` into one stage: word rows, x[:, tile] (rows >= m and k >= in zero-filled),
// and the scale / zero rows of the groups the tile touches. Every thread commits a group afterwards, even empty.
template <int kBits, int kMTiles>
__device__ __forceinline__ void load_tile(uint8_t* stage, const StageLayout& L, const GemvParams& p, int64_t tile,
                                          int64_t n0) {
  constexpr int kTileK = tile_k(kBits);
  constexpr int kXStride = kTileK + kXPad;
  constexpr int kChunksPerWordRow = kBlockCols / 4;
  constexpr int kChunksPerXRow = kTileK / 8;
  const int64_t in = p.g.in;
  const int64_t out = p.g.out;
  const int64_t words = p.g.words();
  const int64_t w0 = tile * kTileWords;
  const int64_t k0 = tile * kTileK;

  for (int i = threadIdx.x; i < kTileWords * kChunksPerWordRow; i += kThreads) {
    const int r = i / kChunksPerWordRow;
    const int cc = i % kChunksPerWordRow;
    const int64_t n = n0 + 4 * cc;
    const bool ok = w0 + r < words && n < out;  // out % 4 == 0: a chunk is all in or all out
    cp_async16(stage + (r * kBlockCols + 4 * cc) * 4, ok ? p.qweight + (w0 + r) * out + n : p.qweight, ok);
  }

  const char* x = static_cast<const char*>(p.x);
  for (int i = threadIdx.x; i < kMTiles * 8 * kChunksPerXRow; i += kThreads) {
    const int r = i / kChunksPerXRow;
    const int cc = i % kChunksPerXRow;
    const int64_t k = k0 + 8 * cc;
    const bool ok = r < p.m && k < in;  // in % 16 == 0: a chunk is all in or all out
    cp_async16(stage + L.x_off + (r * kXStride + 8 * cc) * 2, ok ? x + (r * in + k) * 2 : x, ok);
  }

  const int64_t gsize = p.g.group_size;
  const int64_t grp0 = k0 / gsize;
  const int rows = static_cast<int>((min64(k0 + kTileK, in) - 1) / gsize - grp0 + 1);
  const int esize = dtype_bytes(p.param_type);
  const int chunks_per_row = L.group_bytes / 16;
  const char* scales = static_cast<const char*>(p.scales);
  const char* zeros = static_cast<const char*>(p.zeros);
  for (int i = threadIdx.x; i < rows * chunks_per_row; i += kThreads) {
    const int r = i / chunks_per_row;
    const int cc = i % chunks_per_row;
    const int64_t n = n0 + cc * (16 / esize);
    const bool ok = n < out;  // out % 8 == 0: whole chunks for 2- and 4-byte elements
    const int64_t src = ok ? ((grp0 + r) * out + n) * esize : 0;
    cp_async16(stage + L.s_off + r * L.group_bytes + cc * 16, scales + src, ok);
    cp_async16(stage + L.z_off + r * L.group_bytes + cc * 16, zeros + src, ok);
  }
}

template <int kBits,      // 2, 3 or 4
          int kMTiles,    // row tiles of 8: 2, 4, 6 or 8; rows >= p.m are zeros and never stored
          typename T>     // x, y and mma input type: __half or __nv_bfloat16
__global__ void __launch_bounds__(kThreads)
    quant_mma_kernel(const GemvParams p, const int64_t tiles_per_split) {
  constexpr int kTileK = tile_k(kBits);
  constexpr int kChunks = kTileK / kMmaK;
  constexpr int kXStride = kTileK + kXPad;
  static_assert(kTileK % kMmaK == 0 && kMTiles % 2 == 0 && kMTiles <= kMaxMTiles, "tile shape");

  extern __shared__ int4 smem_raw[];  // kStages x StageLayout::bytes, 16-byte aligned for cp.async
  uint8_t* const smem = reinterpret_cast<uint8_t*>(smem_raw);
  const StageLayout L = stage_layout(kBits, kMTiles, p.g.group_size, p.param_type);

  const int64_t in = p.g.in;
  const int64_t out = p.g.out;
  const int64_t gsize = p.g.group_size;
  const int chunks_per_group = static_cast<int>(gsize / kMmaK);
  const int64_t tiles = ceil_div(p.g.words(), kTileWords);
  const int64_t tile_begin = int64_t{blockIdx.y} * tiles_per_split;
  const int64_t tile_end = min64(tiles, tile_begin + tiles_per_split);
  const int ntiles = tile_end > tile_begin ? static_cast<int>(tile_end - tile_begin) : 0;
  const bool split_k = gridDim.y > 1;
  const int64_t n0 = int64_t{blockIdx.x} * kBlockCols;

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int gid = lane / 4;
  const int tig = lane % 4;
  const int col = warp * kWarpCols + 4 * gid;  // the thread's first column within the block tile
  // ldmatrix row address of this lane: matrices (row tile 2mp, k 0-7), (2mp, k 8-15), (2mp+1, 0-7), (2mp+1, 8-15).
  const int x_lane = ((lane & 7) + ((lane >> 4) << 3)) * kXStride + ((lane >> 3) & 1) * 8;

  float acc[kFrags][kMTiles][4] = {};

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ntiles) load_tile<kBits, kMTiles>(smem + s * L.bytes, L, p, tile_begin + s, n0);
    cp_async_commit();
  }

  for (int i = 0; i < ntiles; ++i) {
    cp_async_wait<kStages - 2>();  // this thread's copies of tile i have landed ...
    __syncthreads();               // ... everyone's, and everyone is done with the stage refilled below
    if (i + kStages - 1 < ntiles) {
      load_tile<kBits, kMTiles>(smem + ((i + kStages - 1) % kStages) * L.bytes, L, p, tile_begin + i + kStages - 1,
                                n0);
    }
    cp_async_commit();

    const uint8_t* stage = smem + (i % kStages) * L.bytes;
    const uint32_t* words = reinterpret_cast<const uint32_t*>(stage);
    const uint16_t* xs = reinterpret_cast<const uint16_t*>(stage + L.x_off) + x_lane;  // T elements, addressed only
    const int64_t k0 = (tile_begin + i) * kTileK;
    const int chunks = static_cast<int>(min64(kChunks, (in - k0) / kMmaK));
    int pos = static_cast<int>((k0 % gsize) / kMmaK);  // chunk index within its group
    int grp = 0;                                        // group row within the staged tile
    GroupParams<T, 4> gp;
    load_group<T>(gp, stage + L.s_off, stage + L.z_off, p.param_type, col);
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      if (c >= chunks) break;  // K tail: block-uniform
      if (pos == chunks_per_group) {
        pos = 0;
        ++grp;
        load_group<T>(gp, stage + L.s_off + grp * L.group_bytes, stage + L.z_off + grp * L.group_bytes,
                      p.param_type, col);
      }
      uint32_t a[kFrags][4];
      load_a<kBits, T>(a, words, c, col, tig, gp);
#pragma unroll
      for (int mp = 0; mp < kMTiles / 2; ++mp) {
        uint32_t b[4];
        ldmatrix_x4(b, xs + mp * 16 * kXStride + c * kMmaK);
#pragma unroll
        for (int f = 0; f < kFrags; ++f) {
          mma_16816<T>(acc[f][2 * mp], a[f], b[0], b[1]);
          mma_16816<T>(acc[f][2 * mp + 1], a[f], b[2], b[3]);
        }
      }
      ++pos;
    }
  }
  cp_async_wait<0>();  // only empty groups can be pending; leave nothing in flight

  // Epilogue: accumulator element e (+2) of (fragment f, row tile mt) is row m = 8 mt + 2 tig + e of column
  // j = f (+2); the 4 columns are adjacent, so a row's 4 outputs are one 8-byte store.
  const int64_t n = n0 + col;
  if (n >= out) return;  // out % 4 == 0: the thread's 4 columns are all in or all out
  float bias[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  if (!split_k && p.bias != nullptr) {
#pragma unroll
    for (int j = 0; j < 4; ++j) bias[j] = load_float(p.bias, p.bias_type, n + j);
  }
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int64_t m = 8 * mt + 2 * tig + e;
      if (m >= p.m) continue;
      const float v[4] = {acc[0][mt][e], acc[1][mt][e], acc[0][mt][2 + e], acc[1][mt][2 + e]};
      if (split_k) {
#pragma unroll
        for (int j = 0; j < 4; ++j) atomicAdd(p.workspace + m * out + n + j, v[j]);
      } else {
        uint2 packed;
        packed.x = pack2<T>(v[0] + bias[0], v[1] + bias[1]);
        packed.y = pack2<T>(v[2] + bias[2], v[3] + bias[3]);
        *reinterpret_cast<uint2*>(static_cast<T*>(p.y) + m * out + n) = packed;
      }
    }
  }
}

// ---- dispatch --------------------------------------------------------------------------------------------

size_t smem_bytes(const GemvParams& p) {
  return size_t{kStages} * stage_layout(p.g.bits, mtiles_for(p.m), p.g.group_size, p.param_type).bytes;
}

template <int kBits, int kMTiles, typename T>
cudaError_t launch_typed(const GemvParams& p, dim3 grid, int64_t tiles_per_split, size_t smem,
                         cudaStream_t stream) {
  auto kernel = quant_mma_kernel<kBits, kMTiles, T>;
  const cudaError_t err = allow_dynamic_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  kernel<<<grid, kThreads, smem, stream>>>(p, tiles_per_split);
  return cudaGetLastError();
}

template <int kBits, typename T>
cudaError_t launch_rows(const GemvParams& p, dim3 grid, int64_t tiles_per_split, size_t smem, cudaStream_t stream) {
  switch (mtiles_for(p.m)) {
    case 2: return launch_typed<kBits, 2, T>(p, grid, tiles_per_split, smem, stream);
    case 4: return launch_typed<kBits, 4, T>(p, grid, tiles_per_split, smem, stream);
    case 6: return launch_typed<kBits, 6, T>(p, grid, tiles_per_split, smem, stream);
    default: return launch_typed<kBits, 8, T>(p, grid, tiles_per_split, smem, stream);
  }
}

template <typename T>
cudaError_t launch_bits(const GemvParams& p, dim3 grid, int64_t tiles_per_split, size_t smem, cudaStream_t stream) {
  switch (p.g.bits) {
    case 2: return launch_rows<2, T>(p, grid, tiles_per_split, smem, stream);
    case 3: return launch_rows<3, T>(p, grid, tiles_per_split, smem, stream);
    default: return launch_rows<4, T>(p, grid, tiles_per_split, smem, stream);
  }
}

}  // namespace

bool quant_mma_supported(const GemvParams& p) {
  if (!valid_geometry(p.g) || p.m <= kCudaGemvMaxRows || p.m > kCudaMmaMaxRows || p.g.out == 0 || p.g.out % 8 != 0) {
    return false;
  }
  if (p.x_type != DType::kF16 && p.x_type != DType::kBF16) return false;
  if (!aligned16(p.x) || !aligned16(p.qweight) || !aligned16(p.scales) || !aligned16(p.zeros)) return false;
  return smem_bytes(p) <= static_cast<size_t>(max_dynamic_smem());
}

// Split K when the column tiles alone give fewer than kBlocksPerSm blocks per SM. A split keeps at least
// kStages tiles (a full pipeline) and m / kTileWords tiles, so its atomics (m floats per column) never
// exceed its weight words (kTileWords per tile and column).
int quant_mma_splits(const Geometry& g, int64_t m) {
  const int64_t tiles = ceil_div(g.words(), kTileWords);
  const int64_t col_blocks = ceil_div(g.out, kBlockCols);
  const int64_t target = int64_t{kBlocksPerSm} * multiprocessor_count();
  const int64_t by_rows = ceil_div(m, kTileWords);
  const int64_t min_tiles = by_rows > kStages ? by_rows : kStages;
  if (col_blocks <= 0 || col_blocks >= target || tiles < 2 * min_tiles) return 1;
  int64_t splits = min64(ceil_div(target, col_blocks), tiles / min_tiles);
  splits = ceil_div(tiles, ceil_div(tiles, splits));  // no empty trailing split
  return static_cast<int>(min64(splits < 1 ? 1 : splits, 65535));
}

cudaError_t launch_quant_mma(const GemvParams& p, int splits, cudaStream_t stream) {
  if (!quant_mma_supported(p) || splits < 1 || splits > 65535 || (splits > 1 && p.workspace == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const int64_t tiles = ceil_div(p.g.words(), kTileWords);
  const int64_t tiles_per_split = tiles > 0 ? ceil_div(tiles, splits) : 1;
  const int64_t used = tiles > 0 ? ceil_div(tiles, tiles_per_split) : 1;  // no empty split
  if (used > 1) {
    const cudaError_t err = cudaMemsetAsync(p.workspace, 0, sizeof(float) * p.m * p.g.out, stream);
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(static_cast<unsigned>(ceil_div(p.g.out, kBlockCols)), static_cast<unsigned>(used));
  const size_t smem = smem_bytes(p);
  const cudaError_t err = p.x_type == DType::kF16
                              ? launch_bits<__half>(p, grid, tiles_per_split, smem, stream)
                              : launch_bits<__nv_bfloat16>(p, grid, tiles_per_split, smem, stream);
  if (err != cudaSuccess || used == 1) return err;
  return launch_splitk_epilogue(p, stream);
}

}  // namespace blockops::lowbit
