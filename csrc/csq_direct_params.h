// Parameters of the direct path: CSQ weights computed tile by tile from q and k, never an
// N x N tensor and no state. Torch-free like csq_params.h, so a CUDA kernel can share it.
//
// The direct path is exact to the spec and costs O(N^2 (Dk + Dv)) (half that when causal)
// against the chunked path's O(N Dk^2 Dv): it is the faster one below a crossover length
// (csq_ext/_cost.py chooses per call).
#pragma once

#include <cstdint>

#include "csq_params.h"

namespace csq {

// csq_direct_fwd: the inputs (QkvParams), the tile length, the outputs (ForwardOutputs: y, b,
// the per-query shift that goes with the tile reference, see below, and den) and a carried
// state (CarriedState, causal only: the state's keys join each query's mean and add
// phi(qe) . sums to its [num | den]; ref_out is written when a state is read or returned).
//
// Accuracy: query tile T (rows t0..t0 + tile - 1 of a sequence) uses every key as k_j - r_T
// with a reference key r_T, and b_i = c_h - tau <q_i, m_i>, m_i = mu_i - r_T when centering
// (-r_T without), so that s_ij = tau <q_i, k_j - r_T> + b_i. r_T is a key: the one nearest to
// the keys' mean among the candidates of direct_reference_candidates (every row of the tile
// sees them when causal). Being a key, k_j - r_T is exact for keys near it whatever their
// common offset (both floats of the same size), and m_i, taken in float64 from that exact
// r_T, is as small as the keys' spread: no score subtracts two large numbers, and no offset
// reaches the rounding (docs/SPEC.md, section 6). Being the key nearest the mean, it is never
// an outlier or a sink key, whose size would otherwise reach every score of the tile through a
// mean. (The CPU kernels also give each key tile its own reference and add
// tau <q_i, r_key - r_T>, in float64, to the shifts of the pair; see csrc/cpu/csq_direct_cpu.h.)
struct DirectCandidates {
  int64_t first, last;  // positions in the sequence, inclusive
};
// Causal: the keys (t0 - tile, t0] and the running mean at t0 (every row of the tile sees
// them); not causal: the tile's own keys and their mean.
CSQ_HOST_DEVICE inline DirectCandidates direct_reference_candidates(bool causal, int64_t t0,
                                                                    int64_t tile, int64_t len) {
  if (causal) return {t0 - tile + 1 > 0 ? t0 - tile + 1 : 0, t0};
  return {t0, (t0 + tile < len ? t0 + tile : len) - 1};
}

// The float64 sum of term(x) over x < n, in four partial sums (terms 4i, 4i + 1, 4i + 2,
// 4i + 3; the remainder in the first) added at the end: one running sum is a chain of
// dependent adds, latency-bound, and the CPU direct path sums N D such terms per head for its
// references, far keys and per-query shifts (bench/NOTES.md 16). A fixed order: the same
// result on every backend and thread count.
template <typename Term>
CSQ_HOST_DEVICE inline double sum_f64(int64_t n, const Term& term) {
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t x = 0;
  for (; x + 4 <= n; x += 4) {
    s0 += term(x);
    s1 += term(x + 1);
    s2 += term(x + 2);
    s3 += term(x + 3);
  }
  for (; x < n; ++x) s0 += term(x);
  return (s0 + s1) + (s2 + s3);
}

// The squared distance of key j to `point` (D coordinates), in float64 (sum_f64), or -1 where
// it is not finite (a NaN or Inf key is never a reference). key(j, x) returns coordinate x of
// key j as a double.
template <typename KeyAt>
CSQ_HOST_DEVICE inline double key_distance(int64_t j, int64_t d, const double* point,
                                           const KeyAt& key) {
  const double dist = sum_f64(d, [&](int64_t x) {
    const double e = key(j, x) - point[x];
    return e * e;
  });
  return dist - dist == 0.0 ? dist : -1.0;
}

// The position of the key nearest to `point` among positions first..last (the first of
// equals), -1 if none has a finite distance. The CUDA kernels pick the same key from the same
// key_distance values.
template <typename KeyAt>
CSQ_HOST_DEVICE inline int64_t nearest_key(int64_t first, int64_t last, int64_t d,
                                           const double* point, const KeyAt& key) {
  int64_t best = -1;
  double best_dist = 0;
  for (int64_t j = first; j <= last; ++j) {
    const double dist = key_distance(j, d, point, key);
    if (dist >= 0 && (best < 0 || dist < best_dist)) {
      best = j;
      best_dist = dist;
    }
  }
  return best;
}

struct DirectFwdParams : QkvParams, ForwardOutputs, CarriedState {
  int64_t tile = 64;  // CPU only: query and key tile length (positions); CUDA uses kDirectTile
  // CUDA, bfloat16 / float16 only: 0 runs the generic kernels instead of the tensor-core ones
  // (CSQ_CUDA_TENSOR_CORES=0, as for FwdParams).
  int tensor_core_passes = 3;
  // CUDA only, internal (set by the launcher, null from the host): per-query terms from
  // outside the call's keys, contiguous, accumulation dtype: row_shift (B, Hq, N) added to
  // each b_i, row_sums (B, Hq, N, Dv + 1) added to [num | den] before dividing (a carried
  // state's read). The emulator checks them directly.
  const void* row_shift = nullptr;
  const void* row_sums = nullptr;
};

// csq_direct_bwd, derived from the forward's: y, b, den are read back (not written); ref_in is
// the forward's ref_out (with a carried state, or when the state was returned).
struct DirectBwdParams : DirectFwdParams, GradientFields, CarriedStateGrads {};

// The longest CPU tile (tile_size on the direct path): the tile buffers hold G T^2 scores,
// so a tile never grows with N beyond this (nor beyond the sequence).
constexpr int64_t kMaxDirectTile = 512;
// The shortest CPU tile (or the sequence): a row's numerator and denominator are float32 sums
// over key tiles, so their rounding grows with the number of tiles; with tiles of one key,
// rows whose weights are all large and nearly equal (a 1e7 key, not causal, centered) lost
// 6.6e-5 at N = 3000 (dense float32: 6e-7). As the chunked path's kMinChunk (csq_host.cpp).
constexpr int64_t kMinDirectTile = 16;

// Number of tiles of a sequence of `len` positions.
inline int64_t num_tiles(int64_t len, int64_t tile) { return (len + tile - 1) / tile; }

// Default tile length (0 from the caller), measured in bench/NOTES.md ("Direct path", items 12
// and 13): 64 on CUDA (kDirectTile); on the CPU 128, or 256 while every thread still gets at
// least two query tiles and either there is no causal masking (bigger GEMMs: the forward ~2%
// faster at N = 1024, D = 64-128, the backward even) or the heads are big and the sequences
// long (causal, Dk + Dv >= 256, N >= 4096: 3-10% faster; smaller causal cases lose more on
// the half-empty diagonal tiles than the bigger GEMMs give).
inline int64_t default_direct_tile(const QkvParams& p, bool on_cuda, int64_t threads) {
  if (on_cuda) return 64;
  const int64_t per_seq = p.num_seqs > 0 ? p.seqlen / p.num_seqs : p.seqlen;  // packed: mean
  const int64_t tiles = p.num_seqs * p.heads_k * num_tiles(per_seq, 256);
  if (tiles < 2 * threads) return 128;
  if (!p.causal) return 256;
  return p.dim_k + p.dim_v >= 256 && per_seq >= 4096 ? 256 : 128;
}

}  // namespace csq
