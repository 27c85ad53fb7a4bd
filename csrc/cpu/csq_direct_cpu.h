// Building blocks of the CPU direct path (forward and backward): the tile list and its
// balanced split over threads, the per-sequence key prefix sums behind the centering terms,
// a query tile (all query heads of one key/value head, stacked) with its reference key, a key
// tile relative to that reference, in the layouts the tile GEMMs (csq_gemm.h) take.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Config.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <utility>
#include <vector>

#include "../csq_direct_params.h"
#include "csq_cpu_rows.h"
#include "csq_gemm.h"

namespace csq {
namespace cpu {
namespace direct {

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
inline void run_balanced(std::vector<T> tasks, Cost cost, Make make, int64_t max_lanes) {
  std::stable_sort(tasks.begin(), tasks.end(),
                   [&](const T& a, const T& b) { return cost(a) > cost(b); });
  const int64_t n = static_cast<int64_t>(tasks.size());
  const int64_t lanes =
      std::max<int64_t>(1, std::min<int64_t>({at::get_num_threads(), n, max_lanes}));
  at::parallel_for(0, lanes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t lane = begin; lane < end; ++lane) {
      auto worker = make();
      for (int64_t i = lane; i < n; i += lanes) worker.run(tasks[i]);
    }
  });
}

// The lanes of a call's tile passes: one when its products are about a million multiply-adds
// (N = 16, H = 4, D = 64: 0.14M), as cheap as waking the thread pool: a second lane made
// such a call slower (bench/bench_overhead.py, bench/NOTES.md 15).
inline int64_t direct_lanes(const DirectFwdParams& p) {
  const double n = static_cast<double>(p.seqlen), seen = p.causal ? (n + 1) / 2 : n;
  const double macs = double(p.batch) * double(p.heads_q) * n * seen * double(p.dim_k + p.dim_v);
  return macs < double(int64_t(1) << 20) ? 1 : at::get_num_threads();
}

// The elements (positions x coordinates) an O(N D) pass gives each thread at least: a
// parallel region costs microseconds on an idle machine but up to a scheduler time slice when
// the cores are shared, so a pass stays on one thread below ~0.3 ms of work. (At 2^22, these
// passes ran on one thread up to N = 4K at D = 128: the key store, key prefix and far keys
// held a full-attention forward at N = 1K, D = 128 on one core for ~12% of its time while the
// other waited; bench/NOTES.md 17.)
constexpr int64_t kPassElemsPerThread = int64_t(1) << 18;

// Grain for at::parallel_for over (sequence, key/value head) tasks of an O(N D) pass.
inline int64_t small_pass_grain(const DirectFwdParams& p) {
  const int64_t seqs = std::max<int64_t>(1, p.num_seqs);
  const int64_t per_task = std::max<int64_t>(1, p.seqlen * p.dim_k * p.group / seqs);
  return std::max<int64_t>(1, kPassElemsPerThread / per_task);
}

// Far keys: a key much farther from its tile's reference than the tile's typical key (an
// outlier or a sink key) makes the float32 tile GEMM sum large terms, and a query nearly
// orthogonal to it gets a small score with the large terms' rounding (measured: rows after a
// 1e6 key at Dk = 128 lost 30x more than a dense float32 computation). Per key tile, up to
// kMaxFarKeys keys farther than kFarKeyRatio times the median distance have their scores
// recomputed in float64 (KeyTile::exact_far_scores), a few dot products per tile pair.
constexpr int64_t kMaxFarKeys = 8;
constexpr double kFarKeyRatio = 64;
constexpr int64_t kFarSlots = 1 + kMaxFarKeys;  // per tile: the count, then the positions

// Finds the far keys of one tile (m keys from position j0 of a sequence, key(j, x) as in
// key_prefix, reference r) into far (kFarSlots).
template <typename KeyAt>
inline void find_far_keys(int64_t j0, int64_t m, int64_t d, const KeyAt& key, const double* r,
                          int32_t* far) {
  double dist[kMaxDirectTile], sorted[kMaxDirectTile];  // on the stack: a tile per call at N = 16
  int64_t finite = 0;
  for (int64_t j = 0; j < m; ++j) {
    const double d2 = sum_f64(d, [&](int64_t x) {
      const double e = key(j0 + j, x) - r[x];
      return e * e;
    });
    dist[j] = d2;
    if (d2 - d2 == 0.0) sorted[finite++] = d2;
  }
  far[0] = 0;
  if (finite < 2) return;
  std::nth_element(sorted, sorted + finite / 2, sorted + finite);
  const double limit = kFarKeyRatio * kFarKeyRatio * sorted[finite / 2];
  for (int64_t j = 0; j < m; ++j) {
    if (!(dist[j] > limit) || !(dist[j] - dist[j] == 0.0)) continue;
    // Keep the farthest kMaxFarKeys: replace the nearest kept one when full.
    int64_t slot = far[0] < kMaxFarKeys ? far[0]++ : -1;
    if (slot < 0) {
      slot = 0;
      for (int64_t f = 1; f < kMaxFarKeys; ++f)
        if (dist[far[1 + f]] < dist[far[1 + slot]]) slot = f;
      if (!(dist[j] > dist[far[1 + slot]])) continue;
    }
    far[1 + slot] = static_cast<int32_t>(j);
  }
}

// Per (sequence, key/value head), in float64: the sums of the keys before each tile start and
// of all keys (the key means mu_i are differences of these, and float64 keeps them exact
// enough for float32 keys with a large common offset), each tile's reference key r
// (csq_direct_params.h, direct_reference_candidates) and its far keys (find_far_keys): found
// once per tile here, not per conversion (without the key store a tile is converted once per
// query tile that reads it).
// A carried state's keys (causal only) come first: `carried` of them, summing to carried_sum
// (raw coordinates: count ref + Z1, csq_direct_state_cpu.h).
struct KeyPrefix {
  int64_t dim = 0, tile = 1;
  std::vector<int64_t> base;  // per task (sequence, head): its first entry
  std::vector<double> sums;   // entries of `dim`: tile starts 0, T, 2T, ..., then the total
  std::vector<double> refs;   // entries of `dim`: the tiles' references (base indexes them too)
  std::vector<int32_t> far;   // entries of kFarSlots: the tiles' far keys
  std::vector<double> carried;  // per task: the carried key count (empty: none)

