// The forward's state scans (csq_state.cuh: policies of state_scan_kernel): the key state S
// against the queries, and the state alone.
#pragma once

#include "csq_state.cuh"

namespace csq {
namespace cuda {

// S = sum_j psi(ke_j) v~_j^T in chunk order, from state_in when given, into state_out when
// given; each chunk's queries of every head of the group read it: num~_i += phi(qe_i) . S_tile
// (atomics into Work::num_state; fwd_finalize_kernel adds the in-chunk pairs).
struct KeyStateFwd : ForwardScan {
  static constexpr const char* kName = "state_scan_kernel<KeyStateFwd>";
  template <typename Tile>
  static __device__ __forceinline__ void run(Tile& st, const FwdParams& p, const Work& w) {
    using Acc = typename Tile::AccT;
    st.template seed<true>(p.state_in);
    const auto read = [&](int64_t t) {
      st.for_each_query_step(t, [&](int64_t h, int64_t row0, int nrows) {
        __syncthreads();
        st.stage_q(h, row0, nrows);
        __syncthreads();
        st.build_feat(true);
        __syncthreads();
        Acc* num = static_cast<Acc*>(w.num_state) + ((st.bi * st.Hq + h) * st.N + row0) * st.V1;
        st.template features_times_state<true>(
            nrows, [&](int m, int n, Acc val) { atomicAdd(num + int64_t(m) * st.V1 + n, val); });
      });
    };
    st.walk(
        false, [&] { return p.state_in != nullptr; }, [&] { return p.state_out != nullptr; },
        read, [&](int64_t t) { st.absorb_keys(t); });
    st.template keep<true>(p.state_out, false);
  }
};

// The state alone (csq_state): S from state_in (or 0) plus every chunk's keys, into state_out;
// no queries read it.
struct KeyStateBuild : ForwardScan {
  static constexpr const char* kName = "state_scan_kernel<KeyStateBuild>";
  template <typename Tile>
  static __device__ __forceinline__ void run(Tile& st, const FwdParams& p, const Work&) {
    st.seed(p.state_in);
    for (int64_t t = 0; t < st.nch; ++t) st.absorb_keys(t);
    st.keep(p.state_out, false);
  }
};

}  // namespace cuda
}  // namespace csq
