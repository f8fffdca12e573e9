// Block-sparse attention forward for Hopper (sm_90a): wgmma + TMA + mbarriers, FlashAttention-3's structure, driven
// by the same block lists and with the same numerics as attention_mma_fwd.cu (csrc/attention.h: base-2 online
// softmax, empty rows, NaN / Inf rules). Every Hopper instruction comes from hopper_ptx.cuh; descriptors and the
// swizzle from hopper_layout.cuh.
//
// Shapes it takes (fwd_wgmma_supported; everything else keeps the Ampere kernels): fp16 / bf16, D == Dv in
// {64, 128, 256}, block_q in {64, 128} (one consumer warpgroup per 64 query rows), block_kv in {64, 128} (walked in
// chunks of kKeys = 64 keys; a chunk wholly past Tk is skipped), q / k / v describable by a 3-D tensor map (below).
//
// fwd_wgmma_kernel<T, kHead, kGroups>: one CTA per (query block qb, head h, batch b), 128 (1 + kGroups) threads:
//   warpgroup 0 = producer: setmaxnreg down; one thread issues every TMA load: Q once (q_full), then for each chunk
//     i of the listed key blocks (partial list, then full list; entries failing list_entry_ok skipped) K into
//     stage s = i % kStages (k_full[s]) and V (v_full[s]), after waiting for kv_empty[s] to free the stage.
//   warpgroups 1..kGroups = consumers: setmaxnreg up; warpgroup g owns query rows 64 (g - 1) .. of the block.
//     Per chunk:
//     S = Q K^T          wgmma_ss<T, 64>, A = Q (K-major), B = K (K-major: stored [key][d]), kHead / 16 k-steps
//     mask (bit tile of partial blocks, key >= Tk), scale to base 2, online softmax on the accumulators (a quad of
//     lanes holds a row), O *= alpha
//     O += P V           wgmma_rs<T, kHead, kTransB = true>: P's accumulators rounded to T are the A fragments,
//                        V MN-major (stored [key][d], d contiguous), 4 k-steps of 16 keys
//     (a partial block, or the chunk past Tk, whose V holds a NaN / Inf adds P V over its visible pairs only, scalar,
//     so that P = 0 times a hidden key's NaN never reaches a row: the Ampere kernel's pv_visible_pairs rule)
//     every consumer thread arrives on kv_empty[s] once the chunk's P V has retired.
//     Schedule (kOverlap, D <= 128; FlashAttention-3's intra-warpgroup overlap): S of chunk i + 1 and P V of chunk i
//     are issued back to back, wait<1> retires S, the softmax of chunk i + 1 runs while P V is in flight, wait<0>,
//     then O *= alpha. At D = 256 O, S and P do not fit the registers together: P V of chunk i, then S of chunk i + 1.
//   out = O / l, lse = (m + log2 l) / log2(e); a row with no visible key: out 0, lse -inf (stored from registers).
//
// Shared memory (dynamic, aligned up to 1024 bytes here): every tile is stored as slabs of 64 columns (128 bytes per
// row, SWIZZLE_128B as TMA writes it: 16-byte chunk c of row r at c ^ (r % 8)), a slab 1024-byte aligned:
//   Q  [kHead / 64 slabs][block_q rows][128 B]
//   K  [kStages][kHead / 64 slabs][64 keys][128 B]      V  the same
//   mbarriers q_full, k_full[kStages], v_full[kStages], kv_empty[kStages]
// Descriptors (hopper_layout.cuh, common layouts of the PTX ISA): K-major Q / K: start slab(ks / 4) + 32 (ks % 4)
// bytes, SBO 1024 (8 rows of 128 B), swizzle 128B; MN-major V: start + 16 kk rows, LBO = one slab (64 keys x 128 B,
// the distance between 64-column groups along N), SBO 1024 (next 8 keys).
//
// Tensor maps (built by the launcher from FwdParams' strides): each of q, k, v is viewed as 3-D, innermost first,
//   (D, T, B * H) with coordinates (d, t, b H + h)   when b-stride == H * h-stride (or B == 1 or H == 1), or
//   (D, H, B * T) with coordinates (d, h, b T + t)   when b-stride == T * t-stride (the [B, T, H, D] layout).
// In the first view rows past T are zero-filled by TMA; in the second they are the next batch's rows (or zeros past
// the tensor): harmless for Q (rows are independent and never stored) and masked for K / V (hidden keys; the chunk
// past Tk takes the non-finite V check like a partial block).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "attention_launch.h"
#include "device_common.cuh"

#if defined(BLOCKOPS_HAVE_CUTE)
#include "hopper_ptx.cuh"

