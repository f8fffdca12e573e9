// Unit cases of the Hopper emulation (hopper_emu.h behind fake/hopper_ptx.cuh) with known answers; the small kernels
// are written here and launched with emu_launch (no kernel file). Tiles are laid out by this file from the PTX ISA's
// canonical layouts (written here as "atom row r holds 16-byte chunk c at position c ^ (r >> (3 - B))", not with the
// emulator's decoder), descriptors are encoded with hopper_layout.cuh's smem_descriptor (what the kernels use), and
// the data are small integers, so every product is exact and compared for equality.
//   wgmma    : every swizzle x B K-/MN-major x N x f16/bf16, SS and RS, accumulate on/off, several k-steps per batch,
//              both layouts of the interleaved mode, wait<1> leaving the newer batch pending, operands read at the
//              wait (the latest moment)
//   tma      : 2D / 3D boxes of every element size and swizzle, edges and negative / outside coordinates (zero
//              fill), padded strides, the box landing only at the wait, encode_tensor_map's refusals
//   mbarrier : parity semantics, counts, expect_tx before / after the TMA, a transaction count dipping below 0, a
//              2-stage ring (producer warpgroup, two consumer warpgroups running wgmma on TMA-loaded swizzled tiles,
//              B K-major and MN-major in two 64-column slabs)
//   protocol : every misuse the emulator promises to catch aborts with its message (each in a fork()ed child)
// EMU_QUICK=1 trims the wgmma grid (every swizzle x major x N stays, type / SS-RS / accumulate rotate).
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "harness.h"
#include "hopper_ptx.cuh"

using namespace blockops::hopper;

static std::mt19937 rng(90);
static const bool quick = getenv("EMU_QUICK") != nullptr;

static uint8_t* align1024(uint8_t* p) {
  return reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(p) + 1023) & ~uintptr_t(1023));
}
// The block's dynamic shared memory aligned up to 1024 bytes (the emulated buffer starts 128 bytes past a boundary).
static uint8_t* smem_base() { return align1024(emu_dyn_smem); }

template <typename T>
static uint16_t bits_of(double v) {
  T h = cvt<T>(float(v));
  uint16_t b;
  memcpy(&b, &h, 2);
  return b;
}
static int small_int(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); }

// ---------------------------------------------------------------------------------------------------------------
// Canonical layouts, written from the ISA's pictures: a swizzle atom is 8 rows of S bytes (S = 16 << B; the
// interleaved "core matrix" is 8 rows of 16 bytes), 16-byte chunk c of atom row r sits at chunk c ^ (r >> (3 - B))
// (mod 2^B). K-major: rows are M/N, a row holds S / 2 consecutive k; MN-major: rows are k, a row holds S / 2
// consecutive m/n. Offsets are relative to a 1024-aligned base.
struct OperandLayout {
  bool k_major;
  int swz;        // 0 interleave, 1 32B, 2 64B, 3 128B (B bits)
  int variant;    // which of two arrangements of the atoms / core matrices
  int mn, ktot;   // extent
  uint32_t lbo = 0, sbo = 0, bytes = 0;
  uint32_t col_stride = 0;  // K-major swizzled: bytes between atom columns (S / 2 k each)
  void plan() {
    const uint32_t S = swz ? 16u << swz : 16u;
    const uint32_t mn8 = (mn + 7) / 8, k8 = ktot / 8;
    if (k_major && swz) {
      sbo = variant ? 16 * S : 8 * S;  // a gap between 8-row groups in variant 1
      lbo = 16;                        // unused for swizzled K-major
      col_stride = mn8 * sbo;
      const uint32_t cols = (ktot * 2 + S - 1) / S;
      bytes = cols * col_stride;
    } else if (k_major) {
      if (variant == 0) { lbo = 128; sbo = k8 * 128; } else { lbo = mn8 * 128; sbo = 128; }
      bytes = mn8 * k8 * 128;
    } else if (swz) {
      const uint32_t e = S / 2, blocks = (mn + e - 1) / e;
      if (variant == 0) { sbo = 8 * S; lbo = k8 * 8 * S; } else { lbo = 8 * S; sbo = blocks * 8 * S; }
      bytes = blocks * k8 * 8 * S;
    } else {
      if (variant == 0) { sbo = 128; lbo = mn8 * 128; } else { lbo = 128; sbo = k8 * 128; }
      bytes = mn8 * k8 * 128;
    }
  }
  // Byte offset of element (mn, k).
  uint32_t at(int m, int k) const {
    const uint32_t S = swz ? 16u << swz : 16u;
    uint32_t atom, row, chunk, within;  // atom start, row in atom, 16-byte chunk in the row, byte in the chunk
    if (k_major && swz) {
      atom = (k * 2 / S) * col_stride + (m / 8) * sbo;
      row = m % 8;
      chunk = (k * 2 % S) / 16;
      within = k * 2 % 16;
    } else if (k_major) {
      atom = (m / 8) * sbo + (k / 8) * lbo;
      row = m % 8;
      chunk = 0;
      within = (k % 8) * 2;
    } else if (swz) {
      const uint32_t e = S / 2;
      atom = (m / e) * lbo + (k / 8) * sbo;
      row = k % 8;
      chunk = (m % e) / 8;
      within = (m % 8) * 2;
    } else {
      atom = (m / 8) * sbo + (k / 8) * lbo;
      row = k % 8;
      chunk = 0;
      within = (m % 8) * 2;
    }
    const uint32_t mask = (1u << swz) - 1;
    const uint32_t phys = swz ? chunk ^ ((row >> (3 - swz)) & mask) : chunk;
    return atom + row * S + phys * 16 + within;
  }
  // Descriptor fields of k-step s (k = 16 s .. 16 s + 15): start offset.
  uint32_t start(int s) const {
    const uint32_t S = swz ? 16u << swz : 16u;
    if (k_major && swz) return (s * 32 / S) * col_stride + (s * 32 % S);
    if (k_major) return 2 * s * lbo;
    if (swz) return 2 * s * sbo;
    return 2 * s * lbo;
  }
  SmemSwizzle mode() const {
    return swz == 0 ? SmemSwizzle::kNone : swz == 1 ? SmemSwizzle::k32B : swz == 2 ? SmemSwizzle::k64B
                                                                              : SmemSwizzle::k128B;
  }
};

