// The lowbit family's CPU entry points for other families' CPU code (the rest of the CPU code: lowbit_cpu.cpp).
#pragma once
#include <ATen/core/Tensor.h>

#include <memory>

#include "lowbit.h"

namespace blockops::lowbit {

// quant_linear's product of one activation row on its fixed-point split-K path, as pieces any thread may run, for a
// caller that runs them inside its own parallel region beside other work (ptq161: its salient 4-bit part beside its
// binary GEMV, one region instead of two). The same kernels and the same partial sums added in the same order as
// quant_linear: bitwise its result.
class RowProduct {
 public:
  // Whether this CPU and geometry take that path: AVX2, groups of at most kCpuFixedPointMaxGroup, at least one full
  // 16-column tile.
  static bool applies(const Geometry& g);
  // x32 [1, in] fp32 contiguous; qweight, scales and zeros in the format lowbit.h describes, on the CPU, checked by
  // the caller (quant_linear's checks: check_weight in lowbit_op.cpp), except that scales and zeros may also be one
  // row [1, out] that every group shares (read in place: no [groups, out] copy).
  RowProduct(const at::Tensor& x32, const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
             const Geometry& g);
  ~RowProduct();
  int64_t pieces() const;
  void run(int64_t piece) const;  // each piece once, from any thread; distinct pieces at once
  // Once every piece has run: y[c] for full-tile columns c in [c0, c1) within [0, width()) (any split of them, from
  // any threads), and the columns [width(), out) past the last full tile.
  int64_t width() const;
  void sum(float* y, int64_t c0, int64_t c1) const;
  void partial_tile(float* y) const;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace blockops::lowbit
