// The backward's state scans (csq_state.cuh): pass 1, the key state S against the queries
// (dq, db); pass 2, the query state R against the keys (dk, dv; dstate_in).
#pragma once

#include "csq_state.cuh"

namespace csq {
namespace cuda {

// Pass 1: the forward's S (from state_in when given), in chunk order; each chunk's queries of
// every head of the group read it: u_i = S_tile g~_i, dqe_i += d/dqe <phi(qe_i), u_i>
// (atomics into dq, db).
template <typename T, typename Acc, int FT, int SUB, bool TC, typename Map>
__global__ void __launch_bounds__(kThreads, state_min_blocks<Acc>())
    key_state_bwd_kernel(const BwdParams p, Work w) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ int64_t seq_rows[2];
  StateTile<T, Acc, FT, SUB, TC, Map> st(p, w, true, smem_raw, seq_rows);
  if (p.state_in != nullptr) st.seed(static_cast<const Acc*>(p.state_in));
  const auto read = [&](int64_t t) {
    for (int sb = 0; sb < kChunkI / SUB; ++sb) {
      int64_t row0;
      int nrows;
      if (!st.sub_block(t, sb, &row0, &nrows)) break;
      for (int64_t hh = 0; hh < st.G; ++hh) {
        const int64_t h = st.g * st.G + hh, bh = st.bi * st.Hq + h;
        __syncthreads();
        st.stage_q(h, row0, nrows);
        st.stage_g(h, row0, nrows);
        st.zero_dx();
        __syncthreads();
        st.features_grad(nrows);
        __syncthreads();
        st.accumulate_dx(nrows, true);
        __syncthreads();
        Acc* dq = static_cast<Acc*>(p.dq) + (bh * st.N + row0) * st.D;
        Acc* db = static_cast<Acc*>(p.db) + bh * st.N + row0;
        for (int e = st.tid; e < nrows * st.De; e += st.nthr) {
          const int r = e / st.De, z = e % st.De;
          if (z < st.zlo) continue;
          const Acc val = st.Dx[r * st.XS + z];
          if (val == Acc(0)) continue;  // untouched by this tile (NaN still goes through)
          if (z < st.D)
            atomicAdd(dq + int64_t(r) * st.D + z, st.tau * val);
          else
            atomicAdd(db + r, val);
        }
      }
    }
  };
  st.walk(
      false, [&] { return p.state_in != nullptr; }, [] { return false; }, read,
      [&](int64_t t) { st.absorb_keys(t); });
}

// For launch_state_scan (csq_chunked_launch.cuh).
template <typename T, typename Acc, int FT, int SUB, bool TC, typename Map>
struct KeyStateBwd {
  static constexpr bool kBackward = true;
  static constexpr const char* kName = "key_state_bwd_kernel";
  static auto kernel() { return key_state_bwd_kernel<T, Acc, FT, SUB, TC, Map>; }
};

// The keys and values of chunk t reading a query-side state R (the tile's S): dv_j +=
// psi(ke_j) . R_tile, u_j = R_tile v~_j, dke_j += d/dke <psi(ke_j), u_j> (atomics into dv, dk).
// Pass 2 of the backward (R: later queries' and the returned state's gradient) and the
// state-only op's backward (R: the returned state's gradient alone).
template <typename Tile>
__device__ __forceinline__ void keys_read_state(Tile& st, const BwdParams& p, int64_t t) {
  using Acc = typename Tile::AccT;
  constexpr int SUB = Tile::kSubRows;
  constexpr bool TC = Tile::kTensorCores;
  for (int sb = 0; sb < kChunkI / SUB; ++sb) {
    int64_t row0;
    int nrows;
    if (!st.sub_block(t, sb, &row0, &nrows)) break;
    __syncthreads();
    st.stage_k(row0, nrows);
    st.stage_v(row0, nrows);
    st.zero_dx();
    __syncthreads();
    st.build_feat(false);
    __syncthreads();
    Acc* dv = static_cast<Acc*>(p.dv) + (st.bg * st.N + row0) * st.Dv;
    state_gemm<2, 4, TC, Acc>(
        nrows, st.Dv, st.nf, [&](int m, int k) { return st.Feat[m * st.FS + k]; },
        [&](int k, int n) { return st.S[k * st.SS + n]; },
        [&](int m, int n, Acc val) { atomicAdd(dv + int64_t(m) * st.Dv + n, val); },
        p.tensor_core_passes > 1);
    __syncthreads();
    st.features_grad(nrows);
    __syncthreads();
    st.accumulate_dx(nrows, false);
    __syncthreads();
    Acc* dk = static_cast<Acc*>(p.dk) + (st.bg * st.N + row0) * st.D;
    for (int e = st.tid; e < nrows * st.De; e += st.nthr) {
      const int r = e / st.De, z = e % st.De;
      if (z < st.zlo || z >= st.D) continue;  // z == D is the constant coordinate of ke
      const Acc val = st.Dx[r * st.XS + z];
      if (val == Acc(0)) continue;
      atomicAdd(dk + int64_t(r) * st.D + z, val);
    }
  }
}

// Pass 2: R = sum_i phi(qe_i) g~_i^T over all query heads of the group, in reverse chunk order,
// from dstate_out when given (the returned state gives every key exactly what a later query
// gives); each chunk's keys read it: dv_j += psi(ke_j) . R_tile, u_j = R_tile v~_j,
// dke_j += d/dke <psi(ke_j), u_j> (atomics into dv, dk). With a carried state every query read
// it, so its gradient is the final R, added to dstate_in (onto what center_dq_kernel put there
// for the carried key count, one CTA per row).
template <typename T, typename Acc, int FT, int SUB, bool TC, typename Map>
__global__ void __launch_bounds__(kThreads, state_min_blocks<Acc>())
    query_state_bwd_kernel(const BwdParams p, Work w) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ int64_t seq_rows[2];
  StateTile<T, Acc, FT, SUB, TC, Map> st(p, w, true, smem_raw, seq_rows);
  if (p.dstate_out != nullptr) st.seed(static_cast<const Acc*>(p.dstate_out));
  const auto read = [&](int64_t t) { keys_read_state(st, p, t); };
  // The update: the chunk's queries of every head of the group join R.
  const auto absorb_queries = [&](int64_t t) {
    for (int sb = 0; sb < kChunkI / SUB; ++sb) {
      int64_t row0;
      int nrows;
      if (!st.sub_block(t, sb, &row0, &nrows)) break;
      for (int64_t hh = 0; hh < st.G; ++hh) {
        const int64_t h = st.g * st.G + hh;
        __syncthreads();
        st.stage_q(h, row0, nrows);
        st.stage_g(h, row0, nrows);
        __syncthreads();
        st.build_feat(true);
        __syncthreads();
        st.update_state(nrows);
      }
    }
  };
  st.walk(
      true, [&] { return p.dstate_out != nullptr; }, [&] { return p.dstate_in != nullptr; },
      read, absorb_queries);
  if (p.dstate_in != nullptr) st.keep(static_cast<Acc*>(p.dstate_in), true);
}

