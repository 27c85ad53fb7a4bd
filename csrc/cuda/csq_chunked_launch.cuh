// The kernel sequences both launchers run: the key side (csq_keys.cuh) and a state scan
// (csq_state.cuh; the scans themselves are in csq_fwd_state.cuh and csq_bwd_state.cuh).
// Header-only templates, so that csq_chunked_fwd_launch.cu and csq_chunked_bwd_launch.cu each
// instantiate what they use; Map is the feature map (csq_feature_maps.h).
#pragma once

#include "csq_keys.cuh"
#include "csq_launch_checks.cuh"
#include "csq_pool.cuh"
#include "csq_state.cuh"

namespace csq {
namespace cuda {

// cu_seqlens: the chunk slots of the packed sequences (chunk_map_kernel), first. Then r: given
// (a carried state's that holds keys, or in the backward the forward's), else the median of the
// first keys; with centering the per-chunk key sums and their scan (mu' of every row). The
// forward also reports the r it used (ref_out, an output of the op).
template <typename T, typename Acc, typename Map>
Status launch_key_prefix(const FwdParams& p, const Work& w, void* ref_out, cudaStream_t stream) {
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

template <typename Map>
inline int num_feature_tiles(int64_t dim_k, int ft) {
  return static_cast<int>(ceil_div(Map::num_features(dim_k), ft));
}

// Launches a state scan, Scan<T, Acc, FT, SUB, TC, Map>::kernel() (KeyStateFwd, KeyStateBwd,
// QueryStateBwd), on grid (S Hk, feature tiles): on tensor cores (TC) for bfloat16 / float16
// inputs unless p.tensor_core_passes is 0, else on the CUDA cores; staging SUB = kSub rows per
// step, or fewer where the device's shared memory needs it (state_rows: large heads).
template <DType DT, template <typename, typename, int, int, bool, typename> class Scan,
          typename Map, typename Params>
Status launch_state_scan(const Params& p, const Work& w, cudaStream_t stream) {
  using Tr = GenericTraits<DT>;
  using T = typename Tr::T;
  using Acc = typename Tr::Acc;
  constexpr int FT = Tr::kFeatTile;
  constexpr bool kHalf = DT == DType::kFloat16 || DT == DType::kBFloat16;
  constexpr bool kBackward = Scan<T, Acc, FT, kSub, false, Map>::kBackward;
  const char* name = Scan<T, Acc, FT, kSub, false, Map>::kName;
  const int D = int(p.dim_k), Dv = int(p.dim_v);
  size_t optin = 0;
  const Status st = smem_optin(&optin, name);
  if (!st.ok()) return st;
  const int sub = state_rows<Acc>(D, Dv, FT, kBackward, optin);
  const size_t smem = state_smem_bytes<Acc>(D, Dv, FT, sub, kBackward);
  const dim3 grid(unsigned(num_sequences(p) * p.heads_k), unsigned(num_feature_tiles<Map>(D, FT)));
  auto go = [&](auto kernel) {
    const Status ready = prepare_smem(kernel, smem, name);
    if (!ready.ok()) return ready;
    kernel<<<grid, kThreads, smem, stream>>>(p, w);
    CSQ_CHECK_LAUNCH(name);
    return Status{};
  };
  auto with_rows = [&](auto tc) {  // tc: std::bool_constant<TC>
    constexpr bool TC = decltype(tc)::value;
    static_assert(kSub / 4 == kMinStateRows, "state_rows picks one of these three");
    if (sub == kSub) return go(Scan<T, Acc, FT, kSub, TC, Map>::kernel());
    if (sub == kSub / 2) return go(Scan<T, Acc, FT, kSub / 2, TC, Map>::kernel());
    return go(Scan<T, Acc, FT, kMinStateRows, TC, Map>::kernel());
  };
  if constexpr (kHalf) {
    if (p.tensor_core_passes > 0) return with_rows(std::true_type{});
  }
  return with_rows(std::false_type{});
}

}  // namespace cuda
}  // namespace csq
