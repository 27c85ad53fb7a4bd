// The key side of the chunked path's CPU kernels (forward and the backward's passes), for any
// feature map (csq_feature_map.h): a task's carried state and reference key, the per-query
// shifts b_i and key means mu_i of a chunk, and the key scan (shifted keys, augmented values,
// key features and the key state S). The big products go through csq_gemm.h (oneDNN's
// microkernel / BLAS).
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../csq_params.h"
#include "csq_cpu_features.h"
#include "csq_cpu_rows.h"
#include "csq_cpu_state_check.h"
#include "csq_gemm.h"

namespace csq {
namespace cpu {

// A task's rows of a state tensor (S, Hk, F, Dv + 1): its F x (Dv + 1) sums.
template <typename Map, typename Ptr>
inline Ptr task_state(Ptr base, const QkvParams& p, const SeqTask& t) {
  return base + (t.seq * p.heads_k + t.head_k) * state_head_elems<Map>(p.dim_k, p.dim_v);
}

// A task's sums and ref in the carried-state tensors of an op (state_in / state_out, ref_in /
// ref_out): its own entry, or its slot of a pool (csq_params.h, StatePool).
template <typename Map, typename Ptr>
inline Ptr task_pooled_sums(Ptr base, const QkvParams& p, const CarriedState& cs,
                            const SeqTask& t) {
  return base + state_sums_offset(cs.pool, t.seq, t.head_k, p.heads_k,
                                  state_head_elems<Map>(p.dim_k, p.dim_v));
}
template <typename Ptr>
inline Ptr task_pooled_ref(Ptr base, const QkvParams& p, const CarriedState& cs,
                           const SeqTask& t) {
  return base + state_ref_offset(cs.pool, t.seq, t.head_k, p.heads_k, p.dim_k);
}

// The task's carried sums, or null when it has none (no state_in, or a fresh pool slot).
template <typename Map, typename acc_t>
inline const acc_t* carried_sums(const QkvParams& p, const CarriedState& cs, const SeqTask& t) {
  if (cs.state_in == nullptr || state_fresh(cs.pool, t.seq)) return nullptr;
  return task_pooled_sums<Map>(static_cast<const acc_t*>(cs.state_in), p, cs, t);
}

// The key count that a task's carried state holds (0 without one).
template <typename Map, typename acc_t>
inline acc_t carried_count(const QkvParams& p, const CarriedState& cs, const SeqTask& t) {
  const acc_t* sums = carried_sums<Map, acc_t>(p, cs, t);
  return sums == nullptr ? acc_t(0) : state_key_count<Map>(sums, p.dim_k, p.dim_v);
}

// Coordinate x of key j of a task, in the accumulation type.
template <typename scalar_t, typename acc_t>
inline acc_t task_key(const QkvParams& p, const SeqTask& t, int64_t j, int64_t x) {
  return static_cast<acc_t>(
      row_ptr<scalar_t>(p.k, p.k_stride, t.batch, t.head_k, t.start + j)[x * p.k_stride[3]]);
}

// Whether the task keeps ref_in (csq_params.h, keeps_ref_in) rather than picking its own. A
// fresh pool slot's ref is never read: the sequence starts as one without ref_in.
template <typename Map, typename acc_t>
inline bool task_keeps_ref(const QkvParams& p, const CarriedState& cs, const SeqTask& t) {
  return keeps_ref_in(cs.ref_in != nullptr && !state_fresh(cs.pool, t.seq),
                      cs.state_in != nullptr, t.len,
                      carried_count<Map, acc_t>(p, cs, t) != acc_t(0));
}

// The reference key r of a task (csq_params.h): the carried state's when it holds keys (or
// when the sequence has none to pick from), else the median of the sequence's first keys (0
// for none).
template <typename scalar_t, typename acc_t, typename Map>
inline void task_reference(const QkvParams& p, const CarriedState& cs, const SeqTask& t,
                           acc_t* ref) {
  const int64_t d = p.dim_k;
  if (task_keeps_ref<Map, acc_t>(p, cs, t)) {
    const acc_t* src = task_pooled_ref(static_cast<const acc_t*>(cs.ref_in), p, cs, t);
    std::copy(src, src + d, ref);
    return;
  }
  const int64_t m = std::min<int64_t>(t.len, kRefKeys);
  for (int64_t x = 0; x < d; ++x)
    ref[x] = ref_key_median<acc_t>(
        m, [&](int64_t j) { return task_key<scalar_t, acc_t>(p, t, j, x); });
}

// The end of a task's backward: its ref's gradient dref (D; the op's gradient through k - ref
// and b) plus that of the returned ref goes to ref_in where the task kept it (the rule with
// the forward's ref_in given or not: g.ref_given), else, when a
// returned state or ref carries a gradient, to the keys the median picked (ref_key_position;
// the outputs alone do not depend on a picked ref: it only re-centres the keys of a state that
// holds none). Writes the task's row of dref_in (0 where picked) and adds to dk (the task's
// rows, row-major D).
template <typename scalar_t, typename acc_t, typename Map>
inline void finish_ref_gradient(const QkvParams& p, const CarriedState& cs,
                                const CarriedStateGrads& g, const SeqTask& t, const acc_t* ref,
                                acc_t* dref, acc_t* dk) {
  const int64_t d = p.dim_k, row = (t.seq * p.heads_k + t.head_k) * d;
  if (g.dref_out != nullptr)
    for (int64_t x = 0; x < d; ++x) dref[x] += static_cast<const acc_t*>(g.dref_out)[row + x];
  acc_t* out = static_cast<acc_t*>(g.dref) + row;
  const bool keeps = keeps_ref_in(g.ref_given, cs.state_in != nullptr, t.len,
                                  carried_count<Map, acc_t>(p, cs, t) != acc_t(0));
  if (keeps) {
    std::copy(dref, dref + d, out);
    return;
  }
  std::fill(out, out + d, acc_t(0));
  if (g.dstate_out == nullptr && g.dref_out == nullptr) return;
  const int64_t m = std::min<int64_t>(t.len, kRefKeys);
  for (int64_t x = 0; x < d; ++x) {
    const int64_t j = ref_key_position<acc_t>(
        m, ref[x], [&](int64_t i) { return task_key<scalar_t, acc_t>(p, t, i, x); });
    if (j >= 0) dk[j * d + x] += dref[x];
  }
}

// Starts a task's key state: the carried sums (F x (Dv + 1)) or zeros. Fills ksum with the
// carried sum of shifted keys and returns the carried key count (both read off the ones
// column of the sums).
template <typename Map, typename acc_t>
inline acc_t task_initial_state(const QkvParams& p, const CarriedState& cs, const SeqTask& t,
                                acc_t* state, acc_t* ksum) {
  const int64_t d = p.dim_k, elems = state_head_elems<Map>(d, p.dim_v);
  const acc_t* src = carried_sums<Map, acc_t>(p, cs, t);
  if (src == nullptr) {
    std::fill(state, state + elems, acc_t(0));
    std::fill(ksum, ksum + d, acc_t(0));
    return acc_t(0);
  }
  std::copy(src, src + elems, state);
  for (int64_t x = 0; x < d; ++x) ksum[x] = state_key_sum<Map>(state, x, d, p.dim_v);
  return state_key_count<Map>(state, d, p.dim_v);
}

// Per-query shifts b_i for the rows of a chunk (see csq_params.h): with centering
// b_i = c - tau <q_i, mu_i>, else b_i = c + tau <q_i, ref>.
template <typename acc_t>
inline void query_shifts(const QkvParams& p, const acc_t* qc, const acc_t* mu, const acc_t* ref,
                         int64_t rows, acc_t shift, acc_t tau, acc_t* bq) {
  const int64_t d = p.dim_k;
  for (int64_t i = 0; i < rows; ++i) {
    acc_t dot = 0;
    if (p.center)
      for (int64_t x = 0; x < d; ++x) dot -= qc[i * d + x] * mu[i * d + x];
    else
      for (int64_t x = 0; x < d; ++x) dot += qc[i * d + x] * ref[x];
    bq[i] = shift + tau * dot;
  }
}

// mu'_i for the rows of a chunk: the mean of the shifted keys query i attends to. ksum holds
// the sum of the n_before shifted keys before the chunk (causal) or of all n_total keys.
template <typename acc_t>
inline void key_means(const acc_t* kc, int64_t rows, int64_t d, const acc_t* ksum,
                      acc_t n_before, bool causal, int64_t n_total, acc_t* mu) {
  if (!causal) {
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t x = 0; x < d; ++x) mu[i * d + x] = ksum[x] / acc_t(n_total);
    return;
  }
  for (int64_t i = 0; i < rows; ++i) {
    const acc_t* prev = i == 0 ? ksum : mu + (i - 1) * d;  // running sums, divided below
    for (int64_t x = 0; x < d; ++x) mu[i * d + x] = prev[x] + kc[i * d + x];
  }
  for (int64_t i = rows - 1; i >= 0; --i)
    for (int64_t x = 0; x < d; ++x) mu[i * d + x] /= n_before + acc_t(i + 1);
}

// The key side of a task's scan, shared by the chunked forward and backward, the direct
// path's carried state and the state-only op: the current chunk's shifted keys, augmented
// values and key features, and the key state S = sum psi(k - ref) [v, 1]^T with the running
// sum of shifted keys. The features are built transposed (psi_t, F x C) by the state update
// (absorb), or row by row (psi, C x F) by load with `features_by_row` for the keys' gradients
// (keys_grad).
// A chunk of the forward order (KeyScan::forward_chunk): its rows; whether its queries read
// the key state (all but a causal sequence's first chunk without a carried state); the key
// spread of that state (state_key_spread) when the call checks it, else 0.
struct ForwardChunk {
  int64_t rows;
  bool reads_state;
  double trace, count;
};

template <typename scalar_t, typename acc_t, typename Map>
struct KeyScan {
  const QkvParams& p;
  const CarriedState& cs;
  const SeqTask t;
  const int64_t D, Dv1, F, C;
  std::vector<acc_t> ref, kc, vc, psi, psi_t, ksum, state;
  // Causal, forward order: the chunk's keys transposed (D x rows), the right operand of the
  // in-chunk scores Q K^T as the GEMM microkernel takes it (with kc itself, transposed, that
  // product ran on BLAS: 5% of the forward at Dk = 32 on the AMD EPYC; bench/NOTES.md 18).
  std::vector<acc_t> kT;
  std::vector<acc_t> gT, uT, eT, deT;  // keys_grad's V~^T, u^T, ke^T and its gradient
  acc_t carried_keys = 0;  // keys carried in by an initial state
  bool features_by_row = false;

