// Emulated Hopper (sm_90a) instructions: fake/hopper_ptx.cuh includes this file in namespace blockops::hopper in
// place of csrc/kernels/hopper_ptx.cuh (the one header through which the Hopper kernels issue them), under the same
// names. Written from the PTX ISA (and cuTensorMapEncodeTiled's documentation in cuda.h), not from the kernels and
// not from hopper_layout.cuh (whose descriptor encoder this file never calls, so a misreading there shows here):
//  - wgmma.mma_async.sync.aligned.m64nNk16.f32.{f16,bf16} (9.7.15.5): SS (A and B by matrix descriptor) and RS
//    (A from registers in the m16n8k16 A fragment layout per warp), B K-major or MN-major, every swizzle mode
//    (interleave, 32B, 64B, 128B; base offset 0), descriptors decoded here from "Matrix Descriptor Format" and the
//    canonical layouts of "Shared Memory Matrix Layout"; wgmma.fence / commit_group / wait_group. A wgmma is queued
//    in its thread's open batch; wgmma_wait<N> is a rendezvous of the warpgroup's 128 threads (which must have
//    issued the same wgmmas and commits) that executes the oldest committed batches until at most N are pending:
//    the shared-memory operands and the accumulators are read and written then, the latest moment PTX allows (RS A
//    registers are taken at issue);
//  - mbarrier (9.7.13.15): init, arrive, arrive.expect_tx, try_wait.parity, phases and transaction counts, state
//    kept here keyed by the barrier's shared-window address (its 8 bytes hold a check word the kernel must not
//    touch);
//  - cp.async.bulk.tensor.{2d,3d}.shared::cluster.global.tile.mbarrier::complete_tx::bytes with a tensor map that
//    encode_tensor_map (the cuTensorMapEncodeTiled stand-in) fills: the box lands, swizzled on the shared-window
//    address bits, zero-filled outside the tensor, when some thread waits on its barrier's incomplete phase (the
//    latest moment), or at issue with EMU_TMA=eager;
//  - setmaxnreg.{inc,dec}.sync.aligned.u32 (checks only), fence.proxy.async / fence.mbarrier_init / prefetch.tensormap
//    (no data effect).
// Misuse aborts with "hopper emu: ..." (see README.md). Included inside namespace blockops::hopper: no #includes here
// (fake/hopper_ptx.cuh provides everything).

// ---------------------------------------------------------------------------------------------------------------
// Configuration, failure, the shared window
// Seconds a wait may block before it is called a deadlock (EMU_HOPPER_TIMEOUT; tests of the checks shorten it);
// a wait that sees the whole block stuck gives up after a second (EmuStuck).
inline double emu_hopper_timeout_s = [] {
  const char* e = getenv("EMU_HOPPER_TIMEOUT");
  return e ? atof(e) : 20.0;
}();
// TMA copies land at issue instead of at the wait (EMU_TMA=eager): catches a stage overwritten while still read.
inline bool emu_tma_eager = [] {
  const char* e = getenv("EMU_TMA");
  return e && !strcmp(e, "eager");
}();

[[noreturn]] __attribute__((format(printf, 1, 2))) inline void emu_hop_fail(const char* fmt, ...) {
  char msg[600];
  va_list args;
  va_start(args, fmt);
  vsnprintf(msg, sizeof msg, fmt, args);
  va_end(args);
  fprintf(stderr, "hopper emu: %s (thread %u, block %u,%u,%u)\n", msg, threadIdx.x, blockIdx.x, blockIdx.y,
          blockIdx.z);
  fflush(stderr);
  abort();
}

// The shared-window address of the dynamic shared buffer's first byte: 128 past a 1024-byte boundary, like the host
// buffer (fake/cuda_runtime_api.h), so aligning a generic pointer or a window address is the same.
constexpr uint32_t kEmuSmemWindowBase = 0x400 + uint32_t(kEmuSmemMisalign);
static_assert(kEmuSmemWindowBase % 1024 == kEmuSmemMisalign % 1024, "window and host buffer must agree mod 1024");

inline uint32_t smem_u32(const void* p) {
  const uint8_t* b = static_cast<const uint8_t*>(p);
  if (emu_dyn_smem == nullptr || b < emu_dyn_smem || b >= emu_dyn_smem + emu_dyn_smem_bytes)
    emu_hop_fail("smem_u32: pointer is not in the block's dynamic shared memory (Hopper kernels keep all shared "
                 "state in extern __shared__ smem_raw)");
  return kEmuSmemWindowBase + uint32_t(b - emu_dyn_smem);
}
// Host pointer of [addr, addr + bytes) of the shared window; aborts outside the dynamic buffer.
inline uint8_t* emu_smem_at(uint32_t addr, size_t bytes, const char* what) {
  if (emu_dyn_smem == nullptr || addr < kEmuSmemWindowBase ||
      size_t(addr - kEmuSmemWindowBase) + bytes > emu_dyn_smem_bytes)
    emu_hop_fail("%s: shared address 0x%x (+%zu bytes) outside the dynamic shared memory [0x%x, 0x%zx)", what, addr,
                 bytes, kEmuSmemWindowBase, kEmuSmemWindowBase + emu_dyn_smem_bytes);
  return emu_dyn_smem + (addr - kEmuSmemWindowBase);
}
// Sw<B,4,3> of the swizzle modes: bits [4, 4 + B) of the address XOR bits [7, 7 + B), span = 16 << B bytes.
inline uint32_t emu_swizzle(uint32_t addr, uint32_t span) {
  return span == 0 ? addr : addr ^ (((addr >> 7) & (span / 16 - 1)) << 4);
}

