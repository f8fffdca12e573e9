// Low-bit (2/3/4-bit, group-wise asymmetric) prefill GEMM for Hopper (sm_90a): y = x W_hat^T (+ bias) for more
// than kCudaMmaMaxRows rows of fp16/bf16 x, on wgmma with the weights dequantized in registers, fed by TMA through a
// warp-specialised mbarrier ring. It replaces "dequantize + cuBLAS" on H100 / H200 (lowbit_cuda.cpp dispatches);
// the weights stay in blockops' layout (lowbit.h) as stored, no repacking pass.
//
// Operands are swapped so that the narrow weights sit in registers: per consumer warpgroup the kernel computes a
// 64 (out features) x kN (tokens) tile of y^T = W_hat x^T with wgmma.mma_async m64nNk16, A = W_hat from registers
// (wgmma_rs), B = x from shared memory. x [m, in] is row-major, i.e. K-major for this product, so TMA writes its
// tile as SWIZZLE_128B slabs (kN rows of 64 k = 128 bytes) and the B descriptor of k16 step j starts at
// slab + 32 j bytes (SBO 1024: 8 rows of 128 bytes), as hopper_layout.cuh's contract describes.
//
// quant_wgmma_kernel<kBits, T, kN>: block = 3 warpgroups, tile = 128 out features x kN tokens (kN = 256, 128 or 64:
// the widest that still gives every SM a block, tokens_per_block), grid = (out tiles, token tiles).
//   warpgroup 0: producer (setmaxnreg down to kProducerRegs); one thread issues per k tile of 64 codes four TMA
//                boxes into stage t % kStages after the consumers released it (empty[s]) and arms full[s] with
//                their byte count:  x [kN rows][64 k] (SWIZZLE_128B; rows >= m and k >= in arrive as zeros),
//                qweight [word_rows(kBits)][128 out] int32, scales and zeros [group_rows][128 out] (param dtype).
//   warpgroups 1, 2: consumers (setmaxnreg up to kConsumerRegs), out features 64 (w - 1) .. + 63 of the block;
//                per tile: wait full[s]; per k16 step j: dequantize its A fragment from the staged words, wgmma_fence,
//                one wgmma (so step j + 1 is dequantized while step j runs). Step 0 is committed alone, and the
//                wgmma_wait<1> after it retires the previous tile's batch: every consumer thread then arrives on
//                that tile's empty barrier. Steps 1..3 are the tile's second batch. One wait<0> after the last tile.
//                (Double-buffering A over whole tiles instead makes ptxas serialize every wgmma, C7513; per step
//                the A registers being written are never those of a wgmma in flight, and ptxas keeps them apart.)
//
//            k ->  tile 0 (64 codes)    tile 1      ...                     ring of kStages stages
//   x        [m0 .. m0+kN) x [k0, k0+64)  --TMA SW128-->  stage t % kStages: | x slab | words | scales | zeros |
//   qweight  word rows of [k0, k0+64)      --TMA------->                       full[s] (tx bytes), empty[s] (256)
//   scales/zeros group rows of [k0, k0+64) --TMA------->
//
// Word rows per tile: 4-bit 8 (k0 / 8 ..), 2-bit 4 (k0 / 16 ..); 3-bit packs 10 codes per word, so 64 codes starting
// at any code of a word span at most 8 words: the box is the 8 rows from k0 / 10 and code k sits in staged row
// k / 10 - k0 / 10 at bit 3 (k % 10). Group rows per tile: min(4, ceil(63 / g) + 1) from k0 / g (g a multiple of 16,
// so a k16 step lies in one group). Boxes past the tensor arrive as zeros: s = z = 0 gives W_hat = 0 there, and x = 0
// past in / m, so tails need no masking in the main loop. The last tile's k16 steps past in (in % 64 != 0) still run,
// on zeros: a data-dependent wgmma count would put the wgmmas in separate basic blocks, where ptxas injects a
// warpgroup.arrive before each (C7519).
//
// A fragment map (wgmma register A = the m16n8k16 A layout per warp; gid = lane / 4, tig = lane % 4): the rows of the
// 64 x 16 A tile are the warpgroup's 64 out features in the order row 16 w + gid -> feature 16 w + 2 gid, row
// 16 w + gid + 8 -> 16 w + 2 gid + 1, so a thread's two rows are two adjacent features (one 8-byte load of two words
// per word row, one 4-byte store of two outputs per token). Register r of step j: feature (r & 1), codes
// 16 j + 2 tig + {0, 1} (r < 2) or + 8 (r >= 2): two adjacent codes of one feature, i.e. of one group.
// Accumulator d[4 i + r] (PTX ISA wgmma D layout): feature row as above with r / 2, token 8 i + 2 tig + (r & 1).
//
// Numerics, as lowbit_mma.cu's (the fused Ampere kernel): codes become exact T values through the magic-number
// trick (OR into the mantissa of fp16 1024 / bf16 128, subtract), then W_hat = fma(q - T(z), T(s), corr) in T with
// corr = T((T(z) - z) s): one rounding of (q - z) s to T when z is integral and s a T value -- the same value the
// dequantize path feeds cuBLAS. A fractional zero costs at most one more rounding (of q - T(z)); fp32 scales are
// rounded to T first. Products and sums in the wgmma are fp32; y is rounded once to T, with the bias added in fp32.
#include "lowbit_launch.h"

