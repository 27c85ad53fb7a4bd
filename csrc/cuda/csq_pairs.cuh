// The in-chunk pairs, shared by the forward's and the backward's per-chunk kernels: one CTA
// per (batch, query head, chunk of C = 64 positions) computes the C x C block of pairs
// s_ij = <qe_i, ke_j> (j <= i) directly, from slabs of kSlab coordinates staged in shared
// memory; each of the 256 threads owns a 4 x 4 block of the 64 x 64 pair matrix: rows
// 4 mg .. 4 mg + 3 and columns ng + 16 j (mg = tid / 16, ng = tid % 16).
#pragma once

#include "csq_chunked_work.cuh"
#include "csq_register_block.cuh"

namespace csq {
namespace cuda {

constexpr int kAS = kSlab + 1;   // row stride of a staged slab
constexpr int kWS = kChunkI + 1; // row stride of a C x C block

template <typename Acc>
inline size_t finalize_smem_bytes() {
  return sizeof(Acc) * size_t(2 * kChunkI * kAS + kChunkI * kWS + kChunkI);
}
template <typename Acc>
inline size_t bwd_pairs_smem_bytes() {
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
  for (int c = 0; c < kSlab; ++c)
    outer_product_step(acc, [&](int i) { return A[(4 * mg + i) * kAS + c]; },
                       [&](int j) { return B[(ng + 16 * j) * kAS + c]; });
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
  const FwdParams& p;
  int64_t bi, h, g, bh, bg, row0;
  int D, Dv, nrows;
  bool valid;
  Acc tau;
  const Acc* ref;
  const Acc* bsave;
  __device__ ChunkRows(const FwdParams& p_, const Work& w, int64_t bh_, int64_t t)
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

}  // namespace cuda
}  // namespace csq
