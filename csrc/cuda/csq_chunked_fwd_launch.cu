// Forward launcher: the kernel sequence of the forward, for the four input dtypes.
//   1. zero the state part of num~ (Work::num_state)
//   2. the key side (launch_key_prefix): cu_seqlens: the chunk slots of each sequence; r: the
//      carried state's (ref_in) when it holds keys, else the median of the first keys;
//      center: per-chunk key sums, their scan
//   The carried state (state_in, causal only) seeds the state scan and, through its key sum
//   and count, mu' in step 3; step 4 writes state_out (return_state).
//   3. b_i = c_h - tau <q_i, mu'_i>                              query_shift_kernel
//   4. the key state against the queries, by feature tiles      state_scan_kernel<KeyStateFwd>
//   5. in-chunk pairs (causal), den and y                        fwd_finalize_kernel
// A pool prefill (csq_pool_prefill_, p.pool) first zeroes its fresh slots, and step 2 writes
// each r into its slot.
#include "csq_chunked_launch.cuh"
#include "csq_fwd_chunk.cuh"
#include "csq_fwd_state.cuh"

namespace csq {
namespace cuda {

size_t fwd_workspace_bytes(const FwdParams& p, DType dt) {
  return carve_workspace(p, dt, Direction::kForward, nullptr, nullptr);
}

template <DType DT, typename Map>
Status launch_fwd(const FwdParams& p, void* workspace, size_t workspace_bytes,
                  cudaStream_t stream) {
  using T = typename GenericTraits<DT>::T;
  using Acc = typename GenericTraits<DT>::Acc;
  CSQ_RETURN_IF_FAILED(check_shapes(p));
  if (p.batch * p.heads_q * p.seqlen == 0) {  // no token: the state passes through unchanged
    if (p.pool.slots != nullptr)
      return Status{cudaErrorInvalidValue, "launch_fwd",
                    "a pool prefill needs tokens (the host layer skips empty calls)"};
    return pass_state_through<DT, Map>(p, stream);
  }
  Work w;
  CSQ_RETURN_IF_FAILED(
      take_workspace(p, DT, Direction::kForward, workspace, workspace_bytes, &w, "launch_fwd"));

  const unsigned bhk = unsigned(p.batch * p.heads_k), bhq = unsigned(p.batch * p.heads_q);
  const unsigned nch = unsigned(w.nchunks);
  const int Dv = int(p.dim_v);

  // A fresh pool slot is an empty state: zero sums, count 0 (csq_pool.cuh).
  CSQ_RETURN_IF_FAILED(launch_pool_fresh<Acc>(p.pool, num_sequences(p), p.heads_k,
                                              state_head_elems<Map>(p.dim_k, p.dim_v),
                                              p.state_out, stream));
  CSQ_RETURN_IF_ERROR(
      cudaMemsetAsync(w.num_state, 0,
                      sizeof(Acc) * size_t(bhq) * size_t(p.seqlen) * size_t(Dv + 1), stream),
      "cudaMemsetAsync(num_state)");
  CSQ_RETURN_IF_FAILED(launch_key_prefix<DT, Map>(p, w, p.ref_out, stream));
  const size_t mean_smem = key_mean_smem_bytes<Acc>(int(p.dim_k));
  query_shift_kernel<T, Acc, Map><<<dim3(bhk, nch), kThreads, mean_smem, stream>>>(p, w);
  CSQ_CHECK_LAUNCH("query_shift_kernel");

  CSQ_RETURN_IF_FAILED(launch_state_scan<DT, KeyStateFwd, Map>(p, w, stream));
  return launch_with_smem(fwd_finalize_kernel<T, Acc, Map>, dim3(bhq, nch),
                          finalize_smem_bytes<Acc>(), p, w, stream, "fwd_finalize_kernel");
}

#define CSQ_INSTANTIATE(DT, MAP) \
  template Status launch_fwd<DT, MAP>(const FwdParams&, void*, size_t, cudaStream_t);
CSQ_CUDA_FOR_EACH_LAUNCH(CSQ_INSTANTIATE)
#undef CSQ_INSTANTIATE

}  // namespace cuda
}  // namespace csq