// Deadlock detection besides the timeout: a waiter that sees every thread of the block either waiting in a Hopper
// wait (mbarrier wait / try_wait, warpgroup rendezvous) or done, and no Hopper progress (an init, arrival, TMA issue
// or landing, a completed rendezvous, a wait that returned) for a second, gives up at once: nobody is left to arrive,
// and waiters land every TMA copy of the barrier they wait on before they sleep. Threads blocked elsewhere
// (__syncthreads, warp collectives) or computing are not counted, so then only the timeout applies.
inline std::atomic<unsigned> emu_hop_blocked{0};
inline std::atomic<uint64_t> emu_hop_progress{0};
struct EmuStuck {
  uint64_t progress;
  std::chrono::steady_clock::time_point since, start;
  EmuStuck() : progress(emu_hop_progress.load()), since(std::chrono::steady_clock::now()), start(since) {}
  // Called by a waiter that is awake (so not counted in emu_hop_blocked): true once it should give up.
  bool expired() {
    const auto now = std::chrono::steady_clock::now();
    if (std::chrono::duration<double>(now - start).count() > emu_hopper_timeout_s) return true;
    const uint64_t p = emu_hop_progress.load();
    const bool all_waiting = emu_hop_blocked.load() + 1 + emu_block_threads_done.load() >= blockDim.x;
    if (p != progress || !all_waiting) {
      progress = p;
      since = now;
      return false;
    }
    return std::chrono::duration<double>(now - since).count() > std::min(1.0, emu_hopper_timeout_s);
  }
};

// try_wait may block for a while (as the hardware's does, here up to 5 ms); a thread that keeps getting false for
// the same barrier and parity for longer than the timeout is in a deadlock. Between two calls of its spin loop a
// spinning thread counts as waiting (emu_hop_blocked), so the all-waiting test of EmuStuck sees a block of spinners
// the same at every look, however the OS schedules them: a checker holds h.mu, so every other spinner is then
// either in the 5 ms wait or between calls, counted in both places.
struct EmuSpin {
  uint32_t addr = 0, parity = 0;
  bool active = false;  // the last try_wait of this thread returned false; counted in emu_hop_blocked
  EmuStuck stuck;
};
inline thread_local EmuSpin emu_spin;
// Any Hopper instruction of a spinning thread (its next try_wait included) ends its count as a waiter.
inline void emu_spin_leave() {
  if (!emu_spin.active) return;
  emu_spin.active = false;
  --emu_hop_blocked;
}
// ---------------------------------------------------------------------------------------------------------------
// Block state (created by the first Hopper instruction of a block, checked and dropped when the block ends)
struct EmuTmaDesc {  // what encode_tensor_map stores in the 128-byte TensorMap
  uint64_t magic;
  const uint8_t* base;
  uint64_t dims[5];
  uint64_t strides[4];  // bytes, of dimensions 1..4
  uint32_t box[5];
  int32_t rank, esize, span, pad;
};
static_assert(sizeof(EmuTmaDesc) <= 128, "the tensor map holds 128 bytes");
constexpr uint64_t kEmuTmaMagic = 0x544d415f454d5531ull;  // "TMA_EMU1"

struct EmuTmaCopy {
  uint32_t dst, bytes;
  EmuTmaDesc map;
  int c[5];
};
struct EmuMbar {
  uint32_t count = 0;       // arrivals per phase
  int64_t pending = 0;      // arrivals still missing in the current phase
  int64_t tx = 0;           // transaction bytes still expected in the current phase (may dip below 0)
  uint64_t phase = 0;       // index of the current (incomplete) phase
  bool fenced = false;      // mbarrier_init_fence() ran after the init
  unsigned init_thread = 0;
  std::vector<EmuTmaCopy> copies;  // TMA loads signalling this barrier, not landed yet
};

// A barrier over the 128 threads of a warpgroup that gives up (deadlock) after the timeout.
struct EmuGroupBarrier {
  std::mutex m;
  std::condition_variable cv;
  int arrived = 0;
  long gen = 0;
  void arrive_and_wait(unsigned group, const char* what) {
    std::unique_lock<std::mutex> l(m);
    const long g = gen;
    if (++arrived == 128) {
      arrived = 0;
      ++gen;
      ++emu_hop_progress;
      cv.notify_all();
      return;
    }
    EmuStuck stuck;
    while (gen == g) {
      ++emu_hop_blocked;
      cv.wait_for(l, std::chrono::milliseconds(100));
      --emu_hop_blocked;
      if (gen == g && stuck.expired())
        emu_hop_fail("%s: only %d of the 128 threads of warpgroup %u arrived (deadlock: a warpgroup instruction "
                     "must be issued by all its threads)",
                     what, arrived, group);
    }
  }
};

// One wgmma as one thread issued it.
struct EmuWgRecord {
  int tag;              // type, N, B major, SS / RS (emu_wg_tag)
  uint64_t da, db;      // descriptors (da unused for RS)
  bool scale_d;         // accumulate
  long batch;           // commit-group index
  uint32_t a[4];        // RS: this thread's A registers
  float* d;             // this thread's accumulators
  bool has_expect;      // expect: what d must hold when the wgmma executes (written by nobody else since)
  float expect[128];
  std::vector<uint32_t> chunks;  // leader only: 16-byte chunks of shared memory the operands occupy
};
enum EmuWgOp { kEmuWgWait = 1, kEmuWgRegInc = 2, kEmuWgRegDec = 3 };
struct EmuWgThread {
  std::vector<EmuWgRecord> recs;  // issued and not executed, oldest first
  long committed = 0, retired = 0;
  bool fenced = false;
  int op = 0;
  long op_arg = 0;
};
struct EmuWgLanding {
  int n;
  bool scale_d;
  double A[64][16];
  double B[16][256];
};
struct EmuWarpgroup {
  EmuGroupBarrier bar;
  EmuWgThread th[128];
  std::vector<std::unique_ptr<EmuWgLanding>> landing;  // the wgmmas the current wait executes, in order
  size_t n_landing = 0;
  long land_batches = 0;
};

