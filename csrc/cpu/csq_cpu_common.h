// Building blocks of the CPU kernels (chunked path; the loaders and SeqTask also serve the
// direct path): the unit of work, loading a chunk into contiguous accumulation-type buffers,
// the feature rows (csq_features.h), and the symmetric matrix-vector product that maps a
// feature-space gradient back to q or k. The big products go through ATen (MKL/oneDNN).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "csq_gemm.h"
#include "../csq_params.h"

namespace csq {
namespace cpu {

// One unit of work: a sequence (a batch entry, or a packed segment) and a key/value head.
struct SeqTask {
  int64_t seq;    // index of the sequence's state / ref
  int64_t batch;  // batch index of the inputs (0 for packed segments)
  int64_t start;  // first position of the sequence in the inputs
  int64_t len;    // its length
  int64_t head_k;
};

inline SeqTask seq_task(const QkvParams& p, int64_t task) {
  const int64_t s = task / p.heads_k, g = task % p.heads_k;
  if (p.cu_seqlens == nullptr) return {s, s, 0, p.seqlen, g};
  return {s, 0, p.cu_seqlens[s], p.cu_seqlens[s + 1] - p.cu_seqlens[s], g};
}

// Element pointer of row `n` of head (b, h) in a (B, H, N, D) strided tensor.
template <typename T>
inline const T* row_ptr(const void* base, const int64_t* stride, int64_t b, int64_t h,
                        int64_t n) {
  return static_cast<const T*>(base) + b * stride[0] + h * stride[1] + n * stride[2];
}

// Copies rows [row0, row0 + rows) of head (b, h) into out[i * row_step + x * col_step],
// converting to acc_t and subtracting `ref` (length d) when given. Handles any strides,
// including the last.
template <typename scalar_t, typename acc_t>
inline void load_block(const void* base, const int64_t* stride, int64_t b, int64_t h,
                       int64_t row0, int64_t rows, int64_t d, const acc_t* ref, acc_t* out,
                       int64_t row_step, int64_t col_step) {
  for (int64_t i = 0; i < rows; ++i) {
    const scalar_t* src = row_ptr<scalar_t>(base, stride, b, h, row0 + i);
    acc_t* dst = out + i * row_step;
    for (int64_t x = 0; x < d; ++x) {
      const acc_t value = static_cast<acc_t>(src[x * stride[3]]);
      dst[x * col_step] = ref != nullptr ? value - ref[x] : value;
    }
  }
}

// The rows as rows: out (rows x ld).
template <typename scalar_t, typename acc_t>
inline void load_rows(const void* base, const int64_t* stride, int64_t b, int64_t h,
                      int64_t row0, int64_t rows, int64_t d, const acc_t* ref, acc_t* out,
                      int64_t ld) {
  load_block<scalar_t, acc_t>(base, stride, b, h, row0, rows, d, ref, out, ld, 1);
}

// The rows transposed: out[x * ld + i] (d x rows, ld >= rows), for GEMM operands that the
// microkernel wants as (k x n) rows (csq_gemm.h).
template <typename scalar_t, typename acc_t>
inline void load_rows_t(const void* base, const int64_t* stride, int64_t b, int64_t h,
                        int64_t row0, int64_t rows, int64_t d, const acc_t* ref, acc_t* out,
                        int64_t ld) {
  load_block<scalar_t, acc_t>(base, stride, b, h, row0, rows, d, ref, out, 1, ld);
}

// Values with a ones column appended: rows x (Dv + 1). The ones column turns the denominator
// into the last column of the numerator, so one product serves both.
template <typename scalar_t, typename acc_t>
inline void load_values_aug(const QkvParams& p, int64_t b, int64_t g, int64_t row0,
                            int64_t rows, acc_t* out) {
  const int64_t dv1 = p.dim_v + 1;
  load_rows<scalar_t, acc_t>(p.v, p.v_stride, b, g, row0, rows, p.dim_v, nullptr, out, dv1);
  for (int64_t i = 0; i < rows; ++i) out[i * dv1 + p.dim_v] = acc_t(1);
}

// A task's rows of a state tensor (S, Hk, F, Dv + 1): its F x (Dv + 1) sums.
template <typename Ptr>
inline Ptr task_state(Ptr base, const QkvParams& p, const SeqTask& t) {
  return base + (t.seq * p.heads_k + t.head_k) * state_head_elems(p.dim_k, p.dim_v);
}

// A task's sums and ref in the forward's carried-state tensors (state_in / state_out, ref_in /
// ref_out): its own entry, or its slot of a pool (csq_params.h, StatePool).
template <typename Ptr>
inline Ptr task_pooled_sums(Ptr base, const FwdParams& p, const SeqTask& t) {
  return base + state_sums_offset(p.pool, t.seq, t.head_k, p.heads_k,
                                  state_head_elems(p.dim_k, p.dim_v));
}
template <typename Ptr>
inline Ptr task_pooled_ref(Ptr base, const FwdParams& p, const SeqTask& t) {
  return base + state_ref_offset(p.pool, t.seq, t.head_k, p.heads_k, p.dim_k);
}

// The task's carried sums, or null when it has none (no state_in, or a fresh pool slot).
template <typename acc_t>
inline const acc_t* carried_sums(const FwdParams& p, const SeqTask& t) {
  if (p.state_in == nullptr || state_fresh(p.pool, t.seq)) return nullptr;
  return task_pooled_sums(static_cast<const acc_t*>(p.state_in), p, t);
}

// The key count that a task's carried state holds (0 without one).
template <typename acc_t>
inline acc_t carried_count(const FwdParams& p, const SeqTask& t) {
  const acc_t* sums = carried_sums<acc_t>(p, t);
  return sums == nullptr ? acc_t(0) : state_key_count(sums, p.dim_k, p.dim_v);
}

// The reference key r of a task (csq_params.h): the carried state's when it holds keys (or
// when the sequence has none to pick from), else the median of the sequence's first keys (0
// for none: a fresh pool slot's r is never read).
template <typename scalar_t, typename acc_t>
inline void task_reference(const FwdParams& p, const SeqTask& t, acc_t* ref) {
  const int64_t d = p.dim_k;
  if (p.ref_in != nullptr && !state_fresh(p.pool, t.seq) &&
      (p.state_in == nullptr || t.len == 0 || carried_count<acc_t>(p, t) != acc_t(0))) {
    const acc_t* src = task_pooled_ref(static_cast<const acc_t*>(p.ref_in), p, t);
    std::copy(src, src + d, ref);
    return;
  }
  const int64_t m = std::min<int64_t>(t.len, kRefKeys);
  for (int64_t x = 0; x < d; ++x)
    ref[x] = ref_key_median<acc_t>(m, [&](int64_t j) {
      return static_cast<acc_t>(
          row_ptr<scalar_t>(p.k, p.k_stride, t.batch, t.head_k, t.start + j)[x * p.k_stride[3]]);
    });
}

// Starts a task's key state: the carried sums (F x (Dv + 1)) or zeros. Fills ksum with the
// carried sum of shifted keys and returns the carried key count (both read off the ones
// column of the sums).
template <typename acc_t>
inline acc_t task_initial_state(const FwdParams& p, const SeqTask& t, acc_t* state,
                                acc_t* ksum) {
  const int64_t d = p.dim_k, elems = state_head_elems(d, p.dim_v);
  const acc_t* src = carried_sums<acc_t>(p, t);
  if (src == nullptr) {
    std::fill(state, state + elems, acc_t(0));
    std::fill(ksum, ksum + d, acc_t(0));
    return acc_t(0);
  }
  std::copy(src, src + elems, state);
  for (int64_t x = 0; x < d; ++x) ksum[x] = state_key_sum(state, x, d, p.dim_v);
  return state_key_count(state, d, p.dim_v);
}

// Per-query shifts b_i for the rows of a chunk (see csq_params.h): with centering
// b_i = c - tau <q_i, mu_i>, else b_i = c + tau <q_i, ref>.
template <typename acc_t>
inline void query_shifts(const QkvParams& p, const acc_t* qc, const acc_t* mu, const acc_t* ref,
                         int64_t rows, acc_t shift, acc_t tau, acc_t* bq) {
  const int64_t d = p.dim_k;
  for (int64_t i = 0; i < rows; ++i) {
    acc_t dot = 0;
    if (p.center)
      for (int64_t x = 0; x < d; ++x) dot -= qc[i * d + x] * mu[i * d + x];
    else
      for (int64_t x = 0; x < d; ++x) dot += qc[i * d + x] * ref[x];
    bq[i] = shift + tau * dot;
  }
}

// Key features psi(k) (csq_features.h), one row of length F per key.
template <typename acc_t>
inline void key_features(const acc_t* k, int64_t rows, int64_t d, acc_t* psi) {
  const int64_t f = num_features(d);
  for (int64_t i = 0; i < rows; ++i) {
    acc_t* out = psi + i * f;
    for_each_key_feature(k + i * d, d, [out](int64_t r, acc_t x) { out[r] = x; });
  }
}

// A per-thread scratch buffer of at least n elements (contents unspecified).
template <typename acc_t>
inline acc_t* thread_scratch(int64_t n) {
  thread_local std::vector<acc_t> buf;
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
  return buf.data();
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

// out_z += off * sum_{y != z} u_{zy} x_y + diag * u_zz x_z, where u holds the upper triangle
// of a symmetric D x D matrix in pair order. This is the gradient of the quadratic part of a
// feature dot product with respect to the vector the features were built from.
template <typename acc_t>
inline void sym_matvec_add(const acc_t* u, const acc_t* x, int64_t d, acc_t off, acc_t diag,
                           acc_t* out) {
  int64_t p = 0;
  for (int64_t a = 0; a < d; ++a) {
    out[a] += diag * u[p] * x[a];
    ++p;
    acc_t acc_a = 0;
    const acc_t xa = x[a];
    for (int64_t c = a + 1; c < d; ++c, ++p) {
      acc_a += u[p] * x[c];
      out[c] += off * u[p] * xa;
    }
    out[a] += off * acc_a;
  }
}

// mu'_i for the rows of a chunk: the mean of the shifted keys query i attends to. ksum holds
// the sum of the n_before shifted keys before the chunk (causal) or of all n_total keys.
template <typename acc_t>
inline void key_means(const acc_t* kc, int64_t rows, int64_t d, const acc_t* ksum,
                      acc_t n_before, bool causal, int64_t n_total, acc_t* mu) {
  if (!causal) {
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t x = 0; x < d; ++x) mu[i * d + x] = ksum[x] / acc_t(n_total);
    return;
  }
  for (int64_t i = 0; i < rows; ++i) {
    const acc_t* prev = i == 0 ? ksum : mu + (i - 1) * d;  // running sums, divided below
    for (int64_t x = 0; x < d; ++x) mu[i * d + x] = prev[x] + kc[i * d + x];
  }
  for (int64_t i = rows - 1; i >= 0; --i)
    for (int64_t x = 0; x < d; ++x) mu[i * d + x] /= n_before + acc_t(i + 1);
}

// Adds the rows of a (rows x d) block to sum (d).
template <typename acc_t>
inline void add_rows(const acc_t* block, int64_t rows, int64_t d, acc_t* sum) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t x = 0; x < d; ++x) sum[x] += block[i * d + x];
}

