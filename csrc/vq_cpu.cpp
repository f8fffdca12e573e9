// Vector-quantized GEMM on the CPU (family "vq"; layout and numerics in csrc/vq.h): the CPU glue and the simple
// kernels; the two table kernels are in vq_cpu_lut.cpp and vq_cpu_byte_planes.cpp, the codeword kernel in
// vq_cpu_codewords.cpp (vq_cpu.h), the argument checks in vq_op.cpp.
//
// vq_linear, rows <= kCpuSmallBatchRows (decode), one of two kernels per call (rule: vq::use_lookup_table); up to
// kCpuLutMaxRows rows, the lookup table in passes of up to kCpuSmallBatchRows rows where it is the choice for a
// full pass:
//
//   lookup table:  lut[p][c][m] = x[m, j*d:(j+1)*d] . codebooks[K][c]      p = j*K + K-index, c < k, m < rows
//                  y[m, n] = scales[n] * sum_p lut[p][codes[n, p]][m]       (one vector gather serves every m)
//                  Tables built once per call, split over threads by positions; gathers split over threads by
//                  output rows, tile by tile, chunk by chunk (sketch in vq_cpu_lut.cpp). With uint8 codes on an
//                  AVX-512 VBMI CPU, the tables are split into byte planes and looked up 64 output rows at a
//                  time by register permutes instead ("byte planes", sketch in vq_cpu_byte_planes.cpp): exact fp32
//                  tables (four planes) for fp32 activations, int16 tables (two planes) for fp16 / bf16 ones, which
//                  also take 9..32 rows of layers with at least 256 outputs (use_byte_planes). k <= 64 and one or two
//                  rows, on every AVX2 CPU (VBMI ones included): int16 tables in up to four 16-entry sub-tables, 32
//                  output rows per register shuffle; a NaN or infinite activation falls back to the exact lookup
//                  table.
//   codewords:     1-2 rows, uint8 codes, k = 256, d = 4 or 8, K = 1 or 2, inputs a multiple of 64, on AVX2 CPUs
//                  without VBMI (use_codewords): no tables; codewords and activations in int16 fixed point,
//                  multiplied by vpmaddwd 16 inputs at a time (sketch in vq_cpu_codewords.cpp); a NaN or infinite
//                  activation or codebook entry falls back to the exact lookup table.
//
//   direct:        each task dequantizes one weight row at a time into fp32 and dots it with every
//                  activation row (no table: the choice when k is large relative to out).
//
// vq_linear, larger batches -- blocks of up to kBlockBytes of W_hat dequantized into fp32 and multiplied with
// ATen's GEMM (at::mm; in bf16 for bf16 activations); only one block of W_hat exists at a time.
// vq_dequantize -- W_hat row by row. vq_linear_grad_input -- the same blocks, multiplied the other way.
// vq_grad_codebooks -- deterministic scatter-add: each task owns a range of codewords and scans all codes in
// order, so every codeword's gradient is summed in the same order whatever the thread count.
// vq_grad_scales -- unscaled rows of W_hat dotted with the rows of t = grad_out^T x.
// fp64 (CPU only, for gradcheck): fp64 x / codebooks / scales / t take the blocked GEMM and the plain loops above in
// fp64 (W_hat rows through dequant_row<T = double>); the table and direct kernels stay fp32-only.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "checks.h"
#include "cpu_common.h"
#include "cpu_features.h"
#include "glue.h"
#include "introspection.h"
#include "macros.h"
#include "static_switch.h"
#include "vq_cpu.h"
#include "vq_op.h"

#if BLOCKOPS_X86_DISPATCH
#include <immintrin.h>
#endif

