// Backward launcher: the kernel sequence of the backward, for the four input dtypes.
//   1. zero dq, dk, dv, db (and dstate_in, dref)
//   2. the key side, as in the forward (launch_key_prefix; r is the forward's, read back)
//   3. g~ = [dnum, dden]                                           grad_ext_kernel
//   4. pass 1, key state S in order: dq, db from earlier keys      state_scan_kernel<KeyStateBwd>
//   5. causal: in-chunk pairs: dq, db, dk, dv                      bwd_pairs_kernel
//   6. dq -= tau db mu' (mu' = -r without centering)               center_dq_kernel
//   7. pass 2, query state R in reverse: dk, dv from later queries
//                                                              state_scan_kernel<QueryStateBwd>
//   8. center: dk += reverse cumulative sum of -tau db q / n       center_chunk_sum_kernel,
//                                                                  chunk_scan_kernel<reverse>,
//                                                                  center_dk_kernel
//   9. dref; carried state: the gradient of the carried key sum    ref_state_grad_kernel
//  10. dref to ref_in, or to the keys a picked ref came from        ref_gradient_kernel
// Steps 6 and 8 need the complete db, i.e. steps 4 and 5 done (stream order). The shift's
// gradient is db summed, taken by the host layer.
// A carried state (state_in, causal only): pass 1 starts from it, pass 2 from dstate_out (the
// gradient of the returned state) and ends in dstate_in; step 6 adds the gradient of the
// carried key count.
#include "csq_bwd_center.cuh"
#include "csq_bwd_chunk.cuh"
#include "csq_bwd_state.cuh"
#include "csq_chunked_launch.cuh"

namespace csq {
namespace cuda {

size_t bwd_workspace_bytes(const BwdParams& p, DType dt) {
  return carve_workspace(p, dt, Direction::kBackward, nullptr, nullptr);
}

template <DType DT, typename Map>
Status launch_bwd(const BwdParams& p, void* workspace, size_t workspace_bytes,
                  cudaStream_t stream) {
  using T = typename GenericTraits<DT>::T;
  using Acc = typename GenericTraits<DT>::Acc;
  CSQ_RETURN_IF_FAILED(check_shapes(p));
  const int64_t B = p.batch, Hq = p.heads_q, Hk = p.heads_k, N = p.seqlen;
  const int D = int(p.dim_k), Dv = int(p.dim_v);

  // Zero the outputs first, so that they are right (zero) even when there is nothing to do.
  const size_t a = sizeof(Acc);
  CSQ_RETURN_IF_ERROR(cudaMemsetAsync(p.dq, 0, a * size_t(B * Hq * N * D), stream), "memset(dq)");
  CSQ_RETURN_IF_ERROR(cudaMemsetAsync(p.dk, 0, a * size_t(B * Hk * N * D), stream), "memset(dk)");
  CSQ_RETURN_IF_ERROR(cudaMemsetAsync(p.dv, 0, a * size_t(B * Hk * N * Dv), stream),
                      "memset(dv)");
  CSQ_RETURN_IF_ERROR(cudaMemsetAsync(p.db, 0, a * size_t(B * Hq * N), stream), "memset(db)");
  const bool carried = p.state_in != nullptr;
  if (carried)  // the gradients of the carried state and of ref are sums of parts
    CSQ_RETURN_IF_ERROR(cudaMemsetAsync(p.dstate_in, 0, a * state_elems<Map>(p), stream),
                        "memset(dstate_in)");
  if (p.dref != nullptr)  // the host always asks for it; a carried state needs it
    CSQ_RETURN_IF_ERROR(cudaMemsetAsync(p.dref, 0, a * ref_elems(p), stream), "memset(dref)");
  if (B * Hq * N == 0) {  // no token: the carried state's gradients are the returned state's
    if (p.dref != nullptr && p.dref_out != nullptr)
      CSQ_RETURN_IF_ERROR(cudaMemcpyAsync(p.dref, p.dref_out, a * ref_elems(p),
                                          cudaMemcpyDeviceToDevice, stream),
                          "dref (empty input)");
    return carried ? copy_or_zero(p.dstate_in, p.dstate_out, a * state_elems<Map>(p), stream,
                                  "dstate_in (empty input)")
                   : Status{};
  }
  Work w;
  CSQ_RETURN_IF_FAILED(
      take_workspace(p, DT, Direction::kBackward, workspace, workspace_bytes, &w, "launch_bwd"));

  const unsigned bhk = unsigned(B * Hk), bhq = unsigned(B * Hq), nch = unsigned(w.nchunks);

  CSQ_RETURN_IF_FAILED(launch_key_prefix<DT, Map>(p, w, nullptr, stream));
  grad_ext_kernel<T, Acc><<<dim3(bhq, nch), kThreads, 0, stream>>>(p, w);
  CSQ_CHECK_LAUNCH("grad_ext_kernel");

  CSQ_RETURN_IF_FAILED(launch_state_scan<DT, KeyStateBwd, Map>(p, w, stream));
  if (p.causal)
    CSQ_RETURN_IF_FAILED(launch_with_smem(bwd_pairs_kernel<T, Acc, Map>, dim3(bhq, nch),
                                          bwd_pairs_smem_bytes<Acc>(), p, w, stream,
                                          "bwd_pairs_kernel"));
  // Also without centering: dq += tau db r (r is not 0, csq_params.h).
  center_dq_kernel<T, Acc, Map><<<dim3(bhk, nch), kThreads, key_mean_smem_bytes<Acc>(D),
                                  stream>>>(p, w);
  CSQ_CHECK_LAUNCH("center_dq_kernel");

  CSQ_RETURN_IF_FAILED(launch_state_scan<DT, QueryStateBwd, Map>(p, w, stream));
  if (p.center) {
    center_chunk_sum_kernel<T, Acc, Map><<<dim3(bhk, nch), kColThreads, 0, stream>>>(p, w);
    CSQ_CHECK_LAUNCH("center_chunk_sum_kernel");
    chunk_scan_kernel<Acc><<<bhk, kColThreads, 0, stream>>>(
        p, w, static_cast<const Acc*>(w.center_sums), static_cast<Acc*>(w.center_prefix), true);
    CSQ_CHECK_LAUNCH("chunk_scan_kernel<reverse>");
    center_dk_kernel<T, Acc, Map><<<dim3(bhk, nch), kColThreads, 0, stream>>>(p, w);
    CSQ_CHECK_LAUNCH("center_dk_kernel");
  }
  if (p.dref == nullptr) return Status{};
  // r reaches a returned state; and the carried key sum. Then to ref_in, or to the keys it was
  // picked from.
  ref_state_grad_kernel<T, Acc, Map><<<dim3(bhk, nch), kColThreads, 0, stream>>>(p, w);
  CSQ_CHECK_LAUNCH("ref_state_grad_kernel");
  return launch_ref_gradient<DT, Map>(p, w, false, stream);
}

#define CSQ_INSTANTIATE(DT, MAP) \
  template Status launch_bwd<DT, MAP>(const BwdParams&, void*, size_t, cudaStream_t);
CSQ_CUDA_FOR_EACH_LAUNCH(CSQ_INSTANTIATE)
#undef CSQ_INSTANTIATE

}  // namespace cuda
}  // namespace csq