// ---------------------------------------------------------------------------------------------------------------
// wgmma
struct WgArgs {
  const uint8_t* img;      // shared-memory image (A region, then B region), copied to the aligned base
  uint32_t img_bytes;
  OperandLayout la, lb;
  uint32_t b_off;          // B region's offset in the image
  int ksteps;
  bool accumulate;
  const uint32_t* afrag;   // RS: [ksteps][128][4]
  const float* init;       // [128][N / 2]
  float* out;              // [128][N / 2]
  float* out_mid;          // wait<1> case: [128][N / 2] of the second accumulator after wait<1>
  float* out2;             // wait<1> case: second accumulator at the end
  const uint8_t* img2;     // wait<1> case: B region rewritten after wait<1>
};

template <typename T, int N, bool kTrans, bool kRS>
static void wg_kernel(WgArgs p) {
  uint8_t* base = smem_base();
  for (uint32_t i = threadIdx.x * 16; i < p.img_bytes; i += blockDim.x * 16) memcpy(base + i, p.img + i, 16);
  __syncthreads();
  fence_proxy_async_shared();
  const uint32_t b = smem_u32(base);
  const int t = threadIdx.x;
  float d[N / 2];
  for (int i = 0; i < N / 2; ++i) d[i] = p.init[t * (N / 2) + i];
  wgmma_fence();
  for (int s = 0; s < p.ksteps; ++s) {
    const uint64_t db = smem_descriptor(b + p.b_off + p.lb.start(s), p.lb.lbo, p.lb.sbo, p.lb.mode());
    const bool acc = s > 0 || p.accumulate;
    if constexpr (kRS) {
      uint32_t a[4];
      memcpy(a, p.afrag + (s * 128 + t) * 4, 16);
      wgmma_rs<T, N, kTrans>(d, a, db, acc);
    } else {
      const uint64_t da = smem_descriptor(b + p.la.start(s), p.la.lbo, p.la.sbo, p.la.mode());
      wgmma_ss<T, N, kTrans>(d, da, db, acc);
    }
  }
  wgmma_commit();
  if (p.out2 == nullptr) {
    wgmma_wait<0>();
    for (int i = 0; i < N / 2; ++i) p.out[t * (N / 2) + i] = d[i];
    return;
  }
  // A second batch into another accumulator; wait<1> executes only the first. Then B is rewritten: the pending
  // batch reads shared memory at its wait (the emulator's latest moment).
  float d2[N / 2];
  for (int i = 0; i < N / 2; ++i) d2[i] = p.init[t * (N / 2) + i];
  {
    const uint64_t db = smem_descriptor(b + p.b_off + p.lb.start(0), p.lb.lbo, p.lb.sbo, p.lb.mode());
    const uint64_t da = smem_descriptor(b + p.la.start(0), p.la.lbo, p.la.sbo, p.la.mode());
    wgmma_ss<T, N, kTrans>(d2, da, db, true);
  }
  wgmma_commit();
  wgmma_wait<1>();
  for (int i = 0; i < N / 2; ++i) p.out[t * (N / 2) + i] = d[i];
  for (int i = 0; i < N / 2; ++i) p.out_mid[t * (N / 2) + i] = d2[i];
  __syncthreads();
  for (uint32_t i = p.b_off + threadIdx.x * 16; i < p.img_bytes; i += blockDim.x * 16)
    memcpy(base + i, p.img2 + i, 16);
  __syncthreads();
  wgmma_wait<0>();
  for (int i = 0; i < N / 2; ++i) p.out2[t * (N / 2) + i] = d2[i];
}

struct WgCase {
  bool bf16;
  int n;
  bool trans, rs, accumulate;
  int swz_a, swz_b, variant, ksteps;
  bool wait1;
};

// Accumulator fragment of thread t (contract of hopper_ptx.cuh): d[4j + i] is row 16 (t / 32) + (t % 32) / 4 +
// 8 (i / 2), column 8 j + 2 (t % 4) + i % 2.
static void frag_rc(int t, int idx, int& row, int& col) {
  const int j = idx / 4, i = idx % 4;
  row = 16 * (t / 32) + (t % 32) / 4 + 8 * (i / 2);
  col = 8 * j + 2 * (t % 4) + i % 2;
}

