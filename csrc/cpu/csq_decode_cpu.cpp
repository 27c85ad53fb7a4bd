// CPU host of csq_decode_ (one in-place decoding step for serving): the shared host layer
// checks, then the launcher for the dtype (csq_decode_kernel.cpp). Allocates nothing.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../csq_host.h"
#include "csq_cpu_launch.h"

namespace csq {
namespace cpu {
namespace {

void csq_decode_cpu(at::Tensor& sums, at::Tensor& ref, const at::Tensor& q,
                    const at::Tensor& k, const at::Tensor& v, const at::Tensor& shift,
                    at::Tensor& y, double scale, bool center, bool normalize, double eps) {
  const DecodeParams p =
      prepare_decode(sums, ref, q, k, v, shift, y, scale, center, normalize, eps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "csq_decode_cpu",
                                  [&] { launch_decode<scalar_t, StateMap>(p); });
}

}  // namespace
}  // namespace cpu
}  // namespace csq

TORCH_LIBRARY_IMPL(csq_ext, CPU, m) { m.impl("csq_decode_", &csq::cpu::csq_decode_cpu); }
