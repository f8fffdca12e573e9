// Vector-quantized GEMM on CUDA (family "vq"; layout and numerics in vq.h, launchers in vq_launch.h).
//
//   W_hat[n, j*d + t] = scales[n] * sum_K codebooks[K, code(n, j*K + K), t]      code(.) = min(code, k - 1)
//
// vq_gemv_kernel<D, M> -- m <= kCudaGemvMaxRows rows of x (decode). Block = 8 warps; warp w owns kRows output
// rows (8 for m <= 2, 4 above) and walks their positions p (codes) in steps of 128, 4 consecutive codes per lane (one
// 4- or 8-byte load per row, coalesced along the row). Each lane keeps x[:, group of p] in registers and reuses
// it for its kRows rows (for M > kRows the other way round: the rows' codewords stay, x streams); the codewords
// come from a copy of the codebook in shared memory replicated R times, copy r = lane % R, so that the random
// codeword loads of a warp fall on distinct banks:
//
//      smem codebook [K][k][R][D] (codebook dtype)       one load of D elements = 4..16 bytes; R = 128 / bytes:
//        codeword c, copy r at ((book k + c) R + r) D    a phase of 128 / bytes lanes hits 128 / bytes distinct
//                                                         bank groups whatever codes it reads (no conflicts)
//
//   R is halved until the copies fit kGemvCodebookBytes; a codebook above that even once (k = 65536) is read
//   from global memory through L1. The grid's y dimension splits the positions when the output rows alone give
//   too few blocks; split s writes fp32 partial sums to workspace[s] and vq_gemv_finish_kernel adds them in order
//   (deterministic), applies the scale and bias and rounds once.
//
//      blockIdx.x -> 8 * kRows output rows      blockIdx.y -> positions [s * per_split, (s + 1) * per_split)
//
// vq_mma_kernel<T, kWarpM16> -- fp16/bf16 x, more rows (DiT token counts). Block tile kBM x 128 outputs (kBM = 32,
// 64 or 128 rows of x), 8 warps as 2 (rows) x 4 (columns), warp tile 16 kWarpM16 x 32. Per k tile of 32:
//   x [kBM][32]  global --cp.async 16 B--> smem ring of kStages (rows >= m, columns >= in zero-filled)
//   W_hat [128][32]  codes (global) + fp32 codebook (smem) --dequantize, round to T once--> smem, double-buffered
//   per k16: ldmatrix.x4 A (x rows) and B (W_hat rows = mma columns), mma.sync.m16n8k16, fp32 accumulators.
// The dequantize of tile i runs before the tile's barrier, overlapping other warps' mma on tile i - 1.
//
// vq_simt_kernel -- every other case (fp32 x, in % 8 != 0, misaligned x): 64 x 64 output tiles on CUDA cores,
// 4 x 4 per thread, x and dequantized W_hat tiles in smem as fp32 (the CPU's batched numerics: fp32 W_hat).
//
// Backward: vq_grad_scales_kernel (a warp per row: unscaled W_hat row . t row), vq_grad_codebooks_kernel (a warp
// per codeword over the glue's sorted list of its code positions; deterministic, no atomics). grad_input is
// vq_dequantize_kernel + cuBLAS in the glue.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "device_common.cuh"
#include "mma_ptx.cuh"
#include "vq_launch.h"

