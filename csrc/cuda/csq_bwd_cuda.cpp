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
  cuda_host::check_no_streaming(cu_seqlens, state_in, has_dstate);
  const auto acc = acc_dtype(q.scalar_type());
  const int64_t B = q.size(0), Hq = q.size(1), N = q.size(2), Dv = v.size(3);
  TORCH_CHECK(dy.sizes() == at::IntArrayRef({B, Hq, N, Dv}) &&
                  dy.scalar_type() == acc && dy.device() == q.device(),
              "csq_bwd: dy must have shape (B, Hq, N, Dv) = ", at::IntArrayRef({B, Hq, N, Dv}),
              ", the accumulation dtype of y and the device of q; got ", dy.sizes(), " ",
              dy.scalar_type());
  TORCH_CHECK(y.sizes() == dy.sizes() && y.scalar_type() == acc &&
                  y.device() == q.device(),
              "csq_bwd: y must be the forward's output, of shape (B, Hq, N, Dv)");
  TORCH_CHECK(bq.sizes() == at::IntArrayRef({B, Hq, N}) && den.sizes() == bq.sizes() &&
                  bq.scalar_type() == acc && den.scalar_type() == acc &&
                  bq.device() == q.device() && den.device() == q.device(),
              "csq_bwd: b and den must be the forward's auxiliary outputs, of shape (B, Hq, N) "
              "and dtype ", acc);
  const c10::cuda::CUDAGuard guard(q.device());

  // With no carried state, ref only re-centres the keys, which centered CSQ does not see (and
  // is 0 without centering): its gradient is zero. No state gradient either.
  at::Tensor dstate_in = at::empty({0}, q.options().dtype(acc));
  at::Tensor dref = at::zeros(ref.sizes(), ref.options());
  if (B * Hq * N == 0)
    return {at::zeros(q.sizes(), q.options()), at::zeros(k.sizes(), k.options()),
            at::zeros(v.sizes(), v.options()), at::zeros({Hq}, shift.options()), dstate_in,
            dref};

  // Outputs in the accumulation dtype, contiguous; the launcher zeroes them.
  const auto acc_opts = q.options().dtype(acc);
  at::Tensor dq = at::empty(q.sizes(), acc_opts), dk = at::empty(k.sizes(), acc_opts),
             dv = at::empty(v.sizes(), acc_opts), db = at::empty({B, Hq, N}, acc_opts),
             dshift = at::empty({B, Hq}, acc_opts);

  // q, k, v, dy are read through their strides. y, b, den are the forward's outputs, which
  // are contiguous: .contiguous() is then free, and makes direct op calls with views safe.
  const at::Tensor shift_acc = shift.to(acc).contiguous();
  const at::Tensor y_c = y.contiguous(), b_c = bq.contiguous(), den_c = den.contiguous();
  AttnParams p = make_params(q, k, v, shift_acc, causal, scale, center, normalize, eps,
                             chunk_size);
  for (int i = 0; i < 4; ++i) p.dy_stride[i] = dy.stride(i);
  p.dy = dy.data_ptr();
  p.y = y_c.data_ptr();
  p.b = b_c.data_ptr();
  p.den = den_c.data_ptr();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.db = db.data_ptr();
  p.dshift = dshift.data_ptr();

  const cuda::DType dt = cuda_host::to_dtype(q.scalar_type());
  const size_t bytes = cuda::bwd_workspace_bytes(p, dt);
  at::Tensor ws = cuda_host::workspace(q, bytes);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  const cuda::Status st = CSQ_DTYPE_SWITCH(q.scalar_type(), DT, [&] {
    return cuda::launch_bwd<DT>(p, ws.data_ptr(), bytes, stream);
  });
  cuda_host::check_status(st, "backward");
  return {dq.to(q.scalar_type()), dk.to(q.scalar_type()), dv.to(q.scalar_type()),
          dshift.sum(0).to(shift.scalar_type()), dstate_in, dref};
}

}  // namespace
}  // namespace csq

TORCH_LIBRARY_IMPL(csq_ext, CUDA, m) { m.impl("csq_bwd", &csq::csq_bwd_cuda); }
