// The per-chunk kernels: one CTA per (batch, query head, chunk of C = 64 positions).
//   fwd_finalize_kernel  causal: the in-chunk pairs W_ij = s_ij^2 (j <= i) directly, added to
//                        the state part of num~; then den and y = num / (den + eps).
//   bwd_prep_kernel      g~_i = [dnum_i, dden_i] from dy, y, den.
//   bwd_intra_kernel     causal: the in-chunk pairs of the backward (dq, db, dk, dv).
// The C x C blocks are computed from slabs of kSlab feature columns staged in shared memory;
// each of the 256 threads owns a 4 x 4 block of the 64 x 64 pair matrix: rows 4 mg .. 4 mg + 3
// and columns ng + 16 j (mg = tid / 16, ng = tid % 16).
#pragma once

#include "csq_common.cuh"

namespace csq {
namespace cuda {

constexpr int kAS = kSlab + 1;   // row stride of a staged slab
constexpr int kWS = kChunkI + 1; // row stride of a C x C block

template <typename Acc>
inline size_t finalize_smem_bytes() {
  return sizeof(Acc) * size_t(2 * kChunkI * kAS + kChunkI * kWS + kChunkI);
}
template <typename Acc>
inline size_t intra_smem_bytes() {
  return sizeof(Acc) * size_t(2 * kChunkI * kAS + 2 * kChunkI * kWS);
}

// buf[r][c] = src(r, z0 + c) for r < nrows and z0 + c < zmax, else 0 (r < C, c < kSlab).
template <typename Acc, typename Src>
__device__ __forceinline__ void stage_slab(Acc* buf, int nrows, int z0, int zmax,
                                           const Src& src) {
  for (int e = threadIdx.x; e < kChunkI * kSlab; e += blockDim.x) {
    const int r = e / kSlab, c = e % kSlab, z = z0 + c;
    buf[r * kAS + c] = (r < nrows && z < zmax) ? src(r, z) : Acc(0);
  }
}

// acc[i][j] += sum_c A[4 mg + i][c] B[ng + 16 j][c] over one staged slab.
template <typename Acc>
__device__ __forceinline__ void pair_block_slab(const Acc* A, const Acc* B, int mg, int ng,
                                                Acc (&acc)[4][4]) {
#pragma unroll 4
  for (int c = 0; c < kSlab; ++c) {
    Acc av[4], bv[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) av[i] = A[(4 * mg + i) * kAS + c];
#pragma unroll
    for (int j = 0; j < 4; ++j) bv[j] = B[(ng + 16 * j) * kAS + c];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = fma(av[i], bv[j], acc[i][j]);
  }
}

// out[i][j] = sum_l P(row, l) B[l][ng + 16 j] with row = 4 mg + i: a 64 x kSlab product with
// a causal pair matrix P (C x C, stride kWS, indexed [query][key]) on the left. Not transposed:
// rows are queries, l runs over keys l <= row. Transposed: rows are keys, P is read as
// P[l][row] and l runs over queries l >= row. The pairs outside the causal triangle are zero in
// P, and are skipped rather than multiplied, so that a NaN or Inf in B (a key or value after
// the query) does not leak into earlier rows through 0 * NaN.
template <bool kTrans, typename Acc>
__device__ __forceinline__ void pair_times_slab(const Acc* P, const Acc* B, int mg, int ng,
                                                Acc (&out)[4][2]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) out[i][0] = out[i][1] = Acc(0);
#pragma unroll 4
  for (int l = 0; l < kChunkI; ++l) {
    const Acc b0 = B[l * kAS + ng], b1 = B[l * kAS + ng + 16];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = 4 * mg + i;
      const Acc pv = kTrans ? P[l * kWS + row] : P[row * kWS + l];
      if (kTrans ? l >= row : l <= row) {
        out[i][0] = fma(pv, b0, out[i][0]);
        out[i][1] = fma(pv, b1, out[i][1]);
      }
    }
  }
}

