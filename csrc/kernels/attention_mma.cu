// Block-sparse attention on tensor cores for fp16/bf16 (FlashAttention-2 style), forward and the two-pass
// deterministic backward: mma.sync.m16n8k16 with fp32 accumulators, ldmatrix (.trans for the operands used
// transposed), cp.async double-buffered chunks, online softmax in registers in base 2 (csrc/attention.h), and
// only the listed blocks visited. The backward section below has its own sketch.
//
// fwd_mma_kernel<T, kHead>: one CTA per (query block qb, head h, batch b); block_q / 16 warps, warp w owns query
// rows 16 w .. 16 w + 15 of the block. Key blocks of block_kv are walked in chunks of w = min(block_kv, kChunk):
//
//   smem:  Q [block_q][kStride]   (loaded once, zero beyond Tq and beyond D rounded up to 16)
//          K [2][kChunk][kStride]  V [2][kChunk][kStride]   (stage s: chunk i + 1 in flight while chunk i is used)
//
//   for (kb, tile) in partial list, then full list (entries failing list_entry_ok skipped), for each chunk:
//     S = Q K^T                    [16 x w] per warp: ldmatrix.x4 of K (B operand, 2 n-tiles), 4 regs of Q per k-step
//     S = S * scale * log2(e); -inf where the bit tile (partial blocks) or key >= Tk hides a key
//     m' = max(m, rowmax S); P = exp2(S - m'); l = l exp2(m - m') + rowsum P; O = O exp2(m - m') + P V
//     (P goes from the S accumulators straight into A fragments; V's B fragments come from ldmatrix.x4.trans)
//   out = O / l, lse = (m + log2 l) / log2(e); a row with no visible key: out = 0, lse = -inf
//
// Fragment map (PTX ISA "Matrix Fragments for mma.m16n8k16"; gid = lane / 4, tig = lane % 4): accumulator
// register e of n-tile j is row gid + 8 (e / 2), column 8 j + 2 tig + e % 2; A register r is row gid + 8 (r % 2),
// k 2 tig + 8 (r / 2) + {0, 1}. So S n-tiles 2 kk and 2 kk + 1 are exactly the A fragment of keys 16 kk .. + 15:
// a = {S[2kk][0,1], S[2kk][2,3], S[2kk+1][0,1], S[2kk+1][2,3]} rounded to T pairs.
//
// Head dims: kHead in {64, 128, 256} bounds max(D, Dv) rounded up to 16 (64 and 128 are the common exact fits);
// smem rows hold kHead + 8 elements, columns in [D, round16(D)) are zero-filled so any multiple of 8 works, and
// the k-steps / output n-tiles beyond the real dims are skipped (block-uniform branches).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

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
constexpr int kDefaultSmem = 48 * 1024;  // dynamic smem above this needs the per-kernel opt-in
constexpr int kMaxGridYZ = 65535;

__host__ __device__ constexpr int round16(int x) { return (x + 15) / 16 * 16; }
__host__ __device__ constexpr int stride_of(int head) { return head + kPad; }

// Elements of dynamic smem: Q rows, then two stages of K and of V.
__host__ __device__ constexpr int64_t smem_elems(int head, int block_q) {
  return int64_t{block_q + 4 * kChunk} * stride_of(head);
}

// The PTX wrappers (mma_ptx.cuh) this kernel uses.
using mma::cp_async16;
using mma::cp_async_commit;
using mma::cp_async_wait;
using mma::ldmatrix_x4;
using mma::ldmatrix_x4_trans;
using mma::mma_16816;

// ---- element helpers -------------------------------------------------------------------------------------

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

// Walks the forward lists of one (mask row, query block): entries [0, np) partial, [np, np + nf) full.
struct ListCursor {
  const int32_t* idx;
  const int32_t* tile_ids;
  const int32_t* full_idx;
  int np, nf;
  int64_t width, num_tiles;

  // The first usable entry at or after e (np + nf when none), with its key block and tile id (-1: full block).
  __device__ __forceinline__ int next(int e, int64_t& kb, int& tile) const {
    for (; e < np + nf; ++e) {
      if (e < np) {
        if (list_entry_ok(idx[e], width, tile_ids + e, num_tiles)) {
          kb = idx[e];
          tile = tile_ids[e];
          return e;
        }
      } else if (list_entry_ok(full_idx[e - np], width, nullptr, num_tiles)) {
        kb = full_idx[e - np];
        tile = -1;
        return e;
      }
    }
    return e;
  }
};

template <typename T,      // __half or __nv_bfloat16: q, k, v, out and the mma inputs
          int kHead>       // 64, 128 or 256: smem row capacity and output n-tiles, >= round16(max(D, Dv))
