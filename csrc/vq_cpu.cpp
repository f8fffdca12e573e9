// Vector-quantized GEMM on the CPU (family "vq"; layout and numerics in csrc/vq.h). CUDA tensors have no
// kernel yet and get the dispatcher's missing-kernel error.
//
// vq_linear, rows <= kSmallBatchRows (decode), one of two kernels per call (rule: vq::use_lookup_table):
//
//   lookup table:  lut[m][p][c] = x[m, j*d:(j+1)*d] . codebooks[K][c]      p = j*K + K-index, c < k
//                  y[m, n] = scales[n] * sum_p lut[m][p][codes[n, p]]       (gathers, 4 sums in flight)
//
//      codes [out, P]            tasks own tiles of kTileRows output rows; inside a tile the positions are
//      +-- chunk --+-- chunk --  walked in chunks of kChunkBytes of table per activation row, so the part of
//      | tile 0    |             the table a chunk gathers from stays in L1/L2 across the tile's rows
//      | tile 1    |
//
//   direct:        each task dequantizes one weight row at a time into fp32 and dots it with every
//                  activation row (no table: the choice when k is large relative to out).
//
// vq_linear, larger batches -- blocks of up to kBlockBytes of W_hat dequantized into fp32 and multiplied with
// ATen's GEMM (at::mm); only one block of W_hat exists at a time.
// vq_dequantize -- W_hat row by row. vq_linear_grad_input -- the same blocks, multiplied the other way.
// vq_grad_codebooks -- deterministic scatter-add: each task owns a range of codewords and scans all codes in
// order, so every codeword's gradient is summed in the same order whatever the thread count.
// vq_grad_scales -- unscaled rows of W_hat dotted with the rows of t = grad_out^T x.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#if BLOCKOPS_X86_DISPATCH
#include <immintrin.h>
#endif

#include "checks.h"
#include "cpu_features.h"
#include "introspection.h"
#include "vq.h"
#include "vq_op.h"