namespace blockops::vq {
namespace {

// ---- tiny helpers ----------------------------------------------------------------------------------------

// Code p of row n, clamped to the codebook: a code >= k reads codeword k - 1 (never past the codebook).
__device__ __forceinline__ uint32_t clamped_code(const DeviceWeights& w, int64_t flat) {
  const uint32_t c = read_code(w.codes, w.code_type, flat);
  const uint32_t last = static_cast<uint32_t>(w.g.k - 1);
  return c < last ? c : last;
}

// A 16-bit float (fp16 or bf16 bits in the low half of `bits`) as fp32; exact.
__device__ __forceinline__ float b16_to_float(uint32_t bits, DType t) {
  if (t == DType::kBF16) return __uint_as_float(bits << 16);
  const uint16_t b = static_cast<uint16_t>(bits);
  __half h;
  memcpy(&h, &b, sizeof(h));
  return __half2float(h);
}

// kWords 32-bit words from p in the widest loads (p aligned to min(4 kWords, 16) bytes).
template <int kWords>
__device__ __forceinline__ void load_words(const void* p, uint32_t (&w)[kWords]) {
  if constexpr (kWords == 1) {
    w[0] = *static_cast<const uint32_t*>(p);
  } else if constexpr (kWords == 2) {
    const uint2 v = *static_cast<const uint2*>(p);
    w[0] = v.x;
    w[1] = v.y;
  } else {
    static_assert(kWords % 4 == 0, "1, 2 or a multiple of 4 words");
#pragma unroll
    for (int i = 0; i < kWords / 4; ++i) {
      const uint4 v = static_cast<const uint4*>(p)[i];
      w[4 * i] = v.x;
      w[4 * i + 1] = v.y;
      w[4 * i + 2] = v.z;
      w[4 * i + 3] = v.w;
    }
  }
}

// D consecutive elements [i, i + D) of a float array of dtype t, as fp32, in one or two vector loads. The element
// offset i is a multiple of D and the base 16-byte aligned (the glue guarantees it for x and the codebooks).
template <int D>
__device__ __forceinline__ void load_vec(const void* base, DType t, int64_t i, float (&v)[D]) {
  if (t == DType::kF32) {
    uint32_t w[D];
    load_words<D>(static_cast<const float*>(base) + i, w);
#pragma unroll
    for (int e = 0; e < D; ++e) v[e] = __uint_as_float(w[e]);
  } else {
    uint32_t w[D / 2];
    load_words<D / 2>(static_cast<const uint16_t*>(base) + i, w);
#pragma unroll
    for (int e = 0; e < D; ++e) v[e] = b16_to_float((w[e / 2] >> (16 * (e & 1))) & 0xFFFFu, t);
  }
}

// fp32 -> the mma input type, rounded to nearest even.
template <typename T>
__device__ __forceinline__ T to_mma_type(float v);
template <>
__device__ __forceinline__ __half to_mma_type<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 to_mma_type<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Where the batched kernels read codewords: an fp32 copy staged in shared memory, or the tensor itself.
struct CodebookView {
  const float* staged;  // [K, k, d] fp32 in smem, or nullptr
  const void* global;   // [K, k, d] in `type`
  DType type;
  __device__ __forceinline__ float at(int64_t i) const {
    return staged != nullptr ? staged[i] : load_float(global, type, i);
  }
};

__device__ __forceinline__ float row_scale(const DeviceWeights& w, int64_t n) {
  return w.scales != nullptr ? load_float(w.scales, w.scale_type, n) : 1.0f;
}

// W_hat[n, j*d + t] for t < d: scale * (c0 + c1) in fp32, the CPU op's order (vq.h dequant_row), so both round
// the same value.
__device__ __forceinline__ void dequant_group(const DeviceWeights& w, const CodebookView& cb, int64_t n, int64_t j,
                                              float scale, float (&v)[8]) {
  const int64_t d = w.g.d;
  const int64_t flat = n * w.g.positions() + j * w.g.K;
  const int64_t c0 = clamped_code(w, flat) * d;
#pragma unroll
  for (int t = 0; t < 8; ++t) v[t] = t < d ? cb.at(c0 + t) : 0.0f;
  if (w.g.K == 2) {
    const int64_t c1 = (w.g.k + clamped_code(w, flat + 1)) * d;
#pragma unroll
    for (int t = 0; t < 8; ++t) v[t] = t < d ? v[t] + cb.at(c1 + t) : 0.0f;
  }
#pragma unroll
  for (int t = 0; t < 8; ++t) v[t] *= scale;
}

// ---- dequantize ------------------------------------------------------------------------------------------

constexpr int kEltThreads = 256;

// One thread per (row n, group j): d outputs, each rounded once to out_type.
__global__ void __launch_bounds__(kEltThreads) vq_dequantize_kernel(const DeviceWeights w, void* out, DType out_type) {
  const int64_t groups = w.g.groups;
  const int64_t items = w.g.out * groups;
  const CodebookView cb{nullptr, w.codebooks, w.cb_type};
  for (int64_t i = int64_t{blockIdx.x} * kEltThreads + threadIdx.x; i < items; i += int64_t{gridDim.x} * kEltThreads) {
    const int64_t n = i / groups;
    const int64_t j = i % groups;
    float v[8];
    dequant_group(w, cb, n, j, row_scale(w, n), v);
#pragma unroll
    for (int t = 0; t < 8; ++t) {
      if (t < w.g.d) store_float(out, out_type, n * w.g.in() + j * w.g.d + t, v[t]);
    }
  }
}

// Blocks of a grid-stride launch over `items` at `per_block` items per block pass: enough to fill the device
// (kStrideBlocksPerSm per SM), no more.
constexpr int kStrideBlocksPerSm = 8;
unsigned stride_blocks(int64_t items, int64_t per_block) {
  const int64_t fill = int64_t{kStrideBlocksPerSm} * multiprocessor_count();
  return static_cast<unsigned>(min64(ceil_div(items, per_block), fill));
}

// ---- GEMV (m <= kCudaGemvMaxRows) ------------------------------------------------------------------------

constexpr int kGemvThreads = 256;
constexpr int kGemvWarps = kGemvThreads / 32;
constexpr int kLaneCodes = 4;                      // consecutive codes per lane and step: one 4- or 8-byte load
constexpr int kStepCodes = 32 * kLaneCodes;        // codes per warp step along a row
constexpr int kGemvCodebookBytes = 64 * 1024;      // replicated codebook budget: 3 blocks of 256 threads per SM
constexpr int kGemvBlocksPerSm = 2;                // split positions until the grid has this many blocks per SM
constexpr int kGemvMaxSplits = 16;
constexpr int kGemvMinStepsPerSplit = 4;           // keep the per-split setup (codebook fill) amortised

// Output rows per warp: more rows share each lane's x registers; fewer keep m = 4..8 accumulators in registers.
__host__ __device__ constexpr int gemv_warp_rows(int m_tile) { return m_tile <= 2 ? 8 : 4; }
__host__ __device__ constexpr int gemv_block_rows(int m_tile) { return kGemvWarps * gemv_warp_rows(m_tile); }
int gemv_m_tile(int64_t m) { return m <= 1 ? 1 : m <= 2 ? 2 : m <= 4 ? 4 : 8; }

// Copies of the codebook in smem (0: read it from global memory). One codeword load moves d * esize bytes; a
// shared-memory wavefront serves 128 bytes, so 128 / min(bytes, 16) lanes per phase and as many copies make every
// phase conflict-free. Halved until the copies fit the budget.
int gemv_replicas(const Geometry& g, DType cb_type) {
  const int64_t bytes = g.K * g.k * g.d * dtype_bytes(cb_type);
  if (bytes > kGemvCodebookBytes) return 0;
  const int64_t load = g.d * dtype_bytes(cb_type);
  int r = static_cast<int>(128 / (load < 16 ? load : 16));
  while (r > 1 && bytes * r > kGemvCodebookBytes) r /= 2;
  return r;
}

// The 4 codes [p0, p0 + 4) of row n, clamped; 0 for a row >= out or a position >= P. `wide`: one 4-byte (uint8)
// or 8-byte (int16) load, valid when P % 4 == 0 and the codes are aligned (then p0 < P implies p0 + 3 < P).
__device__ __forceinline__ void load_lane_codes(const DeviceWeights& w, int64_t n, int64_t p0, bool wide,
                                                uint32_t (&c)[kLaneCodes]) {
  const int64_t P = w.g.positions();
#pragma unroll
  for (int i = 0; i < kLaneCodes; ++i) c[i] = 0;
  if (n >= w.g.out) return;
  const int64_t flat = n * P + p0;
  if (wide && w.code_type == CodeType::kU8) {
    const uint32_t v = *reinterpret_cast<const uint32_t*>(static_cast<const uint8_t*>(w.codes) + flat);
#pragma unroll
    for (int i = 0; i < kLaneCodes; ++i) c[i] = (v >> (8 * i)) & 0xFFu;
  } else if (wide) {
    const uint2 v = *reinterpret_cast<const uint2*>(static_cast<const uint16_t*>(w.codes) + flat);
    c[0] = v.x & 0xFFFFu;
    c[1] = v.x >> 16;
    c[2] = v.y & 0xFFFFu;
    c[3] = v.y >> 16;
  } else {
#pragma unroll
    for (int i = 0; i < kLaneCodes; ++i) c[i] = p0 + i < P ? read_code(w.codes, w.code_type, flat + i) : 0u;
  }
  const uint32_t last = static_cast<uint32_t>(w.g.k - 1);
#pragma unroll
  for (int i = 0; i < kLaneCodes; ++i) c[i] = c[i] < last ? c[i] : last;
}

// Copies the codebook [K * k codewords][D] into smem as [K * k][R][D], element bits unchanged.
template <int D, typename Bits>
__device__ __forceinline__ void replicate_codebook(Bits* dst, const Bits* src, int64_t codewords, int replicas) {
  const int64_t total = codewords * replicas * D;
  for (int64_t i = threadIdx.x; i < total; i += kGemvThreads) dst[i] = src[(i / (replicas * D)) * D + i % D];
}

template <int D,  // weights per codeword: 2, 4 or 8
          int M>  // rows of x rounded up: 1, 2, 4 or 8; rows >= p.m are never read or stored
__global__ void __launch_bounds__(kGemvThreads, 1)
    vq_gemv_kernel(const LinearParams p, const int replicas, const int64_t per_split) {
  constexpr int kRows = gemv_warp_rows(M);
  extern __shared__ int4 smem_raw[];
  const DeviceWeights& w = p.w;
  const int64_t P = w.g.positions();
  const int64_t in = w.g.in();
  const int64_t k = w.g.k;

  const void* cb = w.codebooks;
  int copies = 1;
  if (replicas > 0) {
    if (dtype_bytes(w.cb_type) == 4) {
      replicate_codebook<D>(reinterpret_cast<uint32_t*>(smem_raw), static_cast<const uint32_t*>(w.codebooks),
                            w.g.K * k, replicas);
    } else {
      replicate_codebook<D>(reinterpret_cast<uint16_t*>(smem_raw), static_cast<const uint16_t*>(w.codebooks),
                            w.g.K * k, replicas);
    }
    __syncthreads();
    cb = smem_raw;
    copies = replicas;
  }

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int copy = lane % copies;
  const int64_t n0 = (int64_t{blockIdx.x} * kGemvWarps + warp) * kRows;
  const int64_t begin = int64_t{blockIdx.y} * per_split;
  const int64_t end = min64(P, begin + per_split);
  const int book_shift = w.g.K == 2 ? 1 : 0;
  const int code_bytes = w.code_type == CodeType::kU8 ? 1 : 2;
  const bool wide = P % kLaneCodes == 0 &&
                    reinterpret_cast<uintptr_t>(w.codes) % (kLaneCodes * code_bytes) == 0;

  float acc[kRows][M] = {};
  for (int64_t p0 = begin + kLaneCodes * lane; p0 < end; p0 += kStepCodes) {
    uint32_t code[kRows][kLaneCodes];
#pragma unroll
    for (int r = 0; r < kRows; ++r) load_lane_codes(w, n0 + r, p0, wide, code[r]);
#pragma unroll
    for (int q = 0; q < kLaneCodes; ++q) {
      const int64_t pos = p0 + q;
      if (pos >= P) break;
      const int64_t j = pos >> book_shift;                      // input group
      const int64_t book = pos & (w.g.K - 1);
      if constexpr (M <= kRows) {  // x of the group stays in registers while the rows' codewords stream by
        float xv[M][D];
#pragma unroll
        for (int mm = 0; mm < M; ++mm) {
          if (mm < p.m) {
            load_vec<D>(p.x, p.x_type, mm * in + j * D, xv[mm]);
          } else {
#pragma unroll
            for (int t = 0; t < D; ++t) xv[mm][t] = 0.0f;
          }
        }
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          float cw[D];
          load_vec<D>(cb, w.cb_type, ((book * k + code[r][q]) * copies + copy) * D, cw);
#pragma unroll
          for (int mm = 0; mm < M; ++mm) {
#pragma unroll
            for (int t = 0; t < D; ++t) acc[r][mm] = fmaf(xv[mm][t], cw[t], acc[r][mm]);
          }
        }
      } else {  // more x rows than output rows: the codewords stay in registers (kRows * D instead of M * D)
        float cw[kRows][D];
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          load_vec<D>(cb, w.cb_type, ((book * k + code[r][q]) * copies + copy) * D, cw[r]);
        }
#pragma unroll
        for (int mm = 0; mm < M; ++mm) {
          if (mm >= p.m) break;  // block-uniform
          float xv[D];
          load_vec<D>(p.x, p.x_type, mm * in + j * D, xv);
#pragma unroll
          for (int r = 0; r < kRows; ++r) {
#pragma unroll
            for (int t = 0; t < D; ++t) acc[r][mm] = fmaf(xv[t], cw[r][t], acc[r][mm]);
          }
        }
      }
    }
  }

