// Building blocks of the CPU direct path (forward and backward): the tile list and its
// balanced split over threads, the per-sequence key prefix sums behind the centering terms,
// a query tile (all query heads of one key/value head, stacked) with its reference key, a key
// tile relative to that reference, and row-major GEMMs on raw buffers.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Config.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../csq_direct_params.h"
#include "csq_cpu_common.h"

#if AT_BUILD_WITH_BLAS()
// The Fortran BLAS that torch itself links (MKL or OpenBLAS): a tile GEMM without the
// dispatcher's few microseconds per call, which are 10-20% of a 128 x 128 x 64 product.
extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc);
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc);
}
#endif

namespace csq {
namespace cpu {
namespace direct {

// Row-major C (m x n, ld ldc) = alpha op(A) op(B) + beta C, op = transpose when ta / tb.
// A is (m x k) after op, B (k x n) after op; lda / ldb are the row lengths as stored.
// beta = 0 never reads C (which may hold poison).
template <typename acc_t>
inline void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, acc_t alpha, const acc_t* a,
                 int64_t lda, const acc_t* b, int64_t ldb, acc_t beta, acc_t* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
#if AT_BUILD_WITH_BLAS()
  // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
  const char ca = ta ? 'T' : 'N', cb = tb ? 'T' : 'N';
  const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
  const int ila = static_cast<int>(lda), ilb = static_cast<int>(ldb), ilc = static_cast<int>(ldc);
  if constexpr (std::is_same_v<acc_t, float>)
    sgemm_(&cb, &ca, &in, &im, &ik, &alpha, b, &ilb, a, &ila, &beta, c, &ilc);
  else
    dgemm_(&cb, &ca, &in, &im, &ik, &alpha, b, &ilb, a, &ila, &beta, c, &ilc);
#else
  const auto view = [](const acc_t* x, int64_t rows, int64_t cols, int64_t ld, bool t) {
    at::Tensor v = mat(const_cast<acc_t*>(x), t ? cols : rows, t ? rows : cols, ld);
    return t ? v.t() : v;
  };
  at::Tensor C = mat(c, m, n, ldc);
  at::Tensor AB = at::mm(view(a, m, k, lda, ta), view(b, k, n, ldb, tb));
  if (beta == acc_t(0))
    C.copy_(AB.mul_(alpha));
  else
    C.mul_(beta).add_(AB, alpha);
#endif
}

// One unit of parallel work: a tile of `rows` positions starting at t0 of a sequence, for
// one key/value head.
struct TileTask {
  SeqTask seq;  // sequence and key/value head
  int64_t t0, rows, index;  // first position (in the sequence), length, tile number
};

// Every tile of every (sequence, key/value head).
inline std::vector<TileTask> all_tiles(const DirectFwdParams& p) {
  std::vector<TileTask> tiles;
  for (int64_t task = 0; task < p.num_seqs * p.heads_k; ++task) {
    const SeqTask s = seq_task(p, task);
    for (int64_t i = 0; i < num_tiles(s.len, p.tile); ++i)
      tiles.push_back({s, i * p.tile, std::min(p.tile, s.len - i * p.tile), i});
  }
  return tiles;
}

// Runs worker.run(task) for every task, spread over the threads so that each gets a similar
// total cost: tasks sorted by decreasing cost are dealt round-robin. (at::parallel_for's
// contiguous ranges would give one thread all the cheap early causal tiles, the other the dear
// late ones.) Each thread makes one worker (its buffers) with make().
template <typename T, typename Cost, typename Make>
inline void run_balanced(std::vector<T> tasks, Cost cost, Make make) {
  std::stable_sort(tasks.begin(), tasks.end(),
                   [&](const T& a, const T& b) { return cost(a) > cost(b); });
  const int64_t n = static_cast<int64_t>(tasks.size());
  const int64_t lanes = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, lanes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t lane = begin; lane < end; ++lane) {
      auto worker = make();
      for (int64_t i = lane; i < n; i += lanes) worker.run(tasks[i]);
    }
  });
}

// Grain for at::parallel_for over (sequence, key/value head) tasks of an O(N D) pass: one
// thread unless there are a few million elements. A parallel region costs microseconds on an
// idle machine but a scheduler time slice (~10 ms) when the cores are shared, which these
// cheap passes cannot win back.
inline int64_t small_pass_grain(const DirectFwdParams& p) {
  const int64_t seqs = std::max<int64_t>(1, p.num_seqs);
  const int64_t per_task = std::max<int64_t>(1, p.seqlen * p.dim_k * p.group / seqs);
  return std::max<int64_t>(1, (int64_t(1) << 22) / per_task);
}

// Sums of the keys before each tile start, and of all keys, per (sequence, key/value head),
// in float64: the key means mu_i and the tile references are differences of these, and
// float64 keeps them exact enough for float32 keys with a large common offset.
struct KeyPrefix {
  int64_t dim = 0, tile = 1;
  std::vector<int64_t> base;  // per task (sequence, head): its first entry
  std::vector<double> sums;   // entries of `dim`: tile starts 0, T, 2T, ..., then the total

