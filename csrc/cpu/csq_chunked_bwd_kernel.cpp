// CSQ attention backward on the CPU. Two passes per (sequence, key/value head):
//  1. forward order, with the key state S = sum psi(k) v~^T of earlier keys: dq and db
//     (the gradient of each query's shift b_i), and the in-chunk parts of dk and dv;
//  2. reverse order, with the query state R = sum phi(q, b) g~^T of later queries: the parts
//     of dk and dv that come from later chunks, and the centering term of dk.
// Here g~_i = [dnum_i, dden_i] is the gradient of the augmented numerator, so that the
// gradient of w_ij is <g~_i, v~_j>.
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
struct BackwardTask {
  const BwdParams& p;
  const SeqTask t;
  const int64_t g, N, D, Dv, Dv1, F, C;
  const acc_t tau, eps;
  const bool carried;  // a carried state precedes the sequence
  acc_t dcount = 0;    // gradient of its key count through the key means
  // The key side: pass 1 uses its state S; pass 2 only its chunk loader (shifted keys,
  // augmented values, key features), after taking over the memory of S for R.
  KeyScan<scalar_t, acc_t, Map> keys;
  std::vector<acc_t>&ref, &kc, &vc, &psi;
  std::vector<acc_t> query_state;  // pass 2: R = sum phi(q, b) g~^T of later (or all) queries
  // Pass 2, centering: the per-key terms of a chunk (D each) and their running sum.
  std::vector<acc_t> center_terms, center_sum;
  std::vector<acc_t> dref, qc, bq, gc, phi_t, blk, blk2, mu;
  std::vector<acc_t> tr;  // pass 1, causal: the chunk's v~^T (per chunk), dS^T and W^T
  StateReadGrad<Map, acc_t> read_grad;  // pass 1: the key state's read by the queries

  BackwardTask(const BwdParams& p_, const SeqTask& t_)
      : p(p_), t(t_), g(t_.head_k), N(t_.len), D(p_.dim_k), Dv(p_.dim_v), Dv1(p_.dim_v + 1),
        F(Map::num_features(p_.dim_k)), C(p_.chunk),
        tau(static_cast<acc_t>(p_.scale)), eps(static_cast<acc_t>(p_.eps)),
        carried(p_.state_in != nullptr), keys(p_, p_, p_.chunk, t_), ref(keys.ref), kc(keys.kc),
        vc(keys.vc), psi(keys.psi), center_terms(C * D), center_sum(D),
        dref(D, acc_t(0)), qc(C * D), bq(C), gc(C * Dv1), phi_t(F * C), blk(C * C),
        blk2(C * C), mu(C * D), tr(p_.causal ? C * (Dv1 + 2 * C) : 0),
        read_grad(D, Dv1, C) {}

  int64_t qrow0(int64_t h, int64_t t0) const {
    return (t.batch * p.heads_q + h) * p.seqlen + t.start + t0;
  }
  int64_t krow0(int64_t t0) const { return (t.batch * p.heads_k + g) * p.seqlen + t.start + t0; }
  acc_t* out(void* base, int64_t row0, int64_t width) const {
    return static_cast<acc_t*>(base) + row0 * width;
  }
  acc_t n_before(int64_t t0) const { return keys.carried_keys + acc_t(t0); }

  void load_q(int64_t h, int64_t t0, int64_t rows) {
    load_rows<scalar_t, acc_t>(p.q, p.q_stride, t.batch, h, t.start + t0, rows, D, nullptr,
                               qc.data(), D);
  }

