// Block-sparse attention on CUDA cores: the simple kernels for every dtype (the fp32 path, and the reference the
// tensor-core kernels of attention_mma_{fwd,bwd}.cu are tested against), and the dispatch between the two.
// Numerics and layouts are csrc/attention.h's; everything accumulates in fp32.
//
// One warp per output row, kWarps rows per CTA; rows are independent, so there is no block-level sync:
//
//   forward, warp = (b, h, query t):      q_t * scale * log2(e) -> warp smem (fp32)
//     for kb in partial list, then full list of t's query block:      (entries failing list_entry_ok skipped)
//       for 32 keys c of kb at a time:    lane c: s = q_t . k_c (or -inf when hidden)
//                                         m' = max(m, warp max s); p = exp2(s - m'); l = l * exp2(m - m') + sum p
//                                         lane d: o[d] = o[d] * exp2(m - m') + sum_c p_c v_c[d]   (p_c by shuffle)
//   delta, warp = (b, h, t):              Delta_t = dO_t . O_t - grad_lse_t
//   dK/dV, warp = (b, key head, key j):   for every query head of the group, for qb in j's transposed lists,
//                                         32 queries i at a time: lane i: p = exp2(q_i . k_j * scale * log2(e) - lse2_i),
//                                         ds = p (dO_i . v_j - Delta_i);  lane d: dv[d] += sum_i p_i dO_i[d],
//                                         dk[d] += scale * sum_i ds_i q_i[d]
//   dQ, warp = (b, h, query t):           same walk as the forward; lane c: ds_c; lane d: dq[d] += scale sum_c ds_c k_c[d]
//
// Each lane owns output dims d = lane + 32 i (i < kPerLane), so a head dim of 256 needs 8 accumulators per lane.
// A hidden pair contributes exactly 0 and is skipped, so positions beyond Tq / Tk are never read.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "attention_launch.h"
#include "device_common.cuh"

namespace blockops::attention {
namespace {

constexpr int kWarps = 4;                    // rows per CTA: small CTAs keep a sparse row's idle warps few
constexpr int kThreads = 32 * kWarps;        // launch bounds (kThreads, 1): with no minimum CTA count ptxas
                                             // (CUDA 13) trades a few spills for occupancy on sm_90a
constexpr int kPerLane = kMaxHeadDim / 32;   // output dims per lane
constexpr int kMaxGridX = 2147483647;        // grid.x limit; one CTA per kWarps rows stays far below it

// dot(row in warp smem (fp32), row in global memory of `type`), n elements.
__device__ __forceinline__ float dot_row(const float* s, const void* g, DType type, int64_t off, int n) {
  float acc = 0.0f;
  for (int d = 0; d < n; ++d) acc += s[d] * load_float(g, type, off + d);
  return acc;
}

// acc[i] += w * row[lane + 32 i] for the lane's dims below n.
__device__ __forceinline__ void axpy_row(float (&acc)[kPerLane], float w, const void* g, DType type, int64_t off,
                                         int n, int lane) {
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d < n) acc[i] += w * load_float(g, type, off + d);
  }
}

// Calls f(block, tile) for each usable entry of the lists of mask row `mask_row` and block n: the partial
// entries with their bit tile [block_q][W] first, then the full entries with tile == nullptr. One call site, so
// the (large) body is inlined once.
template <typename F>
__device__ __forceinline__ void for_each_block(const BlockLists& L, const MaskDims& m, const int32_t* tiles,
                                               int64_t mask_row, int64_t n, F&& f) {
  const int64_t at = mask_row * L.n + n;
  const int32_t* idx = L.idx + at * L.width;
  const int32_t* tile_ids = L.tile_ids + at * L.width;
  const int32_t* full_idx = L.full_idx + at * L.width;
  const int np = list_count(L.num[at], L.width);
  const int total = np + list_count(L.full_num[at], L.width);
  for (int e = 0; e < total; ++e) {
    const bool partial = e < np;
    const int32_t blk = partial ? idx[e] : full_idx[e - np];
    if (!list_entry_ok(blk, L.width, partial ? tile_ids + e : nullptr, m.num_tiles)) continue;
    f(static_cast<int64_t>(blk),
      partial ? tiles + static_cast<int64_t>(tile_ids[e]) * m.block_q * m.words() : static_cast<const int32_t*>(nullptr));
  }
}

// The output row this warp computes: index `row` (kWarps rows per CTA) of a [batch, heads, len] flattening, with its
// (b, head, t); in_range is false past the end (the warp returns: warp-uniform).
struct WarpRow {
  int64_t row, b, head, t;
  bool in_range;
};
__device__ __forceinline__ WarpRow warp_row(int warp, int64_t batch, int64_t heads, int64_t len) {
  const int64_t row = int64_t{blockIdx.x} * kWarps + warp;
  return {row, row / (len * heads), (row / len) % heads, row % len, row < batch * heads * len};
}

