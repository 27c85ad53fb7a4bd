// The host layer of the direct path, shared by every backend (see csq_host.h for the shape of
// it and the outputs' contract, which is the same here minus the carried state): checks,
// DirectFwdParams / DirectBwdParams from tensors, and every output allocated. The kernels live
// in csrc/cpu/csq_direct_*_kernel.cpp.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "csq_direct_params.h"
#include "csq_host.h"

namespace csq {

// csq_direct_fwd. tile_size <= 0: the backend's default tile.
struct DirectForwardCall {
  DirectFwdParams p;
  at::Tensor shift_acc, cu_seqlens, row_shift, row_sums;  // what p points into
  at::Tensor y, b, den;              // accumulation dtype: (B, Hq, N, Dv), (B, Hq, N) twice
  std::tuple<at::Tensor, at::Tensor, at::Tensor> outputs() const { return {y, b, den}; }
};
DirectForwardCall prepare_direct_forward(const at::Tensor& q, const at::Tensor& k,
                                         const at::Tensor& v, const at::Tensor& shift,
                                         const c10::optional<at::Tensor>& cu_seqlens,
                                         const c10::optional<at::Tensor>& row_shift,
                                         const c10::optional<at::Tensor>& row_sums,
                                         bool causal, double scale, bool center, bool normalize,
                                         double eps, int64_t tile_size);

// csq_direct_bwd: the forward's parameters plus dy and the forward's saved y, b, den.
struct DirectBackwardCall {
  DirectBwdParams p;
  at::Tensor shift_acc, cu_seqlens, y, b, den;  // what p points into
  at::Tensor dq, dk, dv, db;                    // zeroed accumulators
  at::ScalarType input_dtype, shift_dtype;
  // dq, dk, dv in the input dtype, dshift (Hq,) in the dtype of shift (gradient_outputs), and
  // db itself (B, Hq, N), accumulation dtype: the gradient of the forward's row_shift.
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> outputs() const {
    const auto g = gradient_outputs(dq, dk, dv, db, input_dtype, shift_dtype);
    return {std::get<0>(g), std::get<1>(g), std::get<2>(g), std::get<3>(g), db};
  }
};
DirectBackwardCall prepare_direct_backward(const at::Tensor& dy, const at::Tensor& q,
                                           const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& shift,
                                           const c10::optional<at::Tensor>& cu_seqlens,
                                           const at::Tensor& y, const at::Tensor& b,
                                           const at::Tensor& den, bool causal, double scale,
                                           bool center, bool normalize, double eps,
                                           int64_t tile_size);

}  // namespace csq
