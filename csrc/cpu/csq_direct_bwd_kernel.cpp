// CSQ attention backward on the CPU, direct path. The weights are recomputed tile by tile (as
// flash attention does) from q, k and the forward's saved b:
//   dnum_i = dy_i / (den_i + eps),  dden_i = -<dy_i, y_i> / (den_i + eps)   (normalize)
//   dw_ij = <dnum_i, v_j> + dden_i,  ds_ij = w'(s_ij) dw_ij (2 s_ij for CSQ),  db_i = sum_j ds_ij
//   dq_i = tau sum_j ds_ij (k_j - r) - tau (mu_i - r) db_i,  dk_j = tau sum_i ds_ij q_i,
//   dv_j = sum_i w_ij dnum_i,  dshift_h = sum_i db_i,
// plus the centering term of dk: key l is in the mean mu_i of every query i that sees it, so
// dk_l += sum_{i sees l} -tau q_i db_i / n_i (a reverse cumulative sum when causal).
//
// Two schedules, chosen by how the work divides over the threads:
//  * per head: one task per (sequence, key/value head) walks its query tiles and their key
//    tiles once, accumulating dq, dk and dv together (five GEMMs per tile pair);
//  * per tile: a query pass over query tiles (dq, db: three GEMMs per pair), then a key pass
//    over key tiles (dk, dv: four GEMMs per pair), so that one head uses every core.
#include <ATen/ATen.h>

#include <vector>

#include "csq_cpu_launch.h"
#include "csq_direct_cpu.h"
#include "csq_direct_state_cpu.h"

namespace csq {
namespace cpu {
namespace {

using namespace direct;

template <typename scalar_t, typename acc_t, typename Map>
struct BackwardTiles : QueryTileWork<scalar_t, acc_t, Map, DirectBwdParams> {
  using Base = QueryTileWork<scalar_t, acc_t, Map, DirectBwdParams>;
  using Base::p, Base::kp, Base::carried, Base::D, Base::Dv, Base::G, Base::T, Base::tau,
      Base::eps, Base::qt, Base::kt, Base::state, Base::b, Base::b_pair, Base::delta,
      Base::pairs;
  std::vector<acc_t> g;  // [dnum, dden] per stacked row, for the state's gradients
  // Per stacked query row: dnum (Dv), dden, db; per pair: s, w, ds (G T x T); dq (G T x D);
  // the tile's q^T (D x G T) and dnum^T (Dv x G T). dk^T and dv^T (D and Dv rows of `acc_ld`)
  // collect a key tile's (or with the per-head schedule a sequence's) gradients unscaled.
  std::vector<acc_t> dnum, dden, db, s, w, ds, dq, qT, dnumT, dkT, dvT;
  int64_t acc_ld = 0;

  BackwardTiles(const DirectBwdParams& p_, const KeyPrefix& kp_,
                const KeyStore<scalar_t, acc_t>& ks_,
                const DirectCarried<scalar_t, acc_t, Map>& carried_)
      : Base(p_, kp_, ks_, carried_),
        g(p_.state_in ? p_.group * p_.tile * (p_.dim_v + 1) : 0), dnum(G * T * Dv), dden(G * T),
        db(G * T), s(G * T * T), w(G * T * T), ds(G * T * T), dq(G * T * D), qT(D * G * T),
        dnumT(Dv * G * T) {}

  acc_t* key_rows(void* base, const SeqTask& sq, int64_t j0, int64_t width) const {
    return static_cast<acc_t*>(base) +
           ((sq.batch * p.heads_k + sq.head_k) * p.seqlen + sq.start + j0) * width;
  }

