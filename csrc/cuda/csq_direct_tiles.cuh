// The tile kernels of the CUDA direct path, written once over an engine E (README.md, "Direct
// path"): csq_direct_engine_cores.cuh (every dtype, CUDA cores) or csq_direct_engine_mma.cuh
// (bfloat16 / float16, mma.sync). A thread block takes a query (or key) tile of 64 positions,
// a head and a block of 64 output columns; the engine owns the products and which elements of
// the 64 x 64 results a thread holds (E::Place: element (u, v) of its acc[4][4] is row
// row(u, v), column col(u, v)); the kernels own the elementwise steps, masking and outputs.
//
// Forward, for every key tile the query tile sees: s = tau Q (K - r_T)^T + b (Dk in slabs of
// 32), w = Map::weight(s) masked, then [num | den] += w [V | 1]. Causal key tiles after the
// query tile are skipped; the diagonal tile masks j > i by selection. Backward, the weights
// recomputed tile by tile from q, k and the forward's b (as flash attention does):
//   dnum_i = dy_i inv_i,  dden_i = -<dy_i, y_i> inv_i   (direct_row_grad_kernel)
//   ds_ij = w'(s_ij) (<dnum_i, v_j> + dden_i),  db_i = sum_j ds_ij
//   dq_i = tau (sum_j ds_ij (k_j - r_T) - m_i db_i)                   direct_dq_kernel
//   dk_j = tau sum_i ds_ij q_i,  dv_j = sum_i w_ij dnum_i              direct_dkdv_kernel
// plus the centering term of dk (direct_center_dk_kernel, csq_direct.cuh). Every output
// element belongs to one thread block (dk and dv sum over the query tiles and the query heads
// of the group inside it): no atomics, deterministic.
#pragma once

#include "csq_direct.cuh"

