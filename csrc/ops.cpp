// The one schema file: every blockops op is defined here, once. Backends register their kernels in the
// kernel's own file (TORCH_LIBRARY_IMPL(blockops, CPU, m) in csrc/<family>_cpu.cpp, CUDA in
// csrc/kernels/<family>_cuda.cpp); fake (meta) implementations and autograd live in python/blockops/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(blockops, m) {
  // ---- bit packing (family "bitpack") -------------------------------------------------------------------
  // Packs integers in [0, 2^bits), bits in 1..8, along `dim` into int32 words, LSB-first: with
  // p = 32 // bits values per word, value j lands in word j // p, bits [bits*(j%p), bits*(j%p)+bits).
  // Size along dim becomes ceil(n / p); other dims are unchanged. This is the GPTQ/EfficientQAT qweight
  // layout (3-bit: 10 per word, 2 high bits unused). Out-of-range values are an error.
  m.def("pack_bits(Tensor values, int bits, int dim=-1) -> Tensor");
  // Inverse of pack_bits: `size` is the unpacked length along `dim` (ceil(size / p) must equal the packed
  // length). Returns uint8. Bits beyond `size` and unused high bits are ignored.
  m.def("unpack_bits(Tensor packed, int bits, SymInt size, int dim=-1) -> Tensor");

  // ---- low-bit GEMM (family "lowbit", EfficientQAT / GPTQ weights; layout in csrc/lowbit.h) ----------------
  // Weights: qweight [ceil(in / p), out] int32 (b-bit codes packed LSB-first along in, p = 32 // b, b in
  // {2, 3, 4}); scales and zeros [in / g, out] (fp16/bf16/fp32, same dtype); W_hat[n, k] =
  // (q[k, n] - zeros[k / g, n]) * scales[k / g, n]; in = scales.size(0) * group_size.
  // y [..., out] = x [..., in] @ W_hat^T (+ bias [out]); x fp16/bf16/fp32, y has x's dtype.
  m.def("quant_linear(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int bits, int group_size, "
        "Tensor? bias=None) -> Tensor");
  // W_hat [out, in] in the scales' dtype.
  m.def("quant_dequantize(Tensor qweight, Tensor scales, Tensor zeros, int bits, int group_size) -> Tensor");
  // Backward for x: grad_x [..., in] = grad_out [..., out] @ W_hat, in grad_out's dtype.
  m.def("quant_linear_grad_input(Tensor grad_out, Tensor qweight, Tensor scales, Tensor zeros, int bits, "
        "int group_size) -> Tensor");
  // Backward for scales (EfficientQAT E2E-QP), fp32 [in / g, out], from t = grad_out^T @ x ([out, in] fp32,
  // computed by the caller): grad_scales[grp, n] = sum_{k in grp} (q[k, n] - zeros[grp, n]) * t[n, k].
  m.def("quant_grad_scales(Tensor t, Tensor qweight, Tensor zeros, int bits, int group_size) -> Tensor");

  // ---- block-sparse attention (family "attention"; layout and numerics in csrc/attention.h) --------------
  // q [B, H, Tq, D], k [B, Hk, Tk, D], v [B, Hk, Tk, Dv] (H a multiple of Hk; D, Dv multiples of 8 up to
  // 256; one of fp16/bf16/fp32; last dim contiguous). The mask tensors are a BlockMask's int32 lists (forward
  // direction) and bit tiles, for blocks of block_q x block_kv. Returns out [B, H, Tq, Dv] in q's dtype and
  // lse [B, H, Tq] fp32 (natural log; -inf and out = 0 for rows with no visible key). The forward reads only the
  // forward lists; the transposed (q_*) lists are inputs too so that the op's registered autograd can run the
  // backward from the op's own arguments.
  m.def("block_sparse_attention(Tensor q, Tensor k, Tensor v, Tensor kv_num_blocks, Tensor kv_indices, "
        "Tensor full_kv_num_blocks, Tensor full_kv_indices, Tensor kv_tile_ids, Tensor q_num_blocks, "
        "Tensor q_indices, Tensor full_q_num_blocks, Tensor full_q_indices, Tensor q_tile_ids, Tensor tiles, "
        "int block_q, int block_kv, float scale) -> (Tensor out, Tensor lse)");
  // Gradients of block_sparse_attention for q, k, v (same dtypes and shapes), from grad_out [B, H, Tq, Dv],
  // the forward's out and lse, the forward lists (for dq) and the transposed lists (for dk, dv). grad_lse
  // [B, H, Tq] fp32 (optional) is the gradient arriving at lse (d lse_i / d s_ij = P_ij).
  // Deterministic: no atomics, every gradient element is summed in a fixed order.
  m.def("block_sparse_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor? grad_lse, "
        "Tensor kv_num_blocks, Tensor kv_indices, Tensor full_kv_num_blocks, Tensor full_kv_indices, "
        "Tensor kv_tile_ids, Tensor q_num_blocks, Tensor q_indices, Tensor full_q_num_blocks, "
        "Tensor full_q_indices, Tensor q_tile_ids, Tensor tiles, int block_q, int block_kv, float scale) "
        "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");

  // ---- PaTH attention (family "path"; numerics and the chunked algorithm in csrc/path_attention.h) ---------
  // q [B, T, HQ, D], k and w [B, T, H, D], v [B, T, H, Dv], beta [B, T, H], g [B, T, HQ] or None (forget-gate
  // log values, G = cumsum(g) per sequence), cu_seqlens int32/int64 [N + 1] (packed sequences, B = 1) or None;
  // HQ a multiple of H; D, Dv multiples of 8 up to 256; q, k, v one of fp16/bf16/fp32, w/beta/g fp32 or q's
  // dtype; all contiguous. Logit of query i, key j <= i: q_i^T H_i ... H_{j+1} k_j with H_t = I - beta_t w_t w_t^T;
  // s_ij = scale * (logit_ij + G_i - G_j); causal softmax. Returns o [B, T, HQ, Dv] in q's dtype and
  // lse [B, HQ, T] fp32 (natural log). Argument layout of flash-linear-attention's parallel_path_attn.
  m.def("path_attention(Tensor q, Tensor k, Tensor v, Tensor w, Tensor beta, Tensor? g, Tensor? cu_seqlens, "
        "float scale) -> (Tensor o, Tensor lse)");
  // Keys carried to the last position of their sequence, for decoding: k_cache[j] = H_last ... H_{j+1} k_j,
  // [B, T, H, D] in k's dtype (arguments as in path_attention).
  m.def("path_key_cache(Tensor k, Tensor w, Tensor beta, Tensor? cu_seqlens) -> Tensor");
  // Gradients of path_attention from grad_o [B, T, HQ, Dv] (q's dtype), the forward's arguments, its o and lse,
  // and grad_lse [B, HQ, T] fp32 (optional, the gradient arriving at lse). Each gradient has its input's shape and
  // dtype; grad_g is [B, T, HQ], fp32 when g is None (the gradient with respect to a zero gate). Deterministic.
  m.def("path_attention_backward(Tensor grad_o, Tensor q, Tensor k, Tensor v, Tensor w, Tensor beta, Tensor? g, "
        "Tensor? cu_seqlens, Tensor o, Tensor lse, Tensor? grad_lse, float scale) -> (Tensor grad_q, Tensor grad_k, "
        "Tensor grad_v, Tensor grad_w, Tensor grad_beta, Tensor grad_g)");
  // One decoding step for every row of a batched cache (csrc/path_attention.h, DecodeParams): the rank-1 update
  // k_j <- k_j - beta_t (k_j . w_t) w_t of the cached keys j < lengths[b], append k_t / v_t (and G_last += g_t into
  // gates) at lengths[b], attend. q_t [B, HQ, D], k_t and w_t [B, H, D], v_t [B, H, Dv], beta_t [B, H], g_t [B, HQ]
  // or None; the fp32 cache keys [B, H, L, D], values [B, H, L, Dv], gates [B, HQ, L], g_last [B, HQ] is updated in
  // place (lengths int64 [B], each < L, read only). Returns o_t [B, HQ, Dv] in q_t's dtype.
  m.def("path_decode_step(Tensor q_t, Tensor k_t, Tensor v_t, Tensor w_t, Tensor beta_t, Tensor? g_t, "
        "Tensor(a!) keys, Tensor(b!) values, Tensor lengths, Tensor(c!)? gates, Tensor(d!)? g_last, float scale) "
        "-> Tensor");

  // ---- vector-quantized GEMM (family "vq", VQ4DiT / AQLM with out_group_size 1; layout in csrc/vq.h) ---------
  // codes [out, in/d, K] (or [out, in/d] for K = 1), uint8 or int16 (int16 read as uint16: AQLM's storage of
  // 16-bit codes); codebooks [K, k, d] fp16/bf16/fp32, K in {1, 2} additive codebooks, k in [16, 65536], d in
  // {2, 4, 8}; scales [out] or None. W_hat[n, j*d:(j+1)*d] = scales[n] * sum_K codebooks[K, codes[n, j, K]].
  // Codes >= k are an error. y [..., out] = x [..., in] @ W_hat^T (+ bias [out]), in x's dtype, fp32 accumulation.
  m.def("vq_linear(Tensor x, Tensor codes, Tensor codebooks, Tensor? scales=None, Tensor? bias=None) -> Tensor");
  // W_hat [out, in] in the codebooks' dtype.
  m.def("vq_dequantize(Tensor codes, Tensor codebooks, Tensor? scales=None) -> Tensor");
  // Backward for x: grad_x [..., in] = grad_out [..., out] @ W_hat, in grad_out's dtype.
  m.def("vq_linear_grad_input(Tensor grad_out, Tensor codes, Tensor codebooks, Tensor? scales=None) -> Tensor");
  // Backward for the codebooks, fp32 [K, k, d], from t = grad_out^T @ x ([out, in] fp32, computed by the caller):
  // grad[K, c] = sum over (n, j) with codes[n, j, K] == c of scales[n] * t[n, j*d:(j+1)*d]. Deterministic.
  m.def("vq_grad_codebooks(Tensor t, Tensor codes, Tensor codebooks, Tensor? scales=None) -> Tensor");
  // Backward for the scales, fp32 [out]: grad[n] = sum_i W_hat_unscaled[n, i] * t[n, i] (t as above).
  m.def("vq_grad_scales(Tensor t, Tensor codes, Tensor codebooks) -> Tensor");
}
