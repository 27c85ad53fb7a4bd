// CPU host of csq_direct_fwd: the shared host layer prepares (checks, params, outputs), then
// the launcher for the dtype (csq_direct_fwd_kernel.cpp).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../csq_direct_host.h"
#include "csq_cpu_launch.h"

namespace csq {
namespace cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> csq_direct_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& shift,
    const c10::optional<at::Tensor>& cu_seqlens, const c10::optional<at::Tensor>& state_in,
    const c10::optional<at::Tensor>& ref_in, bool causal, double scale, bool center,
    bool normalize, double eps, int64_t tile_size, bool return_state) {
  const DirectForwardCall call =
      prepare_direct_forward(q, k, v, shift, cu_seqlens, state_in, ref_in, causal, scale, center,
                             normalize, eps, tile_size, return_state);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "csq_direct_fwd",
                                  [&] { launch_direct_fwd<scalar_t, StateMap>(call.p); });
  return call.outputs();
}

}  // namespace
}  // namespace cpu
}  // namespace csq

TORCH_LIBRARY_IMPL(csq_ext, CPU, m) { m.impl("csq_direct_fwd", &csq::cpu::csq_direct_fwd_cpu); }