  // Sum of the keys at positions < t0 (t0 a tile start, or the length for the total).
  const double* before(const SeqTask& s, int64_t heads_k, int64_t t0) const {
    return sums.data() + (base[s.seq * heads_k + s.head_k] + (t0 + tile - 1) / tile) * dim;
  }
};

template <typename scalar_t>
inline KeyPrefix key_prefix(const DirectFwdParams& p) {
  KeyPrefix kp;
  kp.dim = p.dim_k;
  kp.tile = p.tile;
  const int64_t tasks = p.num_seqs * p.heads_k;
  kp.base.resize(tasks + 1, 0);
  for (int64_t task = 0; task < tasks; ++task)
    kp.base[task + 1] = kp.base[task] + num_tiles(seq_task(p, task).len, p.tile) + 1;
  kp.sums.assign(kp.base[tasks] * p.dim_k, 0.0);
  if (!p.center) return kp;
  at::parallel_for(0, tasks, small_pass_grain(p), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const SeqTask s = seq_task(p, task);
      double* out = kp.sums.data() + kp.base[task] * p.dim_k;
      std::vector<double> run(p.dim_k, 0.0);
      for (int64_t j = 0; j < s.len; ++j) {
        if (j % p.tile == 0) out = std::copy(run.begin(), run.end(), out);
        const scalar_t* kr = row_ptr<scalar_t>(p.k, p.k_stride, s.batch, s.head_k, s.start + j);
        for (int64_t x = 0; x < p.dim_k; ++x)
          run[x] += static_cast<double>(kr[x * p.k_stride[3]]);
      }
      std::copy(run.begin(), run.end(), out);  // the total
    }
  });
  return kp;
}

// A query tile: the rows of all query heads of one key/value head, stacked head after head
// (G * rows rows, so the tile GEMMs are G times taller), its reference key r (keys are used
// as k - r) and, when centering causally, mu_i - r per position.
template <typename scalar_t, typename acc_t>
struct QueryTile {
  const DirectFwdParams& p;
  const int64_t D, G;
  int64_t rows = 0;
  std::vector<acc_t> q, ref, mdiff;  // (G rows x D), (D), (rows x D)

  QueryTile(const DirectFwdParams& p_, int64_t tile)
      : p(p_), D(p_.dim_k), G(p_.group), q(G * tile * D), ref(D), mdiff(tile * D) {}

  // Row of output tensors (B, Hq, N, ...) for stacked row r of this tile.
  int64_t out_row(const TileTask& t, int64_t r) const {
    const int64_t h = t.seq.head_k * G + r / rows;
    return (t.seq.batch * p.heads_q + h) * p.seqlen + t.seq.start + t.t0 + r % rows;
  }

  void load(const TileTask& t, const KeyPrefix& kp) {
    rows = t.rows;
    for (int64_t hh = 0; hh < G; ++hh)
      load_rows<scalar_t, acc_t>(p.q, p.q_stride, t.seq.batch, t.seq.head_k * G + hh,
                                 t.seq.start + t.t0, rows, D, nullptr, q.data() + hh * rows * D,
                                 D);
    std::fill(ref.begin(), ref.end(), acc_t(0));
    std::fill(mdiff.begin(), mdiff.begin() + rows * D, acc_t(0));
    if (!p.center || rows == 0) return;
    if (!p.causal) {  // every query sees every key: r = mu, and b_i = c_h
      const double* total = kp.before(t.seq, p.heads_k, t.seq.len);
      for (int64_t x = 0; x < D; ++x) ref[x] = static_cast<acc_t>(total[x] / double(t.seq.len));
      return;
    }
    // Running key sums from the tile start, in float64: mu_i = sum_{j <= i} k_j / (i + 1),
    // r = mu_{t0}, which every row of the tile sees (no key at or after a later position).
    std::vector<double> run(kp.before(t.seq, p.heads_k, t.t0),
                            kp.before(t.seq, p.heads_k, t.t0) + D),
        r(D);
    for (int64_t i = 0; i < rows; ++i) {
      const scalar_t* kr = row_ptr<scalar_t>(p.k, p.k_stride, t.seq.batch, t.seq.head_k,
                                             t.seq.start + t.t0 + i);
      const double n = double(t.t0 + i + 1);
      for (int64_t x = 0; x < D; ++x) {
        run[x] += static_cast<double>(kr[x * p.k_stride[3]]);
        if (i == 0) r[x] = run[x] / n;
        mdiff[i * D + x] = static_cast<acc_t>(run[x] / n - r[x]);
      }
    }
    for (int64_t x = 0; x < D; ++x) ref[x] = static_cast<acc_t>(r[x]);
  }
};

