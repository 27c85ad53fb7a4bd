// The CUDA backend of every op: the shared entries (../csq_op_entries.h: the schema's
// arguments, the host layer's checks, params and outputs; outputs and gradients follow the
// CPU's contract, so the autograd of csrc/csq_autograd.cpp is shared) with the CUDA's run
// functions: the device guard, what the CUDA kernels support beyond the host layer's checks,
// the workspace, and the launcher for the dtype on the current stream of the inputs' device.
// The launchers are in csq_*_launch.cu (csq_launch.h, csq_direct_launch.h).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <type_traits>

#include "../csq_op_entries.h"
#include "csq_cuda_host.h"
#include "csq_direct_launch.h"
#include "csq_launch.h"

namespace csq {
namespace {

// A launcher template (cuda::launch_bwd, ...) as a value, for launch_with_workspace: a
// function template cannot be passed as an argument, a generic lambda can.
#define CSQ_CUDA_LAUNCHER(NAME)                                                        \
  [](const auto& p, auto dtype_constant, void* ws, size_t bytes, cudaStream_t stream) { \
    return cuda::NAME<decltype(dtype_constant)::value>(p, ws, bytes, stream);          \
  }

// launcher(p, DType constant, workspace, bytes, stream) for like's dtype on the current stream,
// with a workspace of `bytes`; `what` names the op in errors.
template <typename Params, typename Launcher>
void launch_with_workspace(const Params& p, const at::Tensor& like, size_t bytes,
                           const char* what, const Launcher& launcher) {
  at::Tensor ws = cuda_host::workspace(like, bytes);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const cuda::Status st = CSQ_DTYPE_SWITCH(like.scalar_type(), DT, [&] {
    return launcher(p, std::integral_constant<cuda::DType, DT>{}, ws.data_ptr(), bytes, stream);
  });
  cuda_host::check_status(st, what);
}

// The chunked kernels' backward and the state ops: the guard, the CUDA checks (the packed
// batch's grid included), the tensor-core switch, then the launcher with a workspace of
// workspace_bytes(p, dtype), also with no token (B Hq N == 0: the backward's launcher then
// only zeroes the gradients and passes dstate_out through to dstate_in).
template <typename Params, typename BytesParams, typename Launcher>
void run_chunked(Params& p, const OpInputs& in,
                 size_t (*workspace_bytes)(const BytesParams&, cuda::DType), const char* what,
                 const Launcher& launcher) {
  const c10::cuda::CUDAGuard guard(in.q.device());
  cuda_host::check_supported(in.q, in.k, in.v, in.shift);
  cuda_host::check_packed(p);
  p.tensor_core_passes = cuda_host::tensor_core_passes();
  const size_t bytes = workspace_bytes(p, cuda_host::to_dtype(in.q.scalar_type()));
  launch_with_workspace(p, in.q, bytes, what, launcher);
}

// What the CUDA direct kernels support beyond the host layer's checks.
void check_direct_supported(const OpInputs& in) {
  TORCH_CHECK(in.q.is_cuda() && in.k.is_cuda() && in.v.is_cuda() && in.shift.is_cuda(),
              "csq_ext (CUDA, direct path): q, k, v and shift must be CUDA tensors");
  const int64_t dk = in.q.size(3), dv = in.v.size(3), maxd = cuda::kDirectMaxHeadDim;
  TORCH_CHECK(dk >= 1 && dk <= maxd && dv >= 1 && dv <= maxd,
              "csq_ext (CUDA, direct path): supports head sizes 1 <= Dk <= ", maxd,
              " and 1 <= Dv <= ", maxd, "; got Dk = ", dk, ", Dv = ", dv,
              ". Larger heads run on the CPU backend.");
  TORCH_CHECK(in.q.size(1) <= 65535, "csq_ext (CUDA, direct path): supports Hq <= 65535, got ",
              in.q.size(1));
}

// Both directions of the direct path: the guard, the CUDA checks, the tensor-core switch, the
// launch shapes, then the launcher with a workspace of workspace_bytes(p, dtype).
// The CUDA direct kernels do not carry states yet (the CPU's do): csq_ext.attention takes the
// chunked path on CUDA when a state is read or returned (with_state); a direct op call with
// one is refused.
template <typename Params, typename Launcher>
bool run_direct(Params& p, const OpInputs& in, bool with_state,
                size_t (*workspace_bytes)(const DirectFwdParams&, cuda::DType), const char* what,
                const Launcher& launcher) {
  const c10::cuda::CUDAGuard guard(in.q.device());
  check_direct_supported(in);
  TORCH_CHECK(!with_state,
              "csq_ext (CUDA, direct path): a carried or returned state runs on the chunked path "
              "on CUDA (path='chunked' or 'auto'); the CUDA direct kernels do not carry states "
              "yet");
  p.tensor_core_passes = cuda_host::tensor_core_passes();
  cuda_host::check_status(cuda::check_direct_shapes(p), "direct path");
  const size_t bytes = workspace_bytes(p, cuda_host::to_dtype(in.q.scalar_type()));
  launch_with_workspace(p, in.q, bytes, what, launcher);
  return true;
}

// The CUDA run functions of the entries (register_backend).
struct CudaRuns {
  static bool chunked_forward(ForwardCall& call, const OpInputs& in, bool /*return_state*/) {
    const c10::cuda::CUDAGuard guard(in.q.device());
    cuda_host::check_supported(in.q, in.k, in.v, in.shift);
    cuda_host::run_forward(call.p, in.q, "forward");
    return true;  // the CUDA kernels do not check the float32 state's conditioning
  }