  // The query tile, its saved shifts and the gradient of [num, den]; with `for_keys` also q^T
  // and dnum^T, the left operands of the key gradients.
  void load_queries(const TileTask& t, bool for_keys) {
    qt.load(t, kp);
    const int64_t grows = G * t.rows;
    const acc_t* dy0 = static_cast<const acc_t*>(p.dy);
    for (int64_t r = 0; r < grows; ++r) {
      const int64_t row = qt.out_row(t, r);
      const int64_t h = t.seq.head_k * G + r / t.rows;
      const acc_t* dy = dy0 + t.seq.batch * p.dy_stride[0] + h * p.dy_stride[1] +
                        (t.seq.start + t.t0 + r % t.rows) * p.dy_stride[2];
      const acc_t* y = static_cast<const acc_t*>(p.y) + row * Dv;
      const acc_t den = static_cast<const acc_t*>(p.den)[row];
      const acc_t inv = p.normalize ? acc_t(1) / (den + eps) : acc_t(1);
      acc_t dot = 0;
      for (int64_t x = 0; x < Dv; ++x) {
        const acc_t g = dy[x * p.dy_stride[3]];
        dnum[r * Dv + x] = g * inv;
        dot += g * y[x];
      }
      dden[r] = p.normalize ? -dot * inv : acc_t(0);
      b[r] = static_cast<const acc_t*>(p.b)[row];
    }
    if (!for_keys) return;
    transpose_into(qt.q.data(), grows, D, D, qT.data(), grows);
    transpose_into(dnum.data(), grows, Dv, Dv, dnumT.data(), grows);
  }

  // After load_queries: the rows' shifts relative to the carried state's ref (returned) and
  // g = [dnum, dden] per row.
  const acc_t* state_rows(const TileTask& t) {
    const int64_t grows = G * t.rows, Dv1 = Dv + 1;
    for (int64_t r = 0; r < grows; ++r) {
      std::copy(dnum.begin() + r * Dv, dnum.begin() + (r + 1) * Dv, g.begin() + r * Dv1);
      g[r * Dv1 + Dv] = dden[r];
    }
    return state.shifts(qt.q.data(), grows, b.data(), tau, carried.ref(t.seq), qt.ref.data());
  }

  // Zeroed dk^T and dv^T accumulators for `len` key positions.
  void start_keys(int64_t len) {
    acc_ld = len;
    dkT.assign(D * len, acc_t(0));
    dvT.assign(Dv * len, acc_t(0));
  }

  // The accumulated key gradients of positions [j0, j0 + len) of sq into dk (times tau) and dv.
  void flush_keys(const SeqTask& sq, int64_t j0, int64_t len) {
    acc_t* dk = key_rows(p.dk, sq, j0, D);
    acc_t* dv = key_rows(p.dv, sq, j0, Dv);
    for (int64_t j = 0; j < len; ++j) {
      for (int64_t x = 0; x < D; ++x) dk[j * D + x] += tau * dkT[x * acc_ld + j];
      for (int64_t x = 0; x < Dv; ++x) dv[j * Dv + x] += dvT[x * acc_ld + j];
    }
  }

