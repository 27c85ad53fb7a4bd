// What a feature map is, and CSQ's own (SquareMap): the policy that every CPU kernel, CUDA
// kernel, decode step and the CUDA emulator take as their `Map` template parameter. Torch-free
// and __host__ __device__, so nvcc and plain C++ compile it alike. The Python mirror is
// csq_ext/feature_map.py; tests/test_feature_map.py checks the two against each other.
//
// A feature map turns the similarity of the extended vectors (docs/SPEC.md)
//   qe = [tau q, b]   ke = [k - r, 1]        (d + 1 coordinates; coordinate d is the constant)
//   s  = <qe, ke> = tau <q, k - r> + b
// into the weight w = Map::weight(s) = sum_f phi_f(qe) psi_f(ke), a finite sum over the rows f
// of the state. Every row is a monomial of one or two extended coordinates, its factors
// (x, y), x <= y <= d, or (x, kOneFactor):
//   psi_f(ke) = ke_x ke_y   (or ke_x)      phi_f(qe) = m_f qe_x qe_y   (or m_f qe_x)
// with m_f = Map::query_weight(x, y). What a map provides:
//   kDegree                       the factors of every row (1 or 2; kernels rely on it)
//   num_features(d)               F, the rows of the state
//   row_factors(f, d, &x, &y)     the factors of row f (random access)
//   for_each_row(d, fn)           fn(f, x, y) for every row in order (sequential walks)
//   Walk                          rows f0, f0 + step, ... without a division (CUDA decode)
//   query_weight<T>(x, y)         m_f
//   key_sum_row(x, d)             the row whose psi is ke_x (x < d): the key sums Z1
//   count_row(d)                  the row whose psi is 1: the key count Z0
//   weight<T>(s), weight_grad<T>(s)   w of a score and dw/ds (the direct path and the pairs
//                                 inside a chunk compute w from s without features)
// The state of one (sequence, key/value head) is a row-major F x (Dv + 1) matrix
// sum_j psi(ke_j) [v_j, 1]^T; its last column holds the key sums (key_sum_row) and the key
// count (count_row) that centering reads. A new map is one header like this one's SquareMap
// plus its line in csq_feature_maps.h.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define CSQ_HOST_DEVICE __host__ __device__
#else
#define CSQ_HOST_DEVICE
#endif

namespace csq {

// The y of a row with one factor.
constexpr int kOneFactor = -1;

// CSQ: w = s^2. The rows are the pairs x <= y <= d of extended coordinates, in the public
// order of CSQState (a tensor that moves between devices with .to()):
//   [pairs x <= y < d  (row-major upper triangle) | linear (x, d), x < d | constant (d, d)]
// i.e. psi = [k_x k_y | k_x | 1] and phi = [tau^2 m q_x q_y | 2 tau b q_x | b^2], m = 2 off the
// diagonal (each off-diagonal pair stands for (x, y) and (y, x)).
struct SquareMap {
  static constexpr int kDegree = 2;

  // Pairs x <= y < d: the quadratic features of a d-vector.
  CSQ_HOST_DEVICE static constexpr int64_t num_pairs(int64_t d) { return d * (d + 1) / 2; }
  // F = num_pairs(d + 1): [pairs | linear | constant].
  CSQ_HOST_DEVICE static constexpr int64_t num_features(int64_t d) {
    return num_pairs(d) + d + 1;
  }
  CSQ_HOST_DEVICE static int64_t key_sum_row(int64_t x, int64_t d) { return num_pairs(d) + x; }
  CSQ_HOST_DEVICE static int64_t count_row(int64_t d) { return num_features(d) - 1; }

  // The row of the extended pair (x, y), x <= y <= d.
  CSQ_HOST_DEVICE static int64_t row_of(int x, int y, int d) {
    if (y < d) return int64_t(x) * d - int64_t(x) * (x - 1) / 2 + (y - x);
    if (x < d) return num_pairs(d) + x;
    return num_pairs(d) + d;  // the constant feature, F - 1
  }

  // The extended pair (x, y) of row f (the inverse of row_of); O(d).
  CSQ_HOST_DEVICE static void row_factors(int64_t f, int d, int* x, int* y) {
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

  template <typename Fn>
  CSQ_HOST_DEVICE static void for_each_row(int d, const Fn& fn) {
    int64_t f = 0;
    for (int x = 0; x < d; ++x)
      for (int y = x; y < d; ++y) fn(f++, x, y);
    for (int x = 0; x <= d; ++x) fn(f++, x, d);
  }

  template <typename T>
  CSQ_HOST_DEVICE static T query_weight(int x, int y) {
    return x == y ? T(1) : T(2);
  }

  template <typename T>
  CSQ_HOST_DEVICE static T weight(T s) {
    return s * s;
  }
  template <typename T>
  CSQ_HOST_DEVICE static T weight_grad(T s) {
    return T(2) * s;
  }

  // Rows f = f0, f0 + step, ... keeping the pair (x, y) of f without a division (row_factors
  // loops): x, y are the current row's factors while f < num_features(d).
  struct Walk {
    int64_t f;
    int x, y, d;
    CSQ_HOST_DEVICE Walk(int64_t f0, int d_) : f(f0), x(0), y(0), d(d_) {
      const int64_t pairs = num_pairs(d);
      if (f0 >= pairs) {
        x = static_cast<int>(f0 - pairs);
        y = d;
      } else {
        y = static_cast<int>(f0);
        normalize();
      }
    }
    CSQ_HOST_DEVICE void normalize() {
      while (x < d && y >= d) {  // row x of the triangle holds y = x .. d - 1
        y -= d - x - 1;
        ++x;
      }
      if (x >= d) {  // past the triangle: the linear and constant rows (x', d)
        x = static_cast<int>(f - num_pairs(d));
        y = d;
      }
    }
    CSQ_HOST_DEVICE void advance(int step) {
      f += step;
      if (y < d) {
        y += step;
        normalize();
      } else {
        x += step;
      }
    }
  };
};

// The rows of a state under map Map (the public layout is SquareMap's).
template <typename Map>
CSQ_HOST_DEVICE inline int64_t state_head_elems(int64_t dim_k, int64_t dim_v) {
  return Map::num_features(dim_k) * (dim_v + 1);
}

// The carried key sum Z1 (coordinate x, relative to ref) and count Z0 of one head's state: the
// last column of the key-sum rows and of the count row.
template <typename Map, typename T>
CSQ_HOST_DEVICE inline T& state_key_sum(T* head, int64_t x, int64_t dim_k, int64_t dim_v) {
  return head[Map::key_sum_row(x, dim_k) * (dim_v + 1) + dim_v];
}
template <typename Map, typename T>
CSQ_HOST_DEVICE inline T& state_key_count(T* head, int64_t dim_k, int64_t dim_v) {
  return head[Map::count_row(dim_k) * (dim_v + 1) + dim_v];
}

// psi_f(ke) of the row with factors (x, y): ke(z) returns extended coordinate z (ke(d) = 1).
template <typename T, typename KeyAt>
CSQ_HOST_DEVICE inline T key_feature(int x, int y, const KeyAt& ke) {
  return y == kOneFactor ? ke(x) : ke(x) * ke(y);
}
// phi_f(qe) of the row with factors (x, y): qe(z) returns extended coordinate z (qe(d) = b).
template <typename Map, typename T, typename QueryAt>
CSQ_HOST_DEVICE inline T query_feature(int x, int y, const QueryAt& qe) {
  return Map::template query_weight<T>(x, y) * (y == kOneFactor ? qe(x) : qe(x) * qe(y));
}

}  // namespace csq
