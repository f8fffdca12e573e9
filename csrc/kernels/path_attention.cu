// PaTH attention on CUDA cores: the simple, correct version of the chunked UT-transform algorithm of the CPU
// kernels (csrc/path_attention_cpu*.cpp), with the numerics of csrc/path_attention.h shared by both. Everything is
// fp32; q/k/v are read in their dtype (fp16/bf16/fp32) and w/beta/g in theirs, once, into fp32 buffers.
//
// Work partition (C = kChunk = 64 tokens per chunk, g = global chunk index over all sequences):
//
//   gate_prefix_kernel     thread per (sequence, query head): G = cumsum(g), fp64 running sum   (with a gate)
//   prepare_chunks_kernel  CTA per (key head, g): the chunk's UT transform (T, U, TDW, Kbar) into its fp32 block
//                          (path_attention.h ChunkLayout, both orientations); the C x C matrices in shared memory
//   forward_kernel         CTA per (query head, g), latest chunks first: Q0, QW, S, acc in shared memory (fp16 /
//                          bf16: the products on tensor cores, block_matmul_mma);
//                            intra-chunk logits M = Q K^T - tril(Q W^T) U, Q0 = Q - tril(Q W^T) TDW, then key chunks
//                            right to left: S = Q0 Kbar^T, online softmax with V, Q0 -= (Q0 W^T) TDW
//   key_cache_kernel       CTA per (sequence, key head): chunks right to left with the running D x D product A
//   backward_kernel        CTA per (sequence, key head), as the CPU kernel's task: every query chunk of every query
//                          head of the group, accumulating into the key chunks' gradient slots (GradLayout) and
//                          writing dq and dG; no atomics, so the result is deterministic
//   ut_backward_kernel     CTA per (key head, g): the chunk's UT backward (five phases) -> dw, dk, dv, dbeta
//   gate_grad_kernel       thread per (sequence, query head): dg = reverse cumsum of dG (also without a gate)
//   decode_kernel          CTA per (row, key head): one decoding step over the fp32 cache (path_decode_step)
//
// Every matrix product is block_matmul: one thread per output entry, the k sum serial (a fixed order, so results
// do not depend on the launch), operands in shared or global memory (the chunk blocks are small and L2-resident).
// The fp16/bf16 forward runs the same products on tensor cores (mma.sync.m16n8k16, operands rounded to the input
// dtype as they are gathered into fragments, fp32 accumulation): a first step, without an ldmatrix / cp.async
// pipeline. The CUDA-core version is the reference both are tested against, not a fast kernel.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "device_common.cuh"
#include "mma_ptx.cuh"
#include "path_attention_launch.h"

namespace blockops::path_attention {
namespace {

constexpr int kThreads = 256;            // per CTA: 4 outputs per thread of a 64 x 16 product, enough for the
                                         // 64 x 64 x D tiles without register pressure
constexpr int C = kChunk;

// The PTX wrappers (mma_ptx.cuh) this kernel uses.
using mma::mma_16816;

// ---- element helpers -------------------------------------------------------------------------------------

// Cm [m, n] = (accumulate ? Cm : 0) + alpha * op(A) B, op(A) = A [m, k] (lda) or with kTransA A^T for A [k, m].
// One thread per output entry, k summed in order. Ends with __syncthreads (every call is block-uniform).
template <bool kTransA>  // A stored transposed
__device__ void block_matmul(int m, int n, int k, float alpha, const float* A, int lda, const float* B, int ldb,
                             float* Cm, int ldc, bool accumulate) {
  for (int idx = threadIdx.x; idx < m * n; idx += blockDim.x) {
    const int i = idx / n, j = idx - i * n;
    float acc = 0.f;
    for (int kk = 0; kk < k; ++kk) {
      const float a = kTransA ? A[static_cast<int64_t>(kk) * lda + i] : A[static_cast<int64_t>(i) * lda + kk];
      acc += a * B[static_cast<int64_t>(kk) * ldb + j];
    }
    float* c = Cm + static_cast<int64_t>(i) * ldc + j;
    *c = accumulate ? *c + alpha * acc : alpha * acc;
  }
  __syncthreads();
}

// block_matmul on tensor cores: the fp32 operands are rounded to T (fp16 or bf16) as they are gathered into
// mma.sync.m16n8k16 fragments (PTX ISA fragment layouts: A rows group / group + 8, columns 2 tig + {0, 1} and
// + 8; B rows 2 tig + {0, 1} and + 8, column group; C rows group / group + 8, columns 2 tig + {0, 1}), fp32
// accumulation. One warp per 16 x 8 output tile; rows >= m and k-steps past k read as zero; n a multiple of 8.
// Ends with __syncthreads.
template <typename T, bool kTransA>  // T: fp16 / bf16 fragment type; A stored transposed
__device__ void block_matmul_mma(int m, int n, int k, float alpha, const float* A, int lda, const float* B, int ldb,
                                 float* Cm, int ldc, bool accumulate) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, group = lane / 4, tig = lane % 4;
  const int m_tiles = (m + 15) / 16, n_tiles = n / 8;
  auto a_at = [&](int r, int c) -> float {
    if (r >= m || c >= k) return 0.f;
    return kTransA ? A[static_cast<int64_t>(c) * lda + r] : A[static_cast<int64_t>(r) * lda + c];
  };
  auto b_at = [&](int r, int c) -> float { return r < k ? B[static_cast<int64_t>(r) * ldb + c] : 0.f; };
  for (int tile = warp; tile < m_tiles * n_tiles; tile += blockDim.x / 32) {   // warp-uniform
    const int r0 = (tile / n_tiles) * 16, c0 = (tile % n_tiles) * 8;
    const int ra = r0 + group, rb = ra + 8, cb = c0 + group;
    float d[4] = {0.f, 0.f, 0.f, 0.f};
    for (int k0 = 0; k0 < k; k0 += 16) {
      const int ka = k0 + 2 * tig;
      const uint32_t a[4] = {pack2<T>(a_at(ra, ka), a_at(ra, ka + 1)), pack2<T>(a_at(rb, ka), a_at(rb, ka + 1)),
                             pack2<T>(a_at(ra, ka + 8), a_at(ra, ka + 9)),
                             pack2<T>(a_at(rb, ka + 8), a_at(rb, ka + 9))};
      mma_16816<T>(d, a, pack2<T>(b_at(ka, cb), b_at(ka + 1, cb)), pack2<T>(b_at(ka + 8, cb), b_at(ka + 9, cb)));
    }
    for (int i = 0; i < 4; ++i) {
      const int r = (i < 2 ? ra : rb), c = c0 + 2 * tig + (i & 1);
      if (r < m) {
        float* out = Cm + static_cast<int64_t>(r) * ldc + c;
        *out = accumulate ? *out + alpha * d[i] : alpha * d[i];
      }
    }
  }
  __syncthreads();
}

// The forward's products: CUDA cores in fp32 (MmaT = float) or tensor cores with fp16 / bf16 fragments.
template <typename MmaT, bool kTransA>  // MmaT: float, __half or __nv_bfloat16; A stored transposed
__device__ __forceinline__ void matmul(int m, int n, int k, float alpha, const float* A, int lda, const float* B,
                                       int ldb, float* Cm, int ldc, bool accumulate) {
  if constexpr (std::is_same_v<MmaT, float>) {
    block_matmul<kTransA>(m, n, k, alpha, A, lda, B, ldb, Cm, ldc, accumulate);
  } else {
    block_matmul_mma<MmaT, kTransA>(m, n, k, alpha, A, lda, B, ldb, Cm, ldc, accumulate);
  }
}

// dst [rows, cols] (ld_dst) = src [rows, cols] (ld_src); ends with __syncthreads.
__device__ void block_copy(int rows, int cols, const float* src, int ld_src, float* dst, int ld_dst) {
  for (int idx = threadIdx.x; idx < rows * cols; idx += blockDim.x) {
    const int r = idx / cols, c = idx - r * cols;
    dst[static_cast<int64_t>(r) * ld_dst + c] = src[static_cast<int64_t>(r) * ld_src + c];
  }
  __syncthreads();
}

__device__ void block_fill(float* p, int64_t n, float v) {
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) p[i] = v;
  __syncthreads();
}