  KeyScan(const QkvParams& p_, const CarriedState& cs_, int64_t chunk, const SeqTask& t_)
      : p(p_), cs(cs_), t(t_), D(p_.dim_k), Dv1(p_.dim_v + 1), F(Map::num_features(p_.dim_k)),
        C(chunk), ref(D), kc(C * D), vc(C * Dv1), psi_t(C * F), ksum(D), state(F * Dv1),
        kT(p_.causal ? C * D : 0) {
    task_reference<scalar_t, acc_t, Map>(p, cs, t, ref.data());
  }

  // The state before the sequence: the carried one, or empty.
  void start() { carried_keys = task_initial_state<Map>(p, cs, t, state.data(), ksum.data()); }

  // Keys (shifted by ref) and values with their ones column of a chunk; with features_by_row
  // their key features as rows.
  void load(int64_t t0, int64_t rows) {
    load_rows<scalar_t, acc_t>(p.k, p.k_stride, t.batch, t.head_k, t.start + t0, rows, D,
                               ref.data(), kc.data(), D);
    load_values_aug<scalar_t, acc_t>(p, t.batch, t.head_k, t.start + t0, rows, vc.data());
    if (features_by_row) {
      psi.resize(C * F);  // only the backward's second pass asks for it
      features_rows<Map, false>(kc.data(), static_cast<const acc_t*>(nullptr), rows, D,
                                acc_t(1), psi.data());
    }
  }

