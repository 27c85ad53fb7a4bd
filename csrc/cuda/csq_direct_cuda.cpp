// CUDA host code of the direct path (csq_direct_fwd / csq_direct_bwd): checks, allocates,
// picks the launcher for the dtype, on the current stream of q's device. The kernels are in
// csq_direct_*.cuh, launched by csq_direct_launch.cu. Outputs and gradients are those of the
// CPU kernels (csrc/cpu/csq_direct_*_cpu.cpp), so the Python autograd wiring is shared.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../csq_direct_host.h"
#include "../csq_host.h"
#include "csq_cuda_host.h"
#include "csq_direct_launch.h"

namespace csq {
namespace {

// What the CUDA direct kernels support beyond make_direct_params' checks.
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

void check_launch(const DirectParams& p) {
  const cuda::Status st = cuda::check_direct_shapes(p);
  cuda_host::check_status(st, "direct path");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> csq_direct_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& shift,
    const c10::optional<at::Tensor>& cu_seqlens, bool causal, double scale, bool center,
    bool normalize, double eps, int64_t tile_size) {
  const at::Tensor shift_acc = shift.to(acc_dtype(q.scalar_type())).contiguous();
  at::Tensor cu;  // the device copy of cu_seqlens that p points into
  // Checks the inputs first (shapes, dtypes, one device), then what the CUDA kernels support.
  DirectParams p = make_direct_params(q, k, v, shift_acc, cu_seqlens, causal, scale, center,
                                      normalize, eps, tile_size, cu);
  check_direct_supported(q, k, v, shift);
  const c10::cuda::CUDAGuard guard(q.device());
  p.tensor_core_passes = cuda_host::tensor_core_passes();
  check_launch(p);
  const DirectForwardTensors out = alloc_direct_forward(p, q);
  const cuda::DType dt = cuda_host::to_dtype(q.scalar_type());
  const size_t bytes = cuda::direct_fwd_workspace_bytes(p, dt);
  at::Tensor ws = cuda_host::workspace(q, bytes);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const cuda::Status st = CSQ_DTYPE_SWITCH(q.scalar_type(), DT, [&] {
    return cuda::launch_direct_fwd<DT>(p, ws.data_ptr(), bytes, stream);
  });
  cuda_host::check_status(st, "direct forward");
  return {out.y, out.b, out.den};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> csq_direct_bwd_cuda(
    const at::Tensor& dy, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& shift, const c10::optional<at::Tensor>& cu_seqlens, const at::Tensor& y,
    const at::Tensor& b, const at::Tensor& den, bool causal, double scale, bool center,
    bool normalize, double eps, int64_t tile_size) {
  const at::Tensor shift_acc = shift.to(acc_dtype(q.scalar_type())).contiguous();
  at::Tensor cu;
  DirectParams p = make_direct_params(q, k, v, shift_acc, cu_seqlens, causal, scale, center,
                                      normalize, eps, tile_size, cu);
  check_direct_supported(q, k, v, shift);
  const c10::cuda::CUDAGuard guard(q.device());
  p.tensor_core_passes = cuda_host::tensor_core_passes();
  check_launch(p);
  // Checks dy, y, b, den; allocates dq, dk, dv, db (and a dshift the direct path leaves
  // unused: the shift gradient is the sum of db, as on the CPU).
  const BackwardTensors t = set_backward_params(p, q, k, v, dy, y, b, den);
  const cuda::DType dt = cuda_host::to_dtype(q.scalar_type());
  const size_t bytes = cuda::direct_bwd_workspace_bytes(p, dt);
  at::Tensor ws = cuda_host::workspace(q, bytes);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const cuda::Status st = CSQ_DTYPE_SWITCH(q.scalar_type(), DT, [&] {
    return cuda::launch_direct_bwd<DT>(p, ws.data_ptr(), bytes, stream);
  });
  cuda_host::check_status(st, "direct backward");
  return {t.dq.to(q.scalar_type()), t.dk.to(q.scalar_type()), t.dv.to(q.scalar_type()),
          t.db.sum(at::IntArrayRef{0, 2}).to(shift.scalar_type())};
}

}  // namespace
}  // namespace csq

TORCH_LIBRARY_IMPL(csq_ext, CUDA, m) {
  m.impl("csq_direct_fwd", &csq::csq_direct_fwd_cuda);
  m.impl("csq_direct_bwd", &csq::csq_direct_bwd_cuda);
}
