// Tensor-core tile kernels of the CUDA direct path, for bfloat16 / float16 inputs (sm_80 and
// newer; README.md, "Direct path"). The same blocks, tiles and semantics as the generic kernels
// (csq_direct_fwd.cuh, csq_direct_bwd.cuh); the products run on mma.sync:
//  * scores s = Q (K - r_T)^T: m16n8k16 with bfloat16 / float16 operands and float32
//    accumulation (q as given; k - r_T computed in float32 and rounded to the input dtype, a
//    relative error of one input rounding);
//  * the products whose operands are float32 quantities (w V, dnum V^T, ds (K - r_T), ds^T q,
//    w^T dnum): m16n8k8 with TF32 operands (float32 range, 10-bit mantissa; values of the input
//    dtype are exact in TF32) and float32 accumulation, from csq_mma.cuh. Rounding w or ds to
//    float16 would overflow for |s| > 256.
// A warp owns a 16 x 32 block of each 64 x 64 tile result: rows 16 (warp % 4) + {g, g + 8},
// columns 32 (warp / 4) + 8 j + {2 t, 2 t + 1} (j < 4, g = lane / 4, t = lane % 4), the
// accumulator layout of both instructions, so the elementwise steps (w, ds) run on the
// accumulators in place.
//
// Causal masking: an mma cannot select per term, and on the diagonal tile a masked weight 0
// times a non-finite value of a later position would give NaN. Each diagonal tile therefore
// checks the operand it multiplies the masked weights with; if any entry is NaN or Inf it runs
// that one product as masked scalar sums instead (tile_dot_masked).
//
// The CPU emulator (emu/) runs this code with the instruction replaced by a float32 product of
// the gathered fragments (as csq_mma.cuh does for TF32).
#pragma once

#include <cstdint>
#include <cstring>

#include "csq_direct.cuh"
#include "csq_mma.cuh"

