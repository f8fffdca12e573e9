// Emulated PTX: fake/mma_ptx.cuh includes it in namespace blockops::mma in place of csrc/kernels/mma_ptx.cuh, the
// one header through which every kernel issues PTX.
// Written from the PTX ISA, not from the kernels:
//  - mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 with the fragment layouts of
//    "Matrix Fragments for mma.m16n8k16 with floating point type" (9.7.14.5.8);
//  - ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16 (9.7.14.5.15): lanes 8i..8i+7 give the row addresses of
//    matrix i, lane l receives elements 2 (l % 4), 2 (l % 4) + 1 of row l / 4 of matrix i in d[i] (.trans: of
//    the transposed matrix); every read is recorded for the shared-memory race check (fake/cuda_runtime_api.h);
//  - cp.async.cg.shared.global 16 with src-size, commit_group, wait_group: a copy lands when a wait_group
//    retires its group (the latest moment PTX allows), or at issue with EMU_CPASYNC=eager;
//  - lop3.b32 with a generic LUT.
// Included inside namespace blockops::mma: no #includes here (fake/mma_ptx.cuh provides everything).

// Element i of a fragment held as b16 pairs: element 2r is the low half of register r ("low to high").
inline uint16_t emu_half_of(uint32_t reg, int i) { return uint16_t(i & 1 ? reg >> 16 : reg & 0xFFFF); }
template <typename T>
inline double emu_b16_value(uint16_t bits) { T v; memcpy(&v, &bits, 2); return emu_to_double(v); }

enum EmuOpTag { kEmuMmaF16 = 1, kEmuMmaBF16 = 2, kEmuLdmatrix = 3, kEmuLdmatrixTrans = 4 };

// Posts this lane's operands to the warp and waits for all 32 lanes; returns the slot set every lane posted to.
inline EmuWarpOp* emu_warp_exchange(const EmuWarpOp& mine) {
  EmuWarp& w = *emu_warps[threadIdx.x / 32];
  const int lane = threadIdx.x % 32;
  const long seq = emu_warp_seq++;
  EmuWarpOp* slots = w.op[seq & 1];
  slots[lane] = mine;
  slots[lane].seq = seq;
  w.bar->arrive_and_wait();
  for (int l = 0; l < 32; ++l) {
    if (slots[l].tag != mine.tag || slots[l].seq != seq) {
      fprintf(stderr, "warp-collective mismatch: lane %d op %d/%ld vs lane %d op %d/%ld\n", lane, mine.tag, seq, l,
              slots[l].tag, slots[l].seq);
      abort();
    }
  }
  return slots;
}

// PTX ISA 9.7.14.5.8, .f16/.bf16 A: row = groupID for a_i, i in {0,1,4,5}, else groupID + 8;
// col = threadID_in_group * 2 + (i & 1), + 8 for i >= 4.
inline void emu_a_coord(int lane, int i, int& row, int& col) {
  const int groupID = lane >> 2, threadID_in_group = lane % 4;
  row = (i < 2 || (i >= 4 && i < 6)) ? groupID : groupID + 8;
  col = threadID_in_group * 2 + (i & 1) + (i >= 4 ? 8 : 0);
}
// B (16x8): row = threadID_in_group * 2 + (i & 1), + 8 for i >= 2; col = groupID.
inline void emu_b_coord(int lane, int i, int& row, int& col) {
  const int groupID = lane >> 2, threadID_in_group = lane % 4;
  row = threadID_in_group * 2 + (i & 1) + (i >= 2 ? 8 : 0);
  col = groupID;
}
// C/D (16x8 f32): row = groupID for c0, c1, groupID + 8 for c2, c3; col = threadID_in_group * 2 + (i & 1).
inline void emu_c_coord(int lane, int i, int& row, int& col) {
  const int groupID = lane >> 2, threadID_in_group = lane % 4;
  row = i < 2 ? groupID : groupID + 8;
  col = threadID_in_group * 2 + (i & 1);
}

// D = A B + C. Products of fp16/bf16 values are exact in double and the 16-term sum plus C is rounded once to
// fp32 (the hardware's accumulation order differs only at fp32 rounding level).
template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  EmuWarpOp mine{};
  mine.tag = std::is_same_v<T, __half> ? kEmuMmaF16 : kEmuMmaBF16;
  for (int r = 0; r < 4; ++r) mine.a[r] = a[r];
  mine.b[0] = b0;
  mine.b[1] = b1;
  for (int i = 0; i < 4; ++i) mine.c[i] = d[i];
  const EmuWarpOp* slots = emu_warp_exchange(mine);
  double A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    for (int i = 0; i < 8; ++i) {
      int row, col;
      emu_a_coord(l, i, row, col);
      A[row][col] = emu_b16_value<T>(emu_half_of(slots[l].a[i / 2], i));
    }
    for (int i = 0; i < 4; ++i) {
      int row, col;
      emu_b_coord(l, i, row, col);
      B[row][col] = emu_b16_value<T>(emu_half_of(slots[l].b[i / 2], i));
    }
  }
  const int lane = threadIdx.x % 32;
  for (int i = 0; i < 4; ++i) {
    int row, col;
    emu_c_coord(lane, i, row, col);
    double s = slots[lane].c[i];
    for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
    d[i] = float(s);
  }
}