  const bool split = gridDim.y > 1;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int mm = 0; mm < M; ++mm) {
      const float sum = warp_sum(acc[r][mm]);
      const int64_t n = n0 + r;
      if (lane != (r * M + mm) % 32 || mm >= p.m || n >= w.g.out) continue;
      if (split) {
        p.workspace[(int64_t{blockIdx.y} * p.m + mm) * w.g.out + n] = sum;
      } else {
        const float b = p.bias != nullptr ? load_float(p.bias, p.bias_type, n) : 0.0f;
        store_float(p.y, p.x_type, mm * w.g.out + n, fmaf(row_scale(w, n), sum, b));
      }
    }
  }
}

// y = scale * (sum of the splits' partials, in split order) + bias, rounded once.
__global__ void __launch_bounds__(kEltThreads) vq_gemv_finish_kernel(const LinearParams p, const int splits) {
  const int64_t out = p.w.g.out;
  const int64_t items = p.m * out;
  for (int64_t i = int64_t{blockIdx.x} * kEltThreads + threadIdx.x; i < items; i += int64_t{gridDim.x} * kEltThreads) {
    const int64_t n = i % out;
    float sum = 0.0f;
    for (int s = 0; s < splits; ++s) sum += p.workspace[s * items + i];
    const float b = p.bias != nullptr ? load_float(p.bias, p.bias_type, n) : 0.0f;
    store_float(p.y, p.x_type, i, fmaf(row_scale(p.w, n), sum, b));
  }
}