namespace csq {
namespace cuda {
namespace direct {

constexpr int kLdH = 40;  // row stride (elements) of the half-precision slabs: conflict-free
constexpr int kLdF = 36;  // row stride of the float32 slabs
constexpr int kLdM = 72;  // row stride of the float32 64 x 64 tiles

// ---------------------------------------------------------------------------------------------
// m16n8k16, bfloat16 / float16 operands, float32 accumulation. Fragments (PTX ISA, "Matrix
// Fragments for mma.m16n8k16" with .f16 / .bf16), each 32-bit register two consecutive
// elements along k, the lower index in the low half:
//   A (16 x 16, row): a[0] (g, 2t..2t+1)  a[1] (g+8, 2t..)  a[2] (g, 2t+8..)  a[3] (g+8, 2t+8..)
//   B (16 x 8, col):  b[0] (k = 2t..2t+1, n = g)   b[1] (k = 2t+8..2t+9, n = g)
//   C, D (16 x 8):    c0 (g, 2t)  c1 (g, 2t+1)  c2 (g+8, 2t)  c3 (g+8, 2t+1)

#ifdef CSQ_CUDA_EMULATOR
template <typename T>
inline float emu_half_value(uint32_t bits16) {
  T h;
  const uint16_t b = static_cast<uint16_t>(bits16 & 0xffffu);
  std::memcpy(&h, &b, 2);
  return to_acc<float>(h);
}

// Emulator: every lane's fragment registers (up to 6) through a per-warp buffer between two
// warp barriers (a shuffle is one): 2 rounds of the fibers instead of one per lane and
// register. all[l] receives lane l's a[0..na) then b[0..nb).
inline void emu_warp_gather(const uint32_t* a, int na, const uint32_t* b, int nb,
                            uint32_t (&all)[32][6]) {
  static uint32_t buf[32][32][6];
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  for (int i = 0; i < na; ++i) buf[warp][lane][i] = a[i];
  for (int i = 0; i < nb; ++i) buf[warp][lane][na + i] = b[i];
  (void)__shfl_sync(0xffffffffu, 0, 0);  // every lane has written
  std::memcpy(all, buf[warp], sizeof(all));
  (void)__shfl_sync(0xffffffffu, 0, 0);  // every lane has read
}
#endif

template <typename T>
__device__ __forceinline__ void mma_f16(float (&d)[4], const uint32_t (&a)[4],
                                        const uint32_t (&b)[2]) {
#ifdef CSQ_CUDA_EMULATOR
  uint32_t all[32][6];
  emu_warp_gather(a, 4, b, 2, all);
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    for (int r = 0; r < 4; ++r) {
      const uint32_t u = all[l][r];
      const int row = g + 8 * (r % 2), col = 2 * t + 8 * (r / 2);
      A[row][col] = emu_half_value<T>(u);
      A[row][col + 1] = emu_half_value<T>(u >> 16);
    }
    for (int r = 0; r < 2; ++r) {
      const uint32_t u = all[l][4 + r];
      const int k = 2 * t + 8 * r;
      B[k][g] = emu_half_value<T>(u);
      B[k + 1][g] = emu_half_value<T>(u >> 16);
    }
  }
  const int lane = static_cast<int>(threadIdx.x) & 31;
  for (int r = 0; r < 4; ++r) {
    const int row = lane / 4 + 8 * (r / 2), col = 2 * (lane % 4) + r % 2;
    float s = 0.f;
    for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
    d[r] += s;
  }
#else
  if constexpr (std::is_same<T, __half>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
}

// m16n8k8 TF32 (fragments in csq_mma.cuh): csq_mma.cuh's mma_tf32 on the GPU; in the emulator
// the same product with the faster fragment gather above.
__device__ __forceinline__ void mma_tf32_d(float (&d)[4], const uint32_t (&a)[4],
                                           const uint32_t (&b)[2]) {
#ifdef CSQ_CUDA_EMULATOR
  uint32_t all[32][6];
  emu_warp_gather(a, 4, b, 2, all);
  float A[16][8], B[8][8];
  for (int l = 0; l < 32; ++l) {
    for (int r = 0; r < 4; ++r) A[l / 4 + 8 * (r % 2)][l % 4 + 4 * (r / 2)] = tf32_value(all[l][r]);
    for (int r = 0; r < 2; ++r) B[l % 4 + 4 * r][l / 4] = tf32_value(all[l][4 + r]);
  }
  const int lane = static_cast<int>(threadIdx.x) & 31;
  for (int r = 0; r < 4; ++r) {
    const int row = lane / 4 + 8 * (r / 2), col = 2 * (lane % 4) + r % 2;
    float s = 0.f;
    for (int k = 0; k < 8; ++k) s += A[row][k] * B[k][col];
    d[r] += s;
  }
#else
  mma_tf32(d, a, b);
#endif
}

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

__device__ __forceinline__ void zero_acc(float (&acc)[4][4]) {
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int r = 0; r < 4; ++r) acc[j][r] = 0.f;
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
// two float32 64 x 36 at the same place), X and Y (float32 64 x 72), the reference key, four
// per-row vectors, two per-row partial sums, a flag.
template <typename T>
struct MmaSmem {
  T *Ah, *Bh;
  float *Af, *Bf, *X, *Y, *ref, *r0, *r1, *r2, *part;
  int* flag;
  static constexpr size_t kSlabBytes = 2 * 64 * kLdF * sizeof(float);  // >= 2 * 64 * kLdH * 2
  static constexpr size_t kBytes = kSlabBytes + sizeof(float) * (2 * 64 * kLdM + kMaxD + 5 * 64) + 16;
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

// acc += A B^T for this warp's block, A and B (64 x K) given by element functions (0 outside
// their tiles), staged 32 columns at a time as the input dtype in sm.Ah, sm.Bh: m16n8k16.
// Starts with __syncthreads; on its first slab thread 0 clears sm.flag (every thread is past
// the previous tile's reads of it).
template <typename T, typename FA, typename FB>
__device__ __forceinline__ void scores_f16(float (&acc)[4][4], int K, const MmaSmem<T>& sm,
                                           const FA& fa, const FB& fb) {
  const Frag f = frag();
  for (int x0 = 0; x0 < K; x0 += kSlabD) {
    __syncthreads();
    if (x0 == 0 && threadIdx.x == 0) *sm.flag = 0;
    for (int e = threadIdx.x; e < 64 * kSlabD; e += kDThreads) {
      const int r = e / kSlabD, x = e % kSlabD;
      const bool in = x0 + x < K;
      store_el(&sm.Ah[r * kLdH + x], in ? fa(r, x0 + x) : 0.f);
      store_el(&sm.Bh[r * kLdH + x], in ? fb(r, x0 + x) : 0.f);
    }
    __syncthreads();
#pragma unroll
    for (int ks = 0; ks < kSlabD; ks += 16) {
      const int kk = ks + 2 * f.t;
      const uint32_t a[4] = {ld32(sm.Ah, 2 * ((f.m0 + f.g) * kLdH + kk)),
                             ld32(sm.Ah, 2 * ((f.m0 + f.g + 8) * kLdH + kk)),
                             ld32(sm.Ah, 2 * ((f.m0 + f.g) * kLdH + kk + 8)),
                             ld32(sm.Ah, 2 * ((f.m0 + f.g + 8) * kLdH + kk + 8))};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int n = f.nb + 8 * j + f.g;
        const uint32_t b[2] = {ld32(sm.Bh, 2 * (n * kLdH + kk)), ld32(sm.Bh, 2 * (n * kLdH + kk + 8))};
        mma_f16<T>(acc[j], a, b);
      }
    }
  }
}

// acc += A B^T with float32 operands (element functions), staged as float32 in sm.Af, sm.Bf:
// TF32 m16n8k8. Starts with __syncthreads.
template <typename T, typename FA, typename FB>
__device__ __forceinline__ void product_tf32(float (&acc)[4][4], int K, const MmaSmem<T>& sm,
                                             const FA& fa, const FB& fb) {
  const Frag f = frag();
  for (int x0 = 0; x0 < K; x0 += kSlabD) {
    __syncthreads();
    for (int e = threadIdx.x; e < 64 * kSlabD; e += kDThreads) {
      const int r = e / kSlabD, x = e % kSlabD;
      const bool in = x0 + x < K;
      sm.Af[r * kLdF + x] = in ? fa(r, x0 + x) : 0.f;
      sm.Bf[r * kLdF + x] = in ? fb(r, x0 + x) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int k0 = 0; k0 < kSlabD; k0 += 8) {
      const int k = k0 + f.t;
      const uint32_t a[4] = {to_tf32(sm.Af[(f.m0 + f.g) * kLdF + k]),
                             to_tf32(sm.Af[(f.m0 + f.g + 8) * kLdF + k]),
                             to_tf32(sm.Af[(f.m0 + f.g) * kLdF + k + 4]),
                             to_tf32(sm.Af[(f.m0 + f.g + 8) * kLdF + k + 4])};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int n = f.nb + 8 * j + f.g;
        const uint32_t b[2] = {to_tf32(sm.Bf[n * kLdF + k]), to_tf32(sm.Bf[n * kLdF + k + 4])};
        mma_tf32_d(acc[j], a, b);
      }
    }
  }
}

// acc += X' Y over the 64 x 64 tiles in shared memory (row stride kLdM), X' = X or (TRANS)
// X^T: TF32 m16n8k8. No barrier.
template <bool TRANS>
__device__ __forceinline__ void tile_tf32(float (&acc)[4][4], const float* X, const float* Y) {
  const Frag f = frag();
  const auto xa = [&](int m, int k) { return TRANS ? X[k * kLdM + m] : X[m * kLdM + k]; };
#pragma unroll 2
  for (int k0 = 0; k0 < 64; k0 += 8) {
    const int k = k0 + f.t;
    const uint32_t a[4] = {to_tf32(xa(f.m0 + f.g, k)), to_tf32(xa(f.m0 + f.g + 8, k)),
                           to_tf32(xa(f.m0 + f.g, k + 4)), to_tf32(xa(f.m0 + f.g + 8, k + 4))};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int n = f.nb + 8 * j + f.g;
      const uint32_t b[2] = {to_tf32(Y[k * kLdM + n]), to_tf32(Y[(k + 4) * kLdM + n])};
      mma_tf32_d(acc[j], a, b);
    }
  }
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
__device__ __forceinline__ void row_sums(float (&partial)[2], const MmaSmem<T>& sm) {
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

__device__ __forceinline__ bool finite_f(float x) { return x - x == 0.f; }

// ---------------------------------------------------------------------------------------------
// Forward. Grid, outputs and inputs as direct_fwd_kernel.
template <typename T>
__global__ void __launch_bounds__(kDThreads) direct_fwd_mma_kernel(const DirectFwdParams p,
                                                                   const DirectWork w) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const MmaSmem<T> sm(smem_raw);
  const DTile t = direct_tile(p, w, blockIdx.x);
  if (!t.valid) return;
  const int64_t h = blockIdx.y, hk = h / p.group;
  const int D = static_cast<int>(p.dim_k), Dv = static_cast<int>(p.dim_v);
  const int c0 = static_cast<int>(blockIdx.z) * kT, ncols = imin(kT, Dv - c0);
  const Frag f = frag();
  const float tau = float(p.scale);
  const float* ref_g = static_cast<const float*>(w.ref) + (hk * w.slots + blockIdx.x) * D;
  for (int d = threadIdx.x; d < D; d += kDThreads) sm.ref[d] = ref_g[d];
  for (int i = threadIdx.x; i < kT; i += kDThreads)
    sm.r0[i] = i < t.rows ? static_cast<const float*>(p.b)[out_row(t, p.heads_q, h, p.seqlen, i)]
                          : 0.f;
  const int64_t qpos = t.start + t.t0;
  float acc[4][4], den[2] = {0.f, 0.f};
  zero_acc(acc);
  const int64_t end = p.causal ? t.t0 + t.rows : t.len;
  for (int64_t j0 = 0; j0 < end; j0 += kT) {
    const int cols = static_cast<int>(min64(kT, end - j0));
    const bool diag = p.causal && j0 == t.t0;
    const int64_t kpos = t.start + j0;
    float s[4][4];
    zero_acc(s);
    scores_f16<T>(
        s, D, sm,
        [&](int r, int x) {
          return r < t.rows ? load_el<float, T>(p.q, p.q_stride, t.bi, h, qpos + r, x) : 0.f;
        },
        [&](int r, int x) {
          return r < cols ? load_el<float, T>(p.k, p.k_stride, t.bi, hk, kpos + r, x) - sm.ref[x]
                          : 0.f;
        });
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int i = f.row(r), n = f.col(j, r);
        const bool keep = i < t.rows && n < cols && (!diag || n <= i);
        const float x = tau * s[j][r] + sm.r0[i];
        const float wv = keep ? x * x : 0.f;
        sm.X[i * kLdM + n] = wv;
        den[r / 2] += wv;
      }
    bool bad = false;
    for (int e = threadIdx.x; e < kT * kT; e += kDThreads) {
      const int r = e / kT, c = e % kT;
      const float v = r < cols && c < ncols
                          ? load_el<float, T>(p.v, p.v_stride, t.bi, hk, kpos + r, c0 + c)
                          : 0.f;
      sm.Y[r * kLdM + c] = v;
      bad |= !finite_f(v);
    }
    if (diag && bad) *sm.flag = 1;
    __syncthreads();
    if (diag && *sm.flag)
      tile_dot_masked<false>(acc, sm.X, sm.Y, kMaskUpTo);
    else
      tile_tf32<false>(acc, sm.X, sm.Y);
  }
  __syncthreads();  // sm.part is free (the slabs' neighbours are done)
  row_sums(den, sm);
  float* y = static_cast<float*>(p.y);
  const float* row_sums = static_cast<const float*>(p.row_sums);  // (rows, Dv + 1) or none
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int i = f.row(r);
    if (i >= t.rows) continue;
    const int64_t row = out_row(t, p.heads_q, h, p.seqlen, i);
    const float* extra = row_sums ? row_sums + row * (Dv + 1) : nullptr;
    const float dsum = sm.part[i] + sm.part[64 + i] + (extra ? extra[Dv] : 0.f);
    const float inv = p.normalize ? 1.f / (dsum + float(p.eps)) : 1.f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int n = f.col(j, r);
      if (n < ncols) y[row * Dv + c0 + n] = (acc[j][r] + (extra ? extra[c0 + n] : 0.f)) * inv;
    }
    if (blockIdx.z == 0 && f.nb == 0 && f.t == 0 && r % 2 == 0)
      static_cast<float*>(p.den)[row] = dsum;
  }
}