namespace blockops::vq {
namespace {

constexpr const char* kLinear = "blockops.vq_linear";
constexpr const char* kDequant = "blockops.vq_dequantize";
constexpr const char* kGradInput = "blockops.vq_linear_grad_input";
constexpr const char* kGradCodebooks = "blockops.vq_grad_codebooks";
constexpr const char* kGradScales = "blockops.vq_grad_scales";

KernelCounter linear_counter("vq_linear.cpu");
KernelCounter dequant_counter("vq_dequantize.cpu");
KernelCounter grad_input_counter("vq_linear_grad_input.cpu");
KernelCounter grad_codebooks_counter("vq_grad_codebooks.cpu");
KernelCounter grad_scales_counter("vq_grad_scales.cpu");
FamilyRegistration family("vq", cpu_isa_name);

constexpr int64_t kSmallBatchRows = 4;     // measured on 4096x4096, 2 loaded Zen 4 cores, one thread: the
                                           // table kernel costs ~1.2 (d=8) to ~3.5 (d=4) ms per row, the
                                           // blocks + GEMM ~11-14 ms from 9 rows on; even at 4 rows, not at 8
constexpr int64_t kTileRows = 64;          // output rows per task of the small-batch kernels
constexpr int64_t kChunkBytes = 16 << 10;  // table bytes per activation row gathered from per chunk (L1)
constexpr int64_t kBlockBytes = 64 << 20;  // fp32 W_hat dequantized at once on the GEMM paths. Measured: GEMMs
                                           // on 512-row blocks ran 1.6x slower than one GEMM on the whole
                                           // 4608 x 1152 DiT weight (21 MB), so blocks are as large as this allows

// ---------------------------------------------------------------------------------------------------------
// Argument checks
// ---------------------------------------------------------------------------------------------------------

// Codes >= k would index past the codebook: a user error, found here before any kernel reads a codeword.
// Skipped when the dtype cannot hold such a code (uint8 with k = 256, int16 with k = 65536).
void check_code_range(const char* op, const at::Tensor& codes, const Weights& w) {
  if (w.g.k >= code_capacity(w.type)) return;
  const int64_t n = codes.numel();
  const void* p = codes.const_data_ptr();
  const uint32_t k = static_cast<uint32_t>(w.g.k);
  uint32_t mx = 0;
  if (w.type == CodeType::kU8) {
    const uint8_t* c = static_cast<const uint8_t*>(p);
    for (int64_t i = 0; i < n; ++i) mx = std::max<uint32_t>(mx, c[i]);  // vectorised by the compiler
  } else {
    const uint16_t* c = static_cast<const uint16_t*>(p);
    for (int64_t i = 0; i < n; ++i) mx = std::max<uint32_t>(mx, c[i]);
  }
  if (mx < k) return;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t c = read_code(p, w.type, i);
    TORCH_CHECK(c < k, op, ": code ", c, " at codes[", i / w.g.positions(), ", ", (i % w.g.positions()) / w.g.K, ", ",
                i % w.g.K, "] is out of range for a codebook of k = ", k, " codewords (codes shape ", codes.sizes(),
                w.type == CodeType::kU16 ? "; int16 codes are read as uint16" : "", ")");
  }
}

at::Tensor as_float(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// The scales in fp32, or ones.
std::vector<float> scale_vector(const c10::optional<at::Tensor>& scales, int64_t out) {
  std::vector<float> s(out, 1.0f);
  if (scales.has_value()) {
    const at::Tensor s32 = as_float(*scales);
    std::copy_n(s32.const_data_ptr<float>(), out, s.begin());
  }
  return s;
}

// ---------------------------------------------------------------------------------------------------------
// Tiny helpers
// ---------------------------------------------------------------------------------------------------------

// Rows [r0, r1) of W_hat into dst (row r at dst + (r - r0) * in), dispatching on d and the code type once.
template <int D, typename CodeT>
void dequant_rows_t(const CodeT* codes, const float* cb, const Geometry& g, const float* scales, int64_t r0, int64_t r1,
                    float* dst) {
  for (int64_t r = r0; r < r1; ++r) dequant_row<D>(codes + r * g.positions(), cb, g, scales[r], dst + (r - r0) * g.in());
}

template <typename CodeT>
void dequant_rows_d(const CodeT* codes, const float* cb, const Geometry& g, const float* scales, int64_t r0, int64_t r1,
                    float* dst) {
  switch (g.d) {
    case 2: dequant_rows_t<2>(codes, cb, g, scales, r0, r1, dst); break;
    case 4: dequant_rows_t<4>(codes, cb, g, scales, r0, r1, dst); break;
    default: dequant_rows_t<8>(codes, cb, g, scales, r0, r1, dst); break;
  }
}

void dequant_rows(const void* codes, CodeType type, const float* cb, const Geometry& g, const float* scales,
                  int64_t r0, int64_t r1, float* dst) {
  if (type == CodeType::kU8) {
    dequant_rows_d(static_cast<const uint8_t*>(codes), cb, g, scales, r0, r1, dst);
  } else {
    dequant_rows_d(static_cast<const uint16_t*>(codes), cb, g, scales, r0, r1, dst);
  }
}

// Same, spread over threads.
void dequant_rows_parallel(const void* codes, CodeType type, const float* cb, const Geometry& g, const float* scales,
                           int64_t r0, int64_t r1, float* dst) {
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
BLOCKOPS_TARGET_AVX2 inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

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
// Small batches: lookup table
// ---------------------------------------------------------------------------------------------------------

struct LutArgs {
  const float* lut;      // [rows][P][k]
  const void* codes;     // [out, P]
  CodeType type;
  const float* scales;   // [out] fp32
  float* y;              // [rows, out] fp32
  Geometry g;
  int64_t rows;
  int64_t chunk;         // positions per chunk
};

// Table of one (row m, position p): lut[c] = sum_t xg[t] * cbt[t][c], with the codebook transposed to
// [K][d][k] so that the loop over c is unit-stride and vectorises (AVX2 in the target-attributed copy).
template <int D>
__attribute__((always_inline)) inline void build_table(const float* xg, const float* cbt, int64_t k, float* lut) {
  for (int64_t c = 0; c < k; ++c) {
    float s = 0.f;
    for (int t = 0; t < D; ++t) s += xg[t] * cbt[t * k + c];
    lut[c] = s;
  }
}

template <int D>
void build_tables_portable(const float* x, const float* cbt, const Geometry& g, int64_t m, int64_t p, float* lut) {
  build_table<D>(x + m * g.in() + (p / g.K) * D, cbt + (p % g.K) * D * g.k, g.k, lut);
}
#if BLOCKOPS_X86_DISPATCH
// The same loop, inlined into an AVX2/FMA function so that it is compiled 8-wide.
template <int D>
BLOCKOPS_TARGET_AVX2 void build_tables_avx2(const float* x, const float* cbt, const Geometry& g, int64_t m, int64_t p,
                                            float* lut) {
  build_table<D>(x + m * g.in() + (p / g.K) * D, cbt + (p % g.K) * D * g.k, g.k, lut);
}
#endif

void build_tables(bool avx2, const float* x, const float* cbt, const Geometry& g, int64_t rows, float* lut) {
  const int64_t p_count = g.positions();
  at::parallel_for(0, rows * p_count, 8, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t m = i / p_count, p = i % p_count;
      float* dst = lut + i * g.k;
#if BLOCKOPS_X86_DISPATCH
      if (avx2) {
        switch (g.d) {
          case 2: build_tables_avx2<2>(x, cbt, g, m, p, dst); break;
          case 4: build_tables_avx2<4>(x, cbt, g, m, p, dst); break;
          default: build_tables_avx2<8>(x, cbt, g, m, p, dst); break;
        }
        continue;
      }
#endif
      switch (g.d) {
        case 2: build_tables_portable<2>(x, cbt, g, m, p, dst); break;
        case 4: build_tables_portable<4>(x, cbt, g, m, p, dst); break;
        default: build_tables_portable<8>(x, cbt, g, m, p, dst); break;
      }
    }
  });
}

// Code p of row n with the code type known at compile time (the loops below run once per weight).
template <CodeType T>
inline uint32_t code_at(const void* codes, int64_t flat) {
  if constexpr (T == CodeType::kU8) return static_cast<const uint8_t*>(codes)[flat];
  return static_cast<const uint16_t*>(codes)[flat];
}

// acc[(n - n0) * R + m] += sum over positions [p0, p1) of row n of lut[m][p][code], for R activation rows.
// Four independent sums per row so that the adds pipeline instead of waiting on each other. Scalar loads on
// purpose: on the Zen 4 we measured, AVX2 gathers (vgatherdps) were no faster at k = 256 and 40% slower at
// k = 16 (the table is built with AVX2).
template <CodeType T, int R>
void gather_rows(const LutArgs& a, int64_t n0, int64_t n1, int64_t p0, int64_t p1, float* acc) {
  const int64_t P = a.g.positions(), k = a.g.k;
  for (int64_t n = n0; n < n1; ++n) {
    float s[R][4] = {};
    const int64_t row = n * P;
    int64_t p = p0;
    for (; p + 4 <= p1; p += 4) {
      const int64_t o0 = p * k + code_at<T>(a.codes, row + p), o1 = (p + 1) * k + code_at<T>(a.codes, row + p + 1);
      const int64_t o2 = (p + 2) * k + code_at<T>(a.codes, row + p + 2), o3 = (p + 3) * k + code_at<T>(a.codes, row + p + 3);
      for (int m = 0; m < R; ++m) {
        const float* lut = a.lut + m * P * k;
        s[m][0] += lut[o0];
        s[m][1] += lut[o1];
        s[m][2] += lut[o2];
        s[m][3] += lut[o3];
      }
    }
    for (; p < p1; ++p) {
      const int64_t o = p * k + code_at<T>(a.codes, row + p);
      for (int m = 0; m < R; ++m) s[m][0] += a.lut[m * P * k + o];
    }
    for (int m = 0; m < R; ++m) acc[(n - n0) * R + m] += (s[m][0] + s[m][1]) + (s[m][2] + s[m][3]);
  }
}

using GatherFn = void (*)(const LutArgs&, int64_t, int64_t, int64_t, int64_t, float*);

// The gather kernel for this many rows (1..kSmallBatchRows) and code type.
template <CodeType T>
GatherFn pick_gather(int64_t rows) {
  switch (rows) {
    case 1: return &gather_rows<T, 1>;
    case 2: return &gather_rows<T, 2>;
    case 3: return &gather_rows<T, 3>;
    default: return &gather_rows<T, 4>;
  }
}
static_assert(kSmallBatchRows == 4, "pick_gather instantiates 1..4 rows");

void lut_gemv(const LutArgs& a) {
  const int64_t tiles = (a.g.out + kTileRows - 1) / kTileRows, P = a.g.positions();
  const GatherFn gather = a.type == CodeType::kU8 ? pick_gather<CodeType::kU8>(a.rows)
                                                  : pick_gather<CodeType::kU16>(a.rows);
  at::parallel_for(0, tiles, 1, [&](int64_t b, int64_t e) {
    std::vector<float> acc(kTileRows * a.rows);
    for (int64_t tile = b; tile < e; ++tile) {
      const int64_t n0 = tile * kTileRows, n1 = std::min(a.g.out, n0 + kTileRows);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t p0 = 0; p0 < P; p0 += a.chunk) gather(a, n0, n1, p0, std::min(P, p0 + a.chunk), acc.data());
      for (int64_t n = n0; n < n1; ++n) {
        for (int64_t m = 0; m < a.rows; ++m) a.y[m * a.g.out + n] = a.scales[n] * acc[(n - n0) * a.rows + m];
      }
    }
  });
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

// Blocks of W_hat [nb, in] fp32 (at most kBlockBytes, at least 64 rows) in turn, handed to fn(n0, nb, block).
template <typename Fn>
void for_each_block(const void* codes, CodeType type, const float* cb, const float* scales, const Geometry& g,
                    Fn&& fn) {
  const int64_t row_bytes = static_cast<int64_t>(sizeof(float)) * std::max<int64_t>(1, g.in());
  const int64_t block_rows = std::min(g.out, std::max<int64_t>(64, kBlockBytes / row_bytes));
  at::Tensor block = at::empty({block_rows, g.in()}, at::TensorOptions().dtype(at::kFloat));
  for (int64_t n0 = 0; n0 < g.out; n0 += block_rows) {
    const int64_t nb = std::min(block_rows, g.out - n0);
    dequant_rows_parallel(codes, type, cb, g, scales, n0, n0 + nb, block.mutable_data_ptr<float>());
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
  if (bias.has_value()) {
    check_dtype(*bias, {at::kHalf, at::kBFloat16, at::kFloat}, kLinear, "bias");
    check_same_device(*bias, codes, kLinear, "bias", "codes");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == g.out, kLinear, ": bias must have shape [", g.out, "], got ",
                bias->sizes());
  }
  check_code_range(kLinear, codes, w);
  std::vector<int64_t> out_sizes = x.sizes().vec();
  out_sizes.back() = g.out;
  const int64_t rows = g.in() > 0 ? x.numel() / g.in() : 0;
  linear_counter.hit();
  if (rows == 0 || g.out == 0) return at::zeros(out_sizes, x.options());
  const bool avx2 = cpu_has_avx2_fma();
  const at::Tensor x32 = as_float(x).reshape({rows, g.in()});
  const at::Tensor cb32 = as_float(codebooks);
  const std::vector<float> s = scale_vector(scales, g.out);
  at::Tensor y32 = at::empty({rows, g.out}, x32.options());
  if (rows <= kSmallBatchRows && use_lookup_table(g, rows)) {
    const at::Tensor cbt = cb32.transpose(1, 2).contiguous();  // [K, d, k]
    at::Tensor lut = at::empty({rows, g.positions(), g.k}, x32.options());
    build_tables(avx2, x32.const_data_ptr<float>(), cbt.const_data_ptr<float>(), g, rows, lut.mutable_data_ptr<float>());
    const int64_t chunk = std::max<int64_t>(4, kChunkBytes / (g.k * static_cast<int64_t>(sizeof(float))));
    lut_gemv(LutArgs{lut.const_data_ptr<float>(), codes.const_data_ptr(), w.type, s.data(),
                           y32.mutable_data_ptr<float>(), g, rows, chunk});
  } else if (rows <= kSmallBatchRows) {
    direct_gemv(avx2, x32.const_data_ptr<float>(), codes.const_data_ptr(), w.type, cb32.const_data_ptr<float>(),
                s.data(), g, rows, y32.mutable_data_ptr<float>());
  } else {
    for_each_block(codes.const_data_ptr(), w.type, cb32.const_data_ptr<float>(), s.data(), g,
                   [&](int64_t n0, int64_t nb, const at::Tensor& blk) {
                     if (nb == g.out) {
                       y32 = at::mm(x32, blk.t());   // one block: no copy into a column slice
                     } else {
                       y32.narrow(1, n0, nb).copy_(at::mm(x32, blk.t()));
                     }
                   });
  }
  if (bias.has_value()) y32.add_(as_float(*bias));
  return y32.to(x.scalar_type()).view(out_sizes);
}

at::Tensor vq_dequantize_cpu(const at::Tensor& codes, const at::Tensor& codebooks,
                             const c10::optional<at::Tensor>& scales) {
  const Weights w = check_weights(kDequant, codes, codebooks, scales);
  check_code_range(kDequant, codes, w);
  dequant_counter.hit();
  at::Tensor out = at::empty({w.g.out, w.g.in()}, codebooks.options().dtype(at::kFloat));
  if (out.numel() == 0) return out.to(codebooks.scalar_type());
  const at::Tensor cb32 = as_float(codebooks);
  const std::vector<float> s = scale_vector(scales, w.g.out);
  dequant_rows_parallel(codes.const_data_ptr(), w.type, cb32.const_data_ptr<float>(), w.g, s.data(), 0, w.g.out,
                        out.mutable_data_ptr<float>());
  return out.to(codebooks.scalar_type());
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
  const at::Tensor gy = as_float(grad_out).reshape({rows, g.out});
  const at::Tensor cb32 = as_float(codebooks);
  const std::vector<float> s = scale_vector(scales, g.out);
  at::Tensor gx = at::zeros({rows, g.in()}, gy.options());
  for_each_block(codes.const_data_ptr(), w.type, cb32.const_data_ptr<float>(), s.data(), g,
                 [&](int64_t n0, int64_t nb, const at::Tensor& blk) { gx.addmm_(gy.narrow(1, n0, nb), blk); });
  return gx.to(grad_out.scalar_type()).view(out_sizes);
}

at::Tensor vq_grad_codebooks_cpu(const at::Tensor& t, const at::Tensor& codes, const at::Tensor& codebooks,
                                 const c10::optional<at::Tensor>& scales) {
  const Weights w = check_weights(kGradCodebooks, codes, codebooks, scales);
  const Geometry& g = w.g;
  check_t(kGradCodebooks, t, g, codes);
  check_code_range(kGradCodebooks, codes, w);
  grad_codebooks_counter.hit();
  at::Tensor grad = at::zeros({g.K, g.k, g.d}, t.options());
  if (g.out == 0 || g.groups == 0) return grad;
  const std::vector<float> s = scale_vector(scales, g.out);
  const float* tp = t.const_data_ptr<float>();
  float* gp = grad.mutable_data_ptr<float>();
  const void* cp = codes.const_data_ptr();
  const int64_t P = g.positions();
  // Each task owns codewords [c0, c1) of every codebook and walks all codes in (n, j) order.
  at::parallel_for(0, g.k, std::max<int64_t>(16, g.k / (4 * at::get_num_threads())), [&](int64_t c0, int64_t c1) {
    for (int64_t n = 0; n < g.out; ++n) {
      const float sn = s[n];
      const float* trow = tp + n * g.in();
      for (int64_t p = 0; p < P; ++p) {
        const int64_t c = read_code(cp, w.type, n * P + p);
        if (c < c0 || c >= c1) continue;
        float* dst = gp + ((p % g.K) * g.k + c) * g.d;
        const float* src = trow + (p / g.K) * g.d;
        for (int64_t i = 0; i < g.d; ++i) dst[i] += sn * src[i];
      }
    }
  });
  return grad;
}

at::Tensor vq_grad_scales_cpu(const at::Tensor& t, const at::Tensor& codes, const at::Tensor& codebooks) {
  const Weights w = check_weights(kGradScales, codes, codebooks, c10::nullopt);
  const Geometry& g = w.g;
  check_t(kGradScales, t, g, codes);
  check_code_range(kGradScales, codes, w);
  grad_scales_counter.hit();
  at::Tensor grad = at::empty({g.out}, t.options());
  if (g.out == 0) return grad;
  const bool avx2 = cpu_has_avx2_fma();
  const at::Tensor cb32 = as_float(codebooks);
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
