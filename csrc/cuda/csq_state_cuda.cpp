// CUDA host of the state-only op (csq_state / csq_state_bwd): the shared host layer prepares
// (../csq_state_host.h: checks, params, every output), then the CUDA guards, the workspace and
// the launcher for the dtype on the current stream of k's device (csq_state_launch.cu).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>

#include "../csq_state_host.h"
#include "csq_cuda_host.h"
#include "csq_launch.h"

namespace csq {
namespace {

// What both entries do after the host layer: the CUDA checks, the workspace and the launcher
// for k's dtype on the current stream, run(DType constant, workspace, bytes, stream).
template <typename P, typename Run>
void launch_on_stream(const at::Tensor& k, const at::Tensor& v, P& p, const char* what,
                      const Run& run) {
  cuda_host::check_supported(k, k, v, k);  // no queries, no shift: k stands in
  cuda_host::check_packed(p);
  p.tensor_core_passes = cuda_host::tensor_core_passes();
  const size_t bytes = cuda::state_workspace_bytes(p, cuda_host::to_dtype(k.scalar_type()));
  at::Tensor ws = cuda_host::workspace(k, bytes);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const cuda::Status st = CSQ_DTYPE_SWITCH(k.scalar_type(), DT, [&] {
    return run(std::integral_constant<cuda::DType, DT>{}, ws.data_ptr(), bytes, stream);
  });
  cuda_host::check_status(st, what);
}

std::tuple<at::Tensor, at::Tensor> csq_state_cuda(const at::Tensor& k, const at::Tensor& v,
                                                  const c10::optional<at::Tensor>& cu_seqlens,
                                                  const c10::optional<at::Tensor>& state_in,
                                                  const c10::optional<at::Tensor>& ref_in,
                                                  int64_t tile_size) {
  const c10::cuda::CUDAGuard guard(k.device());
  StateCall call = prepare_state(k, v, cu_seqlens, state_in, ref_in, tile_size);
  launch_on_stream(k, v, call.p, "state", [&](auto dt, void* ws, size_t bytes, cudaStream_t s) {
    return cuda::launch_state<decltype(dt)::value>(call.p, ws, bytes, s);
  });
  return call.outputs();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> csq_state_bwd_cuda(
    const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& cu_seqlens,
    const c10::optional<at::Tensor>& state_in, const at::Tensor& ref,
    const c10::optional<at::Tensor>& dstate_out, const c10::optional<at::Tensor>& dref_out,
    bool ref_given, int64_t tile_size) {
  const c10::cuda::CUDAGuard guard(k.device());
  StateBackwardCall call = prepare_state_backward(k, v, cu_seqlens, state_in, ref, dstate_out,
                                                  dref_out, ref_given, tile_size);
  launch_on_stream(k, v, call.p, "state backward",
                   [&](auto dt, void* ws, size_t bytes, cudaStream_t s) {
                     return cuda::launch_state_bwd<decltype(dt)::value>(call.p, ws, bytes, s);
                   });
  return call.outputs();
}

}  // namespace
}  // namespace csq

TORCH_LIBRARY_IMPL(csq_ext, CUDA, m) {
  m.impl("csq_state", &csq::csq_state_cuda);
  m.impl("csq_state_bwd", &csq::csq_state_bwd_cuda);
}
