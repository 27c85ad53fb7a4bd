// Tensor-core instructions and products, shared by the state scans and the direct path:
// mma.sync m16n8k8 with TF32 operands and m16n8k16 with bfloat16 / float16 operands, float32
// accumulation (sm_80 and newer), and block_mma_tf32, the tensor-core counterpart of
// block_gemm on float32 shared-memory tiles (used for bfloat16 / float16 inputs; by default
// with the 3xTF32 split, which keeps float32 accuracy). Torch-free.
//
// Fragment ownership (PTX ISA, "Matrix Fragments for mma.m16n8k8" / "mma.m16n8k16"), with
// g = lane / 4 and t = lane % 4:
//   m16n8k8, .tf32:
//     A (16 x 8, row-major):  a0 (g, t)   a1 (g + 8, t)   a2 (g, t + 4)   a3 (g + 8, t + 4)
//     B (8 x 8, column):      b0 (t, g)   b1 (t + 4, g)
//   m16n8k16, .f16 / .bf16 (each 32-bit register two consecutive elements along k, the lower
//   index in the low half):
//     A (16 x 16, row):  a0 (g, 2t..2t+1)  a1 (g+8, 2t..)  a2 (g, 2t+8..)  a3 (g+8, 2t+8..)
//     B (16 x 8, col):   b0 (k = 2t..2t+1, n = g)   b1 (k = 2t+8..2t+9, n = g)
//   C, D (16 x 8), both:  c0 (g, 2t)  c1 (g, 2t + 1)  c2 (g + 8, 2t)  c3 (g + 8, 2t + 1)
//
// The CPU emulator (emu/, CSQ_CUDA_EMULATOR) runs the same fragment code and replaces only the
// instruction: it gathers the warp's fragments (one warp exchange, emu::warp_gather) and
// multiplies them in float32 (emu_mma).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "csq_elements.cuh"

namespace csq {
namespace cuda {

constexpr int kMmaM = 16, kMmaN = 8, kMmaK = 8;

// x rounded to TF32 (round to nearest, ties away from zero), as the bits of a float.
__device__ __forceinline__ uint32_t to_tf32(float x) {
#ifdef CSQ_CUDA_EMULATOR
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;  // finite only
  return u;
#else
  uint32_t u;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(u) : "f"(x));
  return u;
#endif
}

__device__ __forceinline__ float tf32_value(uint32_t u) {
#ifdef CSQ_CUDA_EMULATOR
  float x;
  std::memcpy(&x, &u, 4);
  return x;
#else
  return __uint_as_float(u);
#endif
}

#ifdef CSQ_CUDA_EMULATOR
// Emulator: the warp's fragments, all[l] = lane l's a[0..4) and b[0..2), in one exchange (one
// shuffle per register made large heads too slow), then this lane's four results
// d[r] += sum_{k < K} A(row, k) B(k, col), A and B read from the gathered fragments by
// a_at(all, row, k), b_at(all, k, n).
struct EmuFrags {
  uint32_t a[4], b[2];
};
template <int K, typename FA, typename FB>
inline void emu_mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                    const FA& a_at, const FB& b_at) {
  const EmuFrags mine{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}};
  const EmuFrags* all =
      reinterpret_cast<const EmuFrags*>(emu::warp_gather(&mine, sizeof(EmuFrags)));
  const int lane = static_cast<int>(threadIdx.x) & 31;
  for (int r = 0; r < 4; ++r) {
    const int row = lane / 4 + 8 * (r / 2), col = 2 * (lane % 4) + r % 2;
    float s = 0.f;
    for (int k = 0; k < K; ++k) s += a_at(all, row, k) * b_at(all, k, col);
    d[r] += s;
  }
}

inline float emu_bits_f32(uint32_t u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

// The value of a 16-bit element (float16 / bfloat16 bits) of type T.
template <typename T>
inline float emu_bits_16(uint32_t bits16) {
  T h;
  const uint16_t b = static_cast<uint16_t>(bits16 & 0xffffu);
  std::memcpy(&h, &b, 2);
  return to_acc<float>(h);
}
#endif

#ifndef CSQ_CUDA_EMULATOR
// The mma.sync instruction of one shape and operand types (INSTR, a string literal such as
// "m16n8k8.row.col.f32.tf32.tf32.f32"): d (4 float32 accumulators) += A (a: 4 registers) B (b:
// 2 registers), the register lists every shape here shares. A macro, as an asm statement takes
// its instruction as a string literal, which no template argument can supply.
#define CSQ_MMA_SYNC(INSTR, d, a, b)                                                        \
  asm volatile("mma.sync.aligned." INSTR " {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, " \
               "{%0, %1, %2, %3};\n"                                                        \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                             \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]))
#endif

