// Host code of the direct path shared by every backend: checks, DirectParams from tensors, and
// the forward's outputs. The kernels live in csrc/cpu/csq_direct_*_cpu.cpp.
#pragma once

#include <ATen/ATen.h>

#include "csq_direct_params.h"

namespace csq {

// Checks the inputs (as for the chunked op), fills sizes, strides, pointers, scalars, packed
// sequences and the tile length (tile_size <= 0: the default). Returns the int64 copy of
// cu_seqlens that p points into (keep it alive while the kernel runs) through `cu`.
DirectParams make_direct_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& shift_acc,
                                const c10::optional<at::Tensor>& cu_seqlens, bool causal,
                                double scale, bool center, bool normalize, double eps,
                                int64_t tile_size, at::Tensor& cu);

// The forward's outputs in the accumulation dtype: y (B, Hq, N, Dv), b and den (B, Hq, N);
// points p at them.
struct DirectForwardTensors {
  at::Tensor y, b, den;
};
DirectForwardTensors alloc_direct_forward(DirectParams& p, const at::Tensor& q);

}  // namespace csq