  // One (query tile, key tile) pair, keys [j0, j0 + cols) already in kt. Adds to dq and db
  // when `with_dq`, to the accumulators' columns from `col` on when `with_keys`. dots: the
  // pair's <q_r, r_j - r_i> when the caller has them (PairDots), else null.
  void pair(const TileTask& t, int64_t cols, bool diag, bool with_dq, bool with_keys,
            int64_t col, const double* dots = nullptr) {
    const int64_t rows = t.rows, grows = G * rows;
    gemm<acc_t>(false, false, grows, cols, D, acc_t(1), qt.q.data(), D, kt.kT, kt.ld, acc_t(0),
                s.data(), cols);
    kt.exact_far_scores(qt.q.data(), grows, s.data(), cols);
    const acc_t* bp =
        dots != nullptr
            ? pair_shifts_from(dots, grows, D, b.data(), tau, kt.ref, qt.ref.data(),
                               delta.data(), b_pair.data())
            : pair_shifts(qt.q.data(), grows, D, b.data(), tau, kt.ref, qt.ref.data(),
                          delta.data(), b_pair.data());
    const bool moved = bp != b.data();  // keys relative to another reference than the queries'
    shifted_weights<Map, acc_t>(s.data(), grows, rows, cols, bp, tau, diag, s.data(), w.data());
    gemm<acc_t>(false, false, grows, cols, Dv, acc_t(1), dnum.data(), Dv, kt.vT, kt.ld,
                acc_t(0), ds.data(), cols);
    for (int64_t r = 0; r < grows; ++r) {
      const int64_t last = diag ? r % rows : cols - 1;
      const acc_t dd = dden[r];
      acc_t* dsr = ds.data() + r * cols;
      const acc_t* sr = s.data() + r * cols;
      for (int64_t j = 0; j < cols; ++j)
        dsr[j] = j <= last ? Map::weight_grad(sr[j]) * (dsr[j] + dd) : acc_t(0);
      const acc_t sum = sum16<acc_t>(cols, [&](int64_t j) { return dsr[j]; });
      db[r] += sum;
      // dq_i sums ds_ij (k_j - r_i) = ds_ij (k_j - r_j) + ds_ij (r_j - r_i)
      if (with_dq && moved)
        for (int64_t x = 0; x < D; ++x) dq[r * D + x] += sum * delta[x];
    }
    // On a diagonal tile a GEMM would carry 0 * NaN across the causal mask: a NaN or Inf key
    // after row i into dq_i, a NaN query or gradient row i into the keys after i. There the
    // products skip the masked terms instead (the same sums).
    if (with_dq) {
      if (diag && !all_finite_impl(kt.k, cols * D)) {
        for (int64_t hh = 0; hh < G; ++hh)
          lower_mm_add(ds.data() + hh * rows * cols, rows, kt.k, D, D, acc_t(1), false,
                       dq.data() + hh * rows * D, D);
      } else {
        gemm<acc_t>(false, false, grows, D, cols, acc_t(1), ds.data(), cols, kt.k, D,
                    acc_t(1), dq.data(), D);
      }
    }
    if (with_keys) {  // dk^T += q^T ds (tau at the flush), dv^T += dnum^T w
      if (diag && !(all_finite_impl(qT.data(), D * grows) &&
                    all_finite_impl(dnumT.data(), Dv * grows))) {
        masked_key_products(rows, cols, col);
        return;
      }
      gemm<acc_t>(false, false, D, cols, grows, acc_t(1), qT.data(), grows, ds.data(), cols,
                  acc_t(1), dkT.data() + col, acc_ld);
      gemm<acc_t>(false, false, Dv, cols, grows, acc_t(1), dnumT.data(), grows, w.data(), cols,
                  acc_t(1), dvT.data() + col, acc_ld);
    }
  }

  // dk^T += q^T ds and dv^T += dnum^T w of a diagonal tile, over the pairs j <= i only.
  void masked_key_products(int64_t rows, int64_t cols, int64_t col) {
    const int64_t grows = G * rows;
    for (int64_t r = 0; r < grows; ++r) {
      const int64_t i = r % rows;
      for (int64_t j = 0; j <= i && j < cols; ++j) {
        const acc_t dsv = ds[r * cols + j], wv = w[r * cols + j];
        for (int64_t x = 0; x < D; ++x) dkT[x * acc_ld + col + j] += qT[x * grows + r] * dsv;
        for (int64_t x = 0; x < Dv; ++x)
          dvT[x * acc_ld + col + j] += dnumT[x * grows + r] * wv;
      }
    }
  }

