// The torch-free interface of the CUDA direct path (csrc/csq_direct_params.h): what the host
// file csq_ops_cuda.cpp (and the emulator's harness) calls, implemented in
// csq_direct_launch.cu. Only csq_direct_params.h, csq_launch.h (DType, Status) and the CUDA
// runtime: the launcher compiles with nvcc alone.
//
// The caller fills DirectFwdParams / DirectBwdParams (the host layer's prepare_direct_forward /
// prepare_direct_backward), allocates a device workspace of direct_*_workspace_bytes bytes,
// and calls the launcher for the input dtype on its stream. Launchers never throw and never
// synchronize.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "../csq_direct_params.h"
#include "csq_launch.h"

namespace csq {
namespace cuda {

// Largest head sizes of the direct kernels (Dk and Dv each); larger heads run on the CPU.
constexpr int64_t kDirectMaxHeadDim = 256;
// Query and key tile length on the GPU. DirectFwdParams::tile is a CPU tuning knob and is
// ignored here (the result does not depend on it; the per-tile reference key r_T of a query
// tile is the running key mean at its start, so b matches the CPU backend's with
// tile_size = 64).
constexpr int64_t kDirectTile = 64;

// Grid limits of the direct kernels: Hq <= 65535 (grid.y), tile slots < 2^31 (grid.x).
// The host file checks the same with TORCH_CHECK first; the launchers return a Status.
Status check_direct_shapes(const DirectFwdParams& p);

size_t direct_fwd_workspace_bytes(const DirectFwdParams& p, DType dt);
size_t direct_bwd_workspace_bytes(const DirectFwdParams& p, DType dt);

// Forward. Reads q, k, v (strided), shift (acc dtype, (Hq,)); writes y (acc dtype,
// contiguous (B, Hq, N, Dv)), b and den (acc dtype, contiguous (B, Hq, N)), as the CPU
// kernel csrc/cpu/csq_direct_fwd_kernel.cpp does. bfloat16 / float16 run their products on
// tensor cores unless p.tensor_core_passes is 0.
CSQ_CUDA_WORKSPACE_LAUNCHER(launch_direct_fwd, DirectFwdParams);

// Backward. Reads q, k, v, dy (strided), y, b, den (contiguous, acc dtype), shift; writes
// every element of dq, dk, dv (acc dtype, contiguous) and db (B, Hq, N), dL/db_i: the shift
// gradient is its sum over batch and positions (the host file takes it). Deterministic: every
// output element is written by one thread block, no atomics.
CSQ_CUDA_WORKSPACE_LAUNCHER(launch_direct_bwd, DirectBwdParams);

#define CSQ_CUDA_DECLARE_DIRECT(DT, MAP)                                          \
  CSQ_CUDA_EXTERN_WORKSPACE_LAUNCHER(launch_direct_fwd, DirectFwdParams, DT, MAP) \
  CSQ_CUDA_EXTERN_WORKSPACE_LAUNCHER(launch_direct_bwd, DirectBwdParams, DT, MAP)
CSQ_CUDA_FOR_EACH_LAUNCH(CSQ_CUDA_DECLARE_DIRECT)
#undef CSQ_CUDA_DECLARE_DIRECT

}  // namespace cuda
}  // namespace csq
