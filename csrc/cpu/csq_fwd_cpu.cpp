// CSQ attention forward on the CPU: the chunked algorithm of the spec, one task per
// (sequence, key/value head), all query heads of the group served by one key state.
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
void forward_task(const AttnParams& p, const SeqTask& t) {
  const int64_t N = t.len, D = p.dim_k, Dv = p.dim_v, Dv1 = Dv + 1;
  const int64_t F = num_features(D), C = p.chunk, g = t.head_k;
  const acc_t tau = static_cast<acc_t>(p.scale), eps = static_cast<acc_t>(p.eps);
  const acc_t* shift = static_cast<const acc_t*>(p.shift);

  KeyScan<scalar_t, acc_t> keys(p, t);
  std::vector<acc_t>&kc = keys.kc, &vc = keys.vc, &ref = keys.ref, &ksum = keys.ksum;
  std::vector<acc_t> qc(C * D), mu(C * D), bq(C), phi(C * F), num(C * Dv1), w(C * C);
  keys.start();
  const bool carried = p.state_in != nullptr;
  at::Tensor S = mat(keys.state.data(), F, Dv1);
  if (!p.causal) keys.absorb_all();

  for (int64_t t0 = 0; t0 < N; t0 += C) {
    const int64_t rows = std::min(C, N - t0);
    if (p.causal) keys.load(t0, rows);
    if (p.center)
      key_means(kc.data(), rows, D, ksum.data(), keys.n0 + acc_t(t0), p.causal, N, mu.data());

    for (int64_t hh = 0; hh < p.group; ++hh) {
      const int64_t h = g * p.group + hh;
      load_rows<scalar_t, acc_t>(p.q, p.q_stride, t.batch, h, t.start + t0, rows, D, nullptr,
                                 qc.data(), D);
      query_shifts(p, qc.data(), mu.data(), ref.data(), rows, shift[h], tau, bq.data());

      // Keys of earlier chunks (or all keys) through the state: num~ = phi(Q, b) S.
      at::Tensor Num = mat(num.data(), rows, Dv1);
      if (p.causal && t0 == 0 && !carried) {
        Num.zero_();
      } else {
        query_features(qc.data(), bq.data(), rows, D, tau, phi.data());
        mm_into(Num, mat(phi.data(), rows, F), S);
      }

      // Keys of this chunk directly: W_ij = (tau <q_i, k_j> + b_i)^2 for j <= i.
      if (p.causal) {
        at::Tensor W = mat(w.data(), rows, rows);
        mm_into(W, mat(qc.data(), rows, D), mat(kc.data(), rows, D).t());
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t j = 0; j < rows; ++j) {
            const acc_t s = tau * w[i * rows + j] + bq[i];
            w[i * rows + j] = j <= i ? s * s : acc_t(0);
          }
        if (all_finite(vc, rows * Dv1))
          Num.addmm_(W, mat(vc.data(), rows, Dv1));
        else
          lower_mm_add(w.data(), rows, vc.data(), Dv1, Dv1, acc_t(1), false, num.data(), Dv1);
      }

      const int64_t row0 = (t.batch * p.heads_q + h) * p.seqlen + t.start + t0;
      acc_t* y = static_cast<acc_t*>(p.y) + row0 * Dv;
      for (int64_t i = 0; i < rows; ++i) {
        const acc_t den = num[i * Dv1 + Dv];
        const acc_t inv = p.normalize ? acc_t(1) / (den + eps) : acc_t(1);
        for (int64_t x = 0; x < Dv; ++x)
          y[i * Dv + x] = num[i * Dv1 + x] * inv;
        static_cast<acc_t*>(p.b)[row0 + i] = bq[i];
        static_cast<acc_t*>(p.den)[row0 + i] = den;
      }
    }
    if (p.causal) keys.absorb(rows);
  }

  const int64_t head_state = t.seq * p.heads_k + g;
  std::copy(ref.begin(), ref.end(), static_cast<acc_t*>(p.ref_out) + head_state * D);
  if (p.state_out != nullptr)
    std::copy(keys.state.begin(), keys.state.end(),
              static_cast<acc_t*>(p.state_out) + head_state * F * Dv1);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> csq_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& shift,
    const c10::optional<at::Tensor>& cu_seqlens, const c10::optional<at::Tensor>& state_in,
    const c10::optional<at::Tensor>& ref_in, bool causal, double scale, bool center,
    bool normalize, double eps, int64_t chunk_size, bool return_state) {
  check_inputs(q, k, v, shift, eps, chunk_size);
  TORCH_CHECK(causal || !return_state, "csq_ext: return_state needs causal=True");
  const auto acc = acc_dtype(q.scalar_type());
  at::Tensor shift_acc = shift.to(acc).contiguous();
  AttnParams p = make_params(q, k, v, shift_acc, causal, scale, center, normalize, eps, chunk_size);
  at::Tensor cu = set_sequence_params(p, q, cu_seqlens, state_in, ref_in);

  const auto B = q.size(0), Hq = q.size(1), N = q.size(2), Dv = v.size(3);
  at::Tensor y = at::empty({B, Hq, N, Dv}, q.options().dtype(acc));
  at::Tensor bq = at::empty({B, Hq, N}, q.options().dtype(acc));
  at::Tensor den = at::empty({B, Hq, N}, q.options().dtype(acc));
  at::Tensor state_out = return_state ? at::empty(state_shape(p), q.options().dtype(acc))
                                      : at::empty({0}, q.options().dtype(acc));
  at::Tensor ref_out = at::empty({p.num_seqs, p.heads_k, p.dim_k}, q.options().dtype(acc));
  p.y = y.data_ptr();
  p.b = bq.data_ptr();
  p.den = den.data_ptr();
  p.state_out = return_state ? state_out.data_ptr() : nullptr;
  p.ref_out = ref_out.data_ptr();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "csq_fwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    at::parallel_for(0, p.num_seqs * p.heads_k, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task)
        forward_task<scalar_t, acc_t>(p, seq_task(p, task));
    });
  });
  return {y, bq, den, state_out, ref_out};
}

}  // namespace
}  // namespace cpu
}  // namespace csq

TORCH_LIBRARY_IMPL(csq_ext, CPU, m) { m.impl("csq_fwd", &csq::cpu::csq_fwd_cpu); }