  // Sum of the keys at positions < t0 (t0 a tile start, or the length for the total).
  const double* before(const SeqTask& s, int64_t heads_k, int64_t t0) const {
    return sums.data() + (base[s.seq * heads_k + s.head_k] + (t0 + tile - 1) / tile) * dim;
  }
  // The reference key and the far keys of the tile starting at t0.
  const double* ref(const SeqTask& s, int64_t heads_k, int64_t t0) const {
    return refs.data() + (base[s.seq * heads_k + s.head_k] + t0 / tile) * dim;
  }
  const int32_t* far_keys(const SeqTask& s, int64_t heads_k, int64_t t0) const {
    return far.data() + (base[s.seq * heads_k + s.head_k] + t0 / tile) * kFarSlots;
  }
  // The number of keys before position 0 of the sequence (a carried state's).
  double count0(const SeqTask& s, int64_t heads_k) const {
    return carried.empty() ? 0.0 : carried[s.seq * heads_k + s.head_k];
  }
};

// carried_count (per task) and carried_sum (per task, dim): a carried state's, or null.
template <typename scalar_t>
inline KeyPrefix key_prefix(const DirectFwdParams& p, const double* carried_count = nullptr,
                            const double* carried_sum = nullptr) {
  KeyPrefix kp;
  const int64_t D = p.dim_k, T = p.tile;
  kp.dim = D;
  kp.tile = T;
  const int64_t tasks = p.num_seqs * p.heads_k;
  kp.base.resize(tasks + 1, 0);
  for (int64_t task = 0; task < tasks; ++task)
    kp.base[task + 1] = kp.base[task] + num_tiles(seq_task(p, task).len, T) + 1;
  kp.sums.assign(kp.base[tasks] * D, 0.0);
  kp.refs.assign(kp.base[tasks] * D, 0.0);
  kp.far.assign(kp.base[tasks] * kFarSlots, 0);
  if (carried_count != nullptr)
    kp.carried.assign(carried_count, carried_count + tasks);
  at::parallel_for(0, tasks, small_pass_grain(p), [&](int64_t begin, int64_t end) {
    std::vector<double> point(D);
    for (int64_t task = begin; task < end; ++task) {
      const SeqTask s = seq_task(p, task);
      const auto key = [&](int64_t j, int64_t x) {
        return static_cast<double>(row_ptr<scalar_t>(p.k, p.k_stride, s.batch, s.head_k,
                                                     s.start + j)[x * p.k_stride[3]]);
      };
      double* sums = kp.sums.data() + kp.base[task] * D;
      double* out = sums;
      std::vector<double> run(D, 0.0);
      if (carried_sum != nullptr)
        std::copy(carried_sum + task * D, carried_sum + (task + 1) * D, run.begin());
      const double n0 = kp.count0(s, p.heads_k);
      for (int64_t j = 0; j < s.len; ++j) {
        if (j % T == 0) out = std::copy(run.begin(), run.end(), out);
        for (int64_t x = 0; x < D; ++x) run[x] += key(j, x);
      }
      std::copy(run.begin(), run.end(), out);  // the total
      for (int64_t i = 0; i < num_tiles(s.len, T); ++i) {
        const int64_t t0 = i * T, rows = std::min(T, s.len - t0);
        const double* at = sums + i * D;          // keys before t0 (a carried state's too)
        const double* next = sums + (i + 1) * D;  // before t0 + T, or the total
        for (int64_t x = 0; x < D; ++x)
          point[x] = p.causal ? (at[x] + key(t0, x)) / (n0 + double(t0 + 1))
                              : (next[x] - at[x]) / double(rows);
        const DirectCandidates c = direct_reference_candidates(p.causal, t0, T, s.len);
        const int64_t best = nearest_key(c.first, c.last, D, point.data(), key);
        double* r = kp.refs.data() + (kp.base[task] + i) * D;
        for (int64_t x = 0; x < D; ++x) r[x] = best < 0 ? 0.0 : key(best, x);
        find_far_keys(t0, rows, D, key, r, kp.far.data() + (kp.base[task] + i) * kFarSlots);
      }
    }
  });
  return kp;
}

// The reference key r of the tile starting at t0, in acc_t (exactly: it is a key).
template <typename acc_t>
inline void tile_reference(const DirectFwdParams& p, const KeyPrefix& kp, const SeqTask& s,
                           int64_t t0, acc_t* out) {
  const double* r = kp.ref(s, p.heads_k, t0);
  for (int64_t x = 0; x < p.dim_k; ++x) out[x] = static_cast<acc_t>(r[x]);
}

// A query tile: the rows of all query heads of one key/value head, stacked head after head
// (G * rows rows, so the tile GEMMs are G times taller), its reference key r (keys are used
// as k - r) and m_i per position: mu_i - r when centering, else -r.
template <typename scalar_t, typename acc_t>
struct QueryTile {
  const DirectFwdParams& p;
  const int64_t D, G;
  int64_t rows = 0;
  std::vector<acc_t> q, ref;  // (G rows x D), (D)
  // m_i (rows x D), in float64: b_i = c_h - tau <q_i, m_i> is read from it, and an m_i as
  // large as an outlier's share of the mean must not be rounded before a query nearly
  // orthogonal to it makes the product small.
  std::vector<double> mdiff;
  bool uniform = false;  // every row's m_i is row 0's (not causal, or no centering)

