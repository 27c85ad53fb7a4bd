// The block GEMM of the chunked path's kernels: a product on shared-memory operands spread over
// the threads of a CTA in register micro-tiles (the CUDA-core counterpart of csq_mma.cuh's
// block_mma_tf32). Torch-free.
#pragma once

#include "csq_elements.cuh"

namespace csq {
namespace cuda {

// Block GEMM on shared memory: for every (m, n) in [0, M) x [0, N), calls
// emit(m, n, sum_{k < K} a(m, k) * b(k, n)). A thread owns micro-tiles of TM consecutive rows
// and TN columns strided by NG = ceil(N / TN), so that consecutive threads read consecutive
// columns of b (no bank conflicts) and threads of one row group read one a (broadcast).
// a(m, k) must be readable for m < ceil(M / TM) * TM and b(k, n) for n < NG * TN: callers pad
// their shared buffers. Tiles go to threads first_thread, first_thread + 1, ... (mod the block
// size), so that a second small product can start on the threads the first one left idle.
// Calls no __syncthreads itself. Returns the number of tiles. KU > 0 unrolls the loop over k
// KU times (1: not at all); 0 leaves it to the compiler, which unrolls a loop it knows to be
// short (K <= 8) completely: too many registers for the float64 state scans.
template <int TM, int TN, typename Acc, int KU = 0, typename FA, typename FB, typename FE>
__device__ __forceinline__ int block_gemm(int M, int N, int K, const FA& a, const FB& b,
                                          const FE& emit, int first_thread = 0) {
  const int MG = (M + TM - 1) / TM, NG = (N + TN - 1) / TN;
  const int nt = static_cast<int>(blockDim.x);
  const int me = (static_cast<int>(threadIdx.x) + nt - first_thread % nt) % nt;
  for (int tile = me; tile < MG * NG; tile += nt) {
    const int m0 = (tile / NG) * TM, n0 = tile % NG;
    Acc acc[TM][TN];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] = Acc(0);
    const auto step = [&](int k) {
      Acc av[TM], bv[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) av[i] = a(m0 + i, k);
#pragma unroll
      for (int j = 0; j < TN; ++j) bv[j] = b(k, n0 + j * NG);
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = fma(av[i], bv[j], acc[i][j]);
    };
    if constexpr (KU > 0) {
#pragma unroll KU
      for (int k = 0; k < K; ++k) step(k);
    } else {
      for (int k = 0; k < K; ++k) step(k);
    }
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        const int m = m0 + i, n = n0 + j * NG;
        if (m < M && n < N) emit(m, n, acc[i][j]);
      }
  }
  return MG * NG;
}

// The same for N = Dv + 1 columns (values and the ones column): the first Dv columns with
// TM x TN micro-tiles, the last column by one thread per row on the threads left idle. This
// keeps the "+1" from costing a whole extra round of micro-tiles.
template <int TM, int TN, typename Acc, int KU = 0, typename FA, typename FB, typename FE>
__device__ __forceinline__ void block_gemm_aug(int M, int dv, int K, const FA& a, const FB& b,
                                               const FE& emit) {
  const int tiles = block_gemm<TM, TN, Acc, KU>(M, dv, K, a, b, emit);
  block_gemm<1, 1, Acc, KU>(
      M, 1, K, a, [&](int k, int) { return b(k, dv); },
      [&](int m, int, Acc val) { emit(m, dv, val); }, tiles);
}

}  // namespace cuda
}  // namespace csq
