// The host layer shared by every backend (torch types; the kernels never see it). Each op has
// one `prepare_*` step that checks the arguments, fills the op's parameter struct and allocates
// every output, and the backward one `outputs()` that turns the accumulators into the op's
// results. A backend's host file then only guards (device checks, device guard), dispatches on
// the dtype and launches its kernels.
//
// One contract for every backend's outputs (what the kernels must write):
//   forward:  y, b, den for every query row; ref_out for every (sequence, kv head); state_out
//             too when return_state (else an empty tensor).
//   backward: dq, dk, dv, db (zeroed here; the kernels add into them) for every row; dref for
//             every (sequence, kv head), with or without a carried state; dstate_in (zeroed
//             here) with a carried state (else an empty tensor). The op's shift gradient is
//             not a kernel output: dshift (Hq,) = db summed over batch entries and positions,
//             computed here for every backend.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "csq_params.h"

namespace csq {

// float64 inputs accumulate in float64; everything else in float32.
at::ScalarType acc_dtype(at::ScalarType input);

// Checks what the ops rely on. The public Python entry checks first with friendlier
// messages; these checks guard direct torch.ops calls.
void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& shift, double eps, int64_t chunk_size);

// Sizes, strides, input pointers and scalars of every op (no packed sequences yet:
// num_seqs = batch).
void fill_qkv_params(QkvParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& shift_acc, bool causal, double scale, bool center,
                     bool normalize, double eps);

// Packed sequences: checks cu_seqlens against q, points p at an int64 copy on q's device and
// returns that copy (keep it alive while the kernels run; undefined without cu_seqlens).
at::Tensor set_packed_sequences(QkvParams& p, const at::Tensor& q,
                                const c10::optional<at::Tensor>& cu_seqlens);

// Shape of the carried sums: (S, Hk, F, Dv + 1).
std::vector<int64_t> state_shape(const QkvParams& p);

// The backward's results from its accumulators (shared with the direct path): dq, dk, dv in
// the input dtype and dshift = sum of db over batch entries and positions, (Hq,), in the dtype
// of shift.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gradient_outputs(
    const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv, const at::Tensor& db,
    at::ScalarType input_dtype, at::ScalarType shift_dtype);

// The forward's parameters, shared by csq_fwd, csq_bwd and csq_pool_prefill_ (after
// check_inputs): sizes, scalars, chunk, packed sequences and carried state (none when
// state_in / ref_in are empty). Returns the tensors p points into through the last two
// arguments.
void fill_forward_params(FwdParams& p, const at::Tensor& q, const at::Tensor& k,
                         const at::Tensor& v, const at::Tensor& shift,
                         const c10::optional<at::Tensor>& cu_seqlens,
                         const c10::optional<at::Tensor>& state_in,
                         const c10::optional<at::Tensor>& ref_in, bool causal, double scale,
                         bool center, bool normalize, double eps, int64_t chunk_size,
                         at::Tensor& shift_acc, at::Tensor& cu);

// csq_fwd. chunk_size <= 0: the backend's default chunk.
struct ForwardCall {
  FwdParams p;
  at::Tensor shift_acc, cu_seqlens;  // what p points into
  at::Tensor y, b, den, state_out, ref_out;
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> outputs() const {
    return {y, b, den, state_out, ref_out};
  }
};
ForwardCall prepare_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& shift, const c10::optional<at::Tensor>& cu_seqlens,
                            const c10::optional<at::Tensor>& state_in,
                            const c10::optional<at::Tensor>& ref_in, bool causal, double scale,
                            bool center, bool normalize, double eps, int64_t chunk_size,
                            bool return_state);

// csq_bwd: the forward's parameters (same checks) plus dy, the forward's saved y, b, den and
// ref, and the gradient of the returned state.
struct BackwardCall {
  BwdParams p;
  at::Tensor shift_acc, cu_seqlens, ref, y, b, den, dstate_out;  // what p points into
  at::Tensor dq, dk, dv, db, dstate_in, dref;
  at::ScalarType input_dtype, shift_dtype;
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> outputs()
      const;
};
BackwardCall prepare_backward(const at::Tensor& dy, const at::Tensor& q, const at::Tensor& k,
                              const at::Tensor& v, const at::Tensor& shift,
                              const c10::optional<at::Tensor>& cu_seqlens,
                              const c10::optional<at::Tensor>& state_in, const at::Tensor& ref,
                              const at::Tensor& y, const at::Tensor& b, const at::Tensor& den,
                              const c10::optional<at::Tensor>& dstate_out, bool causal,
                              double scale, bool center, bool normalize, double eps,
                              int64_t chunk_size);

// Checks the backward's dy (B, Hq, N, Dv) and the forward's saved y, b, den (accumulation
// dtype, q's device); points p at dy and at contiguous y, b, den (returned: keep them alive).
// Shared with the direct path.
struct SavedForward {
  at::Tensor y, b, den;
};
template <typename Params>
SavedForward set_saved_forward(Params& p, const at::Tensor& q, const at::Tensor& v,
                               const at::Tensor& dy, const at::Tensor& y, const at::Tensor& b,
                               const at::Tensor& den);

// The zeroed accumulators of a backward (dq, dk, dv, db in the accumulation dtype); points p
// at them. Shared with the direct path.
struct GradientTensors {
  at::Tensor dq, dk, dv, db;
};
template <typename Params>
GradientTensors alloc_gradients(Params& p, const at::Tensor& q, const at::Tensor& k,
                                const at::Tensor& v);

// csq_decode_: checks the arguments (one token; sums (B, Hk, F, Dv + 1) and ref (B, Hk, Dk)
// contiguous in the accumulation dtype on q's device, like shift; y a contiguous
// (B, Hq, 1, Dv) tensor of q's dtype) and fills the params. Allocates nothing.
DecodeParams prepare_decode(const at::Tensor& sums, const at::Tensor& ref, const at::Tensor& q,
                            const at::Tensor& k, const at::Tensor& v, const at::Tensor& shift,
                            const at::Tensor& y, double scale, bool center, bool normalize,
                            double eps);

// The same without the state (sums and ref left null): the checks of q, k, v, shift and y,
// shared with the pool's decode step (csq_pool_host.h).
DecodeParams prepare_decode_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& shift, const at::Tensor& y, double scale,
                                 bool center, bool normalize, double eps);

}  // namespace csq
