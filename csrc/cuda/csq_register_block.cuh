// The CUDA-core products' inner step, shared by the direct path's CUDA-core engine
// (csq_direct_engine_cores.cuh) and the chunked path's in-chunk pairs (csq_pairs.cuh): each
// thread owns a 4 x 4 block of a 64 x 64 result in registers and adds one rank-1 term per
// step, reading its 4 + 4 operand values once for 16 fma.
#pragma once

#include "csq_elements.cuh"  // the CUDA runtime (or the emulator's): fma

namespace csq {
namespace cuda {

// acc[i][j] += a(i) b(j) for i, j < 4: a(i) the left operand's value for the thread's row i, b(j)
// the right one's for its column j (shared-memory reads, inlined).
template <typename Acc, typename FA, typename FB>
__device__ __forceinline__ void outer_product_step(Acc (&acc)[4][4], const FA& a, const FB& b) {
  Acc av[4], bv[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) av[i] = a(i);
#pragma unroll
  for (int j = 0; j < 4; ++j) bv[j] = b(j);
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = fma(av[i], bv[j], acc[i][j]);
}

}  // namespace cuda
}  // namespace csq
