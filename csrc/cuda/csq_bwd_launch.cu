// Backward launcher: the kernel sequence of the backward, for the four input dtypes.
//   1. zero dq, dk, dv, db, dshift
//   2. center: r, key sums and their scan (as in the forward; mu' is recomputed from them)
//   3. g~ = [dnum, dden]                                           bwd_prep_kernel
//   4. pass 1, key state S in order: dq, db from earlier keys      state_scan_kernel<kStateBwdQ>
//   5. causal: in-chunk pairs: dq, db, dk, dv                      bwd_intra_kernel
//   6. dq -= tau db mu' (mu' = -r without centering)              rowshift_kernel<center_q>
//   7. dshift = sum_i db                                           dshift_kernel
//   8. pass 2, query state R in reverse: dk, dv from later queries state_scan_kernel<kStateBwdK>
//   9. center: dk += reverse cumulative sum of -tau db q / n       cq_chunk_sum, scan, center_k
// Steps 6 and 9 need the complete db, i.e. steps 4 and 5 done (stream order).
// A carried state (state_in, causal only): pass 1 starts from it, pass 2 from dstate_out (the
// gradient of the returned state) and ends in dstate_in; step 6 (also run without centering,
// where it adds tau db r) adds the gradient of the carried key count;
//  10. dref; carried state: the gradient of the carried key sum     state_grad_kernel
#include "csq_chunk.cuh"
#include "csq_launch_util.cuh"
#include "csq_prefix.cuh"
#include "csq_state.cuh"

namespace csq {
namespace cuda {

// Defined in csq_fwd_launch.cu.
template <typename T, typename Acc>
Status launch_key_prefix(const AttnParams& p, const Work& w, cudaStream_t stream);

size_t bwd_workspace_bytes(const AttnParams& p, DType dt) {
  return carve_workspace(p, dt, nullptr, nullptr);
}

template <DType DT>
Status launch_bwd(const AttnParams& p, void* workspace, size_t workspace_bytes,
                  cudaStream_t stream) {
  using Tr = GenericTraits<DT>;
  using T = typename Tr::T;
  using Acc = typename Tr::Acc;

  Status st = check_shapes(p);
  if (!st.ok()) return st;
  const int64_t B = p.batch, Hq = p.heads_q, Hk = p.heads_k, N = p.seqlen;
  const int D = int(p.dim_k), Dv = int(p.dim_v);

  // Zero the outputs first, so that they are right (zero) even when there is nothing to do.
  const size_t a = sizeof(Acc);
  CSQ_RETURN_IF_ERROR(cudaMemsetAsync(p.dq, 0, a * size_t(B * Hq * N * D), stream), "memset(dq)");
  CSQ_RETURN_IF_ERROR(cudaMemsetAsync(p.dk, 0, a * size_t(B * Hk * N * D), stream), "memset(dk)");
  CSQ_RETURN_IF_ERROR(cudaMemsetAsync(p.dv, 0, a * size_t(B * Hk * N * Dv), stream),
                      "memset(dv)");
  CSQ_RETURN_IF_ERROR(cudaMemsetAsync(p.db, 0, a * size_t(B * Hq * N), stream), "memset(db)");
  CSQ_RETURN_IF_ERROR(cudaMemsetAsync(p.dshift, 0, a * size_t(B * Hq), stream),
                      "memset(dshift)");
  const bool carried = p.state_in != nullptr;
  if (carried)  // the gradients of the carried state and of ref are sums of parts
    CSQ_RETURN_IF_ERROR(cudaMemsetAsync(p.dstate_in, 0, a * state_elems(p), stream),
                        "memset(dstate_in)");
  if (p.dref != nullptr)  // the host always asks for it; a carried state needs it
    CSQ_RETURN_IF_ERROR(cudaMemsetAsync(p.dref, 0, a * ref_elems(p), stream), "memset(dref)");
  if (B * Hq * N == 0)  // no token: the carried state's gradient is the returned state's
    return carried ? copy_or_zero(p.dstate_in, p.dstate_out, a * state_elems(p), stream,
                                  "dstate_in (empty input)")
                   : Status{};
  Work w;
  if (workspace_bytes < carve_workspace(p, DT, workspace, &w))
    return Status{cudaErrorInvalidValue, "launch_bwd", "workspace too small"};

  const unsigned bhk = unsigned(B * Hk), bhq = unsigned(B * Hq), nch = unsigned(w.nchunks);

  st = launch_key_prefix<T, Acc>(p, w, stream);
  if (!st.ok()) return st;
  bwd_prep_kernel<T, Acc><<<dim3(bhq, nch), kThreads, 0, stream>>>(p, w);
  CSQ_CHECK_LAUNCH("bwd_prep_kernel");

  st = launch_state_scan<DT, kStateBwdQ>(p, w, stream, "state_scan_kernel<bwd_q>");
  if (!st.ok()) return st;
  if (p.causal) {
    auto kernel = bwd_intra_kernel<T, Acc>;
    const size_t smem = intra_smem_bytes<Acc>();
    st = prepare_smem(kernel, smem, "bwd_intra_kernel");
    if (!st.ok()) return st;
    kernel<<<dim3(bhq, nch), kThreads, smem, stream>>>(p, w);
    CSQ_CHECK_LAUNCH("bwd_intra_kernel");
  }
  {  // also without centering: dq += tau db r (r is not 0, csq_params.h)
    rowshift_kernel<T, Acc, kRowCenterQ><<<dim3(bhk, nch), kThreads, 0, stream>>>(p, w);
    CSQ_CHECK_LAUNCH("rowshift_kernel<center_q>");
  }
  dshift_kernel<Acc><<<bhq, kThreads, 0, stream>>>(p);
  CSQ_CHECK_LAUNCH("dshift_kernel");

  st = launch_state_scan<DT, kStateBwdK>(p, w, stream, "state_scan_kernel<bwd_k>");
  if (!st.ok()) return st;
  if (p.center) {
    // The key sums are no longer needed: csum and prefix now hold the centering terms.
    cq_chunk_sum_kernel<T, Acc><<<dim3(bhk, nch), kColThreads, 0, stream>>>(p, w);
    CSQ_CHECK_LAUNCH("cq_chunk_sum_kernel");
    chunk_scan_kernel<Acc><<<bhk, kColThreads, 0, stream>>>(p, w, true);
    CSQ_CHECK_LAUNCH("chunk_scan_kernel<reverse>");
    center_k_kernel<T, Acc><<<dim3(bhk, nch), kColThreads, 0, stream>>>(p, w);
    CSQ_CHECK_LAUNCH("center_k_kernel");
  }
  if (p.dref != nullptr) {  // r reaches a returned state; and the carried key sum
    state_grad_kernel<T, Acc><<<dim3(bhk, nch), kColThreads, 0, stream>>>(p, w);
    CSQ_CHECK_LAUNCH("state_grad_kernel");
  }
  return Status{};
}

template Status launch_bwd<DType::kFloat64>(const AttnParams&, void*, size_t, cudaStream_t);
template Status launch_bwd<DType::kFloat32>(const AttnParams&, void*, size_t, cudaStream_t);
template Status launch_bwd<DType::kFloat16>(const AttnParams&, void*, size_t, cudaStream_t);
template Status launch_bwd<DType::kBFloat16>(const AttnParams&, void*, size_t, cudaStream_t);

}  // namespace cuda
}  // namespace csq
