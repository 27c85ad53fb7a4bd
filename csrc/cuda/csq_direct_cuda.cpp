// CUDA host of the direct path (csq_direct_fwd / csq_direct_bwd): the shared host layer
// prepares (../csq_direct_host.h: checks, params, every output), then the CUDA guards, the
// workspace and the launcher for the dtype on the current stream of q's device. The kernels are
// in csq_direct_*.cuh, launched by csq_direct_launch.cu; outputs and gradients follow the same
// contract as the CPU's, so the Python autograd wiring is shared.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../csq_direct_host.h"
#include "csq_cuda_host.h"
#include "csq_direct_launch.h"

namespace csq {
namespace {

// What the CUDA direct kernels support beyond the host layer's checks.
void check_direct_supported(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& shift) {
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda() && shift.is_cuda(),
              "csq_ext (CUDA, direct path): q, k, v and shift must be CUDA tensors");
  const int64_t dk = q.size(3), dv = v.size(3), maxd = cuda::kDirectMaxHeadDim;
  TORCH_CHECK(dk >= 1 && dk <= maxd && dv >= 1 && dv <= maxd,
              "csq_ext (CUDA, direct path): supports head sizes 1 <= Dk <= ", maxd,
              " and 1 <= Dv <= ", maxd, "; got Dk = ", dk, ", Dv = ", dv,
              ". Larger heads run on the CPU backend.");
  TORCH_CHECK(q.size(1) <= 65535, "csq_ext (CUDA, direct path): supports Hq <= 65535, got ",
              q.size(1));
}

void check_launch(const DirectFwdParams& p) {
  const cuda::Status st = cuda::check_direct_shapes(p);
  cuda_host::check_status(st, "direct path");
}

// The CUDA direct kernels do not carry states yet (the CPU's do): csq_ext.attention takes the
// chunked path on CUDA when a state is read or returned; a direct op call with one is refused.
void check_no_state(const CarriedState& cs, bool returns) {
  TORCH_CHECK(cs.state_in == nullptr && !returns,
              "csq_ext (CUDA, direct path): a carried or returned state runs on the chunked path "
              "on CUDA (path='chunked' or 'auto'); the CUDA direct kernels do not carry states "
              "yet");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> csq_direct_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& shift,
    const c10::optional<at::Tensor>& cu_seqlens, const c10::optional<at::Tensor>& state_in,
    const c10::optional<at::Tensor>& ref_in, bool causal, double scale, bool center,
    bool normalize, double eps, int64_t tile_size, bool return_state) {
  const c10::cuda::CUDAGuard guard(q.device());
  // The shared checks and outputs first (as on the CPU), then what the CUDA kernels support.
  DirectForwardCall call =
      prepare_direct_forward(q, k, v, shift, cu_seqlens, state_in, ref_in, causal, scale,
                             center, normalize, eps, tile_size, return_state);
  check_direct_supported(q, k, v, shift);
  check_no_state(call.p, return_state);
  call.p.tensor_core_passes = cuda_host::tensor_core_passes();
  check_launch(call.p);
  const cuda::DType dt = cuda_host::to_dtype(q.scalar_type());
  const size_t bytes = cuda::direct_fwd_workspace_bytes(call.p, dt);
  at::Tensor ws = cuda_host::workspace(q, bytes);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const cuda::Status st = CSQ_DTYPE_SWITCH(q.scalar_type(), DT, [&] {
    return cuda::launch_direct_fwd<DT>(call.p, ws.data_ptr(), bytes, stream);
  });
  cuda_host::check_status(st, "direct forward");
  return call.outputs();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
csq_direct_bwd_cuda(const at::Tensor& dy, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, const at::Tensor& shift,
                    const c10::optional<at::Tensor>& cu_seqlens,
                    const c10::optional<at::Tensor>& state_in, const at::Tensor& ref,
                    const at::Tensor& y, const at::Tensor& b, const at::Tensor& den,
                    const c10::optional<at::Tensor>& dstate_out,
                    const c10::optional<at::Tensor>& dref_out, bool ref_given, bool causal, double scale,
                    bool center, bool normalize, double eps, int64_t tile_size) {
  const c10::cuda::CUDAGuard guard(q.device());
  // Checks dy, y, b, den besides the inputs; allocates dq, dk, dv and db (every row written by
  // the kernels; the host layer sums db into the shift gradient, as on the CPU).
  DirectBackwardCall call =
      prepare_direct_backward(dy, q, k, v, shift, cu_seqlens, state_in, ref, y, b, den,
                              dstate_out, dref_out, ref_given, causal, scale, center, normalize, eps,
                              tile_size);
  check_direct_supported(q, k, v, shift);
  check_no_state(call.p, call.p.ref_in != nullptr);
  call.p.tensor_core_passes = cuda_host::tensor_core_passes();
  check_launch(call.p);
  const cuda::DType dt = cuda_host::to_dtype(q.scalar_type());
  const size_t bytes = cuda::direct_bwd_workspace_bytes(call.p, dt);
  at::Tensor ws = cuda_host::workspace(q, bytes);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const cuda::Status st = CSQ_DTYPE_SWITCH(q.scalar_type(), DT, [&] {
    return cuda::launch_direct_bwd<DT>(call.p, ws.data_ptr(), bytes, stream);
  });
  cuda_host::check_status(st, "direct backward");
  return call.outputs();
}

}  // namespace
}  // namespace csq

TORCH_LIBRARY_IMPL(csq_ext, CUDA, m) {
  m.impl("csq_direct_fwd", &csq::csq_direct_fwd_cuda);
  m.impl("csq_direct_bwd", &csq::csq_direct_bwd_cuda);
}