  // Every key tile a query tile sees: writes its dq and db; with `with_keys` (the per-head
  // schedule) also adds to dk and dv.
  void query_pass(const TileTask& t, bool with_keys) {
    load_queries(t, with_keys);
    const int64_t grows = G * t.rows;
    std::fill(db.begin(), db.begin() + grows, acc_t(0));
    std::fill(dq.begin(), dq.begin() + grows * D, acc_t(0));
    const int64_t end = p.causal ? t.t0 + t.rows : t.seq.len;
    pairs.compute(qt.q.data(), grows, kp, t.seq, p.heads_k, t.t0, end);
    for (int64_t j0 = 0; j0 < end; j0 += T) {
      const int64_t cols = std::min(T, end - j0);
      kt.load(t.seq, j0, cols);
      pair(t, cols, p.causal && j0 == t.t0, true, with_keys, j0, pairs.at(j0, T));
    }
    if (p.state_in != nullptr) {  // the carried state's keys, read by every row
      const acc_t* b0 = state_rows(t);
      state.backward(carried.sums(t.seq), qt.q.data(), b0, g.data(), grows, tau, dq.data(),
                     db.data());
    }
    for (int64_t r = 0; r < grows; ++r) {
      const int64_t row = qt.out_row(t, r);
      const double* md = qt.m(r % t.rows);
      acc_t* out = static_cast<acc_t*>(p.dq) + row * D;
      for (int64_t x = 0; x < D; ++x)
        out[x] = static_cast<acc_t>(p.scale * (double(dq[r * D + x]) - md[x] * double(db[r])));
      static_cast<acc_t*>(p.db)[row] = db[r];
    }
  }

  // Every query tile that sees key tile t: adds to its rows of dk and dv.
  void key_pass(const TileTask& t) {
    const int64_t first = p.causal ? t.index : 0;
    start_keys(t.rows);
    for (int64_t i = first; i < num_tiles(t.seq.len, T); ++i) {
      const TileTask tq{t.seq, i * T, std::min(T, t.seq.len - i * T), i};
      load_queries(tq, true);
      kt.load(t.seq, t.t0, t.rows);
      pair(tq, t.rows, p.causal && i == t.index, false, true, 0);
    }
    flush_keys(t.seq, t.t0, t.rows);
  }

  // The centering term of dk for a whole (sequence, key/value head), once db is complete.
  void center_keys(const SeqTask& sq) {
    if (!p.center || sq.len == 0) return;
    std::vector<double> run(D, 0.0);
    const auto add_query_terms = [&](int64_t i, double n) {
      for (int64_t hh = 0; hh < G; ++hh) {
        const int64_t h = sq.head_k * G + hh;
        const int64_t row = (sq.batch * p.heads_q + h) * p.seqlen + sq.start + i;
        const double g = -double(tau) * static_cast<const acc_t*>(p.db)[row] / n;
        const scalar_t* qr = row_ptr<scalar_t>(p.q, p.q_stride, sq.batch, h, sq.start + i);
        for (int64_t x = 0; x < D; ++x) run[x] += g * static_cast<double>(qr[x * p.q_stride[3]]);
      }
    };
    acc_t* dk = key_rows(p.dk, sq, 0, D);
    if (p.causal) {
      const double n0 = kp.count0(sq, p.heads_k);  // a carried state's keys
      for (int64_t i = sq.len - 1; i >= 0; --i) {
        add_query_terms(i, n0 + double(i + 1));
        for (int64_t x = 0; x < D; ++x) dk[i * D + x] += static_cast<acc_t>(run[x]);
      }
      return;
    }
    for (int64_t i = 0; i < sq.len; ++i) add_query_terms(i, double(sq.len));
    for (int64_t j = 0; j < sq.len; ++j)
      for (int64_t x = 0; x < D; ++x) dk[j * D + x] += static_cast<acc_t>(run[x]);
  }

