// CUDA host of csq_chunked_fwd: guards (what the CUDA kernels support, the device), the shared host
// layer's prepare step (checks, params, outputs), then the launcher for the dtype on the
// current stream of q's device (csq_chunked_fwd_launch.cu).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "../csq_host.h"
#include "csq_cuda_host.h"
#include "csq_launch.h"

namespace csq {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> csq_chunked_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& shift,
    const c10::optional<at::Tensor>& cu_seqlens, const c10::optional<at::Tensor>& state_in,
    const c10::optional<at::Tensor>& ref_in, bool causal, double scale, bool center,
    bool normalize, double eps, int64_t tile_size, bool return_state) {
  const c10::cuda::CUDAGuard guard(q.device());
  ForwardCall call = prepare_forward(q, k, v, shift, cu_seqlens, state_in, ref_in, causal, scale,
                                     center, normalize, eps, tile_size, return_state);
  cuda_host::check_supported(q, k, v, shift);
  cuda_host::run_forward(call.p, q, "forward");
  return call.outputs();
}

}  // namespace
}  // namespace csq

TORCH_LIBRARY_IMPL(csq_ext, CUDA, m) { m.impl("csq_chunked_fwd", &csq::csq_chunked_fwd_cuda); }
