// The CTA of the chunked path's per-(kv head, chunk slot) kernels, grid (B Hk, nchunks):
// query_shift_kernel (csq_fwd_chunk.cuh) and the backward's centering kernels
// (csq_bwd_center.cuh). What they share: the CTA's coordinates and chunk, and the walk of
// query_shift_kernel and center_dq_kernel over the chunk's query rows with their key means mu'.
#pragma once

#include "csq_keys.cuh"

namespace csq {
namespace cuda {

// Chunk slot t of kv head bg = (batch entry bi, kv head g), from the grid, and the sizes every
// such kernel reads. An unused slot (cu_seqlens) has !c.valid: the CTA returns.
template <typename Acc>
struct KeyChunk {
  int64_t bg, t, bi, g;
  ChunkSpan c;  // the chunk's sequence and global rows [c.row0, c.row1)
  int D;
  int64_t N;
  Acc tau;
  __device__ KeyChunk(const FwdParams& p, const Work& w)
      : bg(blockIdx.x), t(blockIdx.y), bi(bg / p.heads_k), g(bg % p.heads_k),
        c(chunk_span(p, w, bi, t)), D(static_cast<int>(p.dim_k)), N(p.seqlen),
        tau(Acc(p.scale)) {}
};

// visit(h, row, mu) for every (query head h of the group, row of the chunk), one warp each,
// with mu = mu'_row (D values in shared memory, key_mean_smem_bytes: the means of the rows of
// a sub-block, key_mean_rows at a time). Every thread of the block calls it.
template <typename T, typename Acc, typename Map, typename Visit>
__device__ __forceinline__ void for_each_query_mean(const FwdParams& p, const KeyChunk<Acc>& kc,
                                                    ChunkKeyMeans<T, Acc, Map>& means,
                                                    const Visit& visit) {
  extern __shared__ __align__(16) unsigned char smem_raw[];  // key_mean_smem_bytes
  Acc* mu_s = reinterpret_cast<Acc*>(smem_raw);
  const int warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int64_t G = p.group;
  const int sub = key_mean_rows(kc.D, sizeof(Acc)), ms = kc.D + 1;
  for (int64_t row0 = kc.c.row0; row0 < kc.c.row1; row0 += sub) {  // uniform over the block
    const int nrows = static_cast<int>(min64(sub, kc.c.row1 - row0));
    __syncthreads();  // mu_s of the previous sub-block is no longer read
    means.fill(mu_s, row0, nrows);
    __syncthreads();
    for (int64_t e = warp; e < G * nrows; e += nwarps) {
      const int r = static_cast<int>(e % nrows);
      visit(kc.g * G + e / nrows, row0 + r, mu_s + r * ms);
    }
  }
}

// <q_i, mu> of query row i = (head h, row) of the chunk, summed over the warp: every lane has it.
template <typename T, typename Acc>
__device__ __forceinline__ Acc query_dot(const FwdParams& p, const KeyChunk<Acc>& kc, int64_t h,
                                         int64_t row, const Acc* mu) {
  Acc dot = 0;
  for (int d = threadIdx.x & 31; d < kc.D; d += 32)
    dot += load_el<Acc, T>(p.q, p.q_stride, kc.bi, h, row, d) * mu[d];
  return warp_sum(dot);
}

}  // namespace cuda
}  // namespace csq
