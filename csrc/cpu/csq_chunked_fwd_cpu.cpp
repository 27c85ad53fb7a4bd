// CPU host of csq_chunked_fwd: the shared host layer prepares (checks, params, outputs), then the
// launcher for the dtype (csq_chunked_fwd_kernel.cpp).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../csq_host.h"
#include "csq_cpu_launch.h"

namespace csq {
namespace cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> csq_chunked_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& shift,
    const c10::optional<at::Tensor>& cu_seqlens, const c10::optional<at::Tensor>& state_in,
    const c10::optional<at::Tensor>& ref_in, bool causal, double scale, bool center,
    bool normalize, double eps, int64_t tile_size, bool return_state) {
  ForwardCall call = prepare_forward(q, k, v, shift, cu_seqlens, state_in, ref_in, causal,
                                     scale, center, normalize, eps, tile_size, return_state);
  int too_coarse = 0;  // a float32 state could not serve the call: float64 instead
  call.p.state_condition_limit = state_condition_limit(q.scalar_type());
  call.p.state_too_coarse = &too_coarse;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(),
                                  "csq_chunked_fwd_cpu",
                                  [&] { launch_fwd<scalar_t, StateMap>(call.p); });
  if (too_coarse)
    return forward_in_float64(&csq_chunked_fwd_cpu, q, k, v, shift, cu_seqlens, state_in,
                              ref_in, causal, scale, center, normalize, eps, tile_size,
                              return_state);
  return call.outputs();
}

}  // namespace
}  // namespace cpu
}  // namespace csq

TORCH_LIBRARY_IMPL(csq_ext, CPU, m) { m.impl("csq_chunked_fwd", &csq::cpu::csq_chunked_fwd_cpu); }