// Positions per split: a whole number of warp steps, at least one.
int64_t gemv_per_split(const Geometry& g, int splits) {
  const int64_t steps = ceil_div(g.positions(), kStepCodes);
  return (steps > 0 ? ceil_div(steps, splits) : 1) * kStepCodes;
}

template <int D, int M>
cudaError_t launch_gemv_typed(const LinearParams& p, int splits, cudaStream_t stream) {
  const int replicas = gemv_replicas(p.w.g, p.w.cb_type);
  const size_t smem = replicas > 0 ? size_t(p.w.g.K * p.w.g.k * D * dtype_bytes(p.w.cb_type)) * replicas : 0;
  auto kernel = vq_gemv_kernel<D, M>;
  const cudaError_t err = allow_dynamic_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.w.g.out, gemv_block_rows(M))), static_cast<unsigned>(splits));
  kernel<<<grid, kGemvThreads, smem, stream>>>(p, replicas, gemv_per_split(p.w.g, splits));
  return cudaGetLastError();
}

template <int D>
cudaError_t launch_gemv_rows(const LinearParams& p, int splits, cudaStream_t stream) {
  switch (gemv_m_tile(p.m)) {
    case 1: return launch_gemv_typed<D, 1>(p, splits, stream);
    case 2: return launch_gemv_typed<D, 2>(p, splits, stream);
    case 4: return launch_gemv_typed<D, 4>(p, splits, stream);
    default: return launch_gemv_typed<D, 8>(p, splits, stream);
  }
}