  // The loaded chunk joins the state: S += Psi^T V~ (the key features built here: a causal
  // forward's last chunk, which joins no state, builds none), and the running key sum.
  void absorb(int64_t rows) {
    add_features_t_product<Map, false>(kc.data(), static_cast<const acc_t*>(nullptr), rows, D,
                                       acc_t(1), psi_t.data(), C, vc.data(), Dv1,
                                       /*ones_column=*/true, state.data());
    add_rows(kc.data(), rows, D, ksum.data());
  }

  // The start of the chunk at t0 in the forward order, shared by the chunked forward and the
  // backward's first pass (`carried`: a carried state precedes the sequence): with `check`
  // the spread of the state its queries read, for the conditioning check (taken before the
  // chunk joins it), then its keys (causal; otherwise every key is in already) with kT, and
  // their means mu (rows x D) when centering.
  ForwardChunk forward_chunk(int64_t t0, bool carried, bool check, acc_t* mu) {
    ForwardChunk c{std::min(C, t.len - t0), !(p.causal && t0 == 0 && !carried), 0, 0};
    if (check && c.reads_state)
      state_key_spread<Map>(state.data(), D, Dv1 - 1, &c.trace, &c.count);
    if (p.causal) {
      load(t0, c.rows);
      transpose_into(kc.data(), c.rows, D, D, kT.data(), c.rows);
    }
    if (p.center)
      key_means(kc.data(), c.rows, D, ksum.data(), carried_keys + acc_t(t0), p.causal, t.len,
                mu);
    return c;
  }

