// A tiny CUDA emulator for checking the kernels of csrc/cuda on a machine without a GPU.
// Not part of any build. See README.md in this folder.
//
// Every CUDA thread of a block is a cooperative fiber (Context) on one OS thread. A fiber runs
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
#include <map>
#include <memory>
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

// Switching between fibers. On x86-64 a few instructions: the callee-saved registers, the
// floating-point control words and the stack pointer. glibc's swapcontext also saves the
// signal mask with a system call and the whole x87 environment on every switch, which was
// three quarters of the emulator's time. Elsewhere (or built with -DEMU_UCONTEXT) ucontext.
#if defined(__x86_64__) && !defined(EMU_UCONTEXT)
struct Context {
  void* sp = nullptr;
};
// Saves the registers on the current stack and its pointer in *save_sp, then resumes the
// context whose stack pointer is load_sp. Weak: every unit that includes this defines it.
extern "C" void emu_switch_context(void** save_sp, void* load_sp);
asm(R"(
  .text
  .weak emu_switch_context
  .hidden emu_switch_context
  .type emu_switch_context, @function
emu_switch_context:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_switch_context, .-emu_switch_context
)");
inline void switch_context(Context& from, const Context& to) {
  emu_switch_context(&from.sp, to.sp);
}
// A context that starts entry() (which must never return) on the given stack: the frame that
// emu_switch_context pops, with entry as its return address, and the stack aligned as after a
// call.
inline void start_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
  auto* sp = reinterpret_cast<uint64_t*>(
      (reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t(15));
  *--sp = 0;                                       // entry's return address (never used)
  *--sp = reinterpret_cast<uint64_t>(entry);       // where emu_switch_context returns to
  for (int i = 0; i < 6; ++i) *--sp = 0;           // rbp rbx r12 r13 r14 r15
  *--sp = 0x1F80ull | (uint64_t(0x037F) << 32);    // MXCSR and x87 control word: the defaults
  c.sp = sp;
}
#else
struct Context {
  ucontext_t uc;
};
inline void switch_context(Context& from, const Context& to) { swapcontext(&from.uc, &to.uc); }
inline void start_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

enum State { kRunnable, kAtBlock, kAtWarp, kDone };

struct Fiber {
  Context ctx;
  State state = kRunnable;
  dim3 tid;
  double deposit = 0, result = 0;
  int src_mode = 0, src_arg = 0;  // 0 idx, 1 up, 2 down, 3 xor, 4 gather (warp_gather)
  const void* gather_src = nullptr;  // warp_gather: this lane's bytes
  int gather_bytes = 0;
};

struct Block {
  std::vector<Fiber> fibers;
  Context sched;
  int current = -1;
  const std::function<void()>* body = nullptr;
  bool error = false;
  std::vector<std::vector<unsigned char>> gathered;  // per warp: the last warp_gather's bytes
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

// Shared memory limits, as on a GPU: a block may take up to 48 KB of dynamic shared memory, more
// only after cudaFuncSetAttribute raised its kernel's limit, which may not exceed the device's
// opt-in (smem_optin: an H100's 227 KB unless the harness emulates another device).
constexpr int kSmemDefault = 48 * 1024;
inline int& smem_optin() {
  static int v = 227 * 1024;
  return v;
}
inline std::map<const void*, int>& smem_limits() {  // per kernel, set by cudaFuncSetAttribute
  static std::map<const void*, int> m;
  return m;
}
inline uint64_t& seed() {
  static uint64_t s = getenv("EMU_SEED") ? strtoull(getenv("EMU_SEED"), nullptr, 10) : 1;
  return s;
}

// Fiber stacks, kept from block to block: allocating (and zeroing) 256 KB per thread for every
// block was most of the emulator's time on kernels with many small blocks.
constexpr size_t kStackBytes = 256 * 1024;
inline char* fiber_stack(int i) {
  static std::vector<std::unique_ptr<char[]>> pool;
  while (int(pool.size()) <= i) pool.emplace_back(new char[kStackBytes]);
  return pool[i].get();
}

inline void yield_to_scheduler() {
  Block* b = cur_block();
  switch_context(b->fibers[b->current].ctx, b->sched);
}

inline void fiber_entry() {  // never returns: the scheduler does not resume a finished fiber
  Block* b = cur_block();
  (*b->body)();
  b->fibers[b->current].state = kDone;
  switch_context(b->fibers[b->current].ctx, b->sched);
  abort();
}

inline void run_block(const std::function<void()>& body, dim3 block, std::mt19937_64& rng) {
  const int nthr = int(block.x * block.y * block.z);
  Block b;
  b.body = &body;
  b.fibers.resize(nthr);
  b.gathered.resize(size_t(nthr + 31) / 32);
  cur_block() = &b;
  for (int i = 0; i < nthr; ++i) {
    Fiber& f = b.fibers[i];
    f.tid = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
    start_context(f.ctx, fiber_stack(i), kStackBytes, fiber_entry);
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
      switch_context(b.sched, b.fibers[i].ctx);
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
        if (f.src_mode == 4) {  // every lane is suspended: its bytes are still in place
          if (f.gather_bytes != b.fibers[w0].gather_bytes || b.fibers[w0].src_mode != 4) {
            fprintf(stderr, "emu: warp_gather met another exchange\n");
            b.error = true;
          }
          auto& all = b.gathered[w0 / 32];
          all.resize(size_t(32) * size_t(f.gather_bytes));
          std::memcpy(all.data() + size_t(lane) * f.gather_bytes, f.gather_src,
                      size_t(f.gather_bytes));
          continue;
        }
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
  const auto lim = smem_limits().find(reinterpret_cast<const void*>(kernel));
  if (smem > size_t(lim == smem_limits().end() ? kSmemDefault : lim->second)) {
    last_error() = 1;  // cudaErrorInvalidValue: more dynamic shared memory than allowed
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

// The `bytes` bytes at `mine` of every lane of the warp, lane by lane (32 * bytes), valid until
// the warp's next exchange (which every lane reaches only after it is done reading): one
// exchange where shuffles take one per 4 bytes, each a round of the scheduler. For the
// emulated mma.sync of csq_mma.cuh.
inline const unsigned char* warp_gather(const void* mine, int bytes) {
  Block* b = cur_block();
  Fiber& f = b->fibers[b->current];
  f.gather_src = mine;
  f.gather_bytes = bytes;
  f.src_mode = 4;
  f.state = kAtWarp;
  yield_to_scheduler();
  return b->gathered[b->current / 32].data();
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
