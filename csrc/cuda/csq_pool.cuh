// The state pool's own kernels (csq_pool_prefill_ / csq_pool_decode_, csq_params.h StatePool):
// the rest of the pool ops is the forward's and the decode step's kernels, which find a
// sequence's state through StatePool's slot indices.
//   pool_fresh_kernel    grid (S Hk): the sums of a fresh slot := 0 before anything reads it
//                        (a state whose count is 0 holds no key: the kernels then pick its ref
//                        from the sequence's keys, as for an empty state)
//   pool_ref_out_kernel  grid (S Hk): the forward's r of (sequence, kv head) into its slot's ref
#pragma once

#include "csq_chunked_work.cuh"
#include "csq_launch_checks.cuh"

namespace csq {
namespace cuda {

constexpr int kPoolThreads = 128;

template <typename Acc>
__global__ void __launch_bounds__(kPoolThreads)
    pool_fresh_kernel(const StatePool pool, int64_t heads_k, int64_t head_elems, void* sums) {
  const int64_t tg = blockIdx.x, s = tg / heads_k, g = tg % heads_k;
  if (!state_fresh(pool, s)) return;
  Acc* head = static_cast<Acc*>(sums) + state_sums_offset(pool, s, g, heads_k, head_elems);
  for (int64_t e = threadIdx.x; e < head_elems; e += blockDim.x) head[e] = Acc(0);
}

template <typename Acc>
__global__ void __launch_bounds__(kPoolThreads)
    pool_ref_out_kernel(const FwdParams p, const Work w, void* ref_out) {
  const int64_t tg = blockIdx.x, s = tg / p.heads_k, g = tg % p.heads_k;
  const Acc* src = static_cast<const Acc*>(w.ref) + tg * p.dim_k;
  Acc* dst = static_cast<Acc*>(ref_out) + state_ref_offset(p.pool, s, g, p.heads_k, p.dim_k);
  for (int64_t d = threadIdx.x; d < p.dim_k; d += blockDim.x) dst[d] = src[d];
}

// Zeroes the fresh slots of a pool (no-op without a fresh marker): S sequences, sums of
// head_elems Acc per (slot, kv head).
template <typename Acc>
inline Status launch_pool_fresh(const StatePool& pool, int64_t num_seqs, int64_t heads_k,
                                int64_t head_elems, void* sums, cudaStream_t stream) {
  if (pool.fresh == nullptr || num_seqs * heads_k == 0) return Status{};
  pool_fresh_kernel<Acc><<<unsigned(num_seqs * heads_k), kPoolThreads, 0, stream>>>(
      pool, heads_k, head_elems, sums);
  CSQ_CHECK_LAUNCH("pool_fresh_kernel");
  return Status{};
}

}  // namespace cuda
}  // namespace csq
