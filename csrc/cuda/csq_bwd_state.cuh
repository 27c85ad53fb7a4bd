// The backward's state scans (csq_state.cuh: policies of state_scan_kernel): pass 1, the key
// state S against the queries (dq, db); pass 2, the query state R against the keys (dk, dv;
// dstate_in); and the state-only op's backward (dk, dv).
#pragma once

#include "csq_state.cuh"

namespace csq {
namespace cuda {

// Pass 1: the forward's S (from state_in when given), in chunk order; each chunk's queries of
// every head of the group read it: u_i = S_tile g~_i, dqe_i += d/dqe <phi(qe_i), u_i>
// (atomics into dq, db).
struct KeyStateBwd : BackwardScan {
  static constexpr const char* kName = "state_scan_kernel<KeyStateBwd>";
  template <typename Tile>
  static __device__ __forceinline__ void run(Tile& st, const BwdParams& p, const Work&) {
    using Acc = typename Tile::AccT;
    st.seed(p.state_in);
    const auto read = [&](int64_t t) {
      st.for_each_query_step(t, [&](int64_t h, int64_t row0, int nrows) {
        const int64_t bh = st.bi * st.Hq + h;
        __syncthreads();
        st.template stage_rows<true>(h, row0, nrows);
        st.zero_dx();
        __syncthreads();
        Acc* dq = static_cast<Acc*>(p.dq) + (bh * st.N + row0) * st.D;
        Acc* db = static_cast<Acc*>(p.db) + bh * st.N + row0;
        st.template read_gradients<false>(nrows, true, [&](int r, int z, Acc val) {
          if (z < st.D)
            atomicAdd(dq + int64_t(r) * st.D + z, st.tau * val);
          else
            atomicAdd(db + r, val);
        });
      });
    };
    st.walk(
        false, [&] { return p.state_in != nullptr; }, [] { return false; }, read,
        [&](int64_t t) { st.absorb_keys(t); });
  }
};

// The keys and values of chunk t reading a query-side state R (the tile's S): dv_j +=
// psi(ke_j) . R_tile, u_j = R_tile v~_j, dke_j += d/dke <psi(ke_j), u_j> (atomics into dv, dk).
// Pass 2 of the backward (R: later queries' and the returned state's gradient) and the
// state-only op's backward (R: the returned state's gradient alone).
template <typename Tile>
__device__ __forceinline__ void keys_read_state(Tile& st, const BwdParams& p, int64_t t) {
  using Acc = typename Tile::AccT;
  st.for_each_step(t, [&](int64_t row0, int nrows) {
    __syncthreads();
    st.template stage_rows<false>(0, row0, nrows);
    st.zero_dx();
    __syncthreads();
    st.build_feat(false);
    __syncthreads();
    Acc* dv = static_cast<Acc*>(p.dv) + (st.bg * st.N + row0) * st.Dv;
    st.template features_times_state<false>(
        nrows, [&](int m, int n, Acc val) { atomicAdd(dv + int64_t(m) * st.Dv + n, val); });
    __syncthreads();
    Acc* dk = static_cast<Acc*>(p.dk) + (st.bg * st.N + row0) * st.D;
    st.template read_gradients<true>(nrows, false, [&](int r, int z, Acc val) {
      atomicAdd(dk + int64_t(r) * st.D + z, val);
    });
  });
}

// Pass 2: R = sum_i phi(qe_i) g~_i^T over all query heads of the group, in reverse chunk order,
// from dstate_out when given (the returned state gives every key exactly what a later query
// gives); each chunk's keys read it (keys_read_state). With a carried state every query read
// it, so its gradient is the final R, added to dstate_in (onto what center_dq_kernel put there
// for the carried key count, one CTA per row).
struct QueryStateBwd : BackwardScan {
  static constexpr const char* kName = "state_scan_kernel<QueryStateBwd>";
  template <typename Tile>
  static __device__ __forceinline__ void run(Tile& st, const BwdParams& p, const Work&) {
    st.seed(p.dstate_out);
    st.walk(
        true, [&] { return p.dstate_out != nullptr; }, [&] { return p.dstate_in != nullptr; },
        [&](int64_t t) { keys_read_state(st, p, t); }, [&](int64_t t) { st.absorb_queries(t); });
    st.keep(p.dstate_in, true);
  }
};

// The state-only op's backward (csq_state_bwd): R = dstate_out, which every chunk's keys and
// values read (keys_read_state); no queries join it.
struct StateKeysBwd : BackwardScan {
  static constexpr const char* kName = "state_scan_kernel<StateKeysBwd>";
  template <typename Tile>
  static __device__ __forceinline__ void run(Tile& st, const BwdParams& p, const Work&) {
    st.seed(p.dstate_out);
    for (int64_t t = 0; t < st.nch; ++t) keys_read_state(st, p, t);
  }
};

}  // namespace cuda
}  // namespace csq
