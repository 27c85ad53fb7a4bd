// The host layer of the state-only op (csq_state / csq_state_bwd), shared by every backend:
// checks, StateParams / StateBwdParams from tensors, every output allocated (csq_host.h's
// contract for the carried state: state_out and ref_out always; dstate_in when state_in is
// given, dref always).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "csq_host.h"

namespace csq {

// csq_state. tile_size <= 0: the backend's default block.
struct StateCall {
  StateParams p;
  at::Tensor cu_seqlens;  // what p points into
  StateOutputs state;
  std::tuple<at::Tensor, at::Tensor> outputs() const { return {state.state_out, state.ref_out}; }
};
StateCall prepare_state(const at::Tensor& k, const at::Tensor& v,
                        const c10::optional<at::Tensor>& cu_seqlens,
                        const c10::optional<at::Tensor>& state_in,
                        const c10::optional<at::Tensor>& ref_in, int64_t tile_size,
                        FeatureCount features = &StateMap::num_features);

// csq_state_bwd: the forward's parameters (ref: the forward's ref_out) and the incoming
// gradients; dk, dv (zeroed, accumulation dtype) returned in the input dtype.
struct StateBackwardCall {
  StateBwdParams p;
  at::Tensor cu_seqlens, ref;  // what p points into
  at::Tensor dk, dv;
  StateGradients state;
  at::ScalarType input_dtype;
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> outputs() const {
    return {dk.to(input_dtype), dv.to(input_dtype), state.dstate_in, state.dref};
  }
};
StateBackwardCall prepare_state_backward(const at::Tensor& k, const at::Tensor& v,
                                         const c10::optional<at::Tensor>& cu_seqlens,
                                         const c10::optional<at::Tensor>& state_in,
                                         const at::Tensor& ref,
                                         const c10::optional<at::Tensor>& dstate_out,
                                         const c10::optional<at::Tensor>& dref_out, bool ref_given,
                                         int64_t tile_size,
                                         FeatureCount features = &StateMap::num_features);

}  // namespace csq
