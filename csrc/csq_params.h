// The plain parameter structs of the ops, shared by every backend. Kernels and launchers see
// only these: sizes, element strides, raw pointers and scalars. No torch types, so the CUDA
// kernel files compile with nvcc alone. As in other attention kernels, the backward's
// parameters derive from the forward's (BwdParams : FwdParams), and every op's from QkvParams.
#pragma once

#include <cstdint>

#include "csq_features.h"

namespace csq {

// What every op reads: sizes, element strides (in the order batch, head, position, feature),
// the inputs, the scalars and the packed sequences.
struct QkvParams {
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

  // Packed variable-length batches: when cu_seqlens is set, batch == 1 and sequence s holds
  // positions [cu_seqlens[s], cu_seqlens[s + 1]). Otherwise sequence s is batch entry s and
  // num_seqs == batch.
  const int64_t* cu_seqlens = nullptr;
  int64_t num_seqs = 0;
};

// A pool of carried states (the pool ops: docs/SPEC.md section 8, csrc/csq_pool_host.cpp).
// Without one (slots == nullptr) sequence s reads and writes entry s of the state tensors.
// With one, the state tensors are the pool: sequence s reads and writes slot slots[s], whose
// sums start sums_stride elements after the previous slot's and whose ref start ref_stride
// after (a slot's own (Hk, F, Dv + 1) and (Hk, Dk) are contiguous); slots are distinct, so a
// sequence's reads and writes never meet another's. fresh[s] != 0 (optional): the slot's
// contents are not read, the sequence starts from an empty state.
struct StatePool {
  const int64_t* slots = nullptr;
  const uint8_t* fresh = nullptr;
  int64_t sums_stride = 0, ref_stride = 0;
};

// Offset of the sums of (sequence s, kv head g) in a state tensor, pooled or not.
CSQ_HOST_DEVICE inline int64_t state_sums_offset(const StatePool& pool, int64_t s, int64_t g,
                                                 int64_t heads_k, int64_t head_elems) {
  return pool.slots == nullptr ? (s * heads_k + g) * head_elems
                               : pool.slots[s] * pool.sums_stride + g * head_elems;
}

// Offset of the ref of (sequence s, kv head g), pooled or not.
CSQ_HOST_DEVICE inline int64_t state_ref_offset(const StatePool& pool, int64_t s, int64_t g,
                                                int64_t heads_k, int64_t dim_k) {
  return pool.slots == nullptr ? (s * heads_k + g) * dim_k
                               : pool.slots[s] * pool.ref_stride + g * dim_k;
}

// Whether sequence s starts from an empty state whatever its slot holds.
CSQ_HOST_DEVICE inline bool state_fresh(const StatePool& pool, int64_t s) {
  return pool.fresh != nullptr && pool.fresh[s] != 0;
}

// csq_fwd: the chunked algorithm. Every output is contiguous, in the accumulation dtype.
struct FwdParams : QkvParams {
  // CPU only: positions per chunk (a tuning knob; the result does not depend on it). The CUDA
  // kernels always use csq::cuda::kChunk.
  int64_t chunk = 64;
  // CUDA, bfloat16 / float16 only: the state products on tensor cores (TF32 mma.sync) with 3
  // products per step (3xTF32, float32 accuracy) or 1 (plain TF32), or 0: on the CUDA cores
  // like float32. A switch for comparisons: CSQ_CUDA_TENSOR_CORES=0, 1 or 3 (the default).
  int tensor_core_passes = 3;

  // Carried state, per (sequence, key/value head), contiguous, in the layout of
  // csq_features.h: sums (S, Hk, F, Dv + 1) = sum_j psi(k_j - ref) [v_j, 1]^T, and the key
  // offset ref (S, Hk, Dk) the sums are taken relative to.
  const void* state_in = nullptr;  // optional
  // ref_in comes with state_in (in the backward: the forward's ref). It is used as given when
  // the state holds keys; a state whose count is 0 holds none, and the sequence picks its own
  // (see kRefKeys).
  const void* ref_in = nullptr;

  void* y = nullptr;    // (B, Hq, N, Dv): the output
  void* b = nullptr;    // (B, Hq, N): per-query effective shift, see kRefKeys
  void* den = nullptr;  // (B, Hq, N): sum_j w_ij
  void* state_out = nullptr;  // (S, Hk, F, Dv + 1) when return_state, else null
  void* ref_out = nullptr;    // (S, Hk, Dk): the ref used (read back by the backward)
  // csq_pool_prefill_ only: state_in / ref_in and state_out / ref_out are one pool, in place.
  StatePool pool;
};

// csq_bwd, derived from the forward's parameters: the forward's y, b, den are read back here
// (not written), and ref_in is the forward's ref_out.
struct BwdParams : FwdParams {
  int64_t dy_stride[4] = {0, 0, 0, 0};
  const void* dy = nullptr;  // (B, Hq, N, Dv), accumulation dtype (the gradient of y)
  // Outputs, contiguous, accumulation dtype; every element written by every backend.
  void* dq = nullptr;  // (B, Hq, N, Dk)
  void* dk = nullptr;  // (B, Hk, N, Dk)
  void* dv = nullptr;  // (B, Hk, N, Dv)
  void* db = nullptr;  // (B, Hq, N): dL/db_i; the host layer sums it into the shift gradient
  const void* dstate_out = nullptr;  // optional incoming gradient of state_out
  void* dstate_in = nullptr;         // (S, Hk, F, Dv + 1), gradient of state_in when given
  void* dref = nullptr;              // (S, Hk, Dk): gradient of ref through k - ref and b,
                                     // with or without a carried state
};

// csq_decode_: one token per sequence (seqlen == 1, causal), in place on a carried state.
struct DecodeParams : QkvParams {
  void* sums = nullptr;  // (B, Hk, F, Dv + 1), accumulation dtype, contiguous: updated
  void* ref = nullptr;   // (B, Hk, Dk): read; written when the state holds no key yet
  void* y = nullptr;     // (B, Hq, 1, Dv), input dtype, contiguous: the output
  // csq_pool_decode_ only: sums and ref are a pool, sequence b updates slot pool.slots[b].
  StatePool pool;
};

// Keys are summed relative to a reference key r when the sums are built: the carried state's
// ref when the state holds keys, else the coordinate-wise median of the finite values among
// the first kRefKeys keys of the sequence (ref_key_median below). Centered CSQ is invariant to
// moving every key, so r changes only rounding; a median sits among the typical keys whatever
// a few outliers or an attention-sink key do (a mean moves with them), which keeps float32
// sums accurate when keys share a large offset, and keeps a huge key at position p from
// reaching the rounding of the rows before p. The saved per-query shift is the shift that goes
// with k - r: b_i = c_h - tau <q_i, mu_i - r> when centering, else b_i = c_h + tau <q_i, r>.
constexpr int64_t kRefKeys = 64;


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

}  // namespace csq