// Zeroes the entries above the diagonal of rows [0, n) of M [*, C]: tril of a product with the chunk's own rows.
__device__ void block_tril(int n, float* M) {
  for (int idx = threadIdx.x; idx < n * C; idx += blockDim.x)
    if (idx % C > idx / C) M[idx] = 0.f;
  __syncthreads();
}

// gram = W W^T and wk = W K^T (strictly lower), T (row by row: each row needs the earlier ones), U, for n rows of
// W, K [n, d] (fp32, ld d); the n x n results have ld n (path_attention.h).
__device__ void chunk_ut(int n, int d, const float* W, const float* K, const float* beta, float* gram, float* wk,
                         float* T, float* U) {
  for (int idx = threadIdx.x; idx < n * n; idx += blockDim.x) {
    const int a = idx / n, c = idx - a * n;
    float gw = 0.f, gk = 0.f;
    if (c < a)
      for (int x = 0; x < d; ++x) {
        gw += W[a * d + x] * W[c * d + x];
        gk += W[a * d + x] * K[c * d + x];
      }
    gram[idx] = gw;
    wk[idx] = gk;
  }
  __syncthreads();
  for (int a = 0; a < n; ++a) {
    for (int b = threadIdx.x; b < n; b += blockDim.x) T[a * n + b] = b <= a ? ut_inverse_entry(a, b, n, gram, beta, T) : 0.f;
    __syncthreads();
  }
  for (int idx = threadIdx.x; idx < n * n; idx += blockDim.x) U[idx] = ut_key_coefficient(idx / n, idx % n, n, T, beta, wk);
  __syncthreads();
}

// Token index of row a of chunk cr for a tensor of `heads` heads: ((b * T + t0 + a) * heads + h).
__device__ __forceinline__ int64_t token(const Params& p, const ChunkRef& cr, int a, int64_t heads, int64_t h) {
  return (cr.b * p.seq_len + cr.t0 + a) * heads + h;
}

// Shared memory of the kernels with one block per (key head, chunk), pass 1 and the UT backward (kUtSmemBytes):
// chunk_ut's operands for n <= C rows.
struct UtWorkspace {
  float* gram;   // [n, n]
  float* wk;     // [n, n]
  float* T;      // [n, n]
  float* U;      // [n, n]
  float* beta;   // [n]
};

// Loads beta of chunk cr (key head hk) into the workspace at `smem`, then runs chunk_ut on the chunk's rows W, K
// [n, d] (already in place).
__device__ UtWorkspace chunk_ut_in_smem(int4* smem, const Params& p, const ChunkRef& cr, int64_t hk, const float* W,
                                        const float* K) {
  UtWorkspace ws;
  ws.gram = reinterpret_cast<float*>(smem);
  ws.wk = ws.gram + C * C;
  ws.T = ws.wk + C * C;
  ws.U = ws.T + C * C;
  ws.beta = ws.U + C * C;
  const int n = static_cast<int>(cr.n);
  for (int a = threadIdx.x; a < n; a += blockDim.x)
    ws.beta[a] = load_float(p.beta, p.beta_dtype, token(p, cr, a, p.kv_heads, hk));
  __syncthreads();
  chunk_ut(n, p.head_dim, W, K, ws.beta, ws.gram, ws.wk, ws.T, ws.U);
  return ws;
}

