// CPU host of csq_direct_bwd: the shared host layer prepares (checks, params, zeroed
// gradients), then the launcher for the dtype (csq_direct_bwd_kernel.cpp), then the host
// layer's outputs (dshift from db, as for csq_chunked_bwd).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../csq_direct_host.h"
#include "csq_cpu_launch.h"

namespace csq {
namespace cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
csq_direct_bwd_cpu(const at::Tensor& dy, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& shift,
                   const c10::optional<at::Tensor>& cu_seqlens,
                   const c10::optional<at::Tensor>& state_in, const at::Tensor& ref,
                   const at::Tensor& y, const at::Tensor& b, const at::Tensor& den,
                   const c10::optional<at::Tensor>& dstate_out,
                   const c10::optional<at::Tensor>& dref_out, bool ref_given, bool causal, double scale,
                   bool center, bool normalize, double eps, int64_t tile_size) {
  const DirectBackwardCall call =
      prepare_direct_backward(dy, q, k, v, shift, cu_seqlens, state_in, ref, y, b, den,
                              dstate_out, dref_out, ref_given, causal, scale, center, normalize, eps,
                              tile_size);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "csq_direct_bwd",
                                  [&] { launch_direct_bwd<scalar_t, StateMap>(call.p); });
  return call.outputs();
}

}  // namespace
}  // namespace cpu
}  // namespace csq

TORCH_LIBRARY_IMPL(csq_ext, CPU, m) { m.impl("csq_direct_bwd", &csq::cpu::csq_direct_bwd_cpu); }
