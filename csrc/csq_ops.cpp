// Declares the operator schemas once. Each backend adds its kernels with TORCH_LIBRARY_IMPL in
// its own host file, so a CPU-only build simply leaves the CUDA files out.
#include <torch/library.h>

#include <string>

#include "csq_feature_map_table.h"
#include "csq_feature_maps.h"

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

// The rows of the feature map of every op (StateMap), for the Python mirror's check.
at::Tensor feature_map_rows(int64_t dim_k) { return csq::feature_map_table<csq::StateMap>(dim_k); }

}  // namespace

TORCH_LIBRARY(csq_ext, m) {
  // Forward: y (B, Hq, N, Dv) in the accumulation dtype (float32 for half inputs: the public
  // function rounds it, and the backward needs it unrounded), the per-query shift b (B, Hq, N)
  // and the denominator den (B, Hq, N), also in the accumulation dtype, then the
  // carried state's sums (S, Hk, F, Dv + 1) when return_state (else an empty tensor) and the
  // key offset ref (S, Hk, Dk) they are relative to. cu_seqlens packs S sequences into N;
  // state_in / ref_in continue earlier sequences (causal only).
  m.def(
      "csq_chunked_fwd(Tensor q, Tensor k, Tensor v, Tensor shift, Tensor? cu_seqlens, "
      "Tensor? state_in, Tensor? ref_in, bool causal, float scale, bool center, "
      "bool normalize, float eps, int tile_size, bool return_state) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Backward: dq, dk, dv in the input dtype, dshift (Hq,) in the dtype of shift, and the
  // gradients of state_in (empty when there is none) and of ref_in. ref is the forward's;
  // ref_given says whether the forward was given ref_in: where the sequence kept it, dref is
  // its gradient; a ref it picked from its keys (csrc/csq_params.h) passes the gradient of the
  // returned state and ref (dstate_out, dref_out) to those keys, through dk, and dref is 0.
  m.def(
      "csq_chunked_bwd(Tensor dy, Tensor q, Tensor k, Tensor v, Tensor shift, Tensor? cu_seqlens, "
      "Tensor? state_in, Tensor ref, Tensor y, Tensor b, Tensor den, Tensor? dstate_out, "
      "Tensor? dref_out, bool ref_given, bool causal, float scale, bool center, bool normalize, "
      "float eps, int tile_size) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The direct path (csrc/csq_direct_params.h): weights computed tile by tile from q and k,
  // O(N^2 (Dk + Dv)) time, plus O(N Dk^2 Dv) to read a carried state or build the returned one.
  // The same arguments and outputs as csq_chunked_fwd / csq_chunked_bwd (b goes with the
  // tile's reference key; the backward reads it back), but ref (S, Hk, Dk) is returned only
  // when a state is read or returned (else an empty tensor, which the backward takes back).
  m.def(
      "csq_direct_fwd(Tensor q, Tensor k, Tensor v, Tensor shift, Tensor? cu_seqlens, "
      "Tensor? state_in, Tensor? ref_in, bool causal, float scale, bool center, "
      "bool normalize, float eps, int tile_size, bool return_state) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "csq_direct_bwd(Tensor dy, Tensor q, Tensor k, Tensor v, Tensor shift, "
      "Tensor? cu_seqlens, Tensor? state_in, Tensor ref, Tensor y, Tensor b, Tensor den, "
      "Tensor? dstate_out, Tensor? dref_out, bool ref_given, bool causal, float scale, "
      "bool center, bool normalize, float eps, int tile_size) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The state alone (no queries, no outputs): the state after the keys and values of k
  // (B, Hk, N, Dk) and v (B, Hk, N, Dv), continuing state_in / ref_in (or none), and its ref:
  // what context parallelism and a serving prefill need. (sums (S, Hk, F, Dv + 1), ref
  // (S, Hk, Dk)) in the accumulation dtype; a given ref_in without state_in is kept, so the
  // sums are relative to it.
  m.def(
      "csq_state(Tensor k, Tensor v, Tensor? cu_seqlens, Tensor? state_in, Tensor? ref_in, "
      "int tile_size) -> (Tensor, Tensor)");
  // Backward: dk, dv in the input dtype, the gradients of state_in (empty when there is none)
  // and of ref_in, as csq_chunked_bwd's.
  m.def(
      "csq_state_bwd(Tensor k, Tensor v, Tensor? cu_seqlens, Tensor? state_in, Tensor ref, "
      "Tensor? dstate_out, Tensor? dref_out, bool ref_given, int tile_size) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
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
      "int tile_size) -> Tensor");
  m.def(
      "csq_pool_decode_(Tensor(a!) sums, Tensor(b!) ref, Tensor slots, "
      "Tensor? has_initial_state, Tensor q, Tensor k, Tensor v, Tensor shift, Tensor(c!) y, "
      "float scale, bool center, bool normalize, float eps) -> ()");
  m.def("build_info() -> str", &build_info);
  // The feature map's rows (csrc/csq_feature_map.h): (F, 3) int64, per row its factors x, y of
  // the extended coordinates (y = -1: one factor) and its query weight m_f, in the state's row
  // order; csq_ext/feature_map.py mirrors it.
  m.def("feature_map_rows(int dim_k) -> Tensor", &feature_map_rows);
}