// ---------------------------------------------------------------------------------------------------------
// Gate prefix and its gradient
// ---------------------------------------------------------------------------------------------------------

// G [B, HQ, T] = cumsum(g) within each sequence, in fp64 so long sequences keep G_i - G_j accurate.
__global__ void __launch_bounds__(kThreads) gate_prefix_kernel(const Params p, const CudaPlan plan) {
  const int64_t task = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (task >= plan.n_spans * p.heads) return;
  const Span sp = plan.spans[task / p.heads];
  const int64_t hq = task % p.heads;
  float* row = plan.G + (sp.b * p.heads + hq) * p.seq_len;
  double run = 0.0;
  for (int64_t t = sp.start; t < sp.start + sp.len; ++t) {
    run += load_float(p.g, p.g_dtype, (sp.b * p.seq_len + t) * p.heads + hq);
    row[t] = static_cast<float>(run);
  }
}

// dg_t = sum_{u >= t} dG_u within each sequence (G = cumsum(g)), in place.
__global__ void __launch_bounds__(kThreads) gate_grad_kernel(const Params p, const CudaPlan plan, float* dG) {
  const int64_t task = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (task >= plan.n_spans * p.heads) return;
  const Span sp = plan.spans[task / p.heads];
  float* row = dG + (sp.b * p.heads + task % p.heads) * p.seq_len;
  for (int64_t t = sp.start + sp.len - 2; t >= sp.start; --t) row[t] += row[t + 1];
}

// ---------------------------------------------------------------------------------------------------------
// Pass 1: the UT transform of every (key head, chunk)
// ---------------------------------------------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads) prepare_chunks_kernel(const Params p, const CudaPlan plan) {
  extern __shared__ int4 smem_raw[];
  const int64_t hk = blockIdx.x / plan.total_chunks, gc = blockIdx.x % plan.total_chunks;
  const ChunkRef cr = plan.chunks[gc];
  const int n = static_cast<int>(cr.n), d = p.head_dim, dv = p.v_dim;
  const ChunkLayout lay = cuda_chunk_layout(p);
  float* blk = plan.blocks + (hk * plan.total_chunks + gc) * lay.size();
  float* W = blk + lay.w();
  float* K = blk + lay.k();
  float* V = blk + lay.v();
  for (int idx = threadIdx.x; idx < n * d; idx += blockDim.x) {
    const int64_t at = token(p, cr, idx / d, p.kv_heads, hk) * d + idx % d;
    W[idx] = load_float(p.w, p.w_dtype, at);
    K[idx] = load_float(p.k, p.dtype, at);
  }
  for (int idx = threadIdx.x; idx < n * dv; idx += blockDim.x)
    V[idx] = load_float(p.v, p.dtype, token(p, cr, idx / dv, p.kv_heads, hk) * dv + idx % dv);
  const auto [gram, wk, T, U, beta] = chunk_ut_in_smem(smem_raw, p, cr, hk, W, K);
  float* TDW = blk + lay.tdw();
  float* Kbar = blk + lay.kbar();
  for (int idx = threadIdx.x; idx < n * d; idx += blockDim.x) {
    const int a = idx / d, x = idx - a * d;
    TDW[idx] = ut_tdw_entry(a, x, n, d, T, beta, W);
    Kbar[idx] = ut_carried_key(a, x, n, d, U, W, K);
  }
  for (int idx = threadIdx.x; idx < n * n; idx += blockDim.x) {
    const int a = idx / n, b = idx - a * n;
    blk[lay.u() + a * C + b] = U[idx];
    blk[lay.ut() + b * C + a] = U[idx];
  }
  __syncthreads();
  // The transposed operands [D, C] / [Dv, C].
  for (int idx = threadIdx.x; idx < n * d; idx += blockDim.x) {
    const int a = idx / d, x = idx - a * d;
    blk[lay.wt() + x * C + a] = W[idx];
    blk[lay.kt() + x * C + a] = K[idx];
    blk[lay.kbart() + x * C + a] = Kbar[idx];
    blk[lay.tdwt() + x * C + a] = TDW[idx];
  }
  for (int idx = threadIdx.x; idx < n * dv; idx += blockDim.x) blk[lay.vt() + (idx % dv) * C + idx / dv] = V[idx];
}

// ---------------------------------------------------------------------------------------------------------
// Forward (pass 2)
// ---------------------------------------------------------------------------------------------------------