namespace blockops::attention {
namespace {

namespace hw = blockops::hopper;

constexpr int kRowsPerGroup = 64;  // query rows of one consumer warpgroup (wgmma M)
constexpr int kKeys = 64;          // keys per pipeline stage: N of S = Q K^T, 4 k-steps of P V
constexpr int kSlabCols = 64;      // fp16 / bf16 columns of one 128-byte swizzled row
constexpr int kMaxGridYZ = 65535;

// Pipeline stages of K / V: three where shared memory allows, two at D = 256 (and at D = 128 with one consumer
// warpgroup, so that two CTAs fit an SM's 228 KB).
__host__ __device__ constexpr int stages_of(int head, int groups) {
  return head == 256 || (head == 128 && groups == 1) ? 2 : 3;
}
// Bytes of one stage of K (or V): kHead / 64 slabs of kKeys rows.
__host__ __device__ constexpr int kv_stage_bytes(int head) { return kKeys * head * 2; }
__host__ __device__ constexpr int q_bytes(int head, int groups) { return kRowsPerGroup * groups * head * 2; }
// Dynamic shared memory: 1024 bytes of slack for the alignment, the tiles, the mbarriers.
__host__ __device__ constexpr int smem_bytes_of(int head, int groups) {
  return 1024 + q_bytes(head, groups) + 2 * stages_of(head, groups) * kv_stage_bytes(head) +
         8 * (1 + 3 * stages_of(head, groups));
}

// Registers per thread: the launch bounds set what ptxas compiles the whole kernel with (the consumers' code
// included, so it must hold a wgmma's accumulators: 168 at D = 256), setmaxnreg then moves registers from the
// producer warpgroup (whose one working thread needs few) to the consumers (O: kHead / 2 floats, S 32, P 16).
//   block_q 128: 384 threads x 168 (one CTA per SM) = 128 x 24 + 256 x 240;
//   block_q 64, D <= 128: 256 threads x 128, two CTAs per SM (where shared memory allows: the second CTA's softmax
//     overlaps the first one's wgmma) = 128 x 24 + 128 x 232;
//   block_q 64, D = 256: bounds of 384 threads (launched with 256) for 168 per thread; consumers go to 240.
template <int kHead, int kGroups>
constexpr int kBoundThreads = kGroups == 1 && kHead == 256 ? 384 : 128 * (kGroups + 1);
template <int kHead, int kGroups> constexpr int kMinCtas = kGroups == 1 && kHead <= 128 ? 2 : 1;
template <int kHead, int kGroups> constexpr int kProducerRegs = 24;
template <int kHead, int kGroups> constexpr int kConsumerRegs = kGroups == 1 && kHead <= 128 ? 232 : 240;

// Where q, k or v sits in its 3-D tensor map (file comment): coordinates of row t of (b, h).
struct MapView {
  bool bt;        // (D, H, B * T) instead of (D, T, B * H)
  int64_t heads;  // H of this tensor (H for q, Hk for k / v)
  int64_t len;    // T of this tensor
};

// The kernel's parameter block (__grid_constant__: the tensor maps must live in parameter memory).
struct WgmmaArgs {
  hw::TensorMap q_map, k_map, v_map;
  FwdParams p;
  MapView q_view, k_view, v_view;
};

#if BLOCKOPS_HOPPER_DEVICE  // the kernel's helpers: only where its body is compiled (sm_90a and the host pass)

constexpr int kRowBytes = 128;  // one swizzled row of a slab

// The tensor-map coordinates (after the column) of row t of (b, h) in `view`.
__device__ __forceinline__ int map_c1(const MapView& view, int64_t h, int64_t t) {
  return static_cast<int>(view.bt ? h : t);
}
__device__ __forceinline__ int map_c2(const MapView& view, int64_t b, int64_t h, int64_t t) {
  return static_cast<int>(view.bt ? b * view.len + t : b * view.heads + h);
}

// Chunks of kKeys keys the walk visits in key block kb: block_kv / kKeys, fewer in a last block that ends early
// (a chunk wholly past Tk is neither loaded nor computed). The producer and the consumers count alike.
__device__ __forceinline__ int chunks_of(const FwdParams& p, int64_t kb) {
  const int64_t left = p.kv_len - kb * p.mask.block_kv;  // >= 1 for a listed block
  const int full = p.mask.block_kv / kKeys;
  return left >= int64_t{full} * kKeys ? full : static_cast<int>((left + kKeys - 1) / kKeys);
}

// K-major descriptor (Q, K) of k-step ks of a tile whose 64-column slabs are `slab_bytes` apart.
__device__ __forceinline__ uint64_t kmajor_desc(uint32_t tile, int slab_bytes, int ks) {
  return hw::smem_descriptor(tile + (ks / 4) * slab_bytes + 32 * (ks % 4), 16, 1024, hw::SmemSwizzle::k128B);
}
// MN-major descriptor (V) of k-step kk (keys 16 kk ..) of one stage.
__device__ __forceinline__ uint64_t vmajor_desc(uint32_t stage, int kk) {
  return hw::smem_descriptor(stage + kk * 16 * kRowBytes, kKeys * kRowBytes, 1024, hw::SmemSwizzle::k128B);
}

// True on every lane when any lane's flag is set.
__device__ __forceinline__ bool warp_any(bool flag) {
  int f = flag ? 1 : 0;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) f |= __shfl_xor_sync(kFullMask, f, off);
  return f != 0;
}

// Does a V stage (kKeys x kHead elements of T, any layout) hold a NaN or Inf? Each warp scans the whole stage, so
// the four warps of a warpgroup reach the same answer (they must agree on issuing the wgmma).
template <typename T, int kHead>
__device__ __forceinline__ bool stage_nonfinite(const uint8_t* stage, int lane) {
  constexpr uint32_t kExp = std::is_same_v<T, __half> ? 0x7C00u : 0x7F80u;  // all-ones exponent: Inf or NaN
  constexpr int kVecs = kv_stage_bytes(kHead) / 16;
  bool found = false;
  for (int i = lane; i < kVecs; i += 32) {
    const uint4 x = reinterpret_cast<const uint4*>(stage)[i];
    const uint32_t w[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) found |= (w[j] & kExp) == kExp || ((w[j] >> 16) & kExp) == kExp;
  }
  return warp_any(found);
}

// What the consumers keep of one chunk of keys from its S = Q K^T to its O += P V.
struct Chunk {
  int stage;
  uint32_t phase;       // parity of the stage's full barriers for this use
  int tile;             // bit tile id, -1: full block
  int64_t keys_left;    // Tk minus the chunk's first key: keys c >= keys_left are past Tk
  uint32_t bits[2][2];  // [row half][word]: visibility of keys 0-31, 32-63 of the chunk (all ones: full block)
};

// The chunk's bit-tile words for the thread's rows row0, row0 + 8 of the block (c0: the chunk's first key column).
__device__ __forceinline__ void load_bits(Chunk& ch, const FwdParams& p, int row0, int c0) {
  ch.bits[0][0] = ch.bits[0][1] = ch.bits[1][0] = ch.bits[1][1] = ~0u;
  if (ch.tile >= 0) {
    const MaskDims& m = p.mask;
    const int32_t* t_rows = p.tiles + (int64_t{ch.tile} * m.block_q + row0) * m.words() + c0 / 32;
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      ch.bits[hr][0] = static_cast<uint32_t>(t_rows[8 * hr * m.words()]);
      ch.bits[hr][1] = static_cast<uint32_t>(t_rows[8 * hr * m.words() + 1]);
    }
  }
}

