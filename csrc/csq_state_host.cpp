#include "csq_state_host.h"

#include <algorithm>

namespace csq {
namespace {

// The keys' and values' parameters (the q fields mirror k: there are no queries), the block
// length, packed sequences and the carried state.
void fill_state_params(StateParams& p, const at::Tensor& k, const at::Tensor& v,
                       const c10::optional<at::Tensor>& cu_seqlens,
                       const c10::optional<at::Tensor>& state_in,
                       const c10::optional<at::Tensor>& ref_in, int64_t tile_size,
                       FeatureCount features, at::Tensor& cu) {
  TORCH_CHECK(k.dim() == 4, "csq_ext.state: k must have shape (B, Hk, N, Dk), got ", k.sizes());
  TORCH_CHECK(v.dim() == 4 && v.size(0) == k.size(0) && v.size(1) == k.size(1) &&
                  v.size(2) == k.size(2),
              "csq_ext.state: v must have shape (B, Hk, N, Dv) like k ", k.sizes(), ", got ",
              v.sizes());
  TORCH_CHECK(k.size(1) > 0 && k.size(3) > 0 && v.size(3) > 0,
              "csq_ext.state: Hk, Dk and Dv must be positive");
  TORCH_CHECK(k.scalar_type() == v.scalar_type() && at::isFloatingType(k.scalar_type()),
              "csq_ext.state: k and v must share one floating dtype");
  TORCH_CHECK(k.device() == v.device(), "csq_ext.state: k and v must be on one device");
  TORCH_CHECK(tile_size >= 0, "csq_ext: tile_size must be >= 0 (0 = default), got ", tile_size);
  fill_qkv_params(p, k, k, v, k, /*causal=*/true, 1.0, true, true, 0.0);
  p.shift = nullptr;
  p.chunk = tile_size > 0 ? tile_size : default_chunk(p.dim_k, k.is_cuda());
  p.chunk = std::max<int64_t>(1, std::min(p.chunk, p.seqlen));
  cu = set_packed_sequences(p, k, cu_seqlens);
  set_carried_state(p, p, k, state_in, ref_in, features);
}

}  // namespace

StateCall prepare_state(const at::Tensor& k, const at::Tensor& v,
                        const c10::optional<at::Tensor>& cu_seqlens,
                        const c10::optional<at::Tensor>& state_in,
                        const c10::optional<at::Tensor>& ref_in, int64_t tile_size,
                        FeatureCount features) {
  StateCall c;
  fill_state_params(c.p, k, v, cu_seqlens, state_in, ref_in, tile_size, features, c.cu_seqlens);
  const auto opts = k.options().dtype(acc_dtype(k.scalar_type()));
  c.state = alloc_state_outputs(c.p, c.p, opts, true, true, features);
  return c;
}

StateBackwardCall prepare_state_backward(const at::Tensor& k, const at::Tensor& v,
                                         const c10::optional<at::Tensor>& cu_seqlens,
                                         const c10::optional<at::Tensor>& state_in,
                                         const at::Tensor& ref,
                                         const c10::optional<at::Tensor>& dstate_out,
                                         const c10::optional<at::Tensor>& dref_out, bool ref_given,
                                         int64_t tile_size, FeatureCount features) {
  StateBackwardCall c;
  StateBwdParams& p = c.p;
  c.input_dtype = k.scalar_type();
  c.ref = ref.contiguous();
  fill_state_params(p, k, v, cu_seqlens, state_in, c.ref, tile_size, features, c.cu_seqlens);
  TORCH_CHECK(p.ref_in != nullptr, "csq_ext.state backward: ref must be the forward's ref");
  const auto opts = k.options().dtype(acc_dtype(k.scalar_type()));
  c.dk = at::zeros(k.sizes(), opts);
  c.dv = at::zeros(v.sizes(), opts);
  p.dk = c.dk.data_ptr();
  p.dv = c.dv.data_ptr();
  c.state = set_state_gradients(p, p, p, opts, dstate_out, dref_out, ref_given, true, features);
  return c;
}

}  // namespace csq
