// The plain parameter struct shared by every backend. Kernels and launchers see only this:
// sizes, element strides, raw pointers and scalars. No torch types, so the CUDA kernel files
// compile with nvcc alone.
#pragma once

#include <cstdint>

namespace csq {

// Strides are in elements, in the order (batch, head, position, feature).
struct AttnParams {
  int64_t batch = 0, heads_q = 0, heads_k = 0, seqlen = 0, dim_k = 0, dim_v = 0;
  int64_t group = 1;  // heads_q / heads_k: query head h reads key/value head h / group

  int64_t q_stride[4] = {0, 0, 0, 0};
  int64_t k_stride[4] = {0, 0, 0, 0};
  int64_t v_stride[4] = {0, 0, 0, 0};
  const void* q = nullptr;  // (B, Hq, N, Dk), input dtype
  const void* k = nullptr;  // (B, Hk, N, Dk)
  const void* v = nullptr;  // (B, Hk, N, Dv)
  const void* shift = nullptr;  // (Hq,), accumulation dtype, contiguous

  double scale = 1.0;  // tau
  double eps = 1e-6;
  bool causal = true, center = true, normalize = true;
  int64_t chunk = 64;  // positions per chunk

  // Forward outputs; read back by the backward. All contiguous.
  void* y = nullptr;    // (B, Hq, N, Dv), input dtype
  void* b = nullptr;    // (B, Hq, N), accumulation dtype: per-query effective shift, see below
  void* den = nullptr;  // (B, Hq, N), accumulation dtype: sum_j w_ij

  // Backward only.
  int64_t dy_stride[4] = {0, 0, 0, 0};
  const void* dy = nullptr;  // (B, Hq, N, Dv), input dtype
  void* dq = nullptr;        // (B, Hq, N, Dk), accumulation dtype, contiguous
  void* dk = nullptr;        // (B, Hk, N, Dk), accumulation dtype, contiguous
  void* dv = nullptr;        // (B, Hk, N, Dv), accumulation dtype, contiguous
  void* db = nullptr;        // (B, Hq, N), accumulation dtype: dL/db_i, a workspace
  void* dshift = nullptr;    // (B, Hq), accumulation dtype: per-batch shift gradient
};

// Keys are summed relative to a reference key r (the mean of the first kRefKeys keys of each
// key/value head) when centering, which keeps float32 sums accurate when keys share a large
// offset. Centered CSQ is invariant to moving every key, so r changes only rounding. The saved
// per-query shift is b_i = c_h - tau <q_i, mu_i - r>, i.e. the shift that goes with k - r.
constexpr int64_t kRefKeys = 64;

// Number of distinct degree-2 features of a D-vector: pairs (x, y) with x <= y.
inline constexpr int64_t num_pairs(int64_t d) { return d * (d + 1) / 2; }

// Feature length of the augmented state: [pairs | linear | constant].
inline constexpr int64_t num_features(int64_t d) { return num_pairs(d) + d + 1; }

}  // namespace csq
