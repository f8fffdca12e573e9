// Block-sparse attention numerics, torch-free, shared by the CPU kernels (attention_cpu.cpp), the CUDA kernels
// (kernels/attention*.cu) and therefore by the tests of both.
//
// Tensors (strides in elements; the last dim is contiguous):
//   q [B, H, Tq, D], k [B, Hk, Tk, D], v [B, Hk, Tk, Dv]; H a multiple of Hk (GQA: query head h reads key
//   head h / (H / Hk)); D and Dv multiples of 8, at most 256; fp16, bf16 or fp32 (one dtype for all three).
//   fp64 too on the CPU (portable path; for gradcheck). out [B, H, Tq, Dv] (q's dtype, contiguous), lse [B, H, Tq]
//   fp32 (fp64 for fp64 operands) contiguous: natural log-sum-exp of the scaled visible scores, -inf for a row
//   with no visible key (whose output is 0).
//
// Mask (python/blockops/attention/block_mask.py has the full description): per (b', h', block) int32 lists
// with b' = b when the mask has the batch dim, else 0 (same for h'); blocks of block_q queries / block_kv keys;
//   kv_num [B', H', QB], kv_idx [B', H', QB, KB]: partial key blocks of each query block, with kv_tile
//   [B', H', QB, KB] the bit tile of each; full_kv_num / full_kv_idx: fully visible key blocks;
//   q_num [B', H', KB], q_idx [B', H', KB, QB], q_tile, full_q_num, full_q_idx: the transposed lists;
//   tiles [num_tiles, block_q, W] int32 with W = ceil(block_kv / 32): bit c % 32 of word c / 32 of row r says
//   whether key c of the block is visible from query r of the block. Out-of-range positions (beyond Tq / Tk)
//   are never visible, whatever the bits say.
//
// Softmax bookkeeping (FlashAttention-2): scores are kept in base 2, s2 = (q . k) * scale * log2(e), with a
// running row maximum m and row sum l of exp2(s2 - m); lse = (m + log2(l)) / log2(e).
//
// NaN / Inf (as softmax, and F.scaled_dot_product_attention over the visible keys): a NaN visible score (NaN in q
// or in a visible key's k) or a +inf one (exp2(inf - inf)) makes the row's output and lse NaN; a NaN in a visible
// key's v makes those output columns NaN; a row whose visible scores are all -inf is empty (out 0, lse -inf).
// Hidden keys never reach the forward output, NaN or not: their scores become -inf before the softmax, unlisted
// blocks are never read, and a hidden key's v is not multiplied in (CPU: a per-pair path for partial blocks whose
// V is not finite; CUDA-core: hidden keys are skipped; tensor cores: a partial block whose V chunk holds a NaN / Inf
// adds P V over its visible pairs only, attention_mma.cuh pv_visible_pairs). Known limit: in the backward, a hidden
// NaN inside a listed partial block may reach the gradients through 0 * NaN in the products (as in SDPA's backward,
// which spreads it to every row). The rule every backend follows: exp2 propagates NaN, so a NaN score makes
// the row sum l NaN and l stays NaN (l = l * alpha + sum); the running maximum need not keep the NaN (SIMD max
// drops it); at the end a row is empty exactly when l == 0 (l >= 1 once any finite score was seen), never by
// `l > 0`, which is false for a NaN row too (that reported NaN rows as empty: out 0, lse -inf).
//
// Backward (per visited tile, with P = exp2(s2 - lse2), lse2 = lse * log2(e), and Delta_r = dO_r . O_r):
//   dV += P^T dO,   dP = dO V^T,   dS = P * (dP - Delta),   dQ += scale * dS K,   dK += scale * dS^T Q.
// A gradient g arriving at lse (d lse_i / d s_ij = P_ij) enters as Delta_i = dO_i . O_i - g_i.
// dK/dV are computed per key block from the transposed lists (a key head sums over its query heads), dQ per
// query block from the forward lists: two passes, no atomics, deterministic.
#pragma once
#include <cmath>
#include <cstdint>

#include "dtype.h"
#include "macros.h"

namespace blockops::attention {

constexpr float kLog2e = 1.4426950408889634f;
constexpr double kLog2eF64 = 1.4426950408889634;
template <typename A> BLOCKOPS_HD A log2e() { return static_cast<A>(kLog2eF64); }
template <> BLOCKOPS_HD float log2e<float>() { return kLog2e; }
BLOCKOPS_HD float log2_of(float x) { return log2f(x); }
BLOCKOPS_HD double log2_of(double x) { return log2(x); }

// The end of one row's online softmax (base-2 maximum m, sum l; float, or double for fp64 on the CPU): the factor
// the accumulated output is multiplied by and the natural lse. Empty rows (l == 0) give 0 and -inf; NaN rows NaN.
template <typename A> BLOCKOPS_HD bool row_empty(A l) { return l == A(0); }
template <typename A> BLOCKOPS_HD A row_out_scale(A l) { return row_empty(l) ? A(0) : A(1) / l; }
template <typename A> BLOCKOPS_HD A row_lse(A m, A l) {
  return row_empty(l) ? -static_cast<A>(INFINITY) : (m + log2_of(l)) / log2e<A>();
}
constexpr int kMaxHeadDim = 256;

// Where the lists of one (b', h') start: element offset into a [B', H', N] count array (times the row width
// for the index / tile-id arrays).
struct MaskDims {
  int64_t batch;       // B': 1 (broadcast) or B
  int64_t heads;       // H': 1 (broadcast) or H
  int64_t q_blocks;    // QB = ceil(Tq / block_q)
  int64_t kv_blocks;   // KB = ceil(Tk / block_kv)
  int block_q;
  int block_kv;
  int64_t num_tiles;

