// A tiny CUDA emulator for checking the kernels of csrc/cuda on a machine without a GPU.
// Not part of any build. See README.md in this folder.
//
// Every CUDA thread of a block is a cooperative fiber (ucontext) on one OS thread. A fiber runs
// until it reaches __syncthreads (or a warp shuffle), then the next one runs; a barrier opens
// when every live thread of the block (or lane of the warp) is waiting at it. So a missing
// __syncthreads between a write and a read of shared memory by different threads shows up as a
// wrong result, and a barrier reached by only some threads is reported. The order in which
// fibers run between barriers is shuffled with a seed (EMU_SEED). Dynamic shared memory starts
// filled with NaN bytes. Atomics are plain read-modify-writes (there is only one OS thread).
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)
#define __restrict__ __restrict

using std::fma;
using std::isfinite;

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace emu {

enum State { kRunnable, kAtBlock, kAtWarp, kDone };

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  State state = kRunnable;
  dim3 tid;
  double deposit = 0, result = 0;
  int src_mode = 0, src_arg = 0;  // 0 idx, 1 up, 2 down, 3 xor
};

struct Block {
  std::vector<Fiber> fibers;
  ucontext_t sched;
  int current = -1;
  const std::function<void()>* body = nullptr;
  bool error = false;
};

inline Block*& cur_block() {
  static Block* b = nullptr;
  return b;
}
inline dim3& tidx() { static dim3 v; return v; }
inline dim3& bidx() { static dim3 v; return v; }
inline dim3& bdim() { static dim3 v; return v; }
inline dim3& gdim() { static dim3 v; return v; }
inline std::vector<unsigned char>& dyn_smem() {
  static std::vector<unsigned char> v;
  return v;
}
inline int& last_error() { static int e = 0; return e; }
inline uint64_t& seed() {
  static uint64_t s = getenv("EMU_SEED") ? strtoull(getenv("EMU_SEED"), nullptr, 10) : 1;
  return s;
}

inline void yield_to_scheduler() {
  Block* b = cur_block();
  swapcontext(&b->fibers[b->current].ctx, &b->sched);
}

inline void fiber_entry() {
  Block* b = cur_block();
  (*b->body)();
  b->fibers[b->current].state = kDone;
  swapcontext(&b->fibers[b->current].ctx, &b->sched);
}

inline void run_block(const std::function<void()>& body, dim3 block, std::mt19937_64& rng) {
  const int nthr = int(block.x * block.y * block.z);
  Block b;
  b.body = &body;
  b.fibers.resize(nthr);
  cur_block() = &b;
  for (int i = 0; i < nthr; ++i) {
    Fiber& f = b.fibers[i];
    f.stack.resize(256 * 1024);
    f.tid = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  std::vector<int> order(nthr);
  for (int i = 0; i < nthr; ++i) order[i] = i;
  for (;;) {
    std::shuffle(order.begin(), order.end(), rng);
    bool ran = false;
    for (int i : order) {
      if (b.fibers[i].state != kRunnable) continue;
      b.current = i;
      tidx() = b.fibers[i].tid;
      swapcontext(&b.sched, &b.fibers[i].ctx);
      ran = true;
    }
    if (ran) continue;
    int done = 0, at_block = 0, at_warp = 0;
    for (auto& f : b.fibers) {
      done += f.state == kDone;
      at_block += f.state == kAtBlock;
      at_warp += f.state == kAtWarp;
    }
    if (done == nthr) break;
    bool released = false;
    // Warps whose live lanes all wait at a shuffle.
    for (int w0 = 0; w0 < nthr; w0 += 32) {
      const int w1 = std::min(nthr, w0 + 32);
      int waiting = 0, live = 0;
      for (int i = w0; i < w1; ++i) {
        live += b.fibers[i].state != kDone;
        waiting += b.fibers[i].state == kAtWarp;
      }
      if (waiting == 0 || waiting != live) continue;
      if (live != w1 - w0) {
        fprintf(stderr, "emu: shuffle with exited lanes\n");
        b.error = true;
      }
      for (int i = w0; i < w1; ++i) {
        Fiber& f = b.fibers[i];
        const int lane = i - w0;
        int src = lane;
        switch (f.src_mode) {
          case 0: src = f.src_arg; break;
          case 1: src = lane >= f.src_arg ? lane - f.src_arg : lane; break;
          case 2: src = lane + f.src_arg < 32 ? lane + f.src_arg : lane; break;
          case 3: src = lane ^ f.src_arg; break;
        }
        f.result = b.fibers[w0 + src].deposit;
      }
      for (int i = w0; i < w1; ++i) b.fibers[i].state = kRunnable;
      released = true;
    }
    if (released) continue;
    if (at_block > 0 && at_block + done == nthr) {
      if (done > 0) {
        fprintf(stderr, "emu: __syncthreads reached by %d threads, %d exited\n", at_block, done);
        b.error = true;
      }
      for (auto& f : b.fibers)
        if (f.state == kAtBlock) f.state = kRunnable;
      continue;
    }
    fprintf(stderr, "emu: deadlock (%d at __syncthreads, %d at a shuffle, %d done)\n", at_block,
            at_warp, done);
    abort();
  }
  cur_block() = nullptr;
  if (b.error) abort();
}

template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, void* /*stream*/,
            Args... args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || block.x * block.y * block.z == 0 ||
      block.x * block.y * block.z > 1024 || grid.y > 65535 || grid.z > 65535) {
    last_error() = 9;  // cudaErrorInvalidConfiguration
    return;
  }
  std::function<void()> body = [&]() { kernel(args...); };
  std::mt19937_64 rng(seed()++);
  bdim() = block;
  gdim() = grid;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        bidx() = dim3(x, y, z);
        dyn_smem().assign(smem + 16, 0xFF);  // NaN bytes
        run_block(body, block, rng);
      }
}

inline void block_barrier() {
  Block* b = cur_block();
  b->fibers[b->current].state = kAtBlock;
  yield_to_scheduler();
}

template <typename V>
V warp_exchange(V v, int mode, int arg) {
  Block* b = cur_block();
  Fiber& f = b->fibers[b->current];
  f.deposit = double(v);
  f.src_mode = mode;
  f.src_arg = arg;
  f.state = kAtWarp;
  yield_to_scheduler();
  return V(b->fibers[b->current].result);
}

}  // namespace emu

#define threadIdx (emu::tidx())
#define blockIdx (emu::bidx())
#define blockDim (emu::bdim())
#define gridDim (emu::gdim())

inline void __syncthreads() { emu::block_barrier(); }
template <typename V> V __shfl_sync(unsigned, V v, int src) { return emu::warp_exchange(v, 0, src); }
template <typename V> V __shfl_up_sync(unsigned, V v, unsigned d) { return emu::warp_exchange(v, 1, int(d)); }
template <typename V> V __shfl_down_sync(unsigned, V v, unsigned d) { return emu::warp_exchange(v, 2, int(d)); }
template <typename V> V __shfl_xor_sync(unsigned, V v, int m) { return emu::warp_exchange(v, 3, m); }
template <typename V> V atomicAdd(V* p, V v) { V old = *p; *p = old + v; return old; }
