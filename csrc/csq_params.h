// The plain parameter structs of the ops, shared by every backend. Kernels and launchers see
// only these: sizes, element strides, raw pointers and scalars. No torch types, so the CUDA
// kernel files compile with nvcc alone. As in other attention kernels, the backward's
// parameters derive from the forward's (BwdParams : FwdParams), every op's from QkvParams, and
// both algorithms' from the same output (ForwardOutputs) and gradient (GradientFields) fields.
#pragma once

#include <cmath>
#include <cstdint>

#include "csq_feature_map.h"

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

// What every forward writes and its backward reads back: contiguous, accumulation dtype.
struct ForwardOutputs {
  void* y = nullptr;    // (B, Hq, N, Dv): the output
  void* b = nullptr;    // (B, Hq, N): per-query effective shift, see kRefKeys
  void* den = nullptr;  // (B, Hq, N): sum_j w_ij
};

// What every backward reads (dy) and writes: the gradients of q, k, v and of each b_i.
struct GradientFields {
  int64_t dy_stride[4] = {0, 0, 0, 0};
  const void* dy = nullptr;  // (B, Hq, N, Dv), accumulation dtype (the gradient of y)
  // Outputs, contiguous, accumulation dtype; every element written by every backend.
  void* dq = nullptr;  // (B, Hq, N, Dk)
  void* dk = nullptr;  // (B, Hk, N, Dk)
  void* dv = nullptr;  // (B, Hk, N, Dv)
  void* db = nullptr;  // (B, Hq, N): dL/db_i; the host layer sums it into the shift gradient
};

// A carried state (causal only), per (sequence, key/value head), contiguous, accumulation
// dtype, in the feature map's layout (csq_feature_map.h): sums (S, Hk, F, Dv + 1) =
// sum_j psi(k_j - ref) [v_j, 1]^T and the key offset ref (S, Hk, Dk) they are relative to.
// What an op continues (state_in, ref_in) and returns (state_out, ref_out); every op that
// carries states shares it.
struct CarriedState {
  const void* state_in = nullptr;  // optional
  // ref_in comes with state_in; in a backward it is the forward's ref_out. Which ref a
  // sequence uses: keeps_ref_in below.
  const void* ref_in = nullptr;
  void* state_out = nullptr;  // (S, Hk, F, Dv + 1) when the state is returned, else null
  void* ref_out = nullptr;    // (S, Hk, Dk): the ref used (read back by the backward)
  // csq_pool_prefill_ only: state_in / ref_in and state_out / ref_out are one pool, in place.
  StatePool pool;
};

// The gradients of a carried state, in a backward: the incoming gradients of the returned
// state and ref, and those of state_in and ref_in. A ref the sequence picked from its keys
// (keeps_ref_in with ref_given) passes its gradient to those keys (ref_key_position), and
// dref is 0 there.
struct CarriedStateGrads {
  const void* dstate_out = nullptr;  // optional incoming gradient of state_out
  const void* dref_out = nullptr;    // optional incoming gradient of ref_out
  // Whether the forward was given its ref_in (the rule's input; ref_in here holds the
  // forward's ref, given or picked).
  bool ref_given = true;
  void* dstate_in = nullptr;         // (S, Hk, F, Dv + 1), gradient of state_in when given
  void* dref = nullptr;              // (S, Hk, Dk): gradient of ref_in where it was kept
};

// csq_chunked_fwd: the chunked algorithm. Every output is contiguous, in the accumulation
// dtype.
struct FwdParams : QkvParams, ForwardOutputs, CarriedState {
  // CPU only: positions per chunk (a tuning knob; the result does not depend on it). The CUDA
  // kernels always use csq::cuda::kChunk.
  int64_t chunk = 64;
  // CUDA, bfloat16 / float16 only: the state products on tensor cores (TF32 mma.sync) with 3
  // products per step (3xTF32, float32 accuracy) or 1 (plain TF32), or 0: on the CUDA cores
  // like float32. A switch for comparisons: CSQ_CUDA_TENSOR_CORES=0, 1 or 3 (the default).
  int tensor_core_passes = 3;

  // The float32 state's conditioning (state_read_ill_conditioned below), float32 and half
  // inputs: a kernel that finds a query row beyond state_condition_limit sets
  // *state_too_coarse and may stop early; the host then runs the op again in float64.
  // 0 / nullptr: no check (float64 inputs, and the backends that do not check).
  double state_condition_limit = 0;
  int* state_too_coarse = nullptr;
};

// csq_chunked_bwd, derived from the forward's parameters: the forward's y, b, den are read
// back here (not written), and ref_in is the forward's ref_out.
struct BwdParams : FwdParams, GradientFields, CarriedStateGrads {};

