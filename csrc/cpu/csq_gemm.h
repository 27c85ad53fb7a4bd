// Row-major GEMMs on raw buffers for the CPU kernels: the one place that picks how a tile
// product runs.
//
// float32 products without transposes go to oneDNN's batch-reduce GEMM microkernel as torch
// exposes it (at::native::cpublas::brgemm), which generates code for the CPU it runs on
// (AVX-512 or AVX2), where it measured faster than the BLAS torch links at the kernels' shapes
// (csq_gemm_choice.cpp: once per process). MKL runs its sgemm at AVX2 speed on the AMD EPYC
// CI machine, 108-111 GFLOP/s on one core at the direct path's tile shapes, where the
// microkernel runs 230-270 (bench/NOTES.md, item 13). Everything else (float64, transposed
// operands, other alpha / beta, torch built without oneDNN, `torch.backends.mkldnn.enabled =
// False`, CSQ_CPU_GEMM=blas) goes to BLAS. The kernels therefore keep their operands in the
// layouts the microkernel takes.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Config.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#if AT_BUILD_WITH_BLAS()
// The Fortran BLAS that torch itself links (MKL or OpenBLAS): a tile GEMM without the
// dispatcher's few microseconds per call, which are 10-20% of a 128 x 128 x 64 product.
extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc);
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc);
}
#endif

#if AT_MKLDNN_ENABLED() && defined(CPUBLAS_BRGEMM_F32F32F32) && \
    (defined(__x86_64__) || defined(_M_X64))
#define CSQ_CPU_HAS_BRGEMM 1
#else
#define CSQ_CPU_HAS_BRGEMM 0
#endif

namespace csq {
namespace cpu {

// Whether the microkernel measured at least as fast as BLAS on this machine (or
// CSQ_CPU_GEMM says which): csq_gemm_choice.cpp, measured at the first call.
bool microkernel_preferred();

// Whether float32 products go to the oneDNN microkernel now (the user can turn oneDNN off
// with torch.backends.mkldnn, and the tests compare both ways).
inline bool use_microkernel() {
#if CSQ_CPU_HAS_BRGEMM
  return at::globalContext().userEnabledMkldnn() && microkernel_preferred();
#else
  return false;
#endif
}

template <typename acc_t>
inline void blas_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, acc_t alpha,
                      const acc_t* a, int64_t lda, const acc_t* b, int64_t ldb, acc_t beta,
                      acc_t* c, int64_t ldc);

// Row-major C (m x n, ld ldc) = alpha op(A) op(B) + beta C, op = transpose when ta / tb.
// A is (m x k) after op, B (k x n) after op; lda / ldb are the row lengths as stored.
// beta = 0 never reads C (which may hold poison).
template <typename acc_t>
inline void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, acc_t alpha, const acc_t* a,
                 int64_t lda, const acc_t* b, int64_t ldb, acc_t beta, acc_t* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // C = beta C, without reading C when beta = 0
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j)
        c[i * ldc + j] = beta == acc_t(0) ? acc_t(0) : beta * c[i * ldc + j];
    return;
  }
#if CSQ_CPU_HAS_BRGEMM
  if constexpr (std::is_same_v<acc_t, float>) {
    if (!ta && !tb && alpha == 1.0f && (beta == 0.0f || beta == 1.0f) && use_microkernel()) {
      // The microkernel keeps a slice of A and B in cache only for a bounded depth: at
      // k = 8385 it ran at 32 GFLOP/s whole and 210 in slices of 1024.
      constexpr int64_t kDepth = 1024;
      for (int64_t k0 = 0; k0 < k; k0 += kDepth)
        at::native::cpublas::brgemm(m, n, std::min(kDepth, k - k0), lda, ldb, ldc,
                                    beta == 1.0f || k0 > 0, a + k0, b + k0 * ldb, c,
                                    /*is_vnni=*/false);
      return;
    }
  }
#endif
  blas_gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// The same product on the BLAS torch links (no dispatcher), or at::mm without one.