#if defined(BLOCKOPS_HAVE_CUTE)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "device_common.cuh"
#include "hopper_ptx.cuh"
#include "lowbit.cuh"

namespace blockops::lowbit {
namespace {

using hopper::fence_operands;
using hopper::mbarrier_arrive;
using hopper::mbarrier_arrive_expect_tx;
using hopper::mbarrier_init;
using hopper::mbarrier_init_fence;
using hopper::mbarrier_wait;
using hopper::smem_descriptor;
using hopper::smem_u32;
using hopper::SmemSwizzle;
using hopper::TensorMap;
using hopper::tma_load_2d;
using hopper::wgmma_commit;
using hopper::wgmma_fence;
using hopper::wgmma_wait;

constexpr int kTileK = 64;                          // codes per k tile: one 128-byte slab of fp16 / bf16 x
// ([[maybe_unused]]: the device passes for other architectures compile the kernels' bodies away.)
[[maybe_unused]] constexpr int kSteps = kTileK / 16;  // wgmma k16 steps per tile
constexpr int kWgOut = 64;                          // out features per consumer warpgroup (wgmma M)
constexpr int kConsumers = 2;                       // consumer warpgroups; they share the x tile
constexpr int kBlockOut = kConsumers * kWgOut;      // out features per block (and per weight / scale box)
constexpr int kThreads = 128 * (1 + kConsumers);    // + the producer warpgroup
constexpr int kStages = 4;                          // ring depth
constexpr int kMaxWordRows = 8;
constexpr int kMaxGroupRows = 4;
// 128 x 40 + 256 x 232 = 64 K registers: one block per SM.
[[maybe_unused]] constexpr int kProducerRegs = 40;
[[maybe_unused]] constexpr int kConsumerRegs = 232;
[[maybe_unused]] constexpr int kReleaseArrivals = 128 * kConsumers;  // every consumer thread arrives on empty[s]

static_assert(kTileK * 2 == 128, "a k tile is one 128-byte swizzle row of 16-bit x");
static_assert(kGroupQuantum % 16 == 0, "a k16 step must lie in one group");

__host__ __device__ constexpr int word_rows(int bits) { return bits == 2 ? 4 : kMaxWordRows; }
[[maybe_unused]] __host__ __device__ constexpr int first_word(int bits, int k0) {
  return bits == 3 ? k0 / 10 : k0 / (32 / bits);
}
inline int group_rows(int64_t g) {
  const int64_t r = (63 + g - 1) / g + 1;
  return static_cast<int>(r < kMaxGroupRows ? r : kMaxGroupRows);
}

// Byte offsets inside one stage (every part 1024-byte aligned: the x slab for the 128B swizzle, the rest for TMA).
template <int kN>
struct Layout {                                   // the x slab at offset 0
  static constexpr int kW = kN * 128;
  static constexpr int kS = kW + kMaxWordRows * kBlockOut * 4;
  static constexpr int kZ = kS + kMaxGroupRows * kBlockOut * 4;
  static constexpr int kStage = kZ + kMaxGroupRows * kBlockOut * 4;
  static constexpr int kBarriers = kStages * kStage;
  static constexpr int kSmem = kBarriers + 2 * kStages * 8 + 1024;  // + slack to align the buffer up to 1024
  static_assert(kW % 1024 == 0 && kS % 1024 == 0 && kZ % 1024 == 0 && kStage % 1024 == 0, "stage alignment");
};

// What the kernel takes (a __grid_constant__ parameter: the tensor maps must live in parameter space).
struct WgmmaArgs {
  TensorMap x_map;       // x [m, in] T, box [kN rows][64 k], SWIZZLE_128B
  TensorMap w_map;       // qweight [words, out] u32, box [word_rows][128]
  TensorMap s_map;       // scales [groups, out] param dtype, box [group_rows][128]
  TensorMap z_map;       // zeros, same
  const void* bias;      // [out] or nullptr
  void* y;               // [m, out] T
  int64_t m;
  int64_t out;
  int in;
  int group_size;
  int ktiles;            // ceil(in / 64)
  uint32_t tx_bytes;     // bytes the four boxes of one stage deliver (zero-filled ones included)
  DType param_type;
  DType bias_type;
};

// ---- element helpers -------------------------------------------------------------------------------------

// Two b-bit codes of one word, lo at bit `shift` and hi right above it, as {lo, hi} in the two 16-bit halves.
template <int kBits>
__device__ __forceinline__ uint32_t code_pair(uint32_t word, int shift) {
  constexpr uint32_t kMask = (1u << kBits) - 1u;
  const uint32_t t = word >> shift;
  return (t & kMask) | ((t << (16 - kBits)) & (kMask << 16));
}

// W_hat of a code pair ({lo, hi} integers in the 16-bit halves) of feature f (lowbit.cuh), as the T pair an
// A register holds.
template <typename T>
__device__ __forceinline__ uint32_t dequant(uint32_t codes, const GroupParams<T, 2>& gp, int f) {
  return dequant_pair(exact_pair<T>(codes), gp, f);
}

// The A fragment of k16 step j of the staged tile (see the fragment map above): `words` = the stage's word rows
// [rows][kBlockOut], col = the thread's first feature within the block, base3 = k0 % 10 (3-bit only).
template <int kBits, typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const uint32_t* words, int j, int col, int tig, int base3,
                                       const GroupParams<T, 2>& gp) {
  uint32_t codes[4];  // register order: (f 0, k lo), (f 1, k lo), (f 0, k hi), (f 1, k hi)
  if constexpr (kBits == 4) {  // word rows 2j (codes 16 j .. + 7) and 2j + 1; codes 2 tig, 2 tig + 1 = byte tig
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint2 w = *reinterpret_cast<const uint2*>(words + (2 * j + h) * kBlockOut + col);
      codes[2 * h] = code_pair<4>(w.x, 8 * tig);
      codes[2 * h + 1] = code_pair<4>(w.y, 8 * tig);
    }
  } else if constexpr (kBits == 2) {  // word row j; codes 2 tig (+ 8) at bit 4 tig (+ 16)
    const uint2 w = *reinterpret_cast<const uint2*>(words + j * kBlockOut + col);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      codes[2 * h] = code_pair<2>(w.x, 4 * tig + 16 * h);
      codes[2 * h + 1] = code_pair<2>(w.y, 4 * tig + 16 * h);
    }
  } else {  // 3-bit: per code, code k0 + r of the tile in staged row (base3 + r) / 10 at bit 3 ((base3 + r) % 10)
    static_assert(kBits == 3, "2, 3 or 4 bits");
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint32_t c[2][2];  // [e][f]
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const unsigned r = static_cast<unsigned>(base3 + 16 * j + 2 * tig + 8 * h + e);  // unsigned: cheaper / 10
        const uint2 w = *reinterpret_cast<const uint2*>(words + (r / 10) * kBlockOut + col);
        const unsigned shift = 3 * (r % 10);
        c[e][0] = (w.x >> shift) & 7u;
        c[e][1] = (w.y >> shift) & 7u;
      }
      codes[2 * h] = c[0][0] | (c[1][0] << 16);
      codes[2 * h + 1] = c[0][1] | (c[1][1] << 16);
    }
  }
