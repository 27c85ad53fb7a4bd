// The CPU backend of every op: the shared entries (../csq_op_entries.h: the schema's arguments,
// the host layer's checks, params and outputs) with the CPU's run functions, which launch the
// kernels (csq_*_kernel.cpp, through csq_cpu_launch.h) for the input dtype. The kernels run
// the whole op on the ATen thread pool.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../csq_op_entries.h"
#include "csq_cpu_launch.h"

namespace csq {
namespace cpu {
namespace {

// Runs launch(scalar_t()) for the input dtype: the kernels' four (CSQ_CPU_INSTANTIATE).
template <typename Launch>
void for_input_dtype(at::ScalarType dtype, const char* op, const Launch& launch) {
  switch (dtype) {
    case at::kDouble: return launch(double());
    case at::kFloat: return launch(float());
    case at::kHalf: return launch(c10::Half());
    case at::kBFloat16: return launch(c10::BFloat16());
    default:
      TORCH_CHECK(false, "csq_ext (CPU) ", op, ": unsupported dtype ", dtype,
                  "; supported: float64, float32, float16, bfloat16");
  }
}

// The chunked kernels check the float32 state's conditioning (csq_params.h): false when a
// query row needs the float64 rerun (the entry's). The backward makes the same test on the
// saved b and den.
template <typename Launch>
bool run_checking_state(FwdParams& p, at::ScalarType dtype, const char* op,
                        const Launch& launch) {
  int too_coarse = 0;
  p.state_condition_limit = state_condition_limit(dtype);
  p.state_too_coarse = &too_coarse;
  for_input_dtype(dtype, op, launch);
  p.state_too_coarse = nullptr;
  return too_coarse == 0;
}

bool run_chunked_forward(ForwardCall& call, const OpInputs& in, bool /*return_state*/) {
  return run_checking_state(call.p, in.q.scalar_type(), "csq_chunked_fwd", [&](auto t) {
    launch_fwd<decltype(t), StateMap>(call.p);
  });
}

bool run_chunked_backward(BackwardCall& call, const OpInputs& in) {
  return run_checking_state(call.p, in.q.scalar_type(), "csq_chunked_bwd", [&](auto t) {
    launch_bwd<decltype(t), StateMap>(call.p);
  });
}

bool run_direct_forward(DirectForwardCall& call, const OpInputs& in, bool /*return_state*/) {
  for_input_dtype(in.q.scalar_type(), "csq_direct_fwd",
                  [&](auto t) { launch_direct_fwd<decltype(t), StateMap>(call.p); });
  return true;
}

bool run_direct_backward(DirectBackwardCall& call, const OpInputs& in) {
  for_input_dtype(in.q.scalar_type(), "csq_direct_bwd",
                  [&](auto t) { launch_direct_bwd<decltype(t), StateMap>(call.p); });
  return true;
}

void run_state(StateCall& call, const OpInputs& in) {
  for_input_dtype(in.k.scalar_type(), "csq_state",
                  [&](auto t) { launch_state<decltype(t), StateMap>(call.p); });
}

void run_state_backward(StateBackwardCall& call, const OpInputs& in) {
  for_input_dtype(in.k.scalar_type(), "csq_state_bwd",
                  [&](auto t) { launch_state_bwd<decltype(t), StateMap>(call.p); });
}

void run_decode(const DecodeParams& p, const OpInputs& in, const char* op) {
  for_input_dtype(in.q.scalar_type(), op,
                  [&](auto t) { launch_decode<decltype(t), StateMap>(p); });
}

// The pool's prefill is the chunked forward over the pool's slots (StatePool); its float32
// state is not checked (p.state_too_coarse stays null).
void run_pool_prefill(PoolPrefillCall& call, const OpInputs& in) {
  if (call.empty) return;
  for_input_dtype(in.q.scalar_type(), "csq_pool_prefill_",
                  [&](auto t) { launch_fwd<decltype(t), StateMap>(call.p); });
}

}  // namespace
}  // namespace cpu
}  // namespace csq

TORCH_LIBRARY_IMPL(csq_ext, CPU, m) {
  using namespace csq;
  using namespace csq::cpu;
  m.impl("csq_chunked_fwd", &forward_entry<&prepare_forward, &run_chunked_forward>);
  m.impl("csq_chunked_bwd", &backward_entry<&prepare_backward, &run_chunked_backward>);
  m.impl("csq_direct_fwd", &forward_entry<&prepare_direct_forward, &run_direct_forward>);
  m.impl("csq_direct_bwd", &backward_entry<&prepare_direct_backward, &run_direct_backward>);
  m.impl("csq_state", &state_entry<&run_state>);
  m.impl("csq_state_bwd", &state_backward_entry<&run_state_backward>);
  m.impl("csq_decode_", &decode_entry<&run_decode>);
  m.impl("csq_pool_decode_", &pool_decode_entry<&run_decode>);
  m.impl("csq_pool_prefill_", &pool_prefill_entry<&run_pool_prefill>);
}