// d += A B for one 16 x 8 x 8 tile, TF32 operands; every lane of the warp calls it
// (warp-synchronous).
__device__ __forceinline__ void mma_tf32(float (&d)[4], const uint32_t (&a)[4],
                                         const uint32_t (&b)[2]) {
#ifdef CSQ_CUDA_EMULATOR
  emu_mma<kMmaK>(
      d, a, b,
      [](const EmuFrags* all, int row, int k) {
        return emu_bits_f32(all[4 * (row % 8) + k % 4].a[row / 8 + 2 * (k / 4)]);
      },
      [](const EmuFrags* all, int k, int n) { return emu_bits_f32(all[4 * n + k % 4].b[k / 4]); });
#else
  CSQ_MMA_SYNC("m16n8k8.row.col.f32.tf32.tf32.f32", d, a, b);
#endif
}

// d += A B for one 16 x 8 x 16 tile, T (__half or __nv_bfloat16) operands, two per register.
template <typename T>
__device__ __forceinline__ void mma_f16(float (&d)[4], const uint32_t (&a)[4],
                                        const uint32_t (&b)[2]) {
#ifdef CSQ_CUDA_EMULATOR
  emu_mma<16>(
      d, a, b,
      [](const EmuFrags* all, int row, int k) {
        const uint32_t u = all[4 * (row % 8) + (k % 8) / 2].a[row / 8 + 2 * (k / 8)];
        return emu_bits_16<T>(k % 2 ? u >> 16 : u);
      },
      [](const EmuFrags* all, int k, int n) {
        const uint32_t u = all[4 * n + (k % 8) / 2].b[k / 8];
        return emu_bits_16<T>(k % 2 ? u >> 16 : u);
      });
#else
  if constexpr (std::is_same<T, __half>::value)
    CSQ_MMA_SYNC("m16n8k16.row.col.f32.f16.f16.f32", d, a, b);
  else
    CSQ_MMA_SYNC("m16n8k16.row.col.f32.bf16.bf16.f32", d, a, b);
#endif
}

// The tensor-core counterpart of block_gemm (csq_block_gemm.cuh): for every (m, n) in
// [0, M) x [0, N), emit(m, n, sum_{k < K} a(m, k) b(k, n)). Warps take 16 x 8 output tiles in
// turn; a and b are read only inside [0, M) x [0, K) and [0, K) x [0, N) (zero outside), and
// emit is called once per element by the lane that owns it. Calls no __syncthreads itself.
//
// split (3xTF32): each operand is split into its TF32 part and the TF32 rounding of the rest,
// x = hi + lo, and the product is hi hi + hi lo + lo hi (three mma), which is about as
// accurate as float32 arithmetic. Without it (one mma) every operand is rounded to TF32, a
// relative error of about 2^-11 per product: the features of CSQ cancel (the squared
// similarity is a small difference of large pair terms), so that is the faster, riskier
// option, selected with FwdParams::tensor_core_passes = 1.
template <typename FA, typename FB, typename FE>
__device__ __forceinline__ void block_mma_tf32(int M, int N, int K, const FA& a, const FB& b,
                                               const FE& emit, bool split) {
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const int nwarps = static_cast<int>(blockDim.x) >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int MT = (M + kMmaM - 1) / kMmaM, NT = (N + kMmaN - 1) / kMmaN;
  for (int tile = warp; tile < MT * NT; tile += nwarps) {  // uniform over the warp
    const int m0 = (tile / NT) * kMmaM, n0 = (tile % NT) * kMmaN;
    float d[4] = {0.f, 0.f, 0.f, 0.f};
    auto ld_a = [&](int m, int k) { return m < M && k < K ? a(m, k) : 0.f; };
    auto ld_b = [&](int k, int n) { return k < K && n < N ? b(k, n) : 0.f; };
    for (int k0 = 0; k0 < K; k0 += kMmaK) {
      const float av[4] = {ld_a(m0 + g, k0 + t), ld_a(m0 + g + 8, k0 + t),
                           ld_a(m0 + g, k0 + t + 4), ld_a(m0 + g + 8, k0 + t + 4)};
      const float bv[2] = {ld_b(k0 + t, n0 + g), ld_b(k0 + t + 4, n0 + g)};
      uint32_t ah[4], bh[2];
#pragma unroll
      for (int i = 0; i < 4; ++i) ah[i] = to_tf32(av[i]);
#pragma unroll
      for (int i = 0; i < 2; ++i) bh[i] = to_tf32(bv[i]);
      if (split) {  // the small terms first
        uint32_t al[4], bl[2];
#pragma unroll
        for (int i = 0; i < 4; ++i) al[i] = to_tf32(av[i] - tf32_value(ah[i]));
#pragma unroll
        for (int i = 0; i < 2; ++i) bl[i] = to_tf32(bv[i] - tf32_value(bh[i]));
        mma_tf32(d, al, bh);
        mma_tf32(d, ah, bl);
      }
      mma_tf32(d, ah, bh);
    }
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int m = m0 + g + 8 * (r / 2), n = n0 + 2 * t + r % 2;
      if (m < M && n < N) emit(m, n, d[r]);
    }
  }
}

}  // namespace cuda
}  // namespace csq