// Issues S = Q K^T for the warpgroup's 64 rows (q: its rows in the first slab) and one stage of K (not committed).
template <typename T, int kHead>
__device__ __forceinline__ void issue_s(float (&sacc)[kKeys / 2], uint32_t q, int q_slab_bytes, uint32_t k_stage) {
#pragma unroll
  for (int ks = 0; ks < kHead / 16; ++ks) {
    hw::wgmma_ss<T, kKeys, false>(sacc, kmajor_desc(q, q_slab_bytes, ks), kmajor_desc(k_stage, kKeys * kRowBytes, ks),
                                  true);
  }
}

// Issues O += P V for one stage of V (not committed).
template <typename T, int kHead>
__device__ __forceinline__ void issue_pv(float (&o)[kHead / 2], const uint32_t (&pa)[kKeys / 16][4],
                                         uint32_t v_stage) {
#pragma unroll
  for (int kk = 0; kk < kKeys / 16; ++kk) hw::wgmma_rs<T, kHead, true>(o, pa[kk], vmajor_desc(v_stage, kk), true);
}

// Hides keys (bit tile, key past Tk), scales to base 2 and runs the online softmax over the chunk: sacc becomes P
// (fp32), row_max / row_sum advance, alpha is the factor O must be multiplied by before this chunk's P V is added.
// sacc[4 j + r]: row row0 + 8 (r / 2), key 8 j + 2 tig + r % 2; a quad (4 lanes) holds one row.
__device__ __forceinline__ void softmax_chunk(float (&sacc)[kKeys / 2], const Chunk& ch, float scale_log2, int tig,
                                              float (&row_max)[2], float (&row_sum)[2], float (&alpha)[2]) {
#pragma unroll
  for (int j = 0; j < kKeys / 8; ++j) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int c = 8 * j + 2 * tig + (r & 1);
      const bool visible = c < ch.keys_left && ((ch.bits[r >> 1][j / 4] >> (c % 32)) & 1u);
      sacc[4 * j + r] = visible ? sacc[4 * j + r] * scale_log2 : -INFINITY;
    }
  }
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    float mx = row_max[hr];
#pragma unroll
    for (int j = 0; j < kKeys / 8; ++j) mx = fmaxf(mx, fmaxf(sacc[4 * j + 2 * hr], sacc[4 * j + 2 * hr + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 2));
    const float base_m = mx == -INFINITY ? 0.0f : mx;  // all hidden so far: exp2(-inf - 0) = 0, never NaN
    alpha[hr] = exp2f(row_max[hr] - base_m);
    row_max[hr] = mx;
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < kKeys / 8; ++j) {
      sacc[4 * j + 2 * hr] = exp2f(sacc[4 * j + 2 * hr] - base_m);
      sacc[4 * j + 2 * hr + 1] = exp2f(sacc[4 * j + 2 * hr + 1] - base_m);
      sum += sacc[4 * j + 2 * hr] + sacc[4 * j + 2 * hr + 1];
    }
    row_sum[hr] = row_sum[hr] * alpha[hr] + sum;
  }
}