// A row-major matrix view (leading dimension ld) of raw acc_t memory, for handing blocks to
// ATen's GEMMs without copies.
template <typename acc_t>
inline at::Tensor mat(acc_t* data, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(data, {rows, cols}, {ld, 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
}

template <typename acc_t>
inline at::Tensor mat(acc_t* data, int64_t rows, int64_t cols) {
  return mat(data, rows, cols, cols);
}

inline bool all_finite_impl(const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(x[i])) return false;
  return true;
}
inline bool all_finite_impl(const double* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(x[i])) return false;
  return true;
}
template <typename acc_t>
inline bool all_finite(const std::vector<acc_t>& x, int64_t n) {
  return all_finite_impl(x.data(), n);
}

// out (rows x cols, ld ldo) += alpha * L X, or alpha * L^T X with `transpose`, where L
// (rows x rows) is zero above the diagonal, skipping those zeros. The in-chunk products use it
// instead of a GEMM when X holds NaN or Inf: a GEMM would spread 0 * NaN into rows that the
// causal mask keeps them away from.
template <typename acc_t>
inline void lower_mm_add(const acc_t* L, int64_t rows, const acc_t* X, int64_t cols, int64_t ldx,
                         acc_t alpha, bool transpose, acc_t* out, int64_t ldo) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j <= i; ++j) {
      const acc_t l = alpha * L[i * rows + j];
      const int64_t dst = transpose ? j : i, src = transpose ? i : j;
      for (int64_t c = 0; c < cols; ++c) out[dst * ldo + c] += l * X[src * ldx + c];
    }
}