struct EmuHopperBlock {
  std::mutex mu;  // barriers and TMA copies
  std::condition_variable cv;
  std::unordered_map<uint32_t, EmuMbar> bars;
  size_t copies_in_flight = 0;
  std::unique_ptr<std::atomic<int>[]> wg_readers, tma_writers;  // per 16-byte chunk of the dynamic buffer
  size_t chunks = 0;
  std::vector<std::unique_ptr<EmuWarpgroup>> groups;  // blockDim.x / 128 complete warpgroups
};
inline std::atomic<EmuHopperBlock*> emu_hop{nullptr};
inline std::mutex emu_hop_create_mu;

inline EmuHopperBlock& emu_hop_block() {
  emu_spin_leave();
  EmuHopperBlock* h = emu_hop.load(std::memory_order_acquire);
  if (h != nullptr) return *h;
  std::lock_guard<std::mutex> l(emu_hop_create_mu);
  h = emu_hop.load(std::memory_order_acquire);
  if (h == nullptr) {
    h = new EmuHopperBlock;
    h->chunks = emu_dyn_smem_bytes / 16 + 1;
    h->wg_readers.reset(new std::atomic<int>[h->chunks]);
    h->tma_writers.reset(new std::atomic<int>[h->chunks]);
    for (size_t i = 0; i < h->chunks; ++i) {
      h->wg_readers[i].store(0);
      h->tma_writers[i].store(0);
    }
    for (unsigned g = 0; g < blockDim.x / 128; ++g) h->groups.emplace_back(new EmuWarpgroup);
    emu_hop.store(h, std::memory_order_release);
  }
  return *h;
}
inline size_t emu_chunk_of(uint32_t addr) { return (addr - kEmuSmemWindowBase) / 16; }

// The warpgroup of the calling thread (threads 128 g .. 128 g + 127 of the block).
inline EmuWarpgroup& emu_wg(const char* what) {
  EmuHopperBlock& h = emu_hop_block();
  const unsigned g = threadIdx.x / 128;
  if (g >= h.groups.size())
    emu_hop_fail("%s: thread %u is not in a complete warpgroup (blockDim.x = %u; a warpgroup is 4 consecutive warps "
                 "starting at a warp index that is a multiple of 4)",
                 what, threadIdx.x, blockDim.x);
  return *h.groups[g];
}

// ---------------------------------------------------------------------------------------------------------------
// Fences without a data effect here (the emulator's threads see each other's shared memory writes at once).
inline void fence_proxy_async_shared() {}
template <int kRegs>
inline void fence_operands(float (&)[kRegs]) {}

// ---------------------------------------------------------------------------------------------------------------
// mbarrier
inline uint64_t emu_mbar_check_word(uint32_t addr) { return 0x4d42415200000000ull | addr; }  // "MBAR" | address

// The barrier at `bar` (emu_hop.mu held): aborts unless it is initialised and its 8 bytes are intact.
inline EmuMbar& emu_mbar(EmuHopperBlock& h, uint64_t* bar, const char* what) {
  const uint32_t a = smem_u32(bar);
  auto it = h.bars.find(a);
  if (it == h.bars.end()) emu_hop_fail("%s: mbarrier at shared address 0x%x used before mbarrier_init", what, a);
  uint64_t word;
  memcpy(&word, emu_smem_at(a, 8, what), 8);
  if (word != emu_mbar_check_word(a))
    emu_hop_fail("%s: the 8 bytes of the mbarrier at shared address 0x%x were overwritten (a tile or a store "
                 "overlapping the barriers?)",
                 what, a);
  return it->second;
}
inline void emu_mbar_complete_if_done(EmuMbar& b) {
  if (b.pending == 0 && b.tx == 0) {
    ++b.phase;
    b.pending = b.count;
  }
}
inline void emu_mbar_arrive_locked(EmuMbar& b, uint32_t addr, const char* what) {
  if (b.pending <= 0)
    emu_hop_fail("%s: more arrivals than the mbarrier at 0x%x expects in phase %lu (count %u; its transaction "
                 "count %ld is not 0)",
                 what, addr, (unsigned long)b.phase, b.count, (long)b.tx);
  --b.pending;
  ++emu_hop_progress;
  emu_mbar_complete_if_done(b);
}

inline void mbarrier_init(uint64_t* bar, uint32_t arrivals) {
  EmuHopperBlock& h = emu_hop_block();
  const uint32_t a = smem_u32(bar);
  if (a % 8 != 0) emu_hop_fail("mbarrier_init: barrier at 0x%x not 8-byte aligned", a);
  if (arrivals < 1 || arrivals >= (1u << 20)) emu_hop_fail("mbarrier_init: count %u outside 1..2^20-1", arrivals);
  std::lock_guard<std::mutex> l(h.mu);
  auto it = h.bars.find(a);
  if (it != h.bars.end() && !it->second.copies.empty())
    emu_hop_fail("mbarrier_init: re-initialising the mbarrier at 0x%x with TMA loads in flight on it", a);
  EmuMbar& b = h.bars[a];
  b = EmuMbar{};
  b.count = arrivals;
  b.pending = arrivals;
  b.init_thread = threadIdx.x;
  ++emu_hop_progress;
  const uint64_t word = emu_mbar_check_word(a);
  memcpy(emu_smem_at(a, 8, "mbarrier_init"), &word, 8);
}
// fence.mbarrier_init.release.cluster: the barriers this thread initialised become visible to the async proxy.
inline void mbarrier_init_fence() {
  EmuHopperBlock& h = emu_hop_block();
  std::lock_guard<std::mutex> l(h.mu);
  for (auto& [addr, b] : h.bars)
    if (b.init_thread == threadIdx.x) b.fenced = true;
}
inline void mbarrier_arrive(uint64_t* bar) {
  EmuHopperBlock& h = emu_hop_block();
  std::lock_guard<std::mutex> l(h.mu);
  emu_mbar_arrive_locked(emu_mbar(h, bar, "mbarrier_arrive"), smem_u32(bar), "mbarrier_arrive");
  h.cv.notify_all();
}
// mbarrier.arrive.expect_tx: the expect-tx operation (tx count += bytes) and then the arrive-on operation.
inline void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  EmuHopperBlock& h = emu_hop_block();
  std::lock_guard<std::mutex> l(h.mu);
  EmuMbar& b = emu_mbar(h, bar, "mbarrier_arrive_expect_tx");
  b.tx += bytes;
  emu_mbar_arrive_locked(b, smem_u32(bar), "mbarrier_arrive_expect_tx");
  h.cv.notify_all();
}