// O *= alpha, per row half.
template <int kHead>
__device__ __forceinline__ void rescale(float (&o)[kHead / 2], const float (&alpha)[2]) {
#pragma unroll
  for (int j = 0; j < kHead / 8; ++j) {
    o[4 * j + 0] *= alpha[0];
    o[4 * j + 1] *= alpha[0];
    o[4 * j + 2] *= alpha[1];
    o[4 * j + 3] *= alpha[1];
  }
}

// P as the A fragments of the 4 k-steps of P V (keys 16 kk ..): n-tiles 2 kk, 2 kk + 1 of S (mma.sync's m16n8 C
// layout is the m16n8k16 A layout of the next product), rounded to T.
template <typename T>
__device__ __forceinline__ void p_fragments(uint32_t (&pa)[kKeys / 16][4], const float (&sacc)[kKeys / 2]) {
#pragma unroll
  for (int kk = 0; kk < kKeys / 16; ++kk) {
    pa[kk][0] = pack2<T>(sacc[8 * kk + 0], sacc[8 * kk + 1]);
    pa[kk][1] = pack2<T>(sacc[8 * kk + 2], sacc[8 * kk + 3]);
    pa[kk][2] = pack2<T>(sacc[8 * kk + 4], sacc[8 * kk + 5]);
    pa[kk][3] = pack2<T>(sacc[8 * kk + 6], sacc[8 * kk + 7]);
  }
}

// O += P V over the chunk's visible (row, key) pairs only: the path of a chunk whose V holds a NaN / Inf, where the
// wgmma would add P = 0 times it into rows that cannot see the key (csrc/attention.h "NaN / Inf"; the Ampere
// kernel's pv_visible_pairs, here on swizzled V slabs). For each key c the quad lane holding P[row][c] (in pa,
// rounded to T as the wgmma's A) shares it; each lane adds it times V[c] into its output columns
// 8 j + 2 tig + {0, 1}, skipping hidden pairs. Scalar and slow; a visible pair multiplies as the wgmma would.
template <typename T, int kHead>
__device__ __forceinline__ void pv_visible_pairs(float (&o)[kHead / 2], const uint32_t (&pa)[kKeys / 16][4],
                                                 const uint8_t* v_stage, const Chunk& ch, int lane) {
  const int tig = lane % 4;
  for (int c = 0; c < kKeys; ++c) {
    const int src = (lane & ~3) | ((c % 8) / 2);
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      uint32_t word = 0;  // pa[c / 16][2 ((c % 16) / 8) + hr] without a runtime register index
#pragma unroll
      for (int kk = 0; kk < kKeys / 16; ++kk) {
        const uint32_t lo = pa[kk][hr], hi = pa[kk][2 + hr];
        if (kk == c / 16) word = (c % 16) < 8 ? lo : hi;
      }
      T pair[2];
      memcpy(pair, &word, sizeof(word));
      const float lo = to_float(pair[0]), hi = to_float(pair[1]);  // constant indices: pair stays in registers
      const float pr = __shfl_sync(kFullMask, c % 2 ? hi : lo, src);
      const uint32_t bits = c < 32 ? ch.bits[hr][0] : ch.bits[hr][1];
      if (c >= ch.keys_left || !((bits >> (c % 32)) & 1u)) continue;  // after the shuffle: every lane takes part
#pragma unroll
      for (int j = 0; j < kHead / 8; ++j) {
        const T* v_pair = reinterpret_cast<const T*>(v_stage + (j / 8) * kKeys * kRowBytes +
                                                     hw::sw128_offset(c, j % 8) + 4 * tig);
        o[4 * j + 2 * hr] += pr * to_float(v_pair[0]);
        o[4 * j + 2 * hr + 1] += pr * to_float(v_pair[1]);
      }
    }
  }
}

// Whether chunk ch's P V takes pv_visible_pairs: a partial block, or the chunk reaching past Tk, whose V holds a
// NaN / Inf (rare). Warp-uniform, and the same in the four warps of a warpgroup (each scans the whole stage).
template <typename T, int kHead>
__device__ __forceinline__ bool needs_visible_pairs(const Chunk& ch, const uint8_t* v_stage, int lane) {
  return (ch.tile >= 0 || ch.keys_left < kKeys) && stage_nonfinite<T, kHead>(v_stage, lane);
}

