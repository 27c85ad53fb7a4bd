// The state-only op on the CPU (csq_state / csq_state_bwd): the carried state of a call's keys
// and values, without queries or outputs (what context parallelism and a serving prefill
// need). One task per (sequence, key/value head): the chunked path's key scan over every key
// from the carried state (csq_cpu_key_scan.h), and its gradient.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "csq_cpu_key_scan.h"
#include "csq_cpu_launch.h"

namespace csq {
namespace cpu {

template <typename scalar_t, typename Map>
void launch_state(const StateParams& p) {
  using acc_t = acc_type_of<scalar_t>;
  at::parallel_for(0, p.num_seqs * p.heads_k, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const SeqTask t = seq_task(p, task);
      KeyScan<scalar_t, acc_t, Map> keys(p, p, p.chunk, t);
      keys.start();
      keys.absorb_all();
      std::copy(keys.ref.begin(), keys.ref.end(), static_cast<acc_t*>(p.ref_out) + task * p.dim_k);
      std::copy(keys.state.begin(), keys.state.end(),
                task_state<Map>(static_cast<acc_t*>(p.state_out), p, t));
    }
  });
}

// state_out = state_in + sum_j psi(k_j - ref) [v_j, 1]^T: dstate_in = dstate_out; the keys and
// values get what dstate_out gives them (keys_grad); every key is k - ref, so ref gets minus
// the sum of their gradients (finish_ref_gradient: to ref_in, or to the picked keys).
template <typename scalar_t, typename Map>
void launch_state_bwd(const StateBwdParams& p) {
  using acc_t = acc_type_of<scalar_t>;
  const int64_t D = p.dim_k, Dv = p.dim_v, elems = state_head_elems<Map>(D, Dv);
  at::parallel_for(0, p.num_seqs * p.heads_k, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const SeqTask t = seq_task(p, task);
      const int64_t row0 = (t.batch * p.heads_k + t.head_k) * p.seqlen + t.start;
      acc_t* dk = static_cast<acc_t*>(p.dk) + row0 * D;
      acc_t* dv = static_cast<acc_t*>(p.dv) + row0 * Dv;
      const acc_t* R = p.dstate_out == nullptr
                           ? nullptr
                           : task_state<Map>(static_cast<const acc_t*>(p.dstate_out), p, t);
      KeyScan<scalar_t, acc_t, Map> keys(p, p, p.chunk, t);
      keys.features_by_row = true;
      if (R != nullptr)
        for (int64_t t0 = 0; t0 < t.len; t0 += p.chunk) {
          const int64_t rows = std::min(p.chunk, t.len - t0);
          keys.load(t0, rows);
          keys.keys_grad(R, rows, dk + t0 * D, dv + t0 * Dv);
        }
      if (p.dstate_in != nullptr) {
        acc_t* ds = task_state<Map>(static_cast<acc_t*>(p.dstate_in), p, t);
        if (R != nullptr)
          std::copy(R, R + elems, ds);
        else
          std::fill(ds, ds + elems, acc_t(0));
      }
      std::vector<acc_t> dref(D, acc_t(0));
      for (int64_t j = 0; j < t.len; ++j)
        for (int64_t x = 0; x < D; ++x) dref[x] -= dk[j * D + x];
      finish_ref_gradient<scalar_t, acc_t, Map>(p, p, p, t, keys.ref.data(), dref.data(), dk);
    }
  });
}

CSQ_CPU_INSTANTIATE(launch_state, StateParams);
CSQ_CPU_INSTANTIATE(launch_state_bwd, StateBwdParams);

}  // namespace cpu
}  // namespace csq
