#include "csq_direct_host.h"

#include <algorithm>

#include "csq_host.h"

namespace csq {

DirectParams make_direct_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& shift_acc,
                                const c10::optional<at::Tensor>& cu_seqlens, bool causal,
                                double scale, bool center, bool normalize, double eps,
                                int64_t tile_size, at::Tensor& cu) {
  check_inputs(q, k, v, shift_acc, eps, 0);
  TORCH_CHECK(tile_size >= 0, "csq_ext: tile_size (chunk_size of csq_ext.attention) must be >= 0 "
              "(0 = default), got ", tile_size);
  DirectParams p;
  static_cast<AttnParams&>(p) =
      make_params(q, k, v, shift_acc, causal, scale, center, normalize, eps, 0);
  cu = set_sequence_params(p, q, cu_seqlens, c10::nullopt, c10::nullopt);
  p.tile = tile_size > 0 ? tile_size : default_direct_tile(p.dim_k, q.is_cuda());
  return p;
}

DirectForwardTensors alloc_direct_forward(DirectParams& p, const at::Tensor& q) {
  const auto opts = q.options().dtype(acc_dtype(q.scalar_type()));
  DirectForwardTensors t{at::empty({p.batch, p.heads_q, p.seqlen, p.dim_v}, opts),
                         at::empty({p.batch, p.heads_q, p.seqlen}, opts),
                         at::empty({p.batch, p.heads_q, p.seqlen}, opts)};
  p.y = t.y.data_ptr();
  p.b = t.b.data_ptr();
  p.den = t.den.data_ptr();
  return t;
}

}  // namespace csq