__global__ void __launch_bounds__(32 * kMaxWarps, 1) fwd_mma_kernel(const FwdParams p) {
  constexpr int kStride = stride_of(kHead);
  constexpr int kSteps = kHead / 16;           // k-steps of Q K^T and 16-column pairs of O
  constexpr bool kQInRegs = kHead <= 128;      // 32 registers of Q fragments at 128; at 256 reload from smem
  static_assert(kHead % 16 == 0 && kHead <= kMaxHeadDim, "head bucket");

  extern __shared__ int4 smem_raw[];
  T* const q_s = reinterpret_cast<T*>(smem_raw);
  const MaskDims& m = p.mask;
  T* const k_s = q_s + m.block_q * kStride;
  T* const v_s = k_s + 2 * kChunk * kStride;

  const int64_t qb = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int64_t hk = p.kv_head_of(h);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int gid = lane / 4, tig = lane % 4;
  const int w = m.block_kv < kChunk ? m.block_kv : kChunk;  // keys per chunk: 16 or 32
  const int subs = m.block_kv / w;                          // chunks per key block
  const int d_steps = round16(p.head_dim) / 16;
  const int dv_tiles = p.v_dim / 8;
  const float scale_log2 = p.scale * kLog2e;

  const T* const q = static_cast<const T*>(p.q) + b * p.q_stride_b + h * p.q_stride_h;
  const T* const k = static_cast<const T*>(p.k) + b * p.k_stride_b + hk * p.k_stride_h;
  const T* const v = static_cast<const T*>(p.v) + b * p.v_stride_b + hk * p.v_stride_h;
  const int64_t q0 = qb * m.block_q;

  const int64_t list_at = m.row(b, h) * p.kv.n + qb;
  const ListCursor cur{p.kv.idx + list_at * p.kv.width, p.kv.tile_ids + list_at * p.kv.width,
                       p.kv.full_idx + list_at * p.kv.width, list_count(p.kv.num[list_at], p.kv.width),
                       list_count(p.kv.full_num[list_at], p.kv.width), p.kv.width, m.num_tiles};
  const int total = cur.np + cur.nf;

  // K and V rows of chunk `sub` of key block kb into stage `s`; keys past Tk zero-filled.
  auto load_chunk = [&](int s, int64_t kb, int sub) {
    const int64_t key0 = kb * m.block_kv + sub * w;
    load_rows<T, kHead>(k_s + s * kChunk * kStride, k, p.k_stride_t, key0, w, p.kv_len - key0, p.head_dim);
    load_rows<T, kHead>(v_s + s * kChunk * kStride, v, p.v_stride_t, key0, w, p.kv_len - key0, p.v_dim);
  };

  load_rows<T, kHead>(q_s, q, p.q_stride_t, q0, m.block_q, p.q_len - q0, p.head_dim);
  cp_async_commit();
  int64_t kb = 0;
  int tile = -1;
  int e = cur.next(0, kb, tile);
  int sub = 0;
  if (e < total) load_chunk(0, kb, 0);
  cp_async_commit();
  cp_async_wait<1>();  // Q has landed (the first chunk may still be in flight) ...
  __syncthreads();     // ... for every thread

  // ldmatrix row addresses of this lane. A (Q) and trans-B (V): matrices (rows 0-7, cols 0-7), (8-15, 0-7),
  // (0-7, 8-15), (8-15, 8-15). B (K, [key][d]): (keys 0-7, d 0-7), (0-7, 8-15), (8-15, 0-7), (8-15, 8-15).
  const int a_off = ((lane & 7) + ((lane >> 3) & 1) * 8) * kStride + (lane >> 4) * 8;
  const int k_off = ((lane & 7) + (lane >> 4) * 8) * kStride + ((lane >> 3) & 1) * 8;
  const T* const q_lane = q_s + 16 * warp * kStride + a_off;

  uint32_t qf[kQInRegs ? kSteps : 1][4];
  if constexpr (kQInRegs) {
#pragma unroll
    for (int ks = 0; ks < kSteps; ++ks) {
      if (ks < d_steps) ldmatrix_x4(qf[ks], q_lane + ks * 16);
    }
  }

  float o[2 * kSteps][4] = {};
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.0f, 0.0f};  // this thread's columns only; the quad's sum is taken at the end
  int stage = 0;

  while (e < total) {
    // Prefetch the chunk after this one into the other stage (free: the barrier closing the last iteration).
    int64_t next_kb = kb;
    int next_tile = tile;
    int next_e = e;
    int next_sub = sub + 1;
    if (next_sub == subs) {
      next_sub = 0;
      next_e = cur.next(e + 1, next_kb, next_tile);
    }
    if (next_e < total) load_chunk(stage ^ 1, next_kb, next_sub);
    cp_async_commit();
    cp_async_wait<1>();  // this thread's copies of the current chunk have landed ...
    __syncthreads();     // ... and everyone's

    // S = Q K^T for this warp's 16 rows and the chunk's w keys.
    const T* const k_lane = k_s + stage * kChunk * kStride + k_off;
    float s[4][4] = {};
#pragma unroll
    for (int ks = 0; ks < kSteps; ++ks) {
      if (ks >= d_steps) break;
      uint32_t a[4];
      if constexpr (kQInRegs) {
#pragma unroll
        for (int r = 0; r < 4; ++r) a[r] = qf[ks][r];
      } else {
        ldmatrix_x4(a, q_lane + ks * 16);
      }
#pragma unroll
      for (int np = 0; np < 2; ++np) {
        if (16 * np >= w) break;
        uint32_t bf[4];
        ldmatrix_x4(bf, k_lane + np * 16 * kStride + ks * 16);
        mma_16816<T>(s[2 * np], a, bf[0], bf[1]);
        mma_16816<T>(s[2 * np + 1], a, bf[2], bf[3]);
      }
    }

    // Scale to base 2 and hide keys: the bit tile's word of this chunk for the thread's two rows, key < Tk.
    const int c0 = sub * w;  // first key of the chunk within its block
    const int64_t key0 = kb * m.block_kv + c0;
    uint32_t bits[2] = {~0u, ~0u};
    if (tile >= 0) {
      const int32_t* t_rows = p.tiles + (int64_t{tile} * m.block_q + 16 * warp + gid) * m.words() + c0 / 32;
      bits[0] = static_cast<uint32_t>(t_rows[0]) >> (c0 % 32);
      bits[1] = static_cast<uint32_t>(t_rows[8 * m.words()]) >> (c0 % 32);
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int c = 8 * j + 2 * tig + (r & 1);
        const bool visible = c < w && key0 + c < p.kv_len && ((bits[r >> 1] >> c) & 1u);
        s[j][r] = visible ? s[j][r] * scale_log2 : -INFINITY;
      }
    }

    // Online softmax per row half (rows gid and gid + 8); a quad (4 lanes) holds one row.
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float mx = row_max[hr];
#pragma unroll
      for (int j = 0; j < 4; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * hr], s[j][2 * hr + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float base = mx == -INFINITY ? 0.0f : mx;  // all hidden so far: exp2(-inf - 0) = 0, never NaN
      const float alpha = exp2f(row_max[hr] - base);
      row_max[hr] = mx;
      float sum = 0.0f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        s[j][2 * hr] = exp2f(s[j][2 * hr] - base);
        s[j][2 * hr + 1] = exp2f(s[j][2 * hr + 1] - base);
        sum += s[j][2 * hr] + s[j][2 * hr + 1];
      }
      row_sum[hr] = row_sum[hr] * alpha + sum;
