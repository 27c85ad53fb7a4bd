// The C++ entries of the ops, one per schema of csq_ops.cpp, shared by every backend: an entry
// takes the schema's arguments, runs the host layer's prepare step (checks, params, outputs)
// and hands the prepared call to its backend's run function, so that a backend's host file
// (csrc/cpu/csq_ops_cpu.cpp, csrc/cuda/csq_ops_cuda.cpp) holds only what differs between
// backends: guards, extra checks and the launchers. Run functions get the prepared call and
// the op's input tensors (for their checks and dtype); register_backend (below) registers
// every op with a backend's.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "csq_direct_host.h"
#include "csq_host.h"
#include "csq_pool_host.h"
#include "csq_state_host.h"

namespace csq {

// An op's input tensors, for a backend's checks and dtype dispatch (the params hold their
// pointers). The state-only ops have no queries and no shift: k stands in for both.
struct OpInputs {
  const at::Tensor& q;
  const at::Tensor& k;
  const at::Tensor& v;
  const at::Tensor& shift;
};

// csq_chunked_fwd and csq_direct_fwd. Prepare: prepare_forward or prepare_direct_forward.
// Run(call, inputs, return_state) returns false when a float32 state could not serve the call
// (FwdParams::state_too_coarse): the op then runs once more on float64 copies
// (forward_in_float64). Features: the feature map's row count (the ops' StateMap; a test build
// for another map passes that map's).
template <auto Prepare, auto Run, FeatureCount Features = &StateMap::num_features>
ForwardResult forward_entry(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& shift, const c10::optional<at::Tensor>& cu_seqlens,
                            const c10::optional<at::Tensor>& state_in,
                            const c10::optional<at::Tensor>& ref_in, bool causal, double scale,
                            bool center, bool normalize, double eps, int64_t tile_size,
                            bool return_state) {
  auto call = Prepare(q, k, v, shift, cu_seqlens, state_in, ref_in, causal, scale, center,
                      normalize, eps, tile_size, return_state, Features);
  if (Run(call, OpInputs{q, k, v, shift}, return_state)) return call.outputs();
  return forward_in_float64(&forward_entry<Prepare, Run, Features>, q, k, v, shift, cu_seqlens,
                            state_in, ref_in, causal, scale, center, normalize, eps, tile_size,
                            return_state);
}

// csq_chunked_bwd and csq_direct_bwd, as forward_entry (backward_in_float64).
template <auto Prepare, auto Run, FeatureCount Features = &StateMap::num_features>
BackwardResult backward_entry(
    const at::Tensor& dy, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& shift, const c10::optional<at::Tensor>& cu_seqlens,
    const c10::optional<at::Tensor>& state_in, const at::Tensor& ref, const at::Tensor& y,
    const at::Tensor& b, const at::Tensor& den, const c10::optional<at::Tensor>& dstate_out,
    const c10::optional<at::Tensor>& dref_out, bool ref_given, bool causal, double scale,
    bool center, bool normalize, double eps, int64_t tile_size) {
  auto call = Prepare(dy, q, k, v, shift, cu_seqlens, state_in, ref, y, b, den, dstate_out,
                      dref_out, ref_given, causal, scale, center, normalize, eps, tile_size,
                      Features);
  if (Run(call, OpInputs{q, k, v, shift})) return call.outputs();
  return backward_in_float64(&backward_entry<Prepare, Run, Features>, dy, q, k, v, shift,
                             cu_seqlens, state_in, ref, y, b, den, dstate_out, dref_out,
                             ref_given, causal, scale, center, normalize, eps, tile_size);
}

// csq_state: Run(StateCall&, inputs {k, k, v, k}).
template <auto Run>
std::tuple<at::Tensor, at::Tensor> state_entry(const at::Tensor& k, const at::Tensor& v,
                                               const c10::optional<at::Tensor>& cu_seqlens,
                                               const c10::optional<at::Tensor>& state_in,
                                               const c10::optional<at::Tensor>& ref_in,
                                               int64_t tile_size) {
  StateCall call = prepare_state(k, v, cu_seqlens, state_in, ref_in, tile_size);
  Run(call, OpInputs{k, k, v, k});
  return call.outputs();
}

// csq_state_bwd: Run(StateBackwardCall&, inputs {k, k, v, k}).
template <auto Run>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> state_backward_entry(
    const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& cu_seqlens,
    const c10::optional<at::Tensor>& state_in, const at::Tensor& ref,
    const c10::optional<at::Tensor>& dstate_out, const c10::optional<at::Tensor>& dref_out,
    bool ref_given, int64_t tile_size) {
  StateBackwardCall call = prepare_state_backward(k, v, cu_seqlens, state_in, ref, dstate_out,
                                                  dref_out, ref_given, tile_size);
  Run(call, OpInputs{k, k, v, k});
  return call.outputs();
}

// csq_decode_ and csq_pool_decode_ run the same decode step: Run(const DecodeParams&, inputs,
// the op's name for errors). Nothing is allocated.
template <auto Run>
void decode_entry(at::Tensor& sums, at::Tensor& ref, const at::Tensor& q, const at::Tensor& k,
                  const at::Tensor& v, const at::Tensor& shift, at::Tensor& y, double scale,
                  bool center, bool normalize, double eps) {
  const DecodeParams p =
      prepare_decode(sums, ref, q, k, v, shift, y, scale, center, normalize, eps);
  Run(p, OpInputs{q, k, v, shift}, "decode_");
}

template <auto Run>
void pool_decode_entry(at::Tensor& sums, at::Tensor& ref, const at::Tensor& slots,
                       const c10::optional<at::Tensor>& has_initial_state, const at::Tensor& q,
                       const at::Tensor& k, const at::Tensor& v, const at::Tensor& shift,
                       at::Tensor& y, double scale, bool center, bool normalize, double eps) {
  const PoolDecodeCall call = prepare_pool_decode(sums, ref, slots, has_initial_state, q, k, v,
                                                  shift, y, scale, center, normalize, eps);
  Run(call.p, OpInputs{q, k, v, shift}, "pool decode");
}

// csq_pool_prefill_: Run(PoolPrefillCall&, inputs) checks and, unless the call is empty (no
// token), launches the chunked forward; an empty call only resets the fresh slots.
template <auto Run>
at::Tensor pool_prefill_entry(at::Tensor& sums, at::Tensor& ref, const at::Tensor& slots,
                              const c10::optional<at::Tensor>& has_initial_state,
                              const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& shift, const at::Tensor& cu_seqlens,
                              double scale, bool center, bool normalize, double eps,
                              int64_t tile_size) {
  PoolPrefillCall call = prepare_pool_prefill(sums, ref, slots, has_initial_state, q, k, v,
                                              shift, cu_seqlens, scale, center, normalize, eps,
                                              tile_size);
  Run(call, OpInputs{q, k, v, shift});
  if (call.empty) call.run_empty(sums, ref);
  return call.y.to(q.scalar_type());
}

// Registers every op of one backend (called in its TORCH_LIBRARY_IMPL): the entries above with
// the backend's run functions, the static members of Runs.
template <typename Runs>
void register_backend(torch::Library& m) {
  m.impl("csq_chunked_fwd", &forward_entry<&prepare_forward, &Runs::chunked_forward>);
  m.impl("csq_chunked_bwd", &backward_entry<&prepare_backward, &Runs::chunked_backward>);
  m.impl("csq_direct_fwd", &forward_entry<&prepare_direct_forward, &Runs::direct_forward>);
  m.impl("csq_direct_bwd", &backward_entry<&prepare_direct_backward, &Runs::direct_backward>);
  m.impl("csq_state", &state_entry<&Runs::state>);
  m.impl("csq_state_bwd", &state_backward_entry<&Runs::state_backward>);
  m.impl("csq_decode_", &decode_entry<&Runs::decode>);
  m.impl("csq_pool_decode_", &pool_decode_entry<&Runs::decode>);
  m.impl("csq_pool_prefill_", &pool_prefill_entry<&Runs::pool_prefill>);
}

}  // namespace csq