  // A carried state's gradients for a whole (sequence, key/value head), once dq, db and the
  // tiles' and centering's dk, dv are complete (csq_direct_state_cpu.h): the returned state's
  // gradient gives the keys and values theirs (the key scan's keys_grad); every query read
  // the carried state, so dstate_in = dstate_out + sum_i phi(qe0_i) g~_i^T, plus (centering)
  // the gradients of its key sum and count through the key means; and since every key is
  // k - ref (and without centering b_i = c + tau <q_i, ref>), ref's gradient, to ref_in or to
  // the keys it was picked from (finish_ref_gradient).
  void state_pass(const SeqTask& sq) {
    if (!carried.any) return;
    const int64_t F = Map::num_features(D), Dv1 = Dv + 1;
    acc_t* dk = key_rows(p.dk, sq, 0, D);
    acc_t* dv = key_rows(p.dv, sq, 0, Dv);
    std::vector<acc_t> R(F * Dv1, acc_t(0));
    if (p.dstate_out != nullptr) {
      const acc_t* Rout = task_state<Map>(static_cast<const acc_t*>(p.dstate_out), p, sq);
      KeyScan<scalar_t, acc_t, Map> keys(p, p, T, sq);
      keys.features_by_row = true;
      for (int64_t t0 = 0; t0 < sq.len; t0 += T) {
        const int64_t rows = std::min(T, sq.len - t0);
        keys.load(t0, rows);
        keys.keys_grad(Rout, rows, dk + t0 * D, dv + t0 * Dv);
      }
      std::copy(Rout, Rout + F * Dv1, R.begin());
    }
    if (p.state_in != nullptr) {
      std::vector<acc_t> phi_t(F * kStateReadRows);
      for (int64_t i = 0; i < num_tiles(sq.len, T); ++i) {
        const TileTask tq{sq, i * T, std::min(T, sq.len - i * T), i};
        load_queries(tq, false);
        const acc_t* b0 = state_rows(tq);
        const int64_t grows = G * tq.rows;
        for (int64_t r0 = 0; r0 < grows; r0 += kStateReadRows) {
          const int64_t rows = std::min(kStateReadRows, grows - r0);
          add_features_t_product<Map, true>(qt.q.data() + r0 * D, b0 + r0, rows, D, tau,
                                            phi_t.data(), rows, g.data() + r0 * Dv1, Dv1,
                                            /*ones_column=*/false, R.data());
        }
      }
      acc_t* ds = task_state<Map>(static_cast<acc_t*>(p.dstate_in), p, sq);
      std::copy(R.begin(), R.end(), ds);
      if (p.center) state_key_gradients(sq, ds);
    }
    std::vector<acc_t> dref(D, acc_t(0));
    for (int64_t j = 0; j < sq.len; ++j)
      for (int64_t x = 0; x < D; ++x) dref[x] -= dk[j * D + x];
    if (!p.center) each_query_term(sq, [&](int64_t, const double* g_mu) {
      for (int64_t x = 0; x < D; ++x) dref[x] -= static_cast<acc_t>(g_mu[x]);
    });
    finish_ref_gradient<scalar_t, acc_t, Map>(p, p, p, sq, carried.ref(sq), dref.data(), dk);
  }

  // fn(i, g) for every position i of sq with g = -tau sum_h q_hi db_hi (D, float64): the
  // gradient of b_i's key mean (or, without centering, minus that of ref through b_i).
  template <typename Fn>
  void each_query_term(const SeqTask& sq, const Fn& fn) {
    std::vector<double> gm(D);
    for (int64_t i = 0; i < sq.len; ++i) {
      std::fill(gm.begin(), gm.end(), 0.0);
      for (int64_t hh = 0; hh < G; ++hh) {
        const int64_t h = sq.head_k * G + hh;
        const int64_t row = (sq.batch * p.heads_q + h) * p.seqlen + sq.start + i;
        const double c = -double(tau) * static_cast<const acc_t*>(p.db)[row];
        const scalar_t* qr = row_ptr<scalar_t>(p.q, p.q_stride, sq.batch, h, sq.start + i);
        for (int64_t x = 0; x < D; ++x) gm[x] += c * static_cast<double>(qr[x * p.q_stride[3]]);
      }
      fn(i, gm.data());
    }
  }