// A key tile relative to a query tile's reference: k - r (rows x D) and [v, 1] (rows x Dv + 1;
// the ones column gives the backward's and a masked tile's denominator) at `k` and `v`.
//
// Not causal, every query tile of a (sequence, key/value head) has the same reference (the key
// mean), so the worker converts that whole sequence once and a tile is a view into it: the
// per-tile conversion was 5-10% of a forward at D = 64 (bench/NOTES.md). Sequences longer than
// kWholeSequenceElems / (Dk + Dv + 1) positions, and causal tiles, are converted per tile.
template <typename scalar_t, typename acc_t>
struct KeyTile {
  static constexpr int64_t kWholeSequenceElems = int64_t(1) << 24;  // 64 MB in float32
  const DirectFwdParams& p;
  int64_t rows = 0;
  const acc_t* k = nullptr;
  const acc_t* v = nullptr;
  std::vector<acc_t> k_tile, v_tile;  // one tile
  std::vector<acc_t> k_seq, v_seq;    // a whole sequence (not causal)
  int64_t seq_of_cache = -1, head_of_cache = -1;

  KeyTile(const DirectFwdParams& p_, int64_t tile)
      : p(p_), k_tile(tile * p_.dim_k), v_tile(tile * (p_.dim_v + 1)) {}

  void load(const SeqTask& s, int64_t j0, int64_t n, const acc_t* ref) {
    rows = n;
    const int64_t Dv1 = p.dim_v + 1;
    if (!p.causal && s.len * (p.dim_k + Dv1) <= kWholeSequenceElems) {
      if (s.seq != seq_of_cache || s.head_k != head_of_cache) {
        k_seq.resize(s.len * p.dim_k);
        v_seq.resize(s.len * Dv1);
        load_rows<scalar_t, acc_t>(p.k, p.k_stride, s.batch, s.head_k, s.start, s.len,
                                   p.dim_k, p.center ? ref : nullptr, k_seq.data(), p.dim_k);
        load_values_aug<scalar_t, acc_t>(p, s.batch, s.head_k, s.start, s.len, v_seq.data());
        seq_of_cache = s.seq;
        head_of_cache = s.head_k;
      }
      k = k_seq.data() + j0 * p.dim_k;
      v = v_seq.data() + j0 * Dv1;
      return;
    }
    load_rows<scalar_t, acc_t>(p.k, p.k_stride, s.batch, s.head_k, s.start + j0, n, p.dim_k,
                               p.center ? ref : nullptr, k_tile.data(), p.dim_k);
    load_values_aug<scalar_t, acc_t>(p, s.batch, s.head_k, s.start + j0, n, v_tile.data());
    k = k_tile.data();
    v = v_tile.data();
  }

  // The values of key rows after each query row of a diagonal tile: if any is NaN or Inf, a
  // GEMM would carry 0 * NaN across the causal mask.
  bool values_finite() const { return all_finite_impl(v, rows * (p.dim_v + 1)); }
};

// s = tau S + b_i and w = s^2 for a (G rows) x cols block of raw scores S, in place into w
// (and s when given). On a diagonal tile (cols == rows) entries with j > i become 0: selected,
// not multiplied, so a NaN key after i cannot reach row i. With `den`, each row's sum of w is
// added to den[r * den_ld]: the forward's denominator, so that its value GEMM need not carry a
// column of ones (an n = Dv + 1 GEMM runs ~20% slower than n = Dv; bench/NOTES.md).
template <typename acc_t>
inline void shifted_squares(const acc_t* S, int64_t grows, int64_t rows, int64_t cols,
                            const acc_t* b, acc_t tau, bool diag, acc_t* s_out, acc_t* w_out,
                            acc_t* den = nullptr, int64_t den_ld = 0) {
  constexpr int64_t L = 16;  // independent partial sums: the row sum vectorizes
  for (int64_t r = 0; r < grows; ++r) {
    const acc_t br = b[r];
    const int64_t last = diag ? r % rows : cols - 1;  // last unmasked column
    const acc_t* in = S + r * cols;
    acc_t* w = w_out + r * cols;
    acc_t* s = s_out ? s_out + r * cols : nullptr;
    for (int64_t j = 0; j < cols; ++j) {
      const acc_t x = tau * in[j] + br;
      const bool keep = j <= last;
      if (s) s[j] = keep ? x : acc_t(0);
      w[j] = keep ? x * x : acc_t(0);
    }
    if (den == nullptr) continue;
    acc_t part[L] = {};
    int64_t j = 0;
    for (; j + L <= cols; j += L)
      for (int64_t l = 0; l < L; ++l) part[l] += w[j + l];
    acc_t sum = 0;
    for (; j < cols; ++j) sum += w[j];
    for (int64_t l = 0; l < L; ++l) sum += part[l];
    den[r * den_ld] += sum;
  }
}

}  // namespace direct
}  // namespace cpu
}  // namespace csq
