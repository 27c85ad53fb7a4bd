#include "csq_host.h"

#include <algorithm>

namespace csq {

at::ScalarType acc_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& shift, double eps, int64_t chunk_size) {
  TORCH_CHECK(q.dim() == 4, "csq_ext: q must have shape (B, Hq, N, Dk), got ", q.sizes());
  TORCH_CHECK(k.dim() == 4, "csq_ext: k must have shape (B, Hk, N, Dk), got ", k.sizes());
  TORCH_CHECK(v.dim() == 4, "csq_ext: v must have shape (B, Hk, N, Dv), got ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0),
              "csq_ext: q, k, v must share the batch size B");
  TORCH_CHECK(k.size(2) == q.size(2) && v.size(2) == q.size(2),
              "csq_ext: q, k, v must share the length N");
  TORCH_CHECK(k.size(3) == q.size(3), "csq_ext: k must have Dk = q.size(-1) = ", q.size(3));
  TORCH_CHECK(q.size(3) > 0 && v.size(3) > 0, "csq_ext: head sizes Dk and Dv must be positive");
  TORCH_CHECK(v.size(1) == k.size(1), "csq_ext: v must have Hk = k.size(1) = ", k.size(1));
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0,
              "csq_ext: Hq = ", q.size(1), " must be a multiple of Hk = ", k.size(1));
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "csq_ext: q, k, v must share one dtype");
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), "csq_ext: q, k, v must be floating point");
  TORCH_CHECK(q.device() == k.device() && q.device() == v.device() &&
                  q.device() == shift.device(),
              "csq_ext: q, k, v, shift must be on one device");
  TORCH_CHECK(shift.dim() == 1 && shift.size(0) == q.size(1),
              "csq_ext: shift must have shape (Hq,) = (", q.size(1), ",), got ", shift.sizes());
  TORCH_CHECK(at::isFloatingType(shift.scalar_type()), "csq_ext: shift must be floating point");
  TORCH_CHECK(eps >= 0, "csq_ext: eps must be >= 0, got ", eps);
  TORCH_CHECK(chunk_size >= 0, "csq_ext: chunk_size must be >= 0 (0 = default)");
}

int64_t default_chunk(int64_t dim_k, bool on_cuda) {
  if (on_cuda) return 64;
  // The state GEMMs are (C x F) by (F x Dv); a longer chunk makes them more efficient while the
  // C x C block inside a chunk stays cheap next to them. Measured in bench/NOTES.md.
  return dim_k <= 32 ? 128 : 64;
}

AttnParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& shift_acc, bool causal, double scale, bool center,
                       bool normalize, double eps, int64_t chunk_size) {
  AttnParams p;
  p.batch = q.size(0);
  p.heads_q = q.size(1);
  p.heads_k = k.size(1);
  p.seqlen = q.size(2);
  p.dim_k = q.size(3);
  p.dim_v = v.size(3);
  p.group = p.heads_q / p.heads_k;
  for (int i = 0; i < 4; ++i) {
    p.q_stride[i] = q.stride(i);
    p.k_stride[i] = k.stride(i);
    p.v_stride[i] = v.stride(i);
  }
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.shift = shift_acc.data_ptr();
  p.scale = scale;
  p.eps = eps;
  p.causal = causal;
  p.center = center;
  p.normalize = normalize;
  p.chunk = chunk_size > 0 ? chunk_size : default_chunk(p.dim_k, q.is_cuda());
  // A chunk longer than the sequence only wastes workspace.
  p.chunk = std::max<int64_t>(1, std::min(p.chunk, p.seqlen));
  return p;
}

}  // namespace csq
