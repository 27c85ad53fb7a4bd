// The CUDA direct path's shared pieces (README.md, "Direct path"): the workspace, query/key
// tiles of 64 positions and how a thread block finds its tile, the small O(N D) kernels around
// the tile kernels (tile map of packed sequences, key sums per tile and their scan, the per-tile
// reference key r_T with mu_i - r_T and b_i, the backward's per-row terms and the centering term
// of dk). The tile kernels themselves are csq_direct_tiles.cuh, their products an engine's
// (csq_direct_engine_*.cuh). Torch-free.
//
// Semantics are the CPU kernel's (csrc/cpu/csq_direct_cpu.h): query tile T (positions
// t0 .. t0 + 63 of a sequence) uses keys k_j - r_T with r_T a key near their mean
// (csrc/csq_direct_params.h), b_i = c_h - tau <q_i, m_i> with m_i = mu_i - r_T (or -r_T
// without centering); the key sums behind mu_i and r_T are taken in float64 as on the CPU.
#pragma once

#include "csq_elements.cuh"
#include "csq_direct_launch.h"

namespace csq {
namespace cuda {
namespace direct {

constexpr int kT = static_cast<int>(kDirectTile);  // tile length (query and key)
constexpr int kDThreads = 256;                      // 16 x 16 threads on a 64 x 64 tile
constexpr int kSlabD = 32;                          // feature columns per step of a product
constexpr int kLdA = kSlabD + 1;                    // row stride of the slab buffers
constexpr int kLdX = kT + 1;                        // row stride of the 64 x 64 buffers
constexpr int kMaxD = static_cast<int>(kDirectMaxHeadDim);
static_assert(kT == 64 && kDThreads == 256, "the tile kernels map 16 x 16 threads on 64 x 64");

// Workspace of the direct path (all pieces 256-byte aligned):
//   tile0 (S + 1) int64             packed only: first tile slot of each sequence
//   tsum, tpre (Hk, slots, D) f64    per-tile column sums and their (exclusive) scan: key sums
//                                    (prefix) for the centering; in the backward, reused for
//                                    the centering term of dk (suffix)
//   ttot (Hk, S, D) f64              the whole sequence's sum
//   ref (Hk, slots, D) Acc           r_T of every query tile
//   mdiff (B, Hk, N, D) f64          m_i: mu_i - r_T, or -r_T without centering (float64: b_i
//                                    and dq_i read it before any rounding)
//   inv, dden (B, Hq, N) Acc         backward: 1 / (den_i + eps), -<dy_i, y_i> / (den_i + eps)
// Tile slots: without cu_seqlens slot = batch entry * ntiles + tile; with it, the slots of
// sequence s are tile0[s] .. tile0[s + 1] - 1, at most ceil(N / 64) + S in all.
struct DirectWork {
  int64_t* tile0 = nullptr;
  double* tsum = nullptr;
  double* tpre = nullptr;
  double* ttot = nullptr;
  void* ref = nullptr;
  void* mdiff = nullptr;
  void* inv = nullptr;
  void* dden = nullptr;
  int64_t slots = 0;   // tile slots per key/value head
  int64_t ntiles = 0;  // tiles per sequence without cu_seqlens
};

inline int64_t direct_slots(const DirectFwdParams& p) {
  const int64_t nt = ceil_div(p.seqlen, kT);
  return p.cu_seqlens != nullptr ? nt + p.num_seqs : p.batch * nt;
}

// Returns the bytes needed; fills *w when base is not null.
inline size_t carve_direct(const DirectFwdParams& p, DType dt, bool backward, void* base,
                           DirectWork* w) {
  const size_t a = acc_size(dt);
  const size_t slots = size_t(direct_slots(p)), hk = size_t(p.heads_k), d = size_t(p.dim_k);
  const size_t seqs = size_t(num_sequences(p));
  const size_t rows_q = size_t(p.batch * p.heads_q * p.seqlen);
  const bool packed = p.cu_seqlens != nullptr;
  const size_t sizes[8] = {
      packed ? align256(sizeof(int64_t) * (seqs + 1)) : 0,
      align256(sizeof(double) * hk * slots * d),
      align256(sizeof(double) * hk * slots * d),
      align256(sizeof(double) * hk * seqs * d),
      align256(a * hk * slots * d),
      align256(sizeof(double) * size_t(p.batch * p.heads_k * p.seqlen) * d),
      backward ? align256(a * rows_q) : 0,
      backward ? align256(a * rows_q) : 0};
  size_t off[8], total = 0;
  for (int i = 0; i < 8; ++i) {
    off[i] = total;
    total += sizes[i];
  }
  if (base != nullptr && w != nullptr) {
    char* c = static_cast<char*>(base);
    w->tile0 = packed ? reinterpret_cast<int64_t*>(c + off[0]) : nullptr;
    w->tsum = reinterpret_cast<double*>(c + off[1]);
    w->tpre = reinterpret_cast<double*>(c + off[2]);
    w->ttot = reinterpret_cast<double*>(c + off[3]);
    w->ref = c + off[4];
    w->mdiff = c + off[5];
    w->inv = backward ? c + off[6] : nullptr;
    w->dden = backward ? c + off[7] : nullptr;
    w->slots = int64_t(slots);
    w->ntiles = ceil_div(p.seqlen, kT);
  }
  return total + 16;
}

// ---------------------------------------------------------------------------------------------
// Tiles

// One tile of one sequence: the sequence (its batch entry, first position and length), the
// tile's index in it, first position t0 (in the sequence) and length, and the slot of the
// sequence's tile 0.
struct DTile {
  bool valid;
  int64_t seq, bi, start, len, idx, t0, first;
  int rows;
};

__device__ __forceinline__ DTile direct_tile(const DirectFwdParams& p, const DirectWork& w,
                                             int64_t slot) {
  DTile t{false, 0, 0, 0, 0, 0, 0, 0, 0};
  if (p.cu_seqlens == nullptr) {
    t.bi = slot / w.ntiles;
    t.seq = t.bi;
    t.idx = slot % w.ntiles;
    t.start = 0;
    t.len = p.seqlen;
    t.first = t.bi * w.ntiles;
  } else {
    const int64_t S = p.num_seqs;
    if (slot >= w.tile0[S]) return t;
    int64_t lo = 0, hi = S;  // the sequence s with tile0[s] <= slot < tile0[s + 1]
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      if (w.tile0[mid] <= slot)
        lo = mid;
      else
        hi = mid;
    }
    t.seq = lo;
    t.bi = 0;
    t.start = p.cu_seqlens[lo];
    t.len = p.cu_seqlens[lo + 1] - t.start;
    t.first = w.tile0[lo];
    t.idx = slot - t.first;
  }
  t.t0 = t.idx * kT;
  t.rows = static_cast<int>(min64(kT, t.len - t.t0));
  t.valid = t.rows > 0;
  return t;
}

// Tile `idx` of the same sequence.
__device__ __forceinline__ DTile tile_at(DTile t, int64_t idx) {
  t.idx = idx;
  t.t0 = idx * kT;
  t.rows = static_cast<int>(min64(kT, t.len - t.t0));
  t.valid = t.rows > 0;
  return t;
}

// Row of a (B, H, N, ...) contiguous output for position i of tile t, head h of H.
__device__ __forceinline__ int64_t out_row(const DTile& t, int64_t heads, int64_t h,
                                           int64_t N, int64_t i) {
  return (t.bi * heads + h) * N + t.start + t.t0 + i;
}

// Packed sequences: tile0[s] = sum_{s' < s} ceil(len_s' / 64). One thread.
__global__ void direct_tile_map_kernel(const DirectFwdParams p, const DirectWork w) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  int64_t acc = 0;
  for (int64_t s = 0; s < p.num_seqs; ++s) {
    w.tile0[s] = acc;
    acc += ceil_div(p.cu_seqlens[s + 1] - p.cu_seqlens[s], kT);
  }
  w.tile0[p.num_seqs] = acc;
}

// ---------------------------------------------------------------------------------------------
// O(N D) passes, one thread per feature column d.

enum { kSumKeys = 0, kSumCenterDk = 1 };

// The centering term of dk at position i (tile t) and coordinate d, before the factor -tau:
// sum over the query heads of the group of q_i db_i / n_i, in float64.
template <typename T, typename Acc>
__device__ __forceinline__ double center_dk_term(const DirectBwdParams& p, const DTile& t,
                                                 int64_t hk, int i, int d) {
  const int64_t n = p.causal ? t.t0 + i + 1 : t.len;
  double s = 0;
  for (int64_t hh = 0; hh < p.group; ++hh) {
    const int64_t h = hk * p.group + hh;
    const double db = double(static_cast<const Acc*>(p.db)[out_row(t, p.heads_q, h, p.seqlen, i)]);
    s += double(load_el<Acc, T>(p.q, p.q_stride, t.bi, h, t.start + t.t0 + i, d)) * db / double(n);
  }
  return s;
}

// Per tile and key/value head, the column sums of the keys (kSumKeys) or of the centering
// terms of dk (kSumCenterDk), into w.tsum. Grid (slots, Hk).
// Params: DirectFwdParams for the keys, DirectBwdParams (which has db) for the centering terms.
template <typename T, typename Acc, int MODE, typename Params = DirectFwdParams>
__global__ void __launch_bounds__(kDThreads) direct_tile_sum_kernel(const Params p,
                                                                    const DirectWork w) {
  const DTile t = direct_tile(p, w, blockIdx.x);
  if (!t.valid) return;
  const int64_t hk = blockIdx.y;
  for (int d = threadIdx.x; d < p.dim_k; d += blockDim.x) {
    double s = 0;
    for (int i = 0; i < t.rows; ++i) {
      if constexpr (MODE == kSumKeys)
        s += double(load_el<Acc, T>(p.k, p.k_stride, t.bi, hk, t.start + t.t0 + i, d));
      else
        s += center_dk_term<T, Acc>(p, t, hk, i, d);
    }
    w.tsum[(hk * w.slots + blockIdx.x) * p.dim_k + d] = s;
  }
}

// Per (sequence, key/value head): the exclusive scan of the tile sums over the tiles of the
// sequence, forward (sums before each tile) or backward (sums after it), into w.tpre, and the
// total into w.ttot. Grid (S, Hk).
__global__ void __launch_bounds__(kDThreads) direct_tile_scan_kernel(const DirectFwdParams p,
                                                                     const DirectWork w,
                                                                     bool reverse) {
  const int64_t s = blockIdx.x, hk = blockIdx.y;
  int64_t first, len;
  if (p.cu_seqlens == nullptr) {
    first = s * w.ntiles;
    len = p.seqlen;
  } else {
    first = w.tile0[s];
    len = p.cu_seqlens[s + 1] - p.cu_seqlens[s];
  }
  const int64_t nt = ceil_div(len, kT);
  for (int d = threadIdx.x; d < p.dim_k; d += blockDim.x) {
    double run = 0;
    for (int64_t i = 0; i < nt; ++i) {
      const int64_t slot = first + (reverse ? nt - 1 - i : i);
      const int64_t at = (hk * w.slots + slot) * p.dim_k + d;
      w.tpre[at] = run;
      run += w.tsum[at];
    }
    w.ttot[(hk * num_sequences(p) + s) * p.dim_k + d] = run;
  }
}

// Per query tile and key/value head: r_T (w.ref), m_i = mu_i - r_T or -r_T (w.mdiff) and, when
// write_b, b_i = c_h - tau <q_i, m_i> (+ row_shift_i) for every query head of the group (p.b).
// r_T is the key nearest to the keys' mean among the candidates (csrc/csq_direct_params.h,
// the CPU kernels' choice: direct_reference_candidates, nearest_key): one thread per
// candidate measures its distance in float64, thread 0 picks the first of the nearest.
// Grid (slots, Hk).
template <typename T, typename Acc>
__global__ void __launch_bounds__(kDThreads) direct_rows_kernel(const DirectFwdParams p,
                                                                const DirectWork w,
                                                                bool write_b) {
  __shared__ double point[kMaxD];
  __shared__ double dist[kT];
  __shared__ int best;
  const DTile t = direct_tile(p, w, blockIdx.x);
  if (!t.valid) return;
  const int64_t hk = blockIdx.y, D = p.dim_k;
  Acc* ref = static_cast<Acc*>(w.ref) + (hk * w.slots + blockIdx.x) * D;
  double* mdiff = static_cast<double*>(w.mdiff);
  const auto md_at = [&](int i, int d) {
    return ((t.bi * p.heads_k + hk) * p.seqlen + t.start + t.t0 + i) * D + d;
  };
  const auto key = [&](int64_t j, int64_t d) {
    return double(load_el<Acc, T>(p.k, p.k_stride, t.bi, hk, t.start + j, int(d)));
  };
  const int64_t sum_at = hk * w.slots + blockIdx.x;
  for (int d = threadIdx.x; d < D; d += blockDim.x)  // the candidates' point: a mean
    point[d] = p.causal ? (w.tpre[sum_at * D + d] + key(t.t0, d)) / double(t.t0 + 1)
                        : w.tsum[sum_at * D + d] / double(t.rows);
  __syncthreads();
  const DirectCandidates c = direct_reference_candidates(p.causal, t.t0, kT, t.len);
  const int n = static_cast<int>(c.last - c.first + 1);
  for (int j = threadIdx.x; j < n; j += blockDim.x)
    dist[j] = key_distance(c.first + j, D, point, key);
  __syncthreads();
  if (threadIdx.x == 0) {
    int b = -1;
    for (int j = 0; j < n; ++j)
      if (dist[j] >= 0 && (b < 0 || dist[j] < dist[b])) b = j;
    best = b;
  }
  __syncthreads();
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    const double r = best < 0 ? 0.0 : key(c.first + best, d);  // a key: exact in Acc
    ref[d] = Acc(r);
    if (!p.center || !p.causal) {  // every row: mu - r (the mean of all keys) or -r
      const double mu = p.center ? w.ttot[(hk * num_sequences(p) + t.seq) * D + d] /
                                       double(t.len)
                                 : 0.0;
      for (int i = 0; i < t.rows; ++i) mdiff[md_at(i, d)] = mu - r;
    } else {  // mu_i - r with mu_i the running mean; running sums in float64
      double run = w.tpre[sum_at * D + d];
      for (int i = 0; i < t.rows; ++i) {
        run += key(t.t0 + i, d);
        mdiff[md_at(i, d)] = run / double(t.t0 + i + 1) - r;
      }
    }
  }
  if (!write_b) return;
  __syncthreads();  // mdiff (global) written by this block is visible to it
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nwarps = blockDim.x / 32;
  for (int task = warp; task < p.group * t.rows; task += nwarps) {  // uniform over the warp
    const int64_t h = hk * p.group + task / t.rows;
    const int i = task % t.rows;
    // In float64: without centering m_i = -r, and c_h + tau <q_i, r> may be the difference of
    // two large numbers.
    double dot = 0;
    for (int d = lane; d < D; d += 32)
      dot += double(load_el<Acc, T>(p.q, p.q_stride, t.bi, h, t.start + t.t0 + i, d)) *
             mdiff[md_at(i, d)];
    dot = warp_sum(dot);
    if (lane == 0) {
      const int64_t row = out_row(t, p.heads_q, h, p.seqlen, i);
      const double extra = p.row_shift ? double(static_cast<const Acc*>(p.row_shift)[row]) : 0.0;
      static_cast<Acc*>(p.b)[row] =
          Acc(double(static_cast<const Acc*>(p.shift)[h]) - p.scale * dot + extra);
    }
  }
}

