// CSQ attention forward on the CPU: the chunked algorithm of the spec, one task per
// (sequence, key/value head), all query heads of the group served by one key state; for any
// feature map (Map, csq_feature_map.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

#include "csq_cpu_key_scan.h"
#include "csq_cpu_launch.h"
#include "csq_cpu_state_check.h"

namespace csq {
namespace cpu {
namespace {

template <typename scalar_t, typename acc_t, typename Map>
void forward_task(const FwdParams& p, const SeqTask& t) {
  const int64_t N = t.len, D = p.dim_k, Dv = p.dim_v, Dv1 = Dv + 1;
  const int64_t F = Map::num_features(D), C = p.chunk, g = t.head_k;
  const acc_t tau = static_cast<acc_t>(p.scale), eps = static_cast<acc_t>(p.eps);
  const acc_t* shift = static_cast<const acc_t*>(p.shift);

  KeyScan<scalar_t, acc_t, Map> keys(p, p, p.chunk, t);
  std::vector<acc_t>&kc = keys.kc, &vc = keys.vc, &ref = keys.ref;
  std::vector<acc_t> qc(C * D), mu(C * D), bq(C), phi(C * F), num(C * Dv1), w(C * C);
  keys.start();
  const bool carried = carried_sums<Map, acc_t>(p, p, t) != nullptr;
  if (!p.causal) keys.absorb_all();

  // The state's conditioning (csq_params.h): a row beyond the limit stops the task and sends
  // the whole op to float64 (the host); so does a flag another task raised.
  const bool check = checks_state<Map>(p);
  for (int64_t t0 = 0; t0 < N; t0 += C) {
    if (check && state_flagged(p)) return;
    const ForwardChunk chunk = keys.forward_chunk(t0, carried, check, mu.data());
    const int64_t rows = chunk.rows;
    const bool reads_state = chunk.reads_state;

    for (int64_t hh = 0; hh < p.group; ++hh) {
      const int64_t h = g * p.group + hh;
      load_rows<scalar_t, acc_t>(p.q, p.q_stride, t.batch, h, t.start + t0, rows, D, nullptr,
                                 qc.data(), D);
      query_shifts(p, qc.data(), mu.data(), ref.data(), rows, shift[h], tau, bq.data());

      // Keys of earlier chunks (or all keys) through the state: num~ = phi(Q, b) S.
      if (!reads_state) {
        std::fill(num.begin(), num.begin() + rows * Dv1, acc_t(0));
      } else {
        read_state<Map>(keys.state.data(), qc.data(), bq.data(), rows, D, Dv1, tau, phi.data(),
                        num.data(), Dv1, acc_t(0));
      }

      // Keys of this chunk directly: W_ij = weight(tau <q_i, k_j> + b_i) for j <= i.
      if (p.causal) {
        gemm<acc_t>(false, false, rows, rows, D, acc_t(1), qc.data(), D, keys.kT.data(), rows,
                    acc_t(0), w.data(), rows);
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t j = 0; j < rows; ++j) {
            const acc_t s = tau * w[i * rows + j] + bq[i];
            w[i * rows + j] = j <= i ? Map::weight(s) : acc_t(0);
          }
        if (all_finite(vc, rows * Dv1))
          gemm_den_apart<acc_t>(rows, Dv1, rows, w.data(), rows, vc.data(), Dv1, acc_t(1),
                                num.data(), Dv1);
        else
          lower_mm_add(w.data(), rows, vc.data(), Dv1, Dv1, acc_t(1), false, num.data(), Dv1);
      }

      if (check && reads_state &&
          rows_ill_conditioned(p, qc.data(), bq.data(), num.data() + Dv, Dv1, rows, chunk.trace,
                               chunk.count)) {
        flag_state(p);
        return;
      }
      const int64_t row0 = (t.batch * p.heads_q + h) * p.seqlen + t.start + t0;
      acc_t* y = static_cast<acc_t*>(p.y) + row0 * Dv;
      for (int64_t i = 0; i < rows; ++i) {
        const acc_t den = num[i * Dv1 + Dv];
        const acc_t inv = p.normalize ? acc_t(1) / (den + eps) : acc_t(1);
        for (int64_t x = 0; x < Dv; ++x)
          y[i * Dv + x] = num[i * Dv1 + x] * inv;
        static_cast<acc_t*>(p.b)[row0 + i] = bq[i];
        static_cast<acc_t*>(p.den)[row0 + i] = den;
      }
    }
    // The last chunk joins the state only for a caller who takes it: its update is an
    // F x (Dv + 1) x C product, half of a one-chunk call (N = 64, D = 64: 943 -> 493 us).
    if (p.causal && (t0 + rows < N || p.state_out != nullptr)) keys.absorb(rows);
  }

  std::copy(ref.begin(), ref.end(), task_pooled_ref(static_cast<acc_t*>(p.ref_out), p, p, t));
  if (p.state_out != nullptr)
    std::copy(keys.state.begin(), keys.state.end(),
              task_pooled_sums<Map>(static_cast<acc_t*>(p.state_out), p, p, t));
}

}  // namespace

template <typename scalar_t, typename Map>
void launch_fwd(const FwdParams& p) {
  using acc_t = acc_type_of<scalar_t>;
  at::parallel_for(0, p.num_seqs * p.heads_k, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task)
      forward_task<scalar_t, acc_t, Map>(p, seq_task(p, task));
  });
}

CSQ_CPU_INSTANTIATE(launch_fwd, FwdParams);

}  // namespace cpu
}  // namespace csq
