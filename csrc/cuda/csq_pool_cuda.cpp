// CUDA host of the state-pool ops (csq_pool_prefill_, csq_pool_decode_): the pool host layer
// checks (csq_pool_host.h), the CUDA guards, then the forward's and the decode step's
// launchers on the current stream of q's device; they reach each sequence's slot of the pool
// through the params (StatePool) and zero the fresh ones first (csq_pool.cuh).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../csq_pool_host.h"
#include "csq_cuda_host.h"
#include "csq_launch.h"

namespace csq {
namespace {

at::Tensor csq_pool_prefill_cuda(at::Tensor& sums, at::Tensor& ref, const at::Tensor& slots,
                                 const c10::optional<at::Tensor>& has_initial_state,
                                 const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& shift, const at::Tensor& cu_seqlens,
                                 double scale, bool center, bool normalize, double eps,
                                 int64_t tile_size) {
  const c10::cuda::CUDAGuard guard(q.device());
  PoolPrefillCall call = prepare_pool_prefill(sums, ref, slots, has_initial_state, q, k, v,
                                              shift, cu_seqlens, scale, center, normalize, eps,
                                              tile_size);
  cuda_host::check_supported(q, k, v, shift);
  if (call.empty) {
    call.run_empty(sums, ref);
    return call.y.to(q.scalar_type());
  }
  cuda_host::run_forward(call.p, q, "pool prefill");
  return call.y.to(q.scalar_type());
}

void csq_pool_decode_cuda(at::Tensor& sums, at::Tensor& ref, const at::Tensor& slots,
                          const c10::optional<at::Tensor>& has_initial_state,
                          const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& shift, at::Tensor& y, double scale, bool center,
                          bool normalize, double eps) {
  const c10::cuda::CUDAGuard guard(q.device());
  const PoolDecodeCall call = prepare_pool_decode(sums, ref, slots, has_initial_state, q, k, v,
                                                  shift, y, scale, center, normalize, eps);
  cuda_host::check_supported(q, k, v, shift);
  if (call.p.batch * call.p.heads_k == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const cuda::Status st = CSQ_DTYPE_SWITCH(q.scalar_type(), DT, [&] {
    return cuda::launch_decode<DT>(call.p, stream);
  });
  cuda_host::check_status(st, "pool decode");
}

}  // namespace
}  // namespace csq

TORCH_LIBRARY_IMPL(csq_ext, CUDA, m) {
  m.impl("csq_pool_prefill_", &csq::csq_pool_prefill_cuda);
  m.impl("csq_pool_decode_", &csq::csq_pool_decode_cuda);
}