cudaError_t launch_gemv(const LinearParams& p, int splits, cudaStream_t stream) {
  if (splits > 1 && p.workspace == nullptr) return cudaErrorInvalidValue;
  cudaError_t err;
  switch (p.w.g.d) {
    case 2: err = launch_gemv_rows<2>(p, splits, stream); break;
    case 4: err = launch_gemv_rows<4>(p, splits, stream); break;
    default: err = launch_gemv_rows<8>(p, splits, stream); break;
  }
  if (err != cudaSuccess || splits == 1) return err;
  vq_gemv_finish_kernel<<<stride_blocks(p.m * p.w.g.out, kEltThreads), kEltThreads, 0, stream>>>(p, splits);
  return cudaGetLastError();
}

// ---- tensor cores (fp16 / bf16 x) ------------------------------------------------------------------------

constexpr int kMmaThreads = 256;
constexpr int kMmaWarpsN = 4;                // warps along the outputs; 2 along the rows of x
constexpr int kMmaWarpsM = kMmaThreads / 32 / kMmaWarpsN;
constexpr int kBN = kMmaWarpsN * 32;         // outputs per block: 4 n8 tiles per warp
constexpr int kBK = 32;                      // in per k tile: two k16 steps; d in {2, 4, 8} divides it
constexpr int kStages = 3;                   // x tile ring: two tiles in flight while one is used
constexpr int kPad = 8;                      // T after each smem row: 80-byte rows put an ldmatrix's 8 rows on
                                             // distinct bank groups
constexpr int kRowStride = kBK + kPad;
constexpr int kMmaCodebookBytes = 32 * 1024; // fp32 codebook staged in smem up to this, else read from global

__host__ __device__ constexpr int mma_block_rows(int warp_m16) { return kMmaWarpsM * 16 * warp_m16; }
int mma_warp_m16(int64_t m) { return m <= 32 ? 1 : m <= 64 ? 2 : 4; }

size_t mma_codebook_bytes(const Geometry& g) {
  const size_t bytes = size_t(g.K * g.k * g.d) * sizeof(float);
  return bytes <= size_t{kMmaCodebookBytes} ? bytes : 0;
}

size_t mma_smem_bytes(const LinearParams& p) {
  const int rows = mma_block_rows(mma_warp_m16(p.m));
  return (size_t{kStages} * rows + 2 * kBN) * kRowStride * 2 + mma_codebook_bytes(p.w.g);
}

// x[m0 : m0 + kBM, k0 : k0 + kBK] into a stage; rows >= m and columns >= in read nothing and become zeros
// (in % 8 == 0: a 16-byte chunk is all in or all out).
template <int kBM, typename T>
__device__ __forceinline__ void load_x_tile(T* stage, const LinearParams& p, int64_t m0, int64_t k0) {
  constexpr int kChunks = kBK / 8;
  const int64_t in = p.w.g.in();
  const T* x = static_cast<const T*>(p.x);
  for (int i = threadIdx.x; i < kBM * kChunks; i += kMmaThreads) {
    const int r = i / kChunks;
    const int cc = i % kChunks;
    const int64_t row = m0 + r;
    const int64_t col = k0 + 8 * cc;
    const bool ok = row < p.m && col < in;
    mma::cp_async16(stage + r * kRowStride + 8 * cc, ok ? x + row * in + col : x, ok);
  }
}

// W_hat[n0 : n0 + kBN, k0 : k0 + kBK] rounded to T into smem [kBN][kRowStride]; zeros past out and in (the
// zero-filled x columns must meet finite weights).
template <typename T>
__device__ __forceinline__ void dequant_w_tile(T* dst, const LinearParams& p, const CodebookView& cb, int64_t n0,
                                               int64_t k0) {
  const DeviceWeights& w = p.w;
  const int d = static_cast<int>(w.g.d);
  const int per_row = kBK / d;
  const int64_t j0 = k0 / d;
  for (int i = threadIdx.x; i < kBN * per_row; i += kMmaThreads) {
    const int r = i / per_row;
    const int gi = i % per_row;
    const int64_t n = n0 + r;
    const int64_t j = j0 + gi;
    float v[8] = {};
    if (n < w.g.out && j < w.g.groups) dequant_group(w, cb, n, j, row_scale(w, n), v);
#pragma unroll
    for (int t = 0; t < 8; ++t) {
      if (t < d) dst[r * kRowStride + gi * d + t] = to_mma_type<T>(v[t]);
    }
  }
}

template <typename T,       // x, y and mma input type: __half or __nv_bfloat16
          int kWarpM16>     // m16 tiles per warp: 1, 2 or 4 (block rows 32, 64 or 128)
