// The host layer of the direct path, shared by every backend (see csq_host.h for the shape of
// it and the outputs' contract, which is the chunked path's: the same arguments and outputs,
// but ref_out only when a state is read or returned): checks, DirectFwdParams /
// DirectBwdParams from tensors, and every output allocated. The kernels live in
// csrc/cpu/csq_direct_*_kernel.cpp and csrc/cuda/csq_direct_*.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "csq_direct_params.h"
#include "csq_host.h"

namespace csq {

// csq_direct_fwd. tile_size <= 0: the backend's default tile.
struct DirectForwardCall {
  DirectFwdParams p;
  at::Tensor shift_acc, cu_seqlens;  // what p points into
  at::Tensor y, b, den;              // accumulation dtype: (B, Hq, N, Dv), (B, Hq, N) twice
  StateOutputs state;                // state_out and ref_out, or empty tensors
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> outputs() const {
    return {y, b, den, state.state_out, state.ref_out};
  }
};
DirectForwardCall prepare_direct_forward(const at::Tensor& q, const at::Tensor& k,
                                         const at::Tensor& v, const at::Tensor& shift,
                                         const c10::optional<at::Tensor>& cu_seqlens,
                                         const c10::optional<at::Tensor>& state_in,
                                         const c10::optional<at::Tensor>& ref_in, bool causal,
                                         double scale, bool center, bool normalize, double eps,
                                         int64_t tile_size, bool return_state,
                                         FeatureCount features = &StateMap::num_features);

// csq_direct_bwd: the forward's parameters plus dy, the forward's saved y, b, den and ref (an
// empty tensor when the forward neither read nor returned a state), and the gradients of the
// returned state and ref.
struct DirectBackwardCall : BackwardTensors {
  DirectBwdParams p;
};
DirectBackwardCall prepare_direct_backward(
    const at::Tensor& dy, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& shift, const c10::optional<at::Tensor>& cu_seqlens,
    const c10::optional<at::Tensor>& state_in, const at::Tensor& ref, const at::Tensor& y,
    const at::Tensor& b, const at::Tensor& den, const c10::optional<at::Tensor>& dstate_out,
    const c10::optional<at::Tensor>& dref_out, bool ref_given, bool causal, double scale, bool center,
    bool normalize, double eps, int64_t tile_size,
    FeatureCount features = &StateMap::num_features);

}  // namespace csq
