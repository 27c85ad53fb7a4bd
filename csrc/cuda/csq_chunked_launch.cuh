// What the chunked path's launchers (csq_chunked_{fwd,bwd}_launch.cu, csq_state_launch.cu)
// share: the workspace, the empty forward, launches with large shared memory, the kernel
// sequences of the key side (csq_keys.cuh) and of ref's gradient, and a state scan
// (csq_state.cuh; the scans' policies are in csq_fwd_state.cuh and csq_bwd_state.cuh).
// Header-only templates, so that each launcher file instantiates what it uses; Map is the
// feature map (csq_feature_maps.h).
#pragma once

#include "csq_keys.cuh"
#include "csq_launch_checks.cuh"
#include "csq_pool.cuh"
#include "csq_state.cuh"

namespace csq {
namespace cuda {

// The workspace of an op of direction `dir`, carved from `workspace` (workspace_bytes) into *w,
// or a refusal naming `where` when it is smaller than the op needs.
inline Status take_workspace(const QkvParams& p, DType dt, Direction dir, void* workspace,
                             size_t workspace_bytes, Work* w, const char* where) {
  if (workspace_bytes < carve_workspace(p, dt, dir, workspace, w))
    return Status{cudaErrorInvalidValue, where, "workspace too small"};
  return Status{};
}

// A forward without a token (csq_chunked_fwd, csq_state; Params has a CarriedState): the
// returned state and ref are the carried ones, unchanged, or zeros.
template <DType DT, typename Map, typename Params>
Status pass_state_through(const Params& p, cudaStream_t stream) {
  const size_t a = acc_size(DT);
  CSQ_RETURN_IF_FAILED(copy_or_zero(p.state_out, p.state_in, a * state_elems<Map>(p), stream,
                                    "state_out (empty input)"));
  return copy_or_zero(p.ref_out, p.ref_in, a * ref_elems(p), stream, "ref_out (empty input)");
}

// kernel<<<grid, kThreads, smem, stream>>>(p, w), opted into `smem` bytes of dynamic shared
// memory first (prepare_smem: refused with its message where the device has less).
template <typename Kernel, typename Params>
Status launch_with_smem(Kernel kernel, dim3 grid, size_t smem, const Params& p, const Work& w,
                        cudaStream_t stream, const char* name) {
  CSQ_RETURN_IF_FAILED(prepare_smem(kernel, smem, name));
  kernel<<<grid, kThreads, smem, stream>>>(p, w);
  CSQ_CHECK_LAUNCH(name);
  return Status{};
}

// cu_seqlens: the chunk slots of the packed sequences (chunk_map_kernel), first. Then r: given
// (a carried state's that holds keys, or in the backward the forward's), else the median of the
// first keys; with centering the per-chunk key sums and their scan (mu' of every row). The
// forward also reports the r it used (ref_out, an output of the op).
template <DType DT, typename Map>
Status launch_key_prefix(const FwdParams& p, const Work& w, void* ref_out, cudaStream_t stream) {
  using T = typename GenericTraits<DT>::T;
  using Acc = typename GenericTraits<DT>::Acc;
  const unsigned bhk = unsigned(p.batch * p.heads_k);
  const unsigned shk = unsigned(num_sequences(p) * p.heads_k);  // (sequence, kv head) tasks
  const size_t ref_bytes = sizeof(Acc) * size_t(shk) * size_t(p.dim_k);
  const dim3 chunks(bhk, unsigned(w.nchunks));
  if (p.cu_seqlens != nullptr) {
    chunk_map_kernel<kThreads><<<1, kThreads, 0, stream>>>(p, w);
    CSQ_CHECK_LAUNCH("chunk_map_kernel");
  }
  if (shk == 0) return Status{};
  ref_key_kernel<T, Acc, Map><<<shk, kColThreads, 0, stream>>>(p, w);
  CSQ_CHECK_LAUNCH("ref_key_kernel");
  if (p.center) {
    key_chunk_sum_kernel<T, Acc><<<chunks, kColThreads, 0, stream>>>(p, w);
    CSQ_CHECK_LAUNCH("key_chunk_sum_kernel");
    chunk_scan_kernel<Acc><<<bhk, kColThreads, 0, stream>>>(
        p, w, static_cast<const Acc*>(w.key_sums), static_cast<Acc*>(w.key_prefix), false);
    CSQ_CHECK_LAUNCH("chunk_scan_kernel<keys>");
  }
  if (ref_out != nullptr && p.pool.slots != nullptr) {  // each r into its slot of the pool
    pool_ref_out_kernel<Acc><<<shk, kPoolThreads, 0, stream>>>(p, w, ref_out);
    CSQ_CHECK_LAUNCH("pool_ref_out_kernel");
  } else if (ref_out != nullptr) {
    CSQ_RETURN_IF_ERROR(
        cudaMemcpyAsync(ref_out, w.ref, ref_bytes, cudaMemcpyDeviceToDevice, stream),
        "cudaMemcpyAsync(ref_out)");
  }
  return Status{};
}

// The end of both backwards (csq_chunked_bwd, csq_state_bwd), once dk is complete: ref's
// gradient to ref_in, or to the keys it was picked from (ref_gradient_kernel; sum_keys: p.dref
// is minus the sum of dk, computed there). Grid (S Hk).
template <DType DT, typename Map>
Status launch_ref_gradient(const BwdParams& p, const Work& w, bool sum_keys,
                           cudaStream_t stream) {
  using T = typename GenericTraits<DT>::T;
  using Acc = typename GenericTraits<DT>::Acc;
  const unsigned shk = unsigned(num_sequences(p) * p.heads_k);
  ref_gradient_kernel<T, Acc, Map><<<shk, kColThreads, 0, stream>>>(p, w, sum_keys);
  CSQ_CHECK_LAUNCH("ref_gradient_kernel");
  return Status{};
}

template <typename Map>
inline int num_feature_tiles(int64_t dim_k, int ft) {
  return static_cast<int>(ceil_div(Map::num_features(dim_k), ft));
}

// Launches a state scan, state_scan_kernel<Scan, T, Acc, FT, SUB, TC, Map> (Scan: KeyStateFwd,
// KeyStateBuild, KeyStateBwd, QueryStateBwd, StateKeysBwd), on grid (S Hk, feature tiles): on
// tensor cores (TC) for bfloat16 / float16 inputs unless p.tensor_core_passes is 0, else on
// the CUDA cores; staging SUB = kSub rows per step, or fewer where the device's shared memory
// needs it (state_rows: large heads).
template <DType DT, typename Scan, typename Map>
Status launch_state_scan(const typename Scan::Params& p, const Work& w, cudaStream_t stream) {
  using Tr = GenericTraits<DT>;
  using T = typename Tr::T;
  using Acc = typename Tr::Acc;
  constexpr int FT = Tr::kFeatTile;
  constexpr bool kHalf = DT == DType::kFloat16 || DT == DType::kBFloat16;
  const int D = int(p.dim_k), Dv = int(p.dim_v);
  size_t optin = 0;
  CSQ_RETURN_IF_FAILED(smem_optin(&optin, Scan::kName));
  const int sub = state_rows<Acc>(D, Dv, FT, Scan::kBackward, optin);
  const size_t smem = state_smem_bytes<Acc>(D, Dv, FT, sub, Scan::kBackward);
  const dim3 grid(unsigned(num_sequences(p) * p.heads_k), unsigned(num_feature_tiles<Map>(D, FT)));
  auto with_rows = [&](auto tc) {  // tc: std::bool_constant<TC>
    constexpr bool TC = decltype(tc)::value;
    static_assert(kSub / 4 == kMinStateRows, "state_rows picks one of these three");
    const auto go = [&](auto kernel) {
      return launch_with_smem(kernel, grid, smem, p, w, stream, Scan::kName);
    };
    if (sub == kSub) return go(state_scan_kernel<Scan, T, Acc, FT, kSub, TC, Map>);
    if (sub == kSub / 2) return go(state_scan_kernel<Scan, T, Acc, FT, kSub / 2, TC, Map>);
    return go(state_scan_kernel<Scan, T, Acc, FT, kMinStateRows, TC, Map>);
  };
  if constexpr (kHalf) {
    if (p.tensor_core_passes > 0) return with_rows(std::true_type{});
  }
  return with_rows(std::false_type{});
}

}  // namespace cuda
}  // namespace csq
