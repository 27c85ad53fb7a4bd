// The CUDA-core engine of the direct path's tile kernels (csq_direct_tiles.cuh): every dtype,
// products as fma in the accumulation dtype Acc (float32, or float64 for float64 inputs).
//
// 256 threads as 16 x 16: thread (ty, tx) owns rows ty + 16 u and columns tx + 16 v (u, v < 4)
// of a 64 x 64 result, so that a warp (two values of ty) reads one or two rows of the left
// operand (broadcast) and 16 consecutive rows or columns of the right one (row stride 33 or 65:
// distinct banks).
#pragma once

#include "csq_direct.cuh"
#include "csq_register_block.cuh"

namespace csq {
namespace cuda {
namespace direct {

// acc[u][v] += sum_{x < K} A(ty + 16 u, x) B(tx + 16 v, x): A and B (64 x K, given by element
// functions fa(row, x), fb(row, x) that return 0 for rows outside their tile) staged slab by
// slab (32 columns) in As, Bs (64 x 33). Starts with __syncthreads (the buffers may still be
// read) and leaves the last slab in them.
template <typename Acc, typename FA, typename FB>
__device__ __forceinline__ void slab_product(Acc (&acc)[4][4], int K, Acc* As, Acc* Bs,
                                             const FA& fa, const FB& fb) {
  const int ty = static_cast<int>(threadIdx.x) / 16, tx = static_cast<int>(threadIdx.x) % 16;
  for (int x0 = 0; x0 < K; x0 += kSlabD) {
    __syncthreads();
    stage_slab<Acc>(x0, K, fa, fb, [&](int r, int x, Acc a, Acc b) {
      As[r * kLdA + x] = a;
      Bs[r * kLdA + x] = b;
    });
    __syncthreads();
    const int xn = imin(kSlabD, K - x0);
    for (int x = 0; x < xn; ++x)
      outer_product_step(acc, [&](int u) { return As[(ty + 16 * u) * kLdA + x]; },
                         [&](int v) { return Bs[(tx + 16 * v) * kLdA + x]; });
  }
}

// acc[u][v] += sum_{m < 64} X'(ty + 16 u, m) Y(m, tx + 16 v), with X' = X or (TRANS) X^T;
// X and Y 64 x 64 in shared memory with row stride 65, the terms outside `mask` left out.
template <bool TRANS, typename Acc>
__device__ __forceinline__ void tile_product(Acc (&acc)[4][4], const Acc* X, const Acc* Y,
                                             int mask) {
  const int ty = static_cast<int>(threadIdx.x) / 16, tx = static_cast<int>(threadIdx.x) % 16;
  for (int m = 0; m < kT; ++m) {
    Acc xv[4], yv[4];
#pragma unroll
    for (int a = 0; a < 4; ++a) {
      const int row = ty + 16 * a;
      xv[a] = TRANS ? X[m * kLdX + row] : X[row * kLdX + m];
    }
#pragma unroll
    for (int c = 0; c < 4; ++c) yv[c] = Y[m * kLdX + tx + 16 * c];
    if (mask == kMaskNone) {
      outer_product_step(acc, [&](int u) { return xv[u]; }, [&](int v) { return yv[v]; });
    } else {
#pragma unroll
      for (int a = 0; a < 4; ++a) {
        const int row = ty + 16 * a;
        const bool keep = mask == kMaskUpTo ? m <= row : m >= row;
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[a][c] = keep ? fma(xv[a], yv[c], acc[a][c]) : acc[a][c];
      }
    }
  }
}

// Sum over the 16 threads tx of a row group (lanes differing in their low 4 bits).
template <typename Acc>
__device__ __forceinline__ Acc sum16(Acc x) {
#pragma unroll
  for (int off = 8; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// Shared memory, in Acc elements: As, Bs (64 x 33), X, Y (64 x 65), the reference key (up to
// 256), three per-row vectors of 64 and the row sums (64).
constexpr int kDirectSmemElems = 2 * kT * kLdA + 2 * kT * kLdX + kMaxD + 4 * kT;

template <typename Acc>
struct TileSmem {
  Acc *As, *Bs, *X, *Y, *ref, *r0, *r1, *r2, *part;
  __device__ __forceinline__ explicit TileSmem(unsigned char* raw) {
    Acc* s = reinterpret_cast<Acc*>(raw);
    As = s;
    Bs = As + kT * kLdA;
    X = Bs + kT * kLdA;
    Y = X + kT * kLdX;
    ref = Y + kT * kLdX;
    r0 = ref + kMaxD;
    r1 = r0 + kT;
    r2 = r1 + kT;
    part = r2 + kT;
  }
};

// The engine (the interface csq_direct_tiles.cuh expects; csq_direct_engine_mma.cuh is the
// other one). T: the input dtype.
template <typename T, typename Acc_>
struct CoreEngine {
  using Acc = Acc_;
  using Smem = TileSmem<Acc>;
  static constexpr int kLd = kLdX;          // row stride of X and Y
  static constexpr int kRowParts = 4;       // per-thread partial row sums: one per row u
  static constexpr bool kFallback = false;  // no masked fallback: the products select
  static constexpr size_t kSmemBytes = sizeof(Acc) * size_t(kDirectSmemElems);

  // This thread's element (u, v) of the 64 x 64 result: its row, column and row partial.
  struct Place {
    int ty, tx;
    __device__ __forceinline__ int row(int u, int) const { return ty + 16 * u; }
    __device__ __forceinline__ int col(int, int v) const { return tx + 16 * v; }
    __device__ __forceinline__ static int part(int u, int) { return u; }
  };
  __device__ __forceinline__ static Place place() {
    return Place{static_cast<int>(threadIdx.x) / 16, static_cast<int>(threadIdx.x) % 16};
  }

  // acc += A B^T (64 x K operands by element functions): the scores and dnum V^T.
  template <typename FA, typename FB>
  __device__ __forceinline__ static void scores(Acc (&acc)[4][4], int K, const Smem& sm,
                                                const FA& fa, const FB& fb) {
    slab_product(acc, K, sm.As, sm.Bs, fa, fb);
  }
  template <typename FA, typename FB>
  __device__ __forceinline__ static void product(Acc (&acc)[4][4], int K, const Smem& sm,
                                                 const FA& fa, const FB& fb) {
    slab_product(acc, K, sm.As, sm.Bs, fa, fb);
  }

  // acc += X' Y over sm.X, sm.Y (X' = X or, TRANS, X^T), the terms outside `mask` left out.
  template <bool TRANS>
  __device__ __forceinline__ static void tile(Acc (&acc)[4][4], const Smem& sm, int mask) {
    tile_product<TRANS>(acc, sm.X, sm.Y, mask);
  }

  // The rows' sums of the per-thread partials into sm.part (every thread calls it; returns
  // after a barrier); row_total reads them.
  __device__ __forceinline__ static void row_sums(Acc (&parts)[kRowParts], const Smem& sm) {
    const Place pl = place();
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const Acc x = sum16(parts[u]);
      if (pl.tx == 0) sm.part[pl.row(u, 0)] = x;
    }
    __syncthreads();
  }
  __device__ __forceinline__ static Acc row_total(const Smem& sm, int i) { return sm.part[i]; }
};

}  // namespace direct
}  // namespace cuda
}  // namespace csq