// Row sources of one (batch, head, chunk slot): the extended vectors of the spec's
// decomposition. Rows r < nrows are global rows row0 + r of the chunk's sequence.
template <typename T, typename Acc>
struct ChunkRows {
  const AttnParams& p;
  int64_t bi, h, g, bh, bg, row0;
  int D, Dv, nrows;
  bool valid;
  Acc tau;
  const Acc* ref;
  const Acc* bsave;
  __device__ ChunkRows(const AttnParams& p_, const Work& w, int64_t bh_, int64_t t)
      : p(p_), bh(bh_) {
    bi = bh / p.heads_q;
    h = bh % p.heads_q;
    g = h / p.group;
    bg = bi * p.heads_k + g;
    const ChunkSpan c = chunk_span(p, w, bi, t);
    valid = c.valid;
    row0 = c.row0;
    nrows = static_cast<int>(c.row1 - c.row0);
    D = static_cast<int>(p.dim_k);
    Dv = static_cast<int>(p.dim_v);
    tau = Acc(p.scale);
    ref = static_cast<const Acc*>(w.ref) + (c.seq * p.heads_k + g) * D;
    bsave = static_cast<const Acc*>(p.b) + bh * p.seqlen + row0;
  }
  __device__ Acc qe(int r, int z) const {
    return z < D ? tau * load_el<Acc, T>(p.q, p.q_stride, bi, h, row0 + r, z) : bsave[r];
  }
  __device__ Acc ke(int r, int z) const {
    return z < D ? load_el<Acc, T>(p.k, p.k_stride, bi, g, row0 + r, z) - ref[z] : Acc(1);
  }
  __device__ Acc ve(int r, int z) const {
    return z < Dv ? load_el<Acc, T>(p.v, p.v_stride, bi, g, row0 + r, z) : Acc(1);
  }
};

// s_ij = <qe_i, ke_j> for the thread's 4 x 4 pairs, slab by slab over the De coordinates.
template <typename T, typename Acc>
__device__ __forceinline__ void chunk_scores(const ChunkRows<T, Acc>& cr, int nrows, Acc* A,
                                             Acc* B, int mg, int ng, Acc (&s)[4][4]) {
  const int De = cr.D + 1;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) s[i][j] = Acc(0);
  for (int z0 = 0; z0 < De; z0 += kSlab) {
    __syncthreads();  // the previous users of A and B are done
    stage_slab(A, nrows, z0, De, [&](int r, int z) { return cr.qe(r, z); });
    stage_slab(B, nrows, z0, De, [&](int r, int z) { return cr.ke(r, z); });
    __syncthreads();
    pair_block_slab(A, B, mg, ng, s);
  }
}

// Grid (B Hq, nchunks). Work::rows holds the state part of num~ (zero in chunk 0 when causal).
template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads) fwd_finalize_kernel(const AttnParams p, Work w) {
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
  const Acc* num = static_cast<const Acc*>(w.rows) + (bh * N + cr.row0) * V1;

  if (p.causal) {
    Acc s[4][4];
    chunk_scores(cr, nrows, A, B, mg, ng, s);
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int r = 4 * mg + i, c = ng + 16 * j;
        W[r * kWS + c] = c <= r ? s[i][j] * s[i][j] : Acc(0);
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

// Grid (B Hq, nchunks), 8 warps, one row per warp at a time. Writes g~ into Work::rows.
template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads) bwd_prep_kernel(const AttnParams p, Work w) {
  const int64_t bh = blockIdx.x, t = blockIdx.y, N = p.seqlen;
  const int64_t bi = bh / p.heads_q, h = bh % p.heads_q;
  const int Dv = static_cast<int>(p.dim_v), V1 = Dv + 1;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const Acc eps = Acc(p.eps);
  const ChunkSpan c = chunk_span(p, w, bi, t);
  for (int64_t row = c.row0 + warp; row < c.row1; row += nwarps) {
    Acc* gr = static_cast<Acc*>(w.rows) + (bh * N + row) * V1;
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
//   dS = 2 s E:  dqe_i += sum_j dS_ij ke_j (dq += tau dqe[:D], db += dqe[D]),
//                dke_j += sum_i dS_ij qe_i (dk += dke[:D]);   W = s^2: dv_j += sum_i W_ij dnum_i.
// dq and db rows belong to this CTA (plain read-modify-write after the state kernel); dk and
// dv are shared by the query heads of a group (atomics).
template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads) bwd_intra_kernel(const AttnParams p, Work w) {
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
  const Acc* gs = static_cast<const Acc*>(w.rows) + (bh * N + cr.row0) * V1;
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
      dS[r * kWS + c] = on ? Acc(2) * s[i][j] * e[i][j] : Acc(0);
      W[r * kWS + c] = on ? s[i][j] * s[i][j] : Acc(0);
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