  QueryTile(const DirectFwdParams& p_, int64_t tile)
      : p(p_), D(p_.dim_k), G(p_.group), q(G * tile * D), ref(D), mdiff(tile * D) {}

  // m_i of position i of the tile (D coordinates).
  const double* m(int64_t i) const { return mdiff.data() + (uniform ? 0 : i * D); }

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
    tile_reference(p, kp, t.seq, t.t0, ref.data());
    // m_i = mu_i - r (centering) or -r, in float64 from r (a key, exact in acc_t): as small as
    // the keys' spread, whatever their common offset (csq_direct_params.h).
    // Without causal masking (or centering) every row shares one m: row 0 holds it (filling
    // a copy per row, column by column, was a third of the tile loop's own time at N = 1K).
    uniform = !p.center || !p.causal;
    if (uniform) {
      const double* total = kp.before(t.seq, p.heads_k, t.seq.len);
      for (int64_t x = 0; x < D; ++x)
        mdiff[x] = (p.center ? total[x] / double(t.seq.len) : 0.0) - double(ref[x]);
      return;
    }
    // Running key sums from the tile start, in float64: mu_i = sum_{j <= i} k_j / (i + 1).
    std::vector<double> run(kp.before(t.seq, p.heads_k, t.t0),
                            kp.before(t.seq, p.heads_k, t.t0) + D);
    // Times 1 / n rather than divided by n: the divisions were most of a small call's tile
    // time (N = 16), and the product is within an ulp of float64, far below the float32 m_i.
    const double n0 = kp.count0(t.seq, p.heads_k);
    for (int64_t i = 0; i < rows; ++i) {
      const scalar_t* kr = row_ptr<scalar_t>(p.k, p.k_stride, t.seq.batch, t.seq.head_k,
                                             t.seq.start + t.t0 + i);
      const double inv_n = 1.0 / (n0 + double(t.t0 + i + 1));
      for (int64_t x = 0; x < D; ++x) {
        run[x] += static_cast<double>(kr[x * p.k_stride[3]]);
        mdiff[i * D + x] = run[x] * inv_n - double(ref[x]);
      }
    }
  }
};