namespace blockops::vq {
namespace {

KernelCounter linear_counter(kFamily, "vq_linear.cpu");
KernelCounter codewords_counter(kFamily, "vq_linear_codewords.cpu");  // which vq_linear.cpu calls took the
                                                                       // int16 codeword kernel
KernelCounter byte_planes_counter(kFamily, "vq_linear_byte_planes.cpu");  // which vq_linear.cpu calls took the
                                                                          // byte-plane kernel
KernelCounter dequant_counter(kFamily, "vq_dequantize.cpu");
KernelCounter grad_input_counter(kFamily, "vq_linear_grad_input.cpu");
KernelCounter grad_codebooks_counter(kFamily, "vq_grad_codebooks.cpu");
KernelCounter grad_scales_counter(kFamily, "vq_grad_scales.cpu");
// The byte-plane kernel (uint8 codes, small batches) needs AVX-512 VBMI.
const char* vq_cpu_isa() {
  return cpu_has_avx512_vbmi() ? "avx2+fma, avx512-vbmi (fp16/bf16 byte planes)" : cpu_isa_name();
}
FamilyRegistration family(kFamily, vq_cpu_isa);

constexpr int64_t kBlockBytes = 64 << 20;  // fp32 W_hat dequantized at once on the GEMM paths. Measured: GEMMs
                                           // on 512-row blocks ran 1.6x slower than one GEMM on the whole
                                           // 4608 x 1152 DiT weight (21 MB), so blocks are as large as this allows

// The scales in T (fp32, or fp64 on the fp64 path), or ones.
template <typename T = float>
std::vector<T> scale_vector(const c10::optional<at::Tensor>& scales, int64_t out) {
  std::vector<T> s(out, T(1));
  if (scales.has_value()) {
    const at::Tensor s32 = contiguous_as<T>(*scales);
    std::copy_n(s32.const_data_ptr<T>(), out, s.begin());
  }
  return s;
}

// ---------------------------------------------------------------------------------------------------------
// Tiny helpers
// ---------------------------------------------------------------------------------------------------------

// Rows [r0, r1) of W_hat into dst (row r at dst + (r - r0) * in), dispatching on d and the code type once.
template <int D, typename CodeT, typename T>
void dequant_rows_t(const CodeT* codes, const T* cb, const Geometry& g, const T* scales, int64_t r0, int64_t r1,
                    T* dst) {
  for (int64_t r = r0; r < r1; ++r) dequant_row<D>(codes + r * g.positions(), cb, g, scales[r], dst + (r - r0) * g.in());
}

template <typename CodeT, typename T>
void dequant_rows_d(const CodeT* codes, const T* cb, const Geometry& g, const T* scales, int64_t r0, int64_t r1,
                    T* dst) {
  switch (g.d) {
    case 2: dequant_rows_t<2>(codes, cb, g, scales, r0, r1, dst); break;
    case 4: dequant_rows_t<4>(codes, cb, g, scales, r0, r1, dst); break;
    default: dequant_rows_t<8>(codes, cb, g, scales, r0, r1, dst); break;
  }
}

template <typename T>
void dequant_rows(const void* codes, CodeType type, const T* cb, const Geometry& g, const T* scales, int64_t r0,
                  int64_t r1, T* dst) {
  if (type == CodeType::kU8) {
    dequant_rows_d(static_cast<const uint8_t*>(codes), cb, g, scales, r0, r1, dst);
  } else {
    dequant_rows_d(static_cast<const uint16_t*>(codes), cb, g, scales, r0, r1, dst);
  }
}

// Same, spread over threads.
template <typename T>
void dequant_rows_parallel(const void* codes, CodeType type, const T* cb, const Geometry& g, const T* scales,
                           int64_t r0, int64_t r1, T* dst) {
  at::parallel_for(r0, r1, 16, [&](int64_t b, int64_t e) { dequant_rows(codes, type, cb, g, scales, b, e, dst + (b - r0) * g.in()); });
}

float dot_portable(const float* a, const float* b, int64_t n) {
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;  // four chains so that the adds pipeline
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += a[i] * b[i];
    s1 += a[i + 1] * b[i + 1];
    s2 += a[i + 2] * b[i + 2];
    s3 += a[i + 3] * b[i + 3];
  }
  for (; i < n; ++i) s0 += a[i] * b[i];
  return (s0 + s1) + (s2 + s3);
}

#if BLOCKOPS_X86_DISPATCH
BLOCKOPS_TARGET_AVX2 float dot_avx2(const float* a, const float* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();  // two chains hide the FMA latency
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
  float s = hsum_avx2(_mm256_add_ps(s0, s1));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}
#endif

float dot(bool avx2, const float* a, const float* b, int64_t n) {
#if BLOCKOPS_X86_DISPATCH
  if (avx2) return dot_avx2(a, b, n);
#endif
  return dot_portable(a, b, n);
}

// ---------------------------------------------------------------------------------------------------------
// Small batches: direct dequantize-dot
// ---------------------------------------------------------------------------------------------------------

void direct_gemv(bool avx2, const float* x, const void* codes, CodeType type, const float* cb, const float* scales,
                 const Geometry& g, int64_t rows, float* y) {
  at::parallel_for(0, g.out, 16, [&](int64_t b, int64_t e) {
    std::vector<float> w(g.in());
    for (int64_t n = b; n < e; ++n) {
      dequant_rows(codes, type, cb, g, scales, n, n + 1, w.data());
      for (int64_t m = 0; m < rows; ++m) y[m * g.out + n] = dot(avx2, x + m * g.in(), w.data(), g.in());
    }
  });
}

// Blocks of W_hat [nb, in] in T (fp32, or fp64 on the fp64 path; at most kBlockBytes, at least 64 rows) in turn,
// handed to fn(n0, nb, block).
template <typename T, typename Fn>
void for_each_block(const void* codes, CodeType type, const T* cb, const T* scales, const Geometry& g, Fn&& fn) {
  const int64_t row_bytes = static_cast<int64_t>(sizeof(T)) * std::max<int64_t>(1, g.in());
  const int64_t block_rows = std::min(g.out, std::max<int64_t>(64, kBlockBytes / row_bytes));
  at::Tensor block = at::empty({block_rows, g.in()}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  for (int64_t n0 = 0; n0 < g.out; n0 += block_rows) {
    const int64_t nb = std::min(block_rows, g.out - n0);
    dequant_rows_parallel(codes, type, cb, g, scales, n0, n0 + nb, block.mutable_data_ptr<T>());
    fn(n0, nb, block.narrow(0, 0, nb));
  }
}

// ---------------------------------------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------------------------------------

at::Tensor vq_linear_cpu(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& codebooks,
                         const c10::optional<at::Tensor>& scales, const c10::optional<at::Tensor>& bias) {
  const Weights w = check_weights(kLinear, codes, codebooks, scales);
  const Geometry& g = w.g;
  check_activation(kLinear, "x", x, g.in(), codes);
  check_bias(bias, g.out, kLinear, codes, "codes");
  std::vector<int64_t> out_sizes = x.sizes().vec();
  out_sizes.back() = g.out;
  const int64_t rows = rows_of(x);
  const bool f64 = any_fp64({&x, &codebooks}) || (scales.has_value() && scales->scalar_type() == at::kDouble);
  const bool planes = !f64 && rows > 0 && g.out > 0 && g.in() > 0 &&
                      use_byte_planes(g, w.type, x.scalar_type() == at::kFloat, rows);
  // The table kernel with uint8 codes (rows up to kCpuLutMaxRows where the rule picks it) checks the codes as it
  // stages them, and so does the byte-plane kernel: a pass over the codes saved (they can be 20 MB).
  const bool table = !planes && !f64 && rows > 0 && rows <= kCpuLutMaxRows &&
                     use_lookup_table(g, std::min(rows, kCpuSmallBatchRows));
  if (!planes && !(table && w.type == CodeType::kU8)) check_code_range(kLinear, codes, w);
  linear_counter.hit();
  if (rows == 0 || g.out == 0 || g.in() == 0) return linear_without_products(out_sizes, bias, x.options());
  if (f64) {
    // The fp64 path: blocks of W_hat and the GEMM in fp64, y in x's dtype.
    const at::Tensor x64 = x.reshape({rows, g.in()}).to(at::kDouble).contiguous();
    const at::Tensor cb64 = contiguous_as<double>(codebooks);
    const std::vector<double> s64 = scale_vector<double>(scales, g.out);
    at::Tensor y64 = at::empty({rows, g.out}, x64.options());
    for_each_block(codes.const_data_ptr(), w.type, cb64.const_data_ptr<double>(), s64.data(), g,
                   [&](int64_t n0, int64_t nb, const at::Tensor& blk) { y64.narrow(1, n0, nb).copy_(at::mm(x64, blk.t())); });
    if (bias.has_value()) y64.add_(contiguous_as<double>(*bias));
    return y64.to(x.scalar_type()).view(out_sizes);
  }
  const bool avx2 = cpu_has_avx2_fma();
  const at::Tensor x32 = contiguous_fp32(x).reshape({rows, g.in()});
  const at::Tensor cb32 = contiguous_fp32(codebooks);
  const std::vector<float> s = scale_vector(scales, g.out);
  at::Tensor y32 = at::empty({rows, g.out}, x32.options());
  const uint8_t* codes8 = static_cast<const uint8_t*>(codes.const_data_ptr());  // read as uint8 only where uint8
  // The codeword and byte-plane kernels take disjoint cases (use_codewords: k = 256, no VBMI). Each returns "not
  // run" (false, -1) for activations its int16 arithmetic cannot hold; the exact table kernel below takes them.
  const float* xp = x32.const_data_ptr<float>();
  const float* cbp = cb32.const_data_ptr<float>();
  float* yp = y32.mutable_data_ptr<float>();
  const bool codewords = use_codewords(g, w.type, rows) && codeword_gemv(xp, codes8, cbp, s.data(), g, rows, yp);
  const int largest =
      planes && !codewords ? plane_gemv(xp, codes8, cbp, s.data(), g, rows, x.scalar_type() == at::kFloat, yp) : -1;
  if (codewords) {
    codewords_counter.hit();
  } else if (largest >= 0) {
    byte_planes_counter.hit();
    if (largest >= g.k) check_code_range(kLinear, codes, w);  // raises, naming the first code out of range
  } else if (planes || table) {
    // Passes of balanced size, at most kCpuSmallBatchRows rows each.
    const int64_t passes = (rows + kCpuSmallBatchRows - 1) / kCpuSmallBatchRows;
    const int64_t per_pass = (rows + passes - 1) / passes;
    uint32_t seen = 0;
    for (int64_t m0 = 0; m0 < rows; m0 += per_pass) {
      seen |= lut_gemv(avx2, x32.const_data_ptr<float>() + m0 * g.in(), codes.const_data_ptr(), w.type,
                       cb32.const_data_ptr<float>(), s.data(), g, std::min(per_pass, rows - m0),
                       y32.mutable_data_ptr<float>() + m0 * g.out);
    }
    if (w.type == CodeType::kU8 && seen >= g.k) check_code_range(kLinear, codes, w);  // raises if one is >= k
  } else if (rows <= kCpuSmallBatchRows) {
    direct_gemv(avx2, x32.const_data_ptr<float>(), codes.const_data_ptr(), w.type, cb32.const_data_ptr<float>(),
                s.data(), g, rows, y32.mutable_data_ptr<float>());
  } else {
    // bf16 activations multiply in bf16 (W_hat rounded to bf16, fp32 accumulation inside the GEMM), as
    // F.linear does with bf16 weights, where the CPU has bf16 dot products (cpu_has_bf16_gemm): that GEMM runs
    // about twice as fast as the fp32 one there, and several times slower on AVX2-only CPUs (emulated).
    const bool bf16_gemm = x.scalar_type() == at::kBFloat16 && cpu_has_bf16_gemm();
    const at::Tensor xg = bf16_gemm ? x.reshape({rows, g.in()}).contiguous() : x32;
    for_each_block(codes.const_data_ptr(), w.type, cb32.const_data_ptr<float>(), s.data(), g,
                   [&](int64_t n0, int64_t nb, const at::Tensor& blk) {
                     const at::Tensor product = at::mm(xg, (bf16_gemm ? blk.to(at::kBFloat16) : blk).t());
                     if (nb == g.out && !bf16_gemm) {
                       y32 = product;   // one block: no copy into a column slice
                     } else {
                       y32.narrow(1, n0, nb).copy_(product);
                     }
                   });
  }
  if (bias.has_value()) y32.add_(contiguous_fp32(*bias));
  return y32.to(x.scalar_type()).view(out_sizes);
}

at::Tensor vq_dequantize_cpu(const at::Tensor& codes, const at::Tensor& codebooks,
                             const c10::optional<at::Tensor>& scales) {
  const Weights w = check_weights(kDequant, codes, codebooks, scales);
  check_code_range(kDequant, codes, w);
  dequant_counter.hit();
  return BLOCKOPS_FLOAT_SWITCH(codebooks.scalar_type() == at::kDouble, T, [&] {
    at::Tensor out = at::empty({w.g.out, w.g.in()}, codebooks.options().dtype(c10::CppTypeToScalarType<T>::value));
    if (out.numel() == 0) return out.to(codebooks.scalar_type());
    const at::Tensor cb32 = contiguous_as<T>(codebooks);
    const std::vector<T> s = scale_vector<T>(scales, w.g.out);
    dequant_rows_parallel(codes.const_data_ptr(), w.type, cb32.const_data_ptr<T>(), w.g, s.data(), 0, w.g.out,
                          out.mutable_data_ptr<T>());
    return out.to(codebooks.scalar_type());
  });
}

at::Tensor vq_linear_grad_input_cpu(const at::Tensor& grad_out, const at::Tensor& codes, const at::Tensor& codebooks,
                                    const c10::optional<at::Tensor>& scales) {
  const Weights w = check_weights(kGradInput, codes, codebooks, scales);
  const Geometry& g = w.g;
  check_activation(kGradInput, "grad_out", grad_out, g.out, codes);
  check_code_range(kGradInput, codes, w);
  std::vector<int64_t> out_sizes = grad_out.sizes().vec();
  out_sizes.back() = g.in();
  const int64_t rows = g.out > 0 ? grad_out.numel() / g.out : 0;
  grad_input_counter.hit();
  if (rows == 0 || g.in() == 0) return at::zeros(out_sizes, grad_out.options());
  const bool f64 = any_fp64({&grad_out, &codebooks}) || (scales.has_value() && scales->scalar_type() == at::kDouble);
  return BLOCKOPS_FLOAT_SWITCH(f64, T, [&] {
    const at::Tensor gy = contiguous_as<T>(grad_out).reshape({rows, g.out});
    const at::Tensor cb32 = contiguous_as<T>(codebooks);
    const std::vector<T> s = scale_vector<T>(scales, g.out);
    at::Tensor gx = at::zeros({rows, g.in()}, gy.options());
    for_each_block(codes.const_data_ptr(), w.type, cb32.const_data_ptr<T>(), s.data(), g,
                   [&](int64_t n0, int64_t nb, const at::Tensor& blk) { gx.addmm_(gy.narrow(1, n0, nb), blk); });
    return gx.to(grad_out.scalar_type()).view(out_sizes);
  });
}

at::Tensor vq_grad_codebooks_cpu(const at::Tensor& t, const at::Tensor& codes, const at::Tensor& codebooks,
                                 const c10::optional<at::Tensor>& scales) {
  const Weights w = check_weights(kGradCodebooks, codes, codebooks, scales);
  const Geometry& g = w.g;
  check_t(kGradCodebooks, t, g, codes);
  check_code_range(kGradCodebooks, codes, w);
  grad_codebooks_counter.hit();
  // In t's dtype: fp32, or fp64 on the fp64 path (check_t allows fp64 t on the CPU only).
  return BLOCKOPS_FLOAT_SWITCH(t.scalar_type() == at::kDouble, T, [&] {
    at::Tensor grad = at::zeros({g.K, g.k, g.d}, t.options());
    if (g.out == 0 || g.groups == 0) return grad;
    const std::vector<T> s = scale_vector<T>(scales, g.out);
    const T* tp = t.const_data_ptr<T>();
    T* gp = grad.mutable_data_ptr<T>();
    const void* cp = codes.const_data_ptr();
    const int64_t P = g.positions();
    // Each task owns codewords [c0, c1) of every codebook and walks all codes in (n, j) order.
    at::parallel_for(0, g.k, std::max<int64_t>(16, g.k / (4 * at::get_num_threads())), [&](int64_t c0, int64_t c1) {
      for (int64_t n = 0; n < g.out; ++n) {
        const T sn = s[n];
        const T* trow = tp + n * g.in();
        for (int64_t p = 0; p < P; ++p) {
          const int64_t c = read_code(cp, w.type, n * P + p);
          if (c < c0 || c >= c1) continue;
          T* dst = gp + ((p % g.K) * g.k + c) * g.d;
          const T* src = trow + (p / g.K) * g.d;
          for (int64_t i = 0; i < g.d; ++i) dst[i] += sn * src[i];
        }
      }
    });
    return grad;
  });
}

at::Tensor vq_grad_scales_cpu(const at::Tensor& t, const at::Tensor& codes, const at::Tensor& codebooks) {
  const Weights w = check_weights(kGradScales, codes, codebooks, c10::nullopt);
  const Geometry& g = w.g;
  check_t(kGradScales, t, g, codes);
  check_code_range(kGradScales, codes, w);
  grad_scales_counter.hit();
  at::Tensor grad = at::empty({g.out}, t.options());
  if (g.out == 0) return grad;
  if (t.scalar_type() == at::kDouble) {
    // The fp64 path (t fp64 on the CPU): unscaled W_hat rows in fp64, plain dot products.
    const at::Tensor cb64 = contiguous_as<double>(codebooks);
    const std::vector<double> ones(g.out, 1.0);
    const double* tp = t.const_data_ptr<double>();
    double* gp = grad.mutable_data_ptr<double>();
    at::parallel_for(0, g.out, 16, [&](int64_t b, int64_t e) {
      std::vector<double> row(g.in());
      for (int64_t n = b; n < e; ++n) {
        dequant_rows(codes.const_data_ptr(), w.type, cb64.const_data_ptr<double>(), g, ones.data(), n, n + 1,
                     row.data());
        double acc = 0.0;
        for (int64_t i = 0; i < g.in(); ++i) acc += row[i] * tp[n * g.in() + i];
        gp[n] = acc;
      }
    });
    return grad;
  }
  const bool avx2 = cpu_has_avx2_fma();
  const at::Tensor cb32 = contiguous_fp32(codebooks);
  const std::vector<float> ones(g.out, 1.0f);
  const float* tp = t.const_data_ptr<float>();
  float* gp = grad.mutable_data_ptr<float>();
  at::parallel_for(0, g.out, 16, [&](int64_t b, int64_t e) {
    std::vector<float> row(g.in());
    for (int64_t n = b; n < e; ++n) {
      dequant_rows(codes.const_data_ptr(), w.type, cb32.const_data_ptr<float>(), g, ones.data(), n, n + 1, row.data());
      gp[n] = dot(avx2, row.data(), tp + n * g.in(), g.in());
    }
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(blockops, CPU, m) {
  m.impl("vq_linear", &vq_linear_cpu);
  m.impl("vq_dequantize", &vq_dequantize_cpu);
  m.impl("vq_linear_grad_input", &vq_linear_grad_input_cpu);
  m.impl("vq_grad_codebooks", &vq_grad_codebooks_cpu);
  m.impl("vq_grad_scales", &vq_grad_scales_cpu);
}

}  // namespace blockops::vq
