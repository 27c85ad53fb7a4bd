// Helpers of the CUDA host file (csq_ops_cuda.cpp): what the
// CUDA backend supports, the dtype switch, and turning a launcher Status into a torch error.
// Includes torch; the kernels and launchers never see this file.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdlib>
#include <string>

#include "../csq_host.h"
#include "csq_launch.h"

namespace csq {
namespace cuda_host {

// One case of CSQ_DTYPE_SWITCH: torch's scalar type AT_TYPE runs as DType::KIND.
#define CSQ_DTYPE_CASE(AT_TYPE, KIND, DT, ...)        \
  case AT_TYPE: {                                     \
    constexpr auto DT = ::csq::cuda::DType::KIND;     \
    return __VA_ARGS__();                             \
  }

// Runs `__VA_ARGS__` (a lambda) with the constexpr csq::cuda::DType `DT` of `scalar_type`.
#define CSQ_DTYPE_SWITCH(scalar_type, DT, ...)                                              \
  [&] {                                                                                     \
    switch (scalar_type) {                                                                  \
      CSQ_DTYPE_CASE(at::kDouble, kFloat64, DT, __VA_ARGS__)                                \
      CSQ_DTYPE_CASE(at::kFloat, kFloat32, DT, __VA_ARGS__)                                 \
      CSQ_DTYPE_CASE(at::kHalf, kFloat16, DT, __VA_ARGS__)                                  \
      CSQ_DTYPE_CASE(at::kBFloat16, kBFloat16, DT, __VA_ARGS__)                             \
      default:                                                                              \
        TORCH_CHECK(false, "csq_ext (CUDA): unsupported dtype ", scalar_type,               \
                    "; supported: float64, float32, float16, bfloat16");                    \
    }                                                                                       \
  }()

inline ::csq::cuda::DType to_dtype(at::ScalarType s) {
  return CSQ_DTYPE_SWITCH(s, DT, [&] { return DT; });
}

// What the CUDA kernels support beyond csq::check_inputs.
inline void check_supported(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& shift) {
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda() && shift.is_cuda(),
              "csq_ext (CUDA): q, k, v and shift must be CUDA tensors");
  const int64_t dk = q.size(3), dv = v.size(3), n = q.size(2);
  const int64_t maxd = ::csq::cuda::kMaxHeadDim;
  TORCH_CHECK(dk >= 1 && dk <= maxd && dv >= 1 && dv <= maxd,
              "csq_ext (CUDA): supports head sizes 1 <= Dk <= ", maxd, " and 1 <= Dv <= ", maxd,
              " (float64, float32, float16, bfloat16); got Dk = ", dk, ", Dv = ", dv,
              ". Larger heads run on the CPU backend.");
  const int64_t chunks = (n + ::csq::cuda::kChunk - 1) / ::csq::cuda::kChunk;
  TORCH_CHECK(chunks <= 65535, "csq_ext (CUDA): supports sequence lengths N <= ",
              65535 * ::csq::cuda::kChunk, ", got N = ", n);
  TORCH_CHECK(q.size(0) * q.size(1) < (int64_t(1) << 31),
              "csq_ext (CUDA): supports B * Hq < 2^31, got B = ", q.size(0), ", Hq = ", q.size(1));
}

// With cu_seqlens the chunk slots (ceil(T / 64) + S) must fit the grid.
inline void check_packed(const QkvParams& p) {
  if (p.cu_seqlens == nullptr) return;
  const int64_t slots = (p.seqlen + ::csq::cuda::kChunk - 1) / ::csq::cuda::kChunk + p.num_seqs;
  TORCH_CHECK(slots <= 65535, "csq_ext (CUDA): with cu_seqlens, supports ceil(T / 64) + S <= "
              "65535, got T = ", p.seqlen, ", S = ", p.num_seqs);
}

// How the bfloat16 / float16 state products run (FwdParams::tensor_core_passes): 3 (3xTF32
// tensor cores, the default), 1 (plain TF32) or 0 (CUDA cores), from CSQ_CUDA_TENSOR_CORES,
// read at each call: a switch for comparing the paths. Anything else is refused.
inline int tensor_core_passes() {
  const char* v = std::getenv("CSQ_CUDA_TENSOR_CORES");
  if (v == nullptr || *v == '\0') return 3;
  const std::string s(v);
  TORCH_CHECK(s == "0" || s == "1" || s == "3",
              "csq_ext (CUDA): CSQ_CUDA_TENSOR_CORES must be 0 (CUDA cores), 1 (TF32) or 3 "
              "(3xTF32, the default); got '", s, "'");
  return std::stoi(s);
}

inline void check_status(const ::csq::cuda::Status& st, const char* direction) {
  TORCH_CHECK(st.ok(), "csq_ext (CUDA) ", direction, ": ", st.where, ": ",
              st.message != nullptr ? st.message : cudaGetErrorString(st.code));
}

// A device scratch buffer from PyTorch's caching allocator, on the current stream.
inline at::Tensor workspace(const at::Tensor& like, size_t bytes) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

// The chunked forward on the current stream of q's device, for the params a prepare step
// filled (csq_chunked_fwd, csq_pool_prefill_): the packed-batch limits, the tensor-core switch, the
// workspace and the launcher for q's dtype; `what` names the op in errors.
inline void run_forward(FwdParams& p, const at::Tensor& q, const char* what) {
  check_packed(p);
  p.tensor_core_passes = tensor_core_passes();
  const ::csq::cuda::DType dt = to_dtype(q.scalar_type());
  const size_t bytes = ::csq::cuda::fwd_workspace_bytes(p, dt);
  at::Tensor ws = workspace(q, bytes);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const ::csq::cuda::Status st = CSQ_DTYPE_SWITCH(q.scalar_type(), DT, [&] {
    return ::csq::cuda::launch_fwd<DT>(p, ws.data_ptr(), bytes, stream);
  });
  check_status(st, what);
}

}  // namespace cuda_host
}  // namespace csq
