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
  // CUDA, bfloat16 / float16 only: the state products on tensor cores (TF32 mma.sync) with 3
  // products per step (3xTF32, float32 accuracy) or 1 (plain TF32), or 0: on the CUDA cores
  // like float32. A switch for comparisons: CSQ_CUDA_TENSOR_CORES=0, 1 or 3 (the default).
  int tensor_core_passes = 3;

  // Packed variable-length batches: when cu_seqlens is set, batch == 1 and sequence s holds
  // positions [cu_seqlens[s], cu_seqlens[s + 1]). Otherwise sequence s is batch entry s.
  const int64_t* cu_seqlens = nullptr;
  int64_t num_seqs = 0;

  // Carried state, per (sequence, key/value head), accumulation dtype, contiguous:
  // sums = sum_j psi(k_j - ref) [v_j, 1]^T, (S, Hk, F, Dv + 1), and the key offset ref
  // (S, Hk, Dk) the sums are taken relative to. Its last row holds the key count.
  const void* state_in = nullptr;  // optional
  // ref_in comes with state_in (in the backward: the forward's ref). It is used as given when
  // the state holds keys; a state whose count is 0 holds none, and the sequence picks its own
  // (see kRefKeys). decode_ writes its pick into the state through ref_out.
  const void* ref_in = nullptr;
  void* state_out = nullptr;       // optional forward output
  void* ref_out = nullptr;         // forward output: the ref used (read by the backward)

  // Forward outputs; read back by the backward. All contiguous.
  void* y = nullptr;    // (B, Hq, N, Dv), accumulation dtype (input dtype for decode_)
  void* b = nullptr;    // (B, Hq, N), accumulation dtype: per-query effective shift, see below
  void* den = nullptr;  // (B, Hq, N), accumulation dtype: sum_j w_ij

  // Backward only.
  int64_t dy_stride[4] = {0, 0, 0, 0};
  const void* dy = nullptr;  // (B, Hq, N, Dv), accumulation dtype (the gradient of y)
  void* dq = nullptr;        // (B, Hq, N, Dk), accumulation dtype, contiguous
  void* dk = nullptr;        // (B, Hk, N, Dk), accumulation dtype, contiguous
  void* dv = nullptr;        // (B, Hk, N, Dv), accumulation dtype, contiguous
  void* db = nullptr;        // (B, Hq, N), accumulation dtype: dL/db_i, a workspace
  void* dshift = nullptr;    // (S, Hq), accumulation dtype: per-sequence shift gradient
  const void* dstate_out = nullptr;  // optional incoming gradient of state_out
  void* dstate_in = nullptr;         // gradient of state_in (when state_in is set)
  void* dref = nullptr;              // (S, Hk, Dk): gradient of ref through k - ref and b
};

// One unit of work: a sequence (a batch entry, or a packed segment) and a key/value head.
struct SeqTask {
  int64_t seq;    // state / shift-gradient index
  int64_t batch;  // batch index of the inputs (0 for packed segments)
  int64_t start;  // first position of the sequence in the inputs
  int64_t len;    // its length
  int64_t head_k;
};

inline SeqTask seq_task(const AttnParams& p, int64_t task) {
  const int64_t s = task / p.heads_k, g = task % p.heads_k;
  if (p.cu_seqlens == nullptr) return {s, s, 0, p.seqlen, g};
  return {s, 0, p.cu_seqlens[s], p.cu_seqlens[s + 1] - p.cu_seqlens[s], g};
}

// Keys are summed relative to a reference key r when the sums are built: the carried state's
// ref when the state holds keys, else the coordinate-wise median of the finite values among
// the first kRefKeys keys of the sequence (ref_key_median below). Centered CSQ is invariant to
// moving every key, so r changes only rounding; a median sits among the typical keys whatever
// a few outliers or an attention-sink key do (a mean moves with them), which keeps float32
// sums accurate when keys share a large offset, and keeps a huge key at position p from
// reaching the rounding of the rows before p. The saved per-query shift is the shift that goes
// with k - r: b_i = c_h - tau <q_i, mu_i - r> when centering, else b_i = c_h + tau <q_i, r>.
constexpr int64_t kRefKeys = 64;

#ifdef __CUDACC__
#define CSQ_HOST_DEVICE __host__ __device__
#else
#define CSQ_HOST_DEVICE
#endif

// The lower median of the finite values among key(0), ..., key(m - 1), 0 if there is none.
// O(m^2) comparisons by rank counting (m <= kRefKeys), so that the CPU and CUDA kernels pick
// the same value without sorting. Non-finite keys are skipped: a NaN or Inf key must reach
// the outputs after it, not every output through r.
template <typename Acc, typename KeyAt>
CSQ_HOST_DEVICE inline Acc ref_key_median(int64_t m, const KeyAt& key) {
  int64_t n = 0;
  for (int64_t j = 0; j < m; ++j) {
    const Acc x = key(j);
    n += (x - x == Acc(0));  // finite
  }
  const int64_t want = (n - 1) / 2;  // rank of the lower median among the finite values
  for (int64_t j = 0; j < m && n > 0; ++j) {
    const Acc x = key(j);
    if (!(x - x == Acc(0))) continue;
    int64_t less = 0, less_eq = 0;
    for (int64_t i = 0; i < m; ++i) {
      const Acc y = key(i);
      if (!(y - y == Acc(0))) continue;
      less += y < x;
      less_eq += y <= x;
    }
    if (less <= want && want < less_eq) return x;
  }
  return Acc(0);
}

// Number of distinct degree-2 features of a D-vector: pairs (x, y) with x <= y.
inline constexpr int64_t num_pairs(int64_t d) { return d * (d + 1) / 2; }

// Feature length of the augmented state: [pairs | linear | constant].
inline constexpr int64_t num_features(int64_t d) { return num_pairs(d) + d + 1; }

}  // namespace csq
