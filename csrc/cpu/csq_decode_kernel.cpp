// One decoding step in place on the CPU: the new key and value join the carried sums, and each
// query of the group reads them. O(F (Dv + 1)) per head for any feature map (Map,
// csq_feature_map.h), the features built on the fly, and no allocation per step.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

#include "../csq_feature_map.h"
#include "csq_cpu_rows.h"
#include "csq_cpu_launch.h"

namespace csq {
namespace cpu {
namespace {

template <typename scalar_t, typename acc_t, typename Map>
void decode_task(const DecodeParams& p, int64_t b, int64_t g, acc_t* sums, acc_t* ref) {
  const int64_t D = p.dim_k, Dv = p.dim_v, Dv1 = Dv + 1;
  const acc_t tau = static_cast<acc_t>(p.scale), eps = static_cast<acc_t>(p.eps);
  const acc_t* shift = static_cast<const acc_t*>(p.shift);
  // Per-thread scratch, sized once: the steady state of a serving loop allocates nothing.
  thread_local std::vector<acc_t> kq, vt, num;
  kq.resize(D);
  vt.resize(Dv1);
  num.resize(Dv1);

  // A state that holds no key yet takes this first key as its ref (the median of one key,
  // csq_params.h), as a prefill would: the sums stay small when keys share a large offset.
  if (state_key_count<Map>(sums, D, Dv) == acc_t(0)) {
    const scalar_t* k = row_ptr<scalar_t>(p.k, p.k_stride, b, g, 0);
    for (int64_t x = 0; x < D; ++x)
      ref[x] = ref_key_median<acc_t>(1, [&](int64_t) { return static_cast<acc_t>(k[x * p.k_stride[3]]); });
  }

  // sums += psi(k - ref) [v, 1]^T, one feature row at a time.
  load_rows<scalar_t, acc_t>(p.k, p.k_stride, b, g, 0, 1, D, ref, kq.data(), D);
  load_values_aug<scalar_t, acc_t>(p, b, g, 0, 1, vt.data());
  const auto ke = [&](int z) { return z < D ? kq[z] : acc_t(1); };
  Map::for_each_row(static_cast<int>(D), [&](int64_t f, int x, int y) {
    const acc_t feature = key_feature<acc_t>(x, y, ke);
    acc_t* row = sums + f * Dv1;
    for (int64_t n = 0; n < Dv1; ++n) row[n] += feature * vt[n];
  });

  const acc_t count = state_key_count<Map>(sums, D, Dv);
  for (int64_t hh = 0; hh < p.group; ++hh) {
    const int64_t h = g * p.group + hh;
    load_rows<scalar_t, acc_t>(p.q, p.q_stride, b, h, 0, 1, D, nullptr, kq.data(), D);
    acc_t dot = 0;  // b = c - tau <q, mu> (centering) or c + tau <q, ref>
    for (int64_t x = 0; x < D; ++x)
      dot += p.center ? -kq[x] * state_key_sum<Map>(sums, x, D, Dv) / count : kq[x] * ref[x];
    const acc_t bq = shift[h] + tau * dot;

    // num = phi(q, b)^T sums, with phi built on the fly.
    std::fill(num.begin(), num.end(), acc_t(0));
    const auto qe = [&](int z) { return z < D ? tau * kq[z] : bq; };
    Map::for_each_row(static_cast<int>(D), [&](int64_t f, int x, int y) {
      const acc_t feature = query_feature<Map, acc_t>(x, y, qe);
      const acc_t* row = sums + f * Dv1;
      for (int64_t n = 0; n < Dv1; ++n) num[n] += feature * row[n];
    });

    const acc_t inv = p.normalize ? acc_t(1) / (num[Dv] + eps) : acc_t(1);
    scalar_t* y = static_cast<scalar_t*>(p.y) + (b * p.heads_q + h) * Dv;
    for (int64_t x = 0; x < Dv; ++x) y[x] = static_cast<scalar_t>(num[x] * inv);
  }
}

}  // namespace

template <typename scalar_t, typename Map>
void launch_decode(const DecodeParams& p) {
  using acc_t = acc_type_of<scalar_t>;
  const int64_t elems = state_head_elems<Map>(p.dim_k, p.dim_v);
  acc_t* sums = static_cast<acc_t*>(p.sums);
  acc_t* ref = static_cast<acc_t*>(p.ref);
  at::parallel_for(0, p.batch * p.heads_k, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / p.heads_k, g = task % p.heads_k;
      acc_t* head = sums + state_sums_offset(p.pool, b, g, p.heads_k, elems);
      // A fresh pool slot starts empty: its old contents are never read.
      if (state_fresh(p.pool, b)) std::fill(head, head + elems, acc_t(0));
      decode_task<scalar_t, acc_t, Map>(p, b, g, head,
                                        ref + state_ref_offset(p.pool, b, g, p.heads_k, p.dim_k));
    }
  });
}

CSQ_CPU_INSTANTIATE(launch_decode, DecodeParams);

}  // namespace cpu
}  // namespace csq
