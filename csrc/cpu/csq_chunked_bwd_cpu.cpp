// CPU host of csq_chunked_bwd: the shared host layer prepares (checks, params, zeroed
// gradients), then the launcher for the dtype (csq_chunked_bwd_kernel.cpp), then the host layer's outputs.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../csq_host.h"
#include "csq_cpu_launch.h"

namespace csq {
namespace cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
csq_chunked_bwd_cpu(
    const at::Tensor& dy, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& shift, const c10::optional<at::Tensor>& cu_seqlens,
    const c10::optional<at::Tensor>& state_in, const at::Tensor& ref, const at::Tensor& y,
    const at::Tensor& b, const at::Tensor& den, const c10::optional<at::Tensor>& dstate_out,
    const c10::optional<at::Tensor>& dref_out, bool ref_given, bool causal, double scale,
    bool center, bool normalize, double eps, int64_t tile_size) {
  BackwardCall call =
      prepare_backward(dy, q, k, v, shift, cu_seqlens, state_in, ref, y, b, den, dstate_out,
                       dref_out, ref_given, causal, scale, center, normalize, eps, tile_size);
  int too_coarse = 0;  // as in the forward: the same test on the saved b and den
  call.p.state_condition_limit = state_condition_limit(q.scalar_type());
  call.p.state_too_coarse = &too_coarse;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(),
                                  "csq_chunked_bwd_cpu",
                                  [&] { launch_bwd<scalar_t, StateMap>(call.p); });
  if (too_coarse)
    return backward_in_float64(&csq_chunked_bwd_cpu, dy, q, k, v, shift, cu_seqlens, state_in,
                               ref, y, b, den, dstate_out, dref_out, ref_given, causal, scale,
                               center, normalize, eps, tile_size);
  return call.outputs();
}

}  // namespace
}  // namespace cpu
}  // namespace csq

TORCH_LIBRARY_IMPL(csq_ext, CPU, m) { m.impl("csq_chunked_bwd", &csq::cpu::csq_chunked_bwd_cpu); }
