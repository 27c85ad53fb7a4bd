// The host layer shared by every backend (torch types; the kernels never see it). Each op has
// one `prepare_*` step that checks the arguments, fills the op's parameter struct and allocates
// every output, and the backward one `outputs()` that turns the accumulators into the op's
// results. The ops' entries (csq_op_entries.h) call them for every backend; a backend's host
// file then only guards (device checks, device guard), dispatches on the dtype and launches
// its kernels.
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

#include "csq_feature_maps.h"
#include "csq_params.h"

namespace csq {

// float64 inputs accumulate in float64; everything else in float32.
at::ScalarType acc_dtype(at::ScalarType input);

// Checks what the ops rely on. The public Python entry checks first with friendlier
// messages; these checks guard direct torch.ops calls.
void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& shift, double eps, int64_t tile_size);

// The chunked path's block (chunk) length when the caller passes tile_size <= 0; also the
// state-only op's.
int64_t default_chunk(int64_t dim_k, bool on_cuda);

// Sizes, strides, input pointers and scalars of every op (no packed sequences yet:
// num_seqs = batch).
void fill_qkv_params(QkvParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& shift_acc, bool causal, double scale, bool center,
                     bool normalize, double eps);

// Packed sequences: checks cu_seqlens against q, points p at an int64 copy on q's device and
// returns that copy (keep it alive while the kernels run; undefined without cu_seqlens).
at::Tensor set_packed_sequences(QkvParams& p, const at::Tensor& q,
                                const c10::optional<at::Tensor>& cu_seqlens);

// The rows F of a state for head size Dk: the feature map's count (csq_feature_maps.h). Every
// op that ships uses StateMap's; a test build for another map passes that map's.
using FeatureCount = int64_t (*)(int64_t dim_k);

// Shape of the carried sums: (S, Hk, F, Dv + 1).
std::vector<int64_t> state_shape(const QkvParams& p,
                                 FeatureCount features = &StateMap::num_features);

// A carried state (causal only): checks state_in and ref_in (shape, dtype, q's device,
// contiguous; an empty ref is none) and points cs at them. A backward's ref (the forward's
// ref_out) is checked the same way.
void set_carried_state(const QkvParams& p, CarriedState& cs, const at::Tensor& q,
                       const c10::optional<at::Tensor>& state_in,
                       const c10::optional<at::Tensor>& ref_in, FeatureCount features);

// A forward's returned state: state_out (S, Hk, F, Dv + 1) when `returns`, ref_out (S, Hk, Dk)
// when `with_ref` (else empty tensors); points cs at them.
struct StateOutputs {
  at::Tensor state_out, ref_out;
};
StateOutputs alloc_state_outputs(const QkvParams& p, CarriedState& cs,
                                 const at::TensorOptions& opts, bool returns, bool with_ref,
                                 FeatureCount features);

// A backward's carried-state gradients: checks the incoming dstate_out and dref_out (optional)
// and points g at contiguous copies; dstate_in (zeroed) when cs has a state_in, dref (zeroed)
// when `with_ref`, else empty tensors. ref_given: whether the forward was given its ref_in
// (else it picked its ref, whose gradient goes to the keys).
struct StateGradients {
  at::Tensor dstate_out, dref_out, dstate_in, dref;
};
StateGradients set_state_gradients(const QkvParams& p, const CarriedState& cs,
                                   CarriedStateGrads& g, const at::TensorOptions& opts,
                                   const c10::optional<at::Tensor>& dstate_out,
                                   const c10::optional<at::Tensor>& dref_out, bool ref_given, bool with_ref,
                                   FeatureCount features);

// The forward's parameters, shared by csq_chunked_fwd, csq_chunked_bwd and
// csq_pool_prefill_ (after check_inputs): sizes, scalars, chunk, packed sequences and carried
// state (none when state_in / ref_in are empty). Returns the tensors p points into through the
// last two arguments.
void fill_forward_params(FwdParams& p, const at::Tensor& q, const at::Tensor& k,
                         const at::Tensor& v, const at::Tensor& shift,
                         const c10::optional<at::Tensor>& cu_seqlens,
                         const c10::optional<at::Tensor>& state_in,
                         const c10::optional<at::Tensor>& ref_in, bool causal, double scale,
                         bool center, bool normalize, double eps, int64_t tile_size,
                         FeatureCount features, at::Tensor& shift_acc, at::Tensor& cu);

// csq_chunked_fwd. tile_size <= 0: the backend's default chunk.
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
                            bool center, bool normalize, double eps, int64_t tile_size,
                            bool return_state, FeatureCount features = &StateMap::num_features);

// The chunked op's float32 state check (csq_params.h, state_read_ill_conditioned): the limit
// for inputs of this dtype, 0 for float64 (no check).
double state_condition_limit(at::ScalarType input);

