// Backward tile kernels of the CUDA direct path (generic, CUDA cores). The weights are
// recomputed tile by tile from q, k and the forward's b (as flash attention does):
//   dnum_i = dy_i inv_i,  dden_i = -<dy_i, y_i> inv_i   (direct_row_grad_kernel)
//   ds_ij = 2 s_ij (<dnum_i, v_j> + dden_i),  db_i = sum_j ds_ij
//   dq_i = tau (sum_j ds_ij (k_j - r_T) - (mu_i - r_T) db_i)          direct_dq_kernel
//   dk_j = tau sum_i ds_ij q_i,  dv_j = sum_i w_ij dnum_i              direct_dkdv_kernel
// plus the centering term of dk (direct_center_dk_kernel). Every output element belongs to one
// thread block (dk and dv sum over the query tiles and the query heads of the group inside
// it): no atomics, deterministic.
#pragma once

#include "csq_direct.cuh"

namespace csq {
namespace cuda {
namespace direct {

// s (tau Q (K - r)^T, before the shift) and, with `with_dp`, dp = dnum V^T for one (query
// tile, key tile) pair, in the 16 x 16 layout (rows: queries, columns: keys).
template <typename T, typename Acc>
__device__ __forceinline__ void pair_scores(const DirectBwdParams& p, const TileSmem<Acc>& sm,
                                            const DTile& tq, int64_t h, int64_t kpos, int cols,
                                            bool with_dp, Acc (&s)[4][4], Acc (&dp)[4][4]) {
  const int64_t hk = h / p.group, qpos = tq.start + tq.t0;
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int c = 0; c < 4; ++c) s[a][c] = dp[a][c] = Acc(0);
  slab_product(
      s, static_cast<int>(p.dim_k), sm.As, sm.Bs,
      [&](int r, int x) {
        return r < tq.rows ? load_el<Acc, T>(p.q, p.q_stride, tq.bi, h, qpos + r, x) : Acc(0);
      },
      [&](int r, int x) {
        return r < cols ? load_el<Acc, T>(p.k, p.k_stride, tq.bi, hk, kpos + r, x) - sm.ref[x]
                        : Acc(0);
      });
  if (!with_dp) return;
  const Acc* dy = static_cast<const Acc*>(p.dy);
  slab_product(
      dp, static_cast<int>(p.dim_v), sm.As, sm.Bs,
      [&](int r, int x) {
        return r < tq.rows ? dy[tq.bi * p.dy_stride[0] + h * p.dy_stride[1] +
                                (qpos + r) * p.dy_stride[2] + x * p.dy_stride[3]] *
                                 sm.r1[r]
                           : Acc(0);
      },
      [&](int r, int x) {
        return r < cols ? load_el<Acc, T>(p.v, p.v_stride, tq.bi, hk, kpos + r, x) : Acc(0);
      });
}

// The per-row vectors of query tile tq, head h: r0 = b, r1 = inv, r2 = dden (0 past the tile),
// and its reference key into sm.ref.
template <typename Acc>
__device__ __forceinline__ void load_query_rows(const DirectBwdParams& p, const DirectWork& w,
                                                const TileSmem<Acc>& sm, const DTile& tq,
                                                int64_t h, int64_t slot) {
  const int64_t hk = h / p.group;
  const Acc* ref_g = static_cast<const Acc*>(w.ref) + (hk * w.slots + slot) * p.dim_k;
  for (int d = threadIdx.x; d < p.dim_k; d += kDThreads) sm.ref[d] = ref_g[d];
  for (int i = threadIdx.x; i < kT; i += kDThreads) {
    const bool in = i < tq.rows;
    const int64_t row = in ? out_row(tq, p.heads_q, h, p.seqlen, i) : 0;
    sm.r0[i] = in ? static_cast<const Acc*>(p.b)[row] : Acc(0);
    sm.r1[i] = in ? static_cast<const Acc*>(w.inv)[row] : Acc(0);
    sm.r2[i] = in ? static_cast<const Acc*>(w.dden)[row] : Acc(0);
  }
}

// dq and db. Grid (slots, Hq, ceil(Dk / 64)): one block per (query tile, query head, block of
// 64 columns of dq); every block recomputes s and ds, the first writes db.
template <typename T, typename Acc>
__global__ void __launch_bounds__(kDThreads) direct_dq_kernel(const DirectBwdParams p,
                                                              const DirectWork w) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const TileSmem<Acc> sm(smem_raw);
  const DTile t = direct_tile(p, w, blockIdx.x);
  if (!t.valid) return;
  const int64_t h = blockIdx.y, hk = h / p.group;
  const int D = static_cast<int>(p.dim_k);
  const int c0 = static_cast<int>(blockIdx.z) * kT, ncols = imin(kT, D - c0);
  const Lane16 l = lane16();
  const Acc tau = Acc(p.scale);
  load_query_rows(p, w, sm, t, h, blockIdx.x);

