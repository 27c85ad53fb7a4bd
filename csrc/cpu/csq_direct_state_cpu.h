// A carried state on the CPU direct path (csq_direct_fwd / csq_direct_bwd with state_in, or
// returning the state; causal only). The state's keys join every query's mean (KeyPrefix's
// carried keys), each query reads the state, num~_i += phi(tau q_i, b0_i) . S, with b0_i its
// shift relative to the state's ref (b_i + tau <q_i, ref - r_T>, pair_shifts), and the returned
// state is S + sum_j psi(k_j - ref) [v_j, 1]^T over the call's keys (the chunked path's key
// scan, csq_cpu_key_scan.h). The ref is the rule's of csq_params.h (task_reference). The
// kernels' use of it: ForwardTile and BackwardTiles (csq_direct_*_kernel.cpp).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../csq_direct_params.h"
#include "csq_cpu_features.h"
#include "csq_cpu_key_scan.h"
#include "csq_direct_cpu.h"

namespace csq {
namespace cpu {
namespace direct {

// Query rows read the carried state in blocks of this many (bounds the feature buffer).
constexpr int64_t kStateReadRows = 64;

// The carried state of every (sequence, key/value head): its ref, and for the key means its
// key count and key sum in raw coordinates (count ref + Z1, float64). Empty when the call
// neither reads nor returns a state.
template <typename scalar_t, typename acc_t, typename Map>
struct DirectCarried {
  const DirectFwdParams& p;
  bool any = false;
  std::vector<acc_t> refs;
  std::vector<double> count, sum;

  DirectCarried(const DirectFwdParams& p_, bool returns) : p(p_) {
    any = p.state_in != nullptr || returns;
    if (!any) return;
    const int64_t tasks = p.num_seqs * p.heads_k, D = p.dim_k;
    refs.resize(tasks * D);
    if (p.state_in != nullptr) {
      count.resize(tasks);
      sum.resize(tasks * D);
    }
    at::parallel_for(0, tasks, small_pass_grain(p), [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const SeqTask t = seq_task(p, task);
        acc_t* r = refs.data() + task * D;
        task_reference<scalar_t, acc_t, Map>(p, p, t, r);
        if (p.state_in == nullptr) continue;
        const acc_t* S = sums(t);
        count[task] = static_cast<double>(state_key_count<Map>(S, D, p.dim_v));
        for (int64_t x = 0; x < D; ++x)
          sum[task * D + x] = count[task] * static_cast<double>(r[x]) +
                              static_cast<double>(state_key_sum<Map>(S, x, D, p.dim_v));
      }
    });
  }

  const acc_t* ref(const SeqTask& t) const {
    return refs.data() + (t.seq * p.heads_k + t.head_k) * p.dim_k;
  }
  const acc_t* sums(const SeqTask& t) const {
    return task_state<Map>(static_cast<const acc_t*>(p.state_in), p, t);
  }
  KeyPrefix prefix() const {
    return key_prefix<scalar_t>(p, count.empty() ? nullptr : count.data(),
                                sum.empty() ? nullptr : sum.data());
  }
};

// The end of a forward that reads or returns a state: ref_out for every (sequence, key/value
// head) and, when returned, state_out = S_in + the call's keys.
template <typename scalar_t, typename acc_t, typename Map>
inline void write_forward_state(const DirectFwdParams& p,
                                const DirectCarried<scalar_t, acc_t, Map>& c) {
  if (!c.any) return;
  const int64_t tasks = p.num_seqs * p.heads_k, D = p.dim_k;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const SeqTask t = seq_task(p, task);
      std::copy(c.ref(t), c.ref(t) + D, static_cast<acc_t*>(p.ref_out) + task * D);
      if (p.state_out == nullptr) continue;
      KeyScan<scalar_t, acc_t, Map> keys(p, p, p.tile, t);
      keys.start();
      keys.absorb_all();
      std::copy(keys.state.begin(), keys.state.end(),
                task_state<Map>(static_cast<acc_t*>(p.state_out), p, t));
    }
  });
}

