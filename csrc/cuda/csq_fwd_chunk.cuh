// The forward's per-chunk kernels, after the key side (csq_keys.cuh):
//   query_shift_kernel   b_i = c_h - tau <q_i, mu'_i>, every query head of a kv head's chunk
//   (state scan, csq_state.cuh: the state part of num~)
//   fwd_finalize_kernel  causal: the in-chunk pairs; den and y
#pragma once

#include "csq_keys.cuh"
#include "csq_pairs.cuh"

namespace csq {
namespace cuda {

// b_i = c_h - tau <q_i, mu'_i> (ChunkKeyMeans) for the rows of chunk t of key head (b, g) and
// every query head of its group. Grid (B Hk, nchunks).
// The minimum of CTAs per SM lifts ptxas's default cap of 64 registers here (spills).
template <typename T, typename Acc, typename Map>
__global__ void __launch_bounds__(kThreads, 3) query_shift_kernel(const FwdParams p, Work w) {
  extern __shared__ __align__(16) unsigned char smem_raw[];  // key_mean_smem_bytes
  Acc* mu_s = reinterpret_cast<Acc*>(smem_raw);
  const int64_t bg = blockIdx.x, t = blockIdx.y, bi = bg / p.heads_k, g = bg % p.heads_k;
  const ChunkSpan c = chunk_span(p, w, bi, t);
  if (!c.valid) return;  // uniform over the block
  const int D = static_cast<int>(p.dim_k);
  const int64_t N = p.seqlen, G = p.group;
  const Acc tau = Acc(p.scale);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
  const int sub = key_mean_rows(D, sizeof(Acc)), ms = D + 1;
  ChunkKeyMeans<T, Acc, Map> means(p, w, c, bi, g, t);
  for (int64_t row0 = c.row0; row0 < c.row1; row0 += sub) {  // uniform over the block
    const int nrows = static_cast<int>(min64(sub, c.row1 - row0));
    __syncthreads();  // mu_s of the previous sub-block is no longer read
    means.fill(mu_s, row0, nrows);
    __syncthreads();
    // One warp per (query head, row).
    for (int64_t e = warp; e < G * nrows; e += nwarps) {
      const int64_t hh = e / nrows, h = g * G + hh, bh = bi * p.heads_q + h;
      const int r = static_cast<int>(e % nrows);
      const int64_t row = row0 + r;
      Acc dot = 0;
      for (int d = lane; d < D; d += 32)
        dot += load_el<Acc, T>(p.q, p.q_stride, bi, h, row, d) * mu_s[r * ms + d];
      dot = warp_sum(dot);
      if (lane == 0)
        static_cast<Acc*>(p.b)[bh * N + row] = static_cast<const Acc*>(p.shift)[h] - tau * dot;
    }
  }
}

// y and den: the state part of num~ (Work::num_state; zero in chunk 0 when causal) plus, causal,
// the in-chunk pairs W_ij = Map::weight(s_ij) (j <= i) directly; then den and
// y = num / (den + eps). Grid (B Hq, nchunks).
template <typename T, typename Acc, typename Map>
__global__ void __launch_bounds__(kThreads) fwd_finalize_kernel(const FwdParams p, Work w) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Acc* A = reinterpret_cast<Acc*>(smem_raw);
  Acc* B = A + kChunkI * kAS;
  Acc* W = B + kChunkI * kAS;
  Acc* den_s = W + kChunkI * kWS;
  const int64_t bh = blockIdx.x, t = blockIdx.y, N = p.seqlen;
  const ChunkRows<T, Acc> cr(p, w, bh, t);
  if (!cr.valid) return;  // an unused chunk slot (cu_seqlens): uniform over the block
  const int Dv = cr.Dv, V1 = Dv + 1;
  const int nrows = cr.nrows;
  const int tid = threadIdx.x, mg = tid / 16, ng = tid % 16;
  const Acc* num = static_cast<const Acc*>(w.num_state) + (bh * N + cr.row0) * V1;

  if (p.causal) {
    Acc s[4][4];
    chunk_scores(cr, nrows, A, B, mg, ng, s);
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int r = 4 * mg + i, c = ng + 16 * j;
        W[r * kWS + c] = c <= r ? Map::weight(s[i][j]) : Acc(0);
      }
    __syncthreads();
    for (int r = tid; r < kChunkI; r += blockDim.x) {
      Acc sum = 0;
      for (int c = 0; c <= r; ++c) sum += W[r * kWS + c];
      den_s[r] = (r < nrows ? num[int64_t(r) * V1 + Dv] : Acc(0)) + sum;
    }
  } else {
    for (int r = tid; r < kChunkI; r += blockDim.x)
      den_s[r] = r < nrows ? num[int64_t(r) * V1 + Dv] : Acc(0);
  }
  __syncthreads();
  Acc* den = static_cast<Acc*>(p.den) + bh * N + cr.row0;
  for (int r = tid; r < nrows; r += blockDim.x) den[r] = den_s[r];

  Acc* y = static_cast<Acc*>(p.y) + (bh * N + cr.row0) * Dv;  // unrounded: see csq_ops.cpp
  const Acc eps = Acc(p.eps);
  for (int v0 = 0; v0 < Dv; v0 += kSlab) {
    Acc o[4][2];
    if (p.causal) {
      __syncthreads();  // the previous slab of B is no longer read
      stage_slab(B, nrows, v0, Dv, [&](int r, int z) { return cr.ve(r, z); });
      __syncthreads();
      pair_times_slab<false>(W, B, mg, ng, o);
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) o[i][0] = o[i][1] = Acc(0);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int r = 4 * mg + i, c = v0 + ng + 16 * j;
        if (r < nrows && c < Dv) {
          Acc val = num[int64_t(r) * V1 + c] + o[i][j];
          if (p.normalize) val /= den_s[r] + eps;
          store_el(y + int64_t(r) * Dv + c, val);
        }
      }
  }
}

}  // namespace cuda
}  // namespace csq
