// Just enough of CUDA to run csrc/info_nce_kernels.cuh on a CPU, for machines without a GPU.
//
// Every CUDA thread of a block is a fiber (its own stack, switched cooperatively on one OS thread):
// a fiber runs until it has to wait at a barrier (__syncthreads over the block, or the warp's
// barrier inside __syncwarp, shuffles, ballots and mma), then the next fiber runs. So each phase
// between two barriers is executed by thread 0 to the end, then thread 1, ... (or in reverse with
// ADAM_EMU_ORDER=reverse): a missing barrier is not a matter of luck here - the first thread reads
// shared memory the others have not written yet (read-after-write), or the last thread to arrive
// runs on and overwrites what the others still have to read (write-after-read), and the result is
// wrong on every run. Blocks of a grid run one after another, each with freshly poisoned shared
// memory (0xFF bytes = NaN), so a read of shared memory nothing wrote shows up as NaN. A barrier
// that only part of a block reaches is reported as a deadlock (abort) instead of hanging.
//
// What it checks: indexing, tiling, the online log-sum-exp and split merge, the pruning count,
// barrier placement. What it cannot check: the GPU memory model beyond barriers, bank conflicts,
// alignment faults, speed. compute-sanitizer on a real GPU (gpu_check.sh) is still the word on
// those. Fibers switch with _setjmp/_longjmp after a first setcontext (no signal-mask syscall per
// switch); build with -U_FORTIFY_SOURCE, whose longjmp check rejects a jump to another stack.
#pragma once

#include <array>
#include <cmath>
#include <csetjmp>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <math.h>
#include <memory>
#include <ucontext.h>
#include <vector>

#define ADAM_CUDA_EMU 1  // info_nce_kernels.cuh then takes to_tf32 and mma_tf32 from here
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Blocks run one at a time, so one function-static array per kernel is "the block's" array.
#define __shared__ static
#define ADAM_DYNAMIC_SMEM(name) unsigned char* name = emu::g_smem

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }

namespace emu {
struct Idx {
  unsigned x, y, z;
};
struct Fiber {
  ucontext_t start;
  jmp_buf resume;
  bool started = false, done = false;
  Idx idx{};
};
constexpr size_t STACK = 256 * 1024;
inline std::vector<Fiber> g_fibers;
inline std::vector<std::unique_ptr<char[]>> g_stacks;
inline int g_cur = 0;
inline jmp_buf g_sched;
inline bool g_progress = false;
inline const std::function<void()>* g_body = nullptr;
inline Idx g_block{};
inline unsigned char* g_smem = nullptr;

inline void yield() {  // back to the scheduler; it resumes this fiber later
  if (!_setjmp(g_fibers[g_cur].resume)) _longjmp(g_sched, 1);
}
inline void fiber_main() {
  (*g_body)();
  g_fibers[g_cur].done = true;
  g_progress = true;
  _longjmp(g_sched, 1);  // never returns: the scheduler forgets this fiber
}

struct Barrier {
  int n = 0, count = 0;
  unsigned gen = 0;
  void arrive_and_wait() {
    const unsigned mine = gen;
    g_progress = true;
    if (++count == n) {  // the last to arrive releases the others and runs on
      count = 0;
      ++gen;
      return;
    }
    while (gen == mine) yield();
  }
};
inline Barrier g_block_bar;
inline std::vector<Barrier> g_warp_bar;
inline std::vector<std::array<uint64_t, 32>> g_slots;
inline std::vector<std::array<std::array<float, 10>, 32>> g_mma;  // per warp: each lane's a[4], b[2]

inline const Idx& thread_idx() { return g_fibers[g_cur].idx; }
inline Barrier& warp_bar() { return g_warp_bar[thread_idx().x / 32]; }

// Runs body() as the kernel for every block of `grid`, `nthreads` threads each.
template <class F>
void launch(dim3 grid, int nthreads, size_t smem_bytes, F body) {
  if (nthreads % 32) std::abort();
  const char* order = std::getenv("ADAM_EMU_ORDER");
  const bool reverse = order && std::strcmp(order, "reverse") == 0;
  std::vector<float4> smem((smem_bytes + 15) / 16 + 1);
  g_smem = reinterpret_cast<unsigned char*>(smem.data());
  const std::function<void()> fn = body;
  g_body = &fn;
  g_fibers.assign(nthreads, Fiber{});
  while (int(g_stacks.size()) < nthreads) g_stacks.emplace_back(new char[STACK]);
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      g_block = {bx, by, 0};
      std::memset(g_smem, 0xFF, smem_bytes);  // poison: NaN floats
      g_block_bar = Barrier{nthreads};
      g_warp_bar.assign(nthreads / 32, Barrier{32});
      g_slots.assign(nthreads / 32, {});
      g_mma.assign(nthreads / 32, {});
      for (int tid = 0; tid < nthreads; ++tid) {
        Fiber& f = g_fibers[tid];
        f = Fiber{};
        f.idx = {unsigned(tid), 0, 0};
        getcontext(&f.start);
        f.start.uc_stack.ss_sp = g_stacks[tid].get();
        f.start.uc_stack.ss_size = STACK;
        f.start.uc_link = nullptr;
        makecontext(&f.start, fiber_main, 0);
      }
      for (int alive = nthreads; alive > 0;) {
        g_progress = false;
        alive = 0;
        for (int k = 0; k < nthreads; ++k) {
          const int tid = reverse ? nthreads - 1 - k : k;
          Fiber& f = g_fibers[tid];
          if (f.done) continue;
          g_cur = tid;
          if (!_setjmp(g_sched)) {
            if (!f.started) {
              f.started = true;
              setcontext(&f.start);
            }
            _longjmp(f.resume, 1);
          }
          alive += !g_fibers[tid].done;
        }
        if (alive && !g_progress) {
          std::fprintf(stderr, "emu: deadlock in block (%u, %u): %d threads wait at a barrier that the others "
                               "never reach (a barrier in divergent code?)\n", bx, by, alive);
          std::abort();
        }
      }
    }
  g_body = nullptr;
}
}  // namespace emu