__global__ void __launch_bounds__(kMmaThreads) vq_mma_kernel(const LinearParams p, const bool stage_codebook) {
  constexpr int kBM = mma_block_rows(kWarpM16);
  extern __shared__ int4 smem_raw[];
  T* const xs = reinterpret_cast<T*>(smem_raw);                 // [kStages][kBM][kRowStride]
  T* const ws = xs + kStages * kBM * kRowStride;                 // [2][kBN][kRowStride]
  float* const cbs = reinterpret_cast<float*>(ws + 2 * kBN * kRowStride);  // [K * k * d] when staged

  const DeviceWeights& w = p.w;
  const int64_t in = w.g.in();
  const int64_t m0 = int64_t{blockIdx.x} * kBM;  // consecutive blocks share a column tile: its codes stay in L2
  const int64_t n0 = int64_t{blockIdx.y} * kBN;
  const int tiles = static_cast<int>(ceil_div(in, kBK));

  if (stage_codebook) {
    const int64_t count = w.g.K * w.g.k * w.g.d;
    for (int64_t i = threadIdx.x; i < count; i += kMmaThreads) cbs[i] = load_float(w.codebooks, w.cb_type, i);
  }
  const CodebookView cb{stage_codebook ? cbs : nullptr, w.codebooks, w.cb_type};
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < tiles) load_x_tile<kBM>(xs + s * kBM * kRowStride, p, m0, int64_t{s} * kBK);
    mma::cp_async_commit();
  }
  __syncthreads();  // the staged codebook is complete before the first dequantize

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int warp_m = warp / kMmaWarpsN;
  const int warp_n = warp % kMmaWarpsN;
  // ldmatrix row addresses of this lane. A (x, row-major m16 x k16): matrices (rows 0-7 | 8-15) x (k 0-7 | 8-15)
  // in the fragment's register order a0..a3. B (W_hat rows n, k contiguous = the col-major k16 x n8 operand):
  // matrices (n tile 2 np, k 0-7), (2 np, k 8-15), (2 np + 1, k 0-7), (2 np + 1, k 8-15) = b0, b1 of two tiles.
  const int a_lane = (warp_m * 16 * kWarpM16 + lane % 16) * kRowStride + (lane / 16) * 8;
  const int b_lane = (warp_n * 32 + (lane / 16) * 8 + lane % 8) * kRowStride + ((lane / 8) % 2) * 8;

  float acc[kWarpM16][4][4] = {};
  for (int i = 0; i < tiles; ++i) {
    T* const wt = ws + (i & 1) * kBN * kRowStride;  // last read in iteration i - 2, before barrier i - 1
    dequant_w_tile<T>(wt, p, cb, n0, int64_t{i} * kBK);
    mma::cp_async_wait<kStages - 2>();  // this thread's copies of x tile i have landed ...
    __syncthreads();                    // ... everyone's, W tile i is complete, and stage i - 1 is free
    if (i + kStages - 1 < tiles) {
      load_x_tile<kBM>(xs + ((i + kStages - 1) % kStages) * kBM * kRowStride, p, m0, int64_t{i + kStages - 1} * kBK);
    }
    mma::cp_async_commit();

    const T* const xt = xs + (i % kStages) * kBM * kRowStride;
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk) {
      uint32_t a[kWarpM16][4];
#pragma unroll
      for (int mi = 0; mi < kWarpM16; ++mi) mma::ldmatrix_x4(a[mi], xt + a_lane + mi * 16 * kRowStride + kk * 16);
#pragma unroll
      for (int np = 0; np < 2; ++np) {
        uint32_t b[4];
        mma::ldmatrix_x4(b, wt + b_lane + np * 16 * kRowStride + kk * 16);
#pragma unroll
        for (int mi = 0; mi < kWarpM16; ++mi) {
          mma::mma_16816<T>(acc[mi][2 * np], a[mi], b[0], b[1]);
          mma::mma_16816<T>(acc[mi][2 * np + 1], a[mi], b[2], b[3]);
        }
      }
    }
  }
  mma::cp_async_wait<0>();  // only empty groups can be pending; leave nothing in flight

  // Accumulator e of (mi, ni): row gid (+ 8 for e >= 2), column 2 tig + e % 2 of the 16 x 8 tile.
  const int gid = lane / 4;
  const int tig = lane % 4;
#pragma unroll
  for (int ni = 0; ni < 4; ++ni) {
#pragma unroll
    for (int e2 = 0; e2 < 2; ++e2) {
      const int64_t n = n0 + warp_n * 32 + ni * 8 + 2 * tig + e2;
      if (n >= w.g.out) continue;
      const float b = p.bias != nullptr ? load_float(p.bias, p.bias_type, n) : 0.0f;
#pragma unroll
      for (int mi = 0; mi < kWarpM16; ++mi) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int64_t row = m0 + warp_m * 16 * kWarpM16 + mi * 16 + gid + 8 * h;
          if (row < p.m) store_float(p.y, p.x_type, row * w.g.out + n, acc[mi][ni][2 * h + e2] + b);
        }
      }
    }
  }
}

bool mma_supported(const LinearParams& p) {
  if (p.x_type != DType::kF16 && p.x_type != DType::kBF16) return false;
  if (p.w.g.in() % 8 != 0 || !aligned16(p.x)) return false;
  return mma_smem_bytes(p) <= static_cast<size_t>(max_dynamic_smem());
}

