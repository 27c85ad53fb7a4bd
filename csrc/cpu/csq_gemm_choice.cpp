// Which library runs the CPU kernels' float32 tile and state products on this machine:
// oneDNN's microkernel or the BLAS torch links, chosen by measuring both once per process
// (never by vendor: MKL's sgemm ran at AVX2 speed on an AMD EPYC and at AVX-512 speed on an
// Intel Xeon, and the microkernel generates code for whatever ISA the CPU has, AVX2 included).
// CSQ_CPU_GEMM=microkernel / blas skips the measurement; torch.backends.mkldnn.enabled = False
// still sends everything to BLAS (csq_gemm.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "csq_gemm.h"

namespace csq {
namespace cpu {
namespace {

struct Choice {
  bool microkernel = false;
  double microkernel_gflops = 0, blas_gflops = 0;  // 0: not measured
  std::string reason;
};

// The shapes of the hot products: a direct-path score tile (G T x T x Dk), its value product
// (G T x Dv x T), a chunked state read slice (C x (Dv + 1) x 1024).
struct Shape { int64_t m, n, k; };
constexpr Shape kShapes[] = {{128, 128, 64}, {128, 64, 128}, {64, 129, 1024}};

// Best seconds per round of every shape (a few rounds, after one warm-up round).
double time_rounds(bool microkernel, std::vector<float>& a, std::vector<float>& b,
                   std::vector<float>& c) {
  double best = 1e30;
  for (int round = 0; round < 6; ++round) {
    const auto t0 = std::chrono::steady_clock::now();
    for (const Shape& s : kShapes)
      for (int rep = 0; rep < 4; ++rep) {
        if (microkernel) {
#if CSQ_CPU_HAS_BRGEMM
          at::native::cpublas::brgemm(s.m, s.n, s.k, s.k, s.n, s.n, false, a.data(), b.data(),
                                      c.data(), /*is_vnni=*/false);
#endif
        } else {
          blas_gemm<float>(false, false, s.m, s.n, s.k, 1.0f, a.data(), s.k, b.data(), s.n,
                           0.0f, c.data(), s.n);
        }
      }
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (round > 0) best = std::min(best, dt);
  }
  return best;
}

Choice measure() {
  Choice ch;
  const char* env = std::getenv("CSQ_CPU_GEMM");
  const std::string want = env ? env : "";
  if (!CSQ_CPU_HAS_BRGEMM) {
    ch.reason = "this torch has no oneDNN microkernel";
    return ch;
  }
  if (want == "microkernel" || want == "blas") {
    ch.microkernel = want == "microkernel";
    ch.reason = "CSQ_CPU_GEMM=" + want;
    return ch;
  }
  double flops = 0;
  for (const Shape& s : kShapes) flops += 2.0 * s.m * s.n * s.k * 4;
  // Every thread times both, at once, as the kernels run them: one product per thread inside
  // a parallel region (where the BLAS runs single-threaded, as it does in the kernels, instead
  // of spreading one product over threads that the kernels keep busy). The slowest thread's
  // time counts for each.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  std::vector<double> t_blas(threads, 0.0), t_micro(threads, 0.0);
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> a(64 * 1024 + 128 * 128), b(1024 * 129 + 128 * 128), c(128 * 129);
    for (size_t i = 0; i < a.size(); ++i) a[i] = float((i * 7919) % 101) / 101.0f - 0.5f;
    for (size_t i = 0; i < b.size(); ++i) b[i] = float((i * 104729) % 97) / 97.0f - 0.5f;
    for (int64_t t = begin; t < end; ++t) {
      t_blas[t] = time_rounds(false, a, b, c);
      t_micro[t] = time_rounds(true, a, b, c);
    }
  });
  const double worst_blas = *std::max_element(t_blas.begin(), t_blas.end());
  const double worst_micro = *std::max_element(t_micro.begin(), t_micro.end());
  ch.blas_gflops = flops / worst_blas / 1e9;
  ch.microkernel_gflops = flops / worst_micro / 1e9;
  ch.microkernel = worst_micro <= worst_blas;
  ch.reason = "measured";
  return ch;
}

const Choice& choice() {
  static const Choice ch = measure();  // once per process; thread-safe initialization
  return ch;
}

std::string cpu_gemm_backend() {
  const Choice& ch = choice();
  std::string s = std::string(ch.microkernel ? "microkernel" : "blas") + " (" + ch.reason;
  if (ch.blas_gflops > 0)
    s += ": microkernel " + std::to_string(static_cast<int>(ch.microkernel_gflops)) +
         " GFLOP/s, blas " + std::to_string(static_cast<int>(ch.blas_gflops)) +
         " GFLOP/s per thread";
  if (!at::globalContext().userEnabledMkldnn()) s += "; torch.backends.mkldnn is off: blas";
  return s + ")";
}

}  // namespace

bool microkernel_preferred() { return choice().microkernel; }

}  // namespace cpu
}  // namespace csq

// Which backend the CPU kernels use, and why (a string for `python -m csq_ext` and the
// calibration's machine key); the first call measures.
TORCH_LIBRARY_FRAGMENT(csq_ext, m) {
  m.def("cpu_gemm_backend() -> str", &csq::cpu::cpu_gemm_backend);
}