#pragma unroll
      for (int j = 0; j < 2 * kSteps; ++j) {
        o[j][2 * hr] *= alpha;
        o[j][2 * hr + 1] *= alpha;
      }
    }

    // O += P V: P's accumulators are the A fragments (header), V's B fragments come transposed from smem.
    const T* const v_lane = v_s + stage * kChunk * kStride + a_off;
#pragma unroll
    for (int kk = 0; kk < kChunk / 16; ++kk) {
      if (16 * kk >= w) break;
      const uint32_t a[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                             pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int nd = 0; nd < kSteps; ++nd) {
        if (2 * nd >= dv_tiles) break;
        uint32_t bf[4];
        ldmatrix_x4_trans(bf, v_lane + kk * 16 * kStride + nd * 16);
        mma_16816<T>(o[2 * nd], a, bf[0], bf[1]);
        mma_16816<T>(o[2 * nd + 1], a, bf[2], bf[3]);
      }
    }
    __syncthreads();  // everyone is done with this stage before the next iteration refills it

    e = next_e;
    kb = next_kb;
    tile = next_tile;
    sub = next_sub;
    stage ^= 1;
  }
  cp_async_wait<0>();  // only empty groups can be pending; leave nothing in flight

  // Epilogue: rows gid and gid + 8 of the warp, columns 8 j + 2 tig + {0, 1} as one 4-byte store.
  T* const out = static_cast<T*>(p.out) + (b * p.heads + h) * p.q_len * p.v_dim;
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    float l = row_sum[hr];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int64_t row = q0 + 16 * warp + gid + 8 * hr;
    if (row >= p.q_len) continue;
    const float inv_l = l > 0.0f ? 1.0f / l : 0.0f;  // a row with no visible key: out = 0
#pragma unroll
    for (int j = 0; j < 2 * kSteps; ++j) {
      if (j >= dv_tiles) break;
      *reinterpret_cast<uint32_t*>(out + row * p.v_dim + 8 * j + 2 * tig) =
          pack2<T>(o[j][2 * hr] * inv_l, o[j][2 * hr + 1] * inv_l);
    }
    if (tig == 0) {
      p.lse[(b * p.heads + h) * p.q_len + row] = l > 0.0f ? (row_max[hr] + log2f(l)) / kLog2e : -INFINITY;
    }
  }
}

// ---- backward --------------------------------------------------------------------------------------------
//
// dkdv_mma_kernel<T, kHead>: one CTA per (key block kb, key head hk, batch b); block_kv / 16 warps, warp w owns
// keys 16 w .. 16 w + 15 of the block with dK, dV [16 x D / Dv] in registers. K, V of the block stay in smem;
// the query heads of the group and their transposed lists are walked in chunks of up to kChunk queries:
//
//   smem:  K [block_kv][kStride]  V [block_kv][kStride]
//          Q [2][kChunk][kStride]  dO [2][kChunk][kStride]  lse2 [2][kChunk]  Delta [2][kChunk]  (fp32)
//
//   S^T = K Q^T, dP^T = V dO^T          [16 keys x chunk] per warp (Q, dO chunk rows are the B operands)
//   P^T = exp2(S^T * scale * log2(e) - lse2), 0 where hidden;  dS^T = P^T (dP^T - Delta)
//   dV += P^T dO,  dK += dS^T Q         (P^T, dS^T accumulators -> A fragments; dO, Q via ldmatrix.trans)
//
// dq_mma_kernel<T, kHead>: one CTA per (query block, head, batch), the forward's walk over K/V chunks with Q and
// dO of the block in smem:  S = Q K^T, dP = dO V^T, dS = P (dP - Delta), dQ += dS K (K via ldmatrix.trans).
//
// A row with lse = -inf (no visible key) and rows past Tq get lse2 = +inf: P = exp2(x - inf) = 0, no gradient.
// dK and dQ are scaled once at the end. max(D, Dv) <= 128: two [16 x 128] fp32 accumulator sets per thread.

