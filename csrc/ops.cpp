// The one schema file: every blockops op is defined here, once, with the kernel family it belongs to. Backends
// register their kernels in the kernel's own file (TORCH_LIBRARY_IMPL(blockops, CPU, m) in csrc/<family>_cpu*.cpp,
// CUDA in csrc/kernels/<family>_cuda.cpp); fake (meta) implementations and autograd live in
// python/blockops/ops/<family>.py. docs/architecture.md has the map.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#include <string>

#include "introspection.h"
#if BLOCKOPS_WITH_CUDA
#include "kernels/cuda_glue.h"
#endif

namespace {

// The CUDA kernel of an op whose family has no CUDA kernels in this build (not compiled, or no requested
// architecture supports it): an error naming the op, the GPU and why, instead of torch's "could not run ... with
// arguments from the 'CUDA' backend" or a missing symbol.
void cuda_kernels_missing(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const std::string name = op.schema().name().substr(std::string("blockops::").size());
  std::string gpu;
#if BLOCKOPS_WITH_CUDA
  for (const c10::IValue& v : *stack) {
    if (v.isTensor() && v.toTensor().is_cuda()) {
      gpu = " on " + blockops::describe_cuda_device(v.toTensor().device().index());
      break;
    }
  }
#endif
  TORCH_CHECK(false, "blockops.", name, gpu, ": this build has no CUDA kernels of the ", blockops::op_family(name),
              " family (", blockops::cuda_build_summary(), "). Rebuild blockops with TORCH_CUDA_ARCH_LIST naming "
              "your GPU's architecture (torch.cuda.get_device_capability()), e.g. TORCH_CUDA_ARCH_LIST=\"8.0;9.0a\".");
}

// Defines one op of `family` and records the family (build_info()["ops"]); gives it the CUDA kernel above when
// the family's CUDA kernels are not in this build.
void define(torch::Library& m, const char* family, const char* schema) {
  const std::string text(schema);
  const std::string name = text.substr(0, text.find('('));
  blockops::register_op_family(name, family);
  m.def(schema);
  if (blockops::find_cuda_family(family) == nullptr) {
    m.impl(name.c_str(), torch::dispatch(c10::DispatchKey::CUDA,
                                         torch::CppFunction::makeFromBoxedFunction<&cuda_kernels_missing>()));
  }
}

}  // namespace

