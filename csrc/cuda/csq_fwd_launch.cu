// Forward launcher: the kernel sequence of the forward, for the four input dtypes.
//   1. zero the num~ accumulator (Work::rows)
//   2. cu_seqlens: the chunk slots of each sequence              chunk_map_kernel
//      r: the carried state's (ref_in) when it holds keys, else the median of the first keys;
//      center: per-chunk key sums, their scan
//   The carried state (state_in, causal only) seeds the state scan and, through its key sum
//   and count, mu' in step 3; step 4 writes state_out (return_state).
//   3. b_i = c_h - tau <q_i, mu'_i>                              rowshift_kernel
//   4. the key state against the queries, by feature tiles      state_scan_kernel<kStateFwd>
//   5. in-chunk pairs (causal), den and y                        fwd_finalize_kernel
#include "csq_chunk.cuh"
#include "csq_launch_util.cuh"
#include "csq_prefix.cuh"
#include "csq_state.cuh"

namespace csq {
namespace cuda {

size_t fwd_workspace_bytes(const AttnParams& p, DType dt) {
  return carve_workspace(p, dt, nullptr, nullptr);
}

// Steps 1-3, shared with the backward (which recomputes r and the key sums for mu').
template <typename T, typename Acc>
Status launch_key_prefix(const AttnParams& p, const Work& w, cudaStream_t stream) {
  const unsigned bhk = unsigned(p.batch * p.heads_k);
  const unsigned shk = unsigned(num_sequences(p) * p.heads_k);  // (sequence, kv head) tasks
  const size_t ref_bytes = sizeof(Acc) * size_t(shk) * size_t(p.dim_k);
  const dim3 chunks(bhk, unsigned(w.nchunks));
  if (p.cu_seqlens != nullptr) {  // the chunk slots of the packed sequences, first
    chunk_map_kernel<kThreads><<<1, kThreads, 0, stream>>>(p, w);
    CSQ_CHECK_LAUNCH("chunk_map_kernel");
  }
  if (shk == 0) return Status{};
  // r: given (a carried state's that holds keys, or in the backward the forward's), else the
  // median of the first keys.
  ref_key_kernel<T, Acc><<<shk, kColThreads, 0, stream>>>(p, w);
  CSQ_CHECK_LAUNCH("ref_key_kernel");
  if (p.center) {
    key_chunk_sum_kernel<T, Acc><<<chunks, kColThreads, 0, stream>>>(p, w);
    CSQ_CHECK_LAUNCH("key_chunk_sum_kernel");
    chunk_scan_kernel<Acc><<<bhk, kColThreads, 0, stream>>>(p, w, false);
    CSQ_CHECK_LAUNCH("chunk_scan_kernel");
  }
  if (p.ref_out != nullptr)  // the forward reports the r it used (an output of the op)
    CSQ_RETURN_IF_ERROR(
        cudaMemcpyAsync(p.ref_out, w.ref, ref_bytes, cudaMemcpyDeviceToDevice, stream),
        "cudaMemcpyAsync(ref_out)");
  return Status{};
}

template <DType DT>
Status launch_fwd(const AttnParams& p, void* workspace, size_t workspace_bytes,
                  cudaStream_t stream) {
  using Tr = GenericTraits<DT>;
  using T = typename Tr::T;
  using Acc = typename Tr::Acc;

  Status st = check_shapes(p);
  if (!st.ok()) return st;
  if (p.batch * p.heads_q * p.seqlen == 0) {  // no token: the state passes through unchanged
    st = copy_or_zero(p.state_out, p.state_in, sizeof(Acc) * state_elems(p), stream,
                      "state_out (empty input)");
    if (!st.ok()) return st;
    return copy_or_zero(p.ref_out, p.ref_in, sizeof(Acc) * ref_elems(p), stream,
                        "ref_out (empty input)");
  }
  Work w;
  if (workspace_bytes < carve_workspace(p, DT, workspace, &w))
    return Status{cudaErrorInvalidValue, "launch_fwd", "workspace too small"};

  const unsigned bhk = unsigned(p.batch * p.heads_k), bhq = unsigned(p.batch * p.heads_q);
  const unsigned nch = unsigned(w.nchunks);
  const int Dv = int(p.dim_v);

  CSQ_RETURN_IF_ERROR(
      cudaMemsetAsync(w.rows, 0, sizeof(Acc) * size_t(bhq) * size_t(p.seqlen) * size_t(Dv + 1),
                      stream),
      "cudaMemsetAsync(num)");
  st = launch_key_prefix<T, Acc>(p, w, stream);
  if (!st.ok()) return st;
  rowshift_kernel<T, Acc, kRowShiftB><<<dim3(bhk, nch), kThreads, 0, stream>>>(p, w);
  CSQ_CHECK_LAUNCH("rowshift_kernel<shift_b>");

  st = launch_state_scan<DT, kStateFwd>(p, w, stream, "state_scan_kernel<fwd>");
  if (!st.ok()) return st;
  {
    auto kernel = fwd_finalize_kernel<T, Acc>;
    const size_t smem = finalize_smem_bytes<Acc>();
    st = prepare_smem(kernel, smem, "fwd_finalize_kernel");
    if (!st.ok()) return st;
    kernel<<<dim3(bhq, nch), kThreads, smem, stream>>>(p, w);
    CSQ_CHECK_LAUNCH("fwd_finalize_kernel");
  }
  return Status{};
}

template Status launch_key_prefix<double, double>(const AttnParams&, const Work&, cudaStream_t);
template Status launch_key_prefix<float, float>(const AttnParams&, const Work&, cudaStream_t);
template Status launch_key_prefix<__half, float>(const AttnParams&, const Work&, cudaStream_t);
template Status launch_key_prefix<__nv_bfloat16, float>(const AttnParams&, const Work&,
                                                        cudaStream_t);

template Status launch_fwd<DType::kFloat64>(const AttnParams&, void*, size_t, cudaStream_t);
template Status launch_fwd<DType::kFloat32>(const AttnParams&, void*, size_t, cudaStream_t);
template Status launch_fwd<DType::kFloat16>(const AttnParams&, void*, size_t, cudaStream_t);
template Status launch_fwd<DType::kBFloat16>(const AttnParams&, void*, size_t, cudaStream_t);

}  // namespace cuda
}  // namespace csq
