// CUDA backward of csq_fwd (the csq_bwd op): checks, allocates, picks the launcher for the
// dtype, on the current stream of q's device. Gradients accumulate in the accumulation dtype
// (float64 for float64 inputs, else float32) and are converted to the input dtype at the end.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
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
  const bool has_dstate = dstate_out.has_value() && dstate_out->defined() &&
                          dstate_out->numel() > 0;
  cuda_host::check_no_state(state_in, has_dstate);
  const auto acc = acc_dtype(q.scalar_type());
  const int64_t B = q.size(0), Hq = q.size(1), N = q.size(2);
  const c10::cuda::CUDAGuard guard(q.device());

  // With no carried state, ref only re-centres the keys, which centered CSQ does not see (and
  // is 0 without centering): its gradient is zero. No state gradient either.
  at::Tensor dstate_in = at::empty({0}, q.options().dtype(acc));
  at::Tensor dref = at::zeros(ref.sizes(), ref.options());

  // q, k, v, dy are read through their strides. The gradients are allocated in the
  // accumulation dtype, contiguous.
  const at::Tensor shift_acc = shift.to(acc).contiguous();
  AttnParams p = make_params(q, k, v, shift_acc, causal, scale, center, normalize, eps,
                             chunk_size);
  // Packed sequences: checks cu_seqlens, points p at a device copy (kept alive here); dshift
  // is then allocated per sequence (S, Hq) by set_backward_params.
  const at::Tensor cu = set_sequence_params(p, q, cu_seqlens, c10::nullopt, c10::nullopt);
  cuda_host::check_packed(p);
  const BackwardTensors t = set_backward_params(p, q, k, v, dy, y, bq, den);

  if (B * Hq * N > 0) {  // nothing to launch for an empty sequence: the gradients are zero
    const cuda::DType dt = cuda_host::to_dtype(q.scalar_type());
    const size_t bytes = cuda::bwd_workspace_bytes(p, dt);
    at::Tensor ws = cuda_host::workspace(q, bytes);
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
    const cuda::Status st = CSQ_DTYPE_SWITCH(q.scalar_type(), DT, [&] {
      return cuda::launch_bwd<DT>(p, ws.data_ptr(), bytes, stream);
    });
    cuda_host::check_status(st, "backward");
  }
  return {t.dq.to(q.scalar_type()), t.dk.to(q.scalar_type()), t.dv.to(q.scalar_type()),
          t.dshift.sum(0).to(shift.scalar_type()), dstate_in, dref};
}

}  // namespace
}  // namespace csq

TORCH_LIBRARY_IMPL(csq_ext, CUDA, m) { m.impl("csq_bwd", &csq::csq_bwd_cuda); }
