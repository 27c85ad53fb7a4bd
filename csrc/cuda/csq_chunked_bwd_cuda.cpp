// CUDA host of csq_chunked_bwd: guards (what the CUDA kernels support, the device), the shared
// host layer's prepare step (checks, params, zeroed gradients), the launcher for the dtype on the
// current stream of q's device (csq_chunked_bwd_launch.cu), then the host layer's outputs.
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
csq_chunked_bwd_cuda(
    const at::Tensor& dy, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& shift, const c10::optional<at::Tensor>& cu_seqlens,
    const c10::optional<at::Tensor>& state_in, const at::Tensor& ref, const at::Tensor& y,
    const at::Tensor& b, const at::Tensor& den, const c10::optional<at::Tensor>& dstate_out,
    const c10::optional<at::Tensor>& dref_out, bool ref_given, bool causal, double scale, bool center,
    bool normalize, double eps, int64_t tile_size) {
  const c10::cuda::CUDAGuard guard(q.device());
  BackwardCall call = prepare_backward(dy, q, k, v, shift, cu_seqlens, state_in, ref, y, b, den,
                                       dstate_out, dref_out, ref_given, causal, scale, center, normalize,
                                       eps, tile_size);
  cuda_host::check_supported(q, k, v, shift);
  cuda_host::check_packed(call.p);
  call.p.tensor_core_passes = cuda_host::tensor_core_passes();

  // Also with no token (B Hq N == 0): the launcher then only zeroes the gradients and passes
  // dstate_out through to dstate_in.
  const cuda::DType dt = cuda_host::to_dtype(q.scalar_type());
  const size_t bytes = cuda::bwd_workspace_bytes(call.p, dt);
  at::Tensor ws = cuda_host::workspace(q, bytes);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const cuda::Status st = CSQ_DTYPE_SWITCH(q.scalar_type(), DT, [&] {
    return cuda::launch_bwd<DT>(call.p, ws.data_ptr(), bytes, stream);
  });
  cuda_host::check_status(st, "backward");
  return call.outputs();
}

}  // namespace
}  // namespace csq

TORCH_LIBRARY_IMPL(csq_ext, CUDA, m) { m.impl("csq_chunked_bwd", &csq::csq_chunked_bwd_cuda); }