inline void emu_tma_land(EmuHopperBlock& h, const EmuTmaCopy& c);
// Whether the phase of parity `parity` has completed, i.e. the current (incomplete) phase has the other parity;
// lands the barrier's TMA copies first when it has not (emu_hop.mu held).
inline bool emu_mbar_test(EmuHopperBlock& h, uint64_t* bar, uint32_t parity, const char* what) {
  if (parity > 1) emu_hop_fail("%s: parity %u is not 0 or 1", what, parity);
  EmuMbar& b = emu_mbar(h, bar, what);
  if ((b.phase & 1) != parity) return true;
  if (!b.copies.empty()) {
    std::vector<EmuTmaCopy> copies;
    copies.swap(b.copies);
    for (const EmuTmaCopy& c : copies) {
      emu_tma_land(h, c);
      b.tx -= c.bytes;  // complete_tx
      emu_mbar_complete_if_done(b);
    }
    ++emu_hop_progress;
    h.cv.notify_all();
  }
  return (b.phase & 1) != parity;
}
inline void emu_mbar_deadlock(EmuHopperBlock& h, uint64_t* bar, uint32_t parity, const char* what) {
  EmuMbar& b = emu_mbar(h, bar, what);
  emu_hop_fail("%s: deadlock or wrong phase: no way on for the mbarrier at 0x%x and the phase of parity %u; its "
               "current phase is %lu (parity %lu) with %ld of %u arrivals and %ld transaction bytes outstanding",
               what, smem_u32(bar), parity, (unsigned long)b.phase, (unsigned long)(b.phase & 1), (long)b.pending,
               b.count, (long)b.tx);
}
inline void mbarrier_wait(uint64_t* bar, uint32_t parity) {
  EmuHopperBlock& h = emu_hop_block();
  std::unique_lock<std::mutex> l(h.mu);
  EmuStuck stuck;
  while (!emu_mbar_test(h, bar, parity, "mbarrier_wait")) {
    ++emu_hop_blocked;
    h.cv.wait_for(l, std::chrono::milliseconds(100));
    --emu_hop_blocked;
    if (!emu_mbar_test(h, bar, parity, "mbarrier_wait") && stuck.expired())
      emu_mbar_deadlock(h, bar, parity, "mbarrier_wait");
  }
  ++emu_hop_progress;
}
inline bool mbarrier_try_wait(uint64_t* bar, uint32_t parity) {
  const bool spinning = emu_spin.active;  // emu_hop_block() ends the count: EmuStuck::expired counts the caller
  EmuHopperBlock& h = emu_hop_block();
  std::unique_lock<std::mutex> l(h.mu);
  const uint32_t a = smem_u32(bar);
  const bool same_spin = spinning && emu_spin.addr == a && emu_spin.parity == parity;
  bool done = emu_mbar_test(h, bar, parity, "mbarrier_try_wait");
  if (!done) {
    ++emu_hop_blocked;
    h.cv.wait_for(l, std::chrono::milliseconds(5));
    --emu_hop_blocked;
    done = emu_mbar_test(h, bar, parity, "mbarrier_try_wait");
  }
  if (done) {
    ++emu_hop_progress;
    return true;
  }
  if (!same_spin) {
    emu_spin.addr = a;
    emu_spin.parity = parity;
    emu_spin.stuck = EmuStuck();
  } else if (emu_spin.stuck.expired()) {
    emu_mbar_deadlock(h, bar, parity, "mbarrier_try_wait (spun on)");
  }
  emu_spin.active = true;
  ++emu_hop_blocked;
  return false;
}

// ---------------------------------------------------------------------------------------------------------------
// TMA
// Host: the cuTensorMapEncodeTiled stand-in, with the driver's documented requirements (cuda.h), and one limit of
// the emulation: a swizzled box's inner dimension must be exactly the swizzle span.
enum class TmaElement : int { kF16, kBF16, kF32, kU8, kU32 };
enum class TmaSwizzle : int { kNone, k32B, k64B, k128B };
inline const char* encode_tensor_map(TensorMap* map, TmaElement element, int rank, const void* base,
                                     const uint64_t* dims, const uint64_t* byte_strides, const uint32_t* box,
                                     TmaSwizzle swizzle) {
  if (reinterpret_cast<uintptr_t>(map) % 64 != 0) return "the tensor map must be 64-byte aligned";
  if (rank < 1 || rank > 5) return "tensor map rank must be 1..5";
  const int e = static_cast<int>(element), s = static_cast<int>(swizzle);
  if (e < 0 || e > 4) return "unknown element type";
  if (s < 0 || s > 3) return "unknown swizzle mode";
  static constexpr int kElementBytes[] = {2, 2, 4, 1, 4}, kSpan[] = {0, 32, 64, 128};
  const int esize = kElementBytes[e], span = kSpan[s];
  if (reinterpret_cast<uintptr_t>(base) % 16 != 0) return "globalAddress must be 16-byte aligned";
  EmuTmaDesc d{};
  d.magic = kEmuTmaMagic;
  d.base = static_cast<const uint8_t*>(base);
  d.rank = rank;
  d.esize = esize;
  d.span = span;
  for (int i = 0; i < rank; ++i) {
    if (dims[i] == 0 || dims[i] > (uint64_t(1) << 32)) return "globalDim must be 1..2^32";
    if (box[i] == 0 || box[i] > 256) return "boxDim must be 1..256";
    d.dims[i] = dims[i];
    d.box[i] = box[i];
    if (i > 0) {
      if (byte_strides[i - 1] % 16 != 0 || byte_strides[i - 1] >= (uint64_t(1) << 40))
        return "globalStrides must be multiples of 16 and below 2^40";
      d.strides[i - 1] = byte_strides[i - 1];
    }
  }
  if (box[0] * esize % 16 != 0) return "boxDim[0] * element size must be a multiple of 16 bytes";
  if (span != 0 && box[0] * esize > uint32_t(span)) return "the box's inner dimension exceeds the swizzle span";
  if (span != 0 && box[0] * esize != uint32_t(span))
    return "emulator: a swizzled box's inner dimension must equal the swizzle span (narrower boxes not emulated)";
  static_assert(sizeof(TensorMap) >= sizeof(EmuTmaDesc), "TensorMap too small");
  memset(map, 0, sizeof(TensorMap));
  memcpy(map, &d, sizeof d);
  return nullptr;
}

