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
}
