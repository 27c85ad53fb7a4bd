// The torch-free interface between the CUDA host file (csq_ops_cuda.cpp) and the
// launchers (csq_chunked_{fwd,bwd}_launch.cu, csq_state_launch.cu, csq_decode_launch.cu). Only csq_params.h, the CUDA
// runtime and standard headers: the launchers compile with nvcc alone.
//
// The caller fills the op's params (csq::prepare_forward / prepare_backward / prepare_decode,
// csq_host.h: outputs allocated), allocates a device workspace of *_workspace_bytes bytes,
// and calls the launcher for the input dtype on its stream. Launchers never throw and never synchronize: they enqueue kernels and report the
// first failure (a launch error, or a shape the kernels do not support) in a Status.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "../csq_feature_maps.h"
#include "../csq_params.h"

namespace csq {
namespace cuda {

// Input dtypes. float64 accumulates in float64, the others in float32.
enum class DType : int { kFloat64 = 0, kFloat32 = 1, kFloat16 = 2, kBFloat16 = 3 };

inline constexpr size_t acc_size(DType dt) { return dt == DType::kFloat64 ? 8 : 4; }

// Largest head sizes the kernels support, Dk and Dv each (256: Gemma's heads). Shared memory is
// sized from the actual ones, so small heads pay nothing for the limit.
constexpr int64_t kMaxHeadDim = 256;
// Chunk length on the GPU. FwdParams::chunk is a CPU tuning knob and is ignored here: the
// result does not depend on the chunk length (the spec), and the GPU kernels are tiled for this.
constexpr int64_t kChunk = 64;

struct Status {
  cudaError_t code = cudaSuccess;
  const char* where = "";          // the kernel or call that failed
  const char* message = nullptr;   // set for refusals that are not CUDA errors
  bool ok() const { return code == cudaSuccess; }
};

// Returns the Status of the expression `...` (variadic: a template's commas may stand in it)
// from the enclosing launcher when it is a failure.
#define CSQ_RETURN_IF_FAILED(...)                      \
  do {                                                 \
    const ::csq::cuda::Status csq_st_ = (__VA_ARGS__); \
    if (!csq_st_.ok()) return csq_st_;                 \
  } while (0)

// Every launcher takes the feature map Map (csq_feature_maps.h): StateMap, the map of every op
// that ships; the emulator also instantiates the tests' maps (CSQ_TEST_FEATURE_MAPS). A
// launcher with a device workspace has one signature, declared by this macro (for any op's
// params, here and in csq_direct_launch.h):
//   template <DType DT, typename Map = StateMap>
//   Status NAME(const PARAMS& p, void* workspace, size_t workspace_bytes, cudaStream_t stream);
#define CSQ_CUDA_WORKSPACE_LAUNCHER(NAME, PARAMS) \
  template <DType DT, typename Map = StateMap>     \
  Status NAME(const PARAMS& p, void* workspace, size_t workspace_bytes, cudaStream_t stream)
// Its explicit instantiation for (DT, MAP), defined in the launcher's .cu file.
#define CSQ_CUDA_EXTERN_WORKSPACE_LAUNCHER(NAME, PARAMS, DT, MAP) \
  extern template Status NAME<DT, MAP>(const PARAMS&, void*, size_t, cudaStream_t);

// Bytes of device scratch memory the launchers need, 256-byte aligned pieces. See README.md.
size_t fwd_workspace_bytes(const FwdParams& p, DType dt);
size_t bwd_workspace_bytes(const BwdParams& p, DType dt);

// Forward. Reads q, k, v (strided), shift, state_in / ref_in if given; writes y, b, den,
// ref_out and state_out if given (the host layer's contract, csq_host.h).
CSQ_CUDA_WORKSPACE_LAUNCHER(launch_fwd, FwdParams);

// Backward. Reads q, k, v, dy (strided), the forward's y, b, den, ref (ref_in), shift,
// state_in and dstate_out if given; writes dq, dk, dv, db, dref and dstate_in if given (the
// host layer's contract). Zeroes every output itself first.
CSQ_CUDA_WORKSPACE_LAUNCHER(launch_bwd, BwdParams);

// One decoding step in place (csq_decode_): p.sums updated, p.ref written for a state that
// holds no key yet, p.y written. No workspace: nothing is allocated.
template <DType DT, typename Map = StateMap>
Status launch_decode(const DecodeParams& p, cudaStream_t stream);

// The state-only op (csq_state, csq_state_bwd): the state of the keys and values alone (the q
// fields mirror k). Forward: state_out and ref_out; backward: dk, dv, dstate_in (when state_in
// is given) and dref, every element written.
size_t state_workspace_bytes(const StateParams& p, DType dt);
CSQ_CUDA_WORKSPACE_LAUNCHER(launch_state, StateParams);
CSQ_CUDA_WORKSPACE_LAUNCHER(launch_state_bwd, StateBwdParams);

// X(DT, MAP) for every (dtype, map) the launchers are instantiated for (in the .cu files).
#ifdef CSQ_TEST_FEATURE_MAPS
#define CSQ_CUDA_FOR_EACH_TEST_LAUNCH(X) X(DType::kFloat64, LinearMap)
#else
#define CSQ_CUDA_FOR_EACH_TEST_LAUNCH(X)
#endif
#define CSQ_CUDA_FOR_EACH_LAUNCH(X)                                                          \
  X(DType::kFloat64, StateMap)                                                               \
  X(DType::kFloat32, StateMap) X(DType::kFloat16, StateMap) X(DType::kBFloat16, StateMap) \
  CSQ_CUDA_FOR_EACH_TEST_LAUNCH(X)

#define CSQ_CUDA_DECLARE_LAUNCHERS(DT, MAP)                                      \
  CSQ_CUDA_EXTERN_WORKSPACE_LAUNCHER(launch_fwd, FwdParams, DT, MAP)             \
  CSQ_CUDA_EXTERN_WORKSPACE_LAUNCHER(launch_bwd, BwdParams, DT, MAP)             \
  CSQ_CUDA_EXTERN_WORKSPACE_LAUNCHER(launch_state, StateParams, DT, MAP)         \
  CSQ_CUDA_EXTERN_WORKSPACE_LAUNCHER(launch_state_bwd, StateBwdParams, DT, MAP)  \
  extern template Status launch_decode<DT, MAP>(const DecodeParams&, cudaStream_t);
CSQ_CUDA_FOR_EACH_LAUNCH(CSQ_CUDA_DECLARE_LAUNCHERS)
#undef CSQ_CUDA_DECLARE_LAUNCHERS

}  // namespace cuda
}  // namespace csq