inline EmuTmaDesc emu_tma_desc(const TensorMap* map, const char* what) {
  EmuTmaDesc d;
  memcpy(&d, map, sizeof d);
  if (d.magic != kEmuTmaMagic) emu_hop_fail("%s: the tensor map was not filled by encode_tensor_map", what);
  return d;
}
inline void tma_prefetch_descriptor(const TensorMap* map) { (void)emu_tma_desc(map, "tma_prefetch_descriptor"); }

inline uint32_t emu_tma_box_bytes(const EmuTmaDesc& m) {
  uint32_t n = uint32_t(m.esize);
  for (int i = 0; i < m.rank; ++i) n *= m.box[i];
  return n;
}
// Writes the box: element (x0, x1, ...) of the box at dense offset ((.. x2) box1 + x1) box0 + x0, swizzled on the
// shared-window address, zero where any coordinate is outside the tensor (emu_hop.mu held).
inline void emu_tma_land(EmuHopperBlock& h, const EmuTmaCopy& c) {
  const EmuTmaDesc& m = c.map;
  uint8_t* dst = emu_smem_at(c.dst, c.bytes, "TMA load");
  const uint32_t rows = c.bytes / (m.box[0] * m.esize);
  for (uint32_t r = 0; r < rows; ++r) {
    int64_t coord[5];
    coord[0] = c.c[0];
    uint32_t rest = r;
    bool inside = true;
    int64_t row_off = 0;  // bytes from the base (formed into a pointer only inside the tensor)
    for (int i = 1; i < m.rank; ++i) {
      coord[i] = int64_t(c.c[i]) + rest % m.box[i];
      rest /= m.box[i];
      inside &= coord[i] >= 0 && coord[i] < int64_t(m.dims[i]);
      row_off += coord[i] * int64_t(m.strides[i - 1]);
    }
    for (uint32_t x = 0; x < m.box[0]; ++x) {
      const int64_t cx = int64_t(c.c[0]) + x;
      const uint32_t off = (r * m.box[0] + x) * uint32_t(m.esize);
      uint8_t* to = dst + (emu_swizzle(c.dst + off, uint32_t(m.span)) - c.dst);
      if (inside && cx >= 0 && cx < int64_t(m.dims[0]))
        memcpy(to, m.base + row_off + cx * m.esize, m.esize);
      else
        memset(to, 0, m.esize);
    }
  }
  for (uint32_t o = 0; o < c.bytes; o += 16) h.tma_writers[emu_chunk_of(c.dst + o)].fetch_sub(1);
  --h.copies_in_flight;
}

inline void emu_tma_load(void* smem, const TensorMap* map, uint64_t* bar, int dim, const int* coords) {
  EmuHopperBlock& h = emu_hop_block();
  EmuTmaCopy c{};
  c.map = emu_tma_desc(map, "tma_load");
  if (c.map.rank != dim) emu_hop_fail("tma_load_%dd with a tensor map of rank %d", dim, c.map.rank);
  for (int i = 0; i < dim; ++i) c.c[i] = coords[i];
  c.dst = smem_u32(smem);
  c.bytes = emu_tma_box_bytes(c.map);
  // cp.async.bulk.tensor: the shared destination is 128-byte aligned; the emulator also asks a swizzled box to start
  // on its pattern's repeat (1024 / 512 / 256 bytes), as the wgmma canonical layouts with base offset 0 assume.
  if (c.dst % 128 != 0) emu_hop_fail("tma_load: shared destination 0x%x is not 128-byte aligned", c.dst);
  if (c.map.span != 0 && c.dst % (8 * c.map.span) != 0)
    emu_hop_fail("tma_load: shared destination 0x%x of a %dB-swizzled box is not aligned to the %d-byte repeat of the "
                 "swizzle pattern (align the tiles)",
                 c.dst, c.map.span, 8 * c.map.span);
  (void)emu_smem_at(c.dst, c.bytes, "tma_load destination");
  std::lock_guard<std::mutex> l(h.mu);
  EmuMbar& b = emu_mbar(h, bar, "tma_load");
  if (!b.fenced)
    emu_hop_fail("tma_load: its mbarrier (0x%x) was initialised without mbarrier_init_fence() after the init",
                 smem_u32(bar));
  for (const auto& [addr, other] : h.bars)
    if (addr + 8 > c.dst && addr < c.dst + c.bytes)
      emu_hop_fail("tma_load: the box [0x%x, 0x%x) overlaps the mbarrier at 0x%x", c.dst, c.dst + c.bytes, addr);
  for (uint32_t o = 0; o < c.bytes; o += 16)
    if (h.wg_readers[emu_chunk_of(c.dst + o)].load() > 0)
      emu_hop_fail("tma_load: the box at 0x%x overwrites shared memory (0x%x) that a wgmma not yet retired by a "
                   "wgmma_wait reads",
                   c.dst, c.dst + o);
  for (uint32_t o = 0; o < c.bytes; o += 16)
    if (h.tma_writers[emu_chunk_of(c.dst + o)].fetch_add(1) > 0)
      emu_hop_fail("tma_load: the box at 0x%x overwrites shared memory (0x%x) that another TMA load in flight (not "
                   "yet waited for) writes",
                   c.dst, c.dst + o);
  ++h.copies_in_flight;
  ++emu_hop_progress;
  if (emu_tma_eager) {
    emu_tma_land(h, c);
    b.tx -= c.bytes;
    emu_mbar_complete_if_done(b);
  } else {
    b.copies.push_back(c);
  }
  h.cv.notify_all();
}
inline void tma_load_2d(void* smem, const TensorMap* map, uint64_t* bar, int c0, int c1) {
  const int c[2] = {c0, c1};
  emu_tma_load(smem, map, bar, 2, c);
}
inline void tma_load_3d(void* smem, const TensorMap* map, uint64_t* bar, int c0, int c1, int c2) {
  const int c[3] = {c0, c1, c2};
  emu_tma_load(smem, map, bar, 3, c);
}