// Launch bounds (kThreads, 1): without the minimum CTA count ptxas (CUDA 13) capped the tensor-core instantiations
// at 64 registers on sm_80 and spilled; the shared-memory footprint allows few CTAs per SM anyway.
template <typename MmaT>  // float: every product on CUDA cores; __half / __nv_bfloat16: on tensor cores
__global__ void __launch_bounds__(kThreads, 1) forward_kernel(const Params p, const CudaPlan plan) {
  extern __shared__ int4 smem_raw[];
  const int d = p.head_dim, dv = p.v_dim;
  float* Q0 = reinterpret_cast<float*>(smem_raw);   // [C, d]: Q, then the queries carried to earlier chunks
  float* QW = Q0 + C * d;                            // [C, C]
  float* S = QW + C * C;                             // [C, C] scores, then probabilities
  float* acc = S + C * C;                            // [C, dv]
  float* rmax = acc + C * dv;                        // [C] running max
  float* rsum = rmax + C;                            // [C] running sum
  float* factor = rsum + C;                          // [C] rescale of the current block
  const int64_t hq = blockIdx.x % p.heads, gc = plan.order[blockIdx.x / p.heads];
  const int64_t hk = p.kv_head_of(hq);
  const ChunkRef cr = plan.chunks[gc];
  const int n = static_cast<int>(cr.n);
  const ChunkLayout lay = cuda_chunk_layout(p);
  auto chunk = [&](int64_t g) { return plan.blocks + (hk * plan.total_chunks + g) * lay.size(); };
  const float* Grow = plan.G == nullptr ? nullptr : plan.G + (cr.b * p.heads + hq) * p.seq_len;

  for (int idx = threadIdx.x; idx < n * d; idx += blockDim.x)
    Q0[idx] = load_float(p.q, p.dtype, token(p, cr, idx / d, p.heads, hq) * d + idx % d);
  for (int idx = threadIdx.x; idx < C * dv; idx += blockDim.x) acc[idx] = 0.f;
  for (int a = threadIdx.x; a < C; a += blockDim.x) {
    rmax[a] = -INFINITY;
    rsum[a] = 0.f;
  }
  __syncthreads();

  // Scores from logits in S: scale * (logit + G_i - G_j), keys from token tk; -inf above the diagonal when causal.
  auto finish_scores = [&](int64_t tk, int nk, bool causal) {
    for (int idx = threadIdx.x; idx < n * nk; idx += blockDim.x) {
      const int a = idx / nk, b = idx - a * nk;
      float* s = S + a * C + b;
      const float gate = Grow == nullptr ? 0.f : Grow[cr.t0 + a] - Grow[tk + b];
      *s = (causal && b > a) ? -INFINITY : p.scale * (*s + gate);
    }
    __syncthreads();
  };
  // Online softmax of rows [0, n) over nk keys with values V [nk, dv] (ld dv).
  auto softmax_block = [&](int nk, const float* V) {
    for (int a = threadIdx.x; a < n; a += blockDim.x) {
      float* s = S + a * C;
      float bmax = -INFINITY;
      for (int b = 0; b < nk; ++b) bmax = nan_max(bmax, s[b]);   // a NaN score must reach rsum
      if (bmax == -INFINITY) {   // no visible key in this block (cannot happen: kept for safety)
        factor[a] = 1.f;
        for (int b = 0; b < nk; ++b) s[b] = 0.f;
        continue;
      }
      const float f = softmax_rescale(rmax[a], bmax);
      float sum = 0.f;
      for (int b = 0; b < nk; ++b) {
        s[b] = exp_or_zero(s[b] - rmax[a]);
        sum += s[b];
      }
      rsum[a] = rsum[a] * f + sum;
      factor[a] = f;
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < n * dv; idx += blockDim.x) acc[idx] *= factor[idx / dv];
    __syncthreads();
    matmul<MmaT, false>(n, dv, nk, 1.f, S, C, V, dv, acc, dv, true);
  };

  // Intra-chunk: QW = tril(Q W^T), M = Q K^T - QW U, Q0 = Q - QW TDW.
  const float* blk = chunk(gc);
  matmul<MmaT, false>(n, C, d, 1.f, Q0, d, blk + lay.wt(), C, QW, C, false);
  block_tril(n, QW);
  matmul<MmaT, false>(n, C, d, 1.f, Q0, d, blk + lay.kt(), C, S, C, false);
  matmul<MmaT, false>(n, C, C, -1.f, QW, C, blk + lay.u(), C, S, C, true);
  matmul<MmaT, false>(n, d, C, -1.f, QW, C, blk + lay.tdw(), d, Q0, d, true);
  finish_scores(cr.t0, n, true);
  softmax_block(n, blk + lay.v());

  // Earlier chunks of the sequence, right to left (all full chunks).
  for (int64_t ck = cr.index - 1; ck >= 0; --ck) {
    const float* kb = chunk(gc - cr.index + ck);
    matmul<MmaT, false>(n, C, d, 1.f, Q0, d, kb + lay.kbart(), C, S, C, false);
    finish_scores(cr.seq_start + ck * C, C, false);
    softmax_block(C, kb + lay.v());
    if (ck > 0) {   // carry the queries across chunk ck: Q0 <- Q0 - (Q0 W^T) TDW
      matmul<MmaT, false>(n, C, d, 1.f, Q0, d, kb + lay.wt(), C, QW, C, false);
      matmul<MmaT, false>(n, d, C, -1.f, QW, C, kb + lay.tdw(), d, Q0, d, true);
    }
  }

  for (int idx = threadIdx.x; idx < n * dv; idx += blockDim.x) {
    const int a = idx / dv;
    store_float(p.o, p.dtype, token(p, cr, a, p.heads, hq) * dv + idx % dv, acc[idx] / rsum[a]);
  }
  for (int a = threadIdx.x; a < n; a += blockDim.x)
    p.lse[(cr.b * p.heads + hq) * p.seq_len + cr.t0 + a] = rmax[a] + logf(rsum[a]);
}

// ---------------------------------------------------------------------------------------------------------
// Key cache
// ---------------------------------------------------------------------------------------------------------

