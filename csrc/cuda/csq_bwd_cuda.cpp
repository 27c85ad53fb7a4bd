// CUDA backward of csq_fwd (the csq_bwd op): checks, allocates, picks the launcher for the
// dtype, on the current stream of q's device. Gradients accumulate in the accumulation dtype
// (float64 for float64 inputs, else float32) and are converted to the input dtype at the end.
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> csq_bwd_cuda(
    const at::Tensor& dy, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& shift, const c10::optional<at::Tensor>& cu_seqlens,
    const c10::optional<at::Tensor>& state_in, const at::Tensor& ref, const at::Tensor& y,
    const at::Tensor& bq, const at::Tensor& den, const c10::optional<at::Tensor>& dstate_out,
    bool causal, double scale, bool center, bool normalize, double eps, int64_t chunk_size) {
  check_inputs(q, k, v, shift, eps, chunk_size);
  cuda_host::check_supported(q, k, v, shift);
  const auto acc = acc_dtype(q.scalar_type());
  const auto opts = q.options().dtype(acc);
  const c10::cuda::CUDAGuard guard(q.device());

  // q, k, v, dy are read through their strides. The gradients are allocated in the
  // accumulation dtype, contiguous.
  const at::Tensor shift_acc = shift.to(acc).contiguous();
  AttnParams p = make_params(q, k, v, shift_acc, causal, scale, center, normalize, eps,
                             chunk_size);
  // Packed sequences: checks cu_seqlens, points p at a device copy (kept alive here); dshift
  // is then allocated per sequence (S, Hq) by set_backward_params. ref is the forward's (the
  // kernels read it instead of recomputing it); state_in the carried state, if any.
  const at::Tensor ref_c = ref.contiguous();
  const at::Tensor cu = set_sequence_params(p, q, cu_seqlens, state_in, ref_c);
  cuda_host::check_packed(p);
  p.tensor_core_passes = cuda_host::tensor_core_passes();
  const bool carried = p.state_in != nullptr;
  const at::Tensor dstate_c = set_dstate_out(p, dstate_out, acc);
  const BackwardTensors t = set_backward_params(p, q, k, v, dy, y, bq, den);

  // The kernels write dref always (r reaches a returned state's sums, and through the Python
  // backward the keys that r was picked from) and dstate_in with a carried state (zeroing both
  // first).
  at::Tensor dstate_in = carried ? at::empty(state_shape(p), opts) : at::empty({0}, opts);
  at::Tensor dref = at::empty(ref_c.sizes(), opts);
  p.dstate_in = carried ? dstate_in.data_ptr() : nullptr;
  p.dref = dref.data_ptr();

  // Also with no token (B Hq N == 0): the launcher then only zeroes the gradients and passes
  // dstate_out through to dstate_in.
  const cuda::DType dt = cuda_host::to_dtype(q.scalar_type());
  const size_t bytes = cuda::bwd_workspace_bytes(p, dt);
  at::Tensor ws = cuda_host::workspace(q, bytes);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const cuda::Status st = CSQ_DTYPE_SWITCH(q.scalar_type(), DT, [&] {
    return cuda::launch_bwd<DT>(p, ws.data_ptr(), bytes, stream);
  });
  cuda_host::check_status(st, "backward");
  return {t.dq.to(q.scalar_type()), t.dk.to(q.scalar_type()), t.dv.to(q.scalar_type()),
          t.dshift.sum(0).to(shift.scalar_type()), dstate_in, dref};
}

}  // namespace
}  // namespace csq

TORCH_LIBRARY_IMPL(csq_ext, CUDA, m) { m.impl("csq_bwd", &csq::csq_bwd_cuda); }