// ---------------------------------------------------------------------------------------------------------------
// wgmma
// Shared-window byte address of element (mn, k), k < 16, of a 16-bit operand (T = 8 elements per 16 bytes) from
// its matrix descriptor (PTX ISA "Matrix Descriptor Format": start address bits 0-13, leading dimension byte offset
// 16-29, stride dimension byte offset 32-45, each >> 4; base offset 49-51; swizzle 62-63: 0 none, 1 128B, 2 64B,
// 3 32B) and the canonical layouts ("Shared Memory Matrix Layout"), span S = the swizzle's bytes:
//   K-major  none : ((8,m),(T,2)):((1T,SBO),(1,LBO))        -> (mn%8)*16 + (mn/8)*SBO + (k%8)*2 + (k/8)*LBO
//   K-major  S    : ((8,m),(T,2)):((S/2,SBO),(1,T))         -> (mn%8)*S  + (mn/8)*SBO + k*2
//   MN-major none : ((T,1,m),(8,k)):((1,T,SBO),(1T,LBO))    -> (mn%8)*2  + (mn/8)*SBO + (k%8)*16 + (k/8)*LBO
//   MN-major S    : ((T,S/16,m),(8,k)):((1,T,LBO),(S/2,SBO)) -> (mn%(S/2))*2 + (mn/(S/2))*LBO + (k%8)*S + (k/8)*SBO
// then Sw<B,4,3> on the address (S = 16 << B).
inline uint32_t emu_desc_addr(uint64_t desc, bool k_major, int mn, int k) {
  const uint32_t start = uint32_t(desc & 0x3FFF) << 4;
  const uint32_t lbo = uint32_t((desc >> 16) & 0x3FFF) << 4;
  const uint32_t sbo = uint32_t((desc >> 32) & 0x3FFF) << 4;
  const uint32_t mode = uint32_t(desc >> 62);
  const uint32_t span = mode == 1 ? 128 : mode == 2 ? 64 : mode == 3 ? 32 : 0;
  const uint32_t m = uint32_t(mn), kk = uint32_t(k);
  uint32_t off;
  if (k_major)
    off = span == 0 ? (m % 8) * 16 + (m / 8) * sbo + (kk % 8) * 2 + (kk / 8) * lbo : (m % 8) * span + (m / 8) * sbo + kk * 2;
  else
    off = span == 0 ? (m % 8) * 2 + (m / 8) * sbo + (kk % 8) * 16 + (kk / 8) * lbo
                    : (m % (span / 2)) * 2 + (m / (span / 2)) * lbo + (kk % 8) * span + (kk / 8) * sbo;
  return emu_swizzle(start + off, span);
}
inline void emu_check_desc(uint64_t desc, const char* which) {
  if ((desc >> 49) & 7)
    emu_hop_fail("wgmma: descriptor of %s has base offset %u: only base offset 0 is emulated", which,
                 unsigned((desc >> 49) & 7));
}
inline double emu_b16_at(uint32_t addr, bool bf16) {
  uint16_t bits;
  memcpy(&bits, emu_smem_at(addr, 2, "wgmma operand"), 2);
  if (bf16) {
    __nv_bfloat16 v;
    memcpy(&v, &bits, 2);
    return emu_to_double(v);
  }
  __half v;
  memcpy(&v, &bits, 2);
  return emu_to_double(v);
}
inline int emu_wg_tag(bool bf16, int n, bool trans, bool rs) {
  return (bf16 ? 2 : 1) | (trans ? 4 : 0) | (rs ? 8 : 0) | (n << 4);
}

inline void wgmma_fence() { emu_wg("wgmma_fence").th[threadIdx.x % 128].fenced = true; }
inline void wgmma_commit() { ++emu_wg("wgmma_commit").th[threadIdx.x % 128].committed; }