// One step of a walk over the lists of `heads` consecutive query heads h0.. (one for dQ): chunk `sub` of entry e of
// head h0 + g, with its block and tile id (-1: full). Copyable, so the prefetch advances a copy.
struct ChunkWalk {
  ListCursor cur;
  int g, e, sub;
  int64_t blk;
  int tile;

  __device__ __forceinline__ static ListCursor cursor(const BlockLists& L, const MaskDims& m, int64_t mask_row,
                                                      int64_t n) {
    const int64_t at = mask_row * L.n + n;
    return ListCursor{L.idx + at * L.width, L.tile_ids + at * L.width, L.full_idx + at * L.width,
                      list_count(L.num[at], L.width), list_count(L.full_num[at], L.width), L.width, m.num_tiles};
  }
  // Moves to head h0 + g (and on, past heads with no usable entry); g == heads: done.
  __device__ __forceinline__ void enter(const BlockLists& L, const MaskDims& m, int64_t b, int64_t h0, int heads,
                                        int64_t n) {
    for (; g < heads; ++g) {
      cur = cursor(L, m, m.row(b, h0 + g), n);
      e = cur.next(0, blk, tile);
      if (e < cur.np + cur.nf) return;
    }
  }
  __device__ __forceinline__ void advance(const BlockLists& L, const MaskDims& m, int64_t b, int64_t h0, int heads,
                                          int64_t n, int subs) {
    if (++sub < subs) return;
    sub = 0;
    e = cur.next(e + 1, blk, tile);
    if (e < cur.np + cur.nf) return;
    ++g;
    enter(L, m, b, h0, heads, n);
  }
};

template <typename T,      // __half or __nv_bfloat16
          int kHead>       // 64 or 128: >= round16(max(D, Dv))
