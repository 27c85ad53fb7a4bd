// The torch-free interface between the CUDA host files (csq_{fwd,bwd,decode}_cuda.cpp) and the
// launchers (csq_{fwd,bwd,decode}_launch.cu). Only csq_params.h, the CUDA
// runtime and standard headers: the launchers compile with nvcc alone.
//
// The caller fills AttnParams (csq::make_params plus the output pointers), allocates a device
// workspace of *_workspace_bytes bytes, and calls the launcher for the input dtype on its
// stream. Launchers never throw and never synchronize: they enqueue kernels and report the
// first failure (a launch error, or a shape the kernels do not support) in a Status.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "../csq_params.h"

namespace csq {
namespace cuda {

// Input dtypes. float64 accumulates in float64, the others in float32.
enum class DType : int { kFloat64 = 0, kFloat32 = 1, kFloat16 = 2, kBFloat16 = 3 };

inline constexpr size_t acc_size(DType dt) { return dt == DType::kFloat64 ? 8 : 4; }

// Largest head sizes the kernels support (shared memory is sized from the actual ones).
constexpr int64_t kMaxHeadDim = 128;
// Chunk length on the GPU. AttnParams::chunk is a CPU tuning knob and is ignored here: the
// result does not depend on the chunk length (the spec), and the GPU kernels are tiled for this.
constexpr int64_t kChunk = 64;

struct Status {
  cudaError_t code = cudaSuccess;
  const char* where = "";          // the kernel or call that failed
  const char* message = nullptr;   // set for refusals that are not CUDA errors
  bool ok() const { return code == cudaSuccess; }
};

// Bytes of device scratch memory the launchers need, 256-byte aligned pieces. See README.md.
size_t fwd_workspace_bytes(const AttnParams& p, DType dt);
size_t bwd_workspace_bytes(const AttnParams& p, DType dt);

// Forward. Reads q, k, v (strided), shift (acc dtype); writes y (input dtype, contiguous
// (B, Hq, N, Dv)), b and den (acc dtype, contiguous (B, Hq, N)).
template <DType DT>
Status launch_fwd(const AttnParams& p, void* workspace, size_t workspace_bytes,
                  cudaStream_t stream);

// Backward. Reads q, k, v, dy (strided), y (contiguous, input dtype), b, den, shift (acc
// dtype, contiguous); writes dq, dk, dv (acc dtype, contiguous), db (B, Hq, N) and dshift
// (B, Hq) (acc dtype). Zeroes every output itself first.
template <DType DT>
Status launch_bwd(const AttnParams& p, void* workspace, size_t workspace_bytes,
                  cudaStream_t stream);

// One decoding step in place (csq_decode_). p from make_params with N = 1, p.ref_in the state's
// ref (B, Hk, Dk), p.y (B, Hq, 1, Dv) in the input dtype, contiguous; sums (B, Hk, F, Dv + 1) in
// the acc dtype, contiguous, updated in place. No workspace: nothing is allocated.
template <DType DT>
Status launch_decode(const AttnParams& p, void* sums, cudaStream_t stream);

// Instantiated in the .cu files for the four dtypes.
extern template Status launch_fwd<DType::kFloat64>(const AttnParams&, void*, size_t, cudaStream_t);
extern template Status launch_fwd<DType::kFloat32>(const AttnParams&, void*, size_t, cudaStream_t);
extern template Status launch_fwd<DType::kFloat16>(const AttnParams&, void*, size_t, cudaStream_t);
extern template Status launch_fwd<DType::kBFloat16>(const AttnParams&, void*, size_t,
                                                    cudaStream_t);
extern template Status launch_bwd<DType::kFloat64>(const AttnParams&, void*, size_t, cudaStream_t);
extern template Status launch_bwd<DType::kFloat32>(const AttnParams&, void*, size_t, cudaStream_t);
extern template Status launch_bwd<DType::kFloat16>(const AttnParams&, void*, size_t, cudaStream_t);
extern template Status launch_bwd<DType::kBFloat16>(const AttnParams&, void*, size_t,
                                                    cudaStream_t);
extern template Status launch_decode<DType::kFloat64>(const AttnParams&, void*, cudaStream_t);
extern template Status launch_decode<DType::kFloat32>(const AttnParams&, void*, cudaStream_t);
extern template Status launch_decode<DType::kFloat16>(const AttnParams&, void*, cudaStream_t);
extern template Status launch_decode<DType::kBFloat16>(const AttnParams&, void*, cudaStream_t);

}  // namespace cuda
}  // namespace csq
