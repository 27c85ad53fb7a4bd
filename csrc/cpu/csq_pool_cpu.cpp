// CPU host of the state-pool ops (csq_pool_prefill_, csq_pool_decode_): the pool host layer
// checks (csq_pool_host.h), then the chunked forward's and the decode step's launchers, which
// read and write each sequence's slot of the pool through the params (StatePool).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../csq_pool_host.h"
#include "csq_cpu_launch.h"

namespace csq {
namespace cpu {
namespace {

at::Tensor csq_pool_prefill_cpu(at::Tensor& sums, at::Tensor& ref, const at::Tensor& slots,
                                const c10::optional<at::Tensor>& has_initial_state,
                                const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& shift, const at::Tensor& cu_seqlens,
                                double scale, bool center, bool normalize, double eps,
                                int64_t tile_size) {
  const PoolPrefillCall call =
      prepare_pool_prefill(sums, ref, slots, has_initial_state, q, k, v, shift, cu_seqlens,
                           scale, center, normalize, eps, tile_size);
  if (call.empty) {
    call.run_empty(sums, ref);
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(),
                                    "csq_pool_prefill_cpu",
                                    [&] { launch_fwd<scalar_t, StateMap>(call.p); });
  }
  return call.y.to(q.scalar_type());
}

void csq_pool_decode_cpu(at::Tensor& sums, at::Tensor& ref, const at::Tensor& slots,
                         const c10::optional<at::Tensor>& has_initial_state, const at::Tensor& q,
                         const at::Tensor& k, const at::Tensor& v, const at::Tensor& shift,
                         at::Tensor& y, double scale, bool center, bool normalize, double eps) {
  const PoolDecodeCall call = prepare_pool_decode(sums, ref, slots, has_initial_state, q, k, v,
                                                  shift, y, scale, center, normalize, eps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(),
                                  "csq_pool_decode_cpu",
                                  [&] { launch_decode<scalar_t, StateMap>(call.p); });
}

}  // namespace
}  // namespace cpu
}  // namespace csq

TORCH_LIBRARY_IMPL(csq_ext, CPU, m) {
  m.impl("csq_pool_prefill_", &csq::cpu::csq_pool_prefill_cpu);
  m.impl("csq_pool_decode_", &csq::cpu::csq_pool_decode_cpu);
}