#pragma unroll
  for (int r = 0; r < 4; ++r) a[r] = dequant<T>(codes[r], gp, r & 1);
}

// What a consumer thread keeps across tiles.
struct Consumer {
  uint8_t* smem;     // the 1024-aligned ring
  uint64_t* full;
  uint64_t* empty;
  int col;           // the thread's first feature within the block's 128
  int tig;
};

// One k tile of a consumer warpgroup: wait for its stage, then per k16 step dequantize its A fragment and issue its
// wgmma; after step 0, retire the previous tile's wgmmas and release that tile's stage.
template <int kBits, typename T, int kN>
__device__ __forceinline__ void consume_tile(float (&acc)[kN / 2], int t, const Consumer& c, const WgmmaArgs& args) {
  using L = Layout<kN>;
  const int s = t % kStages;
  mbarrier_wait(&c.full[s], (t / kStages) & 1);
  const uint8_t* st = c.smem + s * L::kStage;
  const uint32_t* words = reinterpret_cast<const uint32_t*>(st + L::kW);
  const int k0 = t * kTileK;
  const int chunks_per_group = args.group_size / 16;
  int pos = (k0 % args.group_size) / 16;  // k16 step within its group
  int grow = 0;                           // staged group row
  uint32_t a[kSteps][4];
  GroupParams<T, 2> gp;
  load_group<T>(gp, st + L::kS, st + L::kZ, args.param_type, c.col);
  const uint32_t x_addr = smem_u32(st);
  fence_operands(acc);
#pragma unroll
  for (int j = 0; j < kSteps; ++j) {
    if (j > 0 && ++pos == chunks_per_group) {
      pos = 0;
      ++grow;
      load_group<T>(gp, st + L::kS, st + L::kZ, args.param_type, grow * kBlockOut + c.col);
    }
    load_a<kBits, T>(a[j], words, j, c.col, c.tig, k0 % 10, gp);
    wgmma_fence();  // the A registers and accumulators written above are ordered before the wgmma
    const uint64_t desc = smem_descriptor(x_addr + 32 * j, 16, 1024, SmemSwizzle::k128B);
    hopper::wgmma_rs<T, kN, false>(acc, a[j], desc, true);
    if (j == 0) {
      wgmma_commit();
      if (t > 0) {
        fence_operands(acc);
        wgmma_wait<1>();
        fence_operands(acc);
        mbarrier_arrive(&c.empty[(t - 1) % kStages]);
      }
    }
  }
  wgmma_commit();
}