  // Loads q, the saved b, and g~ = [dnum, dden] for query head h.
  void load_queries(int64_t h, int64_t t0, int64_t rows) {
    load_q(h, t0, rows);
    const int64_t row0 = qrow0(h, t0);
    const acc_t* bs = static_cast<const acc_t*>(p.b) + row0;
    const acc_t* den = static_cast<const acc_t*>(p.den) + row0;
    const acc_t* y = static_cast<const acc_t*>(p.y) + row0 * Dv;
    for (int64_t i = 0; i < rows; ++i) {
      bq[i] = bs[i];
      const acc_t* dy = row_ptr<acc_t>(p.dy, p.dy_stride, t.batch, h, t.start + t0 + i);
      acc_t* gr = gc.data() + i * Dv1;
      if (p.normalize) {
        const acc_t inv = acc_t(1) / (den[i] + eps);
        acc_t dot = 0;
        for (int64_t x = 0; x < Dv; ++x) {
          const acc_t d = dy[x * p.dy_stride[3]];
          gr[x] = d * inv;
          dot += d * y[i * Dv + x];
        }
        gr[Dv] = -dot * inv;
      } else {
        for (int64_t x = 0; x < Dv; ++x) gr[x] = dy[x * p.dy_stride[3]];
        gr[Dv] = 0;
      }
    }
  }

  // Pass 1 for one query head and one chunk.
  void queries_forward_order(int64_t h, int64_t t0, int64_t rows, bool state_empty) {
    const int64_t row0 = qrow0(h, t0);
    acc_t* dq = out(p.dq, row0, D);
    acc_t* db = out(p.db, row0, 1);
    std::fill(db, db + rows, acc_t(0));

    // Earlier (or all) keys through the state: the gradient of the read (StateReadGrad):
    // dq = tau dqe[:D], db = dqe[D].
    if (!state_empty) {
      const acc_t* deT = read_grad(keys.state.data(), gc.data(), qc.data(), bq.data(), rows, tau);
      for (int64_t i = 0; i < rows; ++i) {
        db[i] += deT[D * rows + i];
        for (int64_t x = 0; x < D; ++x) dq[i * D + x] += tau * deT[x * rows + i];
      }
    }

    // Keys of this chunk directly: s = tau Q K^T + b, E = G~ V~^T, dS = w'(s) E (j <= i).
    // Every product on gemm (csq_gemm.h) with untransposed operands, alpha 1 (tau is in dS):
    // the GEMM microkernel's form. (Through at::mm with transposed views they ran on BLAS
    // with the dispatcher's microseconds per call, at AVX2 speed on the AMD EPYC.)
    if (p.causal) {
      const acc_t* vT = tr.data();  // pass_forward_order's, once per chunk
      acc_t *dST = tr.data() + Dv1 * rows, *WT = dST + rows * rows;
      gemm<acc_t>(false, false, rows, rows, D, acc_t(1), qc.data(), D, keys.kT.data(), rows,
                  acc_t(0), blk.data(), rows);
      gemm<acc_t>(false, false, rows, rows, Dv1, acc_t(1), gc.data(), Dv1, vT, rows, acc_t(0),
                  blk2.data(), rows);
      for (int64_t i = 0; i < rows; ++i) {
        acc_t rowsum = 0;
        for (int64_t j = 0; j < rows; ++j) {
          const acc_t s = tau * blk[i * rows + j] + bq[i];
          const acc_t ds = j <= i ? Map::weight_grad(s) * blk2[i * rows + j] : acc_t(0);
          blk[i * rows + j] = j <= i ? Map::weight(s) : acc_t(0);  // W, for dv
          blk2[i * rows + j] = tau * ds;                            // tau dS, for dq and dk
          rowsum += ds;
        }
        db[i] += rowsum;
      }
      acc_t* dk = out(p.dk, krow0(t0), D);
      acc_t* dv = out(p.dv, krow0(t0), Dv);
      if (all_finite(kc, rows * D) && all_finite(qc, rows * D) && all_finite(gc, rows * Dv1)) {
        transpose_into(blk2.data(), rows, rows, rows, dST, rows);
        transpose_into(blk.data(), rows, rows, rows, WT, rows);
        gemm<acc_t>(false, false, rows, D, rows, acc_t(1), blk2.data(), rows, kc.data(), D,
                    acc_t(1), dq, D);
        gemm<acc_t>(false, false, rows, D, rows, acc_t(1), dST, rows, qc.data(), D, acc_t(1),
                    dk, D);
        gemm<acc_t>(false, false, rows, Dv, rows, acc_t(1), WT, rows, gc.data(), Dv1, acc_t(1),
                    dv, Dv);
      } else {  // keep NaN / Inf on their side of the causal mask
        lower_mm_add(blk2.data(), rows, kc.data(), D, D, acc_t(1), false, dq, D);
        lower_mm_add(blk2.data(), rows, qc.data(), D, D, acc_t(1), true, dk, D);
        lower_mm_add(blk.data(), rows, gc.data(), Dv, Dv1, acc_t(1), true, dv, Dv);
      }
    }

    // b_i = c_h - tau <q_i, mu_i> (centering) or c_h + tau <q_i, ref>: the gradients of q
    // through mu or ref, of the carried count through mu, and of ref. (The shift's is the sum
    // of db, taken by the host layer.)
    for (int64_t i = 0; i < rows; ++i) {
      const acc_t* qi = qc.data() + i * D;
      if (p.center) {
        const acc_t* mi = mu.data() + i * D;
        acc_t qmu = 0;
        for (int64_t x = 0; x < D; ++x) {
          dq[i * D + x] -= tau * db[i] * mi[x];
          qmu += qi[x] * mi[x];
        }
        dcount += tau * db[i] * qmu / (n_before(t0) + acc_t(i + 1));
      } else {
        for (int64_t x = 0; x < D; ++x) {
          dq[i * D + x] += tau * db[i] * ref[x];
          dref[x] += tau * db[i] * qi[x];
        }
      }
    }
  }