#define threadIdx (emu::thread_idx())
#define blockIdx (emu::g_block)

inline void __syncthreads() { emu::g_block_bar.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_bar().arrive_and_wait(); }

template <class T>
T __shfl_xor_sync(unsigned, T v, int lane_mask) {
  static_assert(sizeof(T) <= 8, "shuffle of a scalar");
  auto& slots = emu::g_slots[threadIdx.x / 32];
  const unsigned lane = threadIdx.x % 32;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  slots[lane] = bits;
  emu::warp_bar().arrive_and_wait();
  bits = slots[lane ^ unsigned(lane_mask)];
  emu::warp_bar().arrive_and_wait();  // nobody overwrites a slot before everyone has read
  T r;
  std::memcpy(&r, &bits, sizeof(T));
  return r;
}

inline unsigned __ballot_sync(unsigned, bool pred) {
  auto& slots = emu::g_slots[threadIdx.x / 32];
  slots[threadIdx.x % 32] = pred ? 1 : 0;
  emu::warp_bar().arrive_and_wait();
  unsigned r = 0;
  for (int l = 0; l < 32; ++l) r |= unsigned(slots[l]) << l;
  emu::warp_bar().arrive_and_wait();
  return r;
}

// TF32 rounding as cvt.rna.tf32.f32: to nearest, ties away from zero, low 13 mantissa bits zero.
inline float to_tf32(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;  // inf and nan pass through
  std::memcpy(&x, &u, 4);
  return x;
}

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32, d += A B, as a warp-collective: every lane
// posts its fragments, then computes its own d entries from the whole A (16 x 8) and B (8 x 8)
// rebuilt with the PTX ISA's fragment layout (g = lane / 4, c = lane % 4):
//   A: a0 (g, c)  a1 (g + 8, c)  a2 (g, c + 4)  a3 (g + 8, c + 4)
//   B: b0 (k = c, n = g)  b1 (k = c + 4, n = g)
//   D: d0 (g, 2c)  d1 (g, 2c + 1)  d2 (g + 8, 2c)  d3 (g + 8, 2c + 1)
// Products of TF32 values are exact in float; they are summed in float, in k order.
inline void mma_tf32(float (&d)[4], const float (&a)[4], const float (&b)[2]) {
  auto& frag = emu::g_mma[threadIdx.x / 32];
  const unsigned lane = threadIdx.x % 32;
  for (int i = 0; i < 4; ++i) frag[lane][i] = to_tf32(a[i]);  // the unit reads only the TF32 bits
  for (int i = 0; i < 2; ++i) frag[lane][4 + i] = to_tf32(b[i]);
  emu::warp_bar().arrive_and_wait();
  auto A = [&](int row, int k) { return frag[(row % 8) * 4 + k % 4][(row >= 8 ? 1 : 0) + (k >= 4 ? 2 : 0)]; };
  auto Bm = [&](int k, int n) { return frag[n * 4 + k % 4][4 + (k >= 4 ? 1 : 0)]; };
  const int g = lane / 4, c = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i >= 2 ? 8 : 0), col = 2 * c + (i % 2);
    float acc = d[i];
    for (int k = 0; k < 8; ++k) acc += A(row, k) * Bm(k, col);
    d[i] = acc;
  }
  emu::warp_bar().arrive_and_wait();  // nobody reposts before everyone has read
}
