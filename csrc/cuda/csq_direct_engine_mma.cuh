// The tensor-core engine of the direct path's tile kernels (csq_direct_tiles.cuh), for
// bfloat16 / float16 inputs (sm_80 and newer; README.md, "Direct path"). The same blocks, tiles
// and semantics as the CUDA-core engine (csq_direct_engine_cores.cuh); the products run on
// mma.sync (csq_mma.cuh):
//  * scores s = Q (K - r_T)^T: m16n8k16 with bfloat16 / float16 operands and float32
//    accumulation (q as given; k - r_T computed in float32 and rounded to the input dtype, a
//    relative error of one input rounding);
//  * the products whose operands are float32 quantities (w V, dnum V^T, ds (K - r_T), ds^T q,
//    w^T dnum): m16n8k8 with TF32 operands (float32 range, 10-bit mantissa; values of the input
//    dtype are exact in TF32) and float32 accumulation. Rounding w or ds to float16 would
//    overflow for |s| > 256.
// A warp owns a 16 x 32 block of each 64 x 64 tile result: rows 16 (warp % 4) + {g, g + 8},
// columns 32 (warp / 4) + 8 u + {2 t, 2 t + 1} (u < 4, g = lane / 4, t = lane % 4), the
// accumulator layout of both instructions, so the elementwise steps (w, ds) run on the
// accumulators in place: element (u, v) of a thread is its accumulator u, register v.
//
// Causal masking: an mma cannot select per term, and on the diagonal tile a masked weight 0
// times a non-finite value of a later position would give NaN. The kernels therefore flag a
// diagonal tile whose multiplied operand holds a NaN or Inf (kFallback), and that one product
// runs as masked scalar sums instead (tile_dot_masked).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "csq_direct.cuh"
#include "csq_mma.cuh"

