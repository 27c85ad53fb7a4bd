// Element types and element access, shared by every CUDA kernel (chunked path, direct path,
// decode): the input and accumulation types of a dtype, conversions, strided loads and
// stores, warp sums, and the index arithmetic of launches and workspaces. Torch-free:
// csq_params.h, CUDA headers and standard headers only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "../csq_params.h"
#include "csq_launch.h"

namespace csq {
namespace cuda {

template <DType DT> struct DTypeOf;
template <> struct DTypeOf<DType::kFloat64> { using type = double; };
template <> struct DTypeOf<DType::kFloat32> { using type = float; };
template <> struct DTypeOf<DType::kFloat16> { using type = __half; };
template <> struct DTypeOf<DType::kBFloat16> { using type = __nv_bfloat16; };

// The generic path: any Dk, Dv <= kMaxHeadDim, input type T, accumulation type Acc, and the
// number of state rows (features) held by one CTA of the state kernels.
template <DType DT>
struct GenericTraits {
  using T = typename DTypeOf<DT>::type;
  using Acc = typename std::conditional<DT == DType::kFloat64, double, float>::type;
  static constexpr int kFeatTile = DT == DType::kFloat64 ? 32 : 64;
};

template <typename Acc> __device__ __forceinline__ Acc to_acc(double x) { return Acc(x); }
template <typename Acc> __device__ __forceinline__ Acc to_acc(float x) { return Acc(x); }
template <typename Acc> __device__ __forceinline__ Acc to_acc(__half x) {
  return Acc(__half2float(x));
}
template <typename Acc> __device__ __forceinline__ Acc to_acc(__nv_bfloat16 x) {
  return Acc(__bfloat162float(x));
}

__device__ __forceinline__ void store_el(double* p, double x) { *p = x; }
__device__ __forceinline__ void store_el(float* p, float x) { *p = x; }
__device__ __forceinline__ void store_el(__half* p, float x) { *p = __float2half_rn(x); }
__device__ __forceinline__ void store_el(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }

// Element (b, h, n, d) of a strided (B, H, N, D) tensor, converted to Acc.
template <typename Acc, typename T>
__device__ __forceinline__ Acc load_el(const void* base, const int64_t* st, int64_t b,
                                       int64_t h, int64_t n, int64_t d) {
  const T* p = static_cast<const T*>(base);
  return to_acc<Acc>(p[b * st[0] + h * st[1] + n * st[2] + d * st[3]]);
}

template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}
__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int round_up4(int a) { return (a + 3) & ~3; }

inline size_t align256(size_t x) { return (x + 255) & ~size_t(255); }

// Number of sequences S: batch entries, or packed segments.
__host__ __device__ inline int64_t num_sequences(const QkvParams& p) {
  return p.cu_seqlens != nullptr ? p.num_seqs : p.batch;
}

}  // namespace cuda
}  // namespace csq
