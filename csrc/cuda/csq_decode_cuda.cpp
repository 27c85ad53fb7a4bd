// CUDA host of csq_decode_ (one in-place decoding step for serving): checks, then the launcher
// for the dtype on the current stream of q's device. Allocates nothing: the state's sums and
// the caller's y are the only memory written (the kernels are in csq_decode.cuh).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../csq_host.h"
#include "csq_cuda_host.h"
#include "csq_launch.h"

namespace csq {
namespace {

void csq_decode_cuda(at::Tensor& sums, const at::Tensor& ref, const at::Tensor& q,
                     const at::Tensor& k, const at::Tensor& v, const at::Tensor& shift,
                     at::Tensor& y, double scale, bool center, bool normalize, double eps) {
  check_inputs(q, k, v, shift, eps, 0);
  cuda_host::check_supported(q, k, v, shift);
  TORCH_CHECK(q.size(2) == 1, "csq_ext.decode: q, k, v must hold one token (N = 1), got N = ",
              q.size(2));
  const auto acc = acc_dtype(q.scalar_type());
  TORCH_CHECK(shift.scalar_type() == acc && shift.is_contiguous(),
              "csq_ext.decode_: shift must be a contiguous ", acc, " tensor");
  AttnParams p = make_params(q, k, v, shift, true, scale, center, normalize, eps, 1);
  // Checks sums (S, Hk, F, Dv + 1) and ref (S, Hk, Dk): acc dtype, q's device, contiguous.
  const at::Tensor no_cu = set_sequence_params(p, q, c10::nullopt, sums, ref);
  TORCH_CHECK(y.sizes() == at::IntArrayRef({p.batch, p.heads_q, 1, p.dim_v}) &&
                  y.scalar_type() == q.scalar_type() && y.is_contiguous() &&
                  y.device() == q.device(),
              "csq_ext.decode_: out must be a contiguous (B, Hq, 1, Dv) tensor of q's dtype on ",
              q.device());
  p.y = y.data_ptr();
  if (p.batch * p.heads_k == 0) return;
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  const cuda::Status st = CSQ_DTYPE_SWITCH(q.scalar_type(), DT, [&] {
    return cuda::launch_decode<DT>(p, sums.data_ptr(), stream);
  });
  cuda_host::check_status(st, "decode_");
}

}  // namespace
}  // namespace csq

TORCH_LIBRARY_IMPL(csq_ext, CUDA, m) { m.impl("csq_decode_", &csq::csq_decode_cuda); }