  // Returns false when a query row reads the state beyond its float32 conditioning limit (the
  // forward's test, on the saved b and den; csq_params.h): the op runs again in float64.
  bool pass_forward_order() {
    const bool check = checks_state<Map>(p);
    keys.start();
    if (!p.causal) keys.absorb_all();
    for (int64_t t0 = 0; t0 < N; t0 += C) {
      if (check && state_flagged(p)) return false;
      const ForwardChunk chunk = keys.forward_chunk(t0, carried, check, mu.data());
      const int64_t rows = chunk.rows;
      const bool reads_state = chunk.reads_state;
      if (p.causal) transpose_into(vc.data(), rows, Dv1, Dv1, tr.data(), rows);
      for (int64_t hh = 0; hh < p.group; ++hh) {
        const int64_t h = g * p.group + hh;
        load_queries(h, t0, rows);
        if (check && reads_state &&
            rows_ill_conditioned(p, qc.data(), bq.data(),
                                 static_cast<const acc_t*>(p.den) + qrow0(h, t0), 1, rows,
                                 chunk.trace, chunk.count)) {
          flag_state(p);
          return false;
        }
        queries_forward_order(h, t0, rows, !reads_state);
      }
      if (p.causal) keys.absorb(rows);
    }
    return true;
  }

  // Centering: mu_i = mean of the keys of J(i), so key j receives sum_{i : j in J(i)} dmu_i
  // / n_i with dmu_i = -tau db_i q_i, summed over the query heads of the group. Writes those
  // per-query vectors of a chunk into center_terms.
  void centering_terms(int64_t t0, int64_t rows) {
    std::fill(center_terms.begin(), center_terms.begin() + rows * D, acc_t(0));
    for (int64_t hh = 0; hh < p.group; ++hh) {
      const int64_t h = g * p.group + hh;
      load_q(h, t0, rows);
      const acc_t* db = out(p.db, qrow0(h, t0), 1);
      for (int64_t i = 0; i < rows; ++i) {
        const acc_t n_i = p.causal ? n_before(t0) + acc_t(i + 1) : acc_t(N);
        const acc_t coef = -tau * db[i] / n_i;
        for (int64_t x = 0; x < D; ++x) center_terms[i * D + x] += coef * qc[i * D + x];
      }
    }
  }

  // Pass 2 for one chunk of keys: later (or all) queries through R.
  void keys_reverse_order(int64_t t0, int64_t rows) {
    keys.keys_grad(query_state.data(), rows, out(p.dk, krow0(t0), D), out(p.dv, krow0(t0), Dv));
  }