// Backward, per query row (one warp each): inv_i = 1 / (den_i + eps) and
// dden_i = -<dy_i, y_i> inv_i when normalizing, else 1 and 0.
template <typename Acc>
__global__ void __launch_bounds__(kDThreads) direct_row_grad_kernel(const DirectBwdParams p,
                                                                    const DirectWork w) {
  const int64_t rows = p.batch * p.heads_q * p.seqlen;
  const int64_t r = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (r >= rows) return;  // uniform over the warp
  const int lane = threadIdx.x % 32;
  const int64_t n = r % p.seqlen, bh = r / p.seqlen, h = bh % p.heads_q, bi = bh / p.heads_q;
  const Acc* dy = static_cast<const Acc*>(p.dy) + bi * p.dy_stride[0] + h * p.dy_stride[1] +
                  n * p.dy_stride[2];
  const Acc* y = static_cast<const Acc*>(p.y) + r * p.dim_v;
  Acc dot = 0;
  for (int x = lane; x < p.dim_v; x += 32) dot += dy[x * p.dy_stride[3]] * y[x];
  dot = warp_sum(dot);
  if (lane != 0) return;
  const Acc inv = p.normalize ? Acc(1) / (static_cast<const Acc*>(p.den)[r] + Acc(p.eps)) : Acc(1);
  static_cast<Acc*>(w.inv)[r] = inv;
  static_cast<Acc*>(w.dden)[r] = p.normalize ? -dot * inv : Acc(0);
}