// A query tile's rows (grows = G rows, q: grows x D, b: their shifts relative to the tile's
// reference r_T) and the carried state's: the shifts b0 relative to the state's ref
// (pair_shifts), and the read num~ += phi(tau q, b0) . S (forward) or its gradient (backward).
template <typename acc_t, typename Map>
struct StateTileRead {
  const int64_t D, Dv1, F;
  std::vector<acc_t> b0, delta, phi;
  StateReadGrad<Map, acc_t> grad;
  // grows_max = 0: no carried state, no buffers (those of a read are F x 64 elements, whose
  // zeroing was a quarter of a small call's time).
  StateTileRead(int64_t d, int64_t dv1, int64_t grows_max)
      : D(d), Dv1(dv1), F(Map::num_features(d)), b0(grows_max), delta(d),
        phi(grows_max > 0 ? kStateReadRows * Map::num_features(d) : 0),
        grad(d, dv1, grows_max > 0 ? kStateReadRows : 0) {}

  // b0 (returned) and delta = ref - r_T.
  const acc_t* shifts(const acc_t* q, int64_t grows, const acc_t* b, acc_t tau,
                      const acc_t* state_ref, const acc_t* tile_ref) {
    return pair_shifts(q, grows, D, b, tau, state_ref, tile_ref, delta.data(), b0.data());
  }

  // num (grows x (Dv + 1)) = the state's share of [num | den] (overwrites).
  void read(const acc_t* S, const acc_t* q, const acc_t* b0s, int64_t grows, acc_t tau,
            acc_t* num) {
    for (int64_t r0 = 0; r0 < grows; r0 += kStateReadRows)
      read_state<Map>(S, q + r0 * D, b0s + r0, std::min(kStateReadRows, grows - r0), D, Dv1, tau,
                      phi.data(), num + r0 * Dv1, Dv1, acc_t(0));
  }

  // The read's gradient from g (grows x (Dv + 1): [dnum, dden]), into the tile's unscaled
  // dq (grows x D, the caller multiplies by tau) and db (grows): b0 = b + tau <q, delta>, so
  // db0 reaches db and tau delta db0 reaches dq.
  void backward(const acc_t* S, const acc_t* q, const acc_t* b0s, const acc_t* g, int64_t grows,
                acc_t tau, acc_t* dq, acc_t* db) {
    for (int64_t r0 = 0; r0 < grows; r0 += kStateReadRows) {
      const int64_t rows = std::min(kStateReadRows, grows - r0);
      const acc_t* deT = grad(S, g + r0 * Dv1, q + r0 * D, b0s + r0, rows, tau);
      for (int64_t i = 0; i < rows; ++i) {
        const acc_t db0 = deT[D * rows + i];
        db[r0 + i] += db0;
        acc_t* dqi = dq + (r0 + i) * D;
        for (int64_t x = 0; x < D; ++x) dqi[x] += deT[x * rows + i] + delta[x] * db0;
      }
    }
  }
};

// What a worker of either direction (ForwardTile, BackwardTiles: one per thread, reused for
// every query tile it runs) holds for its query tile: the call's params, key prefix and carried
// state, the sizes, the query tile and the current key tile, the rows' shifts b with their copy
// for a (query tile, key tile) pair and the references' difference (pair_shifts), the
// products behind those shifts for every key tile the query tile reads (PairDots), and the
// carried state's read. Params: DirectFwdParams or DirectBwdParams.
template <typename scalar_t, typename acc_t, typename Map, typename Params>
struct QueryTileWork {
  const Params& p;
  const KeyPrefix& kp;
  const DirectCarried<scalar_t, acc_t, Map>& carried;
  const int64_t D, Dv, G, T;
  const acc_t tau, eps;
  QueryTile<scalar_t, acc_t> qt;
  KeyTile<scalar_t, acc_t> kt;
  StateTileRead<acc_t, Map> state;
  std::vector<acc_t> b, b_pair, delta;  // G T, G T, D
  PairDots pairs;

  QueryTileWork(const Params& p_, const KeyPrefix& kp_, const KeyStore<scalar_t, acc_t>& ks_,
                const DirectCarried<scalar_t, acc_t, Map>& carried_)
      : p(p_), kp(kp_), carried(carried_), D(p_.dim_k), Dv(p_.dim_v), G(p_.group), T(p_.tile),
        tau(static_cast<acc_t>(p_.scale)), eps(static_cast<acc_t>(p_.eps)), qt(p_, p_.tile),
        kt(p_, kp_, ks_), state(p_.dim_k, p_.dim_v + 1, p_.state_in ? G * T : 0), b(G * T),
        b_pair(G * T), delta(D) {}
};

}  // namespace direct
}  // namespace cpu
}  // namespace csq
