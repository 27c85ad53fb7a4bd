// Forward tile kernel of the CUDA direct path (generic: every dtype, products on the CUDA cores
// in the accumulation dtype). One thread block per (query tile of 64 positions, query head,
// block of 64 value columns): for every key tile it sees, s = tau Q (K - r_T)^T + b (Dk in
// slabs of 32), w = s^2 masked, then [num | den] += w [V | 1]. Causal key tiles after the query
// tile are skipped; the diagonal tile masks j > i by selection. See README.md, "Direct path".
#pragma once

#include "csq_direct.cuh"

namespace csq {
namespace cuda {
namespace direct {

// Grid (slots, Hq, ceil(Dv / 64)); kDThreads threads; kDirectSmemElems Acc of shared memory.
// p.b must hold b (direct_rows_kernel) and w.ref the tile references.
template <typename T, typename Acc, typename Map>
__global__ void __launch_bounds__(kDThreads) direct_fwd_kernel(const DirectFwdParams p,
                                                               const DirectWork w) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const TileSmem<Acc> sm(smem_raw);
  const DTile t = direct_tile(p, w, blockIdx.x);
  if (!t.valid) return;
  const int64_t h = blockIdx.y, hk = h / p.group;
  const int D = static_cast<int>(p.dim_k), Dv = static_cast<int>(p.dim_v);
  const int c0 = static_cast<int>(blockIdx.z) * kT, ncols = imin(kT, Dv - c0);
  const Lane16 l = lane16();
  const Acc tau = Acc(p.scale);
  const Acc* ref_g = static_cast<const Acc*>(w.ref) + (hk * w.slots + blockIdx.x) * D;
  for (int d = threadIdx.x; d < D; d += kDThreads) sm.ref[d] = ref_g[d];
  for (int i = threadIdx.x; i < kT; i += kDThreads)
    sm.r0[i] = i < t.rows ? static_cast<const Acc*>(p.b)[out_row(t, p.heads_q, h, p.seqlen, i)]
                          : Acc(0);
  const int64_t qpos = t.start + t.t0;
  const auto q_at = [&](int r, int x) {
    return r < t.rows ? load_el<Acc, T>(p.q, p.q_stride, t.bi, h, qpos + r, x) : Acc(0);
  };

  Acc num[4][4], den[4];
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    den[a] = Acc(0);
#pragma unroll
    for (int c = 0; c < 4; ++c) num[a][c] = Acc(0);
  }
  const int64_t end = p.causal ? t.t0 + t.rows : t.len;
  for (int64_t j0 = 0; j0 < end; j0 += kT) {
    const int cols = static_cast<int>(min64(kT, end - j0));
    const bool diag = p.causal && j0 == t.t0;
    const int64_t kpos = t.start + j0;
    Acc s[4][4];
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
      for (int c = 0; c < 4; ++c) s[a][c] = Acc(0);
    slab_product(s, D, sm.As, sm.Bs, q_at, [&](int r, int x) {
      return r < cols ? load_el<Acc, T>(p.k, p.k_stride, t.bi, hk, kpos + r, x) - sm.ref[x]
                      : Acc(0);
    });
    // w = Map::weight(tau s + b_i) where kept (selected, so a masked NaN stays out), into X.
#pragma unroll
    for (int a = 0; a < 4; ++a) {
      const int i = l.ty + 16 * a;
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int j = l.tx + 16 * c;
        const bool keep = i < t.rows && j < cols && (!diag || j <= i);
        const Acc x = tau * s[a][c] + sm.r0[i];
        const Acc wv = keep ? Map::weight(x) : Acc(0);
        sm.X[i * kLdX + j] = wv;
        den[a] += wv;
      }
    }
    for (int e = threadIdx.x; e < kT * kT; e += kDThreads) {
      const int r = e / kT, c = e % kT;
      sm.Y[r * kLdX + c] = r < cols && c < ncols
                               ? load_el<Acc, T>(p.v, p.v_stride, t.bi, hk, kpos + r, c0 + c)
                               : Acc(0);
    }
    __syncthreads();
    tile_product<false>(num, sm.X, sm.Y, diag ? kMaskUpTo : kMaskNone);
  }
  Acc* y = static_cast<Acc*>(p.y);
  const Acc* row_sums = static_cast<const Acc*>(p.row_sums);  // (rows, Dv + 1) or none
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    Acc dsum = sum16(den[a]);
    const int i = l.ty + 16 * a;
    if (i >= t.rows) continue;
    const int64_t row = out_row(t, p.heads_q, h, p.seqlen, i);
    const Acc* extra = row_sums ? row_sums + row * (Dv + 1) : nullptr;
    if (extra) dsum += extra[Dv];
    const Acc inv = p.normalize ? Acc(1) / (dsum + Acc(p.eps)) : Acc(1);
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int col = l.tx + 16 * c;
      if (col < ncols)
        y[row * Dv + c0 + col] = (num[a][c] + (extra ? extra[c0 + col] : Acc(0))) * inv;
    }
    if (blockIdx.z == 0 && l.tx == 0) static_cast<Acc*>(p.den)[row] = dsum;
  }
}

}  // namespace direct
}  // namespace cuda
}  // namespace csq