template <typename acc_t>
inline void blas_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, acc_t alpha,
                      const acc_t* a, int64_t lda, const acc_t* b, int64_t ldb, acc_t beta,
                      acc_t* c, int64_t ldc) {
#if AT_BUILD_WITH_BLAS()
  // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
  const char ca = ta ? 'T' : 'N', cb = tb ? 'T' : 'N';
  const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
  const int ila = static_cast<int>(lda), ilb = static_cast<int>(ldb), ilc = static_cast<int>(ldc);
  if constexpr (std::is_same_v<acc_t, float>)
    sgemm_(&cb, &ca, &in, &im, &ik, &alpha, b, &ilb, a, &ila, &beta, c, &ilc);
  else
    dgemm_(&cb, &ca, &in, &im, &ik, &alpha, b, &ilb, a, &ila, &beta, c, &ilc);
#else
  const auto mat = [](acc_t* x, int64_t rows, int64_t cols, int64_t ld) {
    return at::from_blob(x, {rows, cols}, {ld, 1}, at::CPU(c10::CppTypeToScalarType<acc_t>::value));
  };
  const auto view = [&](const acc_t* x, int64_t rows, int64_t cols, int64_t ld, bool t) {
    at::Tensor v = mat(const_cast<acc_t*>(x), t ? cols : rows, t ? rows : cols, ld);
    return t ? v.t() : v;
  };
  at::Tensor C = mat(c, m, n, ldc);
  at::Tensor AB = at::mm(view(a, m, k, lda, ta), view(b, k, n, ldb, tb));
  if (beta == acc_t(0))
    C.copy_(AB.mul_(alpha));
  else
    C.mul_(beta).add_(AB, alpha);
#endif
}

// The sum of term(j) over j < n in 16 independent partial sums, added in a fixed order: the
// loop vectorizes, where one running sum is a latency-bound chain of adds (a row of a tile
// pair's weights or their gradients, a denominator column's dot products).
template <typename acc_t, typename Term>
inline acc_t sum16(int64_t n, const Term& term) {
  constexpr int64_t L = 16;
  acc_t part[L] = {};
  int64_t j = 0;
  for (; j + L <= n; j += L)
    for (int64_t l = 0; l < L; ++l) part[l] += term(j + l);
  acc_t sum = 0;
  for (; j < n; ++j) sum += term(j);
  for (int64_t l = 0; l < L; ++l) sum += part[l];
  return sum;
}

// Row-major C (m x n1, ld ldc) = A B + beta C (beta 0 or 1; 0 never reads C) for the products
// whose n1 = Dv + 1 columns end in a denominator column (B = [V, 1], or a state F x (Dv + 1)):
// on the microkernel, the first Dv columns as a GEMM and the last as m dot products with B's
// last column. The chunked forward at D = 64, N = 4K ran 67.0 ms with Dv + 1 = 65 columns
// against 49.8 with Dv = 63 (64 columns), at 1.5% fewer FLOPs (D = 128: 468 against 389 ms):
// the microkernel's column blocks are 16 wide, so a 65th column costs far more than 1/65
// (bench/NOTES.md 17). BLAS products (float64, CSQ_CPU_GEMM=blas) stay whole.
template <typename acc_t>
inline void gemm_den_apart(int64_t m, int64_t n1, int64_t k, const acc_t* a, int64_t lda,
                           const acc_t* b, int64_t ldb, acc_t beta, acc_t* c, int64_t ldc) {
  if (!(std::is_same_v<acc_t, float> && use_microkernel()) || n1 < 2 || m == 0 || k == 0) {
    gemm<acc_t>(false, false, m, n1, k, acc_t(1), a, lda, b, ldb, beta, c, ldc);
    return;
  }
  const int64_t last = n1 - 1;
  gemm<acc_t>(false, false, m, last, k, acc_t(1), a, lda, b, ldb, beta, c, ldc);
  thread_local std::vector<acc_t> column;
  if (static_cast<int64_t>(column.size()) < k) column.resize(k);
  for (int64_t j = 0; j < k; ++j) column[j] = b[j * ldb + last];
  const acc_t* col = column.data();
  for (int64_t i = 0; i < m; ++i) {
    const acc_t* ai = a + i * lda;
    const acc_t d = sum16<acc_t>(k, [&](int64_t j) { return ai[j] * col[j]; });
    acc_t* ci = c + i * ldc + last;
    *ci = beta == acc_t(0) ? d : *ci + d;
  }
}

// out (cols x rows, ld ldo) = in^T for in (rows x cols, ld ldi): in blocks, so that both sides
// stay in cache lines.
template <typename acc_t>
inline void transpose_into(const acc_t* in, int64_t rows, int64_t cols, int64_t ldi, acc_t* out,
                           int64_t ldo) {
  constexpr int64_t B = 16;
  for (int64_t i0 = 0; i0 < rows; i0 += B)
    for (int64_t j0 = 0; j0 < cols; j0 += B) {
      const int64_t i1 = std::min(rows, i0 + B), j1 = std::min(cols, j0 + B);
      for (int64_t j = j0; j < j1; ++j)
        for (int64_t i = i0; i < i1; ++i) out[j * ldo + i] = in[i * ldi + j];
    }
}

}  // namespace cpu
}  // namespace csq
