// A feature map's rows as a tensor, for the Python mirror's check (tests/test_feature_map.py):
// (F, 3) int64, per row in order its factors x, y (kOneFactor for one) and its query weight
// m_f. torch.ops.csq_ext.feature_map_rows returns StateMap's; the test harness
// (csrc/testing/csq_test_maps.cpp) the tests' maps'.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "csq_feature_map.h"

namespace csq {

template <typename Map>
at::Tensor feature_map_table(int64_t dim_k) {
  TORCH_CHECK(dim_k >= 1, "feature_map_rows: dim_k must be >= 1, got ", dim_k);
  at::Tensor t = at::empty({Map::num_features(dim_k), 3}, at::kLong);
  int64_t* out = t.data_ptr<int64_t>();
  Map::for_each_row(static_cast<int>(dim_k), [&](int64_t f, int x, int y) {
    out[3 * f] = x;
    out[3 * f + 1] = y;
    out[3 * f + 2] = static_cast<int64_t>(Map::template query_weight<double>(x, y));
  });
  return t;
}

}  // namespace csq