inline void emu_check_smem(const void* p, size_t bytes, const char* what) {
  const uint8_t* b = static_cast<const uint8_t*>(p);
  if (emu_dyn_smem == nullptr || b < emu_dyn_smem || b + bytes > emu_dyn_smem + emu_dyn_smem_bytes) {
    fprintf(stderr, "%s: address outside dynamic shared memory\n", what); abort();
  }
}

inline void ldmatrix_x4(uint32_t (&d)[4], const void* row) {
  EmuWarpOp mine{};
  mine.tag = kEmuLdmatrix;
  mine.ptr = row;
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0) { fprintf(stderr, "ldmatrix: row address not 16-byte aligned\n"); abort(); }
  emu_check_smem(row, 16, "ldmatrix");
  emu_note_smem_read(row);
  const EmuWarpOp* slots = emu_warp_exchange(mine);
  const int lane = threadIdx.x % 32;
  for (int i = 0; i < 4; ++i) {
    const uint8_t* src = static_cast<const uint8_t*>(slots[8 * i + lane / 4].ptr) + 4 * (lane % 4);
    memcpy(&d[i], src, 4);
  }
}

// ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 (PTX ISA 9.7.14.5.15, ".trans: the matrix is loaded in
// column-major format"): the fragment lane l receives is that of the transposed matrix, i.e. elements
// (row 2 (l % 4), column l / 4) and (row 2 (l % 4) + 1, column l / 4) of matrix i as stored (rows given by the
// addresses of lanes 8i..8i+7), low half first.
inline void ldmatrix_x4_trans(uint32_t (&d)[4], const void* row) {
  EmuWarpOp mine{};
  mine.tag = kEmuLdmatrixTrans;
  mine.ptr = row;
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0) { fprintf(stderr, "ldmatrix: row address not 16-byte aligned\n"); abort(); }
  emu_check_smem(row, 16, "ldmatrix.trans");
  emu_note_smem_read(row);
  const EmuWarpOp* slots = emu_warp_exchange(mine);
  const int lane = threadIdx.x % 32;
  for (int i = 0; i < 4; ++i) {
    uint16_t h[2];
    for (int e = 0; e < 2; ++e) {
      const uint8_t* src = static_cast<const uint8_t*>(slots[8 * i + 2 * (lane % 4) + e].ptr) + 2 * (lane / 4);
      memcpy(&h[e], src, 2);
    }
    d[i] = uint32_t(h[0]) | (uint32_t(h[1]) << 16);
  }
}

inline bool emu_cp_eager() {
  static const bool eager = [] { const char* e = getenv("EMU_CPASYNC"); return e && !strcmp(e, "eager"); }();
  return eager;
}
inline void emu_cp_land(const EmuCopy& c) {
  if (c.full) memcpy(c.dst, c.src, 16); else memset(c.dst, 0, 16);
}
inline void cp_async16(void* dst, const void* src, bool full) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0) { fprintf(stderr, "cp.async: smem address not 16-byte aligned\n"); abort(); }
  if (full && reinterpret_cast<uintptr_t>(src) % 16 != 0) { fprintf(stderr, "cp.async: global address not 16-byte aligned\n"); abort(); }
  emu_check_smem(dst, 16, "cp.async");
  emu_check_smem_write(dst, "cp.async");
  const EmuCopy c{static_cast<uint8_t*>(dst), static_cast<const uint8_t*>(src), full};
  if (full) { volatile uint8_t probe = c.src[0] + c.src[15]; (void)probe; }  // ASan: the source must exist at issue
  if (emu_cp_eager()) emu_cp_land(c); else emu_cp.pending.push_back(c);
}
inline void cp_async_commit() { emu_cp.group_end.push_back(emu_cp.pending.size()); }
template <int N>
inline void cp_async_wait() {
  const size_t groups = emu_cp.group_end.size();
  if (groups <= size_t(N)) return;
  const size_t done = emu_cp.group_end[groups - N - 1];  // copies of every group but the newest N
  for (size_t i = 0; i < done; ++i) emu_cp_land(emu_cp.pending[i]);
  emu_cp.pending.erase(emu_cp.pending.begin(), emu_cp.pending.begin() + done);
  emu_cp.group_end.erase(emu_cp.group_end.begin(), emu_cp.group_end.begin() + (groups - N));
  for (auto& e : emu_cp.group_end) e -= done;
}

// lop3.b32 d, a, b, c, immLut (PTX ISA "lop3"): immLut is the function applied to a = 0xF0, b = 0xCC, c = 0xAA,
// so bit i of d is bit (4 a_i + 2 b_i + c_i) of immLut.
template <int kLut, uint32_t kB, uint32_t kC>
inline uint32_t lop3(uint32_t a) {
  uint32_t d = 0;
  for (int i = 0; i < 32; ++i) {
    const int idx = (((a >> i) & 1) << 2) | (((kB >> i) & 1) << 1) | ((kC >> i) & 1);
    d |= uint32_t((kLut >> idx) & 1) << i;
  }
  return d;
}