// Keys relative to their own tile's reference r_j (tile_reference), in the layouts the tile
// GEMMs take (csq_gemm.h), per tile of T positions: (k - r_j)^T (D x T) for the scores, and for
// the forward [v, 1] (T x Dv + 1, the ones column gives a masked tile's denominator); for the
// backward k - r_j (T x D) for dq, and v^T (Dv x T) for dnum V^T. A query tile with another
// reference r_i adds tau <q, r_j - r_i> to its shifts for the pair (pair_shifts):
// <q, k - r_i> = <q, k - r_j> + <q, r_j - r_i>, so no key is converted again per query tile.
//
// Each tile is one contiguous block of T * per_position() elements (kT and vT rows T long,
// whatever N): an operand with rows N apart ran 10% (N = 16K) to 35% (N = 64K) slower in the
// microkernel than one with rows T apart.
struct KeyLayout {
  int64_t D, Dv, T;
  bool backward;
  int64_t per_position() const { return backward ? 2 * D + Dv : D + Dv + 1; }
  int64_t block() const { return T * per_position(); }
  int64_t elems(int64_t n) const { return num_tiles(n, T) * block(); }
};

// Converts the keys of s from tile start j0 to j0 + n (n a whole number of tiles, or up to the
// sequence's end) into buf (layout.elems(n)), a block per tile, and their tiles' references
// into refs (D each).
template <typename scalar_t, typename acc_t>
inline void convert_keys(const DirectFwdParams& p, const KeyPrefix& kp, const KeyLayout& l,
                         const SeqTask& s, int64_t j0, int64_t n, acc_t* buf, acc_t* refs) {
  const int64_t T = l.T;
  for (int64_t u = 0; u < n; u += T) {
    const int64_t m = std::min(T, n - u), row0 = s.start + j0 + u;
    acc_t* r = refs + (u / T) * l.D;
    acc_t* blk = buf + (u / T) * l.block();
    tile_reference(p, kp, s, j0 + u, r);
    load_rows_t<scalar_t, acc_t>(p.k, p.k_stride, s.batch, s.head_k, row0, m, l.D, r, blk, T);
    if (l.backward) {
      load_rows<scalar_t, acc_t>(p.k, p.k_stride, s.batch, s.head_k, row0, m, l.D, r,
                                 blk + l.D * T, l.D);
      load_rows_t<scalar_t, acc_t>(p.v, p.v_stride, s.batch, s.head_k, row0, m, l.Dv, nullptr,
                                   blk + 2 * l.D * T, T);
    } else {
      load_values_aug<scalar_t, acc_t>(p, s.batch, s.head_k, row0, m, blk + l.D * T);
    }
  }
}