namespace csq {
namespace cuda {
namespace direct {

template <typename Acc>
__device__ __forceinline__ void zero_tile(Acc (&acc)[4][4]) {
#pragma unroll
  for (int u = 0; u < 4; ++u)
#pragma unroll
    for (int v = 0; v < 4; ++v) acc[u][v] = Acc(0);
}

// The per-row vectors of query tile tq, head h: r0 = b and (BWD) r1 = inv, r2 = dden (0 past
// the tile), and its reference key into sm.ref. P: DirectFwdParams or DirectBwdParams.
template <typename E, bool BWD, typename P>
__device__ __forceinline__ void load_query_rows(const P& p, const DirectWork& w,
                                                const typename E::Smem& sm, const DTile& tq,
                                                int64_t h, int64_t slot) {
  using Acc = typename E::Acc;
  const int64_t hk = h / p.group;
  const Acc* ref_g = static_cast<const Acc*>(w.ref) + (hk * w.slots + slot) * p.dim_k;
  for (int d = threadIdx.x; d < p.dim_k; d += kDThreads) sm.ref[d] = ref_g[d];
  for (int i = threadIdx.x; i < kT; i += kDThreads) {
    const bool in = i < tq.rows;
    const int64_t row = in ? out_row(tq, p.heads_q, h, p.seqlen, i) : 0;
    sm.r0[i] = in ? static_cast<const Acc*>(p.b)[row] : Acc(0);
    if constexpr (BWD) {
      sm.r1[i] = in ? static_cast<const Acc*>(w.inv)[row] : Acc(0);
      sm.r2[i] = in ? static_cast<const Acc*>(w.dden)[row] : Acc(0);
    }
  }
}

// s = Q (K - r)^T (before tau and the shift) for one (query tile, key tile) pair (rows:
// queries, columns: keys). P: DirectFwdParams or DirectBwdParams.
template <typename T, typename E, typename P>
__device__ __forceinline__ void pair_scores(const P& p, const typename E::Smem& sm,
                                            const DTile& tq, int64_t h, int64_t kpos, int cols,
                                            typename E::Acc (&s)[4][4]) {
  using Acc = typename E::Acc;
  const int64_t hk = h / p.group, qpos = tq.start + tq.t0;
  zero_tile(s);
  E::scores(
      s, static_cast<int>(p.dim_k), sm,
      [&](int r, int x) {
        return r < tq.rows ? load_el<Acc, T>(p.q, p.q_stride, tq.bi, h, qpos + r, x) : Acc(0);
      },
      [&](int r, int x) {
        return r < cols ? load_el<Acc, T>(p.k, p.k_stride, tq.bi, hk, kpos + r, x) - sm.ref[x]
                        : Acc(0);
      });
}

// dnum_i = dy_i inv_i (sm.r1): dy, row r of query tile tq, column x.
template <typename Acc>
__device__ __forceinline__ Acc dnum_at(const DirectBwdParams& p, const Acc* r1, const DTile& tq,
                                       int64_t h, int r, int x) {
  return static_cast<const Acc*>(p.dy)[tq.bi * p.dy_stride[0] + h * p.dy_stride[1] +
                                       (tq.start + tq.t0 + r) * p.dy_stride[2] +
                                       x * p.dy_stride[3]] *
         r1[r];
}

// dp = dnum V^T for the same pair.
template <typename T, typename E>
__device__ __forceinline__ void pair_dp(const DirectBwdParams& p, const typename E::Smem& sm,
                                        const DTile& tq, int64_t h, int64_t kpos, int cols,
                                        typename E::Acc (&dp)[4][4]) {
  using Acc = typename E::Acc;
  const int64_t hk = h / p.group;
  zero_tile(dp);
  E::product(
      dp, static_cast<int>(p.dim_v), sm,
      [&](int r, int x) { return r < tq.rows ? dnum_at<Acc>(p, sm.r1, tq, h, r, x) : Acc(0); },
      [&](int r, int x) {
        return r < cols ? load_el<Acc, T>(p.v, p.v_stride, tq.bi, hk, kpos + r, x) : Acc(0);
      });
}

// The elementwise step of a pair into sm.X: x = tau s + b_i (sm.r0), then w = Map::weight(x)
// or (grad) ds = w'(x) (dp + dden_i) (sm.r2) where kept (row i < rows, column j < cols, and
// j <= i on a diagonal tile), else 0: selected, so that a masked NaN stays out. With SUMS the
// kept values are added to the thread's row partials.
template <typename E, typename Map, bool SUMS>
__device__ __forceinline__ void pair_values(const typename E::Smem& sm,
                                            const typename E::Place& pl,
                                            const typename E::Acc (&s)[4][4],
                                            const typename E::Acc (&dp)[4][4], bool grad,
                                            typename E::Acc tau, int rows, int cols, bool diag,
                                            typename E::Acc (&parts)[E::kRowParts]) {
  using Acc = typename E::Acc;
#pragma unroll
  for (int u = 0; u < 4; ++u)
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const int i = pl.row(u, v), j = pl.col(u, v);
      const bool keep = i < rows && j < cols && (!diag || j <= i);
      const Acc x = tau * s[u][v] + sm.r0[i];
      const Acc g = grad ? Map::weight_grad(x) * (dp[u][v] + sm.r2[i]) : Map::weight(x);
      const Acc kept = keep ? g : Acc(0);
      sm.X[i * E::kLd + j] = kept;
      if constexpr (SUMS) parts[pl.part(u, v)] += kept;
    }
}

// Stores the product's right operand, element (r, c) of sm.Y = at(r, c) for r < rows and
// c < ncols (else 0); with the engine's fallback, a diagonal tile whose operand holds a NaN or
// Inf raises sm.flag (cleared by E::scores). Followed by __syncthreads.
template <typename E, typename F>
__device__ __forceinline__ void stage_y(const typename E::Smem& sm, int rows, int ncols,
                                        bool diag, const F& at) {
  using Acc = typename E::Acc;
  bool bad = false;
  for (int e = threadIdx.x; e < kT * kT; e += kDThreads) {
    const int r = e / kT, c = e % kT;
    const Acc v = r < rows && c < ncols ? at(r, c) : Acc(0);
    sm.Y[r * E::kLd + c] = v;
    if constexpr (E::kFallback) bad |= !(v - v == Acc(0));
  }
  if constexpr (E::kFallback) {
    if (diag && bad) *sm.flag = 1;
  }
  __syncthreads();
}

// The key-tile loop of a query tile (t, head h, output columns c0 .. c0 + ncols - 1), after
// its row vectors and reference key are in shared memory: the forward's [num | den] += w [V | 1]
// or (GRAD) dq += ds (K - r_T), db += ds, into acc and the row partials.
template <typename T, typename E, typename Map, bool GRAD, typename P>
__device__ __forceinline__ void query_tile_loop(const P& p, const typename E::Smem& sm,
                                                const DTile& t, int64_t h, int c0, int ncols,
                                                typename E::Acc (&acc)[4][4],
                                                typename E::Acc (&parts)[E::kRowParts]) {
  using Acc = typename E::Acc;
  const typename E::Place pl = E::place();
  const int64_t hk = h / p.group;
  const Acc tau = Acc(p.scale);
  zero_tile(acc);
#pragma unroll
  for (int i = 0; i < E::kRowParts; ++i) parts[i] = Acc(0);
  const int64_t end = p.causal ? t.t0 + t.rows : t.len;
  for (int64_t j0 = 0; j0 < end; j0 += kT) {
    const int cols = static_cast<int>(min64(kT, end - j0));
    const bool diag = p.causal && j0 == t.t0;
    const int64_t kpos = t.start + j0;
    Acc s[4][4], dp[4][4];
    pair_scores<T, E>(p, sm, t, h, kpos, cols, s);
    if constexpr (GRAD) pair_dp<T, E>(p, sm, t, h, kpos, cols, dp);
    pair_values<E, Map, true>(sm, pl, s, GRAD ? dp : s, GRAD, tau, t.rows, cols, diag, parts);
    stage_y<E>(sm, cols, ncols, diag, [&](int r, int c) {
      if constexpr (GRAD)
        return load_el<Acc, T>(p.k, p.k_stride, t.bi, hk, kpos + r, c0 + c) - sm.ref[c0 + c];
      else
        return load_el<Acc, T>(p.v, p.v_stride, t.bi, hk, kpos + r, c0 + c);
    });
    E::template tile<false>(acc, sm, diag ? kMaskUpTo : kMaskNone);
  }
  E::row_sums(parts, sm);
}

// One query tile block: the forward (y, den) or (GRAD) dq and db. Grid (slots, Hq, column
// blocks), one block per (query tile, query head, block of 64 columns of y or dq); kDThreads
// threads; E::kSmemBytes of shared memory. p.b must hold b (direct_rows_kernel) and w.ref the
// tile references. Every block recomputes s (and ds); the first column block writes den / db.
template <typename T, typename E, typename Map, bool GRAD, typename P>
__device__ __forceinline__ void query_block(const P& p, const DirectWork& w,
                                            unsigned char* smem_raw) {
  using Acc = typename E::Acc;
  const typename E::Smem sm(smem_raw);
  const DTile t = direct_tile(p, w, blockIdx.x);
  if (!t.valid) return;
  const int64_t h = blockIdx.y, hk = h / p.group;
  const int width = static_cast<int>(GRAD ? p.dim_k : p.dim_v);
  const int c0 = static_cast<int>(blockIdx.z) * kT, ncols = imin(kT, width - c0);
  load_query_rows<E, GRAD>(p, w, sm, t, h, blockIdx.x);
  Acc acc[4][4], parts[E::kRowParts];
  query_tile_loop<T, E, Map, GRAD>(p, sm, t, h, c0, ncols, acc, parts);
  const typename E::Place pl = E::place();
#pragma unroll
  for (int u = 0; u < 4; ++u)
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const int i = pl.row(u, v), n = pl.col(u, v);
      if (i >= t.rows) continue;
      const int64_t row = out_row(t, p.heads_q, h, p.seqlen, i);
      Acc total = E::row_total(sm, i);  // den_i or db_i
      if constexpr (GRAD) {  // dq_i = tau (sum_j ds_ij (k_j - r_T) - m_i db_i)
        if (n < ncols) {
          // m_i (mu_i - r_T, or -r_T without centering) in float64, as b_i was formed: it may
          // be far larger than the scores (csq_direct.cuh, direct_rows_kernel).
          const int64_t mrow = out_row(t, p.heads_k, hk, p.seqlen, i);
          const double m = static_cast<const double*>(w.mdiff)[mrow * width + c0 + n];
          static_cast<Acc*>(p.dq)[row * width + c0 + n] =
              Acc(p.scale * (double(acc[u][v]) - m * double(total)));
        }
        if (blockIdx.z == 0 && n == 0) static_cast<Acc*>(p.db)[row] = total;
      } else {  // y_i = (num_i + carried) / (den_i + carried + eps)
        const Acc* row_sums = static_cast<const Acc*>(p.row_sums);  // (rows, Dv + 1) or none
        const Acc* extra = row_sums ? row_sums + row * (width + 1) : nullptr;
        if (extra) total += extra[width];
        const Acc inv = p.normalize ? Acc(1) / (total + Acc(p.eps)) : Acc(1);
        if (n < ncols)
          static_cast<Acc*>(p.y)[row * width + c0 + n] =
              (acc[u][v] + (extra ? extra[c0 + n] : Acc(0))) * inv;
        if (blockIdx.z == 0 && n == 0) static_cast<Acc*>(p.den)[row] = total;
      }
    }
}

template <typename T, typename E, typename Map>
__global__ void __launch_bounds__(kDThreads) direct_fwd_kernel(const DirectFwdParams p,
                                                               const DirectWork w) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  query_block<T, E, Map, false>(p, w, smem_raw);
}

