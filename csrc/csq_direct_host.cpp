#include "csq_direct_host.h"

#include <ATen/Parallel.h>

#include <algorithm>

namespace csq {
namespace {

// The forward's parameters, shared by both directions: checks, sizes, scalars, packed
// sequences and the tile length.
void fill_direct_params(DirectFwdParams& p, const at::Tensor& q, const at::Tensor& k,
                        const at::Tensor& v, const at::Tensor& shift,
                        const c10::optional<at::Tensor>& cu_seqlens, bool causal, double scale,
                        bool center, bool normalize, double eps, int64_t tile_size,
                        at::Tensor& shift_acc, at::Tensor& cu) {
  check_inputs(q, k, v, shift, eps, 0);
  TORCH_CHECK(tile_size >= 0, "csq_ext: tile_size (chunk_size of csq_ext.attention) must be >= 0 "
              "(0 = default), got ", tile_size);
  shift_acc = shift.to(acc_dtype(q.scalar_type())).contiguous();
  fill_qkv_params(p, q, k, v, shift_acc, causal, scale, center, normalize, eps);
  cu = set_packed_sequences(p, q, cu_seqlens);
  p.tile = tile_size > 0 ? tile_size
                         : default_direct_tile(p, q.is_cuda(), at::get_num_threads());
  // A knob never allocates by its own value: at most the sequence and kMaxDirectTile; and
  // never shorter than kMinDirectTile (or the sequence), so that it never costs digits.
  p.tile = std::max<int64_t>(1, std::min({std::max(p.tile, kMinDirectTile), p.seqlen,
                                          kMaxDirectTile}));
}

// An optional per-query input of the forward (row_shift, row_sums): shape (B, Hq, N, extra...),
// on q's device, floating point; returned contiguous in the accumulation dtype (an undefined
// tensor when absent).
at::Tensor per_query_input(const c10::optional<at::Tensor>& t, const char* name,
                           const at::Tensor& q, c10::IntArrayRef expected) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK(t->device() == q.device(), "csq_ext: ", name, " must be on ", q.device(),
              " like q, got ", t->device());
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), "csq_ext: ", name,
              " must be a floating-point tensor, got ", t->scalar_type());
  TORCH_CHECK(t->sizes() == expected, "csq_ext: ", name, " must have shape ", expected,
              ", got ", t->sizes());
  return t->to(acc_dtype(q.scalar_type())).contiguous();
}

}  // namespace

DirectForwardCall prepare_direct_forward(const at::Tensor& q, const at::Tensor& k,
                                         const at::Tensor& v, const at::Tensor& shift,
                                         const c10::optional<at::Tensor>& cu_seqlens,
                                         const c10::optional<at::Tensor>& row_shift,
                                         const c10::optional<at::Tensor>& row_sums,
                                         bool causal, double scale, bool center, bool normalize,
                                         double eps, int64_t tile_size) {
  DirectForwardCall c;
  DirectFwdParams& p = c.p;
  fill_direct_params(p, q, k, v, shift, cu_seqlens, causal, scale, center, normalize, eps,
                     tile_size, c.shift_acc, c.cu_seqlens);
  c.row_shift = per_query_input(row_shift, "row_shift", q, {p.batch, p.heads_q, p.seqlen});
  c.row_sums = per_query_input(row_sums, "row_sums", q,
                               {p.batch, p.heads_q, p.seqlen, p.dim_v + 1});
  p.row_shift = c.row_shift.defined() ? c.row_shift.data_ptr() : nullptr;
  p.row_sums = c.row_sums.defined() ? c.row_sums.data_ptr() : nullptr;
  const auto opts = q.options().dtype(acc_dtype(q.scalar_type()));
  c.y = at::empty({p.batch, p.heads_q, p.seqlen, p.dim_v}, opts);
  c.b = at::empty({p.batch, p.heads_q, p.seqlen}, opts);
  c.den = at::empty({p.batch, p.heads_q, p.seqlen}, opts);
  p.y = c.y.data_ptr();
  p.b = c.b.data_ptr();
  p.den = c.den.data_ptr();
  return c;
}

DirectBackwardCall prepare_direct_backward(const at::Tensor& dy, const at::Tensor& q,
                                           const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& shift,
                                           const c10::optional<at::Tensor>& cu_seqlens,
                                           const at::Tensor& y, const at::Tensor& b,
                                           const at::Tensor& den, bool causal, double scale,
                                           bool center, bool normalize, double eps,
                                           int64_t tile_size) {
  DirectBackwardCall c;
  DirectBwdParams& p = c.p;
  c.input_dtype = q.scalar_type();
  c.shift_dtype = shift.scalar_type();
  fill_direct_params(p, q, k, v, shift, cu_seqlens, causal, scale, center, normalize, eps,
                     tile_size, c.shift_acc, c.cu_seqlens);
  const SavedForward saved = set_saved_forward(p, q, v, dy, y, b, den);
  c.y = saved.y;
  c.b = saved.b;
  c.den = saved.den;
  const GradientTensors g = alloc_gradients(p, q, k, v);
  c.dq = g.dq;
  c.dk = g.dk;
  c.dv = g.dv;
  c.db = g.db;
  return c;
}

}  // namespace csq