template <int kBits,  // 2, 3 or 4
          typename T,  // x, y and wgmma input type: __half or __nv_bfloat16
          int kN>      // tokens per block: 64 or 128
__global__ void __launch_bounds__(kThreads, 1) quant_wgmma_kernel(const __grid_constant__ WgmmaArgs args) {
#if BLOCKOPS_HOPPER_DEVICE
  using L = Layout<kN>;
  extern __shared__ int4 smem_raw[];
  uint8_t* const smem = reinterpret_cast<uint8_t*>(smem_raw) + ((1024u - (smem_u32(smem_raw) & 1023u)) & 1023u);
  uint64_t* const full = reinterpret_cast<uint64_t*>(smem + L::kBarriers);
  uint64_t* const empty = full + kStages;
  const int n0 = static_cast<int>(blockIdx.x) * kBlockOut;
  const int m0 = static_cast<int>(blockIdx.y) * kN;
  const int wg = static_cast<int>(threadIdx.x) / 128;

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(&full[s], 1);
      mbarrier_init(&empty[s], kReleaseArrivals);
    }
    mbarrier_init_fence();
  }
  __syncthreads();

  if (wg == 0) {  // producer
    hopper::setmaxnreg_dec<kProducerRegs>();
    if (threadIdx.x == 0) {
      hopper::tma_prefetch_descriptor(&args.x_map);
      hopper::tma_prefetch_descriptor(&args.w_map);
      hopper::tma_prefetch_descriptor(&args.s_map);
      hopper::tma_prefetch_descriptor(&args.z_map);
      for (int t = 0; t < args.ktiles; ++t) {
        const int s = t % kStages;
        if (t >= kStages) mbarrier_wait(&empty[s], ((t / kStages) - 1) & 1);  // tile t - kStages released
        uint8_t* st = smem + s * L::kStage;
        const int k0 = t * kTileK;
        mbarrier_arrive_expect_tx(&full[s], args.tx_bytes);
        tma_load_2d(st, &args.x_map, &full[s], k0, m0);
        tma_load_2d(st + L::kW, &args.w_map, &full[s], n0, first_word(kBits, k0));
        tma_load_2d(st + L::kS, &args.s_map, &full[s], n0, k0 / args.group_size);
        tma_load_2d(st + L::kZ, &args.z_map, &full[s], n0, k0 / args.group_size);
      }
    }
    return;
  }

  hopper::setmaxnreg_inc<kConsumerRegs>();
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int warp = (static_cast<int>(threadIdx.x) / 32) % 4;  // within the warpgroup
  Consumer c;
  c.smem = smem;
  c.full = full;
  c.empty = empty;
  c.col = (wg - 1) * kWgOut + 16 * warp + 2 * (lane / 4);
  c.tig = lane % 4;

  float acc[kN / 2];