template <typename T, int N, bool kTransB>
inline void emu_wgmma_issue(float (&d)[N / 2], const uint32_t* a, uint64_t desc_a, uint64_t desc_b,
                            bool accumulate) {
  static_assert(N == 16 || N == 32 || N == 64 || N == 128 || N == 256, "N in {16, 32, 64, 128, 256}");
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "f16 or bf16");
  constexpr bool bf16 = std::is_same_v<T, __nv_bfloat16>;
  EmuWarpgroup& g = emu_wg("wgmma");
  EmuWgThread& me = g.th[threadIdx.x % 128];
  if (!me.fenced) emu_hop_fail("wgmma issued without a wgmma_fence() since the warpgroup's last wgmma_wait");
  if (a == nullptr) emu_check_desc(desc_a, "A");
  emu_check_desc(desc_b, "B");
  EmuWgRecord r;
  r.tag = emu_wg_tag(bf16, N, kTransB, a != nullptr);
  r.da = a == nullptr ? desc_a : 0;
  r.db = desc_b;
  r.scale_d = accumulate;
  r.batch = me.committed;
  if (a != nullptr) memcpy(r.a, a, 16); else memset(r.a, 0, 16);
  r.d = d;
  r.has_expect = true;
  for (const EmuWgRecord& o : me.recs)
    if (o.d == r.d) r.has_expect = false;  // an earlier pending wgmma writes d first: it sets `expect` then
  if (r.has_expect) memcpy(r.expect, d, sizeof(float) * (N / 2));
  if (threadIdx.x % 128 == 0) {  // the leader books the operands' 16-byte chunks (TMA race check)
    for (int mn = 0; mn < 64 && a == nullptr; ++mn)
      for (int k = 0; k < 16; k += 8) r.chunks.push_back(emu_chunk_of(emu_desc_addr(desc_a, true, mn, k)));
    for (int mn = 0; mn < N; ++mn)
      for (int k = 0; k < 16; ++k)
        if (kTransB ? mn % 8 == 0 : k % 8 == 0) r.chunks.push_back(emu_chunk_of(emu_desc_addr(desc_b, !kTransB, mn, k)));
    std::sort(r.chunks.begin(), r.chunks.end());
    r.chunks.erase(std::unique(r.chunks.begin(), r.chunks.end()), r.chunks.end());
    EmuHopperBlock& h = emu_hop_block();
    for (uint32_t c : r.chunks) {
      if (c >= h.chunks) emu_hop_fail("wgmma: an operand lies outside the dynamic shared memory");
      if (h.tma_writers[c].load() > 0)
        emu_hop_fail("wgmma issued on shared memory (0x%x) that a TMA load in flight still writes (wait on its "
                     "mbarrier first)",
                     uint32_t(kEmuSmemWindowBase + 16 * c));
      h.wg_readers[c].fetch_add(1);
    }
  }
  me.recs.push_back(std::move(r));
}
template <typename T, int N, bool kTransB>
inline void wgmma_ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
  emu_wgmma_issue<T, N, kTransB>(d, nullptr, desc_a, desc_b, accumulate);
}
template <typename T, int N, bool kTransB>
inline void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b, bool accumulate) {
  emu_wgmma_issue<T, N, kTransB>(d, a, 0, desc_b, accumulate);
}

// Leader of a warpgroup collective (the other threads wait at the group barrier): every thread issued the same.
inline void emu_wg_check_same_op(EmuWarpgroup& g, unsigned group, const char* what) {
  for (int t = 1; t < 128; ++t)
    if (g.th[t].op != g.th[0].op || g.th[t].op_arg != g.th[0].op_arg)
      emu_hop_fail("%s: threads %u and %u of warpgroup %u disagree (op %d/%ld vs %d/%ld: every thread of the "
                   "warpgroup must issue the same warpgroup instruction)",
                   what, group * 128, group * 128 + t, group, g.th[0].op, g.th[0].op_arg, g.th[t].op, g.th[t].op_arg);
}
// Leader, in wgmma_wait: checks that the 128 threads issued the same wgmmas and commits, then decodes the operands
// of the wgmmas the wait executes (shared memory is read now).
inline void emu_wg_prepare(EmuWarpgroup& g, unsigned group, int pending_allowed) {
  emu_wg_check_same_op(g, group, "wgmma_wait");
  const EmuWgThread& t0 = g.th[0];
  for (int t = 1; t < 128; ++t) {
    const EmuWgThread& o = g.th[t];
    bool same = o.committed == t0.committed && o.retired == t0.retired && o.recs.size() == t0.recs.size();
    size_t i = 0;
    for (; same && i < o.recs.size(); ++i)
      same = o.recs[i].tag == t0.recs[i].tag && o.recs[i].da == t0.recs[i].da && o.recs[i].db == t0.recs[i].db &&
             o.recs[i].scale_d == t0.recs[i].scale_d && o.recs[i].batch == t0.recs[i].batch;
    if (!same)
      emu_hop_fail("wgmma_wait: threads %u and %u of warpgroup %u issued different wgmma sequences (%zu vs %zu pending "
                   "wgmmas, %ld vs %ld commits; first difference at pending wgmma %zu)",
                   group * 128, group * 128 + t, group, t0.recs.size(), o.recs.size(), t0.committed, o.committed,
                   i == 0 ? 0 : i - 1);
  }
  const long pending = t0.committed - t0.retired;
  g.land_batches = pending > pending_allowed ? pending - pending_allowed : 0;
  g.n_landing = 0;
  EmuHopperBlock& h = emu_hop_block();
  for (const EmuWgRecord& r : t0.recs) {
    if (r.batch >= t0.retired + g.land_batches) break;
    if (g.landing.size() <= g.n_landing) g.landing.emplace_back(new EmuWgLanding);
    EmuWgLanding& L = *g.landing[g.n_landing++];
    const bool bf16 = (r.tag & 3) == 2, trans = r.tag & 4, rs = r.tag & 8;
    L.n = r.tag >> 4;
    L.scale_d = r.scale_d;
    for (uint32_t c : r.chunks)
      if (h.tma_writers[c].load() > 0)
        emu_hop_fail("wgmma_wait: a wgmma reads shared memory (0x%x) that a TMA load still in flight writes",
                     uint32_t(kEmuSmemWindowBase + 16 * c));
    if (rs) {
      // Warp w holds rows 16w..16w+15 in the m16n8k16 A fragment: element i (half i % 2 of register i / 2) of lane
      // l is row l/4 (+8 for i in {2,3,6,7}), column 2 (l % 4) + i % 2 (+8 for i >= 4).
      for (int t = 0; t < 128; ++t) {
        const int w = t / 32, l = t % 32;
        for (int i = 0; i < 8; ++i) {
          const uint32_t reg = g.th[t].recs[&r - &t0.recs[0]].a[i / 2];
          const uint16_t bits = uint16_t(i % 2 ? reg >> 16 : reg & 0xFFFF);
          double v;
          if (bf16) { __nv_bfloat16 x; memcpy(&x, &bits, 2); v = emu_to_double(x); }
          else { __half x; memcpy(&x, &bits, 2); v = emu_to_double(x); }
          L.A[16 * w + l / 4 + 8 * ((i / 2) % 2)][2 * (l % 4) + i % 2 + 8 * (i / 4)] = v;
        }
      }
    } else {
      for (int m = 0; m < 64; ++m)
        for (int k = 0; k < 16; ++k) L.A[m][k] = emu_b16_at(emu_desc_addr(r.da, true, m, k), bf16);
    }
    for (int n = 0; n < L.n; ++n)
      for (int k = 0; k < 16; ++k) L.B[k][n] = emu_b16_at(emu_desc_addr(r.db, !trans, n, k), bf16);
    for (uint32_t c : r.chunks) h.wg_readers[c].fetch_sub(1);
  }
}
// Every thread, after the leader's prepare: executes its part of the landing wgmmas (its accumulators) in order.
// Accumulator fragment (PTX ISA "Register Fragments" of wgmma .m64nNk16, D): d[4 j + i] of lane l in warp w is row
// 16 w + l / 4 + 8 (i / 2), column 8 j + 2 (l % 4) + i % 2.
inline void emu_wg_land_mine(EmuWarpgroup& g, EmuWgThread& me) {
  const int t = int(threadIdx.x % 128), w = t / 32, l = t % 32;
  for (size_t o = 0; o < g.n_landing; ++o) {
    EmuWgRecord& r = me.recs[o];
    const EmuWgLanding& L = *g.landing[o];
    if (!r.has_expect || memcmp(r.expect, r.d, sizeof(float) * (L.n / 2)) != 0)
      emu_hop_fail("wgmma: the accumulator registers of a pending wgmma were written before the wgmma_wait that "
                   "retires it");
    float out[128];
    for (int j = 0; j < L.n / 8; ++j)
      for (int i = 0; i < 4; ++i) {
        const int row = 16 * w + l / 4 + 8 * (i / 2), col = 8 * j + 2 * (l % 4) + i % 2;
        double s = L.scale_d ? double(r.d[4 * j + i]) : 0.0;
        for (int k = 0; k < 16; ++k) s += L.A[row][k] * L.B[k][col];
        out[4 * j + i] = float(s);
      }
    memcpy(r.d, out, sizeof(float) * (L.n / 2));
    for (size_t later = o + 1; later < me.recs.size(); ++later)
      if (me.recs[later].d == r.d) {
        me.recs[later].has_expect = true;
        memcpy(me.recs[later].expect, r.d, sizeof(float) * ((me.recs[later].tag >> 4) / 2));
        break;
      }
  }
  me.recs.erase(me.recs.begin(), me.recs.begin() + long(g.n_landing));
  me.retired += g.land_batches;
}