// Every (sequence, key/value head)'s keys converted once before the tiles run, shared by the
// workers: converting per tile cost 5-10% of a forward at D = 64 without causal masking, and
// per (query tile, key tile) pair 30-40% causal at D = 128 (bench/NOTES.md). Above
// max_elems() in all (2^26, 256 MB in float32; CSQ_CPU_KEY_STORE_MAX_ELEMS overrides it, which
// the tests use to reach the other branch) the tiles convert their own keys instead.
template <typename scalar_t, typename acc_t>
struct KeyStore {
  static int64_t max_elems() {
    const char* env = std::getenv("CSQ_CPU_KEY_STORE_MAX_ELEMS");
    return env != nullptr ? std::atoll(env) : int64_t(1) << 26;
  }
  KeyLayout layout;
  bool whole = false;
  std::vector<int64_t> base, ref_base;  // per task: first element of data / refs
  std::unique_ptr<acc_t[]> data;  // not value-initialized: a tile reads only what it converted
  std::vector<acc_t> refs;

  KeyStore(const DirectFwdParams& p, const KeyPrefix& kp, bool backward)
      : layout{p.dim_k, p.dim_v, p.tile, backward} {
    const int64_t tasks = p.num_seqs * p.heads_k;
    base.assign(tasks + 1, 0);
    ref_base.assign(tasks + 1, 0);
    // Converted tile by tile, so that a call of a few heads fills every thread.
    std::vector<std::pair<int64_t, int64_t>> units;  // (task, tile)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t len = seq_task(p, task).len, tiles = num_tiles(len, p.tile);
      base[task + 1] = base[task] + layout.elems(len);
      ref_base[task + 1] = ref_base[task] + tiles * p.dim_k;
      for (int64_t i = 0; i < tiles; ++i) units.emplace_back(task, i);
    }
    whole = base[tasks] <= max_elems();
    if (!whole) return;
    data.reset(new acc_t[base[tasks]]);
    refs.resize(ref_base[tasks]);
    const int64_t grain = std::max<int64_t>(1, kPassElemsPerThread / layout.block());
    at::parallel_for(0, int64_t(units.size()), grain, [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        const auto [task, i] = units[u];
        const SeqTask s = seq_task(p, task);
        const int64_t j0 = i * p.tile;
        convert_keys<scalar_t, acc_t>(p, kp, layout, s, j0, std::min(p.tile, s.len - j0),
                                      data.get() + base[task] + i * layout.block(),
                                      refs.data() + ref_base[task] + i * p.dim_k);
      }
    });
  }
};

// One key tile's views, into the store or into its own conversion: kT (D x rows), and v
// (forward) or k and vT (backward), as in KeyLayout, kT and vT rows `ld` = T long; ref = r_j.
template <typename scalar_t, typename acc_t>
struct KeyTile {
  const DirectFwdParams& p;
  const KeyPrefix& kp;
  const KeyStore<scalar_t, acc_t>& store;
  const KeyLayout& l;
  const int64_t ld;  // the row length of kT and vT: the tile length
  int64_t rows = 0;
  const acc_t* k = nullptr;
  const acc_t* kT = nullptr;
  const acc_t* v = nullptr;
  const acc_t* vT = nullptr;
  const acc_t* ref = nullptr;
  const int32_t* far = nullptr;  // the count, then the far keys' positions in the tile
  std::vector<acc_t> tile_buf, tile_ref;  // without the store
  std::vector<double> far_x;  // one far key relative to ref, in float64
  SeqTask seq{};
  int64_t row0 = 0;

  KeyTile(const DirectFwdParams& p_, const KeyPrefix& kp_,
          const KeyStore<scalar_t, acc_t>& store_)
      : p(p_), kp(kp_), store(store_), l(store_.layout), ld(p_.tile),
        tile_buf(store_.whole ? 0 : store_.layout.block()), tile_ref(p_.dim_k),
        far_x(p_.dim_k) {}