template <typename T, typename E, typename Map>
__global__ void __launch_bounds__(kDThreads) direct_dq_kernel(const DirectBwdParams p,
                                                              const DirectWork w) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  query_block<T, E, Map, true>(p, w, smem_raw);
}

// dk (without its centering term) and dv. Grid (slots, Hk, ceil(Dk / 64) + ceil(Dv / 64)):
// one block per (key tile, key/value head, block of 64 columns of dk or of dv), looping over
// the query heads of the group and the query tiles that see the key tile.
template <typename T, typename E, typename Map>
__global__ void __launch_bounds__(kDThreads, 1) direct_dkdv_kernel(const DirectBwdParams p,
                                                                const DirectWork w) {
  using Acc = typename E::Acc;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const typename E::Smem sm(smem_raw);
  const DTile tk = direct_tile(p, w, blockIdx.x);
  if (!tk.valid) return;
  const int64_t hk = blockIdx.y;
  const int D = static_cast<int>(p.dim_k), Dv = static_cast<int>(p.dim_v);
  const int nbk = static_cast<int>(ceil_div(D, kT));
  const bool is_dk = static_cast<int>(blockIdx.z) < nbk;
  const int width = is_dk ? D : Dv;
  const int c0 = (is_dk ? static_cast<int>(blockIdx.z) : static_cast<int>(blockIdx.z) - nbk) * kT;
  const int ncols = imin(kT, width - c0);
  const typename E::Place pl = E::place();
  const Acc tau = Acc(p.scale);
  const int cols = tk.rows;
  const int64_t kpos = tk.start + tk.t0;
  Acc acc[4][4], unused[E::kRowParts];
  zero_tile(acc);
  const int64_t nt = ceil_div(tk.len, kT);
  for (int64_t hh = 0; hh < p.group; ++hh) {
    const int64_t h = hk * p.group + hh;
    for (int64_t ti = p.causal ? tk.idx : 0; ti < nt; ++ti) {
      const DTile tq = tile_at(tk, ti);
      const bool diag = p.causal && ti == tk.idx;
      // The previous pair's readers of these vectors have passed its last barrier.
      load_query_rows<E, true>(p, w, sm, tq, h, tk.first + ti);
      Acc s[4][4], dp[4][4];
      pair_scores<T, E>(p, sm, tq, h, kpos, cols, s);
      zero_tile(dp);
      if (is_dk) pair_dp<T, E>(p, sm, tq, h, kpos, cols, dp);
      pair_values<E, Map, false>(sm, pl, s, dp, is_dk, tau, tq.rows, cols, diag, unused);
      stage_y<E>(sm, tq.rows, ncols, diag, [&](int r, int c) {
        if (is_dk) return load_el<Acc, T>(p.q, p.q_stride, tq.bi, h, tq.start + tq.t0 + r, c0 + c);
        return dnum_at<Acc>(p, sm.r1, tq, h, r, c0 + c);
      });
      E::template tile<true>(acc, sm, diag ? kMaskFrom : kMaskNone);
      __syncthreads();  // before the next pair's row vectors
    }
  }
  Acc* out = static_cast<Acc*>(is_dk ? p.dk : p.dv);
  const Acc f = is_dk ? tau : Acc(1);
#pragma unroll
  for (int u = 0; u < 4; ++u)
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const int j = pl.row(u, v), n = pl.col(u, v);
      if (j < cols && n < ncols)
        out[out_row(tk, p.heads_k, hk, p.seqlen, j) * width + c0 + n] = f * acc[u][v];
    }
}

}  // namespace direct
}  // namespace cuda
}  // namespace csq
