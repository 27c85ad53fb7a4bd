// Launchers of the CUDA direct path, for the four input dtypes (README.md, "Direct path").
// Forward:
//   1. cu_seqlens: the first tile slot of each sequence          direct_tile_map_kernel
//   2. per-tile key sums (float64) and their scan                  direct_tile_sum/scan_kernel
//   3. r_T per query tile, m_i, b_i                               direct_rows_kernel
//   4. the tiles: y, den                                          direct_fwd_kernel
//      (csq_direct_tiles.cuh) on an engine: bfloat16 / float16 on tensor cores
//      (MmaEngine) unless p.tensor_core_passes == 0, else on CUDA cores (CoreEngine);
//      likewise the backward's dq and dk / dv kernels
// Backward: 1-3 (without b: the forward's is read), the per-row terms (direct_row_grad_kernel),
// dq and db (direct_dq_kernel), dk and dv (direct_dkdv_kernel), then with centering the dk
// term of the key means: per-tile sums, their reverse scan, direct_center_dk_kernel.
#include "csq_direct_engine_cores.cuh"
#include "csq_direct_engine_mma.cuh"
#include "csq_direct_tiles.cuh"
#include "csq_launch_checks.cuh"

namespace csq {
namespace cuda {

using namespace direct;

Status check_direct_shapes(const DirectFwdParams& p) {
  if (p.dim_k < 1 || p.dim_k > kDirectMaxHeadDim || p.dim_v < 1 || p.dim_v > kDirectMaxHeadDim)
    return Status{cudaErrorInvalidValue, "check_direct_shapes",
                  "the CUDA direct path supports head sizes 1 <= Dk <= 256 and 1 <= Dv <= 256"};
  if (p.heads_q > 65535 || p.heads_k > 65535)
    return Status{cudaErrorInvalidValue, "check_direct_shapes",
                  "the CUDA direct path supports Hq <= 65535"};
  if (direct_slots(p) > 2147483647LL || p.num_seqs > 2147483647LL)
    return Status{cudaErrorInvalidValue, "check_direct_shapes",
                  "the CUDA direct path supports fewer than 2^31 tiles of 64 positions"};
  if (p.cu_seqlens != nullptr && (p.batch != 1 || p.num_seqs < 1))
    return Status{cudaErrorInvalidValue, "check_direct_shapes",
                  "cu_seqlens needs B == 1 and S >= 1"};
  if (p.group < 1 || p.heads_q != p.group * p.heads_k)
    return Status{cudaErrorInvalidValue, "check_direct_shapes", "Hq must equal group * Hk"};
  return Status{};
}

size_t direct_fwd_workspace_bytes(const DirectFwdParams& p, DType dt) {
  return carve_direct(p, dt, false, nullptr, nullptr);
}
size_t direct_bwd_workspace_bytes(const DirectFwdParams& p, DType dt) {
  return carve_direct(p, dt, true, nullptr, nullptr);
}

namespace {

template <DType DT>
constexpr bool kHalfInput = DT == DType::kFloat16 || DT == DType::kBFloat16;

// Steps 1-3: the tile map, the key sums, r_T, m_i and (forward) b.
template <typename T, typename Acc>
Status launch_direct_rows(const DirectFwdParams& p, const DirectWork& w, bool write_b,
                          cudaStream_t stream) {
  const dim3 tiles(unsigned(w.slots), unsigned(p.heads_k));
  if (p.cu_seqlens != nullptr) {
    direct_tile_map_kernel<<<1, 32, 0, stream>>>(p, w);
    CSQ_CHECK_LAUNCH("direct_tile_map_kernel");
  }
  {  // with or without centering: the means pick the reference keys
    direct_tile_sum_kernel<T, Acc, kSumKeys><<<tiles, kDThreads, 0, stream>>>(p, w);
    CSQ_CHECK_LAUNCH("direct_tile_sum_kernel<keys>");
    const dim3 seqs(unsigned(num_sequences(p)), unsigned(p.heads_k));
    direct_tile_scan_kernel<<<seqs, kDThreads, 0, stream>>>(p, w, false);
    CSQ_CHECK_LAUNCH("direct_tile_scan_kernel<keys>");
  }
  direct_rows_kernel<T, Acc><<<tiles, kDThreads, 0, stream>>>(p, w, write_b);
  CSQ_CHECK_LAUNCH("direct_rows_kernel");
  return Status{};
}

template <typename Kernel, typename Params>
Status launch_tiles(Kernel kernel, dim3 grid, size_t smem, const Params& p,
                    const DirectWork& w, cudaStream_t stream, const char* name) {
  Status st = prepare_smem(kernel, smem, name);
  if (!st.ok()) return st;
  kernel<<<grid, kDThreads, smem, stream>>>(p, w);
  CSQ_CHECK_LAUNCH(name);
  return Status{};
}

// The engines of the tile kernels (csq_direct_tiles.cuh): run(Use<E>{}) with the one this
// call takes. Registering an engine is one branch here.
template <typename E>
struct Use {
  using type = E;
};
template <DType DT, typename Run>
Status on_engine(const DirectFwdParams& p, const Run& run) {
  using T = typename DTypeOf<DT>::type;
  if constexpr (kHalfInput<DT>) {
    if (p.tensor_core_passes > 0) return run(Use<MmaEngine<T>>{});
  }
  return run(Use<CoreEngine<T, typename GenericTraits<DT>::Acc>>{});
}

// The start of both launchers: checks, the workspace and steps 1-3 (b only forward);
// *empty when there is nothing to compute.
template <DType DT>
Status start_direct(const DirectFwdParams& p, bool backward, void* workspace,
                    size_t workspace_bytes, DirectWork* w, bool* empty, cudaStream_t stream) {
  Status st = check_direct_shapes(p);
  if (!st.ok()) return st;
  *empty = p.batch * p.heads_q * p.seqlen == 0;
  if (*empty) return Status{};
  if (workspace_bytes < carve_direct(p, DT, backward, workspace, w))
    return Status{cudaErrorInvalidValue, backward ? "launch_direct_bwd" : "launch_direct_fwd",
                  "workspace too small"};
  return launch_direct_rows<typename DTypeOf<DT>::type, typename GenericTraits<DT>::Acc>(
      p, *w, !backward, stream);
}

}  // namespace

template <DType DT, typename Map>
Status launch_direct_fwd(const DirectFwdParams& p, void* workspace, size_t workspace_bytes,
                         cudaStream_t stream) {
  using T = typename DTypeOf<DT>::type;
  DirectWork w;
  bool empty = false;
  Status st = start_direct<DT>(p, false, workspace, workspace_bytes, &w, &empty, stream);
  if (!st.ok() || empty) return st;
  const dim3 grid(unsigned(w.slots), unsigned(p.heads_q), unsigned(ceil_div(p.dim_v, kT)));
  return on_engine<DT>(p, [&](auto use) {
    using E = typename decltype(use)::type;
    return launch_tiles(direct_fwd_kernel<T, E, Map>, grid, E::kSmemBytes, p, w, stream,
                        "direct_fwd_kernel");
  });
}

template <DType DT, typename Map>
Status launch_direct_bwd(const DirectBwdParams& p, void* workspace, size_t workspace_bytes,
                         cudaStream_t stream) {
  using T = typename DTypeOf<DT>::type;
  using Acc = typename GenericTraits<DT>::Acc;
  DirectWork w;
  bool empty = false;
  Status st = start_direct<DT>(p, true, workspace, workspace_bytes, &w, &empty, stream);
  if (!st.ok() || empty) return st;
  const int64_t rows = p.batch * p.heads_q * p.seqlen;
  const unsigned row_blocks = unsigned(ceil_div(rows, kDThreads / 32));
  direct_row_grad_kernel<Acc><<<row_blocks, kDThreads, 0, stream>>>(p, w);
  CSQ_CHECK_LAUNCH("direct_row_grad_kernel");
  const unsigned nbk = unsigned(ceil_div(p.dim_k, kT)), nbv = unsigned(ceil_div(p.dim_v, kT));
  const dim3 dq_grid(unsigned(w.slots), unsigned(p.heads_q), nbk);
  const dim3 dkdv_grid(unsigned(w.slots), unsigned(p.heads_k), nbk + nbv);
  st = on_engine<DT>(p, [&](auto use) {
    using E = typename decltype(use)::type;
    Status s = launch_tiles(direct_dq_kernel<T, E, Map>, dq_grid, E::kSmemBytes, p, w, stream,
                            "direct_dq_kernel");
    if (!s.ok()) return s;
    return launch_tiles(direct_dkdv_kernel<T, E, Map>, dkdv_grid, E::kSmemBytes, p, w, stream,
                        "direct_dkdv_kernel");
  });
  if (!st.ok()) return st;
  if (p.center) {  // needs the complete db of every query row
    const dim3 tiles(unsigned(w.slots), unsigned(p.heads_k));
    const auto center_sums = direct_tile_sum_kernel<T, Acc, kSumCenterDk, DirectBwdParams>;
    center_sums<<<tiles, kDThreads, 0, stream>>>(p, w);
    CSQ_CHECK_LAUNCH("direct_tile_sum_kernel<center_dk>");
    const dim3 seqs(unsigned(num_sequences(p)), unsigned(p.heads_k));
    direct_tile_scan_kernel<<<seqs, kDThreads, 0, stream>>>(p, w, true);
    CSQ_CHECK_LAUNCH("direct_tile_scan_kernel<center_dk>");
    direct_center_dk_kernel<T, Acc><<<tiles, kDThreads, 0, stream>>>(p, w);
    CSQ_CHECK_LAUNCH("direct_center_dk_kernel");
  }
  return Status{};
}

#define CSQ_INSTANTIATE(DT, MAP)                                                               \
  template Status launch_direct_fwd<DT, MAP>(const DirectFwdParams&, void*, size_t,              \
                                             cudaStream_t);                                      \
  template Status launch_direct_bwd<DT, MAP>(const DirectBwdParams&, void*, size_t, cudaStream_t);
CSQ_CUDA_FOR_EACH_LAUNCH(CSQ_INSTANTIATE)
#undef CSQ_INSTANTIATE

}  // namespace cuda
}  // namespace csq