TORCH_LIBRARY(blockops, m) {
  // ---- bit packing (family "bitpack") -------------------------------------------------------------------
  // Packs integers in [0, 2^bits), bits in 1..8, along `dim` into int32 words, LSB-first: with
  // p = 32 // bits values per word, value j lands in word j // p, bits [bits*(j%p), bits*(j%p)+bits).
  // Size along dim becomes ceil(n / p); other dims are unchanged. This is the GPTQ/EfficientQAT qweight
  // layout (3-bit: 10 per word, 2 high bits unused). Out-of-range values are an error.
  define(m, "bitpack", "pack_bits(Tensor values, int bits, int dim=-1) -> Tensor");
  // Inverse of pack_bits: `size` is the unpacked length along `dim` (ceil(size / p) must equal the packed
  // length). Returns uint8. Bits beyond `size` and unused high bits are ignored.
  define(m, "bitpack", "unpack_bits(Tensor packed, int bits, SymInt size, int dim=-1) -> Tensor");

  // ---- low-bit GEMM (family "lowbit", EfficientQAT / GPTQ weights; layout in csrc/lowbit.h) ----------------
  // Weights: qweight [ceil(in / p), out] int32 (b-bit codes packed LSB-first along in, p = 32 // b, b in
  // {2, 3, 4}); scales and zeros [in / g, out] (fp16/bf16/fp32, same dtype); W_hat[n, k] =
  // (q[k, n] - zeros[k / g, n]) * scales[k / g, n]; in = scales.size(0) * group_size.
  // y [..., out] = x [..., in] @ W_hat^T (+ bias [out]); x fp16/bf16/fp32, y has x's dtype.
  // fp64 (x, scales/zeros, bias, t; CPU only) runs a portable fp64 path throughout the family, for gradcheck; the same
  // holds for the vq and ptq161 families and apply_residual. CUDA refuses fp64 ("float64 is CPU-only").
  define(m, "lowbit",
         "quant_linear(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int bits, int group_size, "
         "Tensor? bias=None) -> Tensor");
  // W_hat [out, in] in the scales' dtype.
  define(m, "lowbit",
         "quant_dequantize(Tensor qweight, Tensor scales, Tensor zeros, int bits, int group_size) -> Tensor");
  // Backward for x: grad_x [..., in] = grad_out [..., out] @ W_hat, in grad_out's dtype.
  define(m, "lowbit",
         "quant_linear_grad_input(Tensor grad_out, Tensor qweight, Tensor scales, Tensor zeros, int bits, "
         "int group_size) -> Tensor");
  // Backward for scales (EfficientQAT E2E-QP), fp32 [in / g, out], from t = grad_out^T @ x ([out, in] fp32,
  // computed by the caller): grad_scales[grp, n] = sum_{k in grp} (q[k, n] - zeros[grp, n]) * t[n, k].
  define(m, "lowbit", "quant_grad_scales(Tensor t, Tensor qweight, Tensor zeros, int bits, int group_size) -> Tensor");

  // ---- block-sparse attention (family "attention"; layout and numerics in csrc/attention.h) --------------
  // q [B, H, Tq, D], k [B, Hk, Tk, D], v [B, Hk, Tk, Dv] (H a multiple of Hk; D, Dv multiples of 8 up to
  // 256; one of fp16/bf16/fp32; last dim contiguous). The mask tensors are a BlockMask's int32 lists (forward
  // direction) and bit tiles, for blocks of block_q x block_kv. Returns out [B, H, Tq, Dv] in q's dtype and
  // lse [B, H, Tq] fp32 (natural log; -inf and out = 0 for rows with no visible key). The forward reads only the
  // forward lists; the transposed (q_*) lists are inputs too so that the op's registered autograd can run the
  // backward from the op's own arguments.
  define(m, "attention",
         "block_sparse_attention(Tensor q, Tensor k, Tensor v, Tensor kv_num_blocks, Tensor kv_indices, "
         "Tensor full_kv_num_blocks, Tensor full_kv_indices, Tensor kv_tile_ids, Tensor q_num_blocks, "
         "Tensor q_indices, Tensor full_q_num_blocks, Tensor full_q_indices, Tensor q_tile_ids, Tensor tiles, "
         "int block_q, int block_kv, float scale) -> (Tensor out, Tensor lse)");
  // Gradients of block_sparse_attention for q, k, v (same dtypes and shapes), from grad_out [B, H, Tq, Dv],
  // the forward's out and lse, the forward lists (for dq) and the transposed lists (for dk, dv). grad_lse
  // [B, H, Tq] fp32 (optional) is the gradient arriving at lse (d lse_i / d s_ij = P_ij).
  // Deterministic: no atomics, every gradient element is summed in a fixed order.
  define(m, "attention",
         "block_sparse_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
         "Tensor? grad_lse, "
         "Tensor kv_num_blocks, Tensor kv_indices, Tensor full_kv_num_blocks, Tensor full_kv_indices, "
         "Tensor kv_tile_ids, Tensor q_num_blocks, Tensor q_indices, Tensor full_q_num_blocks, "
         "Tensor full_q_indices, Tensor q_tile_ids, Tensor tiles, int block_q, int block_kv, float scale) "
         "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");

  // ---- PaTH attention (family "path_attention"; numerics and the chunked algorithm in csrc/path_attention.h) ---
  // q [B, T, HQ, D], k and w [B, T, H, D], v [B, T, H, Dv], beta [B, T, H], g [B, T, HQ] or None (forget-gate
  // log values, G = cumsum(g) per sequence), cu_seqlens int32/int64 [N + 1] (packed sequences, B = 1) or None;
  // HQ a multiple of H; D, Dv multiples of 8 up to 256; q, k, v one of fp16/bf16/fp32, w/beta/g fp32 or q's
  // dtype, or everything fp64 (CPU only: computed in fp64 throughout, for gradcheck); all contiguous. Logit of
  // query i, key j <= i: q_i^T H_i ... H_{j+1} k_j with H_t = I - beta_t w_t w_t^T;
  // s_ij = scale * (logit_ij + G_i - G_j); causal softmax. Returns o [B, T, HQ, Dv] in q's dtype and
  // lse [B, HQ, T] fp32, fp64 for fp64 inputs (natural log). Argument layout of flash-linear-attention's
  // parallel_path_attn.
  define(m, "path_attention",
         "path_attention(Tensor q, Tensor k, Tensor v, Tensor w, Tensor beta, Tensor? g, Tensor? cu_seqlens, "
         "float scale) -> (Tensor o, Tensor lse)");
  // Keys carried to the last position of their sequence, for decoding: k_cache[j] = H_last ... H_{j+1} k_j,
  // [B, T, H, D] in k's dtype (arguments as in path_attention).
  define(m, "path_attention", "path_key_cache(Tensor k, Tensor w, Tensor beta, Tensor? cu_seqlens) -> Tensor");
  // Gradients of path_attention from grad_o [B, T, HQ, Dv] (q's dtype), the forward's arguments, its o and lse,
  // and grad_lse [B, HQ, T] in lse's dtype (optional, the gradient arriving at lse). Each gradient has its input's
  // shape and dtype; grad_g is [B, T, HQ], in lse's dtype when g is None (the gradient with respect to a zero
  // gate). Deterministic.
  define(m, "path_attention",
         "path_attention_backward(Tensor grad_o, Tensor q, Tensor k, Tensor v, Tensor w, Tensor beta, Tensor? g, "
         "Tensor? cu_seqlens, Tensor o, Tensor lse, Tensor? grad_lse, float scale) -> (Tensor grad_q, Tensor grad_k, "
         "Tensor grad_v, Tensor grad_w, Tensor grad_beta, Tensor grad_g)");
  // One decoding step for every row of a batched cache (csrc/path_attention.h, DecodeParams): the rank-1 update
  // k_j <- k_j - beta_t (k_j . w_t) w_t of the cached keys j < lengths[b], append k_t / v_t (and G_last += g_t into
  // gates) at lengths[b], attend. q_t [B, HQ, D], k_t and w_t [B, H, D], v_t [B, H, Dv], beta_t [B, H], g_t [B, HQ]
  // or None; the fp32 (fp64 for fp64 inputs, CPU only) cache keys [B, H, L, D], values [B, H, L, Dv],
  // gates [B, HQ, L], g_last [B, HQ] is updated in place (lengths int64 [B], each < L, read only). Returns
  // o_t [B, HQ, Dv] in q_t's dtype.
  define(m, "path_attention",
         "path_decode_step(Tensor q_t, Tensor k_t, Tensor v_t, Tensor w_t, Tensor beta_t, Tensor? g_t, "
         "Tensor(a!) keys, Tensor(b!) values, Tensor lengths, Tensor(c!)? gates, Tensor(d!)? g_last, float scale) "
         "-> Tensor");

  // ---- vector-quantized GEMM (family "vq", VQ4DiT / AQLM with out_group_size 1; layout in csrc/vq.h) ---------
  // codes [out, in/d, K] (or [out, in/d] for K = 1), uint8 or int16 (int16 read as uint16: AQLM's storage of
  // 16-bit codes); codebooks [K, k, d] fp16/bf16/fp32, K in {1, 2} additive codebooks, k in [16, 65536], d in
  // {2, 4, 8}; scales [out] or None. W_hat[n, j*d:(j+1)*d] = scales[n] * sum_K codebooks[K, codes[n, j, K]].
  // Codes >= k are an error. y [..., out] = x [..., in] @ W_hat^T (+ bias [out]), in x's dtype, fp32 accumulation.
  define(m, "vq",
         "vq_linear(Tensor x, Tensor codes, Tensor codebooks, Tensor? scales=None, Tensor? bias=None) -> Tensor");
  // W_hat [out, in] in the codebooks' dtype.
  define(m, "vq", "vq_dequantize(Tensor codes, Tensor codebooks, Tensor? scales=None) -> Tensor");
  // Backward for x: grad_x [..., in] = grad_out [..., out] @ W_hat, in grad_out's dtype.
  define(m, "vq",
         "vq_linear_grad_input(Tensor grad_out, Tensor codes, Tensor codebooks, Tensor? scales=None) -> Tensor");
  // Backward for the codebooks, fp32 [K, k, d], from t = grad_out^T @ x ([out, in] fp32, computed by the caller):
  // grad[K, c] = sum over (n, j) with codes[n, j, K] == c of scales[n] * t[n, j*d:(j+1)*d]. Deterministic.
  define(m, "vq", "vq_grad_codebooks(Tensor t, Tensor codes, Tensor codebooks, Tensor? scales=None) -> Tensor");
  // Backward for the scales, fp32 [out]: grad[n] = sum_i W_hat_unscaled[n, i] * t[n, i] (t as above).
  define(m, "vq", "vq_grad_scales(Tensor t, Tensor codes, Tensor codebooks) -> Tensor");

  // ---- 1.61-bit GEMM (family "ptq161", PTQ1.61 weights; packed format and numerics in csrc/ptq161.h) ----------
  // Weights: perm [in] int32 (a permutation: perm[:S] salient channels, perm[S:] the N = in - S others),
  // qsalient [S_pad / 8, out] int32 (4-bit codes of the salient channels in perm order, pack_bits(q, 4, dim=0),
  // S_pad = S rounded up to 16), salient_scale / salient_zero [out], signs [ceil(N / 32), out] int32 (sign bits
  // in perm order, pack_bits(b, 1, dim=0), 1 = +1), zero_signs [Z] int64 (strictly increasing flat indices
  // j * out + i of the sign(0) = 0 entries), alpha, mu, r1 [out], r2 [in] (factors fp16/bf16/fp32), S = num_salient.
  // W_hat[i, perm[k]] = s_i (q[k, i] - z_i) (k < S); W_hat[i, perm[S + j]] = r1_i r2_c (alpha_i b[j, i] + mu_i).
  // y [..., out] = x [..., in] @ W_hat^T (+ bias [out]); x fp16/bf16/fp32, y in x's dtype, fp32 accumulation.
  define(m, "ptq161",
         "ptq161_linear(Tensor x, Tensor perm, Tensor qsalient, Tensor salient_scale, Tensor salient_zero, "
         "Tensor signs, Tensor zero_signs, Tensor alpha, Tensor mu, Tensor r1, Tensor r2, int num_salient, "
         "Tensor? bias=None) -> Tensor");
  // W_hat [out, in] fp32 (fp64 when a factor is fp64: the CPU fp64 path), original channel order.
  define(m, "ptq161",
         "ptq161_dequantize(Tensor perm, Tensor qsalient, Tensor salient_scale, Tensor salient_zero, Tensor signs, "
         "Tensor zero_signs, Tensor alpha, Tensor mu, Tensor r1, Tensor r2, int num_salient) -> Tensor");
  // Gradients of ptq161_linear (without bias) from grad_out [..., out]: grad_x (x's shape and dtype) when
  // need_input, and grad_alpha, grad_r1, grad_r2 (their arguments' shapes and dtypes) when need_factors; outputs
  // not asked for are empty [0] tensors. mu, salient_scale and salient_zero are fixed (as in PTQ1.61).
  define(m, "ptq161",
         "ptq161_linear_backward(Tensor grad_out, Tensor x, Tensor perm, Tensor qsalient, Tensor salient_scale, "
         "Tensor salient_zero, Tensor signs, Tensor zero_signs, Tensor alpha, Tensor mu, Tensor r1, Tensor r2, "
         "int num_salient, bool need_input, bool need_factors) -> (Tensor grad_x, Tensor grad_alpha, "
         "Tensor grad_r1, Tensor grad_r2)");
  // ---- masked diffusion LM decoding (family "dllm", Fast-dLLM; numerics and the exact rules in csrc/dllm.h) -----
  // Confidence-aware unmasking in one pass over logits [B, L, V] (fp16/bf16/fp32, vocabulary dim contiguous, other
  // dims may be strided). Candidates: positions l with masked[b, l] (bool [B, L]) and lo <= l < hi, block_bounds
  // int64 [B, 2] = (lo, hi). Per candidate: argmax token (first index on ties) and its softmax probability (online
  // max / sum-exp). Per row, the candidates ranked by confidence: the top max(1, min_tokens[b]) (int64 [B], default
  // 1) and, with factor=None, every one with conf > threshold, or with a factor, the top n while
  // (n + 1)(1 - c_n) < factor. Returns tokens int64 [B, L] (-1 off candidates), unmask bool [B, L] and confidence
  // fp32 [B, L] (-inf off candidates). Fixed shapes, no host sync.
  define(m, "dllm",
         "dllm_unmask(Tensor logits, Tensor masked, Tensor block_bounds, Tensor? min_tokens, float threshold, "
         "float? factor) -> (Tensor tokens, Tensor unmask, Tensor confidence)");
  // Dual-cache slot overwrite, in place: cache[b, h, positions[b, j], :] = new[b, h, j, :] for cache [B, H, S, D]
  // (fp16/bf16/fp32, contiguous), new [B, H, n, D] (cache's dtype, last dim contiguous), positions int64 [B, n]
  // (per row, strictly increasing, in [0, S)). check_indices=True raises on a bad position (a host sync on CUDA);
  // False skips out-of-range entries (never writes out of bounds).
  define(m, "dllm", "dllm_kv_overwrite(Tensor(a!) cache, Tensor new, Tensor positions, bool check_indices=True) -> ()");
  // ---- cached-block skipping (family "block_cache"; layout and numerics in csrc/block_cache.h) ---------------
  // Tensors of one call share shape, dtype (fp16/bf16/fp32) and device, contiguous, at least 2 dims, seen as
  // [B, T, C] (B = size(0), T = size(1), C = the rest). Only tokens t % stride == 0 enter the indicator.
  // Relative L1 indicator sum|current - reference| / sum|reference| (0 when both sums are 0), accumulated in
  // fp32 per fixed chunk and fp64 across chunks (deterministic): fp32 [B] when per_sample, else fp32 [] over
  // the whole batch. Stays on the device: no host synchronisation.
  define(m, "block_cache",
         "relative_l1(Tensor current, Tensor reference, int stride=1, bool per_sample=False) -> Tensor");
  // One pass over output, input and reference: writes residual = output - input (all tokens) and returns the
  // indicator of x against reference as relative_l1 does, x = output - input (in fp32, before rounding to the
  // residual's dtype) when compare_residual, else output.
  define(m, "block_cache",
         "relative_l1_residual(Tensor output, Tensor input, Tensor reference, Tensor(a!) residual, int stride=1, "
         "bool per_sample=False, bool compare_residual=False) -> Tensor");
  // input + residual (a skipped block's output), added in fp32, rounded once to the dtype they share.
  define(m, "block_cache", "apply_residual(Tensor input, Tensor residual) -> Tensor");
  // cache <- value (same shape and dtype, contiguous); with gate (a one-element bool or float tensor on the same
  // device) only where gate != 0, read by the kernel on the device (no host synchronisation).
  define(m, "block_cache", "cache_update(Tensor(a!) cache, Tensor value, Tensor? gate=None) -> ()");
}