template <typename T, int N, bool kTrans, bool kRS>
static void run_wg_case(const WgCase& c) {
  const int ktot = 16 * c.ksteps;
  OperandLayout la{true, c.swz_a, c.variant, 64, ktot};
  OperandLayout lb{!kTrans, c.swz_b, c.variant, N, ktot};
  la.plan();
  lb.plan();
  const uint32_t b_off = (la.bytes + 1023) / 1024 * 1024;
  const uint32_t img_bytes = (b_off + lb.bytes + 15) / 16 * 16;
  std::vector<double> A(64 * ktot), B(ktot * N), B2(ktot * N);
  for (auto& v : A) v = small_int(-4, 4);
  for (auto& v : B) v = small_int(-4, 4);
  for (auto& v : B2) v = small_int(-4, 4);
  std::vector<uint8_t> img(img_bytes, 0xFF), img2;
  auto put16 = [&](std::vector<uint8_t>& im, uint32_t off, double v) {
    const uint16_t bits = bits_of<T>(v);
    memcpy(&im[off], &bits, 2);
  };
  for (int m = 0; m < 64; ++m)
    for (int k = 0; k < ktot; ++k) put16(img, la.at(m, k), A[m * ktot + k]);
  for (int k = 0; k < ktot; ++k)
    for (int n = 0; n < N; ++n) put16(img, b_off + lb.at(n, k), B[k * N + n]);
  if (c.wait1) {
    img2 = img;
    for (int k = 0; k < ktot; ++k)
      for (int n = 0; n < N; ++n) put16(img2, b_off + lb.at(n, k), B2[k * N + n]);
  }
  // RS: A fragments (m16n8k16 A layout per warp): element i of lane l in warp w is row 16 w + l / 4 + 8 ((i / 2) % 2),
  // column 2 (l % 4) + i % 2 + 8 (i / 4); registers hold elements 2r (low half) and 2r + 1.
  std::vector<uint32_t> afrag(c.ksteps * 128 * 4, 0);
  for (int s = 0; s < c.ksteps; ++s)
    for (int t = 0; t < 128; ++t)
      for (int i = 0; i < 8; ++i) {
        const int w = t / 32, l = t % 32;
        const int row = 16 * w + l / 4 + 8 * ((i / 2) % 2), col = 16 * s + 2 * (l % 4) + i % 2 + 8 * (i / 4);
        afrag[(s * 128 + t) * 4 + i / 2] |= uint32_t(bits_of<T>(A[row * ktot + col])) << (16 * (i % 2));
      }
  std::vector<float> init(128 * (N / 2)), out(128 * (N / 2), NAN), mid(128 * (N / 2), NAN), out2(128 * (N / 2), NAN);
  for (auto& v : init) v = float(small_int(-50, 50));
  WgArgs p{img.data(), img_bytes, la, lb, b_off, c.ksteps, c.accumulate, afrag.data(), init.data(), out.data(),
           c.wait1 ? mid.data() : nullptr, c.wait1 ? out2.data() : nullptr, c.wait1 ? img2.data() : nullptr};
  const size_t smem = img_bytes + 1024;
  auto kernel = &wg_kernel<T, N, kTrans, kRS>;
  if (smem > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  emu_launch(EmuCfg(dim3(1), dim3(128), smem), kernel, p);
  // Reference: D = (accumulate ? C : 0) + A B over all k-steps.
  auto expect = [&](const std::vector<double>& Bm, int ksteps, bool acc, int t, int idx) {
    int row, col;
    frag_rc(t, idx, row, col);
    double s = acc ? init[t * (N / 2) + idx] : 0.0;
    for (int k = 0; k < 16 * ksteps; ++k) s += A[row * ktot + k] * Bm[k * N + col];
    return s;
  };
  bool ok = true, ok_mid = true, ok2 = true;
  for (int t = 0; t < 128; ++t)
    for (int idx = 0; idx < N / 2; ++idx) {
      ok &= out[t * (N / 2) + idx] == expect(B, c.ksteps, c.accumulate, t, idx);
      if (c.wait1) {
        ok_mid &= mid[t * (N / 2) + idx] == init[t * (N / 2) + idx];  // not executed yet: stale
        ok2 &= out2[t * (N / 2) + idx] == expect(B2, 1, true, t, idx);  // read B as rewritten
      }
    }
  char cfg[200];
  snprintf(cfg, sizeof cfg, "%s N=%d B=%s %s acc=%d swzA=%d swzB=%d variant=%d ksteps=%d%s", c.bf16 ? "bf16" : "f16",
           N, kTrans ? "MN-major" : "K-major", kRS ? "RS" : "SS", c.accumulate, c.swz_a, c.swz_b, c.variant,
           c.ksteps, c.wait1 ? " wait<1>" : "");
  report(ok, "wgmma result", cfg);
  if (c.wait1) {
    report(ok_mid, "wgmma batch left pending by wait<1> has not written its accumulators", cfg);
    report(ok2, "wgmma pending batch reads shared memory at its wait", cfg);
  }
}

template <typename T, int N>
static void dispatch_wg(const WgCase& c) {
  if (c.trans) {
    if (c.rs) run_wg_case<T, N, true, true>(c); else run_wg_case<T, N, true, false>(c);
  } else {
    if (c.rs) run_wg_case<T, N, false, true>(c); else run_wg_case<T, N, false, false>(c);
  }
}
template <typename T>
static void dispatch_wg_n(const WgCase& c) {
  switch (c.n) {
    case 16: dispatch_wg<T, 16>(c); break;
    case 32: dispatch_wg<T, 32>(c); break;
    case 64: dispatch_wg<T, 64>(c); break;
    case 128: dispatch_wg<T, 128>(c); break;
    default: dispatch_wg<T, 256>(c); break;
  }
}
static void run_wg(const WgCase& c) {
  if (c.bf16) dispatch_wg_n<__nv_bfloat16>(c); else dispatch_wg_n<__half>(c);
}

static void test_wgmma() {
  const int ns[] = {16, 32, 64, 128, 256};
  int idx = 0;
  for (int n : ns)
    for (int swz = 0; swz < 4; ++swz)
      for (int trans = 0; trans < 2; ++trans) {
        if (quick) {
          // type, SS / RS, accumulate, A's swizzle and the variant rotate over the grid.
          const int r = idx++;
          run_wg(WgCase{r % 2 == 1, n, trans == 1, (r / 2) % 2 == 1, (r / 4) % 2 == 0, (swz + r) % 4, swz, r % 2,
                        (swz == 3 || r % 3 == 0) ? 3 : 2, false});
          continue;
        }
        for (int bf16 = 0; bf16 < 2; ++bf16)
          for (int rs = 0; rs < 2; ++rs)
            for (int acc = 0; acc < 2; ++acc) {
              const int r = idx++;
              run_wg(WgCase{bf16 == 1, n, trans == 1, rs == 1, acc == 1, (swz + r) % 4, swz, r % 2,
                            swz == 3 ? 5 : 3, false});
            }
      }
  // wait<1> leaves the newer batch pending; it reads shared memory when it executes.
  for (int swz : {0, 3})
    for (int trans = 0; trans < 2; ++trans)
      run_wg(WgCase{trans == 1, 64, trans == 1, false, true, 3, swz, 0, 2, true});
}

// ---------------------------------------------------------------------------------------------------------------
// TMA
struct TmaArgs {
  int rank;
  int c[3];
  uint32_t bytes;
  uint32_t dst_off;   // from the aligned base + 1024
  uint8_t* out;       // the landed box
  int* untouched;     // the box still held the fill right after the issue (late landing)
};
static void tma_kernel(const __grid_constant__ TensorMap map, TmaArgs p) {
  uint8_t* base = smem_base();
  uint64_t* bar = reinterpret_cast<uint64_t*>(base);
  uint8_t* tile = base + 1024 + p.dst_off;
  if (threadIdx.x == 0) {
    tma_prefetch_descriptor(&map);
    mbarrier_init(bar, 1);
    mbarrier_init_fence();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    mbarrier_arrive_expect_tx(bar, p.bytes);
    if (p.rank == 2) tma_load_2d(tile, &map, bar, p.c[0], p.c[1]);
    else tma_load_3d(tile, &map, bar, p.c[0], p.c[1], p.c[2]);
    int same = 1;
    for (uint32_t i = 0; i < p.bytes; ++i) same &= tile[i] == 0xFF;
    *p.untouched = same;
  }
  __syncthreads();
  mbarrier_wait(bar, 0);
  for (uint32_t i = threadIdx.x; i < p.bytes; i += blockDim.x) p.out[i] = tile[i];
}

struct TmaCase {
  TmaElement el;
  int rank;
  uint64_t dims[3];
  uint32_t pad;        // bytes of padding per row (a multiple of 16 with the row)
  uint32_t box[3];
  TmaSwizzle sw;
  int c[3];
};
static int esize_of(TmaElement e) { return e == TmaElement::kU8 ? 1 : e == TmaElement::kF32 || e == TmaElement::kU32 ? 4 : 2; }

static void run_tma_case(const TmaCase& tc) {
  const int es = esize_of(tc.el);
  const uint64_t row_bytes = (tc.dims[0] * es + 15) / 16 * 16 + tc.pad;
  const uint64_t plane = row_bytes * tc.dims[1];
  const uint64_t total = tc.rank == 3 ? plane * tc.dims[2] : plane;
  Buf g(total);
  uint8_t* gb = static_cast<uint8_t*>(g.p);
  for (uint64_t i = 0; i < total; ++i) gb[i] = uint8_t(i * 7 + 3 + i / 251);
  // Keep every element nonzero so zero fill is visible.
  for (uint64_t i = 0; i < total; ++i) if (gb[i] == 0) gb[i] = 1;
  alignas(64) TensorMap map;
  const uint64_t strides[2] = {row_bytes, plane};
  const char* err = encode_tensor_map(&map, tc.el, tc.rank, g.p, tc.dims, strides, tc.box, tc.sw);
  char cfg[240];
  snprintf(cfg, sizeof cfg, "rank=%d es=%d dims=%lu,%lu,%lu box=%u,%u,%u swizzle=%d at %d,%d,%d", tc.rank, es,
           (unsigned long)tc.dims[0], (unsigned long)tc.dims[1], (unsigned long)(tc.rank == 3 ? tc.dims[2] : 1),
           tc.box[0], tc.box[1], tc.rank == 3 ? tc.box[2] : 1, int(tc.sw), tc.c[0], tc.c[1], tc.c[2]);
  report(err == nullptr, "encode_tensor_map accepts", cfg);
  if (err) return;
  const uint32_t rows = tc.box[1] * (tc.rank == 3 ? tc.box[2] : 1);
  const uint32_t bytes = tc.box[0] * es * rows;
  std::vector<uint8_t> out(bytes, 0xAB);
  int untouched = 0;
  TmaArgs p{tc.rank, {tc.c[0], tc.c[1], tc.c[2]}, bytes, 0, out.data(), &untouched};
  const size_t smem = 2048 + bytes + 1024;
  if (smem > 48 * 1024) cudaFuncSetAttribute(&tma_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  emu_launch(EmuCfg(dim3(1), dim3(64), smem), &tma_kernel, map, p);
  // Reference: box byte q (dense) lands at byte p of the tile where, for a swizzle of B bits (S = 16 << B bytes per
  // box row), row r = p / S keeps its 16-byte chunk c at position c ^ ((r % 8) >> (3 - B)).
  const int B = tc.sw == TmaSwizzle::kNone ? 0 : tc.sw == TmaSwizzle::k32B ? 1 : tc.sw == TmaSwizzle::k64B ? 2 : 3;
  const uint32_t S = 16u << B;
  bool ok = true;
  for (uint32_t pp = 0; pp < bytes && ok; ++pp) {
    uint32_t q = pp;
    if (B) {
      const uint32_t r = pp / S, c = (pp % S) / 16;
      q = r * S + ((c ^ ((r % 8) >> (3 - B))) & ((1u << B) - 1)) * 16 + pp % 16;
    }
    const uint32_t e = q / es, x = e % tc.box[0], row = e / tc.box[0];
    const int64_t gx = int64_t(tc.c[0]) + x, gy = int64_t(tc.c[1]) + row % tc.box[1],
                  gz = tc.rank == 3 ? int64_t(tc.c[2]) + row / tc.box[1] : 0;
    const bool inside = gx >= 0 && gx < int64_t(tc.dims[0]) && gy >= 0 && gy < int64_t(tc.dims[1]) && gz >= 0 &&
                        gz < int64_t(tc.rank == 3 ? tc.dims[2] : 1);
    const uint8_t want = inside ? gb[gz * plane + gy * row_bytes + gx * es + q % es] : 0;
    ok &= out[pp] == want;
  }
  report(ok, "TMA box", cfg);
  if (!emu_tma_eager) report(untouched == 1, "TMA box lands only when its barrier is waited on", cfg);
}

static void test_tma() {
  const TmaElement els[] = {TmaElement::kU8, TmaElement::kF16, TmaElement::kBF16, TmaElement::kF32, TmaElement::kU32};
  const TmaSwizzle sws[] = {TmaSwizzle::kNone, TmaSwizzle::k32B, TmaSwizzle::k64B, TmaSwizzle::k128B};
  int r = 0;
  for (TmaElement el : els)
    for (TmaSwizzle sw : sws) {
      const int es = esize_of(el);
      const int span = sw == TmaSwizzle::kNone ? 48 : sw == TmaSwizzle::k32B ? 32 : sw == TmaSwizzle::k64B ? 64 : 128;
      const uint32_t box0 = span / es;
      const uint64_t W = box0 * 2 + 5, H = 37, D = 3;  // awkward sizes: the last boxes hang over the edges
      const int x_edge = int(W) - int(box0) / 2, y_edge = int(H) - 5;
      const int coords[][3] = {{0, 0, 0}, {int(box0), 8, 1}, {x_edge, 3, 0}, {2, y_edge, 1}, {-3, -2, -1},
                               {x_edge, y_edge, 2}, {int(W) + 4, 0, 0}};
      for (const auto& c : coords) {
        if (quick && (r++ % 3) != 0 && c[0] != x_edge) continue;
        const uint32_t pad = (r % 2) ? 16 : 0;
        run_tma_case(TmaCase{el, 2, {W, H, 1}, pad, {box0, 16, 1}, sw, {c[0], c[1], 0}});
        run_tma_case(TmaCase{el, 3, {W, H, D}, pad, {box0, 8, 2}, sw, {c[0], c[1], c[2]}});
      }
    }
  // One long box (256 rows) and a wide unswizzled row (256 elements).
  run_tma_case(TmaCase{TmaElement::kF16, 2, {64, 300, 1}, 0, {64, 256, 1}, TmaSwizzle::k128B, {0, 100, 0}});
  run_tma_case(TmaCase{TmaElement::kF16, 2, {300, 7, 1}, 0, {256, 4, 1}, TmaSwizzle::kNone, {100, 5, 0}});
  // encode_tensor_map refuses what cuTensorMapEncodeTiled refuses (and what the emulator does not emulate).
  struct Bad {
    const char* what;
    const char* needle;
    int rank;
    size_t base_off;
    uint64_t dims[3], strides[2];
    uint32_t box[3];
    TmaElement el;
    TmaSwizzle sw;
  };
  const Bad bads[] = {
      {"rank 0", "rank", 0, 0, {64, 8, 1}, {128, 1024}, {64, 8, 1}, TmaElement::kF16, TmaSwizzle::kNone},
      {"rank 6", "rank", 6, 0, {64, 8, 1}, {128, 1024}, {64, 8, 1}, TmaElement::kF16, TmaSwizzle::kNone},
      {"base not 16-aligned", "16-byte aligned", 2, 8, {64, 8, 1}, {128, 1024}, {64, 8, 1}, TmaElement::kF16, TmaSwizzle::kNone},
      {"stride not a multiple of 16", "globalStrides", 2, 0, {60, 8, 1}, {120, 1024}, {8, 8, 1}, TmaElement::kF16, TmaSwizzle::kNone},
      {"dim 0", "globalDim", 2, 0, {64, 0, 1}, {128, 1024}, {64, 8, 1}, TmaElement::kF16, TmaSwizzle::kNone},
      {"box 0", "boxDim", 2, 0, {64, 8, 1}, {128, 1024}, {64, 0, 1}, TmaElement::kF16, TmaSwizzle::kNone},
      {"box 257", "boxDim", 2, 0, {64, 300, 1}, {128, 1024}, {64, 257, 1}, TmaElement::kF16, TmaSwizzle::kNone},
      {"inner box 12 bytes", "multiple of 16", 2, 0, {64, 8, 1}, {128, 1024}, {6, 8, 1}, TmaElement::kF16, TmaSwizzle::kNone},
      {"inner box over the swizzle span", "exceeds the swizzle span", 2, 0, {64, 8, 1}, {128, 1024}, {64, 8, 1}, TmaElement::kF16, TmaSwizzle::k64B},
      {"inner box under the swizzle span", "not emulated", 2, 0, {64, 8, 1}, {128, 1024}, {32, 8, 1}, TmaElement::kF16, TmaSwizzle::k128B},
  };
  Buf g(1 << 16);
  for (const Bad& b : bads) {
    alignas(64) TensorMap map;
    const char* err = encode_tensor_map(&map, b.el, b.rank, static_cast<uint8_t*>(g.p) + b.base_off, b.dims,
                                        b.strides, b.box, b.sw);
    report(err != nullptr && strstr(err, b.needle) != nullptr, "encode_tensor_map refuses", b.what);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// mbarrier
struct ParityArgs {
  int* res;   // results of the checks, in order ([100]: thread 1's)
  int* nres;
};
static void parity_kernel(const __grid_constant__ TensorMap map, ParityArgs p) {
  uint8_t* base = smem_base();
  uint64_t* bar = reinterpret_cast<uint64_t*>(base);
  uint64_t* bar3 = bar + 1;
  uint64_t* bar_tx = bar + 2;
  uint64_t* bar_neg = bar + 3;
  uint8_t* tile = base + 1024;
  int n = 0;
  auto rec = [&](bool v) { p.res[n++] = v; };
  if (threadIdx.x == 0) {
    mbarrier_init(bar, 1);
    mbarrier_init(bar3, 3);
    mbarrier_init(bar_tx, 1);
    mbarrier_init(bar_neg, 1);
    mbarrier_init_fence();
    // Fresh barrier: the phase "before" phase 0 (parity 1) counts as complete, phase 0 is not.
    rec(mbarrier_try_wait(bar, 1));
    rec(!mbarrier_try_wait(bar, 0));
    mbarrier_arrive(bar);  // phase 0 completes, phase 1 starts
    rec(mbarrier_try_wait(bar, 0));
    rec(!mbarrier_try_wait(bar, 1));
    mbarrier_arrive(bar);  // phase 1 completes
    rec(mbarrier_try_wait(bar, 1));
    rec(!mbarrier_try_wait(bar, 0));
    mbarrier_wait(bar, 1);
    // Count 3.
    mbarrier_arrive(bar3);
    mbarrier_arrive(bar3);
    rec(!mbarrier_try_wait(bar3, 0));
    mbarrier_arrive(bar3);
    rec(mbarrier_try_wait(bar3, 0));
    // expect_tx: all arrivals in, bytes outstanding: incomplete until the TMA lands.
    mbarrier_arrive_expect_tx(bar_tx, 16 * 16 * 2);
    rec(!mbarrier_try_wait(bar_tx, 0));
    tma_load_2d(tile, &map, bar_tx, 0, 0);
    rec(mbarrier_try_wait(bar_tx, 0));  // the wait lands the copy, which completes the phase
    rec(tile[0] != 0xFF);
  }
  __syncthreads();
  // The TMA before the expect_tx: thread 1's wait lands it (tx count -512, an arrival missing), then thread 0's
  // arrive.expect_tx brings the count back to 0 and completes the phase.
  if (threadIdx.x == 0) tma_load_2d(tile + 1024, &map, bar_neg, 0, 16);
  __syncthreads();
  if (threadIdx.x == 1) p.res[100] = !mbarrier_try_wait(bar_neg, 0);
  __syncthreads();
  if (threadIdx.x == 0) mbarrier_arrive_expect_tx(bar_neg, 16 * 16 * 2);
  mbarrier_wait(bar_neg, 0);
  if (threadIdx.x == 0) {
    rec(tile[1024] != 0xFF);
    *p.nres = n;
  }
}

// A 2-stage ring: warpgroup 0 is the producer (one thread issues the TMA loads), warpgroups 1 and 2 consume: tile t
// of A (128 rows x 64 k, SWIZZLE_128B) lands in stage t % 2; consumer c computes rows 64 c .. 64 c + 63 of A_t B by
// four k-steps of wgmma (descriptor start = slab + 32 k-step bytes, SBO 1024), then releases the stage.
// B (64 k x 128 n) was loaded once: K-major ([n][k], one box of 128 rows) or MN-major ([k][n] in two 64-column
// slabs, LBO = the slab distance).
struct RingArgs {
  int tiles;
  float* out;  // [tiles][128][128]
};
template <bool kTransB>
static void ring_kernel(const __grid_constant__ TensorMap map_a, const __grid_constant__ TensorMap map_b,
                        RingArgs p) {
  uint8_t* base = smem_base();
  uint64_t* full = reinterpret_cast<uint64_t*>(base);  // [2]
  uint64_t* empty = full + 2;                            // [2]
  uint64_t* bload = full + 4;
  uint8_t* stage = base + 1024;                          // 2 x 16 KB
  uint8_t* btile = base + 1024 + 2 * 16384;              // 16 KB
  const int wg = threadIdx.x / 128;
  if (threadIdx.x == 0) {
    for (int s = 0; s < 2; ++s) {
      mbarrier_init(&full[s], 1);
      mbarrier_init(&empty[s], 2);
    }
    mbarrier_init(bload, 1);
    mbarrier_init_fence();
  }
  __syncthreads();
  if (wg == 0) {
    setmaxnreg_dec<40>();
    if (threadIdx.x == 0) {
      tma_prefetch_descriptor(&map_a);
      mbarrier_arrive_expect_tx(bload, 16384);
      if (kTransB) {
        tma_load_2d(btile, &map_b, bload, 0, 0);
        tma_load_2d(btile + 8192, &map_b, bload, 64, 0);
      } else {
        tma_load_2d(btile, &map_b, bload, 0, 0);
      }
      for (int t = 0; t < p.tiles; ++t) {
        const int s = t % 2;
        mbarrier_wait(&empty[s], ((t / 2) & 1) ^ 1);
        mbarrier_arrive_expect_tx(&full[s], 16384);
        tma_load_2d(stage + s * 16384, &map_a, &full[s], 0, 128 * t);
      }
    }
    return;
  }
  setmaxnreg_inc<232>();
  const int c = wg - 1, tl = threadIdx.x % 128;
  mbarrier_wait(bload, 0);
  const uint32_t bb = smem_u32(btile);
  for (int t = 0; t < p.tiles; ++t) {
    const int s = t % 2;
    mbarrier_wait(&full[s], (t / 2) & 1);
    const uint32_t a_slab = smem_u32(stage + s * 16384) + c * 64 * 128;
    float d[64];
    wgmma_fence();
    for (int ks = 0; ks < 4; ++ks) {
      const uint64_t da = smem_descriptor(a_slab + 32 * ks, 16, 1024, SmemSwizzle::k128B);
      const uint64_t db = kTransB ? smem_descriptor(bb + ks * 16 * 128, 8192, 1024, SmemSwizzle::k128B)
                                  : smem_descriptor(bb + 32 * ks, 16, 1024, SmemSwizzle::k128B);
      wgmma_ss<__half, 128, kTransB>(d, da, db, ks > 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    if (tl == 0) mbarrier_arrive(&empty[s]);
    for (int idx = 0; idx < 64; ++idx) {
      int row, col;
      frag_rc(tl, idx, row, col);
      p.out[(size_t(t) * 128 + 64 * c + row) * 128 + col] = d[idx];
    }
  }
}

static void test_mbarrier() {
  {
    TypedBuf<__half> g(64 * 64);
    for (int i = 0; i < 64 * 64; ++i) g[i] = cvt<__half>(float(i % 50 + 1));
    alignas(64) TensorMap map;
    const uint64_t dims[2] = {64, 64}, strides[1] = {128};
    const uint32_t box[2] = {16, 16};
    report(encode_tensor_map(&map, TmaElement::kF16, 2, g.p, dims, strides, box, TmaSwizzle::k32B) == nullptr,
           "encode", "parity");
    std::vector<int> res(128, -1);
    int nres = 0;
    emu_launch(EmuCfg(dim3(1), dim3(64), 8192), &parity_kernel, map, ParityArgs{res.data(), &nres});
    const char* names[] = {"fresh: parity 1 complete", "fresh: parity 0 incomplete", "phase 0 complete",
                           "phase 1 incomplete", "phase 1 complete", "phase 2 incomplete", "count 3: 2 arrivals",
                           "count 3: 3 arrivals", "expect_tx: incomplete without the bytes",
                           "expect_tx: the TMA completes it", "expect_tx: data landed", "tx below 0: data landed"};
    report(nres == 12, "mbarrier checks ran", std::to_string(nres));
    for (int i = 0; i < nres && i < 12; ++i) report(res[i] == 1, "mbarrier", names[i]);
    report(res[100] == 1, "mbarrier", "tx count below 0: incomplete until the expect_tx arrives");
  }
  for (int trans = 0; trans < 2; ++trans) {
    const int tiles = quick ? 3 : 5;
    std::vector<double> A(size_t(tiles) * 128 * 64), B(64 * 128);  // A_t [128][64]; B [k][n]
    TypedBuf<__half> ga(A.size()), gb(B.size());
    for (size_t i = 0; i < A.size(); ++i) { A[i] = small_int(-3, 3); ga[i] = cvt<__half>(float(A[i])); }
    for (int k = 0; k < 64; ++k)
      for (int n = 0; n < 128; ++n) {
        B[k * 128 + n] = small_int(-3, 3);
        // K-major B is stored [n][k], MN-major [k][n].
        if (trans) gb[k * 128 + n] = cvt<__half>(float(B[k * 128 + n]));
        else gb[n * 64 + k] = cvt<__half>(float(B[k * 128 + n]));
      }
    alignas(64) TensorMap ma, mb;
    const uint64_t adims[2] = {64, uint64_t(tiles) * 128}, astr[1] = {128};
    const uint32_t abox[2] = {64, 128};
    const uint64_t bdims_k[2] = {64, 128}, bstr_k[1] = {128};
    const uint64_t bdims_mn[2] = {128, 64}, bstr_mn[1] = {256};
    const uint32_t bbox_k[2] = {64, 128}, bbox_mn[2] = {64, 64};
    report(encode_tensor_map(&ma, TmaElement::kF16, 2, ga.p, adims, astr, abox, TmaSwizzle::k128B) == nullptr,
           "encode", "ring A");
    report(encode_tensor_map(&mb, TmaElement::kF16, 2, gb.p, trans ? bdims_mn : bdims_k, trans ? bstr_mn : bstr_k,
                             trans ? bbox_mn : bbox_k, TmaSwizzle::k128B) == nullptr,
           "encode", "ring B");
    std::vector<float> out(size_t(tiles) * 128 * 128, NAN);
    const size_t smem = 1024 + 3 * 16384 + 1024;
    auto kernel = trans ? &ring_kernel<true> : &ring_kernel<false>;
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    emu_launch(EmuCfg(dim3(2), dim3(384), smem), kernel, ma, mb, RingArgs{tiles, out.data()});
    bool ok = true;
    for (int t = 0; t < tiles; ++t)
      for (int m = 0; m < 128; ++m)
        for (int n = 0; n < 128; ++n) {
          double s = 0;
          for (int k = 0; k < 64; ++k) s += A[(size_t(t) * 128 + m) * 64 + k] * B[k * 128 + n];
          ok &= out[(size_t(t) * 128 + m) * 128 + n] == s;
        }
    report(ok, "2-stage ring: producer warpgroup, 2 consumer warpgroups, TMA + wgmma",
           trans ? "B MN-major (2 slabs)" : "B K-major");
  }
}

// ---------------------------------------------------------------------------------------------------------------
// protocol: each misuse aborts with its message. The body runs in a fork()ed child whose stderr comes back here.
static void expect_abort(const char* name, const char* needle, const std::function<void()>& body) {
  fflush(stdout);
  fflush(stderr);
  const auto t0 = std::chrono::steady_clock::now();
  int fds[2];
  if (pipe(fds) != 0) abort();
  const pid_t pid = fork();
  if (pid == 0) {
    close(fds[0]);
    dup2(fds[1], 2);
    emu_hopper_timeout_s = 15;  // the deadlocks here must be seen sooner: every thread waits (or is done)
    body();
    _exit(0);
  }
  close(fds[1]);
  std::string msg;
  char buf[512];
  ssize_t got;
  while ((got = read(fds[0], buf, sizeof buf)) > 0) msg.append(buf, size_t(got));
  close(fds[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  const bool aborted = WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT;
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const bool ok = aborted && msg.find(needle) != std::string::npos && secs < 8;
  const std::string first = msg.substr(0, msg.find('\n'));
  report(ok, name, aborted ? first : "did not abort: " + first);
  if (getenv("EMU_VERBOSE")) printf("%s %s (%.1f s): %s\n", ok ? "ok  " : "FAIL", name, secs, first.c_str());
}

// The kernel of every misuse: a few Hopper instructions, wrong in the way `kind` says.
static void misuse_kernel(const __grid_constant__ TensorMap map, int kind) {
  uint8_t* base = smem_base();
  uint64_t* bar = reinterpret_cast<uint64_t*>(base);
  uint8_t* tile = base + 1024;
  const uint32_t t = smem_u32(tile);
  const uint64_t desc = smem_descriptor(t, 16, 1024, SmemSwizzle::k128B);
  float d[8] = {};
  switch (kind) {
    case 0:  // wgmma without wgmma_fence
      wgmma_ss<__half, 16, false>(d, desc, desc, false);
      wgmma_commit();
      wgmma_wait<0>();
      break;
    case 1:  // batches pending at exit
      wgmma_fence();
      wgmma_ss<__half, 16, false>(d, desc, desc, false);
      wgmma_commit();
      break;
    case 2:  // warp 1 issues a different wgmma
      wgmma_fence();
      wgmma_ss<__half, 16, false>(d, desc, threadIdx.x / 32 == 1 ? desc + 8 : desc, false);
      wgmma_commit();
      wgmma_wait<0>();
      break;
    case 3:  // a wait on a phase nobody completes
      if (threadIdx.x == 0) { mbarrier_init(bar, 1); mbarrier_init_fence(); }
      __syncthreads();
      mbarrier_wait(bar, 0);
      break;
    case 4:  // spinning on try_wait forever
      if (threadIdx.x == 0) { mbarrier_init(bar, 1); mbarrier_init_fence(); }
      __syncthreads();
      while (!mbarrier_try_wait(bar, 0)) {}
      break;
    case 5:  // an uninitialised barrier
      mbarrier_arrive(bar);
      break;
    case 6:  // TMA on a barrier without mbarrier_init_fence
      if (threadIdx.x == 0) {
        mbarrier_init(bar, 1);
        mbarrier_arrive_expect_tx(bar, 4096);
        tma_load_2d(tile, &map, bar, 0, 0);
      }
      break;
    case 7:  // TMA destination not 128-byte aligned
    case 8:  // 128B-swizzled TMA destination not 1024-byte aligned
      if (threadIdx.x == 0) {
        mbarrier_init(bar, 1);
        mbarrier_init_fence();
        mbarrier_arrive_expect_tx(bar, 4096);
        tma_load_2d(tile + (kind == 7 ? 64 : 128), &map, bar, 0, 0);
        mbarrier_wait(bar, 0);
      }
      break;
    case 9:  // warps of a warpgroup disagree on setmaxnreg
      if (threadIdx.x / 64 == 0) setmaxnreg_inc<240>(); else setmaxnreg_inc<232>();
      break;
    case 10:  // accumulator written while its wgmma is pending
      wgmma_fence();
      wgmma_ss<__half, 16, false>(d, desc, desc, false);
      wgmma_commit();
      d[0] = 5;
      wgmma_wait<0>();
      break;
    case 11:  // TMA into a tile a pending wgmma reads
      if (threadIdx.x == 0) { mbarrier_init(bar, 1); mbarrier_init_fence(); }
      __syncthreads();
      wgmma_fence();
      wgmma_ss<__half, 16, false>(d, desc, desc, false);
      wgmma_commit();
      if (threadIdx.x == 0) {
        mbarrier_arrive_expect_tx(bar, 4096);
        tma_load_2d(tile, &map, bar, 0, 0);
      }
      __syncthreads();
      wgmma_wait<0>();
      break;
    case 12:  // wgmma on a tile whose TMA load is still in flight
      if (threadIdx.x == 0) {
        mbarrier_init(bar, 1);
        mbarrier_init_fence();
        mbarrier_arrive_expect_tx(bar, 4096);
        tma_load_2d(tile, &map, bar, 0, 0);
      }
      __syncthreads();
      wgmma_fence();
      wgmma_ss<__half, 16, false>(d, desc, desc, false);
      wgmma_commit();
      wgmma_wait<0>();
      break;
    case 13:  // TMA never waited for
      if (threadIdx.x == 0) {
        mbarrier_init(bar, 1);
        mbarrier_init_fence();
        mbarrier_arrive_expect_tx(bar, 4096);
        tma_load_2d(tile, &map, bar, 0, 0);
      }
      break;
    case 14:  // a TMA box over the barriers
      if (threadIdx.x == 0) {
        mbarrier_init(bar, 1);
        mbarrier_init_fence();
        tma_load_2d(base, &map, bar, 0, 0);
      }
      break;
    case 15:  // a store over a barrier
      if (threadIdx.x == 0) {
        mbarrier_init(bar, 1);
        mbarrier_init_fence();
        bar[0] = 0;
        mbarrier_arrive(bar);
      }
      break;
    case 16:  // a warpgroup instruction in an incomplete warpgroup (launched with 96 threads)
      wgmma_fence();
      break;
    case 17: {  // smem_u32 of memory that is not dynamic shared memory
      static int not_shared;
      (void)smem_u32(&not_shared);
      break;
    }
    case 18:  // a warp skips the (empty) batch and its wait
      wgmma_fence();
      if (threadIdx.x / 32 != 3) {
        wgmma_commit();
        wgmma_wait<0>();
      }
      break;
    case 19:  // tma_load_3d with a 2D map
      if (threadIdx.x == 0) {
        mbarrier_init(bar, 1);
        mbarrier_init_fence();
        tma_load_3d(tile, &map, bar, 0, 0, 0);
      }
      break;
    case 20:  // an arrival too many while bytes are outstanding
      if (threadIdx.x == 0) {
        mbarrier_init(bar, 1);
        mbarrier_arrive_expect_tx(bar, 64);
        mbarrier_arrive(bar);
      }
      break;
    case 21:  // a descriptor with a base offset
      wgmma_fence();
      wgmma_ss<__half, 16, false>(d, desc | (uint64_t(1) << 49), desc, false);
      break;
    case 24:  // a second TMA load into a tile whose first load nobody waited for
      if (threadIdx.x == 0) {
        mbarrier_init(bar, 1);
        mbarrier_init_fence();
        mbarrier_arrive_expect_tx(bar, 8192);
        tma_load_2d(tile, &map, bar, 0, 0);
        tma_load_2d(tile, &map, bar, 0, 32);
      }
      break;
    case 22:  // a wrong parity after the phase moved on: waits for a phase two ahead
      if (threadIdx.x == 0) {
        mbarrier_init(bar, 1);
        mbarrier_init_fence();
        mbarrier_arrive(bar);
        mbarrier_wait(bar, 1);
      }
      break;
  }
}

static void test_protocol() {
  Buf g(64 * 64 * 2);
  memset(g.p, 0, 64 * 64 * 2);
  alignas(64) TensorMap map;
  const uint64_t dims[2] = {64, 64}, strides[1] = {128};
  const uint32_t box[2] = {64, 32};
  if (encode_tensor_map(&map, TmaElement::kF16, 2, g.p, dims, strides, box, TmaSwizzle::k128B) != nullptr) abort();
  struct Case {
    const char* name;
    int kind;
    unsigned threads;
    const char* needle;
  };
  const Case cases[] = {
      {"wgmma without wgmma_fence", 0, 128, "without a wgmma_fence"},
      {"wgmma batches pending at kernel exit", 1, 128, "pending"},
      {"warps of a warpgroup issue different wgmmas", 2, 128, "different wgmma sequences"},
      {"mbarrier_wait on a phase nobody completes", 3, 32, "deadlock or wrong phase"},
      {"try_wait spun on forever", 4, 32, "spun on"},
      {"uninitialised mbarrier", 5, 32, "before mbarrier_init"},
      {"TMA on a barrier without mbarrier_init_fence", 6, 32, "mbarrier_init_fence"},
      {"TMA destination not 128-byte aligned", 7, 32, "not 128-byte aligned"},
      {"128B-swizzled TMA destination not 1024-byte aligned", 8, 32, "repeat of the swizzle"},
      {"setmaxnreg differs within a warpgroup", 9, 128, "disagree"},
      {"accumulator written while its wgmma is pending", 10, 128, "accumulator registers"},
      {"TMA into a tile a pending wgmma reads", 11, 128, "not yet retired"},
      {"wgmma issued on a tile with a TMA load in flight", 12, 128, "TMA load in flight still writes"},
      {"two TMA loads in flight into one tile", 24, 32, "another TMA load in flight"},
      {"TMA load never waited for", 13, 32, "in flight"},
      {"TMA box over the mbarriers", 14, 32, "overlaps the mbarrier"},
      {"store over an mbarrier", 15, 32, "overwritten"},
      {"warpgroup instruction in an incomplete warpgroup", 16, 96, "complete warpgroup"},
      {"smem_u32 outside dynamic shared memory", 17, 32, "not in the block's dynamic shared memory"},
      {"a warp skips wgmma_wait", 18, 128, "of the 128 threads"},
      {"tma_load_3d with a 2D tensor map", 19, 32, "rank"},
      {"an arrival too many", 20, 32, "more arrivals"},
      {"descriptor with a base offset", 21, 128, "base offset"},
      {"wait on the parity of a phase two ahead", 22, 32, "deadlock or wrong phase"},
  };
  for (const Case& c : cases) {
    if (emu_tma_eager && (c.kind == 12 || c.kind == 13 || c.kind == 24)) continue;  // copies land at issue
    expect_abort(c.name, c.needle, [&] {
      emu_launch(EmuCfg(dim3(1), dim3(c.threads), 20 * 1024), &misuse_kernel, map, c.kind);
    });
  }
}

int main(int argc, char** argv) {
  Sections run(argc, argv, "all");
  if (run("wgmma")) test_wgmma();
  if (run("tma")) test_tma();
  if (run("mbarrier")) test_mbarrier();
  if (run("protocol")) test_protocol();
  return summary();
}