// One (sequence, key head): chunks right to left with A = P_last ... P_{c+1} (P_c = I - W_c^T TDW_c), so chunk c's
// keys are A Kbar_c: O(T D^2) instead of applying every later chunk to every key.
__global__ void __launch_bounds__(kThreads) key_cache_kernel(const Params p, const CudaPlan plan, float* scratch,
                                                             void* out) {
  const int d = p.head_dim;
  const int64_t s = blockIdx.x / p.kv_heads, hk = blockIdx.x % p.kv_heads;
  float* A = scratch + blockIdx.x * (static_cast<int64_t>(d) * d + 2 * d * C);   // [d, d]
  float* AW = A + d * d;                                                            // [d, C]
  float* KC = AW + d * C;                                                           // [d, C]
  const ChunkLayout lay = cuda_chunk_layout(p);
  const Span sp = plan.spans[s];
  const int64_t first = plan.first_chunk[s];
  for (int idx = threadIdx.x; idx < d * d; idx += blockDim.x) A[idx] = (idx / d == idx % d) ? 1.f : 0.f;
  __syncthreads();
  for (int64_t c = (sp.len + C - 1) / C - 1; c >= 0; --c) {
    const float* kb = plan.blocks + (hk * plan.total_chunks + first + c) * lay.size();
    const ChunkRef cr = plan.chunks[first + c];
    block_matmul<false>(d, C, d, 1.f, A, d, kb + lay.kbart(), C, KC, C, false);
    for (int idx = threadIdx.x; idx < cr.n * d; idx += blockDim.x) {
      const int a = idx / d, x = idx - a * d;
      store_float(out, p.dtype, token(p, cr, a, p.kv_heads, hk) * d + x, KC[x * C + a]);
    }
    __syncthreads();
    if (c > 0) {   // A <- A P_c = A - (A W^T) TDW
      block_matmul<false>(d, C, d, 1.f, A, d, kb + lay.wt(), C, AW, C, false);
      block_matmul<false>(d, d, C, -1.f, AW, C, kb + lay.tdw(), d, A, d, true);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------------

// One query chunk cq of query head hq of sequence s (chunk blocks prepared): recomputes the carried queries
// Q0^(c), the probabilities from lse, and sends the gradients to dq (written), the key chunks' gradient slots and
// dG. The same steps as the CPU kernel's backward_query_chunk (path_attention_cpu_backward.cpp documents them).
__device__ void backward_query_chunk(const Params& p, const CudaPlan& plan, const BwdArgs& bb, const Span& sp,
                                     int64_t first, int64_t hk, int64_t hq, int64_t cq, float* buf) {
  const int d = p.head_dim, dv = p.v_dim;
  const ChunkLayout lay = cuda_chunk_layout(p);
  const GradLayout glay{d, dv};
  const ChunkRef cr = plan.chunks[first + cq];
  const int64_t t0 = cr.t0;
  const int n = static_cast<int>(cr.n);
  const int64_t row = (sp.b * p.heads + hq) * p.seq_len;
  auto chunk = [&](int64_t c) { return plan.blocks + (hk * plan.total_chunks + first + c) * lay.size(); };
  auto grads = [&](int64_t c) { return bb.grads + (hk * plan.total_chunks + first + c) * glay.size(); };
  block_fill(buf, query_chunk_scratch_floats(cq, d, dv), 0.f);
  const auto [states, Q, R, dQ, Y, QW, S, dL, dM, dQW, dO, Ob, delta, lse, Gq] = query_chunk_scratch(buf, cq, d, dv);
  for (int idx = threadIdx.x; idx < n * d; idx += blockDim.x)
    Q[idx] = load_float(p.q, p.dtype, token(p, cr, idx / d, p.heads, hq) * d + idx % d);
  for (int idx = threadIdx.x; idx < n * dv; idx += blockDim.x) {
    const int64_t at = token(p, cr, idx / dv, p.heads, hq) * dv + idx % dv;
    dO[idx] = load_float(bb.grad_o, p.dtype, at);
    Ob[idx] = load_float(bb.o, p.dtype, at);
  }
  __syncthreads();
  for (int a = threadIdx.x; a < n; a += blockDim.x) {
    float dot = 0.f;
    for (int x = 0; x < dv; ++x) dot += dO[a * dv + x] * Ob[a * dv + x];
    delta[a] = dot - (bb.grad_lse != nullptr ? bb.grad_lse[row + t0 + a] : 0.f);
    lse[a] = bb.lse[row + t0 + a];
    Gq[a] = plan.G != nullptr ? plan.G[row + t0 + a] : 0.f;
  }
  __syncthreads();

  // Probabilities of the logits in S (keys from token tk; causal within the diagonal chunk), then dL, dV, dG.
  auto probs_and_grads = [&](const float* kb, int64_t tk, bool causal, int64_t c) {
    const int nk = causal ? n : C;
    for (int idx = threadIdx.x; idx < n * C; idx += blockDim.x) {
      const int a = idx / C, b = idx - a * C;
      const int visible = causal ? a + 1 : nk;
      float v = 0.f;
      if (b < visible) {
        float s = S[idx];
        if (plan.G != nullptr) s += Gq[a] - plan.G[row + tk + b];
        v = exp_or_zero(s * p.scale - lse[a]);
      }
      S[idx] = v;
    }
    __syncthreads();
    block_matmul<false>(n, C, dv, 1.f, dO, dv, kb + lay.vt(), C, dL, C, false);   // dP = dO V^T
    for (int idx = threadIdx.x; idx < n * C; idx += blockDim.x) dL[idx] = p.scale * S[idx] * (dL[idx] - delta[idx / C]);
    __syncthreads();
    for (int a = threadIdx.x; a < n; a += blockDim.x) {
      float rowsum = 0.f;
      for (int b = 0; b < C; ++b) rowsum += dL[a * C + b];
      bb.dG[row + t0 + a] += rowsum;
    }
    __syncthreads();
    for (int b = threadIdx.x; b < nk; b += blockDim.x) {
      float colsum = 0.f;
      for (int a = 0; a < n; ++a) colsum += dL[a * C + b];
      bb.dG[row + tk + b] -= colsum;
    }
    __syncthreads();
    block_matmul<true>(C, dv, n, 1.f, S, C, dO, dv, grads(c) + glay.dvals(), dv, true);
  };

  // Recompute: QW = tril(Q W^T), M = Q K^T - QW U (in S), Q0^(cq-1) = Q - QW TDW, then Q0^(c-1) from Q0^(c).
  const float* blk = chunk(cq);
  block_matmul<false>(n, C, d, 1.f, Q, d, blk + lay.wt(), C, QW, C, false);
  block_tril(n, QW);
  block_matmul<false>(n, C, d, 1.f, Q, d, blk + lay.kt(), C, S, C, false);
  block_matmul<false>(n, C, C, -1.f, QW, C, blk + lay.u(), C, S, C, true);
  if (cq > 0) {
    float* q0 = states + (cq - 1) * C * d;
    block_copy(n, d, Q, d, q0, d);
    block_matmul<false>(n, d, C, -1.f, QW, C, blk + lay.tdw(), d, q0, d, true);
    for (int64_t c = cq - 1; c > 0; --c) {
      const float* kb = chunk(c);
      float* prev = states + c * C * d;
      float* next = states + (c - 1) * C * d;
      block_matmul<false>(n, C, d, 1.f, prev, d, kb + lay.wt(), C, Y, C, false);
      block_copy(n, d, prev, d, next, d);
      block_matmul<false>(n, d, C, -1.f, Y, C, kb + lay.tdw(), d, next, d, true);
    }
  }
  probs_and_grads(blk, t0, true, cq);
  block_copy(n, C, dL, C, dM, C);

  // Earlier chunks, left to right: R arrives as d loss / d Q0^(c-1).
  for (int64_t c = 0; c < cq; ++c) {
    const float* kb = chunk(c);
    float* gs = grads(c);
    const float* q0 = states + c * C * d;
    if (c > 0) {   // back through Q0^(c-1) = Q0^(c) - Y TDW_c, Y = Q0^(c) W_c^T
      block_matmul<false>(n, C, d, 1.f, q0, d, kb + lay.wt(), C, Y, C, false);
      block_matmul<true>(C, d, n, -1.f, Y, C, R, d, gs + glay.dtdw(), d, true);
      block_matmul<false>(n, C, d, -1.f, R, d, kb + lay.tdwt(), C, dQW, C, false);   // dY = -R TDW_c^T
      block_matmul<true>(C, d, n, 1.f, dQW, C, q0, d, gs + glay.dw(), d, true);
      block_matmul<false>(n, d, C, 1.f, dQW, C, kb + lay.w(), d, R, d, true);
    }
    block_matmul<false>(n, C, d, 1.f, q0, d, kb + lay.kbart(), C, S, C, false);
    probs_and_grads(kb, sp.start + c * C, false, c);
    block_matmul<true>(C, d, n, 1.f, dL, C, q0, d, gs + glay.dkbar(), d, true);
    block_matmul<false>(n, d, C, 1.f, dL, C, kb + lay.kbar(), d, R, d, true);
  }

  // Diagonal chunk: M = Q K^T - QW U and Q0^(cq-1) = Q - QW TDW (R is its gradient; zero when cq = 0).
  float* gs = grads(cq);
  block_copy(n, d, R, d, dQ, d);
  block_matmul<false>(n, d, C, 1.f, dM, C, blk + lay.k(), d, dQ, d, true);
  block_matmul<false>(n, C, C, -1.f, dM, C, blk + lay.ut(), C, dQW, C, false);
  block_matmul<false>(n, C, d, -1.f, R, d, blk + lay.tdwt(), C, dQW, C, true);
  block_tril(n, dQW);
  block_matmul<false>(n, d, C, 1.f, dQW, C, blk + lay.w(), d, dQ, d, true);
  block_matmul<true>(C, d, n, 1.f, dM, C, Q, d, gs + glay.dk(), d, true);
  block_matmul<true>(C, C, n, -1.f, QW, C, dM, C, gs + glay.du(), C, true);
  block_matmul<true>(C, d, n, -1.f, QW, C, R, d, gs + glay.dtdw(), d, true);
  block_matmul<true>(C, d, n, 1.f, dQW, C, Q, d, gs + glay.dw(), d, true);
  for (int idx = threadIdx.x; idx < n * d; idx += blockDim.x)
    bb.dq[token(p, cr, idx / d, p.heads, hq) * d + idx % d] = dQ[idx];
  __syncthreads();
}

// One (sequence, key head): every query chunk of every query head of the group. The CTA owns every gradient
// slot and dG row it writes.
__global__ void __launch_bounds__(kThreads) backward_kernel(const Params p, const CudaPlan plan, const BwdArgs bb) {
  const int64_t s = blockIdx.x / p.kv_heads, hk = blockIdx.x % p.kv_heads;
  const Span sp = plan.spans[s];
  const int64_t first = plan.first_chunk[s], nc = (sp.len + C - 1) / C, group = p.heads / p.kv_heads;
  float* buf = bb.scratch + blockIdx.x * bwd_scratch_floats(p, plan);
  for (int64_t hq = hk * group; hq < (hk + 1) * group; ++hq)
    for (int64_t cq = 0; cq < nc; ++cq) backward_query_chunk(p, plan, bb, sp, first, hk, hq, cq, buf);
}

// One (key head, chunk): the UT backward (path_attention.h, UtGrad phases) and the chunk's rows of dw, dk, dv,
// dbeta.
__global__ void __launch_bounds__(kThreads) ut_backward_kernel(const Params p, const CudaPlan plan, const BwdArgs bb) {
  extern __shared__ int4 smem_raw[];
  const int64_t hk = blockIdx.x / plan.total_chunks, gc = blockIdx.x % plan.total_chunks;
  const ChunkRef cr = plan.chunks[gc];
  const int n = static_cast<int>(cr.n), d = p.head_dim, dv = p.v_dim;
  const ChunkLayout lay = cuda_chunk_layout(p);
  const GradLayout glay{d, dv};
  const float* blk = plan.blocks + (hk * plan.total_chunks + gc) * lay.size();
  float* gs = bb.grads + (hk * plan.total_chunks + gc) * glay.size();
  const float* W = blk + lay.w();
  const float* K = blk + lay.k();
  const auto [gram, wk, T, U, beta] = chunk_ut_in_smem(smem_raw, p, cr, hk, W, K);
  block_copy(n, n, gs + glay.du(), C, gs + glay.duc(), n);
  const UtGrad g{n, d, W, K, beta, gram, wk, T, U, gs + glay.dkbar(), gs + glay.dtdw(), gs + glay.duc(),
                 gs + glay.dt(), gs + glay.dz(), gs + glay.tmp(), gs + glay.da(), gs + glay.dy()};
  for (int idx = threadIdx.x; idx < n * n; idx += blockDim.x)
    if (idx % n < idx / n) ut_grad_phase1(g, idx / n, idx % n);
  __syncthreads();
  for (int idx = threadIdx.x; idx < n * n; idx += blockDim.x) {
    const int r = idx / n, c = idx - r * n;
    if (c <= r) ut_grad_phase2(g, 0, r, c);
    if (c < r) ut_grad_phase2(g, 1, r, c);
  }
  for (int idx = threadIdx.x; idx < n * d; idx += blockDim.x) ut_grad_phase2(g, 2, idx / d, idx % d);
  __syncthreads();
  for (int idx = threadIdx.x; idx < n * n; idx += blockDim.x) ut_grad_phase3(g, idx / n, idx % n);
  __syncthreads();
  for (int idx = threadIdx.x; idx < n * n; idx += blockDim.x)
    if (idx % n < idx / n) ut_grad_phase4(g, idx / n, idx % n);
  __syncthreads();
  float* dW = gs + glay.dw();
  float* dK = gs + glay.dk();
  float* dbeta = gs + glay.dbeta();
  for (int idx = threadIdx.x; idx < n * (d + 1); idx += blockDim.x)
    ut_grad_phase5(g, idx / (d + 1), idx % (d + 1) - 1, dW, dK, dbeta);
  __syncthreads();
  for (int idx = threadIdx.x; idx < n * d; idx += blockDim.x) {
    const int64_t at = token(p, cr, idx / d, p.kv_heads, hk) * d + idx % d;
    bb.dw[at] = dW[idx];
    bb.dk[at] = dK[idx];
  }
  for (int idx = threadIdx.x; idx < n * dv; idx += blockDim.x)
    bb.dv[token(p, cr, idx / dv, p.kv_heads, hk) * dv + idx % dv] = gs[glay.dvals() + idx];
  for (int a = threadIdx.x; a < n; a += blockDim.x) bb.dbeta[token(p, cr, a, p.kv_heads, hk)] = dbeta[a];
}

// ---------------------------------------------------------------------------------------------------------
// Decode step
// ---------------------------------------------------------------------------------------------------------

constexpr int kWarps = kThreads / 32;

// Sum (or max) over the block of one value per thread, combined in warp order (deterministic); every thread
// gets the result. red: kWarps floats of shared memory.
__device__ float block_reduce(float v, bool is_max, float* red) {
  v = is_max ? warp_max(v) : warp_sum(v);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
  __syncthreads();
  float r = red[0];
  for (int i = 1; i < kWarps; ++i) r = is_max ? fmaxf(r, red[i]) : r + red[i];
  __syncthreads();
  return r;
}

// One CTA per (row b, key head hk) (path_attention.h, DecodeParams):
//   threads t < group: G_last += g, gates[len] = G_last;  all: append k_t, v_t at position len
//   warp per cached key j (j <= len): lanes over dims; j < len: k_j -= beta (k_j . w) w (written back);
//     scores[hq][j] = scale * (q_hq . k_j + G_last - G_j) for the group's query heads
//   per query head: block max, p_j = exp(s_j - max) (in place), block sum, thread per output dim: sum_j p_j v_j
// scores: [B, HQ, L] fp32 workspace.
__global__ void __launch_bounds__(kThreads) decode_kernel(const DecodeParams p, float* scores) {
  __shared__ float red[kWarps];
  const int d = p.head_dim, dv = p.v_dim, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t b = blockIdx.x / p.kv_heads, hk = blockIdx.x % p.kv_heads;
  const int64_t group = p.heads / p.kv_heads, len = p.lengths[b], L = p.capacity;
  const int64_t kv_tok = b * p.kv_heads + hk;
  float* keys = p.keys + kv_tok * L * d;
  float* values = p.values + kv_tok * L * dv;
  if (p.gates != nullptr)
    for (int64_t gi = threadIdx.x; gi < group; gi += blockDim.x) {
      const int64_t bh = b * p.heads + hk * group + gi;
      const float gl = p.g_last[bh] + load_float(p.g, p.g_dtype, bh);
      p.g_last[bh] = gl;
      p.gates[bh * L + len] = gl;
    }
  for (int x = threadIdx.x; x < d; x += blockDim.x) keys[len * d + x] = load_float(p.k, p.dtype, kv_tok * d + x);
  for (int x = threadIdx.x; x < dv; x += blockDim.x) values[len * dv + x] = load_float(p.v, p.dtype, kv_tok * dv + x);
  __syncthreads();
  const float beta = load_float(p.beta, p.beta_dtype, kv_tok);
  for (int64_t j = warp; j <= len; j += kWarps) {   // warp-uniform
    float* kj = keys + j * d;
    if (j < len) {
      float part = 0.f;
      for (int x = lane; x < d; x += 32) part += kj[x] * load_float(p.w, p.w_dtype, kv_tok * d + x);
      const float c = beta * warp_sum(part);
      for (int x = lane; x < d; x += 32) kj[x] -= c * load_float(p.w, p.w_dtype, kv_tok * d + x);
    }
    for (int64_t gi = 0; gi < group; ++gi) {
      const int64_t bh = b * p.heads + hk * group + gi;
      float part = 0.f;
      for (int x = lane; x < d; x += 32) part += load_float(p.q, p.dtype, bh * d + x) * kj[x];
      const float dot = warp_sum(part);
      const float gate = p.gates == nullptr ? 0.f : p.g_last[bh] - p.gates[bh * L + j];
      if (lane == 0) scores[bh * L + j] = p.scale * (dot + gate);
    }
  }
  __syncthreads();
  for (int64_t gi = 0; gi < group; ++gi) {
    const int64_t bh = b * p.heads + hk * group + gi;
    float* s = scores + bh * L;
    float mx = -INFINITY;
    for (int64_t j = threadIdx.x; j <= len; j += blockDim.x) mx = fmaxf(mx, s[j]);
    mx = block_reduce(mx, true, red);
    float sum = 0.f;
    for (int64_t j = threadIdx.x; j <= len; j += blockDim.x) {
      const float e = expf(s[j] - mx);
      s[j] = e;
      sum += e;
    }
    sum = block_reduce(sum, false, red);   // its barriers also publish the probabilities
    for (int x = threadIdx.x; x < dv; x += blockDim.x) {
      float acc = 0.f;
      for (int64_t j = 0; j <= len; ++j) acc += s[j] * values[j * dv + x];
      store_float(p.o, p.dtype, bh * dv + x, acc / sum);
    }
  }
}

// ---- launch helpers

constexpr int64_t kMaxGridX = 2147483647;

// Sets the opt-in when `smem` exceeds the default, then launches grid x kThreads.
template <typename Kernel, typename... Args>
cudaError_t launch(Kernel kernel, int64_t grid, int64_t smem, cudaStream_t stream, Args... args) {
  if (grid == 0) return cudaSuccess;
  if (grid > kMaxGridX) return cudaErrorInvalidValue;
  const cudaError_t err = allow_dynamic_smem(kernel, static_cast<size_t>(smem));
  if (err != cudaSuccess) return err;
  kernel<<<static_cast<unsigned>(grid), kThreads, static_cast<size_t>(smem), stream>>>(args...);
  return cudaGetLastError();
}

int64_t thread_ctas(int64_t threads) { return (threads + kThreads - 1) / kThreads; }

// pass 0 (gate) and pass 1 (chunk blocks), shared by the forward and the key cache.
cudaError_t prepare(const Params& p, const CudaPlan& plan, cudaStream_t stream) {
  if (p.g != nullptr && plan.G != nullptr) {
    const cudaError_t err = launch(gate_prefix_kernel, thread_ctas(plan.n_spans * p.heads), 0, stream, p, plan);
    if (err != cudaSuccess) return err;
  }
  return launch(prepare_chunks_kernel, p.kv_heads * plan.total_chunks, kUtSmemBytes, stream, p, plan);
}

}  // namespace

int device_smem_optin() { return max_dynamic_smem(); }

cudaError_t launch_path_forward(const Params& p, const CudaPlan& plan, cudaStream_t stream) {
  cudaError_t err = prepare(p, plan, stream);
  if (err != cudaSuccess) return err;
  const int64_t grid = p.heads * plan.total_chunks, smem = forward_smem_bytes(p);
  if (plan.tensor_cores && p.dtype == DType::kF16) return launch(forward_kernel<__half>, grid, smem, stream, p, plan);
  if (plan.tensor_cores && p.dtype == DType::kBF16)
    return launch(forward_kernel<__nv_bfloat16>, grid, smem, stream, p, plan);
  return launch(forward_kernel<float>, grid, smem, stream, p, plan);
}

cudaError_t launch_path_key_cache(const Params& p, const CudaPlan& plan, float* scratch, void* out,
                                  cudaStream_t stream) {
  cudaError_t err = prepare(p, plan, stream);
  if (err != cudaSuccess) return err;
  return launch(key_cache_kernel, plan.n_spans * p.kv_heads, 0, stream, p, plan, scratch, out);
}

cudaError_t launch_path_decode_step(const DecodeParams& p, float* scores, cudaStream_t stream) {
  return launch(decode_kernel, p.batch * p.kv_heads, 0, stream, p, scores);
}

cudaError_t launch_path_backward(const Params& p, const CudaPlan& plan, const BwdArgs& bb, cudaStream_t stream) {
  cudaError_t err = prepare(p, plan, stream);
  if (err != cudaSuccess) return err;
  err = launch(backward_kernel, plan.n_spans * p.kv_heads, 0, stream, p, plan, bb);
  if (err != cudaSuccess) return err;
  err = launch(ut_backward_kernel, p.kv_heads * plan.total_chunks, kUtSmemBytes, stream, p, plan, bb);
  if (err != cudaSuccess) return err;
  // dg also without a gate: the op returns the gradient with respect to a zero gate.
  return launch(gate_grad_kernel, thread_ctas(plan.n_spans * p.heads), 0, stream, p, plan, bb.dG);
}

}  // namespace blockops::path_attention