// The per-row vectors of query tile tq (b, inv, dden) and its reference key, as
// load_query_rows.
template <typename T>
__device__ __forceinline__ void mma_query_rows(const DirectBwdParams& p, const DirectWork& w,
                                               const MmaSmem<T>& sm, const DTile& tq, int64_t h,
                                               int64_t slot) {
  const int64_t hk = h / p.group;
  const float* ref_g = static_cast<const float*>(w.ref) + (hk * w.slots + slot) * p.dim_k;
  for (int d = threadIdx.x; d < p.dim_k; d += kDThreads) sm.ref[d] = ref_g[d];
  for (int i = threadIdx.x; i < kT; i += kDThreads) {
    const bool in = i < tq.rows;
    const int64_t row = in ? out_row(tq, p.heads_q, h, p.seqlen, i) : 0;
    sm.r0[i] = in ? static_cast<const float*>(p.b)[row] : 0.f;
    sm.r1[i] = in ? static_cast<const float*>(w.inv)[row] : 0.f;
    sm.r2[i] = in ? static_cast<const float*>(w.dden)[row] : 0.f;
  }
}

// s and (with_dp) dp = dnum V^T of a (query tile, key tile) pair in the accumulator layout.
template <typename T>
__device__ __forceinline__ void mma_pair_scores(const DirectBwdParams& p, const MmaSmem<T>& sm,
                                                const DTile& tq, int64_t h, int64_t kpos,
                                                int cols, bool with_dp, float (&s)[4][4],
                                                float (&dp)[4][4]) {
  const int64_t hk = h / p.group, qpos = tq.start + tq.t0;
  zero_acc(s);
  zero_acc(dp);
  scores_f16<T>(
      s, static_cast<int>(p.dim_k), sm,
      [&](int r, int x) {
        return r < tq.rows ? load_el<float, T>(p.q, p.q_stride, tq.bi, h, qpos + r, x) : 0.f;
      },
      [&](int r, int x) {
        return r < cols ? load_el<float, T>(p.k, p.k_stride, tq.bi, hk, kpos + r, x) - sm.ref[x]
                        : 0.f;
      });
  if (!with_dp) return;
  const float* dy = static_cast<const float*>(p.dy);
  product_tf32<T>(
      dp, static_cast<int>(p.dim_v), sm,
      [&](int r, int x) {
        return r < tq.rows ? dy[tq.bi * p.dy_stride[0] + h * p.dy_stride[1] +
                                (qpos + r) * p.dy_stride[2] + x * p.dy_stride[3]] *
                                 sm.r1[r]
                           : 0.f;
      },
      [&](int r, int x) {
        return r < cols ? load_el<float, T>(p.v, p.v_stride, tq.bi, hk, kpos + r, x) : 0.f;
      });
}

