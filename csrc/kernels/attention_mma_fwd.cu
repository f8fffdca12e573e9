// Block-sparse attention forward on tensor cores for fp16/bf16 (FlashAttention-2 style): online softmax in
// registers in base 2 (csrc/attention.h), only the listed blocks visited. Tile layout, fragment map and the warp
// GEMM: attention_mma.cuh.
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
//     (P goes from the S accumulators straight into A fragments; V's B fragments come from ldmatrix.x4.trans;
//     a partial block whose V chunk holds a NaN / Inf adds P V over its visible pairs only: pv_visible_pairs)
//   out = O / l, lse = (m + log2 l) / log2(e); a row with no visible key: out = 0, lse = -inf
#include "attention_mma.cuh"

namespace blockops::attention {
namespace {

// Elements of dynamic smem: Q rows, then two stages of K and of V.
__host__ __device__ constexpr int64_t smem_elems(int head, int block_q) {
  return int64_t{block_q + 4 * kChunk} * stride_of(head);
}

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
  const HeadAxis dh = head_axis(p.head_dim), dvh = head_axis(p.v_dim);
  const float scale_log2 = p.scale * kLog2e;

  const T* const q = static_cast<const T*>(p.q) + b * p.q_stride_b + h * p.q_stride_h;
  const T* const k = static_cast<const T*>(p.k) + b * p.k_stride_b + hk * p.k_stride_h;
  const T* const v = static_cast<const T*>(p.v) + b * p.v_stride_b + hk * p.v_stride_h;
  const int64_t q0 = qb * m.block_q;

  const ListCursor cur = ListCursor::of(p.kv, m, m.row(b, h), qb);
  const int total = cur.np + cur.nf;

  load_rows<T, kHead>(q_s, q, p.q_stride_t, q0, m.block_q, p.q_len - q0, p.head_dim);
  cp_async_commit();
  int64_t kb = 0;
  int tile = -1;
  int e = cur.next(0, kb, tile);
  int sub = 0;
  if (e < total) load_kv_chunk<T, kHead>(k_s, v_s, 0, k, v, p, kb, 0, w);
  cp_async_commit();
  cp_async_wait<1>();  // Q has landed (the first chunk may still be in flight) ...
  __syncthreads();     // ... for every thread

  // ldmatrix row offsets of this lane: A (Q) and trans-B (V) a_off, B (K, [key][d]) b_off.
  const int a_off = a_lane_offset<kStride>(lane);
  const int b_off = b_lane_offset<kStride>(lane);
  const T* const q_lane = q_s + 16 * warp * kStride + a_off;

  uint32_t qf[kQInRegs ? kSteps : 1][4];
  if constexpr (kQInRegs) {
#pragma unroll
    for (int ks = 0; ks < kSteps; ++ks) {
      if (ks < dh.steps) ldmatrix_x4(qf[ks], q_lane + ks * 16);
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
    if (next_e < total) load_kv_chunk<T, kHead>(k_s, v_s, stage ^ 1, k, v, p, next_kb, next_sub, w);
    cp_async_commit();
    cp_async_wait<1>();  // this thread's copies of the current chunk have landed ...
    __syncthreads();     // ... and everyone's
    // A partial block whose V chunk holds a NaN / Inf (rare) takes the visible-pairs P V below; `tile` is the same
    // for the whole block, so either every thread reaches the barrier-or or none does.
    const T* const v_chunk = v_s + stage * kChunk * kStride;
    const bool v_nonfinite =
        tile >= 0 && __syncthreads_or(chunk_share_nonfinite<T, kHead>(v_chunk, w, p.v_dim));

    // S = Q K^T for this warp's 16 rows and the chunk's w keys.
    const T* const k_lane = k_s + stage * kChunk * kStride + b_off;
    float s[4][4] = {};
    if constexpr (kQInRegs) {
      warp_gemm<kStride, kSteps, false>(s, RegFragA<kSteps>{qf}, k_lane, dh, w);
    } else {
      warp_gemm<kStride, kSteps, false>(s, SmemFragA<T>{q_lane}, k_lane, dh, w);
    }

    // Scale to base 2 and hide keys: the bit tile's word of this chunk for the thread's two rows, key < Tk.
    const int c0 = sub * w;  // first key of the chunk within its block
    const int64_t key0 = kb * m.block_kv + c0;
    uint32_t bits[2];
    row_bits(bits, p.tiles, m, tile, warp, gid, c0);
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

    // O += P V: P's accumulators are the A fragments (AccFragA), V's B fragments come transposed from smem.
    if (!v_nonfinite) {
      warp_gemm<kStride, kChunk / 16, true>(o, acc_frags<T>(s), v_chunk + a_off, dvh, w);
    } else {
      pv_visible_pairs<T>(o, s, v_chunk, kStride, bits, p.kv_len - key0, dvh, w, lane);
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
    // attention.h: an empty row (l == 0) gets exactly 0, a NaN row (l NaN: exp2f keeps a NaN score's NaN although
    // fmaxf drops it from the maximum) NaN output and lse.
    const bool empty = row_empty(l);
    const float inv_l = row_out_scale(l);
#pragma unroll
    for (int j = 0; j < 2 * kSteps; ++j) {
      if (j >= dvh.tiles) break;
      *reinterpret_cast<uint32_t*>(out + row * p.v_dim + 8 * j + 2 * tig) =
          pack2<T>(empty ? 0.0f : o[j][2 * hr] * inv_l, empty ? 0.0f : o[j][2 * hr + 1] * inv_l);
    }
    if (tig == 0) static_cast<float*>(p.lse)[(b * p.heads + h) * p.q_len + row] = row_lse(row_max[hr], l);
  }
}

// ---- dispatch --------------------------------------------------------------------------------------------

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

cudaError_t launch_fwd_mma(const FwdParams& p, cudaStream_t stream) {
  if (!fwd_mma_supported(p)) return cudaErrorInvalidValue;
  if (p.batch == 0 || p.heads == 0) return cudaSuccess;
  return p.dtype == DType::kF16 ? launch_head<__half>(p, stream) : launch_head<__nv_bfloat16>(p, stream);
}

}  // namespace blockops::attention
