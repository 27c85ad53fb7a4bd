// The feature map of CSQ and the row layout of its state: the one definition that the CPU
// kernels, the CUDA kernels (state scans and decode), the decode steps and the CUDA emulator
// share. Torch-free and __host__ __device__, so nvcc and plain C++ compile it alike.
//
// With the extended vectors (docs/SPEC.md; csrc/cuda/README.md)
//   qe = [tau q, b]  (D + 1 coordinates)       ke = [k - r, 1]  (D + 1 coordinates)
// so that <qe, ke> = tau <q, k - r> + b = s, the features are the pairs x <= y <= D of extended
// coordinates:
//   psi_f(ke) = ke_x ke_y,      phi_f(qe) = m_xy qe_x qe_y,   m_xy = 1 if x == y else 2,
// and phi(qe) . psi(ke) = s^2 (each off-diagonal pair stands for (x, y) and (y, x)).
//
// Rows (features) are in the public order, the order of the carried state (CSQState, a tensor
// that moves between devices with .to()) and of every backend's internal state:
//   [pairs x <= y < D  (row-major upper triangle) | linear (x, D), x < D | constant (D, D)]
// i.e. psi = [k_x k_y | k_x | 1] and phi = [tau^2 m q_x q_y | 2 tau b q_x | b^2].
// The state of one (sequence, key/value head) is a row-major F x (Dv + 1) matrix
// sum_j psi(ke_j) [v_j, 1]^T; its last column holds the key sums: the linear rows the sum of
// k - r (Z1), the constant row the key count (Z0).
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define CSQ_HOST_DEVICE __host__ __device__
#else
#define CSQ_HOST_DEVICE
#endif

namespace csq {

// Pairs x <= y < d: the quadratic features of a d-vector.
CSQ_HOST_DEVICE inline constexpr int64_t num_pairs(int64_t d) { return d * (d + 1) / 2; }

// Features F of the extended vectors: [pairs | linear | constant], = num_pairs(d + 1).
CSQ_HOST_DEVICE inline constexpr int64_t num_features(int64_t d) { return num_pairs(d) + d + 1; }

// The public row of the extended pair (x, y), x <= y <= d.
CSQ_HOST_DEVICE inline int64_t feature_row(int x, int y, int d) {
  if (y < d) return int64_t(x) * d - int64_t(x) * (x - 1) / 2 + (y - x);
  if (x < d) return num_pairs(d) + x;
  return num_pairs(d) + d;  // the constant feature, F - 1
}

// The row of the linear feature of coordinate x, and of the constant feature.
CSQ_HOST_DEVICE inline int64_t linear_row(int64_t x, int64_t d) { return num_pairs(d) + x; }
CSQ_HOST_DEVICE inline int64_t constant_row(int64_t d) { return num_features(d) - 1; }

// The extended pair (x, y) of public row f (the inverse of feature_row).
CSQ_HOST_DEVICE inline void feature_pair(int64_t f, int d, int* x, int* y) {
  const int64_t pairs = num_pairs(d);
  if (f >= pairs) {  // linear (x, d), then the constant (d, d)
    *x = static_cast<int>(f - pairs);
    *y = d;
    return;
  }
  int xx = 0;
  while (f >= d - xx) {  // row xx of the triangle holds y = xx .. d - 1
    f -= d - xx;
    ++xx;
  }
  *x = xx;
  *y = xx + static_cast<int>(f);
}

// m_xy: the weight of a query feature (2 off the diagonal).
template <typename T>
CSQ_HOST_DEVICE inline T pair_weight(int x, int y) {
  return x == y ? T(1) : T(2);
}

// Calls emit(f, psi_f(ke)) for every row f in order, ke = [k, 1] (k: d coordinates, already
// relative to the reference key).
template <typename T, typename Emit>
CSQ_HOST_DEVICE inline void for_each_key_feature(const T* k, int64_t d, const Emit& emit) {
  int64_t f = 0;
  for (int64_t x = 0; x < d; ++x) {
    const T kx = k[x];
    for (int64_t y = x; y < d; ++y) emit(f++, kx * k[y]);
  }
  for (int64_t x = 0; x < d; ++x) emit(f++, k[x]);
  emit(f, T(1));
}

// Calls emit(f, phi_f(qe)) for every row f in order, qe = [tau q, b], so that
// sum_f phi_f(qe) psi_f(ke) = (tau <q, k> + b)^2.
template <typename T, typename Emit>
CSQ_HOST_DEVICE inline void for_each_query_feature(const T* q, T b, T tau, int64_t d,
                                                   const Emit& emit) {
  const T t2 = tau * tau;
  int64_t f = 0;
  for (int64_t x = 0; x < d; ++x) {
    const T qx = q[x];
    emit(f++, t2 * qx * qx);
    const T off = 2 * t2 * qx;
    for (int64_t y = x + 1; y < d; ++y) emit(f++, off * q[y]);
  }
  const T lin = 2 * tau * b;
  for (int64_t x = 0; x < d; ++x) emit(f++, lin * q[x]);
  emit(f, b * b);
}

// Elements of the state of one (sequence, key/value head): F x (Dv + 1).
CSQ_HOST_DEVICE inline int64_t state_head_elems(int64_t dim_k, int64_t dim_v) {
  return num_features(dim_k) * (dim_v + 1);
}

// The carried key sum Z1 (coordinate x, relative to ref) and count Z0 of one head's state:
// the last column of the linear rows and of the constant row.
template <typename T>
CSQ_HOST_DEVICE inline T& state_key_sum(T* head, int64_t x, int64_t dim_k, int64_t dim_v) {
  return head[linear_row(x, dim_k) * (dim_v + 1) + dim_v];
}
template <typename T>
CSQ_HOST_DEVICE inline T& state_key_count(T* head, int64_t dim_k, int64_t dim_v) {
  return head[constant_row(dim_k) * (dim_v + 1) + dim_v];
}

}  // namespace csq