template <typename T, int kWarpM16>
cudaError_t launch_mma_typed(const LinearParams& p, cudaStream_t stream) {
  const size_t smem = mma_smem_bytes(p);
  auto kernel = vq_mma_kernel<T, kWarpM16>;
  const cudaError_t err = allow_dynamic_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.m, mma_block_rows(kWarpM16))),
                  static_cast<unsigned>(ceil_div(p.w.g.out, kBN)));
  kernel<<<grid, kMmaThreads, smem, stream>>>(p, mma_codebook_bytes(p.w.g) > 0);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_mma_rows(const LinearParams& p, cudaStream_t stream) {
  switch (mma_warp_m16(p.m)) {
    case 1: return launch_mma_typed<T, 1>(p, stream);
    case 2: return launch_mma_typed<T, 2>(p, stream);
    default: return launch_mma_typed<T, 4>(p, stream);
  }
}

// ---- CUDA-core tiles (fp32 x and the rest) ---------------------------------------------------------------

constexpr int kSimtTile = 64;                 // rows of x and outputs per block
constexpr int kSimtBK = 16;                   // in per k tile (d divides it)
constexpr int kSimtThreads = 256;             // 16 x 16 threads, 4 x 4 outputs each
constexpr int kSimtStride = kSimtTile + 4;    // floats per smem row: the transposed stores spread over banks
constexpr size_t kSimtSmem = size_t{2} * kSimtBK * kSimtStride * sizeof(float);

__global__ void __launch_bounds__(kSimtThreads) vq_simt_kernel(const LinearParams p) {
  extern __shared__ int4 smem_raw[];
  float* const xs = reinterpret_cast<float*>(smem_raw);   // [kSimtBK][kSimtStride]: x tile, k-major
  float* const ws = xs + kSimtBK * kSimtStride;           // [kSimtBK][kSimtStride]: W_hat tile, k-major
  const DeviceWeights& w = p.w;
  const int64_t in = w.g.in();
  const int d = static_cast<int>(w.g.d);
  const int64_t m0 = int64_t{blockIdx.x} * kSimtTile;
  const int64_t n0 = int64_t{blockIdx.y} * kSimtTile;
  const int tx = threadIdx.x % 16;  // output columns 4 tx .. 4 tx + 3
  const int ty = threadIdx.x / 16;  // rows 4 ty .. 4 ty + 3
  const CodebookView cb{nullptr, w.codebooks, w.cb_type};

  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < in; k0 += kSimtBK) {
    for (int i = threadIdx.x; i < kSimtTile * kSimtBK; i += kSimtThreads) {
      const int r = i / kSimtBK;
      const int kk = i % kSimtBK;
      const int64_t row = m0 + r;
      const int64_t col = k0 + kk;
      xs[kk * kSimtStride + r] = row < p.m && col < in ? load_float(p.x, p.x_type, row * in + col) : 0.0f;
    }
    const int per_row = kSimtBK / d;
    for (int i = threadIdx.x; i < kSimtTile * per_row; i += kSimtThreads) {
      const int r = i / per_row;
      const int gi = i % per_row;
      const int64_t n = n0 + r;
      const int64_t j = k0 / d + gi;
      float v[8] = {};
      if (n < w.g.out && j < w.g.groups) dequant_group(w, cb, n, j, row_scale(w, n), v);
#pragma unroll
      for (int t = 0; t < 8; ++t) {
        if (t < d) ws[(gi * d + t) * kSimtStride + r] = v[t];
      }
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kSimtBK; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        a[i] = xs[kk * kSimtStride + 4 * ty + i];
        b[i] = ws[kk * kSimtStride + 4 * tx + i];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) acc[i][jj] = fmaf(a[i], b[jj], acc[i][jj]);
      }
    }
    __syncthreads();  // everyone is done with the tiles before the next refill
  }
#pragma unroll
  for (int jj = 0; jj < 4; ++jj) {
    const int64_t n = n0 + 4 * tx + jj;
    if (n >= w.g.out) continue;
    const float b = p.bias != nullptr ? load_float(p.bias, p.bias_type, n) : 0.0f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t row = m0 + 4 * ty + i;
      if (row < p.m) store_float(p.y, p.x_type, row * w.g.out + n, acc[i][jj] + b);
    }
  }
}

// ---- backward --------------------------------------------------------------------------------------------

constexpr int kRowWarps = 8;  // rows (or codewords) per block of the warp-per-item kernels

// grad[n] = unscaled W_hat[n, :] . t[n, :], a warp per row.
__global__ void __launch_bounds__(kRowWarps * 32) vq_grad_scales_kernel(const float* t, const DeviceWeights w,
                                                                       float* grad) {
  const int lane = threadIdx.x % 32;
  const CodebookView cb{nullptr, w.codebooks, w.cb_type};
  for (int64_t n = int64_t{blockIdx.x} * kRowWarps + threadIdx.x / 32; n < w.g.out;
       n += int64_t{gridDim.x} * kRowWarps) {
    const float* trow = t + n * w.g.in();
    float sum = 0.0f;
    for (int64_t j = lane; j < w.g.groups; j += 32) {
      float v[8];
      dequant_group(w, cb, n, j, 1.0f, v);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        if (e < w.g.d) sum = fmaf(v[e], trow[j * w.g.d + e], sum);
      }
    }
    sum = warp_sum(sum);
    if (lane == 0) grad[n] = sum;
  }
}