__global__ void __launch_bounds__(32 * kMaxWarps, 1) dkdv_mma_kernel(const BwdParams p) {
  constexpr int kStride = stride_of(kHead);
  constexpr int kSteps = kHead / 16;
  static_assert(kHead == 64 || kHead == 128, "dK and dV accumulators of larger heads do not fit in registers");

  const FwdParams& f = p.fwd;
  const MaskDims& m = f.mask;
  extern __shared__ int4 smem_raw[];
  T* const k_s = reinterpret_cast<T*>(smem_raw);
  T* const v_s = k_s + m.block_kv * kStride;
  T* const q_s = v_s + m.block_kv * kStride;
  T* const do_s = q_s + 2 * kChunk * kStride;
  float* const lse2_s = reinterpret_cast<float*>(do_s + 2 * kChunk * kStride);
  float* const delta_s = lse2_s + 2 * kChunk;

  const int64_t kb = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const int group = static_cast<int>(f.heads / f.kv_heads);
  const int64_t h0 = hk * group;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int gid = lane / 4, tig = lane % 4;
  const int wq = m.block_q < kChunk ? m.block_q : kChunk;  // queries per chunk: 16 or 32
  const int subs = m.block_q / wq;
  const int d_steps = round16(f.head_dim) / 16, dv_steps = round16(f.v_dim) / 16;
  const int d_tiles = f.head_dim / 8, dv_tiles = f.v_dim / 8;
  const float scale_log2 = f.scale * kLog2e;
  const int64_t key_base = kb * m.block_kv;

  const T* const q = static_cast<const T*>(f.q) + b * f.q_stride_b;
  const T* const dout = static_cast<const T*>(p.grad_out) + b * p.do_stride_b;

  // Q and dO rows, lse2 and Delta of chunk w.sub of query block w.blk of head h0 + w.g into stage s.
  auto load_chunk = [&](int s, const ChunkWalk& w) {
    const int64_t h = h0 + w.g;
    const int64_t i0 = w.blk * m.block_q + w.sub * wq;
    load_rows<T, kHead>(q_s + s * kChunk * kStride, q + h * f.q_stride_h, f.q_stride_t, i0, wq, f.q_len - i0,
                        f.head_dim);
    load_rows<T, kHead>(do_s + s * kChunk * kStride, dout + h * p.do_stride_h, p.do_stride_t, i0, wq, f.q_len - i0,
                        f.v_dim);
    for (int r = threadIdx.x; r < wq; r += blockDim.x) {
      const int64_t i = i0 + r;
      const int64_t at = (b * f.heads + h) * f.q_len + i;
      const float lse = i < f.q_len ? f.lse[at] : -INFINITY;
      lse2_s[s * kChunk + r] = lse == -INFINITY ? INFINITY : lse * kLog2e;
      delta_s[s * kChunk + r] = i < f.q_len ? p.delta[at] : 0.0f;
    }
  };

  load_rows<T, kHead>(k_s, static_cast<const T*>(f.k) + b * f.k_stride_b + hk * f.k_stride_h, f.k_stride_t, key_base,
                      m.block_kv, f.kv_len - key_base, f.head_dim);
  load_rows<T, kHead>(v_s, static_cast<const T*>(f.v) + b * f.v_stride_b + hk * f.v_stride_h, f.v_stride_t, key_base,
                      m.block_kv, f.kv_len - key_base, f.v_dim);
  ChunkWalk walk{};
  walk.enter(p.q, m, b, h0, group, kb);
  if (walk.g < group) load_chunk(0, walk);
  cp_async_commit();

  // ldmatrix lane offsets as in the forward: a_off for A operands and transposed B, b_off for [n][k] B operands.
  const int a_off = ((lane & 7) + ((lane >> 3) & 1) * 8) * kStride + (lane >> 4) * 8;
  const int b_off = ((lane & 7) + (lane >> 4) * 8) * kStride + ((lane >> 3) & 1) * 8;
  const T* const k_lane = k_s + 16 * warp * kStride + a_off;
  const T* const v_lane = v_s + 16 * warp * kStride + a_off;
  const int c_key = 16 * warp + gid;  // the thread's first key within the block (second: + 8, same tile word)

  float dk[2 * kSteps][4] = {};
  float dv[2 * kSteps][4] = {};
  int stage = 0;
  while (walk.g < group) {
    ChunkWalk next = walk;
    next.advance(p.q, m, b, h0, group, kb, subs);
    if (next.g < group) load_chunk(stage ^ 1, next);
    cp_async_commit();
    cp_async_wait<1>();  // K, V and this chunk have landed (this thread's copies) ...
    __syncthreads();     // ... everyone's, and lse2 / Delta of the stage are visible

    // S^T = K Q^T and dP^T = V dO^T: [16 keys x wq queries] per warp.
    const T* const qc = q_s + stage * kChunk * kStride;
    const T* const doc = do_s + stage * kChunk * kStride;
    float st[4][4] = {};
    float dpt[4][4] = {};
#pragma unroll
    for (int ks = 0; ks < kSteps; ++ks) {
      if (ks >= d_steps) break;
      uint32_t a[4];
      ldmatrix_x4(a, k_lane + ks * 16);
#pragma unroll
      for (int np = 0; np < 2; ++np) {
        if (16 * np >= wq) break;
        uint32_t bf[4];
        ldmatrix_x4(bf, qc + b_off + np * 16 * kStride + ks * 16);
        mma_16816<T>(st[2 * np], a, bf[0], bf[1]);
        mma_16816<T>(st[2 * np + 1], a, bf[2], bf[3]);
      }
    }
#pragma unroll
    for (int ks = 0; ks < kSteps; ++ks) {
      if (ks >= dv_steps) break;
      uint32_t a[4];
      ldmatrix_x4(a, v_lane + ks * 16);
#pragma unroll
      for (int np = 0; np < 2; ++np) {
        if (16 * np >= wq) break;
        uint32_t bf[4];
        ldmatrix_x4(bf, doc + b_off + np * 16 * kStride + ks * 16);
        mma_16816<T>(dpt[2 * np], a, bf[0], bf[1]);
        mma_16816<T>(dpt[2 * np + 1], a, bf[2], bf[3]);
      }
    }

    // P^T and dS^T (into st and dpt). Tile rows are queries: the word of the thread's keys in each query's row.
    const int r0 = walk.sub * wq;  // first query of the chunk within its block
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = 8 * j + 2 * tig + e;  // query within the chunk
        uint32_t bits = ~0u;
        if (walk.tile >= 0 && col < wq) {
          bits = static_cast<uint32_t>(
                     p.fwd.tiles[(int64_t{walk.tile} * m.block_q + r0 + col) * m.words() + c_key / 32]) >>
                 (c_key % 32);
        }
        const float lse2 = lse2_s[stage * kChunk + col];
        const float delta = delta_s[stage * kChunk + col];
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
          const bool visible = col < wq && key_base + c_key + 8 * hr < f.kv_len && ((bits >> (8 * hr)) & 1u);
          const float pt = visible ? exp2f(st[j][2 * hr + e] * scale_log2 - lse2) : 0.0f;
          st[j][2 * hr + e] = pt;
          dpt[j][2 * hr + e] = pt * (dpt[j][2 * hr + e] - delta);
        }
      }
    }

    // dV += P^T dO, dK += dS^T Q: keys x queries accumulators as A fragments, dO / Q chunk rows transposed.
#pragma unroll
    for (int kk = 0; kk < kChunk / 16; ++kk) {
      if (16 * kk >= wq) break;
      const uint32_t ap[4] = {pack2<T>(st[2 * kk][0], st[2 * kk][1]), pack2<T>(st[2 * kk][2], st[2 * kk][3]),
                              pack2<T>(st[2 * kk + 1][0], st[2 * kk + 1][1]),
                              pack2<T>(st[2 * kk + 1][2], st[2 * kk + 1][3])};
      const uint32_t ad[4] = {pack2<T>(dpt[2 * kk][0], dpt[2 * kk][1]), pack2<T>(dpt[2 * kk][2], dpt[2 * kk][3]),
                              pack2<T>(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]),
                              pack2<T>(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3])};