// The key side of a task's scan, shared by the forward and the backward's first pass: the
// current chunk's shifted keys, augmented values and key features, and the key state
// S = sum psi(k - ref) [v, 1]^T with the running sum of shifted keys. The features are built
// transposed (psi_t, F x C) for the state update, or row by row (psi, C x F) with
// `features_by_row` for the backward's second pass.
template <typename scalar_t, typename acc_t>
struct KeyScan {
  const FwdParams& p;
  const SeqTask t;
  const int64_t D, Dv1, F, C;
  std::vector<acc_t> ref, kc, vc, psi, psi_t, ksum, state;
  acc_t carried_keys = 0;  // keys carried in by an initial state
  bool features_by_row = false;

  KeyScan(const FwdParams& p_, const SeqTask& t_)
      : p(p_), t(t_), D(p_.dim_k), Dv1(p_.dim_v + 1), F(num_features(p_.dim_k)), C(p_.chunk),
        ref(D), kc(C * D), vc(C * Dv1), psi_t(C * F), ksum(D), state(F * Dv1) {
    task_reference<scalar_t, acc_t>(p, t, ref.data());
  }

  // The state before the sequence: the carried one, or empty.
  void start() { carried_keys = task_initial_state(p, t, state.data(), ksum.data()); }

  // Keys (shifted by ref), values with their ones column, and key features of a chunk.
  void load(int64_t t0, int64_t rows) {
    load_rows<scalar_t, acc_t>(p.k, p.k_stride, t.batch, t.head_k, t.start + t0, rows, D,
                               ref.data(), kc.data(), D);
    load_values_aug<scalar_t, acc_t>(p, t.batch, t.head_k, t.start + t0, rows, vc.data());
    if (features_by_row) {
      psi.resize(C * F);  // only the backward's second pass asks for it
      key_features(kc.data(), rows, D, psi.data());
    }
    else
      key_features_t(kc.data(), rows, D, psi_t.data(), C);
  }

  // The loaded chunk joins the state: S += Psi^T V~, and the running key sum.
  void absorb(int64_t rows) {
    gemm<acc_t>(false, false, F, Dv1, rows, acc_t(1), psi_t.data(), C, vc.data(), Dv1, acc_t(1),
                state.data(), Dv1);
    add_rows(kc.data(), rows, D, ksum.data());
  }

  // Non-causal: every key joins the state before any query reads it.
  void absorb_all() {
    for (int64_t t0 = 0; t0 < t.len; t0 += C) {
      const int64_t rows = std::min(C, t.len - t0);
      load(t0, rows);
      absorb(rows);
    }
  }
};

// out = a @ b into an existing view (at::mm_out wants an lvalue).
inline void mm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b) {
  at::mm_out(out, a, b);
}

}  // namespace cpu
}  // namespace csq