#pragma unroll
  for (int i = 0; i < kN / 2; ++i) acc[i] = 0.0f;
  for (int t = 0; t < args.ktiles; ++t) consume_tile<kBits, T, kN>(acc, t, c, args);
  fence_operands(acc);
  wgmma_wait<0>();
  fence_operands(acc);

  // Epilogue: accumulator 4 i + r is feature col + r / 2, token m0 + 8 i + 2 tig + (r & 1); the two features of a
  // token are one 4-byte store (col even, out % 8 == 0: both in or both out).
  const int64_t n = int64_t{n0} + c.col;
  if (n >= args.out) return;
  float b0 = 0.0f, b1 = 0.0f;
  if (args.bias != nullptr) {
    b0 = load_float(args.bias, args.bias_type, n);
    b1 = load_float(args.bias, args.bias_type, n + 1);
  }
  T* const y = static_cast<T*>(args.y);
#pragma unroll
  for (int i = 0; i < kN / 8; ++i) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int64_t m = int64_t{m0} + 8 * i + 2 * c.tig + e;
      if (m < args.m) {
        *reinterpret_cast<uint32_t*>(y + m * args.out + n) = pack2<T>(acc[4 * i + e] + b0, acc[4 * i + 2 + e] + b1);
      }
    }
  }
#endif
}

// ---- dispatch --------------------------------------------------------------------------------------------

// The widest token tile (256, 128 or 64) that still gives every SM a block: a wider tile amortises each dequantized
// weight fragment over more wgmma columns (the dequantization, not the tensor cores, bounds this kernel's rate).
int tokens_per_block(const GemvParams& p) {
  const int64_t col_blocks = ceil_div(p.g.out, kBlockOut);
  const int64_t sms = multiprocessor_count();
  if (ceil_div(p.m, 256) * col_blocks >= sms && static_cast<int64_t>(Layout<256>::kSmem) <= max_dynamic_smem()) {
    return 256;
  }
  return ceil_div(p.m, 128) * col_blocks >= sms ? 128 : 64;
}

hopper::TmaElement tma_element(DType t) {
  return t == DType::kF16 ? hopper::TmaElement::kF16
                          : t == DType::kBF16 ? hopper::TmaElement::kBF16 : hopper::TmaElement::kF32;
}

template <int kBits, typename T, int kN>
cudaError_t launch_typed(const WgmmaArgs& args, dim3 grid, cudaStream_t stream) {
  auto kernel = quant_wgmma_kernel<kBits, T, kN>;
  const size_t smem = Layout<kN>::kSmem;
  const cudaError_t err = allow_dynamic_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  kernel<<<grid, kThreads, smem, stream>>>(args);
  return cudaGetLastError();
}

template <typename T, int kN>
cudaError_t launch_bits(const WgmmaArgs& args, int bits, dim3 grid, cudaStream_t stream) {
  switch (bits) {
    case 2: return launch_typed<2, T, kN>(args, grid, stream);
    case 3: return launch_typed<3, T, kN>(args, grid, stream);
    default: return launch_typed<4, T, kN>(args, grid, stream);
  }
}

}  // namespace

bool quant_wgmma_supported(const GemvParams& p) {
  if (!valid_geometry(p.g) || p.m <= kCudaMmaMaxRows || p.g.out <= 0 || p.g.out % 8 != 0 || p.g.in <= 0) {
    return false;
  }
  if (p.x_type != DType::kF16 && p.x_type != DType::kBF16) return false;
  // TMA: 16-byte aligned bases (strides are: in % 16 == 0, out % 8 == 0); int32 coordinates and a grid.y of tiles.
  if (!aligned16(p.x) || !aligned16(p.qweight) || !aligned16(p.scales) || !aligned16(p.zeros)) return false;
  if (p.g.in > (int64_t{1} << 30) || p.g.out > (int64_t{1} << 30) || ceil_div(p.m, 64) > 65535) return false;
  return static_cast<size_t>(Layout<128>::kSmem) <= static_cast<size_t>(max_dynamic_smem());
}

