// CSQ attention forward on the CPU, direct path: for each query tile (all query heads of a
// key/value head), the weights of each key tile are computed from a GEMM,
// w = weight(tau Q (K - r)^T + b) (its square for CSQ; Map, csq_feature_map.h), and summed
// into num with a second GEMM against V (den: the rows' sums of w). Causal key tiles after the
// query tile are skipped. No N x N tensor. A carried state is read first and returned at the
// end (csq_direct_state_cpu.h).
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
struct ForwardTile : QueryTileWork<scalar_t, acc_t, Map, DirectFwdParams> {
  using Base = QueryTileWork<scalar_t, acc_t, Map, DirectFwdParams>;
  using Base::p, Base::kp, Base::carried, Base::D, Base::G, Base::T, Base::tau, Base::eps,
      Base::qt, Base::kt, Base::state, Base::b, Base::b_pair, Base::delta, Base::pairs;
  const int64_t Dv1;
  std::vector<acc_t> w, num;  // (G T x T), (G T x Dv + 1)

  ForwardTile(const DirectFwdParams& p_, const KeyPrefix& kp_,
              const KeyStore<scalar_t, acc_t>& ks_,
              const DirectCarried<scalar_t, acc_t, Map>& carried_)
      : Base(p_, kp_, ks_, carried_), Dv1(p_.dim_v + 1), w(G * T * T), num(G * T * Dv1) {}

  void run(const TileTask& t) {
    qt.load(t, kp);
    const int64_t rows = t.rows, grows = G * rows;
    const acc_t* shift = static_cast<const acc_t*>(p.shift);
    const acc_t* row_shift = static_cast<const acc_t*>(p.row_shift);
    // b_i = c_h - tau <q_i, m_i> (+ row_shift_i): the shift that goes with keys k - r
    // (csq_direct_params.h). In float64: without centering m_i = -r, a key, and c_h + tau <q_i, r>
    // may be the difference of two large numbers.
    for (int64_t r = 0; r < grows; ++r) {
      const acc_t* qr = qt.q.data() + r * D;
      const double* md = qt.m(r % rows);
      const double dot = sum_f64(D, [&](int64_t x) { return double(qr[x]) * md[x]; });
      double br = double(shift[t.seq.head_k * G + r / rows]) - p.scale * dot;
      if (row_shift != nullptr) br += double(row_shift[qt.out_row(t, r)]);
      b[r] = static_cast<acc_t>(br);
    }
    if (p.state_in != nullptr) {  // the carried state's keys first: num = phi(q, b0) . S
      const acc_t* b0 = state.shifts(qt.q.data(), grows, b.data(), tau, carried.ref(t.seq),
                                     qt.ref.data());
      state.read(carried.sums(t.seq), qt.q.data(), b0, grows, tau, num.data());
    } else {
      std::fill(num.begin(), num.begin() + grows * Dv1, acc_t(0));
    }
    const int64_t end = p.causal ? t.t0 + rows : t.seq.len;
    pairs.compute(qt.q.data(), grows, kp, t.seq, p.heads_k, t.t0, end);
    for (int64_t j0 = 0; j0 < end; j0 += T) {
      const int64_t cols = std::min(T, end - j0);
      const bool diag = p.causal && j0 == t.t0;
      kt.load(t.seq, j0, cols);
      const acc_t* bp = pair_shifts_from(pairs.at(j0, T), grows, D, b.data(), tau, kt.ref,
                                         qt.ref.data(), delta.data(), b_pair.data());
      gemm<acc_t>(false, false, grows, cols, D, acc_t(1), qt.q.data(), D, kt.kT, kt.ld,
                  acc_t(0), w.data(), cols);
      kt.exact_far_scores(qt.q.data(), grows, w.data(), cols);
      if (diag && !kt.values_finite()) {
        shifted_weights<Map, acc_t>(w.data(), grows, rows, cols, bp, tau, diag, nullptr,
                               w.data());
        for (int64_t hh = 0; hh < G; ++hh)  // only the kept j <= i, per head
          lower_mm_add(w.data() + hh * rows * cols, rows, kt.v, Dv1, Dv1, acc_t(1),
                       false, num.data() + hh * rows * Dv1, Dv1);
      } else {  // den as row sums of w, the values alone through the GEMM
        shifted_weights<Map, acc_t>(w.data(), grows, rows, cols, bp, tau, diag, nullptr,
                               w.data(), num.data() + p.dim_v, Dv1);
        gemm<acc_t>(false, false, grows, p.dim_v, cols, acc_t(1), w.data(), cols, kt.v,
                    Dv1, acc_t(1), num.data(), Dv1);
      }
    }
    const int64_t Dv = p.dim_v;
    const acc_t* row_sums = static_cast<const acc_t*>(p.row_sums);
    for (int64_t r = 0; r < grows; ++r) {
      const int64_t row = qt.out_row(t, r);
      acc_t* nr = num.data() + r * Dv1;
      if (row_sums != nullptr)
        for (int64_t x = 0; x < Dv1; ++x) nr[x] += row_sums[row * Dv1 + x];
      const acc_t den = nr[Dv];
      const acc_t inv = p.normalize ? acc_t(1) / (den + eps) : acc_t(1);
      acc_t* y = static_cast<acc_t*>(p.y) + row * Dv;
      for (int64_t x = 0; x < Dv; ++x) y[x] = nr[x] * inv;
      static_cast<acc_t*>(p.b)[row] = b[r];
      static_cast<acc_t*>(p.den)[row] = den;
    }
  }
};

}  // namespace

template <typename scalar_t, typename Map>
void launch_direct_fwd(const DirectFwdParams& p) {
  using acc_t = acc_type_of<scalar_t>;
  const direct::DirectCarried<scalar_t, acc_t, Map> carried(p, p.state_out != nullptr);
  const direct::KeyPrefix kp = carried.prefix();
  const direct::KeyStore<scalar_t, acc_t> ks(p, kp, /*backward=*/false);
  // A causal tile's cost grows with its index: the balanced split keeps both cores busy.
  direct::run_balanced(direct::all_tiles(p),
                       [&](const direct::TileTask& t) { return p.causal ? t.index : 0; },
                       [&] { return ForwardTile<scalar_t, acc_t, Map>(p, kp, ks, carried); },
                       direct::direct_lanes(p));
  direct::write_forward_state(p, carried);
}

CSQ_CPU_INSTANTIATE(launch_direct_fwd, DirectFwdParams);

}  // namespace cpu
}  // namespace csq
