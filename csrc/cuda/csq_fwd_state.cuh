// The forward's state scan (csq_state.cuh): the key state S against the queries.
#pragma once

#include "csq_state.cuh"

namespace csq {
namespace cuda {

// S = sum_j psi(ke_j) v~_j^T in chunk order, from state_in when given, into state_out when
// given; each chunk's queries of every head of the group read it: num~_i += phi(qe_i) . S_tile
// (atomics into Work::num_state; fwd_finalize_kernel adds the in-chunk pairs).
template <typename T, typename Acc, int FT, int SUB, bool TC, typename Map>
__global__ void __launch_bounds__(kThreads, state_min_blocks<Acc>())
    key_state_fwd_kernel(const FwdParams p, Work w) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ int64_t seq_rows[2];
  StateTile<T, Acc, FT, SUB, TC, Map> st(p, w, false, smem_raw, seq_rows);
  if (p.state_in != nullptr) st.template seed<true>(static_cast<const Acc*>(p.state_in));
  const auto read = [&](int64_t t) {
    for (int sb = 0; sb < kChunkI / SUB; ++sb) {
      int64_t row0;
      int nrows;
      if (!st.sub_block(t, sb, &row0, &nrows)) break;
      for (int64_t hh = 0; hh < st.G; ++hh) {
        const int64_t h = st.g * st.G + hh;
        __syncthreads();
        st.stage_q(h, row0, nrows);
        __syncthreads();
        st.build_feat(true);
        __syncthreads();
        Acc* num = static_cast<Acc*>(w.num_state) + ((st.bi * st.Hq + h) * st.N + row0) * st.V1;
        state_gemm_aug<2, 4, TC, Acc>(
            nrows, st.Dv, st.nf, [&](int m, int k) { return st.Feat[m * st.FS + k]; },
            [&](int k, int n) { return st.S[k * st.SS + n]; },
            [&](int m, int n, Acc val) { atomicAdd(num + int64_t(m) * st.V1 + n, val); },
            p.tensor_core_passes > 1);
      }
    }
  };
  st.walk(
      false, [&] { return p.state_in != nullptr; }, [&] { return p.state_out != nullptr; }, read,
      [&](int64_t t) { st.absorb_keys(t); });
  if (p.state_out != nullptr) st.template keep<true>(static_cast<Acc*>(p.state_out), false);
}

// For launch_state_scan (csq_chunked_launch.cuh).
template <typename T, typename Acc, int FT, int SUB, bool TC, typename Map>
struct KeyStateFwd {
  static constexpr bool kBackward = false;
  static constexpr const char* kName = "key_state_fwd_kernel";
  static auto kernel() { return key_state_fwd_kernel<T, Acc, FT, SUB, TC, Map>; }
};

// The state alone (csq_state): S from state_in (or 0) plus every chunk's keys, into state_out;
// no queries read it.
template <typename T, typename Acc, int FT, int SUB, bool TC, typename Map>
__global__ void __launch_bounds__(kThreads, state_min_blocks<Acc>())
    key_state_build_kernel(const FwdParams p, Work w) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ int64_t seq_rows[2];
  StateTile<T, Acc, FT, SUB, TC, Map> st(p, w, false, smem_raw, seq_rows);
  if (p.state_in != nullptr) st.seed(static_cast<const Acc*>(p.state_in));
  for (int64_t t = 0; t < st.nch; ++t) st.absorb_keys(t);
  st.keep(static_cast<Acc*>(p.state_out), false);
}

template <typename T, typename Acc, int FT, int SUB, bool TC, typename Map>
struct KeyStateBuild {
  static constexpr bool kBackward = false;
  static constexpr const char* kName = "key_state_build_kernel";
  static auto kernel() { return key_state_build_kernel<T, Acc, FT, SUB, TC, Map>; }
};

}  // namespace cuda
}  // namespace csq