cudaError_t launch_quant_wgmma(const GemvParams& p, cudaStream_t stream) {
  if (!quant_wgmma_supported(p)) return cudaErrorInvalidValue;
  const int kn = tokens_per_block(p);
  WgmmaArgs args;
  memset(&args, 0, sizeof(args));
  const int esize = dtype_bytes(p.param_type);
  const int grows = group_rows(p.g.group_size);
  const int wrows = word_rows(p.g.bits);
  {
    const uint64_t dims[2] = {static_cast<uint64_t>(p.g.in), static_cast<uint64_t>(p.m)};
    const uint64_t strides[1] = {static_cast<uint64_t>(p.g.in) * 2};
    const uint32_t box[2] = {static_cast<uint32_t>(kTileK), static_cast<uint32_t>(kn)};
    if (hopper::encode_tensor_map(&args.x_map, tma_element(p.x_type), 2, p.x, dims, strides, box,
                                  hopper::TmaSwizzle::k128B) != nullptr) {
      return cudaErrorInvalidValue;
    }
  }
  {
    const uint64_t dims[2] = {static_cast<uint64_t>(p.g.out), static_cast<uint64_t>(p.g.words())};
    const uint64_t strides[1] = {static_cast<uint64_t>(p.g.out) * 4};
    const uint32_t box[2] = {static_cast<uint32_t>(kBlockOut), static_cast<uint32_t>(wrows)};
    if (hopper::encode_tensor_map(&args.w_map, hopper::TmaElement::kU32, 2, p.qweight, dims, strides, box,
                                  hopper::TmaSwizzle::kNone) != nullptr) {
      return cudaErrorInvalidValue;
    }
  }
  {
    const uint64_t dims[2] = {static_cast<uint64_t>(p.g.out), static_cast<uint64_t>(p.g.groups())};
    const uint64_t strides[1] = {static_cast<uint64_t>(p.g.out) * esize};
    const uint32_t box[2] = {static_cast<uint32_t>(kBlockOut), static_cast<uint32_t>(grows)};
    if (hopper::encode_tensor_map(&args.s_map, tma_element(p.param_type), 2, p.scales, dims, strides, box,
                                  hopper::TmaSwizzle::kNone) != nullptr ||
        hopper::encode_tensor_map(&args.z_map, tma_element(p.param_type), 2, p.zeros, dims, strides, box,
                                  hopper::TmaSwizzle::kNone) != nullptr) {
      return cudaErrorInvalidValue;
    }
  }
  args.bias = p.bias;
  args.y = p.y;
  args.m = p.m;
  args.out = p.g.out;
  args.in = static_cast<int>(p.g.in);
  args.group_size = p.g.group_size;
  args.ktiles = static_cast<int>(ceil_div(p.g.in, kTileK));
  args.tx_bytes = static_cast<uint32_t>(kn * kTileK * 2 + wrows * kBlockOut * 4 + 2 * grows * kBlockOut * esize);
  args.param_type = p.param_type;
  args.bias_type = p.bias_type;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.g.out, kBlockOut)), static_cast<unsigned>(ceil_div(p.m, kn)));
  if (p.x_type == DType::kF16) {
    return kn == 256   ? launch_bits<__half, 256>(args, p.g.bits, grid, stream)
           : kn == 128 ? launch_bits<__half, 128>(args, p.g.bits, grid, stream)
                       : launch_bits<__half, 64>(args, p.g.bits, grid, stream);
  }
  return kn == 256   ? launch_bits<__nv_bfloat16, 256>(args, p.g.bits, grid, stream)
         : kn == 128 ? launch_bits<__nv_bfloat16, 128>(args, p.g.bits, grid, stream)
                     : launch_bits<__nv_bfloat16, 64>(args, p.g.bits, grid, stream);
}

}  // namespace blockops::lowbit

#else  // without the CUTLASS/CuTe headers: no Hopper kernel, quant_linear keeps its other paths

namespace blockops::lowbit {

bool quant_wgmma_supported(const GemvParams&) { return false; }

cudaError_t launch_quant_wgmma(const GemvParams&, cudaStream_t) { return cudaErrorNotSupported; }

}  // namespace blockops::lowbit

#endif  // BLOCKOPS_HAVE_CUTE