#endif  // BLOCKOPS_HOPPER_DEVICE

template <typename T,     // __half or __nv_bfloat16
          int kHead,      // D == Dv: 64, 128 or 256
          int kGroups>    // consumer warpgroups: block_q / 64
__global__ void __launch_bounds__(kBoundThreads<kHead, kGroups>, kMinCtas<kHead, kGroups>)
    fwd_wgmma_kernel(const __grid_constant__ WgmmaArgs a) {
#if BLOCKOPS_HOPPER_DEVICE
  constexpr int kStages = stages_of(kHead, kGroups);
  constexpr int kSlabs = kHead / kSlabCols;
  constexpr int kBlockQ = kRowsPerGroup * kGroups;
  constexpr int kQSlabBytes = kBlockQ * kRowBytes;
  constexpr int kKvSlabBytes = kKeys * kRowBytes;
  constexpr int kStageBytes = kv_stage_bytes(kHead);
  constexpr bool kOverlap = kHead <= 128;  // registers for O, S and P at once (the schedule: file comment)
  static_assert(kHead % kSlabCols == 0 && kHead <= kMaxHeadDim, "head dim");

  extern __shared__ int4 smem_raw[];
  uint8_t* const base = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  uint8_t* const q_s = base;
  uint8_t* const k_s = q_s + q_bytes(kHead, kGroups);
  uint8_t* const v_s = k_s + kStages * kStageBytes;
  uint64_t* const bars = reinterpret_cast<uint64_t*>(v_s + kStages * kStageBytes);
  uint64_t* const q_full = bars;
  uint64_t* const k_full = bars + 1;
  uint64_t* const v_full = k_full + kStages;
  uint64_t* const kv_empty = v_full + kStages;

  const FwdParams& p = a.p;
  const MaskDims& m = p.mask;
  const int64_t qb = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int64_t hk = p.kv_head_of(h);
  const int64_t q0 = qb * kBlockQ;
  const ListCursor list = ListCursor::of(p.kv, p.mask, p.mask.row(b, h), qb);
  const int total = list.np + list.nf;
  const int group = threadIdx.x / 128;  // 0: producer

  if (threadIdx.x == 0) {
    hw::mbarrier_init(q_full, 1);
    for (int s = 0; s < kStages; ++s) {
      hw::mbarrier_init(&k_full[s], 1);
      hw::mbarrier_init(&v_full[s], 1);
      hw::mbarrier_init(&kv_empty[s], 128 * kGroups);  // every consumer thread arrives
    }
    hw::mbarrier_init_fence();
  }
  __syncthreads();

  if (group == 0) {
    // ---- producer ----
    hw::setmaxnreg_dec<kProducerRegs<kHead, kGroups>>();
    if (threadIdx.x != 0) return;
    hw::tma_prefetch_descriptor(&a.q_map);
    hw::tma_prefetch_descriptor(&a.k_map);
    hw::tma_prefetch_descriptor(&a.v_map);
    hw::mbarrier_arrive_expect_tx(q_full, q_bytes(kHead, kGroups));
#pragma unroll
    for (int sl = 0; sl < kSlabs; ++sl) {
      hw::tma_load_3d(q_s + sl * kQSlabBytes, &a.q_map, q_full, sl * kSlabCols, map_c1(a.q_view, h, q0),
                      map_c2(a.q_view, b, h, q0));
    }
    int i = 0;  // chunk counter: stage i % kStages, its use number i / kStages
    int64_t kb = 0;
    int tile = -1;
    for (int e = list.next(0, kb, tile); e < total; e = list.next(e + 1, kb, tile)) {
      for (int sub = 0; sub < chunks_of(p, kb); ++sub, ++i) {
        const int s = i % kStages;
        // The stage's previous use (chunk i - kStages) must be consumed: its completion is phase (i / kStages - 1).
        if (i >= kStages) hw::mbarrier_wait(&kv_empty[s], (i / kStages + 1) & 1);
        const int64_t key0 = kb * m.block_kv + sub * kKeys;
        hw::mbarrier_arrive_expect_tx(&k_full[s], kStageBytes);
#pragma unroll
        for (int sl = 0; sl < kSlabs; ++sl) {
          hw::tma_load_3d(k_s + s * kStageBytes + sl * kKvSlabBytes, &a.k_map, &k_full[s], sl * kSlabCols,
                          map_c1(a.k_view, hk, key0), map_c2(a.k_view, b, hk, key0));
        }
        hw::mbarrier_arrive_expect_tx(&v_full[s], kStageBytes);
#pragma unroll
        for (int sl = 0; sl < kSlabs; ++sl) {
          hw::tma_load_3d(v_s + s * kStageBytes + sl * kKvSlabBytes, &a.v_map, &v_full[s], sl * kSlabCols,
                          map_c1(a.v_view, hk, key0), map_c2(a.v_view, b, hk, key0));
        }
      }
    }
    return;
  }

  // ---- consumers ----
  hw::setmaxnreg_inc<kConsumerRegs<kHead, kGroups>>();
  const int g = group - 1;                 // this warpgroup's 64 rows of the block
  const int wq = (threadIdx.x / 32) % 4;   // warp within the warpgroup: rows 16 wq .. 16 wq + 15
  const int lane = threadIdx.x % 32;
  const int tig = lane % 4;
  const int row0 = kRowsPerGroup * g + 16 * wq + lane / 4;  // the thread's rows in the block: row0, row0 + 8
  const float scale_log2 = p.scale * kLog2e;
  const uint32_t q_addr = hw::smem_u32(q_s) + g * kRowsPerGroup * kRowBytes;
  const uint32_t k_addr = hw::smem_u32(k_s);
  const uint32_t v_addr = hw::smem_u32(v_s);

  float o[kHead / 2];
#pragma unroll
  for (int j = 0; j < kHead / 2; ++j) o[j] = 0.0f;
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.0f, 0.0f};  // this thread's columns only; the quad's sum is taken at the end
  float sacc[kKeys / 2];             // S, then P in fp32
  uint32_t pa[kKeys / 16][4];        // P rounded to T: the A fragments of P V
  float alpha[2];

  // The walk over the chunks: entry e of the list (block kb, tile), chunk sub of the block; i counts chunks.
  int64_t kb = 0;
  int tile = -1;
  int e = list.next(0, kb, tile);
  int sub = 0;
  int i = 0;
  auto chunk_now = [&]() {
    Chunk ch;
    ch.stage = i % kStages;
    ch.phase = (i / kStages) & 1;
    ch.tile = tile;
    ch.keys_left = p.kv_len - (kb * m.block_kv + sub * kKeys);
    load_bits(ch, p, row0, sub * kKeys);
    return ch;
  };
  auto advance = [&]() {
    ++i;
    if (++sub == chunks_of(p, kb)) {
      sub = 0;
      e = list.next(e + 1, kb, tile);
    }
  };
  // S = Q K^T of a chunk, issued and committed; the fence also covers a P V issued right after it.
  auto start_s = [&](const Chunk& ch) {
#pragma unroll
    for (int j = 0; j < kKeys / 2; ++j) sacc[j] = 0.0f;
    hw::mbarrier_wait(&k_full[ch.stage], ch.phase);
    hw::fence_operands(sacc);
    hw::fence_operands(o);
    hw::wgmma_fence();  // S batch: zeroed S and rescaled O are written before a wgmma reads them
    issue_s<T, kHead>(sacc, q_addr, kQSlabBytes, k_addr + ch.stage * kStageBytes);
    hw::wgmma_commit();
  };
  // O += P V of a chunk, complete when it returns; then the stage is released.
  auto finish_pv = [&](const Chunk& ch) {
    hw::mbarrier_wait(&v_full[ch.stage], ch.phase);
    const uint8_t* const v_stage = v_s + ch.stage * kStageBytes;
    if (!needs_visible_pairs<T, kHead>(ch, v_stage, lane)) {
      hw::fence_operands(o);
      hw::wgmma_fence();  // P V batch: O's rescaling is written before the wgmma reads it
      issue_pv<T, kHead>(o, pa, v_addr + ch.stage * kStageBytes);
      hw::wgmma_commit();
      hw::wgmma_wait<0>();
      hw::fence_operands(o);
    } else {
      pv_visible_pairs<T, kHead>(o, pa, v_stage, ch, lane);
    }
    hw::mbarrier_arrive(&kv_empty[ch.stage]);  // this thread is done with the stage
  };

  hw::mbarrier_wait(q_full, 0);
  if (e < total) {
    Chunk cur = chunk_now();
    start_s(cur);
    hw::wgmma_wait<0>();
    hw::fence_operands(sacc);
    softmax_chunk(sacc, cur, scale_log2, tig, row_max, row_sum, alpha);  // alpha = 0: O is still 0
    p_fragments<T>(pa, sacc);
    advance();
    while (e < total) {
      const Chunk next = chunk_now();
      if constexpr (kOverlap) {
        // FlashAttention-3's intra-warpgroup overlap: S of the next chunk and P V of this one go to the tensor
        // cores back to back, the next chunk's softmax runs while P V is in flight, O is rescaled once it retired.
        // Each branch issues and retires its own wgmmas: one left in flight across a branch makes ptxas insert its
        // own fence / wait there and serialize every wgmma of the kernel (C7518 / C7520).
        hw::mbarrier_wait(&v_full[cur.stage], cur.phase);
        const uint8_t* const v_stage = v_s + cur.stage * kStageBytes;
        if (!needs_visible_pairs<T, kHead>(cur, v_stage, lane)) {
          start_s(next);  // its fence also covers P V: O and P were written before it
          issue_pv<T, kHead>(o, pa, v_addr + cur.stage * kStageBytes);
          hw::wgmma_commit();
          hw::wgmma_wait<1>();  // S has retired; P V may still run
          hw::fence_operands(sacc);
          softmax_chunk(sacc, next, scale_log2, tig, row_max, row_sum, alpha);
          hw::wgmma_wait<0>();  // P V has retired: O and the stage's V are free
          hw::fence_operands(o);
        } else {
          pv_visible_pairs<T, kHead>(o, pa, v_stage, cur, lane);
          start_s(next);
          hw::wgmma_wait<0>();
          hw::fence_operands(sacc);
          softmax_chunk(sacc, next, scale_log2, tig, row_max, row_sum, alpha);
        }
        hw::mbarrier_arrive(&kv_empty[cur.stage]);  // this thread is done with the stage
      } else {
        // D = 256: O, S and P do not fit the registers together; one product at a time.
        finish_pv(cur);
        start_s(next);
        hw::wgmma_wait<0>();
        hw::fence_operands(sacc);
        softmax_chunk(sacc, next, scale_log2, tig, row_max, row_sum, alpha);
      }
      rescale<kHead>(o, alpha);
      p_fragments<T>(pa, sacc);
      cur = next;
      advance();
    }
    finish_pv(cur);
  }

  // Epilogue: rows row0, row0 + 8, columns 8 j + 2 tig + {0, 1} as one 4-byte store each.
  T* const out = static_cast<T*>(p.out) + (b * p.heads + h) * p.q_len * kHead;
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    float l = row_sum[hr];
    l += __shfl_xor_sync(kFullMask, l, 1);
    l += __shfl_xor_sync(kFullMask, l, 2);
    const int64_t row = q0 + row0 + 8 * hr;
    if (row >= p.q_len) continue;
    // attention.h: an empty row (l == 0) gets exactly 0, a NaN row (l NaN) NaN output and lse.
    const bool empty = row_empty(l);
    const float inv_l = row_out_scale(l);
