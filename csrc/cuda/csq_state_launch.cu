// Launchers of the state-only op (csq_state / csq_state_bwd), for the four input dtypes: the
// chunked path's key side and state scans, without queries.
//   forward:  the key side (launch_key_prefix: chunk slots, ref by the rule of csq_params.h,
//             ref_out), then the keys of every chunk join the state
//                                                     state_scan_kernel<KeyStateBuild>
//   backward: dk, dv zeroed, dstate_in = dstate_out; the key side (the forward's ref); every
//             chunk's keys read dstate_out            state_scan_kernel<StateKeysBwd>
//             ref's gradient, minus the sum of dk, to ref_in or the keys it was picked from
//                                                     ref_gradient_kernel
#include "csq_bwd_state.cuh"
#include "csq_chunked_launch.cuh"
#include "csq_fwd_state.cuh"

namespace csq {
namespace cuda {
namespace {

// The chunked path's parameters for keys and values alone (the q fields mirror k; no
// centering: the state holds no query means).
FwdParams forward_view(const StateParams& p) {
  FwdParams f;
  static_cast<QkvParams&>(f) = p;
  static_cast<CarriedState&>(f) = p;
  f.causal = true;
  f.center = false;
  f.chunk = kChunk;
  f.tensor_core_passes = p.tensor_core_passes;
  return f;
}

}  // namespace

size_t state_workspace_bytes(const StateParams& p, DType dt) {
  return carve_workspace(p, dt, Direction::kState, nullptr, nullptr);
}

template <DType DT, typename Map>
Status launch_state(const StateParams& p, void* workspace, size_t workspace_bytes,
                    cudaStream_t stream) {
  CSQ_RETURN_IF_FAILED(check_shapes(p));
  if (p.batch * p.heads_k * p.seqlen == 0)  // no key: the state passes through unchanged
    return pass_state_through<DT, Map>(p, stream);
  Work w;
  CSQ_RETURN_IF_FAILED(
      take_workspace(p, DT, Direction::kState, workspace, workspace_bytes, &w, "launch_state"));
  const FwdParams f = forward_view(p);
  CSQ_RETURN_IF_FAILED(launch_key_prefix<DT, Map>(f, w, p.ref_out, stream));
  return launch_state_scan<DT, KeyStateBuild, Map>(f, w, stream);
}

template <DType DT, typename Map>
Status launch_state_bwd(const StateBwdParams& p, void* workspace, size_t workspace_bytes,
                        cudaStream_t stream) {
  CSQ_RETURN_IF_FAILED(check_shapes(p));
  const size_t a = acc_size(DT);
  const size_t keys = size_t(p.batch * p.heads_k * p.seqlen);
  CSQ_RETURN_IF_ERROR(cudaMemsetAsync(p.dk, 0, a * keys * size_t(p.dim_k), stream), "memset(dk)");
  CSQ_RETURN_IF_ERROR(cudaMemsetAsync(p.dv, 0, a * keys * size_t(p.dim_v), stream), "memset(dv)");
  CSQ_RETURN_IF_FAILED(
      copy_or_zero(p.dstate_in, p.dstate_out, a * state_elems<Map>(p), stream, "dstate_in"));
  CSQ_RETURN_IF_ERROR(cudaMemsetAsync(p.dref, 0, a * ref_elems(p), stream), "memset(dref)");
  if (keys == 0) {  // no key: a kept ref's gradient is the returned ref's
    return p.dref_out == nullptr
               ? Status{}
               : copy_or_zero(p.dref, p.dref_out, a * ref_elems(p), stream, "dref (no key)");
  }
  Work w;
  CSQ_RETURN_IF_FAILED(take_workspace(p, DT, Direction::kState, workspace, workspace_bytes, &w,
                                      "launch_state_bwd"));
  BwdParams b;
  static_cast<FwdParams&>(b) = forward_view(p);
  static_cast<CarriedStateGrads&>(b) = p;
  b.dk = p.dk;
  b.dv = p.dv;
  CSQ_RETURN_IF_FAILED(launch_key_prefix<DT, Map>(b, w, nullptr, stream));
  if (p.dstate_out != nullptr)
    CSQ_RETURN_IF_FAILED(launch_state_scan<DT, StateKeysBwd, Map>(b, w, stream));
  return launch_ref_gradient<DT, Map>(b, w, true, stream);
}

#define CSQ_INSTANTIATE(DT, MAP)                                                               \
  template Status launch_state<DT, MAP>(const StateParams&, void*, size_t, cudaStream_t);      \
  template Status launch_state_bwd<DT, MAP>(const StateBwdParams&, void*, size_t, cudaStream_t);
CSQ_CUDA_FOR_EACH_LAUNCH(CSQ_INSTANTIATE)
#undef CSQ_INSTANTIATE

}  // namespace cuda
}  // namespace csq