#pragma unroll
      for (int nd = 0; nd < kSteps; ++nd) {
        if (2 * nd < dv_tiles) {
          uint32_t bf[4];
          ldmatrix_x4_trans(bf, doc + a_off + kk * 16 * kStride + nd * 16);
          mma_16816<T>(dv[2 * nd], ap, bf[0], bf[1]);
          mma_16816<T>(dv[2 * nd + 1], ap, bf[2], bf[3]);
        }
        if (2 * nd < d_tiles) {
          uint32_t bf[4];
          ldmatrix_x4_trans(bf, qc + a_off + kk * 16 * kStride + nd * 16);
          mma_16816<T>(dk[2 * nd], ad, bf[0], bf[1]);
          mma_16816<T>(dk[2 * nd + 1], ad, bf[2], bf[3]);
        }
      }
    }
    __syncthreads();  // everyone is done with this stage before the next iteration refills it
    walk = next;
    stage ^= 1;
  }
  cp_async_wait<0>();  // K and V when no chunk was listed, else only empty groups

  // Epilogue: keys c_key (+ 8) of the block; a key block no query sees still writes its zeros.
  T* const grad_k = static_cast<T*>(p.grad_k) + (b * f.kv_heads + hk) * f.kv_len * f.head_dim;
  T* const grad_v = static_cast<T*>(p.grad_v) + (b * f.kv_heads + hk) * f.kv_len * f.v_dim;
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int64_t key = key_base + c_key + 8 * hr;
    if (key >= f.kv_len) continue;
#pragma unroll
    for (int j = 0; j < 2 * kSteps; ++j) {
      if (j < d_tiles) {
        *reinterpret_cast<uint32_t*>(grad_k + key * f.head_dim + 8 * j + 2 * tig) =
            pack2<T>(dk[j][2 * hr] * f.scale, dk[j][2 * hr + 1] * f.scale);
      }
      if (j < dv_tiles) {
        *reinterpret_cast<uint32_t*>(grad_v + key * f.v_dim + 8 * j + 2 * tig) = pack2<T>(dv[j][2 * hr], dv[j][2 * hr + 1]);
      }
    }
  }
}

template <typename T,      // __half or __nv_bfloat16
          int kHead>       // 64 or 128: >= round16(max(D, Dv))
__global__ void __launch_bounds__(32 * kMaxWarps, 1) dq_mma_kernel(const BwdParams p) {
  constexpr int kStride = stride_of(kHead);
  constexpr int kSteps = kHead / 16;
  static_assert(kHead == 64 || kHead == 128, "head bucket of the backward");

  const FwdParams& f = p.fwd;
  const MaskDims& m = f.mask;
  extern __shared__ int4 smem_raw[];
  T* const q_s = reinterpret_cast<T*>(smem_raw);
  T* const do_s = q_s + m.block_q * kStride;
  T* const k_s = do_s + m.block_q * kStride;
  T* const v_s = k_s + 2 * kChunk * kStride;

  const int64_t qb = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int64_t hk = f.kv_head_of(h);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int gid = lane / 4, tig = lane % 4;
  const int w = m.block_kv < kChunk ? m.block_kv : kChunk;
  const int subs = m.block_kv / w;
  const int d_steps = round16(f.head_dim) / 16, dv_steps = round16(f.v_dim) / 16;
  const int d_tiles = f.head_dim / 8;
  const float scale_log2 = f.scale * kLog2e;
  const int64_t q0 = qb * m.block_q;

  const T* const k = static_cast<const T*>(f.k) + b * f.k_stride_b + hk * f.k_stride_h;
  const T* const v = static_cast<const T*>(f.v) + b * f.v_stride_b + hk * f.v_stride_h;
  auto load_chunk = [&](int s, const ChunkWalk& cw) {
    const int64_t key0 = cw.blk * m.block_kv + cw.sub * w;
    load_rows<T, kHead>(k_s + s * kChunk * kStride, k, f.k_stride_t, key0, w, f.kv_len - key0, f.head_dim);
    load_rows<T, kHead>(v_s + s * kChunk * kStride, v, f.v_stride_t, key0, w, f.kv_len - key0, f.v_dim);
  };

  load_rows<T, kHead>(q_s, static_cast<const T*>(f.q) + b * f.q_stride_b + h * f.q_stride_h, f.q_stride_t, q0,
                      m.block_q, f.q_len - q0, f.head_dim);
  load_rows<T, kHead>(do_s, static_cast<const T*>(p.grad_out) + b * p.do_stride_b + h * p.do_stride_h,
                      p.do_stride_t, q0, m.block_q, f.q_len - q0, f.v_dim);
  ChunkWalk walk{};
  walk.enter(f.kv, m, b, h, 1, qb);
  if (walk.g < 1) load_chunk(0, walk);
  cp_async_commit();

  // The thread's two rows: lse2 (+inf for no visible key or past Tq: P = 0) and Delta.
  float lse2[2], delta[2];
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int64_t i = q0 + 16 * warp + gid + 8 * hr;
    const int64_t at = (b * f.heads + h) * f.q_len + i;
    const float lse = i < f.q_len ? f.lse[at] : -INFINITY;
    lse2[hr] = lse == -INFINITY ? INFINITY : lse * kLog2e;
    delta[hr] = i < f.q_len ? p.delta[at] : 0.0f;
  }

  const int a_off = ((lane & 7) + ((lane >> 3) & 1) * 8) * kStride + (lane >> 4) * 8;
  const int b_off = ((lane & 7) + (lane >> 4) * 8) * kStride + ((lane >> 3) & 1) * 8;
  const T* const q_lane = q_s + 16 * warp * kStride + a_off;
  const T* const do_lane = do_s + 16 * warp * kStride + a_off;

  float dq[2 * kSteps][4] = {};
  int stage = 0;
  while (walk.g < 1) {
    ChunkWalk next = walk;
    next.advance(f.kv, m, b, h, 1, qb, subs);
    if (next.g < 1) load_chunk(stage ^ 1, next);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    // S = Q K^T, dP = dO V^T: [16 rows x w keys] per warp.
    const T* const kc = k_s + stage * kChunk * kStride;
    const T* const vc = v_s + stage * kChunk * kStride;
    float s[4][4] = {};
    float dp[4][4] = {};
#pragma unroll
    for (int ks = 0; ks < kSteps; ++ks) {
      if (ks >= d_steps) break;
      uint32_t a[4];
      ldmatrix_x4(a, q_lane + ks * 16);
#pragma unroll
      for (int np = 0; np < 2; ++np) {
        if (16 * np >= w) break;
        uint32_t bf[4];
        ldmatrix_x4(bf, kc + b_off + np * 16 * kStride + ks * 16);
        mma_16816<T>(s[2 * np], a, bf[0], bf[1]);
        mma_16816<T>(s[2 * np + 1], a, bf[2], bf[3]);
      }
    }
#pragma unroll
    for (int ks = 0; ks < kSteps; ++ks) {
      if (ks >= dv_steps) break;
      uint32_t a[4];
      ldmatrix_x4(a, do_lane + ks * 16);
#pragma unroll
      for (int np = 0; np < 2; ++np) {
        if (16 * np >= w) break;
        uint32_t bf[4];
        ldmatrix_x4(bf, vc + b_off + np * 16 * kStride + ks * 16);
        mma_16816<T>(dp[2 * np], a, bf[0], bf[1]);
        mma_16816<T>(dp[2 * np + 1], a, bf[2], bf[3]);
      }
    }

    // dS = P (dP - Delta) into dp, with the forward's hiding rule.
    const int c0 = walk.sub * w;
    const int64_t key0 = walk.blk * m.block_kv + c0;
    uint32_t bits[2] = {~0u, ~0u};
    if (walk.tile >= 0) {
      const int32_t* t_rows = f.tiles + (int64_t{walk.tile} * m.block_q + 16 * warp + gid) * m.words() + c0 / 32;
      bits[0] = static_cast<uint32_t>(t_rows[0]) >> (c0 % 32);
      bits[1] = static_cast<uint32_t>(t_rows[8 * m.words()]) >> (c0 % 32);
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int c = 8 * j + 2 * tig + (r & 1);
        const bool visible = c < w && key0 + c < f.kv_len && ((bits[r >> 1] >> c) & 1u);
        const float pr = visible ? exp2f(s[j][r] * scale_log2 - lse2[r >> 1]) : 0.0f;
        dp[j][r] = pr * (dp[j][r] - delta[r >> 1]);
      }
    }

    // dQ += dS K: dS accumulators as A fragments, K chunk rows transposed (k = key, n = d).
