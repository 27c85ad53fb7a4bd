// Test-only harness (built by tests/test_feature_map.py, never by setup.py or CMake): the CPU
// kernels of every op instantiated for a second feature map, LinearMap (csq_linear_map.h), in
// float64, behind functions with the ops' arguments and the shared host layer's checks and
// outputs. That the same kernel files compile and compute the toy map's attention, state and
// gradients shows the feature-map policy (csq_feature_map.h) is the kernels' only view of the
// map.
#define CSQ_TEST_FEATURE_MAPS
#define CSQ_CPU_INSTANTIATE(NAME, PARAMS)  // instantiated below on use, for LinearMap only

#include <torch/extension.h>

#include <tuple>

#include "../csq_direct_host.h"
#include "../csq_feature_map_table.h"
#include "../csq_host.h"
// The kernel files themselves: their templates, instantiated here for LinearMap.
#include "../cpu/csq_chunked_bwd_kernel.cpp"
#include "../cpu/csq_chunked_fwd_kernel.cpp"
#include "../cpu/csq_decode_kernel.cpp"
#include "../cpu/csq_direct_bwd_kernel.cpp"
#include "../cpu/csq_direct_fwd_kernel.cpp"

namespace {

using Map = csq::LinearMap;
using Opt = c10::optional<at::Tensor>;

void float64_only(const at::Tensor& q) {
  TORCH_CHECK(q.scalar_type() == at::kDouble, "the test maps are instantiated for float64 only");
}

// Both algorithms' forward ops take the same arguments: Prepare is the shared host layer's
// prepare_forward or prepare_direct_forward (given the toy map's feature count), Launch the CPU
// launcher of that algorithm, instantiated here for LinearMap.
template <auto Prepare, auto Launch>
csq::ForwardResult forward_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& shift, const Opt& cu_seqlens, const Opt& state_in,
                           const Opt& ref_in, bool causal, double scale, bool center,
                           bool normalize, double eps, int64_t tile_size, bool return_state) {
  float64_only(q);
  const auto call = Prepare(q, k, v, shift, cu_seqlens, state_in, ref_in, causal, scale, center,
                            normalize, eps, tile_size, return_state, &Map::num_features);
  Launch(call.p);
  return call.outputs();
}

// The same for the backward ops (prepare_backward or prepare_direct_backward).
template <auto Prepare, auto Launch>
csq::BackwardResult backward_op(const at::Tensor& dy, const at::Tensor& q, const at::Tensor& k,
                             const at::Tensor& v, const at::Tensor& shift, const Opt& cu_seqlens,
                             const Opt& state_in, const at::Tensor& ref, const at::Tensor& y,
                             const at::Tensor& b, const at::Tensor& den, const Opt& dstate_out,
                             const Opt& dref_out, bool ref_given, bool causal, double scale,
                             bool center, bool normalize, double eps, int64_t tile_size) {
  float64_only(q);
  const auto call = Prepare(dy, q, k, v, shift, cu_seqlens, state_in, ref, y, b, den, dstate_out,
                            dref_out, ref_given, causal, scale, center, normalize, eps, tile_size,
                            &Map::num_features);
  Launch(call.p);
  return call.outputs();
}

void decode_(at::Tensor& sums, at::Tensor& ref, const at::Tensor& q, const at::Tensor& k,
             const at::Tensor& v, const at::Tensor& shift, at::Tensor& y, double scale,
             bool center, bool normalize, double eps) {
  float64_only(q);
  const csq::DecodeParams p = csq::prepare_decode(sums, ref, q, k, v, shift, y, scale, center,
                                                  normalize, eps, &Map::num_features);
  csq::cpu::launch_decode<double, Map>(p);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("feature_map_rows", &csq::feature_map_table<Map>);
  m.def("chunked_fwd",
        &forward_op<&csq::prepare_forward, &csq::cpu::launch_fwd<double, Map>>);
  m.def("chunked_bwd",
        &backward_op<&csq::prepare_backward, &csq::cpu::launch_bwd<double, Map>>);
  m.def("decode_", &decode_);
  m.def("direct_fwd",
        &forward_op<&csq::prepare_direct_forward, &csq::cpu::launch_direct_fwd<double, Map>>);
  m.def("direct_bwd",
        &backward_op<&csq::prepare_direct_backward, &csq::cpu::launch_direct_bwd<double, Map>>);
}
