// The backward's per-chunk kernels (before and beside the state scans):
//   grad_ext_kernel   g~_i = [dnum_i, dden_i] from dy, y, den
//   bwd_pairs_kernel  causal: the in-chunk pairs of the backward (dq, db, dk, dv)
#pragma once

#include "csq_pairs.cuh"

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
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Acc* A = reinterpret_cast<Acc*>(smem_raw);
  Acc* B = A + kChunkI * kAS;
  Acc* dS = B + kChunkI * kAS;
  Acc* W = dS + kChunkI * kWS;
  const int64_t bh = blockIdx.x, t = blockIdx.y, N = p.seqlen;
  const ChunkRows<T, Acc> cr(p, w, bh, t);
  if (!cr.valid) return;  // an unused chunk slot (cu_seqlens): uniform over the block
  const int D = cr.D, De = D + 1, Dv = cr.Dv, V1 = Dv + 1;
  const int nrows = cr.nrows;
  const int tid = threadIdx.x, mg = tid / 16, ng = tid % 16;
  const Acc* gs = static_cast<const Acc*>(w.g_ext) + (bh * N + cr.row0) * V1;
  auto ge = [&](int r, int z) { return gs[int64_t(r) * V1 + z]; };

  Acc s[4][4], e[4][4];
  chunk_scores(cr, nrows, A, B, mg, ng, s);
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) e[i][j] = Acc(0);
  for (int z0 = 0; z0 < V1; z0 += kSlab) {
    __syncthreads();
    stage_slab(A, nrows, z0, V1, ge);
    stage_slab(B, nrows, z0, V1, [&](int r, int z) { return cr.ve(r, z); });
    __syncthreads();
    pair_block_slab(A, B, mg, ng, e);
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int r = 4 * mg + i, c = ng + 16 * j;
      const bool on = c <= r && r < nrows;
      dS[r * kWS + c] = on ? Map::weight_grad(s[i][j]) * e[i][j] : Acc(0);
      W[r * kWS + c] = on ? Map::weight(s[i][j]) : Acc(0);
    }

  // dq, db: rows i, coordinates z of ke.
  Acc* dq = static_cast<Acc*>(p.dq) + (bh * N + cr.row0) * D;
  Acc* db = static_cast<Acc*>(p.db) + bh * N + cr.row0;
  for (int z0 = 0; z0 < De; z0 += kSlab) {
    __syncthreads();  // dS and W are written; the previous slab of B is no longer read
    stage_slab(B, nrows, z0, De, [&](int r, int z) { return cr.ke(r, z); });
    __syncthreads();
    Acc o[4][2];
    pair_times_slab<false>(dS, B, mg, ng, o);
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int r = 4 * mg + i, z = z0 + ng + 16 * j;
        if (r >= nrows) continue;
        if (z < D)
          dq[int64_t(r) * D + z] += cr.tau * o[i][j];
        else if (z == D)
          db[r] += o[i][j];
      }
  }

  // dk: key rows j, coordinates z < D of qe.
  Acc* dk = static_cast<Acc*>(p.dk) + (cr.bg * N + cr.row0) * D;
  for (int z0 = 0; z0 < D; z0 += kSlab) {
    __syncthreads();
    stage_slab(A, nrows, z0, D, [&](int r, int z) { return cr.qe(r, z); });
    __syncthreads();
    Acc o[4][2];
    pair_times_slab<true>(dS, A, mg, ng, o);
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int r = 4 * mg + i, z = z0 + ng + 16 * j;
        if (r < nrows && z < D) atomicAdd(dk + int64_t(r) * D + z, o[i][j]);
      }
  }

  // dv: key rows j, value coordinates v < Dv of g~ (dnum).
  Acc* dv = static_cast<Acc*>(p.dv) + (cr.bg * N + cr.row0) * Dv;
  for (int z0 = 0; z0 < Dv; z0 += kSlab) {
    __syncthreads();
    stage_slab(A, nrows, z0, Dv, ge);
    __syncthreads();
    Acc o[4][2];
    pair_times_slab<true>(W, A, mg, ng, o);
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int r = 4 * mg + i, z = z0 + ng + 16 * j;
        if (r < nrows && z < Dv) atomicAdd(dv + int64_t(r) * Dv + z, o[i][j]);
      }
  }
}

}  // namespace cuda
}  // namespace csq
