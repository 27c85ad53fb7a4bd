// A second feature map, for the tests only (never in a build that ships): w = s, the degree-1
// map psi(ke) = ke, phi(qe) = qe. It keeps the feature-map seam honest: plugged in through the
// policy (csq_feature_map.h), it runs the CPU kernels (tests/test_feature_map.py, through
// csrc/testing/csq_test_maps.cpp) and the CUDA kernels in the emulator (csrc/cuda/emu) against
// its own float64 reference (csq_ext/feature_map.py). Rows: the extended coordinates
// [k_0 - r_0, ..., k_{d-1} - r_{d-1}, 1] in order, so row x < d holds the key sums and row d
// the key count, as centering needs.
#pragma once

#include <cstdint>

#include "../csq_feature_map.h"

namespace csq {

struct LinearMap {
  static constexpr int kDegree = 1;

  CSQ_HOST_DEVICE static constexpr int64_t num_features(int64_t d) { return d + 1; }
  CSQ_HOST_DEVICE static int64_t key_sum_row(int64_t x, int64_t) { return x; }
  CSQ_HOST_DEVICE static int64_t count_row(int64_t d) { return d; }

  CSQ_HOST_DEVICE static void row_factors(int64_t f, int, int* x, int* y) {
    *x = static_cast<int>(f);
    *y = kOneFactor;
  }
  template <typename Fn>
  CSQ_HOST_DEVICE static void for_each_row(int d, const Fn& fn) {
    for (int x = 0; x <= d; ++x) fn(int64_t(x), x, kOneFactor);
  }

  template <typename T>
  CSQ_HOST_DEVICE static T query_weight(int, int) {
    return T(1);
  }
  template <typename T>
  CSQ_HOST_DEVICE static T weight(T s) {
    return s;
  }
  template <typename T>
  CSQ_HOST_DEVICE static T weight_grad(T) {
    return T(1);
  }

  struct Walk {
    int64_t f;
    int x, y;
    CSQ_HOST_DEVICE Walk(int64_t f0, int) : f(f0), x(static_cast<int>(f0)), y(kOneFactor) {}
    CSQ_HOST_DEVICE void advance(int step) {
      f += step;
      x += step;
    }
  };
};

}  // namespace csq
