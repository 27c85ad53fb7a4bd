// CUDA host of csq_decode_ (one in-place decoding step for serving): the shared host layer's
// checks, the guards, then the launcher for the dtype on the current stream of q's device. Allocates nothing: the state's sums and
// the caller's y are the only memory written (the kernels are in csq_decode.cuh).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../csq_host.h"
#include "csq_cuda_host.h"
#include "csq_launch.h"

namespace csq {
namespace {

void csq_decode_cuda(at::Tensor& sums, at::Tensor& ref, const at::Tensor& q,
                     const at::Tensor& k, const at::Tensor& v, const at::Tensor& shift,
                     at::Tensor& y, double scale, bool center, bool normalize, double eps) {
  const DecodeParams p =
      prepare_decode(sums, ref, q, k, v, shift, y, scale, center, normalize, eps);
  cuda_host::check_supported(q, k, v, shift);
  if (p.batch * p.heads_k == 0) return;
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const cuda::Status st = CSQ_DTYPE_SWITCH(q.scalar_type(), DT, [&] {
    return cuda::launch_decode<DT>(p, stream);
  });
  cuda_host::check_status(st, "decode_");
}

}  // namespace
}  // namespace csq

TORCH_LIBRARY_IMPL(csq_ext, CUDA, m) { m.impl("csq_decode_", &csq::csq_decode_cuda); }
