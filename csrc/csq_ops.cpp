// Declares the operator schemas once. Each backend adds its kernels with TORCH_LIBRARY_IMPL in
// its own host file, so a CPU-only build simply leaves the CUDA files out.
#include <torch/library.h>

#include <string>

#ifndef CSQ_BUILD_CUDA_ARCHS
#define CSQ_BUILD_CUDA_ARCHS ""
#endif

namespace {

// What this binary was compiled with, for `python -m csq_ext` and bug reports.
std::string build_info() {
  std::string info = "backends=cpu";
#ifdef CSQ_WITH_CUDA
  info += ",cuda;cuda_archs=" CSQ_BUILD_CUDA_ARCHS;
#endif
  return info;
}

}  // namespace

TORCH_LIBRARY(csq_ext, m) {
  // Forward: y (B, Hq, N, Dv) in the input dtype, and what the backward needs: the per-query
  // shift b (B, Hq, N) and the denominator den (B, Hq, N), both in the accumulation dtype.
  m.def(
      "csq_fwd(Tensor q, Tensor k, Tensor v, Tensor shift, bool causal, float scale, "
      "bool center, bool normalize, float eps, int chunk_size) -> (Tensor, Tensor, Tensor)");
  // Backward: dq, dk, dv in the input dtype and dshift (Hq,) in the dtype of shift.
  m.def(
      "csq_bwd(Tensor dy, Tensor q, Tensor k, Tensor v, Tensor shift, Tensor y, Tensor b, "
      "Tensor den, bool causal, float scale, bool center, bool normalize, float eps, "
      "int chunk_size) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("build_info() -> str", &build_info);
}