// What a backend does when a float32 state cannot serve a call (FwdParams::state_too_coarse):
// the same op once more on float64 copies of the floating inputs, its results converted back
// to the dtypes of the float32 call's (outputs in the accumulation dtype, gradients of q, k, v
// in the input dtype, of shift in shift's). `op` is the backend's own csq_chunked_fwd /
// csq_chunked_bwd.
using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using ForwardOp = ForwardResult (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const at::Tensor&, const c10::optional<at::Tensor>&,
                                    const c10::optional<at::Tensor>&,
                                    const c10::optional<at::Tensor>&, bool, double, bool, bool,
                                    double, int64_t, bool);
ForwardResult forward_in_float64(ForwardOp op, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& shift,
                                 const c10::optional<at::Tensor>& cu_seqlens,
                                 const c10::optional<at::Tensor>& state_in,
                                 const c10::optional<at::Tensor>& ref_in, bool causal,
                                 double scale, bool center, bool normalize, double eps,
                                 int64_t tile_size, bool return_state);
using BackwardResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using BackwardOp = BackwardResult (*)(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, bool, bool, double,
    bool, bool, double, int64_t);
BackwardResult backward_in_float64(BackwardOp op, const at::Tensor& dy, const at::Tensor& q,
                                   const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& shift,
                                   const c10::optional<at::Tensor>& cu_seqlens,
                                   const c10::optional<at::Tensor>& state_in,
                                   const at::Tensor& ref, const at::Tensor& y,
                                   const at::Tensor& b, const at::Tensor& den,
                                   const c10::optional<at::Tensor>& dstate_out,
                                   const c10::optional<at::Tensor>& dref_out, bool ref_given,
                                   bool causal, double scale, bool center, bool normalize,
                                   double eps, int64_t tile_size);

// What a backward of either algorithm holds besides its params (BackwardCall here,
// DirectBackwardCall in csq_direct_host.h): the tensors the params point into, the zeroed
// accumulators, the carried state's gradients and the dtypes of the results.
struct BackwardTensors {
  at::Tensor shift_acc, cu_seqlens, ref, y, b, den;  // what p points into
  at::Tensor dq, dk, dv, db;                         // zeroed, accumulation dtype
  StateGradients state;
  at::ScalarType input_dtype, shift_dtype;
  // The op's results: dq, dk, dv in the input dtype, dshift = db summed over batch entries and
  // positions, (Hq,), in the dtype of shift, then the gradients of state_in and ref_in (empty
  // tensors when not given).
  BackwardResult outputs() const;
};

// The backward's preparation that both algorithms share, after the forward's params and
// carried state: checks dy (B, Hq, N, Dv) and the forward's saved y, b, den (accumulation
// dtype, q's device) and points `saved` and `grad` at dy and contiguous y, b, den; allocates
// the zeroed dq, dk, dv, db (grad's outputs); the carried state's gradients
// (set_state_gradients, dref when with_ref); records the dtypes of the results.
void set_backward_tensors(BackwardTensors& c, const QkvParams& p, const CarriedState& cs,
                          ForwardOutputs& saved, GradientFields& grad, CarriedStateGrads& g,
                          const at::Tensor& dy, const at::Tensor& q, const at::Tensor& k,
                          const at::Tensor& v, const at::Tensor& shift, const at::Tensor& y,
                          const at::Tensor& b, const at::Tensor& den,
                          const c10::optional<at::Tensor>& dstate_out,
                          const c10::optional<at::Tensor>& dref_out, bool ref_given,
                          bool with_ref, FeatureCount features);

// csq_chunked_bwd: the forward's parameters (same checks) plus dy, the forward's saved y, b,
// den and ref, and the gradients of the returned state and ref.
struct BackwardCall : BackwardTensors {
  BwdParams p;
};
BackwardCall prepare_backward(const at::Tensor& dy, const at::Tensor& q, const at::Tensor& k,
                              const at::Tensor& v, const at::Tensor& shift,
                              const c10::optional<at::Tensor>& cu_seqlens,
                              const c10::optional<at::Tensor>& state_in, const at::Tensor& ref,
                              const at::Tensor& y, const at::Tensor& b, const at::Tensor& den,
                              const c10::optional<at::Tensor>& dstate_out,
                              const c10::optional<at::Tensor>& dref_out, bool ref_given, bool causal,
                              double scale, bool center, bool normalize, double eps,
                              int64_t tile_size,
                              FeatureCount features = &StateMap::num_features);

// csq_decode_: checks the arguments (one token; sums (B, Hk, F, Dv + 1) and ref (B, Hk, Dk)
// contiguous in the accumulation dtype on q's device, like shift; y a contiguous
// (B, Hq, 1, Dv) tensor of q's dtype) and fills the params. Allocates nothing.
DecodeParams prepare_decode(const at::Tensor& sums, const at::Tensor& ref, const at::Tensor& q,
                            const at::Tensor& k, const at::Tensor& v, const at::Tensor& shift,
                            const at::Tensor& y, double scale, bool center, bool normalize,
                            double eps, FeatureCount features = &StateMap::num_features);

// The same without the state (sums and ref left null): the checks of q, k, v, shift and y,
// shared with the pool's decode step (csq_pool_host.h).
DecodeParams prepare_decode_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& shift, const at::Tensor& y, double scale,
                                 bool center, bool normalize, double eps);

}  // namespace csq