  static bool chunked_backward(BackwardCall& call, const OpInputs& in) {
    run_chunked(call.p, in, &cuda::bwd_workspace_bytes, "backward", CSQ_CUDA_LAUNCHER(launch_bwd));
    return true;
  }

  static void state(StateCall& call, const OpInputs& in) {
    run_chunked(call.p, in, &cuda::state_workspace_bytes, "state", CSQ_CUDA_LAUNCHER(launch_state));
  }

  static void state_backward(StateBackwardCall& call, const OpInputs& in) {
    run_chunked(call.p, in, &cuda::state_workspace_bytes, "state backward",
                CSQ_CUDA_LAUNCHER(launch_state_bwd));
  }

  static bool direct_forward(DirectForwardCall& call, const OpInputs& in, bool return_state) {
    return run_direct(call.p, in, call.p.state_in != nullptr || return_state,
                      &cuda::direct_fwd_workspace_bytes, "direct forward",
                      CSQ_CUDA_LAUNCHER(launch_direct_fwd));
  }

  // The backward's ref is the forward's, given only when the forward read or returned a state.
  static bool direct_backward(DirectBackwardCall& call, const OpInputs& in) {
    return run_direct(call.p, in, call.p.state_in != nullptr || call.p.ref_in != nullptr,
                      &cuda::direct_bwd_workspace_bytes, "direct backward",
                      CSQ_CUDA_LAUNCHER(launch_direct_bwd));
  }

  // csq_decode_ and csq_pool_decode_: allocates nothing (the state's sums and the caller's y
  // are the only memory written; the kernels are in csq_decode.cuh).
  static void decode(const DecodeParams& p, const OpInputs& in, const char* what) {
    cuda_host::check_supported(in.q, in.k, in.v, in.shift);
    if (p.batch * p.heads_k == 0) return;
    const c10::cuda::CUDAGuard guard(in.q.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    const cuda::Status st = CSQ_DTYPE_SWITCH(in.q.scalar_type(), DT, [&] {
      return cuda::launch_decode<DT>(p, stream);
    });
    cuda_host::check_status(st, what);
  }

  // The pool's prefill is the chunked forward over the pool's slots (StatePool); the forward's
  // launcher zeroes the fresh slots first (csq_pool.cuh).
  static void pool_prefill(PoolPrefillCall& call, const OpInputs& in) {
    const c10::cuda::CUDAGuard guard(in.q.device());
    cuda_host::check_supported(in.q, in.k, in.v, in.shift);
    if (!call.empty) cuda_host::run_forward(call.p, in.q, "pool prefill");
  }
};

}  // namespace
}  // namespace csq

TORCH_LIBRARY_IMPL(csq_ext, CUDA, m) { csq::register_backend<csq::CudaRuns>(m); }