  void load(const SeqTask& s, int64_t j0, int64_t n) {
    rows = n;
    seq = s;
    row0 = s.start + j0;
    const acc_t* blk;
    if (store.whole) {
      const int64_t task = s.seq * p.heads_k + s.head_k, tile = j0 / l.T;
      blk = store.data.get() + store.base[task] + tile * l.block();
      ref = store.refs.data() + store.ref_base[task] + tile * l.D;
    } else {
      convert_keys<scalar_t, acc_t>(p, kp, l, s, j0, n, tile_buf.data(), tile_ref.data());
      blk = tile_buf.data();
      ref = tile_ref.data();
    }
    far = kp.far_keys(s, p.heads_k, j0);
    kT = blk;
    if (l.backward) {
      k = blk + l.D * l.T;
      vT = blk + 2 * l.D * l.T;
    } else {
      v = blk + l.D * l.T;
    }
  }

  // The values of key rows after each query row of a diagonal tile (forward): if any is NaN or
  // Inf, a GEMM would carry 0 * NaN across the causal mask.
  bool values_finite() const { return all_finite_impl(v, rows * (l.Dv + 1)); }

  // The raw scores <q_r, k_j - ref> of the far keys, in float64, into S (grows x cols, the
  // GEMM's output for this tile): q (grows x D).
  void exact_far_scores(const acc_t* q, int64_t grows, acc_t* S, int64_t cols) {
    const int64_t D = l.D;
    for (int32_t f = 0; f < far[0]; ++f) {
      const int64_t j = far[1 + f];
      const scalar_t* kr = row_ptr<scalar_t>(p.k, p.k_stride, seq.batch, seq.head_k, row0 + j);
      for (int64_t x = 0; x < D; ++x)
        far_x[x] = static_cast<double>(kr[x * p.k_stride[3]]) - double(ref[x]);
      for (int64_t r = 0; r < grows; ++r) {
        const acc_t* qr = q + r * D;
        S[r * cols + j] =
            static_cast<acc_t>(sum_f64(D, [&](int64_t x) { return double(qr[x]) * far_x[x]; }));
      }
    }
  }
};

// Whether a pair's two references are the same key (the diagonal pair, or equal keys).
template <typename acc_t>
inline bool same_reference(const acc_t* key_ref, const acc_t* query_ref, int64_t D) {
  bool same = true;
  for (int64_t x = 0; x < D; ++x) same = same && key_ref[x] == query_ref[x];
  return same;
}

// The shifts of a (query tile, key tile) pair: out_r = b_r + tau <q_r, r_j - r_i> (the key
// tile's reference minus the query tile's), or b itself when the references are equal (the
// diagonal). delta receives r_j - r_i; dots[r] holds <q_r, r_j - r_i> in float64 (PairDots,
// or pair_shifts below). In float64: the references are keys (exact), and their difference can
// be far larger than the scores (keys drifting along the sequence), so the product is taken
// exactly enough that only the sum is rounded.
template <typename acc_t>
inline const acc_t* pair_shifts_from(const double* dots, int64_t grows, int64_t D,
                                     const acc_t* b, acc_t tau, const acc_t* key_ref,
                                     const acc_t* query_ref, acc_t* delta, acc_t* out) {
  if (same_reference(key_ref, query_ref, D)) {
    std::fill(delta, delta + D, acc_t(0));
    return b;
  }
  for (int64_t x = 0; x < D; ++x)
    delta[x] = static_cast<acc_t>(double(key_ref[x]) - double(query_ref[x]));
  for (int64_t r = 0; r < grows; ++r)
    out[r] = static_cast<acc_t>(double(b[r]) + double(tau) * dots[r]);
  return out;
}