  BLOCKOPS_HD int words() const { return (block_kv + 31) / 32; }
  // Row (b', h') of the mask used by batch b and query head h.
  BLOCKOPS_HD int64_t row(int64_t b, int64_t h) const { return (batch == 1 ? 0 : b) * heads + (heads == 1 ? 0 : h); }
};

// The lists of one direction: counts [B', H', N], indices and tile ids [B', H', N, width].
struct BlockLists {
  const int32_t* num;
  const int32_t* idx;
  const int32_t* full_num;
  const int32_t* full_idx;
  const int32_t* tile_ids;   // aligned with idx
  int64_t n;                 // N: blocks the lists are indexed by (QB forward, KB transposed)
  int64_t width;             // KB forward, QB transposed
};

// True when key column c of tile row `row_bits` (W words) is visible.
BLOCKOPS_HD bool tile_bit(const int32_t* row_bits, int c) {
  return (static_cast<uint32_t>(row_bits[c >> 5]) >> (c & 31)) & 1u;
}

// A list's count clamped to [0, width], and whether one listed entry is usable: kernels skip entries a
// hand-built mask got wrong instead of reading out of bounds (the CPU glue reports them as errors first).
BLOCKOPS_HD int list_count(int32_t num, int64_t width) {
  return num < 0 ? 0 : (num > width ? static_cast<int>(width) : static_cast<int>(num));
}
BLOCKOPS_HD bool list_entry_ok(int32_t idx, int64_t width, const int32_t* tile_id, int64_t num_tiles) {
  return idx >= 0 && idx < width && (tile_id == nullptr || (*tile_id >= 0 && *tile_id < num_tiles));
}

// Walks one row of block lists (one mask row, one block): entries [0, np) partial, [np, np + nf) full, skipping the
// unusable ones. The CUDA kernels walk their lists with it (attention_mma.cuh, attention_wgmma.cu).
struct ListCursor {
  const int32_t* idx;
  const int32_t* tile_ids;
  const int32_t* full_idx;
  int np, nf;
  int64_t width, num_tiles;

  // The cursor of list row (mask_row, n) of L.
  BLOCKOPS_HD static ListCursor of(const BlockLists& L, const MaskDims& m, int64_t mask_row, int64_t n) {
    const int64_t at = mask_row * L.n + n;
    return ListCursor{L.idx + at * L.width, L.tile_ids + at * L.width, L.full_idx + at * L.width,
                      list_count(L.num[at], L.width), list_count(L.full_num[at], L.width), L.width, m.num_tiles};
  }

  // The first usable entry at or after e (np + nf when none), with its block and tile id (-1: full block).
  BLOCKOPS_HD int next(int e, int64_t& blk, int& tile) const {
    for (; e < np + nf; ++e) {
      if (e < np) {
        if (list_entry_ok(idx[e], width, tile_ids + e, num_tiles)) {
          blk = idx[e];
          tile = tile_ids[e];
          return e;
        }
      } else if (list_entry_ok(full_idx[e - np], width, nullptr, num_tiles)) {
        blk = full_idx[e - np];
        tile = -1;
        return e;
      }
    }
    return e;
  }
};

// Everything the forward kernels need. Pointers are device or host memory as the backend requires.
struct FwdParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;          // [B, H, Tq, Dv] contiguous
  void* lse;          // [B, H, Tq] contiguous, fp32 (fp64 for fp64 operands, CPU only)
  DType dtype;
  int64_t batch, heads, kv_heads, q_len, kv_len;
  int head_dim, v_dim;
  int64_t q_stride_b, q_stride_h, q_stride_t;
  int64_t k_stride_b, k_stride_h, k_stride_t;
  int64_t v_stride_b, v_stride_h, v_stride_t;
  float scale;
  double scale_f64;    // scale before its rounding to fp32: what the fp64 CPU kernels use
  MaskDims mask;
  BlockLists kv;       // forward lists (per query block)
  const int32_t* tiles;

  BLOCKOPS_HD int64_t kv_head_of(int64_t h) const { return h / (heads / kv_heads); }
};

// The backward kernels: the forward's tensors plus dO, O, lse, Delta and the gradients.
struct BwdParams {
  FwdParams fwd;      // q, k, v, lse, mask and the forward lists (for dQ); fwd.out is the forward output O
  const void* grad_out;   // dO [B, H, Tq, Dv]
  int64_t do_stride_b, do_stride_h, do_stride_t;
  const void* grad_lse;   // [B, H, Tq] lse's dtype, contiguous, or null: no gradient at lse
  void* delta;        // [B, H, Tq] workspace of lse's dtype: rowsum(dO * O) - grad_lse
  void* grad_q;       // [B, H, Tq, D] contiguous, q's dtype
  void* grad_k;       // [B, Hk, Tk, D] contiguous
  void* grad_v;       // [B, Hk, Tk, Dv] contiguous
  BlockLists q;       // transposed lists (per key block), for dK / dV
};

}  // namespace blockops::attention
