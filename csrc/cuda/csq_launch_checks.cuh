// Launcher helpers: checking launches, opting kernels into large shared memory, refusing
// shapes the kernels do not support (with a message, never a crash), and state sizes.
#pragma once

#include "csq_chunked_work.cuh"

namespace csq {
namespace cuda {

#define CSQ_RETURN_IF_ERROR(call, name)                          \
  do {                                                           \
    const cudaError_t csq_err_ = (call);                         \
    if (csq_err_ != cudaSuccess) return Status{csq_err_, name};  \
  } while (0)

// After a <<<...>>> launch.
#define CSQ_CHECK_LAUNCH(name) CSQ_RETURN_IF_ERROR(cudaGetLastError(), name)

// The most shared memory a block of the current device may opt into (*bytes).
inline Status smem_optin(size_t* bytes, const char* name) {
  int dev = 0, optin = 0;
  CSQ_RETURN_IF_ERROR(cudaGetDevice(&dev), name);
  CSQ_RETURN_IF_ERROR(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
                      name);
  *bytes = size_t(optin);
  return Status{};
}

// Lets `kernel` use `bytes` of dynamic shared memory, or says why it cannot.
template <typename Kernel>
inline Status prepare_smem(Kernel kernel, size_t bytes, const char* name) {
  size_t optin = 0;
  const Status st = smem_optin(&optin, name);
  if (!st.ok()) return st;
  if (bytes > optin)
    return Status{cudaErrorInvalidConfiguration, name,
                  "this head size needs more shared memory per block than the device has "
                  "(the CUDA kernels are built for sm_80 and newer)"};
  if (bytes > 48 * 1024)
    CSQ_RETURN_IF_ERROR(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)),
        name);
  return Status{};
}

// Shapes the kernels support. The host files check the same with TORCH_CHECK first.
inline Status check_shapes(const QkvParams& p) {
  static_assert(kMaxHeadDim == 256, "the message below names the limit");
  if (p.dim_k < 1 || p.dim_k > kMaxHeadDim || p.dim_v < 1 || p.dim_v > kMaxHeadDim)
    return Status{cudaErrorInvalidValue, "check_shapes",
                  "the CUDA kernels support head sizes 1 <= Dk <= 256 and 1 <= Dv <= 256"};
  if (ceil_div(p.seqlen, kChunk) > 65535)
    return Status{cudaErrorInvalidValue, "check_shapes",
                  "the CUDA kernels support sequence lengths N <= 65535 * 64"};
  if (num_chunk_slots(p) > 65535)
    return Status{cudaErrorInvalidValue, "check_shapes",
                  "with cu_seqlens the CUDA kernels support ceil(T / 64) + S <= 65535"};
  if (p.cu_seqlens != nullptr && (p.batch != 1 || p.num_seqs < 1))
    return Status{cudaErrorInvalidValue, "check_shapes", "cu_seqlens needs B == 1 and S >= 1"};
  if (p.batch * p.heads_q > 2147483647LL)
    return Status{cudaErrorInvalidValue, "check_shapes", "B * Hq must be < 2^31"};
  if (p.group < 1 || p.heads_q != p.group * p.heads_k)
    return Status{cudaErrorInvalidValue, "check_shapes", "Hq must equal group * Hk"};
  return Status{};
}

// Elements of one state tensor (sums of every (sequence, kv head)) and of its ref.
template <typename Map>
inline size_t state_elems(const QkvParams& p) {
  return size_t(num_sequences(p) * p.heads_k * state_head_elems<Map>(p.dim_k, p.dim_v));
}
inline size_t ref_elems(const QkvParams& p) {
  return size_t(num_sequences(p) * p.heads_k * p.dim_k);
}

// dst = src (bytes), or zeros when src is null.
inline Status copy_or_zero(void* dst, const void* src, size_t bytes, cudaStream_t stream,
                           const char* name) {
  if (dst == nullptr || bytes == 0) return Status{};
  const cudaError_t e = src != nullptr
                            ? cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream)
                            : cudaMemsetAsync(dst, 0, bytes, stream);
  return e == cudaSuccess ? Status{} : Status{e, name};
}

}  // namespace cuda
}  // namespace csq
