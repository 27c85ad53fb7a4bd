// Launchers of the CUDA direct path, for the four input dtypes (README.md, "Direct path").
// Forward:
//   1. cu_seqlens: the first tile slot of each sequence          direct_tile_map_kernel
//   2. per-tile key sums (float64) and their scan                  direct_tile_sum/scan_kernel
//   3. r_T per query tile, mu_i - r_T, b_i                        direct_rows_kernel
//   4. the tiles: y, den                                          direct_fwd_kernel
//      (bfloat16 / float16: direct_fwd_mma_kernel, on tensor cores, unless
//      p.tensor_core_passes == 0; likewise the backward's dq and dk / dv kernels)
// Backward: 1-3 (without b: the forward's is read), the per-row terms (direct_row_grad_kernel),
// dq and db (direct_dq_kernel), dk and dv (direct_dkdv_kernel), then with centering the dk
// term of the key means: per-tile sums, their reverse scan, direct_center_dk_kernel.
#include "csq_direct_bwd.cuh"
#include "csq_direct_fwd.cuh"
#include "csq_direct_mma.cuh"
#include "csq_launch_util.cuh"

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

template <typename Acc>
constexpr size_t tile_smem_bytes() {
  return sizeof(Acc) * size_t(kDirectSmemElems);
}

// Steps 1-3: the tile map, the key sums, r_T, mu_i - r_T and (forward) b.
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

}  // namespace

template <DType DT>
Status launch_direct_fwd(const DirectFwdParams& p, void* workspace, size_t workspace_bytes,
                         cudaStream_t stream) {
  using T = typename DTypeOf<DT>::type;
  using Acc = typename GenericTraits<DT>::Acc;
  Status st = check_direct_shapes(p);
  if (!st.ok()) return st;
  if (p.batch * p.heads_q * p.seqlen == 0) return Status{};
  DirectWork w;
  if (workspace_bytes < carve_direct(p, DT, false, workspace, &w))
    return Status{cudaErrorInvalidValue, "launch_direct_fwd", "workspace too small"};
  st = launch_direct_rows<T, Acc>(p, w, true, stream);
  if (!st.ok()) return st;
  const dim3 grid(unsigned(w.slots), unsigned(p.heads_q), unsigned(ceil_div(p.dim_v, kT)));
  if constexpr (kHalfInput<DT>) {
    if (p.tensor_core_passes > 0)
      return launch_tiles(direct_fwd_mma_kernel<T>, grid, MmaSmem<T>::kBytes, p, w, stream,
                          "direct_fwd_mma_kernel");
  }
  return launch_tiles(direct_fwd_kernel<T, Acc>, grid, tile_smem_bytes<Acc>(), p, w, stream,
                      "direct_fwd_kernel");
}

template <DType DT>
Status launch_direct_bwd(const DirectBwdParams& p, void* workspace, size_t workspace_bytes,
                         cudaStream_t stream) {
  using T = typename DTypeOf<DT>::type;
  using Acc = typename GenericTraits<DT>::Acc;
  Status st = check_direct_shapes(p);
  if (!st.ok()) return st;
  if (p.batch * p.heads_q * p.seqlen == 0) return Status{};
  DirectWork w;
  if (workspace_bytes < carve_direct(p, DT, true, workspace, &w))
    return Status{cudaErrorInvalidValue, "launch_direct_bwd", "workspace too small"};
  st = launch_direct_rows<T, Acc>(p, w, false, stream);
  if (!st.ok()) return st;
  const int64_t rows = p.batch * p.heads_q * p.seqlen;
  const unsigned row_blocks = unsigned(ceil_div(rows, kDThreads / 32));
  direct_row_grad_kernel<Acc><<<row_blocks, kDThreads, 0, stream>>>(p, w);
  CSQ_CHECK_LAUNCH("direct_row_grad_kernel");
  const unsigned nbk = unsigned(ceil_div(p.dim_k, kT)), nbv = unsigned(ceil_div(p.dim_v, kT));
  const dim3 dq_grid(unsigned(w.slots), unsigned(p.heads_q), nbk);
  const dim3 dkdv_grid(unsigned(w.slots), unsigned(p.heads_k), nbk + nbv);
  bool done = false;
  if constexpr (kHalfInput<DT>) {
    if (p.tensor_core_passes > 0) {
      st = launch_tiles(direct_dq_mma_kernel<T>, dq_grid, MmaSmem<T>::kBytes, p, w, stream,
                        "direct_dq_mma_kernel");
      if (!st.ok()) return st;
      st = launch_tiles(direct_dkdv_mma_kernel<T>, dkdv_grid, MmaSmem<T>::kBytes, p, w, stream,
                        "direct_dkdv_mma_kernel");
      if (!st.ok()) return st;
      done = true;
    }
  }
  if (!done) {
    st = launch_tiles(direct_dq_kernel<T, Acc>, dq_grid, tile_smem_bytes<Acc>(), p, w, stream,
                      "direct_dq_kernel");
    if (!st.ok()) return st;
    st = launch_tiles(direct_dkdv_kernel<T, Acc>, dkdv_grid, tile_smem_bytes<Acc>(), p, w,
                      stream, "direct_dkdv_kernel");
    if (!st.ok()) return st;
  }
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

template Status launch_direct_fwd<DType::kFloat64>(const DirectFwdParams&, void*, size_t,
                                                   cudaStream_t);
template Status launch_direct_fwd<DType::kFloat32>(const DirectFwdParams&, void*, size_t,
                                                   cudaStream_t);
template Status launch_direct_fwd<DType::kFloat16>(const DirectFwdParams&, void*, size_t,
                                                   cudaStream_t);
template Status launch_direct_fwd<DType::kBFloat16>(const DirectFwdParams&, void*, size_t,
                                                    cudaStream_t);
template Status launch_direct_bwd<DType::kFloat64>(const DirectBwdParams&, void*, size_t,
                                                   cudaStream_t);
template Status launch_direct_bwd<DType::kFloat32>(const DirectBwdParams&, void*, size_t,
                                                   cudaStream_t);
template Status launch_direct_bwd<DType::kFloat16>(const DirectBwdParams&, void*, size_t,
                                                   cudaStream_t);
template Status launch_direct_bwd<DType::kBFloat16>(const DirectBwdParams&, void*, size_t,
                                                    cudaStream_t);

}  // namespace cuda
}  // namespace csq