template <typename T, typename Acc, int FT, int SUB, bool TC, typename Map>
struct QueryStateBwd {
  static constexpr bool kBackward = true;
  static constexpr const char* kName = "query_state_bwd_kernel";
  static auto kernel() { return query_state_bwd_kernel<T, Acc, FT, SUB, TC, Map>; }
};

// The state-only op's backward (csq_state_bwd): R = dstate_out, which every chunk's keys and
// values read (keys_read_state); no queries join it.
template <typename T, typename Acc, int FT, int SUB, bool TC, typename Map>
__global__ void __launch_bounds__(kThreads, state_min_blocks<Acc>())
    state_keys_bwd_kernel(const BwdParams p, Work w) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ int64_t seq_rows[2];
  StateTile<T, Acc, FT, SUB, TC, Map> st(p, w, true, smem_raw, seq_rows);
  st.seed(static_cast<const Acc*>(p.dstate_out));
  for (int64_t t = 0; t < st.nch; ++t) keys_read_state(st, p, t);
}

template <typename T, typename Acc, int FT, int SUB, bool TC, typename Map>
struct StateKeysBwd {
  static constexpr bool kBackward = true;
  static constexpr const char* kName = "state_keys_bwd_kernel";
  static auto kernel() { return state_keys_bwd_kernel<T, Acc, FT, SUB, TC, Map>; }
};

}  // namespace cuda
}  // namespace csq