#pragma unroll
    for (int j = 0; j < kHead / 8; ++j) {
      *reinterpret_cast<uint32_t*>(out + row * kHead + 8 * j + 2 * tig) =
          pack2<T>(empty ? 0.0f : o[4 * j + 2 * hr] * inv_l, empty ? 0.0f : o[4 * j + 2 * hr + 1] * inv_l);
    }
    if (tig == 0) static_cast<float*>(p.lse)[(b * p.heads + h) * p.q_len + row] = row_lse(row_max[hr], l);
  }
#endif  // BLOCKOPS_HOPPER_DEVICE
}

// ---- host ------------------------------------------------------------------------------------------------------

// The 3-D view of one tensor [B, H, T, D] with element strides sb, sh, st (file comment), or false when neither
// view fits TMA (strides multiples of 16 bytes, coordinates within int32).
bool map_view(int64_t B, int64_t H, int64_t T, int D, int64_t sb, int64_t sh, int64_t st, MapView& view,
              uint64_t (&dims)[3], uint64_t (&strides)[2]) {
  constexpr int64_t kMaxCoord = 2147483647;
  auto ok = [](int64_t s) { return s > 0 && s % 8 == 0 && s < (int64_t{1} << 38); };  // 16-byte multiples, < 2^40 B
  if (T == 1) st = (D + 7) / 8 * 8;  // a size-1 dimension's stride is never used: any valid one
  if (!ok(st) || T > kMaxCoord) return false;
  // The view's (D, dim1, dim2) extents and its two outer strides in elements (2-byte elements in the map).
  auto set = [&](bool bt, int64_t dim1, int64_t dim2, int64_t stride1, int64_t stride2) {
    view = MapView{bt, H, T};
    dims[0] = static_cast<uint64_t>(D);
    dims[1] = static_cast<uint64_t>(dim1);
    dims[2] = static_cast<uint64_t>(dim2);
    strides[0] = static_cast<uint64_t>(stride1) * 2;
    strides[1] = static_cast<uint64_t>(stride2) * 2;
    return true;
  };
  int64_t merged = -1;  // the stride of b H + h
  if (B == 1) merged = H == 1 ? st * T : sh;
  else if (H == 1) merged = sb;
  else if (sb == H * sh) merged = sh;
  if (ok(merged) && B * H <= kMaxCoord) return set(false, T, B * H, st, merged);
  if (sb == T * st && ok(sh) && B * T <= kMaxCoord) return set(true, H, B * T, sh, st);
  return false;
}