namespace csq {
namespace cuda {
namespace direct {

constexpr int kLdH = 40;  // row stride (elements) of the half-precision slabs: conflict-free
constexpr int kLdF = 36;  // row stride of the float32 slabs
constexpr int kLdM = 72;  // row stride of the float32 64 x 64 tiles

// This thread's place in the warp blocks (see the top of the file).
struct Frag {
  int m0, nb, g, t;
  __device__ __forceinline__ int row(int r) const { return m0 + g + 8 * (r / 2); }
  __device__ __forceinline__ int col(int j, int r) const { return nb + 8 * j + 2 * t + r % 2; }
};
__device__ __forceinline__ Frag frag() {
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  return Frag{16 * (warp % 4), 32 * (warp / 4), lane / 4, lane % 4};
}

// The 32 bits at byte offset `off` (a multiple of 4) of a shared buffer: two elements.
__device__ __forceinline__ uint32_t ld32(const void* base, int off) {
#ifdef CSQ_CUDA_EMULATOR
  uint32_t u;
  std::memcpy(&u, static_cast<const unsigned char*>(base) + off, 4);
  return u;
#else
  return *reinterpret_cast<const uint32_t*>(static_cast<const unsigned char*>(base) + off);
#endif
}

// Shared memory of the tensor-core kernels (bytes): the slabs (two half-precision 64 x 40, or
// two float32 64 x 36 at the same place), X and Y (float32 64 x 72), the reference key, three
// per-row vectors, two per-row partial sums (one per warp column), a flag.
template <typename T>
struct MmaSmem {
  T *Ah, *Bh;
  float *Af, *Bf, *X, *Y, *ref, *r0, *r1, *r2, *part;
  int* flag;
  static constexpr size_t kSlabBytes = 2 * 64 * kLdF * sizeof(float);  // >= 2 * 64 * kLdH * 2
  static constexpr size_t kBytes =
      kSlabBytes + sizeof(float) * (2 * 64 * kLdM + kMaxD + 5 * 64) + 16;
  __device__ __forceinline__ explicit MmaSmem(unsigned char* raw) {
    Ah = reinterpret_cast<T*>(raw);
    Bh = Ah + 64 * kLdH;
    Af = reinterpret_cast<float*>(raw);
    Bf = Af + 64 * kLdF;
    X = reinterpret_cast<float*>(raw + kSlabBytes);
    Y = X + 64 * kLdM;
    ref = Y + 64 * kLdM;
    r0 = ref + kMaxD;
    r1 = r0 + 64;
    r2 = r1 + 64;
    part = r2 + 64;  // 2 x 64
    flag = reinterpret_cast<int*>(part + 2 * 64);
  }
};
static_assert(2 * 64 * kLdH * 2 <= 2 * 64 * kLdF * 4, "half slabs fit the float slab space");

// The instruction for operands of type In: TF32 m16n8k8 for float32 values, m16n8k16 for
// bfloat16 / float16 (csq_mma.cuh); kK the k of one mma, kPerReg the elements of A or B in one
// 32-bit register.
template <typename In>
struct MmaFor {
  static constexpr bool kTf32 = std::is_same<In, float>::value;
  static constexpr int kK = kTf32 ? 8 : 16, kPerReg = kTf32 ? 1 : 2;
  __device__ __forceinline__ static void run(float (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2]) {
    if constexpr (kTf32)
      mma_tf32(d, a, b);
    else
      mma_f16<In>(d, a, b);
  }
};

// Where a product's operands sit (the policies of warp_mma_step and slab_mma): Mma the
// instruction; a(m, k) and b(n, k) the register of A's row m and of B^T's row n (B's column n)
// that starts at column k; store(r, x, a, b) stages slab element (r, x) of A and B.
// bfloat16 / float16 slabs (row stride kLdH) in shared memory.
template <typename T>
struct HalfSlabs {
  using Mma = MmaFor<T>;
  T *A, *B;
  __device__ __forceinline__ void store(int r, int x, float a, float b) const {
    store_el(&A[r * kLdH + x], a);
    store_el(&B[r * kLdH + x], b);
  }
  __device__ __forceinline__ uint32_t a(int m, int k) const { return ld32(A, 2 * (m * kLdH + k)); }
  __device__ __forceinline__ uint32_t b(int n, int k) const { return ld32(B, 2 * (n * kLdH + k)); }
};

// float32 slabs (row stride kLdF), rounded to TF32 as they are read.
struct FloatSlabs {
  using Mma = MmaFor<float>;
  float *A, *B;
  __device__ __forceinline__ void store(int r, int x, float a, float b) const {
    A[r * kLdF + x] = a;
    B[r * kLdF + x] = b;
  }
  __device__ __forceinline__ uint32_t a(int m, int k) const { return to_tf32(A[m * kLdF + k]); }
  __device__ __forceinline__ uint32_t b(int n, int k) const { return to_tf32(B[n * kLdF + k]); }
};

// The float32 64 x 64 tiles X' (X, or TRANS X^T) and Y (row stride kLdM) of tile_tf32, rounded
// to TF32 as they are read.
template <bool TRANS>
struct TileOperands {
  using Mma = MmaFor<float>;
  const float *X, *Y;
  __device__ __forceinline__ uint32_t a(int m, int k) const {
    return to_tf32(TRANS ? X[k * kLdM + m] : X[m * kLdM + k]);
  }
  __device__ __forceinline__ uint32_t b(int n, int k) const { return to_tf32(Y[k * kLdM + n]); }
};

// One mma step of this warp's block over columns k0 .. k0 + kK of the operands: acc[j] +=
// A(rows, k) B(columns of block j, k)^T for the four 8-column blocks j. The fragments start at
// k0 + kPerReg t and k0 + kPerReg t + kK / 2 (both instructions' layout, csq_mma.cuh).
template <typename Op>
__device__ __forceinline__ void warp_mma_step(float (&acc)[4][4], const Frag& f, int k0,
                                              const Op& op) {
  using Mma = typename Op::Mma;
  constexpr int kHalf = Mma::kK / 2;
  const int k = k0 + Mma::kPerReg * f.t;
  const uint32_t a[4] = {op.a(f.m0 + f.g, k), op.a(f.m0 + f.g + 8, k),
                         op.a(f.m0 + f.g, k + kHalf), op.a(f.m0 + f.g + 8, k + kHalf)};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int n = f.nb + 8 * j + f.g;
    const uint32_t b[2] = {op.b(n, k), op.b(n, k + kHalf)};
    Mma::run(acc[j], a, b);
  }
}

// acc += A B^T for this warp's block, A and B (64 x K) given by element functions (0 outside
// their tiles), staged 32 columns at a time into the slabs of `op` (HalfSlabs: the scores,
// FloatSlabs: the products of float32 quantities). Starts with __syncthreads; on its first
// slab thread 0 clears *clear_flag when one is given (every thread is past the previous
// tile's reads of it).
template <typename Op, typename FA, typename FB>
__device__ __forceinline__ void slab_mma(float (&acc)[4][4], int K, const Op& op,
                                         int* clear_flag, const FA& fa, const FB& fb) {
  const Frag f = frag();
  for (int x0 = 0; x0 < K; x0 += kSlabD) {
    __syncthreads();
    if (clear_flag != nullptr && x0 == 0 && threadIdx.x == 0) *clear_flag = 0;
    stage_slab<float>(x0, K, fa, fb,
                      [&](int r, int x, float a, float b) { op.store(r, x, a, b); });
    __syncthreads();
#pragma unroll
    for (int k0 = 0; k0 < kSlabD; k0 += Op::Mma::kK) warp_mma_step(acc, f, k0, op);
  }
}

// acc += X' Y over the 64 x 64 tiles in shared memory (row stride kLdM), X' = X or (TRANS)
// X^T: TF32 m16n8k8. No barrier.
template <bool TRANS>
__device__ __forceinline__ void tile_tf32(float (&acc)[4][4], const float* X, const float* Y) {
  const Frag f = frag();
  const TileOperands<TRANS> op{X, Y};
#pragma unroll 2
  for (int k0 = 0; k0 < 64; k0 += MmaFor<float>::kK) warp_mma_step(acc, f, k0, op);
}

// The same product as masked scalar sums in float32 (the diagonal tile when the multiplied
// operand holds a NaN or Inf): the term m of output row `row` is kept when m <= row
// (kMaskUpTo) or m >= row (kMaskFrom).
template <bool TRANS>
__device__ __forceinline__ void tile_dot_masked(float (&acc)[4][4], const float* X,
                                                const float* Y, int mask) {
  const Frag f = frag();
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int row = f.row(r), col = f.col(j, r);
      float s = acc[j][r];
      for (int m = 0; m < 64; ++m) {
        const bool keep = mask == kMaskUpTo ? m <= row : m >= row;
        const float x = TRANS ? X[m * kLdM + row] : X[row * kLdM + m];
        s = keep ? fmaf(x, Y[m * kLdM + col], s) : s;
      }
      acc[j][r] = s;
    }
}

// Row sums of per-thread partials (rows g and g + 8 of the warp block) over the warp's 32
// columns (lanes t) and the two warps of a row block, into sm.part; returns after a barrier.
template <typename T>
__device__ __forceinline__ void warp_row_sums(float (&partial)[2], const MmaSmem<T>& sm) {
  const Frag f = frag();
  const int half = (static_cast<int>(threadIdx.x) / 32) / 4;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float x = partial[i];
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    x += __shfl_xor_sync(0xffffffffu, x, 2);
    if (f.t == 0) sm.part[half * 64 + f.m0 + f.g + 8 * i] = x;
  }
  __syncthreads();
}