  // Centering with a carried state: mu_i - ref = (Z1 + sum_{j <= i} (k_j - ref)) / n_i with
  // n_i = Z0 + i + 1, so the state's key sum Z1 receives sum_i g_i / n_i and its count Z0
  // -sum_i <g_i, mu_i - ref> / n_i (g_i: each_query_term), in its last column ds.
  void state_key_gradients(const SeqTask& sq, acc_t* ds) {
    const acc_t* S = carried.sums(sq);
    const acc_t* ref = carried.ref(sq);
    const double n0 = kp.count0(sq, p.heads_k);
    std::vector<double> run(D), dz(D, 0.0);
    for (int64_t x = 0; x < D; ++x) run[x] = double(state_key_sum<Map>(S, x, D, Dv));
    double dcount = 0;
    each_query_term(sq, [&](int64_t i, const double* gm) {
      const scalar_t* kr = row_ptr<scalar_t>(p.k, p.k_stride, sq.batch, sq.head_k, sq.start + i);
      const double n = n0 + double(i + 1);
      for (int64_t x = 0; x < D; ++x) {
        run[x] += static_cast<double>(kr[x * p.k_stride[3]]) - double(ref[x]);
        dz[x] += gm[x] / n;
        dcount -= gm[x] * run[x] / (n * n);
      }
    });
    for (int64_t x = 0; x < D; ++x) state_key_sum<Map>(ds, x, D, Dv) += static_cast<acc_t>(dz[x]);
    state_key_count<Map>(ds, D, Dv) += static_cast<acc_t>(dcount);
  }
};

// Per head when whole heads divide over the threads well enough that the per-head
// schedule's 5 GEMMs per pair beat the per-tile schedule's 7 on all threads.
bool per_head_schedule(const DirectBwdParams& p) {
  const int64_t tasks = p.num_seqs * p.heads_k, threads = at::get_num_threads();
  if (tasks < threads) return false;
  const double rounds = double((tasks + threads - 1) / threads);
  return 5.0 * rounds <= 7.0 * double(tasks) / double(threads);
}

template <typename scalar_t, typename acc_t, typename Map>
void backward(const DirectBwdParams& p) {
  const DirectCarried<scalar_t, acc_t, Map> carried(p, p.dstate_out != nullptr ||
                                                           p.ref_in != nullptr);
  const KeyPrefix kp = carried.prefix();
  const KeyStore<scalar_t, acc_t> ks(p, kp, /*backward=*/true);
  using Work = BackwardTiles<scalar_t, acc_t, Map>;
  const auto make = [&] { return Work(p, kp, ks, carried); };
  const auto tiles = all_tiles(p);
  const auto later = [&](const TileTask& t) { return p.causal ? t.index : 0; };
  const auto earlier = [&](const TileTask& t) {
    return p.causal ? num_tiles(t.seq.len, p.tile) - t.index : 0;
  };
  if (per_head_schedule(p)) {
    struct PerHead {
      Work work;
      void run(const SeqTask& sq) {
        work.start_keys(sq.len);
        for (int64_t i = 0; i < num_tiles(sq.len, work.T); ++i)
          work.query_pass({sq, i * work.T, std::min(work.T, sq.len - i * work.T), i}, true);
        work.flush_keys(sq, 0, sq.len);
        work.center_keys(sq);
        work.state_pass(sq);
      }
    };
    std::vector<SeqTask> heads;
    for (int64_t task = 0; task < p.num_seqs * p.heads_k; ++task)
      heads.push_back(seq_task(p, task));
    run_balanced(heads, [](const SeqTask& sq) { return sq.len; },
                 [&] { return PerHead{make()}; }, direct_lanes(p));
    return;
  }
  struct QueryPass {
    Work work;
    void run(const TileTask& t) { work.query_pass(t, false); }
  };
  struct KeyPass {
    Work work;
    void run(const TileTask& t) { work.key_pass(t); }
  };
  run_balanced(tiles, later, [&] { return QueryPass{make()}; }, direct_lanes(p));
  run_balanced(tiles, earlier, [&] { return KeyPass{make()}; }, direct_lanes(p));
  at::parallel_for(0, p.num_seqs * p.heads_k, small_pass_grain(p), [&](int64_t begin,
                                                                        int64_t end) {
    Work work = make();
    for (int64_t task = begin; task < end; ++task) {
      work.center_keys(seq_task(p, task));
      work.state_pass(seq_task(p, task));
    }
  });
}

}  // namespace

template <typename scalar_t, typename Map>
void launch_direct_bwd(const DirectBwdParams& p) {
  backward<scalar_t, acc_type_of<scalar_t>, Map>(p);
}

CSQ_CPU_INSTANTIATE(launch_direct_bwd, DirectBwdParams);

}  // namespace cpu
}  // namespace csq