#pragma unroll
    for (int kk = 0; kk < kChunk / 16; ++kk) {
      if (16 * kk >= w) break;
      const uint32_t a[4] = {pack2<T>(dp[2 * kk][0], dp[2 * kk][1]), pack2<T>(dp[2 * kk][2], dp[2 * kk][3]),
                             pack2<T>(dp[2 * kk + 1][0], dp[2 * kk + 1][1]),
                             pack2<T>(dp[2 * kk + 1][2], dp[2 * kk + 1][3])};
#pragma unroll
      for (int nd = 0; nd < kSteps; ++nd) {
        if (2 * nd >= d_tiles) break;
        uint32_t bf[4];
        ldmatrix_x4_trans(bf, kc + a_off + kk * 16 * kStride + nd * 16);
        mma_16816<T>(dq[2 * nd], a, bf[0], bf[1]);
        mma_16816<T>(dq[2 * nd + 1], a, bf[2], bf[3]);
      }
    }
    __syncthreads();
    walk = next;
    stage ^= 1;
  }
  cp_async_wait<0>();

  T* const grad_q = static_cast<T*>(p.grad_q) + (b * f.heads + h) * f.q_len * f.head_dim;
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int64_t row = q0 + 16 * warp + gid + 8 * hr;
    if (row >= f.q_len) continue;
#pragma unroll
    for (int j = 0; j < 2 * kSteps; ++j) {
      if (j >= d_tiles) break;
      *reinterpret_cast<uint32_t*>(grad_q + row * f.head_dim + 8 * j + 2 * tig) =
          pack2<T>(dq[j][2 * hr] * f.scale, dq[j][2 * hr + 1] * f.scale);
    }
  }
}

// ---- dispatch --------------------------------------------------------------------------------------------

int head_bucket(const FwdParams& p) {
  const int dim = round16(p.head_dim > p.v_dim ? p.head_dim : p.v_dim);
  return dim <= 64 ? 64 : dim <= 128 ? 128 : 256;
}

int max_dynamic_smem() { return device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, kDefaultSmem); }

// Sets the opt-in when `smem` exceeds the default, then launches.
template <typename Kernel, typename Params>
cudaError_t launch_with_smem(Kernel kernel, dim3 grid, int threads, size_t smem, const Params& p,
                             cudaStream_t stream) {
  if (smem > size_t{kDefaultSmem}) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, threads, smem, stream>>>(p);
  return cudaGetLastError();
}

size_t smem_bytes(const FwdParams& p) {
  return static_cast<size_t>(smem_elems(head_bucket(p), p.mask.block_q)) * 2;  // fp16 / bf16 elements
}

