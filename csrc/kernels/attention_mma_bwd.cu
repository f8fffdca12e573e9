// Block-sparse attention backward on tensor cores for fp16/bf16: two deterministic passes (no atomics), each output
// element written by one CTA. Delta = rowsum(dO * O) - grad_lse comes first (attention.cu's delta_kernel). Tile
// layout, fragment map and the warp GEMM: attention_mma.cuh.
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
#include "attention_mma.cuh"

namespace blockops::attention {
namespace {

// One step of a walk over the lists of `heads` consecutive query heads h0.. (one for dQ): chunk `sub` of entry e of
// head h0 + g, with its block and tile id (-1: full). Copyable, so the prefetch advances a copy.
struct ChunkWalk {
  ListCursor cur;
  int g, e, sub;
  int64_t blk;
  int tile;

  // Moves to head h0 + g (and on, past heads with no usable entry); g == heads: done.
  __device__ __forceinline__ void enter(const BlockLists& L, const MaskDims& m, int64_t b, int64_t h0, int heads,
                                        int64_t n) {
    for (; g < heads; ++g) {
      cur = ListCursor::of(L, m, m.row(b, h0 + g), n);
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
  const HeadAxis dh = head_axis(f.head_dim), dvh = head_axis(f.v_dim);
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
      const float lse = i < f.q_len ? static_cast<const float*>(f.lse)[at] : -INFINITY;
      lse2_s[s * kChunk + r] = lse == -INFINITY ? INFINITY : lse * kLog2e;
      delta_s[s * kChunk + r] = i < f.q_len ? static_cast<const float*>(p.delta)[at] : 0.0f;
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

  // ldmatrix lane offsets: a_off for A operands and transposed B, b_off for [n][k] B operands.
  const int a_off = a_lane_offset<kStride>(lane);
  const int b_off = b_lane_offset<kStride>(lane);
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
    warp_gemm<kStride, kSteps, false>(st, SmemFragA<T>{k_lane}, qc + b_off, dh, wq);
    warp_gemm<kStride, kSteps, false>(dpt, SmemFragA<T>{v_lane}, doc + b_off, dvh, wq);

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

    // dV += P^T dO, dK += dS^T Q: keys x queries accumulators as A fragments, dO / Q chunk rows transposed. The two
    // products share one loop, interleaved per n-tile pair: the instruction order this kernel has always had (two
    // warp_gemm calls, one product after the other, make ptxas allocate ~30 fewer registers and schedule anew).
#pragma unroll
    for (int kk = 0; kk < kChunk / 16; ++kk) {
      if (16 * kk >= wq) break;
      uint32_t ap[4], ad[4];
      acc_frags<T>(st)(kk, ap);
      acc_frags<T>(dpt)(kk, ad);
#pragma unroll
      for (int nd = 0; nd < kSteps; ++nd) {
        if (2 * nd < dvh.tiles) mma_pair<kStride, true>(dv, ap, doc + a_off, kk, nd);
        if (2 * nd < dh.tiles) mma_pair<kStride, true>(dk, ad, qc + a_off, kk, nd);
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
      if (j < dh.tiles) {
        *reinterpret_cast<uint32_t*>(grad_k + key * f.head_dim + 8 * j + 2 * tig) =
            pack2<T>(dk[j][2 * hr] * f.scale, dk[j][2 * hr + 1] * f.scale);
      }
      if (j < dvh.tiles) {
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
  const HeadAxis dh = head_axis(f.head_dim), dvh = head_axis(f.v_dim);
  const float scale_log2 = f.scale * kLog2e;
  const int64_t q0 = qb * m.block_q;

  const T* const k = static_cast<const T*>(f.k) + b * f.k_stride_b + hk * f.k_stride_h;
  const T* const v = static_cast<const T*>(f.v) + b * f.v_stride_b + hk * f.v_stride_h;

  load_rows<T, kHead>(q_s, static_cast<const T*>(f.q) + b * f.q_stride_b + h * f.q_stride_h, f.q_stride_t, q0,
                      m.block_q, f.q_len - q0, f.head_dim);
  load_rows<T, kHead>(do_s, static_cast<const T*>(p.grad_out) + b * p.do_stride_b + h * p.do_stride_h,
                      p.do_stride_t, q0, m.block_q, f.q_len - q0, f.v_dim);
  ChunkWalk walk{};
  walk.enter(f.kv, m, b, h, 1, qb);
  if (walk.g < 1) load_kv_chunk<T, kHead>(k_s, v_s, 0, k, v, f, walk.blk, walk.sub, w);
  cp_async_commit();

  // The thread's two rows: lse2 (+inf for no visible key or past Tq: P = 0) and Delta.
  float lse2[2], delta[2];
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int64_t i = q0 + 16 * warp + gid + 8 * hr;
    const int64_t at = (b * f.heads + h) * f.q_len + i;
    const float lse = i < f.q_len ? static_cast<const float*>(f.lse)[at] : -INFINITY;
    lse2[hr] = lse == -INFINITY ? INFINITY : lse * kLog2e;
    delta[hr] = i < f.q_len ? static_cast<const float*>(p.delta)[at] : 0.0f;
  }

  const int a_off = a_lane_offset<kStride>(lane);
  const int b_off = b_lane_offset<kStride>(lane);
  const T* const q_lane = q_s + 16 * warp * kStride + a_off;
  const T* const do_lane = do_s + 16 * warp * kStride + a_off;

  float dq[2 * kSteps][4] = {};
  int stage = 0;
  while (walk.g < 1) {
    ChunkWalk next = walk;
    next.advance(f.kv, m, b, h, 1, qb, subs);
    if (next.g < 1) load_kv_chunk<T, kHead>(k_s, v_s, stage ^ 1, k, v, f, next.blk, next.sub, w);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    // S = Q K^T, dP = dO V^T: [16 rows x w keys] per warp.
    const T* const kc = k_s + stage * kChunk * kStride;
    const T* const vc = v_s + stage * kChunk * kStride;
    float s[4][4] = {};
    float dp[4][4] = {};
    warp_gemm<kStride, kSteps, false>(s, SmemFragA<T>{q_lane}, kc + b_off, dh, w);
    warp_gemm<kStride, kSteps, false>(dp, SmemFragA<T>{do_lane}, vc + b_off, dvh, w);

    // dS = P (dP - Delta) into dp, with the forward's hiding rule.
    const int c0 = walk.sub * w;
    const int64_t key0 = walk.blk * m.block_kv + c0;
    uint32_t bits[2];
    row_bits(bits, f.tiles, m, walk.tile, warp, gid, c0);
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
    warp_gemm<kStride, kChunk / 16, true>(dq, acc_frags<T>(dp), kc + a_off, dh, w);
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
      if (j >= dh.tiles) break;
      *reinterpret_cast<uint32_t*>(grad_q + row * f.head_dim + 8 * j + 2 * tig) =
          pack2<T>(dq[j][2 * hr] * f.scale, dq[j][2 * hr + 1] * f.scale);
    }
  }
}

// ---- dispatch --------------------------------------------------------------------------------------------

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

}  // namespace blockops::attention