// Loads n elements of a global row into warp smem, times `mul`; the warp syncs so every lane sees all of it.
__device__ __forceinline__ void stage_row(float* s, const void* g, DType type, int64_t off, int n, float mul,
                                          int lane) {
  for (int d = lane; d < n; d += 32) s[d] = load_float(g, type, off + d) * mul;
  __syncwarp();
}

template <DType kT>  // element type of q, k, v, dO, O and the outputs: the loads compile to one type
__global__ void __launch_bounds__(kThreads, 1) fwd_simple_kernel(const FwdParams p) {
  __shared__ float q_s[kWarps][kMaxHeadDim];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const auto [row, b, h, t, in_range] = warp_row(warp, p.batch, p.heads, p.q_len);
  if (!in_range) return;
  const int64_t hk = p.kv_head_of(h);
  const MaskDims& m = p.mask;
  const int r = static_cast<int>(t % m.block_q);  // tile row
  const float* q = q_s[warp];
  stage_row(q_s[warp], p.q, kT, b * p.q_stride_b + h * p.q_stride_h + t * p.q_stride_t, p.head_dim,
            p.scale * kLog2e, lane);
  const int64_t k_base = b * p.k_stride_b + hk * p.k_stride_h;
  const int64_t v_base = b * p.v_stride_b + hk * p.v_stride_h;

  float mx = -INFINITY, l = 0.0f;
  float o[kPerLane] = {};
  for_each_block(p.kv, m, p.tiles, m.row(b, h), t / m.block_q, [&](int64_t kb, const int32_t* tile) {
    for (int c0 = 0; c0 < m.block_kv; c0 += 32) {
      const int c = c0 + lane;
      const int64_t key = kb * m.block_kv + c;
      const bool visible = c < m.block_kv && key < p.kv_len &&
                           (tile == nullptr || tile_bit(tile + r * m.words(), c));
      const float s = visible ? dot_row(q, p.k, kT, k_base + key * p.k_stride_t, p.head_dim) : -INFINITY;
      const float mx_new = fmaxf(mx, warp_max(s));   // fmaxf drops NaN: l carries it instead (attention.h)
      // Nothing visible so far (warp-uniform): skip, unless a score is NaN, which must make l NaN (the extra
      // reduction runs only in chunks where the row has seen nothing yet).
      if (mx_new == -INFINITY && warp_sum(s != s ? 1.0f : 0.0f) == 0.0f) continue;
      const float alpha = exp2f(mx - mx_new);  // 0 while mx is -inf
      const float pr = visible ? exp2f(s - mx_new) : 0.0f;
      l = l * alpha + warp_sum(pr);
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) o[i] *= alpha;
      for (int j = 0; j < 32; ++j) {
        const float pj = __shfl_sync(kFullMask, pr, j);
        if (pj == 0.0f) continue;  // hidden (or underflowed) key: adds nothing, and may be beyond Tk
        axpy_row(o, pj, p.v, kT, v_base + (kb * m.block_kv + c0 + j) * p.v_stride_t, p.v_dim, lane);
      }
      mx = mx_new;
    }
  });

  const float inv_l = row_out_scale(l);  // attention.h: an empty row (l == 0) gets 0, a NaN row NaN
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d < p.v_dim) store_float(p.out, kT, row * p.v_dim + d, o[i] * inv_l);
  }
  if (lane == 0) static_cast<float*>(p.lse)[row] = row_lse(mx, l);
}

// Delta_t = dO_t . O_t - grad_lse_t (csrc/attention.h), one warp per row.
template <DType kT>  // element type of q, k, v, dO, O and the outputs: the loads compile to one type
__global__ void __launch_bounds__(kThreads, 1) delta_kernel(const BwdParams p) {
  const FwdParams& f = p.fwd;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const auto [row, b, h, t, in_range] = warp_row(warp, f.batch, f.heads, f.q_len);
  if (!in_range) return;
  const int64_t do_off = b * p.do_stride_b + h * p.do_stride_h + t * p.do_stride_t;
  float acc = 0.0f;
  for (int d = lane; d < f.v_dim; d += 32) {
    acc += load_float(p.grad_out, kT, do_off + d) * load_float(f.out, kT, row * f.v_dim + d);
  }
  acc = warp_sum(acc);
  const float* grad_lse = static_cast<const float*>(p.grad_lse);
  if (lane == 0) static_cast<float*>(p.delta)[row] = grad_lse != nullptr ? acc - grad_lse[row] : acc;
}