// The engine (the interface of csq_direct_engine_cores.cuh's CoreEngine). T: __half or
// __nv_bfloat16.
template <typename T>
struct MmaEngine {
  using Acc = float;
  using Smem = MmaSmem<T>;
  static constexpr int kLd = kLdM;
  static constexpr int kRowParts = 2;      // rows g and g + 8
  static constexpr bool kFallback = true;  // masked scalar sums for a flagged diagonal tile
  static constexpr size_t kSmemBytes = Smem::kBytes;

  struct Place {
    Frag f;
    __device__ __forceinline__ int row(int, int v) const { return f.row(v); }
    __device__ __forceinline__ int col(int u, int v) const { return f.col(u, v); }
    __device__ __forceinline__ static int part(int, int v) { return v / 2; }
  };
  __device__ __forceinline__ static Place place() { return Place{frag()}; }

  template <typename FA, typename FB>
  __device__ __forceinline__ static void scores(float (&acc)[4][4], int K, const Smem& sm,
                                                const FA& fa, const FB& fb) {
    slab_mma(acc, K, HalfSlabs<T>{sm.Ah, sm.Bh}, sm.flag, fa, fb);  // m16n8k16
  }
  template <typename FA, typename FB>
  __device__ __forceinline__ static void product(float (&acc)[4][4], int K, const Smem& sm,
                                                 const FA& fa, const FB& fb) {
    slab_mma(acc, K, FloatSlabs{sm.Af, sm.Bf}, nullptr, fa, fb);  // TF32 m16n8k8
  }

  // A diagonal tile (mask != kMaskNone) whose operand was flagged runs masked scalar sums.
  template <bool TRANS>
  __device__ __forceinline__ static void tile(float (&acc)[4][4], const Smem& sm, int mask) {
    if (mask != kMaskNone && *sm.flag)
      tile_dot_masked<TRANS>(acc, sm.X, sm.Y, mask);
    else
      tile_tf32<TRANS>(acc, sm.X, sm.Y);
  }

  __device__ __forceinline__ static void row_sums(float (&parts)[kRowParts], const Smem& sm) {
    __syncthreads();  // the tile products are done
    warp_row_sums(parts, sm);
  }
  __device__ __forceinline__ static float row_total(const Smem& sm, int i) {
    return sm.part[i] + sm.part[64 + i];
  }
};

}  // namespace direct
}  // namespace cuda
}  // namespace csq