// grad[s] (s = book * k + c) = sum over its code positions of scales[n] * t[n, group]: a warp per codeword, lane
// l takes list entries l, l + 32, ... in order, then a fixed butterfly: the same sum on every run.
__global__ void __launch_bounds__(kRowWarps * 32) vq_grad_codebooks_kernel(const float* t, const DeviceWeights w,
                                                                          const int64_t* order, const int64_t* offsets,
                                                                          float* grad) {
  const int lane = threadIdx.x % 32;
  const int64_t P = w.g.positions();
  const int64_t d = w.g.d;
  for (int64_t s = int64_t{blockIdx.x} * kRowWarps + threadIdx.x / 32; s < w.g.K * w.g.k;
       s += int64_t{gridDim.x} * kRowWarps) {
    float acc[8] = {};
    for (int64_t i = offsets[s] + lane; i < offsets[s + 1]; i += 32) {
      const int64_t e = order[i];
      const int64_t n = e / P;
      const float* src = t + n * w.g.in() + (e % P) / w.g.K * d;
      const float sc = row_scale(w, n);
#pragma unroll
      for (int q = 0; q < 8; ++q) {
        if (q < d) acc[q] = fmaf(sc, src[q], acc[q]);
      }
    }
#pragma unroll
    for (int q = 0; q < 8; ++q) {
      if (q >= d) break;  // d is warp-uniform
      const float sum = warp_sum(acc[q]);
      if (lane == 0) grad[s * d + q] = sum;
    }
  }
}

}  // namespace

// ---- launchers -------------------------------------------------------------------------------------------

LinearPath linear_path(const LinearParams& p) {
  if (p.m <= kCudaGemvMaxRows) return LinearPath::kGemv;
  return mma_supported(p) ? LinearPath::kMma : LinearPath::kSimt;
}

// Split the positions when the row blocks alone give fewer than kGemvBlocksPerSm blocks per SM, keeping at least
// kGemvMinStepsPerSplit warp steps per split.
int gemv_splits(const LinearParams& p) {
  const int64_t row_blocks = ceil_div(p.w.g.out, gemv_block_rows(gemv_m_tile(p.m)));
  const int64_t steps = ceil_div(p.w.g.positions(), kStepCodes);
  const int64_t target = int64_t{kGemvBlocksPerSm} * multiprocessor_count();
  if (row_blocks <= 0 || row_blocks >= target || steps < 2 * kGemvMinStepsPerSplit) return 1;
  const int64_t wanted = min64(min64(ceil_div(target, row_blocks), steps / kGemvMinStepsPerSplit), kGemvMaxSplits);
  const int64_t per_split = gemv_per_split(p.w.g, static_cast<int>(wanted));
  return static_cast<int>(ceil_div(p.w.g.positions(), per_split));  // no empty trailing split
}

cudaError_t launch_vq_linear(const LinearParams& p, LinearPath path, int splits, cudaStream_t stream) {
  if (p.m <= 0 || p.w.g.out <= 0) return cudaSuccess;
  switch (path) {
    case LinearPath::kGemv:
      if (p.m > kCudaGemvMaxRows || splits < 1 || splits > kGemvMaxSplits) return cudaErrorInvalidValue;
      return launch_gemv(p, splits, stream);
    case LinearPath::kMma:
      if (!mma_supported(p)) return cudaErrorInvalidValue;
      return p.x_type == DType::kF16 ? launch_mma_rows<__half>(p, stream) : launch_mma_rows<__nv_bfloat16>(p, stream);
    default: {
      const dim3 grid(static_cast<unsigned>(ceil_div(p.m, kSimtTile)),
                      static_cast<unsigned>(ceil_div(p.w.g.out, kSimtTile)));
      vq_simt_kernel<<<grid, kSimtThreads, kSimtSmem, stream>>>(p);
      return cudaGetLastError();
    }
  }
}

cudaError_t launch_vq_dequantize(const DeviceWeights& w, void* out, DType out_type, cudaStream_t stream) {
  const int64_t items = w.g.out * w.g.groups;
  if (items == 0) return cudaSuccess;
  vq_dequantize_kernel<<<stride_blocks(items, kEltThreads), kEltThreads, 0, stream>>>(w, out, out_type);
  return cudaGetLastError();
}

cudaError_t launch_vq_grad_scales(const float* t, const DeviceWeights& w, float* grad, cudaStream_t stream) {
  if (w.g.out == 0) return cudaSuccess;
  vq_grad_scales_kernel<<<stride_blocks(w.g.out, kRowWarps), kRowWarps * 32, 0, stream>>>(t, w, grad);
  return cudaGetLastError();
}

cudaError_t launch_vq_grad_codebooks(const float* t, const DeviceWeights& w, const int64_t* order,
                                     const int64_t* offsets, float* grad, cudaStream_t stream) {
  const int64_t codewords = w.g.K * w.g.k;
  vq_grad_codebooks_kernel<<<stride_blocks(codewords, kRowWarps), kRowWarps * 32, 0, stream>>>(t, w, order, offsets,
                                                                                             grad);
  return cudaGetLastError();
}

}  // namespace blockops::vq