  void pass_reverse_order() {
    // R starts as the gradient of the returned state: S_out = S_in + sum_j psi_j v~_j^T gives
    // its keys and values exactly the terms that later queries give.
    // The key state S is done with: R takes over its memory (4 MB per task at Dk = 128).
    query_state = std::move(keys.state);
    keys.features_by_row = true;  // for dv += psi R
    const bool seeded = p.dstate_out != nullptr;
    if (seeded) {
      const acc_t* src = task_state<Map>(static_cast<const acc_t*>(p.dstate_out), p, t);
      std::copy(src, src + F * Dv1, query_state.begin());
    } else {
      std::fill(query_state.begin(), query_state.end(), acc_t(0));
    }
    std::fill(center_sum.begin(), center_sum.end(), acc_t(0));
    auto absorb_queries = [&](int64_t t0, int64_t rows) {
      for (int64_t hh = 0; hh < p.group; ++hh) {
        const int64_t h = g * p.group + hh;
        load_queries(h, t0, rows);
        add_features_t_product<Map, true>(qc.data(), bq.data(), rows, D, tau, phi_t.data(), C,
                                          gc.data(), Dv1, /*ones_column=*/false,
                                          query_state.data());
      }
    };

    if (!p.causal) {
      for (int64_t t0 = 0; t0 < N; t0 += C) {
        const int64_t rows = std::min(C, N - t0);
        absorb_queries(t0, rows);
        if (p.center) {
          centering_terms(t0, rows);
          add_rows(center_terms.data(), rows, D, center_sum.data());
        }
      }
      for (int64_t t0 = 0; t0 < N; t0 += C) {
        const int64_t rows = std::min(C, N - t0);
        keys.load(t0, rows);
        keys_reverse_order(t0, rows);
        acc_t* dk = out(p.dk, krow0(t0), D);
        if (p.center)
          for (int64_t j = 0; j < rows; ++j)
            for (int64_t x = 0; x < D; ++x) dk[j * D + x] += center_sum[x];
      }
    } else {
      const int64_t last0 = N > 0 ? ((N - 1) / C) * C : -1;
      for (int64_t t0 = last0; t0 >= 0; t0 -= C) {
        const int64_t rows = std::min(C, N - t0);
        keys.load(t0, rows);
        if (t0 != last0 || seeded) keys_reverse_order(t0, rows);
        if (p.center) {
          // Later chunks' terms (center_sum), then this chunk's: a reverse cumulative sum,
          // i >= j.
          centering_terms(t0, rows);
          acc_t* dk = out(p.dk, krow0(t0), D);
          for (int64_t j = rows - 1; j >= 0; --j)
            for (int64_t x = 0; x < D; ++x) {
              center_sum[x] += center_terms[j * D + x];
              dk[j * D + x] += center_sum[x];
            }
        }
        absorb_queries(t0, rows);
      }
    }
    finish_state_gradients();
  }

  // The carried state was read by every query (R now sums over all of them) and, through the
  // key means, by its key sum (center_sum: all centering terms) and its count (dcount). Every
  // key of the sequence is k - ref, so ref receives minus the sum of their gradients.
  void finish_state_gradients() {
    if (carried) {
      acc_t* ds = task_state<Map>(static_cast<acc_t*>(p.dstate_in), p, t);
      std::copy(query_state.begin(), query_state.end(), ds);
      if (p.center) {
        for (int64_t x = 0; x < D; ++x) state_key_sum<Map>(ds, x, D, Dv) += center_sum[x];
        state_key_count<Map>(ds, D, Dv) += dcount;
      }
    }
    acc_t* dk = out(p.dk, krow0(0), D);
    for (int64_t j = 0; j < N; ++j)
      for (int64_t x = 0; x < D; ++x) dref[x] -= dk[j * D + x];
    finish_ref_gradient<scalar_t, acc_t, Map>(p, p, p, t, ref.data(), dref.data(), dk);
  }
};

}  // namespace

template <typename scalar_t, typename Map>
void launch_bwd(const BwdParams& p) {
  using acc_t = acc_type_of<scalar_t>;
  at::parallel_for(0, p.num_seqs * p.heads_k, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      BackwardTask<scalar_t, acc_t, Map> work(p, seq_task(p, task));
      if (work.pass_forward_order()) work.pass_reverse_order();
    }
  });
}

CSQ_CPU_INSTANTIATE(launch_bwd, BwdParams);

}  // namespace cpu
}  // namespace csq