template <int kPending>
inline void wgmma_wait() {
  static_assert(kPending >= 0 && kPending <= 7, "wgmma.wait_group N in 0..7");
  EmuWarpgroup& g = emu_wg("wgmma_wait");
  const unsigned group = threadIdx.x / 128;
  EmuWgThread& me = g.th[threadIdx.x % 128];
  me.op = kEmuWgWait;
  me.op_arg = kPending;
  g.bar.arrive_and_wait(group, "wgmma_wait");
  if (threadIdx.x % 128 == 0) emu_wg_prepare(g, group, kPending);
  g.bar.arrive_and_wait(group, "wgmma_wait");
  emu_wg_land_mine(g, me);
  me.fenced = false;
}

// ---------------------------------------------------------------------------------------------------------------
// setmaxnreg: no effect on the emulation; every thread of the warpgroup must issue the same one.
inline void emu_setmaxnreg(int regs, bool inc) {
  EmuWarpgroup& g = emu_wg("setmaxnreg");
  const unsigned group = threadIdx.x / 128;
  EmuWgThread& me = g.th[threadIdx.x % 128];
  me.op = inc ? kEmuWgRegInc : kEmuWgRegDec;
  me.op_arg = regs;
  g.bar.arrive_and_wait(group, "setmaxnreg");
  if (threadIdx.x % 128 == 0) emu_wg_check_same_op(g, group, "setmaxnreg");
  g.bar.arrive_and_wait(group, "setmaxnreg");
}
template <int kRegs>
inline void setmaxnreg_inc() {
  static_assert(kRegs >= 24 && kRegs <= 256 && kRegs % 8 == 0, "setmaxnreg: 24..256, a multiple of 8");
  emu_setmaxnreg(kRegs, true);
}
template <int kRegs>
inline void setmaxnreg_dec() {
  static_assert(kRegs >= 24 && kRegs <= 256 && kRegs % 8 == 0, "setmaxnreg: 24..256, a multiple of 8");
  emu_setmaxnreg(kRegs, false);
}

// ---------------------------------------------------------------------------------------------------------------
// Launch hooks (fake/cuda_runtime_api.h): each thread checks its warpgroup's wgmmas when its kernel returns, thread
// 0 checks the TMA loads when the block is done and drops the block's state.
inline void emu_hopper_thread_end() {
  emu_spin_leave();  // left its spin loop some other way; it is counted as done now
  emu_spin = EmuSpin{};
  EmuHopperBlock* h = emu_hop.load(std::memory_order_acquire);
  if (h == nullptr || threadIdx.x / 128 >= h->groups.size()) return;
  const EmuWgThread& me = h->groups[threadIdx.x / 128]->th[threadIdx.x % 128];
  if (!me.recs.empty() || me.committed != me.retired)
    emu_hop_fail("kernel exit with %ld wgmma batches (%zu wgmmas) pending: missing wgmma_wait<0>() or "
                 "wgmma_commit()",
                 me.committed - me.retired, me.recs.size());
}
inline void emu_hopper_block_end() {
  emu_hop_blocked.store(0);
  EmuHopperBlock* h = emu_hop.exchange(nullptr);
  if (h == nullptr) return;
  if (h->copies_in_flight != 0)
    emu_hop_fail("block exit with %zu TMA loads in flight (issued, never waited for)", h->copies_in_flight);
  delete h;
}
inline const bool emu_hopper_hooks = [] {
  emu_thread_end_hook = emu_hopper_thread_end;
  emu_block_begin_hook = emu_hopper_block_end;  // drops a state left by an aborted-free earlier launch, if any
  emu_block_end_hook = emu_hopper_block_end;
  return true;
}();