template <typename T, int kHead>
cudaError_t launch_typed(const FwdParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.mask.q_blocks), static_cast<unsigned>(p.heads),
                  static_cast<unsigned>(p.batch));
  return launch_with_smem(fwd_mma_kernel<T, kHead>, grid, 2 * p.mask.block_q, smem_bytes(p), p, stream);
}

template <typename T>
cudaError_t launch_head(const FwdParams& p, cudaStream_t stream) {
  switch (head_bucket(p)) {
    case 64: return launch_typed<T, 64>(p, stream);
    case 128: return launch_typed<T, 128>(p, stream);
    default: return launch_typed<T, 256>(p, stream);
  }
}

// Dynamic smem of the two backward kernels (fp16 / bf16 elements, plus the dK/dV kernel's fp32 lse2 and Delta).
size_t dkdv_smem_bytes(const FwdParams& p) {
  return static_cast<size_t>(int64_t{2 * p.mask.block_kv + 4 * kChunk} * stride_of(head_bucket(p))) * 2 +
         4 * kChunk * sizeof(float);
}
size_t dq_smem_bytes(const FwdParams& p) {
  return static_cast<size_t>(int64_t{2 * p.mask.block_q + 4 * kChunk} * stride_of(head_bucket(p))) * 2;
}

template <typename T, int kHead>
cudaError_t launch_bwd_typed(const BwdParams& p, cudaStream_t stream) {
  const FwdParams& f = p.fwd;
  const dim3 kv_grid(static_cast<unsigned>(f.mask.kv_blocks), static_cast<unsigned>(f.kv_heads),
                     static_cast<unsigned>(f.batch));
  const cudaError_t err = launch_with_smem(dkdv_mma_kernel<T, kHead>, kv_grid, 2 * f.mask.block_kv,
                                           dkdv_smem_bytes(f), p, stream);
  if (err != cudaSuccess) return err;
  const dim3 q_grid(static_cast<unsigned>(f.mask.q_blocks), static_cast<unsigned>(f.heads),
                    static_cast<unsigned>(f.batch));
  return launch_with_smem(dq_mma_kernel<T, kHead>, q_grid, 2 * f.mask.block_q, dq_smem_bytes(f), p, stream);
}

template <typename T>
cudaError_t launch_bwd_head(const BwdParams& p, cudaStream_t stream) {
  return head_bucket(p.fwd) == 64 ? launch_bwd_typed<T, 64>(p, stream) : launch_bwd_typed<T, 128>(p, stream);
}

}  // namespace

bool fwd_mma_supported(const FwdParams& p) {
  if (p.dtype != DType::kF16 && p.dtype != DType::kBF16) return false;
  if (p.head_dim % 8 != 0 || p.v_dim % 8 != 0 || p.head_dim > kMaxHeadDim || p.v_dim > kMaxHeadDim) return false;
  const MaskDims& m = p.mask;
  if (m.block_q % 16 != 0 || m.block_q > 16 * kMaxWarps || (m.block_kv != 16 && m.block_kv % kChunk != 0)) {
    return false;
  }
  // cp.async moves 16-byte chunks: base pointers and every row start must be 16-byte aligned (strides in
  // elements of 2 bytes, so multiples of 8).
  if (!aligned16(p.q) || !aligned16(p.k) || !aligned16(p.v)) return false;
  for (int64_t s : {p.q_stride_b, p.q_stride_h, p.q_stride_t, p.k_stride_b, p.k_stride_h, p.k_stride_t, p.v_stride_b,
                    p.v_stride_h, p.v_stride_t}) {
    if (s % 8 != 0) return false;
  }
  if (p.heads > kMaxGridYZ || p.batch > kMaxGridYZ || m.q_blocks > 2147483647) return false;
  return smem_bytes(p) <= static_cast<size_t>(max_dynamic_smem());
}

bool bwd_mma_supported(const BwdParams& p) {
  const FwdParams& f = p.fwd;
  if (!fwd_mma_supported(f) || head_bucket(f) > 128) return false;
  if (f.mask.block_kv % 16 != 0 || f.mask.block_kv > 16 * kMaxWarps || f.kv_heads > kMaxGridYZ) return false;
  if (!aligned16(p.grad_out) || p.do_stride_b % 8 != 0 || p.do_stride_h % 8 != 0 || p.do_stride_t % 8 != 0) {
    return false;
  }
  const size_t optin = static_cast<size_t>(max_dynamic_smem());
  return dkdv_smem_bytes(f) <= optin && dq_smem_bytes(f) <= optin;
}

cudaError_t launch_bwd_mma(const BwdParams& p, cudaStream_t stream) {
  if (!bwd_mma_supported(p)) return cudaErrorInvalidValue;
  if (p.fwd.batch == 0 || p.fwd.heads == 0) return cudaSuccess;
  return p.fwd.dtype == DType::kF16 ? launch_bwd_head<__half>(p, stream) : launch_bwd_head<__nv_bfloat16>(p, stream);
}

cudaError_t launch_fwd_mma(const FwdParams& p, cudaStream_t stream) {
  if (!fwd_mma_supported(p)) return cudaErrorInvalidValue;
  if (p.batch == 0 || p.heads == 0) return cudaSuccess;
  return p.dtype == DType::kF16 ? launch_head<__half>(p, stream) : launch_head<__nv_bfloat16>(p, stream);
}

}  // namespace blockops::attention
