// Fake CUDA runtime for CPU emulation of kernels (testing only; tools/cuda_emu/README.md).
// Each block runs as blockDim.x std::threads; __syncthreads is a std::barrier over the block, warp-collective
// operations (__shfl_*_sync, __syncwarp, and the emulated ldmatrix / mma in ptx_emu.h) rendezvous on a per-warp
// barrier. Dynamic shared memory is a per-block heap buffer of exactly the launch's size (ASan sees overruns),
// filled with 0xFF bytes (NaN in fp16/bf16) before each block so reads of never-written smem are visible.
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __grid_constant__

enum cudaError { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
typedef cudaError cudaError_t;
typedef void* cudaStream_t;
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
struct uint3e { unsigned x = 0, y = 0, z = 0; };
struct dim3 { unsigned x, y, z; dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };
struct int4 { int x, y, z, w; };
struct uint2 { unsigned x, y; };
struct uint4 { unsigned x, y, z, w; };
inline thread_local uint3e threadIdx, blockIdx;
inline thread_local dim3 gridDim, blockDim;
inline std::barrier<>* emu_block_barrier = nullptr;

// Per-warp rendezvous state. `vals` serves __shfl_xor_sync (two barriers per call); the `op` slots serve the
// emulated warp-collective PTX (one barrier per call, double-buffered by the lanes' op parity).
struct EmuWarpOp {
  int tag;            // which instruction
  long seq;           // the lane's count of warp ops so far: all 32 lanes must agree
  uint32_t a[4];      // mma A registers
  uint32_t b[2];      // mma B registers
  float c[4];         // mma C registers
  const void* ptr;    // ldmatrix row address
};
struct EmuWarp { std::barrier<>* bar; float vals[32]; EmuWarpOp op[2][32]; };
inline std::vector<std::unique_ptr<EmuWarp>> emu_warps;
inline thread_local long emu_warp_seq = 0;
inline int emu_sms = 4;
inline int emu_smem_optin = 227 * 1024;     // cudaDevAttrMaxSharedMemoryPerBlockOptin (H100)
inline bool emu_check_ldg_align = true;
inline uint8_t* emu_dyn_smem = nullptr;       // this block's dynamic shared memory
inline size_t emu_dyn_smem_bytes = 0;
inline std::map<const void*, int> emu_func_max_dyn_smem;  // cudaFuncSetAttribute opt-ins

// Barrier intervals ("epochs") of each thread, for the shared-memory race check: a cp.async into a 16-byte chunk
// that another warp read (ldmatrix) in the same interval, with no __syncthreads between, is a race.
inline thread_local uint32_t emu_epoch = 0;
inline std::vector<std::atomic<uint64_t>>* emu_smem_reads = nullptr;  // per 16 B chunk: epoch << 32 | reader warp + 1
inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); ++emu_epoch; }
// __syncthreads_or: call n of the block (every thread counts its calls) ORs into flag n % 3; after the barrier thread
// 0 clears flag (n + 2) % 3, the previous call's, whose readers are all past it and whose next writers (call n + 2)
// wait for thread 0 at the barrier of call n + 1. emu_launch clears the flags and the count for each block.
inline std::atomic<int> emu_sync_or_flags[3];
inline thread_local long emu_sync_or_calls = 0;
inline int __syncthreads_or(int pred) {
  const long n = emu_sync_or_calls++;
  if (pred) emu_sync_or_flags[n % 3].store(1);
  __syncthreads();
  const int any = emu_sync_or_flags[n % 3].load();
  if (threadIdx.x == 0) emu_sync_or_flags[(n + 2) % 3].store(0);
  return any;
}
inline void emu_note_smem_read(const void* p) {
  const size_t chunk = (static_cast<const uint8_t*>(p) - emu_dyn_smem) / 16;
  const uint64_t mine = (uint64_t(emu_epoch) << 32) | (threadIdx.x / 32 + 1);
  auto& slot = (*emu_smem_reads)[chunk];
  uint64_t old = slot.load(std::memory_order_relaxed);
  for (;;) {
    // Another reader in the same interval: remember "several" (reader 0) so any writer conflicts.
    const uint64_t want = (old >> 32) == emu_epoch && (old & 0xFFFFFFFFu) != (threadIdx.x / 32 + 1)
                              ? (uint64_t(emu_epoch) << 32) : mine;
    if (slot.compare_exchange_weak(old, want, std::memory_order_relaxed)) break;
  }
}
inline void emu_check_smem_write(const void* p, const char* what) {
  const size_t chunk = (static_cast<const uint8_t*>(p) - emu_dyn_smem) / 16;
  const uint64_t v = (*emu_smem_reads)[chunk].load(std::memory_order_relaxed);
  if ((v >> 32) == emu_epoch && (v & 0xFFFFFFFFu) != (threadIdx.x / 32 + 1)) {
    fprintf(stderr, "%s: smem race, thread %u overwrites a chunk another warp read since the last barrier\n", what,
            threadIdx.x);
    abort();
  }
}
inline float __shfl_xor_sync(unsigned, float v, int off) {
  EmuWarp& w = *emu_warps[threadIdx.x / 32];
  int lane = threadIdx.x % 32;
  w.vals[lane] = v;
  w.bar->arrive_and_wait();
  float r = w.vals[lane ^ off];
  w.bar->arrive_and_wait();
  return r;
}
// Full-warp shuffle by source lane (the kernels only use the full mask).
inline float __shfl_sync(unsigned, float v, int src) {
  EmuWarp& w = *emu_warps[threadIdx.x / 32];
  int lane = threadIdx.x % 32;
  w.vals[lane] = v;
  w.bar->arrive_and_wait();
  float r = w.vals[src & 31];
  w.bar->arrive_and_wait();
  return r;
}
// int overload (dllm.cu shuffles argmax indices): the bits travel through the float exchange unchanged.
inline int __shfl_xor_sync(unsigned mask, int v, int off) {
  float f;
  memcpy(&f, &v, 4);
  f = __shfl_xor_sync(mask, f, off);
  int r;
  memcpy(&r, &f, 4);
  return r;
}
inline void __syncwarp(unsigned = 0xffffffffu) { emu_warps[threadIdx.x / 32]->bar->arrive_and_wait(); }
inline float exp2f(float x) { return std::exp2(x); }
inline float log2f(float x) { return std::log2(x); }
inline int __ldg(const int* p) { return *p; }
inline int4 __ldg(const int4* p) {
  if (emu_check_ldg_align && reinterpret_cast<uintptr_t>(p) % 16 != 0) { fprintf(stderr, "misaligned int4 load\n"); abort(); }
  return *p;
}
inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; memcpy(&i, &f, 4); return i; }
// CUDA Math API: result byte n = byte s[4n + 2 : 4n] of the 8-byte value {y (bytes 4-7), x (bytes 0-3)}.
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t v = (uint64_t(y) << 32) | x;
  unsigned r = 0;
  for (int n = 0; n < 4; ++n) r |= unsigned((v >> (8 * ((s >> (4 * n)) & 7))) & 0xFF) << (8 * n);
  return r;
}
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) { memset(p, v, n); return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  *v = a == cudaDevAttrMaxSharedMemoryPerBlockOptin ? emu_smem_optin : emu_sms;
  return cudaSuccess;
}
template <typename F>
cudaError_t cudaFuncSetAttribute(F* f, cudaFuncAttribute, int v) {
  if (v > emu_smem_optin) return cudaErrorInvalidValue;
  emu_func_max_dyn_smem[reinterpret_cast<const void*>(f)] = v;
  return cudaSuccess;
}
inline long emu_launches = 0;
// Hooks of optional emulation layers (hopper_emu.h sets them): thread 0 before each block (its state is fresh),
// every thread after its kernel call returns, thread 0 after each block (all its threads are done).
inline void (*emu_block_begin_hook)() = nullptr;
inline void (*emu_thread_end_hook)() = nullptr;
inline void (*emu_block_end_hook)() = nullptr;
inline std::atomic<unsigned> emu_block_threads_done{0};  // threads of the current block whose kernel call returned
// Dynamic shared memory starts 128 bytes past a 1024-byte boundary (the buffer's end stays the allocation's end, so
// ASan's redzone follows the last byte): a kernel that needs 1024-byte alignment (swizzled TMA tiles) must align
// itself, as on the GPU, where nothing promises more than 16 bytes.
constexpr size_t kEmuSmemMisalign = 128;

