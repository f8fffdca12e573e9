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
}
