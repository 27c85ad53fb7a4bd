// CPU host of csq_state / csq_state_bwd: the shared host layer prepares (checks, params,
// outputs), then the launchers for the dtype (csq_state_kernel.cpp).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../csq_state_host.h"
#include "csq_cpu_launch.h"

namespace csq {
namespace cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> csq_state_cpu(const at::Tensor& k, const at::Tensor& v,
                                                 const c10::optional<at::Tensor>& cu_seqlens,
                                                 const c10::optional<at::Tensor>& state_in,
                                                 const c10::optional<at::Tensor>& ref_in,
                                                 int64_t tile_size) {
  const StateCall call = prepare_state(k, v, cu_seqlens, state_in, ref_in, tile_size);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k.scalar_type(), "csq_state_cpu",
                                  [&] { launch_state<scalar_t, StateMap>(call.p); });
  return call.outputs();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> csq_state_bwd_cpu(
    const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& cu_seqlens,
    const c10::optional<at::Tensor>& state_in, const at::Tensor& ref,
    const c10::optional<at::Tensor>& dstate_out, const c10::optional<at::Tensor>& dref_out, bool ref_given,
    int64_t tile_size) {
  const StateBackwardCall call =
      prepare_state_backward(k, v, cu_seqlens, state_in, ref, dstate_out, dref_out, ref_given, tile_size);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k.scalar_type(), "csq_state_bwd_cpu",
                                  [&] { launch_state_bwd<scalar_t, StateMap>(call.p); });
  return call.outputs();
}

}  // namespace
}  // namespace cpu
}  // namespace csq

TORCH_LIBRARY_IMPL(csq_ext, CPU, m) {
  m.impl("csq_state", &csq::cpu::csq_state_cpu);
  m.impl("csq_state_bwd", &csq::cpu::csq_state_bwd_cpu);
}
