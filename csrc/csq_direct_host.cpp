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
  check_inputs(q, k, v, shift, eps, tile_size);
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

}  // namespace

DirectForwardCall prepare_direct_forward(const at::Tensor& q, const at::Tensor& k,
                                         const at::Tensor& v, const at::Tensor& shift,
                                         const c10::optional<at::Tensor>& cu_seqlens,
                                         const c10::optional<at::Tensor>& state_in,
                                         const c10::optional<at::Tensor>& ref_in, bool causal,
                                         double scale, bool center, bool normalize, double eps,
                                         int64_t tile_size, bool return_state,
                                         FeatureCount features) {
  DirectForwardCall c;
  DirectFwdParams& p = c.p;
  fill_direct_params(p, q, k, v, shift, cu_seqlens, causal, scale, center, normalize, eps,
                     tile_size, c.shift_acc, c.cu_seqlens);
  TORCH_CHECK(causal || !return_state, "csq_ext: return_state needs causal=True");
  set_carried_state(p, p, q, state_in, ref_in, features);
  const auto opts = q.options().dtype(acc_dtype(q.scalar_type()));
  c.y = at::empty({p.batch, p.heads_q, p.seqlen, p.dim_v}, opts);
  c.b = at::empty({p.batch, p.heads_q, p.seqlen}, opts);
  c.den = at::empty({p.batch, p.heads_q, p.seqlen}, opts);
  p.y = c.y.data_ptr();
  p.b = c.b.data_ptr();
  p.den = c.den.data_ptr();
  // ref_out only with a state: the outputs of a call without one do not depend on a ref.
  c.state = alloc_state_outputs(p, p, opts, return_state,
                                return_state || p.state_in != nullptr, features);
  return c;
}

DirectBackwardCall prepare_direct_backward(
    const at::Tensor& dy, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& shift, const c10::optional<at::Tensor>& cu_seqlens,
    const c10::optional<at::Tensor>& state_in, const at::Tensor& ref, const at::Tensor& y,
    const at::Tensor& b, const at::Tensor& den, const c10::optional<at::Tensor>& dstate_out,
    const c10::optional<at::Tensor>& dref_out, bool ref_given, bool causal, double scale, bool center,
    bool normalize, double eps, int64_t tile_size, FeatureCount features) {
  DirectBackwardCall c;
  DirectBwdParams& p = c.p;
  fill_direct_params(p, q, k, v, shift, cu_seqlens, causal, scale, center, normalize, eps,
                     tile_size, c.shift_acc, c.cu_seqlens);
  // ref is the forward's (empty without a state): the kernels read it instead of picking r.
  c.ref = ref.contiguous();
  set_carried_state(p, p, q, state_in, c.ref, features);
  TORCH_CHECK(p.state_in == nullptr || p.ref_in != nullptr,
              "csq_ext: state_in needs the forward's ref");
  set_backward_tensors(c, p, p, p, p, p, dy, q, k, v, shift, y, b, den, dstate_out, dref_out,
                       ref_given, /*with_ref=*/p.ref_in != nullptr, features);
  TORCH_CHECK(p.ref_in != nullptr || (p.dstate_out == nullptr && p.dref_out == nullptr),
              "csq_ext: the gradient of a returned state needs the forward's ref");
  return c;
}

}  // namespace csq
