// Host-side helpers shared by every backend's host file: input checks and the one function
// that fills AttnParams from tensors.
#pragma once

#include <ATen/ATen.h>

#include <vector>

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

// Packed sequences and carried state (optional arguments of both ops). Checks them against
// q and the params, fills the params' cu_seqlens / num_seqs / state_in / ref_in, and returns the
// int64 copy of cu_seqlens the params point into (keep it alive while the kernel runs).
at::Tensor set_sequence_params(AttnParams& p, const at::Tensor& q,
                               const c10::optional<at::Tensor>& cu_seqlens,
                               const c10::optional<at::Tensor>& state_in,
                               const c10::optional<at::Tensor>& ref_in);

// The backward's own tensors, shared by every backend: contiguous views of what the forward
// saved, and the zeroed gradients in the accumulation dtype (db is a workspace).
struct BackwardTensors {
  at::Tensor y, b, den, dq, dk, dv, db, dshift;
};

// Checks dy and the forward's saved y (B, Hq, N, Dv), b and den (B, Hq, N): accumulation dtype,
// q's device. Then allocates the gradients and points p at all of them (dshift is per
// sequence: (p.num_seqs, Hq)).
BackwardTensors set_backward_params(AttnParams& p, const at::Tensor& q, const at::Tensor& k,
                                    const at::Tensor& v, const at::Tensor& dy,
                                    const at::Tensor& y, const at::Tensor& b,
                                    const at::Tensor& den);

// Checks the arguments of csq_decode_ (one token; sums (B, Hk, F, Dv + 1) and ref (B, Hk, Dk)
// contiguous in the accumulation dtype on q's device, like shift; y a contiguous
// (B, Hq, 1, Dv) tensor of q's dtype) and fills the params, y included.
AttnParams make_decode_params(const at::Tensor& sums, const at::Tensor& ref, const at::Tensor& q,
                              const at::Tensor& k, const at::Tensor& v, const at::Tensor& shift,
                              const at::Tensor& y, double scale, bool center, bool normalize,
                              double eps);

// Shape of the carried sums: (S, Hk, F, Dv + 1).
std::vector<int64_t> state_shape(const AttnParams& p);

// The gradient of the returned state, if given (and not empty): checks its shape, points
// p.dstate_out at a contiguous copy in the accumulation dtype and returns that copy (keep it
// alive while the kernels run); an undefined tensor otherwise.
at::Tensor set_dstate_out(AttnParams& p, const c10::optional<at::Tensor>& dstate_out,
                          at::ScalarType acc);

}  // namespace csq