// csq_state: the state of a call's keys and values alone, without queries or outputs (the
// q fields of QkvParams mirror k), continuing state_in / ref_in; state_out and ref_out are
// always written.
struct StateParams : QkvParams, CarriedState {
  int64_t chunk = 64;  // CPU only: keys per block of the state update
  int tensor_core_passes = 3;  // CUDA, bfloat16 / float16: as FwdParams'
};

// csq_state_bwd: the gradients of the keys, values, state_in and ref_in from those of the
// returned state and ref.
struct StateBwdParams : StateParams, CarriedStateGrads {
  void* dk = nullptr;  // (B, Hk, N, Dk), contiguous, accumulation dtype
  void* dv = nullptr;  // (B, Hk, N, Dv)
};

// csq_decode_: one token per sequence (seqlen == 1, causal), in place on a carried state.
struct DecodeParams : QkvParams {
  void* sums = nullptr;  // (B, Hk, F, Dv + 1), accumulation dtype, contiguous: updated
  void* ref = nullptr;   // (B, Hk, Dk): read; written when the state holds no key yet
  void* y = nullptr;     // (B, Hq, 1, Dv), input dtype, contiguous: the output
  // csq_pool_decode_ only: sums and ref are a pool, sequence b updates slot pool.slots[b].
  StatePool pool;
};

// How well a float32 state serves a query row (docs/SPEC.md, section 6). Row i reads the sums
// of n keys x_j = k_j - r as phi(qe_i) . S, a dot product whose terms add up, in absolute
// value, to at most sum_j (tau |q_i| |x_j| + |b_i|)^2, so by Cauchy-Schwarz to at most
//   bound_i = (tau |q_i| sqrt(T) + |b_i| sqrt(n))^2,   T = sum_j |x_j|^2
// (T is the trace of the state's pair rows in its count column). Rounded to float32, the sums
// and the read then err by about eps bound_i against den_i, the row's weight sum (measured
// 0.2 to 0.4 eps bound_i / den_i, Dk = 16 to 128, N = 600). N(0, 1) inputs give
// bound_i / den_i <= 2 Dk; keys that drift along the sequence, or a few keys far larger than
// the rest, grow it with the square of their spread (a drift of 30 times the key norm:
// ~2000, of 1000 times: ~6e5, the error 5e-2 in the worst rows). Beyond these limits the
// chunked op computes in float64 instead (forward_entry, csrc/csq_op_entries.h; the CPU
// kernels check, csrc/cpu/csq_ops_cpu.cpp).
constexpr double kStateConditionLimitFloat = 2048;   // eps * limit = 1.2e-4: rows <= ~5e-5
constexpr double kStateConditionLimitHalf = 65536;   // 4e-3: bfloat16 / float16 (bar 2e-2)

// Whether bound_i / den_i exceeds `limit` (finite bounds only: a NaN or Inf key or query is
// data that propagates, and float64 would not change it).
CSQ_HOST_DEVICE inline bool state_read_ill_conditioned(double tau_qnorm, double trace, double b,
                                                       double n, double den, double limit) {
  const double root = tau_qnorm * sqrt(trace) + fabs(b) * sqrt(n);
  const double bound = root * root;
  return bound - bound == 0.0 && bound > limit * den;
}

// Keys are summed relative to a reference key r when the sums are built: the given ref_in when
// the carried state holds keys (or there is no carried state: a backward passes the forward's
// ref, a caller its own), else the coordinate-wise median of the finite values among the
// first kRefKeys keys of the sequence (ref_key_median below). This header is the rule's one
// home: the CPU and CUDA kernels of every op and the gradient of a picked ref use it; Python
// reads the ref the ops return. Centered CSQ is invariant to
// moving every key, so r changes only rounding; a median sits among the typical keys whatever
// a few outliers or an attention-sink key do (a mean moves with them), which keeps float32
// sums accurate when keys share a large offset, and keeps a huge key at position p from
// reaching the rounding of the rows before p. The saved per-query shift is the shift that goes
// with k - r: b_i = c_h - tau <q_i, mu_i - r> when centering, else b_i = c_h + tau <q_i, r>.
constexpr int64_t kRefKeys = 64;

// Whether a sequence of `len` keys keeps the given ref (has_ref_in) rather than picking its
// own: without a carried state, with a state that holds keys, or with no key to pick from.
CSQ_HOST_DEVICE inline bool keeps_ref_in(bool has_ref_in, bool has_state_in, int64_t len,
                                         bool state_holds_keys) {
  return has_ref_in && (!has_state_in || len == 0 || state_holds_keys);
}


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

// Which key ref_key_median picked: the first j < m whose finite key(j) equals value, -1 if
// none (no finite key: the median is 0). The gradient of a picked ref goes to that key.
template <typename Acc, typename KeyAt>
CSQ_HOST_DEVICE inline int64_t ref_key_position(int64_t m, Acc value, const KeyAt& key) {
  for (int64_t j = 0; j < m; ++j) {
    const Acc x = key(j);
    if (x - x == Acc(0) && x == value) return j;
  }
  return -1;
}

}  // namespace csq
