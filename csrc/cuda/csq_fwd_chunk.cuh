// The forward's per-chunk kernels, after the key side (csq_keys.cuh):
//   query_shift_kernel   b_i = c_h - tau <q_i, mu'_i>, every query head of a kv head's chunk
//   (state scan, csq_state.cuh: the state part of num~)
//   fwd_finalize_kernel  causal: the in-chunk pairs; den and y
#pragma once

#include "csq_key_chunk.cuh"
#include "csq_pair_chunk.cuh"

namespace csq {
namespace cuda {

// b_i = c_h - tau <q_i, mu'_i> (ChunkKeyMeans) for the rows of chunk t of key head (b, g) and
// every query head of its group. Grid (B Hk, nchunks).
// The minimum of CTAs per SM lifts ptxas's default cap of 64 registers here (spills).
template <typename T, typename Acc, typename Map>
__global__ void __launch_bounds__(kThreads, 3) query_shift_kernel(const FwdParams p, Work w) {
  const KeyChunk<Acc> kc(p, w);
  if (!kc.c.valid) return;  // uniform over the block
  ChunkKeyMeans<T, Acc, Map> means(p, w, kc.c, kc.bi, kc.g, kc.t);
  for_each_query_mean(p, kc, means, [&](int64_t h, int64_t row, const Acc* mu) {
    const Acc dot = query_dot<T>(p, kc, h, row, mu);
    if ((threadIdx.x & 31) == 0)
      static_cast<Acc*>(p.b)[(kc.bi * p.heads_q + h) * kc.N + row] =
          static_cast<const Acc*>(p.shift)[h] - kc.tau * dot;
  });
}

// y and den: the state part of num~ (Work::num_state; zero in chunk 0 when causal) plus, causal,
// the in-chunk pairs W_ij = Map::weight(s_ij) (j <= i) directly; then den and
// y = num / (den + eps). Grid (B Hq, nchunks).
template <typename T, typename Acc, typename Map>
__global__ void __launch_bounds__(kThreads) fwd_finalize_kernel(const FwdParams p, Work w) {
  extern __shared__ __align__(16) unsigned char smem_raw[];  // finalize_smem_bytes
  const PairChunk<T, Acc> cr(p, w, smem_raw);
  if (!cr.valid) return;  // an unused chunk slot (cu_seqlens): uniform over the block
  const int Dv = cr.Dv, V1 = Dv + 1, nrows = cr.nrows;
  Acc* W = cr.pair_matrix(0);
  Acc* den_s = cr.pair_matrix(1);
  const Acc* num = cr.query_rows(w.num_state, V1);

  if (p.causal) {
    Acc s[4][4];
    chunk_scores(cr, nrows, cr.A, cr.B, cr.mg, cr.ng, s);
    cr.fill_causal(W, [&](int i, int j) { return Map::weight(s[i][j]); });
    __syncthreads();
    for (int r = threadIdx.x; r < kChunkI; r += blockDim.x) {
      Acc sum = 0;
      for (int c = 0; c <= r; ++c) sum += W[r * kWS + c];
      den_s[r] = (r < nrows ? num[int64_t(r) * V1 + Dv] : Acc(0)) + sum;
    }
  } else {
    for (int r = threadIdx.x; r < kChunkI; r += blockDim.x)
      den_s[r] = r < nrows ? num[int64_t(r) * V1 + Dv] : Acc(0);
  }
  __syncthreads();
  Acc* den = cr.query_rows(p.den, 1);
  for (int r = threadIdx.x; r < nrows; r += blockDim.x) den[r] = den_s[r];

  Acc* y = cr.query_rows(p.y, Dv);  // unrounded: see csq_ops.cpp
  const Acc eps = Acc(p.eps);
  // o: the in-chunk pairs' part of num~ (causal only).
  const auto emit_y = [&](int r, int c, Acc o) {
    Acc val = num[int64_t(r) * V1 + c] + o;
    if (p.normalize) val /= den_s[r] + eps;
    store_el(y + int64_t(r) * Dv + c, val);
  };
  if (p.causal)
    cr.template pairs_times_rows<false>(W, cr.B, Dv, [&](int r, int z) { return cr.ve(r, z); },
                                        emit_y);
  else
    for (int e = threadIdx.x; e < nrows * Dv; e += blockDim.x) emit_y(e / Dv, e % Dv, Acc(0));
}

}  // namespace cuda
}  // namespace csq
