// CUDA forward of csq_fwd: checks, allocates, picks the launcher for the dtype, on the current
// stream of q's device. The kernels are in csq_*.cuh, launched by csq_fwd_launch.cu.
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> csq_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& shift,
    const c10::optional<at::Tensor>& cu_seqlens, const c10::optional<at::Tensor>& state_in,
    const c10::optional<at::Tensor>& ref_in, bool causal, double scale, bool center,
    bool normalize, double eps, int64_t chunk_size, bool return_state) {
  check_inputs(q, k, v, shift, eps, chunk_size);
  cuda_host::check_supported(q, k, v, shift);
  TORCH_CHECK(causal || !return_state, "csq_ext: return_state needs causal=True");
  const c10::cuda::CUDAGuard guard(q.device());

  const auto acc = acc_dtype(q.scalar_type());
  const int64_t B = q.size(0), Hq = q.size(1), N = q.size(2), Dv = v.size(3);
  // q, k, v are read through their strides; shift is tiny and converted here.
  const at::Tensor shift_acc = shift.to(acc).contiguous();
  AttnParams p = make_params(q, k, v, shift_acc, causal, scale, center, normalize, eps,
                             chunk_size);
  // Packed sequences: checks cu_seqlens, points p at a device copy (kept alive here). A
  // carried state (causal only): checks its sums and ref (shape, dtype, device).
  const at::Tensor cu = set_sequence_params(p, q, cu_seqlens, state_in, ref_in);
  cuda_host::check_packed(p);
  p.tensor_core_passes = cuda_host::tensor_core_passes();

  // y in the accumulation dtype: the public function rounds it, the backward reads it exact.
  const auto opts = q.options().dtype(acc);
  at::Tensor y = at::empty({B, Hq, N, Dv}, opts);
  at::Tensor bq = at::empty({B, Hq, N}, opts);
  at::Tensor den = at::empty({B, Hq, N}, opts);
  at::Tensor state_out = return_state ? at::empty(state_shape(p), opts) : at::empty({0}, opts);
  at::Tensor ref_out = at::empty({p.num_seqs, k.size(1), q.size(3)}, opts);

  p.y = y.data_ptr();
  p.b = bq.data_ptr();
  p.den = den.data_ptr();
  p.ref_out = ref_out.data_ptr();
  p.state_out = return_state ? state_out.data_ptr() : nullptr;

  const cuda::DType dt = cuda_host::to_dtype(q.scalar_type());
  const size_t bytes = cuda::fwd_workspace_bytes(p, dt);
  at::Tensor ws = cuda_host::workspace(q, bytes);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const cuda::Status st = CSQ_DTYPE_SWITCH(q.scalar_type(), DT, [&] {
    return cuda::launch_fwd<DT>(p, ws.data_ptr(), bytes, stream);
  });
  cuda_host::check_status(st, "forward");
  return {y, bq, den, state_out, ref_out};
}

}  // namespace
}  // namespace csq

TORCH_LIBRARY_IMPL(csq_ext, CUDA, m) { m.impl("csq_fwd", &csq::csq_fwd_cuda); }
