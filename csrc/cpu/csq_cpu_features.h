// The feature rows of the chunked path's CPU kernels (csq_features.h): key features psi and
// query features phi of a block of rows, as rows or transposed (the GEMM microkernel's
// operand layout, csq_gemm.h), and the symmetric matrix-vector product that maps a
// feature-space gradient back to q or k.
#pragma once

#include <cstdint>

#include "../csq_features.h"
#include "csq_cpu_rows.h"
#include "csq_gemm.h"

namespace csq {
namespace cpu {

// Key features psi(k) (csq_features.h), one row of length F per key.
template <typename acc_t>
inline void key_features(const acc_t* k, int64_t rows, int64_t d, acc_t* psi) {
  const int64_t f = num_features(d);
  for (int64_t i = 0; i < rows; ++i) {
    acc_t* out = psi + i * f;
    for_each_key_feature(k + i * d, d, [out](int64_t r, acc_t x) { out[r] = x; });
  }
}

// The same features transposed: psi^T (F x rows, ld >= rows), the left operand of the state
// update S += psi^T V~ as the GEMM microkernel takes it (csq_gemm.h). Built feature by feature
// from k^T, so every write is contiguous (one key at a time, writing F rows apart, made the
// chunked forward 35% slower at Dk = 32); the same products as key_features.
template <typename acc_t>
inline void key_features_t(const acc_t* k, int64_t rows, int64_t d, acc_t* psi_t, int64_t ld) {
  acc_t* kT = thread_scratch<acc_t>(d * rows);
  transpose_into(k, rows, d, d, kT, rows);
  int64_t f = 0;
  for (int64_t x = 0; x < d; ++x)
    for (int64_t y = x; y < d; ++y, ++f) {
      const acc_t* kx = kT + x * rows;
      const acc_t* ky = kT + y * rows;
      acc_t* out = psi_t + f * ld;
      for (int64_t i = 0; i < rows; ++i) out[i] = kx[i] * ky[i];
    }
  for (int64_t x = 0; x < d; ++x, ++f)
    std::copy(kT + x * rows, kT + (x + 1) * rows, psi_t + f * ld);
  std::fill(psi_t + f * ld, psi_t + f * ld + rows, acc_t(1));
}

// Query features phi(q, b) (csq_features.h), so that phi(q, b) . psi(k) = (tau <q, k> + b)^2.
template <typename acc_t>
inline void query_features(const acc_t* q, const acc_t* bq, int64_t rows, int64_t d, acc_t tau,
                           acc_t* phi) {
  const int64_t f = num_features(d);
  for (int64_t i = 0; i < rows; ++i) {
    acc_t* out = phi + i * f;
    for_each_query_feature(q + i * d, bq[i], tau, d, [out](int64_t r, acc_t x) { out[r] = x; });
  }
}

// The same features transposed: phi^T (F x rows, ld >= rows), for the backward's query state
// update R += phi^T G~ as the GEMM microkernel takes it (csq_gemm.h); feature by feature, the
// same products as query_features.
template <typename acc_t>
inline void query_features_t(const acc_t* q, const acc_t* bq, int64_t rows, int64_t d, acc_t tau,
                             acc_t* phi_t, int64_t ld) {
  acc_t* qT = thread_scratch<acc_t>(d * rows);
  transpose_into(q, rows, d, d, qT, rows);
  const acc_t t2 = tau * tau;
  int64_t f = 0;
  for (int64_t x = 0; x < d; ++x) {
    const acc_t* qx = qT + x * rows;
    acc_t* out = phi_t + f++ * ld;
    for (int64_t i = 0; i < rows; ++i) out[i] = t2 * qx[i] * qx[i];
    for (int64_t y = x + 1; y < d; ++y) {
      const acc_t* qy = qT + y * rows;
      out = phi_t + f++ * ld;
      for (int64_t i = 0; i < rows; ++i) out[i] = 2 * t2 * qx[i] * qy[i];
    }
  }
  for (int64_t x = 0; x < d; ++x) {
    const acc_t* qx = qT + x * rows;
    acc_t* out = phi_t + f++ * ld;
    for (int64_t i = 0; i < rows; ++i) out[i] = 2 * tau * bq[i] * qx[i];
  }
  acc_t* out = phi_t + f * ld;
  for (int64_t i = 0; i < rows; ++i) out[i] = bq[i] * bq[i];
}

// sym_matvec_add for `rows` vectors at once, everything transposed (so the inner loop runs
// along the rows and vectorizes): u^T (F x rows, ld ldu; its first num_pairs rows in pair
// order), x^T and out^T (d x rows, ld ldx / ldo).
template <typename acc_t>
inline void sym_matvec_add_t(const acc_t* uT, int64_t ldu, const acc_t* xT, int64_t ldx,
                             int64_t d, int64_t rows, acc_t off, acc_t diag, acc_t* outT,
                             int64_t ldo) {
  int64_t p = 0;
  for (int64_t a = 0; a < d; ++a) {
    acc_t* oa = outT + a * ldo;
    const acc_t* xa = xT + a * ldx;
    const acc_t* up = uT + p * ldu;
    for (int64_t i = 0; i < rows; ++i) oa[i] += diag * up[i] * xa[i];
    ++p;
    for (int64_t c = a + 1; c < d; ++c, ++p) {
      up = uT + p * ldu;
      acc_t* oc = outT + c * ldo;
      const acc_t* xc = xT + c * ldx;
      for (int64_t i = 0; i < rows; ++i) {
        const acc_t w = off * up[i];
        oa[i] += w * xc[i];
        oc[i] += w * xa[i];
      }
    }
  }
}

}  // namespace cpu
}  // namespace csq