// pair_shifts_from with the dot products taken here, one row at a time (sum_f64): for a pair
// met once (the backward's key pass, a carried state's read).
template <typename acc_t>
inline const acc_t* pair_shifts(const acc_t* q, int64_t grows, int64_t D, const acc_t* b,
                                acc_t tau, const acc_t* key_ref, const acc_t* query_ref,
                                acc_t* delta, acc_t* out) {
  if (same_reference(key_ref, query_ref, D))  // the diagonal: no products to take
    return pair_shifts_from<acc_t>(nullptr, grows, D, b, tau, key_ref, query_ref, delta, out);
  thread_local std::vector<double> d, dots;
  d.resize(D);
  dots.resize(grows);
  for (int64_t x = 0; x < D; ++x) d[x] = double(key_ref[x]) - double(query_ref[x]);
  const double* dd = d.data();
  for (int64_t r = 0; r < grows; ++r) {
    const acc_t* qr = q + r * D;
    dots[r] = sum_f64(D, [&](int64_t x) { return double(qr[x]) * dd[x]; });
  }
  return pair_shifts_from(dots.data(), grows, D, b, tau, key_ref, query_ref, delta, out);
}

// The float64 products <q_r, r_j - r_i> of a query tile's rows (q, grows x D) with the
// reference r_j of each key tile it reads minus its own r_i, for all those key tiles at once:
// one float64 GEMM per query tile, where a dot product per row for every pair cost a tenth of
// a full-attention forward at N = 4K (bench/NOTES.md 16).
struct PairDots {
  std::vector<double> q, refs, dots;  // (grows x D), (tiles x D), (tiles x grows)
  int64_t grows = 0;

  // Key tiles 0, T, ..., up to position `end` of sequence s; the query tile starts at t0.
  template <typename acc_t>
  void compute(const acc_t* qrows, int64_t grows_, const KeyPrefix& kp, const SeqTask& s,
               int64_t heads_k, int64_t t0, int64_t end) {
    const int64_t D = kp.dim, tiles = num_tiles(end, kp.tile);
    grows = grows_;
    dots.resize(tiles * grows);
    if (tiles == 1) {  // the query tile's own key tile alone: pair_shifts_from returns b
      std::fill(dots.begin(), dots.end(), 0.0);
      return;
    }
    q.resize(grows * D);
    refs.resize(tiles * D);
    for (int64_t i = 0; i < grows * D; ++i) q[i] = static_cast<double>(qrows[i]);
    const double* own = kp.ref(s, heads_k, t0);
    for (int64_t jt = 0; jt < tiles; ++jt) {
      const double* r = kp.ref(s, heads_k, jt * kp.tile);
      for (int64_t x = 0; x < D; ++x) refs[jt * D + x] = r[x] - own[x];
    }
    gemm<double>(false, true, tiles, grows, D, 1.0, refs.data(), D, q.data(), D, 0.0,
                 dots.data(), grows);
  }
  // <q_r, r_j - r_i> for the key tile starting at j0, r = 0 .. grows - 1.
  const double* at(int64_t j0, int64_t tile) const { return dots.data() + (j0 / tile) * grows; }
};

// s = tau S + b_i and w = Map::weight(s) (s^2 for CSQ) for a (G rows) x cols block of raw
// scores S, in place into w (and s when given). On a diagonal tile (cols == rows) entries with
// j > i become 0: selected, not multiplied, so a NaN key after i cannot reach row i. With
// `den`, each row's sum of w is added to den[r * den_ld]: the forward's denominator, so that
// its value GEMM need not carry a column of ones (an n = Dv + 1 GEMM runs ~20% slower than
// n = Dv; bench/NOTES.md 17).
template <typename Map, typename acc_t>
inline void shifted_weights(const acc_t* S, int64_t grows, int64_t rows, int64_t cols,
                            const acc_t* b, acc_t tau, bool diag, acc_t* s_out, acc_t* w_out,
                            acc_t* den = nullptr, int64_t den_ld = 0) {
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
      w[j] = keep ? Map::weight(x) : acc_t(0);
    }
    if (den != nullptr) den[r * den_ld] += sum16<acc_t>(cols, [&](int64_t j) { return w[j]; });
  }
}

}  // namespace direct
}  // namespace cpu
}  // namespace csq