// dq and db, as direct_dq_kernel.
template <typename T>
__global__ void __launch_bounds__(kDThreads) direct_dq_mma_kernel(const DirectBwdParams p,
                                                                  const DirectWork w) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const MmaSmem<T> sm(smem_raw);
  const DTile t = direct_tile(p, w, blockIdx.x);
  if (!t.valid) return;
  const int64_t h = blockIdx.y, hk = h / p.group;
  const int D = static_cast<int>(p.dim_k);
  const int c0 = static_cast<int>(blockIdx.z) * kT, ncols = imin(kT, D - c0);
  const Frag f = frag();
  const float tau = float(p.scale);
  mma_query_rows(p, w, sm, t, h, blockIdx.x);
  float acc[4][4], db[2] = {0.f, 0.f};
  zero_acc(acc);
  const int64_t end = p.causal ? t.t0 + t.rows : t.len;
  for (int64_t j0 = 0; j0 < end; j0 += kT) {
    const int cols = static_cast<int>(min64(kT, end - j0));
    const bool diag = p.causal && j0 == t.t0;
    const int64_t kpos = t.start + j0;
    float s[4][4], dp[4][4];
    mma_pair_scores<T>(p, sm, t, h, kpos, cols, true, s, dp);
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int i = f.row(r), n = f.col(j, r);
        const bool keep = i < t.rows && n < cols && (!diag || n <= i);
        const float x = tau * s[j][r] + sm.r0[i];
        const float ds = keep ? 2.f * x * (dp[j][r] + sm.r2[i]) : 0.f;
        sm.X[i * kLdM + n] = ds;
        db[r / 2] += ds;
      }
    bool bad = false;
    for (int e = threadIdx.x; e < kT * kT; e += kDThreads) {
      const int r = e / kT, c = e % kT;
      const float v =
          r < cols && c < ncols
              ? load_el<float, T>(p.k, p.k_stride, t.bi, hk, kpos + r, c0 + c) - sm.ref[c0 + c]
              : 0.f;
      sm.Y[r * kLdM + c] = v;
      bad |= !finite_f(v);
    }
    if (diag && bad) *sm.flag = 1;
    __syncthreads();
    if (diag && *sm.flag)
      tile_dot_masked<false>(acc, sm.X, sm.Y, kMaskUpTo);
    else
      tile_tf32<false>(acc, sm.X, sm.Y);
  }
  __syncthreads();
  row_sums(db, sm);
  const double* mdiff = static_cast<const double*>(w.mdiff);
  float* dq_out = static_cast<float*>(p.dq);
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int i = f.row(r);
    if (i >= t.rows) continue;
    const float dbi = sm.part[i] + sm.part[64 + i];
    const int64_t row = out_row(t, p.heads_q, h, p.seqlen, i);
    const int64_t mrow = out_row(t, p.heads_k, hk, p.seqlen, i);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int n = f.col(j, r);
      if (n >= ncols) continue;
      const double m = mdiff[mrow * D + c0 + n];
      dq_out[row * D + c0 + n] = float(p.scale * (double(acc[j][r]) - m * double(dbi)));
    }
    if (blockIdx.z == 0 && f.nb == 0 && f.t == 0 && r % 2 == 0)
      static_cast<float*>(p.db)[row] = dbi;
  }
}