// cp.async bookkeeping of one thread (ptx_emu.h): copies wait in `pending` until a wait_group retires their group.
struct EmuCopy { uint8_t* dst; const uint8_t* src; bool full; };
struct EmuCpAsync { std::vector<EmuCopy> pending; std::vector<size_t> group_end; };
inline thread_local EmuCpAsync emu_cp;
inline std::atomic<long> emu_cp_left_at_exit{0};

struct EmuCfg {
  dim3 grid, block; size_t smem;
  EmuCfg(dim3 g, dim3 b, size_t s = 0, cudaStream_t = nullptr) : grid(g), block(b), smem(s) {}
};
// `kernel` is a function pointer, or (gen_emu.py) a lambda wrapping a kernel template whose arguments are deduced
// at the call. A lambda has no address cudaFuncSetAttribute could have seen, so it may not use > 48 KiB.
template <typename F, typename... A>
void emu_launch(EmuCfg cfg, F kernel, A... args) {
  ++emu_launches;
  if (cfg.smem > 48 * 1024) {
    const void* key = nullptr;
    if constexpr (std::is_pointer_v<F>) key = reinterpret_cast<const void*>(kernel);
    auto it = emu_func_max_dyn_smem.find(key);
    if (it == emu_func_max_dyn_smem.end() || size_t(it->second) < cfg.smem) {
      fprintf(stderr, "launch with %zu B dynamic smem without the cudaFuncSetAttribute opt-in\n", cfg.smem); abort();
    }
  }
  if (cfg.smem > size_t(emu_smem_optin)) { fprintf(stderr, "launch exceeds the smem opt-in limit\n"); abort(); }
  if (cfg.grid.x == 0 || cfg.grid.y == 0 || cfg.grid.z == 0 || cfg.grid.y > 65535 || cfg.grid.z > 65535) {
    fprintf(stderr, "bad grid\n"); abort();
  }
  // One std::thread per CUDA thread for the whole launch, running the blocks one after the other (creating
  // threads per block made thread start-up most of the run time). Thread 0 prepares each block's fresh state
  // between two block-wide barriers.
  const unsigned nt = cfg.block.x;
  const size_t smem_bytes = cfg.smem > 0 ? cfg.smem : 1;
  void* smem_alloc = nullptr;
  if (posix_memalign(&smem_alloc, 1024, smem_bytes + kEmuSmemMisalign) != 0) abort();
  void* smem = static_cast<uint8_t*>(smem_alloc) + kEmuSmemMisalign;
  emu_dyn_smem = cfg.smem > 0 ? static_cast<uint8_t*>(smem) : nullptr;
  emu_dyn_smem_bytes = cfg.smem;
  std::vector<std::atomic<uint64_t>> reads(cfg.smem / 16 + 1);
  emu_smem_reads = &reads;
  std::barrier<> bar(nt);
  emu_block_barrier = &bar;
  emu_warps.clear();
  std::vector<std::unique_ptr<std::barrier<>>> wb;
  for (unsigned w = 0; w < nt / 32; ++w) {
    wb.emplace_back(new std::barrier<>(32));
    emu_warps.emplace_back(new EmuWarp{wb.back().get(), {}, {}});
  }
  std::vector<std::thread> ts;
  for (unsigned t = 0; t < nt; ++t)
    ts.emplace_back([&, t] {
      threadIdx.x = t;
      gridDim = cfg.grid; blockDim = cfg.block;
      for (unsigned bz = 0; bz < cfg.grid.z; ++bz)
        for (unsigned by = 0; by < cfg.grid.y; ++by)
          for (unsigned bx = 0; bx < cfg.grid.x; ++bx) {
            if (t == 0) {
              memset(smem, 0xFF, smem_bytes);
              for (auto& r : reads) r.store(~uint64_t{0}, std::memory_order_relaxed);
              for (auto& f : emu_sync_or_flags) f.store(0);
              emu_block_threads_done.store(0);
              if (emu_block_begin_hook) emu_block_begin_hook();
            }
            bar.arrive_and_wait();
            blockIdx.x = bx; blockIdx.y = by; blockIdx.z = bz; emu_epoch = 0;
            emu_warp_seq = 0;
            emu_sync_or_calls = 0;
            emu_cp = EmuCpAsync{};
            kernel(args...);
            emu_cp_left_at_exit += long(emu_cp.pending.size());
            if (emu_thread_end_hook) emu_thread_end_hook();
            emu_block_threads_done.fetch_add(1);
            bar.arrive_and_wait();  // the block is done before thread 0 resets its shared memory
            if (t == 0 && emu_block_end_hook) emu_block_end_hook();
          }
    });
  for (auto& th : ts) th.join();
  free(smem_alloc);
  emu_dyn_smem = nullptr;
}
