// Decode launcher: the in-place step of csq_decode_ (csq_decode.cuh), for the four input dtypes.
//   1. the value columns of the state += psi v, and y, by column tiles     decode_kernel
//   2. the last column (key sums, count) += psi; ref of an empty state      decode_count_kernel
// With a pool (csq_pool_decode_) each sequence's state is its slot's, fresh slots zeroed first.
// No workspace, no allocation: the state and y are the only memory written.
#include "csq_decode.cuh"
#include "csq_launch_checks.cuh"
#include "csq_pool.cuh"

namespace csq {
namespace cuda {

template <DType DT, typename Map>
Status launch_decode(const DecodeParams& p, cudaStream_t stream) {
  using Tr = GenericTraits<DT>;
  using T = typename Tr::T;
  using Acc = typename Tr::Acc;

  if (p.seqlen != 1)
    return Status{cudaErrorInvalidValue, "launch_decode", "decode takes one token (N = 1)"};
  Status st = check_shapes(p);
  if (!st.ok()) return st;
  if (p.ref == nullptr || p.sums == nullptr || p.y == nullptr)
    return Status{cudaErrorInvalidValue, "launch_decode", "sums, ref and y are required"};
  if (p.batch * p.heads_k == 0) return Status{};
  const unsigned bhk = unsigned(p.batch * p.heads_k);
  // A fresh pool slot starts empty (csq_pool.cuh).
  st = launch_pool_fresh<Acc>(p.pool, p.batch, p.heads_k,
                              state_head_elems<Map>(p.dim_k, p.dim_v), p.sums, stream);
  if (!st.ok()) return st;
  const unsigned col_tiles = unsigned(ceil_div(p.dim_v, kDecCols));
  decode_kernel<T, Acc, Map><<<dim3(bhk, col_tiles), kThreads,
                               decode_smem_bytes<Acc>(int(p.dim_k)), stream>>>(p);
  CSQ_CHECK_LAUNCH("decode_kernel");
  decode_count_kernel<T, Acc, Map><<<bhk, kThreads, 0, stream>>>(p);
  CSQ_CHECK_LAUNCH("decode_count_kernel");
  return Status{};
}

#define CSQ_INSTANTIATE(DT, MAP) \
  template Status launch_decode<DT, MAP>(const DecodeParams&, cudaStream_t);
CSQ_CUDA_FOR_EACH_LAUNCH(CSQ_INSTANTIATE)
#undef CSQ_INSTANTIATE

}  // namespace cuda
}  // namespace csq