// dK, dV of one key row j of (b, key head hk), summed over the query heads of its group.
template <DType kT>  // element type of q, k, v, dO, O and the outputs: the loads compile to one type
__global__ void __launch_bounds__(kThreads, 1) dkdv_simple_kernel(const BwdParams p) {
  __shared__ float k_s[kWarps][kMaxHeadDim];
  __shared__ float v_s[kWarps][kMaxHeadDim];
  const FwdParams& f = p.fwd;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const auto [row, b, hk, j, in_range] = warp_row(warp, f.batch, f.kv_heads, f.kv_len);  // key j of (b, hk)
  if (!in_range) return;
  const MaskDims& m = f.mask;
  const int c = static_cast<int>(j % m.block_kv);  // tile column
  const int64_t group = f.heads / f.kv_heads;
  stage_row(k_s[warp], f.k, kT, b * f.k_stride_b + hk * f.k_stride_h + j * f.k_stride_t, f.head_dim,
            f.scale * kLog2e, lane);
  stage_row(v_s[warp], f.v, kT, b * f.v_stride_b + hk * f.v_stride_h + j * f.v_stride_t, f.v_dim, 1.0f, lane);

  float dk[kPerLane] = {}, dv[kPerLane] = {};
  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    const int64_t q_base = b * f.q_stride_b + h * f.q_stride_h;
    const int64_t do_base = b * p.do_stride_b + h * p.do_stride_h;
    const int64_t bh = b * f.heads + h;
    for_each_block(p.q, m, f.tiles, m.row(b, h), j / m.block_kv, [&](int64_t qb, const int32_t* tile) {
      for (int r0 = 0; r0 < m.block_q; r0 += 32) {
        const int r = r0 + lane;
        const int64_t i = qb * m.block_q + r;
        float pr = 0.0f, ds = 0.0f;
        if (r < m.block_q && i < f.q_len && (tile == nullptr || tile_bit(tile + r * m.words(), c))) {
          const float lse = static_cast<const float*>(f.lse)[bh * f.q_len + i];
          if (lse != -INFINITY) {  // a row with no visible key has no gradient
            const float s = dot_row(k_s[warp], f.q, kT, q_base + i * f.q_stride_t, f.head_dim);
            pr = exp2f(s - lse * kLog2e);
            const float dp = dot_row(v_s[warp], p.grad_out, kT, do_base + i * p.do_stride_t, f.v_dim);
            ds = pr * (dp - static_cast<const float*>(p.delta)[bh * f.q_len + i]);
          }
        }
        for (int e = 0; e < 32; ++e) {
          const float pe = __shfl_sync(kFullMask, pr, e);
          const float dse = __shfl_sync(kFullMask, ds, e);
          if (pe == 0.0f && dse == 0.0f) continue;  // hidden query: nothing to add, and may be beyond Tq
          const int64_t ie = qb * m.block_q + r0 + e;
          axpy_row(dv, pe, p.grad_out, kT, do_base + ie * p.do_stride_t, f.v_dim, lane);
          axpy_row(dk, dse, f.q, kT, q_base + ie * f.q_stride_t, f.head_dim, lane);
        }
      }
    });
  }
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d < f.head_dim) store_float(p.grad_k, kT, row * f.head_dim + d, dk[i] * f.scale);
    if (d < f.v_dim) store_float(p.grad_v, kT, row * f.v_dim + d, dv[i]);
  }
}

