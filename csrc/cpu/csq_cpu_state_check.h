// The float32 state's conditioning check of the chunked CPU kernels (csq_params.h,
// state_read_ill_conditioned): the key spread a state holds, the rows that read it beyond the
// limit, and the flag that sends the whole op to float64 (the host files). Written for CSQ's
// bound, the square of a score (a map with rows of two factors); a map of degree 1 is not
// checked.
#pragma once

#include <cmath>
#include <cstdint>

#include "../csq_params.h"

namespace csq {
namespace cpu {

// Whether the kernels check the state of this call for this map.
template <typename Map>
inline bool checks_state(const FwdParams& p) {
  return Map::kDegree == 2 && p.state_condition_limit > 0;
}

// The trace T of a state's key scatter, sum_j |k_j - r|^2 (its rows ke_x ke_x, x < d, in the
// count column), and its key count n.
template <typename Map, typename acc_t>
inline void state_key_spread(const acc_t* state, int64_t d, int64_t dv, double* trace,
                             double* count) {
  double t = 0;
  Map::for_each_row(static_cast<int>(d), [&](int64_t f, int x, int y) {
    if (x == y && x < d) t += double(state[f * (dv + 1) + dv]);
  });
  *trace = t;
  *count = double(state[Map::count_row(d) * (dv + 1) + dv]);
}

// Whether one of `rows` query rows (q, their shifts b and weight sums den, den_ld apart) reads
// a state of that trace and count beyond p.state_condition_limit.
template <typename acc_t>
inline bool rows_ill_conditioned(const FwdParams& p, const acc_t* q, const acc_t* b,
                                 const acc_t* den, int64_t den_ld, int64_t rows, double trace,
                                 double count) {
  const int64_t d = p.dim_k;
  for (int64_t i = 0; i < rows; ++i) {
    double qq = 0;
    for (int64_t x = 0; x < d; ++x) qq += double(q[i * d + x]) * double(q[i * d + x]);
    if (state_read_ill_conditioned(std::fabs(p.scale) * std::sqrt(qq), trace, double(b[i]),
                                   count, double(den[i * den_ld]), p.state_condition_limit))
      return true;
  }
  return false;
}

// The flag that sends the op to float64 (FwdParams::state_too_coarse), shared by the tasks.
inline bool state_flagged(const FwdParams& p) {
  return p.state_too_coarse != nullptr && __atomic_load_n(p.state_too_coarse, __ATOMIC_RELAXED);
}
inline void flag_state(const FwdParams& p) {
  __atomic_store_n(p.state_too_coarse, 1, __ATOMIC_RELAXED);
}

}  // namespace cpu
}  // namespace csq
