// Declares the operator schemas once. Each backend adds its kernels with TORCH_LIBRARY_IMPL in
// its own host file, so a CPU-only build simply leaves the CUDA files out.
#include <torch/library.h>

#include <string>

#ifndef CSQ_BUILD_CUDA_ARCHS
#define CSQ_BUILD_CUDA_ARCHS ""
#endif

namespace {

// What this binary was compiled with, for `python -m csq_ext` and bug reports.
std::string build_info() {
  std::string info = "backends=cpu";
#ifdef CSQ_WITH_CUDA
  info += ",cuda;cuda_archs=" CSQ_BUILD_CUDA_ARCHS;
#endif
  return info;
}

}  // namespace

TORCH_LIBRARY(csq_ext, m) {
  // Forward: y (B, Hq, N, Dv) in the accumulation dtype (float32 for half inputs: the public
  // function rounds it, and the backward needs it unrounded), the per-query shift b (B, Hq, N)
  // and the denominator den (B, Hq, N), also in the accumulation dtype, then the
  // carried state's sums (S, Hk, F, Dv + 1) when return_state (else an empty tensor) and the
  // key offset ref (S, Hk, Dk) they are relative to. cu_seqlens packs S sequences into N;
  // state_in / ref_in continue earlier sequences (causal only).
  m.def(
      "csq_fwd(Tensor q, Tensor k, Tensor v, Tensor shift, Tensor? cu_seqlens, "
      "Tensor? state_in, Tensor? ref_in, bool causal, float scale, bool center, "
      "bool normalize, float eps, int chunk_size, bool return_state) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Backward: dq, dk, dv in the input dtype, dshift (Hq,) in the dtype of shift, the gradient
  // of state_in (empty when there is none) and of ref.
  m.def(
      "csq_bwd(Tensor dy, Tensor q, Tensor k, Tensor v, Tensor shift, Tensor? cu_seqlens, "
      "Tensor? state_in, Tensor ref, Tensor y, Tensor b, Tensor den, Tensor? dstate_out, "
      "bool causal, float scale, bool center, bool normalize, float eps, int chunk_size) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The direct path (csrc/csq_direct_params.h): weights computed tile by tile from q and k,
  // O(N^2 (Dk + Dv)) time, no state. Forward: y (B, Hq, N, Dv), b and den (B, Hq, N), all in
  // the accumulation dtype as for csq_fwd (b goes with the tile's reference key; the backward
  // reads it back). tile_size 0 = the default. Optional per-query inputs: row_shift (B, Hq, N)
  // is added to each b_i, row_sums (B, Hq, N, Dv + 1) to each query's [num | den] before the
  // division (the carried state's share; csq_ext/_direct_state.py); both come back into b and
  // den.
  m.def(
      "csq_direct_fwd(Tensor q, Tensor k, Tensor v, Tensor shift, Tensor? cu_seqlens, "
      "Tensor? row_shift, Tensor? row_sums, bool causal, float scale, bool center, "
      "bool normalize, float eps, int tile_size) -> (Tensor, Tensor, Tensor)");
  // Backward: dq, dk, dv in the input dtype, dshift (Hq,) in the dtype of shift, and db
  // (B, Hq, N) in the accumulation dtype: the gradient of each b_i, hence of row_shift.
  m.def(
      "csq_direct_bwd(Tensor dy, Tensor q, Tensor k, Tensor v, Tensor shift, "
      "Tensor? cu_seqlens, Tensor y, Tensor b, Tensor den, bool causal, float scale, "
      "bool center, bool normalize, float eps, int tile_size) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // One decoding step in place, for serving: the new token's key and value join `sums`, y
  // receives the output; nothing is allocated. A state that holds no key yet (count 0) takes
  // the token's key as its `ref`, written in place. q (B, Hq, 1, Dk), k (B, Hk, 1, Dk),
  // v (B, Hk, 1, Dv), y (B, Hq, 1, Dv).
  m.def(
      "csq_decode_(Tensor(a!) sums, Tensor(c!) ref, Tensor q, Tensor k, Tensor v, Tensor shift, "
      "Tensor(b!) y, float scale, bool center, bool normalize, float eps) -> ()");
  // The state pool, for serving (docs/SPEC.md section 8; csrc/csq_pool_host.h): states of
  // many requests in the slots of one pool, sums (P, Hk, F, Dv + 1) and ref (P, Hk, Dk),
  // updated in place; sequence s uses slot slots[s] (distinct slots) and, where
  // has_initial_state[s] is False, starts empty whatever the slot holds. Not differentiable.
  // Prefill: S sequences packed by cu_seqlens (q (1, Hq, T, Dk)); returns y (1, Hq, T, Dv) in
  // q's dtype. Decode: one token per sequence, q (B, Hq, 1, Dk), y (B, Hq, 1, Dv) written.
  m.def(
      "csq_pool_prefill_(Tensor(a!) sums, Tensor(b!) ref, Tensor slots, "
      "Tensor? has_initial_state, Tensor q, Tensor k, Tensor v, Tensor shift, "
      "Tensor cu_seqlens, float scale, bool center, bool normalize, float eps, "
      "int chunk_size) -> Tensor");
  m.def(
      "csq_pool_decode_(Tensor(a!) sums, Tensor(b!) ref, Tensor slots, "
      "Tensor? has_initial_state, Tensor q, Tensor k, Tensor v, Tensor shift, Tensor(c!) y, "
      "float scale, bool center, bool normalize, float eps) -> ()");
  m.def("build_info() -> str", &build_info);
}