// dQ of one query row t of (b, h), from the forward lists.
template <DType kT>  // element type of q, k, v, dO, O and the outputs: the loads compile to one type
__global__ void __launch_bounds__(kThreads, 1) dq_simple_kernel(const BwdParams p) {
  __shared__ float q_s[kWarps][kMaxHeadDim];
  __shared__ float do_s[kWarps][kMaxHeadDim];
  const FwdParams& f = p.fwd;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const auto [row, b, h, t, in_range] = warp_row(warp, f.batch, f.heads, f.q_len);
  if (!in_range) return;
  const int64_t hk = f.kv_head_of(h);
  const MaskDims& m = f.mask;
  const int r = static_cast<int>(t % m.block_q);
  const float lse = static_cast<const float*>(f.lse)[row];
  float dq[kPerLane] = {};
  if (lse != -INFINITY) {  // warp-uniform; a row with no visible key has dq = 0
    const float lse2 = lse * kLog2e, delta = static_cast<const float*>(p.delta)[row];
    stage_row(q_s[warp], f.q, kT, b * f.q_stride_b + h * f.q_stride_h + t * f.q_stride_t, f.head_dim,
              f.scale * kLog2e, lane);
    stage_row(do_s[warp], p.grad_out, kT, b * p.do_stride_b + h * p.do_stride_h + t * p.do_stride_t, f.v_dim,
              1.0f, lane);
    const int64_t k_base = b * f.k_stride_b + hk * f.k_stride_h;
    const int64_t v_base = b * f.v_stride_b + hk * f.v_stride_h;
    for_each_block(f.kv, m, f.tiles, m.row(b, h), t / m.block_q, [&](int64_t kb, const int32_t* tile) {
      for (int c0 = 0; c0 < m.block_kv; c0 += 32) {
        const int c = c0 + lane;
        const int64_t key = kb * m.block_kv + c;
        float ds = 0.0f;
        if (c < m.block_kv && key < f.kv_len && (tile == nullptr || tile_bit(tile + r * m.words(), c))) {
          const float pr = exp2f(dot_row(q_s[warp], f.k, kT, k_base + key * f.k_stride_t, f.head_dim) - lse2);
          ds = pr * (dot_row(do_s[warp], f.v, kT, v_base + key * f.v_stride_t, f.v_dim) - delta);
        }
        for (int e = 0; e < 32; ++e) {
          const float dse = __shfl_sync(kFullMask, ds, e);
          if (dse == 0.0f) continue;
          axpy_row(dq, dse, f.k, kT, k_base + (kb * m.block_kv + c0 + e) * f.k_stride_t, f.head_dim, lane);
        }
      }
    });
  }
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d < f.head_dim) store_float(p.grad_q, kT, row * f.head_dim + d, dq[i] * f.scale);
  }
}

// CTAs for one warp per row; 0 when there is nothing to do.
int64_t ctas_for(int64_t rows) { return (rows + kWarps - 1) / kWarps; }

// Calls f(std::integral_constant<DType, t>) for the runtime dtype t: the simple kernels are compiled per dtype, so
// their element loads have no per-element switch.
template <typename F>
void dtype_switch(DType t, F&& f) {
  switch (t) {
    case DType::kF16: return f(std::integral_constant<DType, DType::kF16>{});
    case DType::kBF16: return f(std::integral_constant<DType, DType::kBF16>{});
    default: return f(std::integral_constant<DType, DType::kF32>{});
  }
}

}  // namespace

CudaPath forward_path(const FwdParams& p) {
  return p.dtype != DType::kF32 && fwd_mma_supported(p) ? CudaPath::kMma : CudaPath::kSimple;
}

CudaPath backward_path(const BwdParams& p) {
  return p.fwd.dtype != DType::kF32 && bwd_mma_supported(p) ? CudaPath::kMma : CudaPath::kSimple;
}

cudaError_t launch_block_sparse_attention_fwd(const FwdParams& p, cudaStream_t stream) {
  const int64_t ctas = ctas_for(p.batch * p.heads * p.q_len);
  if (ctas == 0) return cudaSuccess;
  if (ctas > kMaxGridX) return cudaErrorInvalidValue;
  if (forward_path(p) == CudaPath::kMma) return launch_fwd_mma(p, stream);
  dtype_switch(p.dtype, [&](auto t) {
    fwd_simple_kernel<decltype(t)::value><<<static_cast<unsigned>(ctas), kThreads, 0, stream>>>(p);
  });
  return cudaGetLastError();
}

cudaError_t launch_block_sparse_attention_bwd(const BwdParams& p, cudaStream_t stream) {
  const FwdParams& f = p.fwd;
  const int64_t q_ctas = ctas_for(f.batch * f.heads * f.q_len);
  const int64_t k_ctas = ctas_for(f.batch * f.kv_heads * f.kv_len);
  if (q_ctas == 0) return cudaSuccess;  // B or H is 0: no gradient element exists
  if (q_ctas > kMaxGridX || k_ctas > kMaxGridX) return cudaErrorInvalidValue;
  dtype_switch(f.dtype, [&](auto t) {
    delta_kernel<decltype(t)::value><<<static_cast<unsigned>(q_ctas), kThreads, 0, stream>>>(p);
  });
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  if (backward_path(p) == CudaPath::kMma) return launch_bwd_mma(p, stream);
  dtype_switch(f.dtype, [&](auto t) {
    dkdv_simple_kernel<decltype(t)::value><<<static_cast<unsigned>(k_ctas), kThreads, 0, stream>>>(p);
  });
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  dtype_switch(f.dtype, [&](auto t) {
    dq_simple_kernel<decltype(t)::value><<<static_cast<unsigned>(q_ctas), kThreads, 0, stream>>>(p);
  });
  return cudaGetLastError();
}

}  // namespace blockops::attention
