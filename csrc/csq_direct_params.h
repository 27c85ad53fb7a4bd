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

// csq_direct_fwd: the inputs (QkvParams), the tile length and the outputs y, b (the per-query
// shift that goes with the tile reference, see below) and den, contiguous, accumulation dtype.
//
// Accuracy with centering: query tile T (rows t0..t0 + tile - 1 of a sequence) subtracts a
// reference r_T from every key before the products, r_T = the running key mean at t0 (causal;
// every row of T sees those keys) or the mean of all keys (not causal), and uses
// b_i = c_h - tau <q_i, mu_i - r_T>, so s_ij = tau <q_i, k_j - r_T> + b_i never subtracts two
// large numbers when the keys share an offset. r_T is rounded to the accumulation dtype once,
// and mu_i - r_T is taken in float64 from that rounded r_T: k_j - r_T is then exact for keys
// near r_T (both are floats of the same size), and the rounding of r_T, an offset-sized error,
// cancels between the two terms (docs/SPEC.md, section 6). Without centering r_T = 0 and
// b_i = c_h.
struct DirectFwdParams : QkvParams {
  int64_t tile = 64;  // CPU only: query and key tile length (positions); CUDA uses kDirectTile
  // CUDA, bfloat16 / float16 only: 0 runs the generic kernels instead of the tensor-core ones
  // (CSQ_CUDA_TENSOR_CORES=0, as for FwdParams).
  int tensor_core_passes = 3;
  // Optional per-query inputs from outside the keys of this call (nullptr: none), contiguous,
  // accumulation dtype. csq_ext/_direct_state.py uses them to carry a state on the direct
  // path: the state's keys move each query's mean (row_shift) and add their weighted values
  // and weights (row_sums).
  const void* row_shift = nullptr;  // (B, Hq, N): added to each b_i
  const void* row_sums = nullptr;   // (B, Hq, N, Dv + 1): added to [num | den] before dividing
  void* y = nullptr;    // (B, Hq, N, Dv)
  void* b = nullptr;    // (B, Hq, N)
  void* den = nullptr;  // (B, Hq, N)
};

// csq_direct_bwd, derived from the forward's: y, b, den are read back (not written). The saved
// b already holds row_shift and the saved den row_sums' den, so the backward needs neither;
// their gradients are db and [dy / (den + eps), dden] (computed by the caller).
struct DirectBwdParams : DirectFwdParams {
  int64_t dy_stride[4] = {0, 0, 0, 0};
  const void* dy = nullptr;  // (B, Hq, N, Dv), accumulation dtype
  // Outputs, contiguous, accumulation dtype, every element written (as for BwdParams).
  void* dq = nullptr;  // (B, Hq, N, Dk)
  void* dk = nullptr;  // (B, Hk, N, Dk)
  void* dv = nullptr;  // (B, Hk, N, Dv)
  void* db = nullptr;  // (B, Hq, N): dL/db_i; the host layer sums it into the shift gradient
};

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
