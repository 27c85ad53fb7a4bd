// The backward's per-chunk kernels (before and beside the state scans):
//   grad_ext_kernel   g~_i = [dnum_i, dden_i] from dy, y, den
//   bwd_pairs_kernel  causal: the in-chunk pairs of the backward (dq, db, dk, dv)
#pragma once

#include "csq_pair_chunk.cuh"

namespace csq {
namespace cuda {

// g~_i = [dnum_i, dden_i] from dy, y, den into Work::g_ext. Grid (B Hq, nchunks), 8 warps, one
// row per warp at a time.
template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads) grad_ext_kernel(const BwdParams p, Work w) {
  const int64_t bh = blockIdx.x, t = blockIdx.y, N = p.seqlen;
  const int64_t bi = bh / p.heads_q, h = bh % p.heads_q;
  const int Dv = static_cast<int>(p.dim_v), V1 = Dv + 1;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const Acc eps = Acc(p.eps);
  const ChunkSpan c = chunk_span(p, w, bi, t);
  for (int64_t row = c.row0 + warp; row < c.row1; row += nwarps) {
    Acc* gr = static_cast<Acc*>(w.g_ext) + (bh * N + row) * V1;
    if (p.normalize) {
      const Acc inv = Acc(1) / (static_cast<const Acc*>(p.den)[bh * N + row] + eps);
      const Acc* yr = static_cast<const Acc*>(p.y) + (bh * N + row) * Dv;
      Acc dot = 0;
      for (int v = lane; v < Dv; v += 32) {
        const Acc d = load_el<Acc, Acc>(p.dy, p.dy_stride, bi, h, row, v);
        gr[v] = d * inv;
        dot += d * to_acc<Acc>(yr[v]);
      }
      dot = warp_sum(dot);
      if (lane == 0) gr[Dv] = -dot * inv;
    } else {
      for (int v = lane; v < Dv; v += 32) gr[v] = load_el<Acc, Acc>(p.dy, p.dy_stride, bi, h, row, v);
      if (lane == 0) gr[Dv] = Acc(0);
    }
  }
}

// Grid (B Hq, nchunks), causal only. With s = <qe_i, ke_j>, E = <g~_i, v~_j>, j <= i:
//   dS = w'(s) E (2 s E for CSQ):  dqe_i += sum_j dS_ij ke_j (dq += tau dqe[:D], db += dqe[D]),
//                dke_j += sum_i dS_ij qe_i (dk += dke[:D]);   W = w(s): dv_j += sum_i W_ij dnum_i.
// dq and db rows belong to this CTA (plain read-modify-write after the state kernel); dk and
// dv are shared by the query heads of a group (atomics).
template <typename T, typename Acc, typename Map>
__global__ void __launch_bounds__(kThreads) bwd_pairs_kernel(const BwdParams p, Work w) {
  extern __shared__ __align__(16) unsigned char smem_raw[];  // bwd_pairs_smem_bytes
  const PairChunk<T, Acc> cr(p, w, smem_raw);
  if (!cr.valid) return;  // an unused chunk slot (cu_seqlens): uniform over the block
  const int D = cr.D, Dv = cr.Dv, V1 = Dv + 1, nrows = cr.nrows;
  Acc* dS = cr.pair_matrix(0);
  Acc* W = cr.pair_matrix(1);
  const Acc* gs = cr.query_rows(w.g_ext, V1);
  auto ge = [&](int r, int z) { return gs[int64_t(r) * V1 + z]; };

  Acc s[4][4], e[4][4];
  chunk_scores(cr, nrows, cr.A, cr.B, cr.mg, cr.ng, s);
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) e[i][j] = Acc(0);
  for (int z0 = 0; z0 < V1; z0 += kSlab) {
    __syncthreads();
    stage_slab(cr.A, nrows, z0, V1, ge);
    stage_slab(cr.B, nrows, z0, V1, [&](int r, int z) { return cr.ve(r, z); });
    __syncthreads();
    pair_block_slab(cr.A, cr.B, cr.mg, cr.ng, e);
  }
  cr.fill_causal(dS, [&](int i, int j) { return Map::weight_grad(s[i][j]) * e[i][j]; });
  cr.fill_causal(W, [&](int i, int j) { return Map::weight(s[i][j]); });

  // dq, db: rows i, coordinates z of ke (z == D: b's).
  Acc* dq = cr.query_rows(p.dq, D);
  Acc* db = cr.query_rows(p.db, 1);
  cr.template pairs_times_rows<false>(
      dS, cr.B, D + 1, [&](int r, int z) { return cr.ke(r, z); },
      [&](int r, int z, Acc o) {
        if (z < D)
          dq[int64_t(r) * D + z] += cr.tau * o;
        else
          db[r] += o;
      });
  // dk: key rows j, coordinates z < D of qe.
  Acc* dk = cr.key_rows(p.dk, D);
  cr.template pairs_times_rows<true>(
      dS, cr.A, D, [&](int r, int z) { return cr.qe(r, z); },
      [&](int r, int z, Acc o) { atomicAdd(dk + int64_t(r) * D + z, o); });
  // dv: key rows j, value coordinates v < Dv of g~ (dnum).
  Acc* dv = cr.key_rows(p.dv, Dv);
  cr.template pairs_times_rows<true>(
      W, cr.A, Dv, ge, [&](int r, int z, Acc o) { atomicAdd(dv + int64_t(r) * Dv + z, o); });
}

}  // namespace cuda
}  // namespace csq
