// The feature rows of the CPU kernels, for any feature map (csq_feature_map.h): key features
// psi and query features phi of a block of rows, as rows or transposed (the GEMM microkernel's
// operand layout, csq_gemm.h), and the gradient that maps a feature-space vector back to the
// extended coordinates (q and b, or k). Transposed, every loop runs along the rows and
// vectorizes, whatever the map's row order.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../csq_feature_map.h"
#include "csq_cpu_rows.h"
#include "csq_gemm.h"

namespace csq {
namespace cpu {

// The extended coordinates of a block of rows, transposed: eT ((d + 1) x rows, ld rows), rows
// x < d scale * x^T, row d the constant coordinate: c[i] (queries: b_i), or 1 with c null
// (keys). x: rows x d, row-major.
template <typename acc_t>
inline void extended_t(const acc_t* x, const acc_t* c, int64_t rows, int64_t d, acc_t scale,
                       acc_t* eT) {
  transpose_into(x, rows, d, d, eT, rows);
  if (scale != acc_t(1))
    for (int64_t e = 0; e < d * rows; ++e) eT[e] *= scale;
  acc_t* last = eT + d * rows;
  if (c != nullptr)
    std::copy(c, c + rows, last);
  else
    std::fill(last, last + rows, acc_t(1));
}

// Row f of a feature block from the extended coordinates eT: m_f eT_x eT_y (eT_x for a row of
// one factor), m_f = Map::query_weight for query features (kQuery), 1 for key features. With
// sums (F), also each row's sum over the block, in sum16's order (add_features_t_product).
template <typename Map, bool kQuery, typename acc_t>
inline void features_from_extended_t(const acc_t* eT, int64_t rows, int64_t d, acc_t* out,
                                     int64_t ld, acc_t* sums = nullptr) {
  Map::for_each_row(static_cast<int>(d), [&](int64_t f, int x, int y) {
    const acc_t m = kQuery ? Map::template query_weight<acc_t>(x, y) : acc_t(1);
    const acc_t* ex = eT + x * rows;
    const acc_t* ey = y == kOneFactor ? nullptr : eT + y * rows;
    acc_t* o = out + f * ld;
    if (sums != nullptr) {
      sums[f] = ey == nullptr ? sum16<acc_t>(rows, [&](int64_t i) { return o[i] = m * ex[i]; })
                              : sum16<acc_t>(rows, [&](int64_t i) {
                                  return o[i] = m * ex[i] * ey[i];
                                });
    } else if (ey == nullptr) {
      for (int64_t i = 0; i < rows; ++i) o[i] = m * ex[i];
    } else {
      for (int64_t i = 0; i < rows; ++i) o[i] = m * ex[i] * ey[i];
    }
  });
}

// A state product over a block of rows: Z (F x n1, ld n1) += feat^T B, with the block's
// features built transposed into feat_t (F x rows, ld ld), the left operand as the GEMM
// microkernel takes it: key features psi(x) (the key state's update, B = [V, 1]) or with
// kQuery phi(tau x, b) (the backward's query states R, B = G~). Built feature by feature from
// x^T, so that every write is contiguous (one row at a time, writing F rows apart, made the
// chunked forward 35% slower at Dk = 32). B's last column is a denominator column, its
// product apart from the GEMM (gemm_den_apart, csq_gemm.h, says why); when that column is all
// ones (ones_column: B = [V, 1]) its products are the feature rows' sums, taken while each row
// is built (in the order of gemm_den_apart's dot products: the same sums) instead of in a
// second pass over the F x rows block (bench/NOTES.md 18; with other weights the fused
// products measured no faster than the second pass).
template <typename Map, bool kQuery, typename acc_t>
inline void add_features_t_product(const acc_t* x, const acc_t* b, int64_t rows, int64_t d,
                                   acc_t tau, acc_t* feat_t, int64_t ld, const acc_t* B,
                                   int64_t n1, bool ones_column, acc_t* Z) {
  const int64_t F = Map::num_features(d);
  acc_t* eT = thread_scratch<acc_t>((d + 1) * rows);
  extended_t<acc_t>(x, kQuery ? b : nullptr, rows, d, kQuery ? tau : acc_t(1), eT);
  const bool fuse =
      ones_column && std::is_same_v<acc_t, float> && use_microkernel() && n1 > 1 && rows > 0;
  if (!fuse) {
    features_from_extended_t<Map, kQuery>(eT, rows, d, feat_t, ld);
    gemm_den_apart<acc_t>(F, n1, rows, feat_t, ld, B, n1, acc_t(1), Z, n1);
    return;
  }
  thread_local std::vector<acc_t> sums;
  sums.resize(F);
  features_from_extended_t<Map, kQuery>(eT, rows, d, feat_t, ld, sums.data());
  gemm<acc_t>(false, false, F, n1 - 1, rows, acc_t(1), feat_t, ld, B, n1, acc_t(1), Z, n1);
  for (int64_t f = 0; f < F; ++f) Z[f * n1 + n1 - 1] += sums[f];
}

// A map's rows grouped for building them row by row: runs of consecutive rows f0 .. f0 + len - 1
// (len >= 2) with one first factor x and one weight m whose second factors are consecutive
// coordinates y0 .. y0 + len - 1, whose products are contiguous and vectorize; and every other
// row alone, m e_x e_y with y = d + 1 for a row of one factor (e_{d+1} = 1), so that the lone
// rows (SquareMap: the diagonal, linear and constant ones, 2 d + 1 of its 3 d + 1 runs) run in
// one loop without a branch. Walking single rows with the weight chosen per row ran scalar and
// made the chunked forward 14% slower at Dk = 64 (bench/NOTES.md 15); a lone row as a run of
// one with a branch on its kind was the larger part of the feature build at Dk = 32 (NOTES 18).
template <typename acc_t>
struct FeatureRun {
  int64_t f0;
  int x, y0, len;
  acc_t m;
};
template <typename acc_t>
struct FeatureSingle {
  int64_t f;
  int x, y;
  acc_t m;
};
template <typename acc_t>
struct FeatureRuns {
  std::vector<FeatureRun<acc_t>> runs;
  std::vector<FeatureSingle<acc_t>> singles;
};

// The runs of head size d, walked once per thread and head size: features_rows runs on the
// hot path (every chunk of the chunked forward, every block of a carried-state read).
template <typename Map, bool kQuery, typename acc_t>
inline const FeatureRuns<acc_t>& feature_runs(int64_t d) {
  thread_local int64_t walked_d = -1;
  thread_local FeatureRuns<acc_t> out;
  if (walked_d == d) return out;
  std::vector<FeatureRun<acc_t>> all;
  Map::for_each_row(static_cast<int>(d), [&](int64_t f, int x, int y) {
    const acc_t m = kQuery ? Map::template query_weight<acc_t>(x, y) : acc_t(1);
    if (!all.empty()) {
      FeatureRun<acc_t>& r = all.back();
      if (y != kOneFactor && r.y0 != kOneFactor && r.x == x && r.m == m &&
          r.f0 + r.len == f && r.y0 + r.len == y) {
        ++r.len;
        return;
      }
    }
    all.push_back({f, x, y, 1, m});
  });
  out.runs.clear();
  out.singles.clear();
  for (const FeatureRun<acc_t>& r : all) {
    if (r.len >= 2)
      out.runs.push_back(r);
    else
      out.singles.push_back({r.f0, r.x, r.y0 == kOneFactor ? static_cast<int>(d) + 1 : r.y0, r.m});
  }
  walked_d = d;
  return out;
}

// The same features as rows (rows x F): psi(k), or with kQuery phi(tau q, b) (b one per row).
template <typename Map, bool kQuery, typename acc_t>
inline void features_rows(const acc_t* x, const acc_t* b, int64_t rows, int64_t d, acc_t tau,
                          acc_t* out) {
  const int64_t F = Map::num_features(d);
  const FeatureRuns<acc_t>& fr = feature_runs<Map, kQuery, acc_t>(d);
  std::vector<acc_t> ext(d + 2);  // the row's extended coordinates, then 1 for lone factors
  acc_t* e = ext.data();
  e[d + 1] = acc_t(1);
  for (int64_t i = 0; i < rows; ++i) {
    const acc_t* xi = x + i * d;
    const acc_t scale = kQuery ? tau : acc_t(1);
    for (int64_t z = 0; z < d; ++z) e[z] = scale * xi[z];
    e[d] = kQuery ? b[i] : acc_t(1);
    acc_t* o = out + i * F;
    for (const FeatureRun<acc_t>& r : fr.runs) {
      const acc_t a = r.m * e[r.x];
      const acc_t* ey = e + r.y0;
      acc_t* orun = o + r.f0;
      for (int k = 0; k < r.len; ++k) orun[k] = a * ey[k];
    }
    for (const FeatureSingle<acc_t>& r : fr.singles) o[r.f] = r.m * e[r.x] * e[r.y];
  }
}

// dE^T ((d + 1) x rows, ld ldd) += the gradient with respect to the extended coordinates eT
// of sum_f u_f feature_f(e) for every row (u^T: F x rows, ld ldu): a row (x, y) gives
// m u e_y to coordinate x and m u e_x to y (2 m u e_x when x == y), one factor m u to x.
// Queries (kQuery, m = Map::query_weight): dq = tau dE[:d], db = dE[d]; keys: dk = dE[:d].
template <typename Map, bool kQuery, typename acc_t>
inline void features_grad_t(const acc_t* uT, int64_t ldu, const acc_t* eT, int64_t rows,
                            int64_t d, acc_t* dE, int64_t ldd) {
  Map::for_each_row(static_cast<int>(d), [&](int64_t f, int x, int y) {
    const acc_t m = kQuery ? Map::template query_weight<acc_t>(x, y) : acc_t(1);
    const acc_t* u = uT + f * ldu;
    acc_t* dx = dE + x * ldd;
    if (y == kOneFactor) {
      for (int64_t i = 0; i < rows; ++i) dx[i] += m * u[i];
      return;
    }
    const acc_t* ex = eT + x * rows;
    const acc_t* ey = eT + y * rows;
    acc_t* dy = dE + y * ldd;
    for (int64_t i = 0; i < rows; ++i) {
      const acc_t w = m * u[i];
      dx[i] += w * ey[i];
      dy[i] += w * ex[i];
    }
  });
}

// A block of query rows reading a state S (F x (Dv + 1)): num (rows x Dv + 1, ld ldn) =
// beta num + phi(tau q_i, b_i) . S, the features built into phi (rows x F). The chunked
// forward reads the state of the earlier chunks this way, the direct path a carried state.
template <typename Map, typename acc_t>
inline void read_state(const acc_t* S, const acc_t* q, const acc_t* b, int64_t rows, int64_t d,
                       int64_t dv1, acc_t tau, acc_t* phi, acc_t* num, int64_t ldn, acc_t beta) {
  const int64_t F = Map::num_features(d);
  features_rows<Map, true>(q, b, rows, d, tau, phi);
  gemm_den_apart<acc_t>(rows, dv1, F, phi, F, S, dv1, beta, num, ldn);
}

// The gradient of read_state for a block of rows, from g~_i (the gradient of num_i): with
// u_i = S g~_i (as u^T = S G~^T, F x rows: the GEMM microkernel takes no transposed
// operand), dqe^T ((D + 1) x rows) = d/dqe <phi(qe_i), u_i> along the rows of
// qe^T = [tau q, b]^T: dq = tau dqe[:D], db = dqe[D]. Owns its buffers (C rows at most).
template <typename Map, typename acc_t>
struct StateReadGrad {
  const int64_t D, Dv1, F;
  std::vector<acc_t> gT, uT, eT, deT;
  StateReadGrad(int64_t d, int64_t dv1, int64_t C)
      : D(d), Dv1(dv1), F(Map::num_features(d)), gT(dv1 * C), uT(F * C), eT((d + 1) * C),
        deT((d + 1) * C) {}
  // g: rows x (Dv + 1), q: rows x D, b: rows (row-major). Returns dqe^T, rows apart.
  const acc_t* operator()(const acc_t* S, const acc_t* g, const acc_t* q, const acc_t* b,
                          int64_t rows, acc_t tau) {
    transpose_into(g, rows, Dv1, Dv1, gT.data(), rows);
    gemm<acc_t>(false, false, F, rows, Dv1, acc_t(1), S, Dv1, gT.data(), rows, acc_t(0),
                uT.data(), rows);
    extended_t(q, b, rows, D, tau, eT.data());
    std::fill(deT.begin(), deT.begin() + (D + 1) * rows, acc_t(0));
    features_grad_t<Map, true>(uT.data(), rows, eT.data(), rows, D, deT.data(), rows);
    return deT.data();
  }
};

}  // namespace cpu
}  // namespace csq
