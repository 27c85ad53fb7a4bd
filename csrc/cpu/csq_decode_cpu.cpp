// One decoding step in place on the CPU: the new key and value join the carried sums, and each
// query of the group reads them. O(F (Dv + 1)) per head with F = Dk (Dk + 1) / 2 + Dk + 1, the
// features built on the fly, and no allocation per step.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../csq_host.h"
#include "csq_cpu_common.h"

namespace csq {
namespace cpu {
namespace {

template <typename scalar_t, typename acc_t>
void decode_task(const AttnParams& p, int64_t b, int64_t g, acc_t* sums, acc_t* ref) {
  const int64_t D = p.dim_k, Dv = p.dim_v, Dv1 = Dv + 1, P = num_pairs(D), F = num_features(D);
  const acc_t tau = static_cast<acc_t>(p.scale), eps = static_cast<acc_t>(p.eps);
  const acc_t* shift = static_cast<const acc_t*>(p.shift);
  // Per-thread scratch, sized once: the steady state of a serving loop allocates nothing.
  thread_local std::vector<acc_t> kq, vt, num;
  kq.resize(D);
  vt.resize(Dv1);
  num.resize(Dv1);

  // A state that holds no key yet takes this first key as its ref (the median of one key,
  // csq_params.h), as a prefill would: the sums stay small when keys share a large offset.
  if (sums[(F - 1) * Dv1 + Dv] == acc_t(0)) {
    const scalar_t* k = row_ptr<scalar_t>(p.k, p.k_stride, b, g, 0);
    for (int64_t x = 0; x < D; ++x)
      ref[x] = ref_key_median<acc_t>(1, [&](int64_t) { return static_cast<acc_t>(k[x * p.k_stride[3]]); });
  }

  // sums += psi(k - ref) [v, 1]^T, one feature row at a time.
  load_rows<scalar_t, acc_t>(p.k, p.k_stride, b, g, 0, 1, D, ref, kq.data(), D);
  load_values_aug<scalar_t, acc_t>(p, b, g, 0, 1, vt.data());
  auto add_row = [&](int64_t f, acc_t feature) {
    acc_t* row = sums + f * Dv1;
    for (int64_t x = 0; x < Dv1; ++x) row[x] += feature * vt[x];
  };
  int64_t f = 0;
  for (int64_t x = 0; x < D; ++x)
    for (int64_t y = x; y < D; ++y) add_row(f++, kq[x] * kq[y]);
  for (int64_t x = 0; x < D; ++x) add_row(f++, kq[x]);
  add_row(f, acc_t(1));

  const acc_t count = sums[(F - 1) * Dv1 + Dv];
  for (int64_t hh = 0; hh < p.group; ++hh) {
    const int64_t h = g * p.group + hh;
    load_rows<scalar_t, acc_t>(p.q, p.q_stride, b, h, 0, 1, D, nullptr, kq.data(), D);
    acc_t dot = 0;  // b = c - tau <q, mu> (centering) or c + tau <q, ref>
    for (int64_t x = 0; x < D; ++x)
      dot += p.center ? -kq[x] * sums[(P + x) * Dv1 + Dv] / count : kq[x] * ref[x];
    const acc_t bq = shift[h] + tau * dot;

    // num = phi(q, b)^T sums, with phi built on the fly.
    std::fill(num.begin(), num.end(), acc_t(0));
    auto read_row = [&](int64_t row_index, acc_t feature) {
      const acc_t* row = sums + row_index * Dv1;
      for (int64_t x = 0; x < Dv1; ++x) num[x] += feature * row[x];
    };
    f = 0;
    for (int64_t x = 0; x < D; ++x) {
      read_row(f++, tau * tau * kq[x] * kq[x]);
      for (int64_t y = x + 1; y < D; ++y) read_row(f++, 2 * tau * tau * kq[x] * kq[y]);
    }
    for (int64_t x = 0; x < D; ++x) read_row(f++, 2 * tau * bq * kq[x]);
    read_row(f, bq * bq);

    const acc_t inv = p.normalize ? acc_t(1) / (num[Dv] + eps) : acc_t(1);
    scalar_t* y = static_cast<scalar_t*>(p.y) + (b * p.heads_q + h) * Dv;
    for (int64_t x = 0; x < Dv; ++x) y[x] = static_cast<scalar_t>(num[x] * inv);
  }
}

void csq_decode_cpu(at::Tensor& sums, at::Tensor& ref, const at::Tensor& q,
                    const at::Tensor& k, const at::Tensor& v, const at::Tensor& shift,
                    at::Tensor& y, double scale, bool center, bool normalize, double eps) {
  const AttnParams p =
      make_decode_params(sums, ref, q, k, v, shift, y, scale, center, normalize, eps);
  const int64_t F = num_features(p.dim_k), Dv1 = p.dim_v + 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "csq_decode_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    acc_t* s = sums.data_ptr<acc_t>();
    acc_t* r = static_cast<acc_t*>(p.ref_out);
    at::parallel_for(0, p.batch * p.heads_k, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task)
        decode_task<scalar_t, acc_t>(p, task / p.heads_k, task % p.heads_k,
                                     s + task * F * Dv1, r + task * p.dim_k);
    });
  });
}

}  // namespace
}  // namespace cpu
}  // namespace csq

TORCH_LIBRARY_IMPL(csq_ext, CPU, m) { m.impl("csq_decode_", &csq::cpu::csq_decode_cpu); }