// One tensor map: boxes of 64 columns x `rows` rows of (b, h), SWIZZLE_128B.
bool encode(hw::TensorMap* map, DType dtype, const void* ptr, const MapView& view, const uint64_t (&dims)[3],
            const uint64_t (&strides)[2], uint32_t rows) {
  const uint32_t box[3] = {static_cast<uint32_t>(kSlabCols), view.bt ? 1u : rows, view.bt ? rows : 1u};
  return hw::encode_tensor_map(map, dtype == DType::kF16 ? hw::TmaElement::kF16 : hw::TmaElement::kBF16, 3, ptr,
                               dims, strides, box, hw::TmaSwizzle::k128B) == nullptr;
}

// Everything but the device limits; fills `a` (tensor maps included) when the arguments fit.
bool build_args(const FwdParams& p, WgmmaArgs& a) {
  if (p.dtype != DType::kF16 && p.dtype != DType::kBF16) return false;
  if (p.head_dim != p.v_dim || (p.head_dim != 64 && p.head_dim != 128 && p.head_dim != 256)) return false;
  const MaskDims& m = p.mask;
  if ((m.block_q != 64 && m.block_q != 128) || (m.block_kv != 64 && m.block_kv != 128)) return false;
  if (p.q_len < 1 || p.kv_len < 1 || p.batch < 1 || p.heads < 1 || p.kv_heads < 1) return false;
  if (p.heads > kMaxGridYZ || p.batch > kMaxGridYZ || m.q_blocks > 2147483647) return false;
  if (!aligned16(p.q) || !aligned16(p.k) || !aligned16(p.v)) return false;
  uint64_t dims[3], strides[2];
  a.p = p;
  if (!map_view(p.batch, p.heads, p.q_len, p.head_dim, p.q_stride_b, p.q_stride_h, p.q_stride_t, a.q_view, dims,
                strides) ||
      !encode(&a.q_map, p.dtype, p.q, a.q_view, dims, strides, static_cast<uint32_t>(m.block_q))) {
    return false;
  }
  if (!map_view(p.batch, p.kv_heads, p.kv_len, p.head_dim, p.k_stride_b, p.k_stride_h, p.k_stride_t, a.k_view,
                dims, strides) ||
      !encode(&a.k_map, p.dtype, p.k, a.k_view, dims, strides, kKeys)) {
    return false;
  }
  if (!map_view(p.batch, p.kv_heads, p.kv_len, p.v_dim, p.v_stride_b, p.v_stride_h, p.v_stride_t, a.v_view, dims,
                strides) ||
      !encode(&a.v_map, p.dtype, p.v, a.v_view, dims, strides, kKeys)) {
    return false;
  }
  return true;
}

