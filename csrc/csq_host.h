// Host-side helpers shared by every backend's host file: input checks and the one function
// that fills AttnParams from tensors.
#pragma once

#include <ATen/ATen.h>

#include "csq_params.h"

namespace csq {

// float64 inputs accumulate in float64; everything else in float32.
at::ScalarType acc_dtype(at::ScalarType input);

// Checks what the op itself relies on. The public Python entry checks first with friendlier
// messages; these checks guard direct torch.ops calls.
void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& shift, double eps, int64_t chunk_size);

// Chunk length used when the caller passes chunk_size <= 0.
int64_t default_chunk(int64_t dim_k, bool on_cuda);

// Fills sizes, strides, input pointers and scalars. Output pointers are left to the caller.
AttnParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& shift_acc, bool causal, double scale, bool center,
                       bool normalize, double eps, int64_t chunk_size);

}  // namespace csq