// dk (without its centering term) and dv, as direct_dkdv_kernel.
template <typename T>
__global__ void __launch_bounds__(kDThreads) direct_dkdv_mma_kernel(const DirectBwdParams p,
                                                                    const DirectWork w) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const MmaSmem<T> sm(smem_raw);
  const DTile tk = direct_tile(p, w, blockIdx.x);
  if (!tk.valid) return;
  const int64_t hk = blockIdx.y;
  const int D = static_cast<int>(p.dim_k), Dv = static_cast<int>(p.dim_v);
  const int nbk = static_cast<int>(ceil_div(D, kT));
  const bool is_dk = static_cast<int>(blockIdx.z) < nbk;
  const int width = is_dk ? D : Dv;
  const int c0 = (is_dk ? static_cast<int>(blockIdx.z) : static_cast<int>(blockIdx.z) - nbk) * kT;
  const int ncols = imin(kT, width - c0);
  const Frag f = frag();
  const float tau = float(p.scale);
  const int cols = tk.rows;
  const int64_t kpos = tk.start + tk.t0;
  const float* dy = static_cast<const float*>(p.dy);
  float acc[4][4];
  zero_acc(acc);
  const int64_t nt = ceil_div(tk.len, kT);
  for (int64_t hh = 0; hh < p.group; ++hh) {
    const int64_t h = hk * p.group + hh;
    for (int64_t ti = p.causal ? tk.idx : 0; ti < nt; ++ti) {
      const DTile tq = tile_at(tk, ti);
      const bool diag = p.causal && ti == tk.idx;
      const int64_t qpos = tq.start + tq.t0;
      mma_query_rows(p, w, sm, tq, h, tk.first + ti);
      float s[4][4], dp[4][4];
      mma_pair_scores<T>(p, sm, tq, h, kpos, cols, is_dk, s, dp);
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int i = f.row(r), n = f.col(j, r);
          const bool keep = i < tq.rows && n < cols && (!diag || n <= i);
          const float x = tau * s[j][r] + sm.r0[i];
          const float v = is_dk ? 2.f * x * (dp[j][r] + sm.r2[i]) : x * x;
          sm.X[i * kLdM + n] = keep ? v : 0.f;
        }
      bool bad = false;
      for (int e = threadIdx.x; e < kT * kT; e += kDThreads) {
        const int r = e / kT, c = e % kT;
        float v = 0.f;
        if (r < tq.rows && c < ncols) {
          if (is_dk)
            v = load_el<float, T>(p.q, p.q_stride, tq.bi, h, qpos + r, c0 + c);
          else
            v = dy[tq.bi * p.dy_stride[0] + h * p.dy_stride[1] + (qpos + r) * p.dy_stride[2] +
                   (c0 + c) * p.dy_stride[3]] *
                sm.r1[r];
        }
        sm.Y[r * kLdM + c] = v;
        bad |= !finite_f(v);
      }
      if (diag && bad) *sm.flag = 1;
      __syncthreads();
      if (diag && *sm.flag)
        tile_dot_masked<true>(acc, sm.X, sm.Y, kMaskFrom);
      else
        tile_tf32<true>(acc, sm.X, sm.Y);
      __syncthreads();  // before the next pair's row vectors
    }
  }
  float* out = static_cast<float*>(is_dk ? p.dk : p.dv);
  const float fct = is_dk ? tau : 1.f;
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int j_ = f.row(r);
    if (j_ >= cols) continue;
    const int64_t row = out_row(tk, p.heads_k, hk, p.seqlen, j_);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int n = f.col(j, r);
      if (n < ncols) out[row * width + c0 + n] = fct * acc[j][r];
    }
  }
}

}  // namespace direct
}  // namespace cuda
}  // namespace csq
