// The host layer of the state-pool ops (docs/SPEC.md section 8), shared by every backend:
// checks of the pool (sums (P, Hk, F, Dv + 1) and ref (P, Hk, Dk) in the accumulation dtype,
// each slot's block contiguous, slots any distance apart, e.g. views into vLLM's cache
// pages), of the slot indices (in [0, P), distinct) and of the fresh-state flags, and the
// params. The kernels are the chunked forward's and the decode step's, which reach a
// sequence's state through StatePool (csq_params.h).
#pragma once

#include <ATen/ATen.h>

#include "csq_host.h"

namespace csq {

// csq_pool_prefill_: the forward's params over a pool, in place (state_in == state_out).
struct PoolPrefillCall {
  FwdParams p;
  at::Tensor shift_acc, cu_seqlens, slots, fresh;  // what p points into
  at::Tensor y, b, den;                            // y, b, den in the accumulation dtype
  bool empty = false;  // no token: nothing for the kernels (run_empty() instead)
  // No token at all: the fresh slots become empty states (zero sums and ref, as
  // CSQState.empty), the others stay as they are.
  void run_empty(const at::Tensor& sums, const at::Tensor& ref) const;
};
PoolPrefillCall prepare_pool_prefill(const at::Tensor& sums, const at::Tensor& ref,
                                     const at::Tensor& slots,
                                     const c10::optional<at::Tensor>& has_initial_state,
                                     const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& shift,
                                     const at::Tensor& cu_seqlens, double scale, bool center,
                                     bool normalize, double eps, int64_t tile_size);

// csq_pool_decode_: the decode step's params over a pool (sequence b in slot slots[b]).
struct PoolDecodeCall {
  DecodeParams p;
  at::Tensor slots, fresh;  // what p points into
};
PoolDecodeCall prepare_pool_decode(const at::Tensor& sums, const at::Tensor& ref,
                                   const at::Tensor& slots,
                                   const c10::optional<at::Tensor>& has_initial_state,
                                   const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& shift, const at::Tensor& y, double scale,
                                   bool center, bool normalize, double eps);

}  // namespace csq
