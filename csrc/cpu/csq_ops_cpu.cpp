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

// A launcher template (launch_fwd, ...) for StateMap as a value, for run_for_dtype: a function
// template cannot be passed as an argument, a generic lambda can.
#define CSQ_CPU_LAUNCHER(NAME) \
  [](const auto& p, auto dtype_tag) { NAME<decltype(dtype_tag), StateMap>(p); }

// Runs launcher(p, scalar_t()) for the input dtype: the kernels' four (CSQ_CPU_INSTANTIATE);
// `op` names the op in errors.
template <typename Params, typename Launcher>
void run_for_dtype(const Params& p, at::ScalarType dtype, const char* op,
                   const Launcher& launcher) {
  switch (dtype) {
    case at::kDouble: return launcher(p, double());
    case at::kFloat: return launcher(p, float());
    case at::kHalf: return launcher(p, c10::Half());
    case at::kBFloat16: return launcher(p, c10::BFloat16());
    default:
      TORCH_CHECK(false, "csq_ext (CPU) ", op, ": unsupported dtype ", dtype,
                  "; supported: float64, float32, float16, bfloat16");
  }
}

// The chunked kernels check the float32 state's conditioning (csq_params.h): false when a
// query row needs the float64 rerun (the entry's). The backward makes the same test on the
// saved b and den.
template <typename Params, typename Launcher>
bool run_checking_state(Params& p, at::ScalarType dtype, const char* op,
                        const Launcher& launcher) {
  int too_coarse = 0;
  p.state_condition_limit = state_condition_limit(dtype);
  p.state_too_coarse = &too_coarse;
  run_for_dtype(p, dtype, op, launcher);
  p.state_too_coarse = nullptr;
  return too_coarse == 0;
}

// The CPU run functions of the entries (register_backend).
struct CpuRuns {
  static bool chunked_forward(ForwardCall& call, const OpInputs& in, bool /*return_state*/) {
    return run_checking_state(call.p, in.q.scalar_type(), "csq_chunked_fwd",
                              CSQ_CPU_LAUNCHER(launch_fwd));
  }

  static bool chunked_backward(BackwardCall& call, const OpInputs& in) {
    return run_checking_state(call.p, in.q.scalar_type(), "csq_chunked_bwd",
                              CSQ_CPU_LAUNCHER(launch_bwd));
  }

  static bool direct_forward(DirectForwardCall& call, const OpInputs& in, bool /*return_state*/) {
    run_for_dtype(call.p, in.q.scalar_type(), "csq_direct_fwd",
                  CSQ_CPU_LAUNCHER(launch_direct_fwd));
    return true;
  }

  static bool direct_backward(DirectBackwardCall& call, const OpInputs& in) {
    run_for_dtype(call.p, in.q.scalar_type(), "csq_direct_bwd",
                  CSQ_CPU_LAUNCHER(launch_direct_bwd));
    return true;
  }

  static void state(StateCall& call, const OpInputs& in) {
    run_for_dtype(call.p, in.k.scalar_type(), "csq_state", CSQ_CPU_LAUNCHER(launch_state));
  }

  static void state_backward(StateBackwardCall& call, const OpInputs& in) {
    run_for_dtype(call.p, in.k.scalar_type(), "csq_state_bwd", CSQ_CPU_LAUNCHER(launch_state_bwd));
  }

  static void decode(const DecodeParams& p, const OpInputs& in, const char* op) {
    run_for_dtype(p, in.q.scalar_type(), op, CSQ_CPU_LAUNCHER(launch_decode));
  }

  // The pool's prefill is the chunked forward over the pool's slots (StatePool); its float32
  // state is not checked (p.state_too_coarse stays null).
  static void pool_prefill(PoolPrefillCall& call, const OpInputs& in) {
    if (call.empty) return;
    run_for_dtype(call.p, in.q.scalar_type(), "csq_pool_prefill_", CSQ_CPU_LAUNCHER(launch_fwd));
  }
};

}  // namespace
}  // namespace cpu
}  // namespace csq

TORCH_LIBRARY_IMPL(csq_ext, CPU, m) { csq::register_backend<csq::cpu::CpuRuns>(m); }