  Acc dq[4][4], db[4];
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    db[a] = Acc(0);
#pragma unroll
    for (int c = 0; c < 4; ++c) dq[a][c] = Acc(0);
  }
  const int64_t end = p.causal ? t.t0 + t.rows : t.len;
  for (int64_t j0 = 0; j0 < end; j0 += kT) {
    const int cols = static_cast<int>(min64(kT, end - j0));
    const bool diag = p.causal && j0 == t.t0;
    const int64_t kpos = t.start + j0;
    Acc s[4][4], dp[4][4];
    pair_scores<T, Acc>(p, sm, t, h, kpos, cols, true, s, dp);
#pragma unroll
    for (int a = 0; a < 4; ++a) {
      const int i = l.ty + 16 * a;
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int j = l.tx + 16 * c;
        const bool keep = i < t.rows && j < cols && (!diag || j <= i);
        const Acc x = tau * s[a][c] + sm.r0[i];
        const Acc ds = keep ? Acc(2) * x * (dp[a][c] + sm.r2[i]) : Acc(0);
        sm.X[i * kLdX + j] = ds;
        db[a] += ds;
      }
    }
    for (int e = threadIdx.x; e < kT * kT; e += kDThreads) {
      const int r = e / kT, c = e % kT;
      sm.Y[r * kLdX + c] =
          r < cols && c < ncols
              ? load_el<Acc, T>(p.k, p.k_stride, t.bi, hk, kpos + r, c0 + c) - sm.ref[c0 + c]
              : Acc(0);
    }
    __syncthreads();
    tile_product<false>(dq, sm.X, sm.Y, diag ? kMaskUpTo : kMaskNone);
  }
  const double* mdiff = static_cast<const double*>(w.mdiff);
  Acc* dq_out = static_cast<Acc*>(p.dq);
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    const Acc dbi = sum16(db[a]);
    const int i = l.ty + 16 * a;
    if (i >= t.rows) continue;
    const int64_t row = out_row(t, p.heads_q, h, p.seqlen, i);
    const int64_t mrow = out_row(t, p.heads_k, hk, p.seqlen, i);
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int col = l.tx + 16 * c;
      if (col >= ncols) continue;
      const double m = mdiff[mrow * D + c0 + col];
      dq_out[row * D + c0 + col] = Acc(p.scale * (double(dq[a][c]) - m * double(dbi)));
    }
    if (blockIdx.z == 0 && l.tx == 0) static_cast<Acc*>(p.db)[row] = dbi;
  }
}

// dk (without its centering term) and dv. Grid (slots, Hk, ceil(Dk / 64) + ceil(Dv / 64)):
// one block per (key tile, key/value head, block of 64 columns of dk or of dv), looping over
// the query heads of the group and the query tiles that see the key tile.
template <typename T, typename Acc>
__global__ void __launch_bounds__(kDThreads, 1) direct_dkdv_kernel(const DirectBwdParams p,
                                                                const DirectWork w) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const TileSmem<Acc> sm(smem_raw);
  const DTile tk = direct_tile(p, w, blockIdx.x);
  if (!tk.valid) return;
  const int64_t hk = blockIdx.y;
  const int D = static_cast<int>(p.dim_k), Dv = static_cast<int>(p.dim_v);
  const int nbk = static_cast<int>(ceil_div(D, kT));
  const bool is_dk = static_cast<int>(blockIdx.z) < nbk;
  const int width = is_dk ? D : Dv;
  const int c0 = (is_dk ? static_cast<int>(blockIdx.z) : static_cast<int>(blockIdx.z) - nbk) * kT;
  const int ncols = imin(kT, width - c0);
  const Lane16 l = lane16();
  const Acc tau = Acc(p.scale);
  const int cols = tk.rows;
  const int64_t kpos = tk.start + tk.t0;
  const Acc* dy = static_cast<const Acc*>(p.dy);

  Acc acc[4][4];
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[a][c] = Acc(0);
  const int64_t nt = ceil_div(tk.len, kT);
  for (int64_t hh = 0; hh < p.group; ++hh) {
    const int64_t h = hk * p.group + hh;
    for (int64_t ti = p.causal ? tk.idx : 0; ti < nt; ++ti) {
      const DTile tq = tile_at(tk, ti);
      const bool diag = p.causal && ti == tk.idx;
      const int64_t qpos = tq.start + tq.t0;
      // The previous pair's readers of these vectors have passed its last barrier.
      load_query_rows(p, w, sm, tq, h, tk.first + ti);
      Acc s[4][4], dp[4][4];
      pair_scores<T, Acc>(p, sm, tq, h, kpos, cols, is_dk, s, dp);
#pragma unroll
      for (int a = 0; a < 4; ++a) {
        const int i = l.ty + 16 * a;
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int j = l.tx + 16 * c;
          const bool keep = i < tq.rows && j < cols && (!diag || j <= i);
          const Acc x = tau * s[a][c] + sm.r0[i];
          const Acc v = is_dk ? Acc(2) * x * (dp[a][c] + sm.r2[i]) : x * x;
          sm.X[i * kLdX + j] = keep ? v : Acc(0);
        }
      }
      for (int e = threadIdx.x; e < kT * kT; e += kDThreads) {
        const int r = e / kT, c = e % kT;
        Acc v = Acc(0);
        if (r < tq.rows && c < ncols) {
          if (is_dk)
            v = load_el<Acc, T>(p.q, p.q_stride, tq.bi, h, qpos + r, c0 + c);
          else
            v = dy[tq.bi * p.dy_stride[0] + h * p.dy_stride[1] + (qpos + r) * p.dy_stride[2] +
                   (c0 + c) * p.dy_stride[3]] *
                sm.r1[r];
        }
        sm.Y[r * kLdX + c] = v;
      }
      __syncthreads();
      tile_product<true>(acc, sm.X, sm.Y, diag ? kMaskFrom : kMaskNone);
      __syncthreads();  // before the next pair's row vectors
    }
  }
  Acc* out = static_cast<Acc*>(is_dk ? p.dk : p.dv);
  const Acc f = is_dk ? tau : Acc(1);
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    const int j = l.ty + 16 * a;
    if (j >= cols) continue;
    const int64_t row = out_row(tk, p.heads_k, hk, p.seqlen, j);
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int col = l.tx + 16 * c;
      if (col < ncols) out[row * width + c0 + col] = f * acc[a][c];
    }
  }
}

}  // namespace direct
}  // namespace cuda
}  // namespace csq