// The centering term of dk, once db is complete: key l is in mu_i of every query i that sees
// it, so dk_l += -tau sum_{i sees l} q_i db_i / n_i (a reverse running sum when causal: the
// tile's suffix from w.tpre plus the rows after l in the tile). Grid (slots, Hk).
template <typename T, typename Acc>
__global__ void __launch_bounds__(kDThreads) direct_center_dk_kernel(const DirectBwdParams p,
                                                                     const DirectWork w) {
  const DTile t = direct_tile(p, w, blockIdx.x);
  if (!t.valid) return;
  const int64_t hk = blockIdx.y, D = p.dim_k;
  const double tau = p.scale;
  Acc* dk = static_cast<Acc*>(p.dk);
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    if (!p.causal) {
      const Acc g = Acc(-tau * w.ttot[(hk * num_sequences(p) + t.seq) * D + d]);
      for (int i = 0; i < t.rows; ++i) dk[out_row(t, p.heads_k, hk, p.seqlen, i) * D + d] += g;
      continue;
    }
    double run = w.tpre[(hk * w.slots + blockIdx.x) * D + d];
    for (int i = t.rows - 1; i >= 0; --i) {
      run += center_dk_term<T, Acc>(p, t, hk, i, d);
      dk[out_row(t, p.heads_k, hk, p.seqlen, i) * D + d] += Acc(-tau * run);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Masks of the 64 x 64 tile products on a causal diagonal tile: the term m of an output row
// is kept when m <= row (queries x keys: forward, dq) or m >= row (keys x queries: dk, dv).
// Selected, not multiplied, so that a NaN or Inf beyond the mask stays out (an engine that
// cannot select per term falls back to scalar sums where it matters: kFallback).
enum { kMaskNone = 0, kMaskUpTo = 1, kMaskFrom = 2 };

// Columns x0 .. x0 + kSlabD - 1 of two 64 x K operands given by element functions fa(row, x),
// fb(row, x), 0 past K, handed to put(row, x - x0, a, b) (which stores them in an engine's
// slab buffers): the staging step of every engine's A B^T product.
template <typename Acc, typename FA, typename FB, typename Put>
__device__ __forceinline__ void stage_slab(int x0, int K, const FA& fa, const FB& fb,
                                           const Put& put) {
  for (int e = threadIdx.x; e < kT * kSlabD; e += kDThreads) {
    const int r = e / kSlabD, x = e % kSlabD;
    const bool in = x0 + x < K;
    put(r, x, in ? Acc(fa(r, x0 + x)) : Acc(0), in ? Acc(fb(r, x0 + x)) : Acc(0));
  }
}

}  // namespace direct
}  // namespace cuda
}  // namespace csq