size_t smem_bytes(const FwdParams& p) {
  return static_cast<size_t>(smem_bytes_of(p.head_dim, p.mask.block_q / kRowsPerGroup));
}

template <typename T, int kHead, int kGroups>
cudaError_t launch_typed(const WgmmaArgs& a, cudaStream_t stream) {
  const auto kernel = fwd_wgmma_kernel<T, kHead, kGroups>;
  constexpr size_t smem = smem_bytes_of(kHead, kGroups);
  const cudaError_t err = allow_dynamic_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(a.p.mask.q_blocks), static_cast<unsigned>(a.p.heads),
                  static_cast<unsigned>(a.p.batch));
  kernel<<<grid, 128 * (kGroups + 1), smem, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, int kGroups>
cudaError_t launch_head(const WgmmaArgs& a, cudaStream_t stream) {
  switch (a.p.head_dim) {
    case 64: return launch_typed<T, 64, kGroups>(a, stream);
    case 128: return launch_typed<T, 128, kGroups>(a, stream);
    default: return launch_typed<T, 256, kGroups>(a, stream);
  }
}

template <typename T>
cudaError_t launch_groups(const WgmmaArgs& a, cudaStream_t stream) {
  return a.p.mask.block_q == 64 ? launch_head<T, 1>(a, stream) : launch_head<T, 2>(a, stream);
}

}  // namespace

bool fwd_wgmma_supported(const FwdParams& p) {
  WgmmaArgs a;
  if (!build_args(p, a)) return false;
  return smem_bytes(p) <= static_cast<size_t>(max_dynamic_smem());
}

cudaError_t launch_fwd_wgmma(const FwdParams& p, cudaStream_t stream) {
  WgmmaArgs a;
  if (!build_args(p, a) || smem_bytes(p) > static_cast<size_t>(max_dynamic_smem())) return cudaErrorInvalidValue;
  return p.dtype == DType::kF16 ? launch_groups<__half>(a, stream) : launch_groups<__nv_bfloat16>(a, stream);
}

}  // namespace blockops::attention

#else  // !BLOCKOPS_HAVE_CUTE: no CuTe headers, no Hopper kernels; every GPU takes attention_mma_fwd.cu

namespace blockops::attention {
bool fwd_wgmma_supported(const FwdParams&) { return false; }
cudaError_t launch_fwd_wgmma(const FwdParams&, cudaStream_t) { return cudaErrorNotSupported; }
}  // namespace blockops::attention

#endif  // BLOCKOPS_HAVE_CUTE