  // Every key joins the state (before any query reads it, when not causal).
  void absorb_all() {
    for (int64_t t0 = 0; t0 < t.len; t0 += C) {
      const int64_t rows = std::min(C, t.len - t0);
      load(t0, rows);
      absorb(rows);
    }
  }

  // The gradient that a state gradient R (F x (Dv + 1)) gives the loaded chunk's keys and
  // values (loaded with features_by_row): dv += psi R[:, :Dv], and with u_j = R v~_j (the
  // gradient of psi_j, as u^T = R V~^T), dk += d/dk <psi(k - ref), u> along the rows of
  // ke^T = [k, 1]^T. dk, dv: the chunk's rows, row-major D and Dv.
  void keys_grad(const acc_t* R, int64_t rows, acc_t* dk, acc_t* dv) {
    const int64_t Dv = Dv1 - 1;
    gT.resize(Dv1 * C);
    uT.resize(F * C);
    eT.resize((D + 1) * C);
    deT.resize((D + 1) * C);
    gemm<acc_t>(false, false, rows, Dv, F, acc_t(1), psi.data(), F, R, Dv1, acc_t(1), dv, Dv);
    transpose_into(vc.data(), rows, Dv1, Dv1, gT.data(), rows);
    gemm<acc_t>(false, false, F, rows, Dv1, acc_t(1), R, Dv1, gT.data(), rows, acc_t(0),
                uT.data(), rows);
    extended_t<acc_t>(kc.data(), nullptr, rows, D, acc_t(1), eT.data());
    std::fill(deT.begin(), deT.begin() + (D + 1) * rows, acc_t(0));
    features_grad_t<Map, false>(uT.data(), rows, eT.data(), rows, D, deT.data(), rows);
    for (int64_t j = 0; j < rows; ++j)
      for (int64_t x = 0; x < D; ++x) dk[j * D + x] += deT[x * rows + j];
  }
};

}  // namespace cpu
}  // namespace csq
