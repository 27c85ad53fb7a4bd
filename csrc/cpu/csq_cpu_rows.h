// Rows of the inputs as the CPU kernels use them (both paths): the unit of work (a sequence
// and a key/value head), strided rows loaded into contiguous accumulation-type buffers (as
// rows or transposed, relative to a reference key), per-thread scratch, matrix views for
// ATen's GEMMs, and the masked lower-triangular product that keeps NaN / Inf on its side of
// the causal mask.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

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
// Rows of contiguous coordinates go eight at a time, a coordinate of eight rows per step: one
// contiguous store of eight where the row by row loop stored each element alone (the store
// was half of the key store's time, bench/NOTES.md 17).
template <typename scalar_t, typename acc_t>
inline void load_rows_t(const void* base, const int64_t* stride, int64_t b, int64_t h,
                        int64_t row0, int64_t rows, int64_t d, const acc_t* ref, acc_t* out,
                        int64_t ld) {
  constexpr int64_t R = 8;
  int64_t i0 = 0;
  if (stride[3] == 1) {
    for (; i0 + R <= rows; i0 += R) {
      const scalar_t* src[R];
      for (int64_t i = 0; i < R; ++i) src[i] = row_ptr<scalar_t>(base, stride, b, h, row0 + i0 + i);
      for (int64_t x = 0; x < d; ++x) {
        const acc_t r = ref != nullptr ? ref[x] : acc_t(0);
        acc_t* dst = out + x * ld + i0;
        for (int64_t i = 0; i < R; ++i) dst[i] = static_cast<acc_t>(src[i][x]) - r;
      }
    }
  }
  load_block<scalar_t, acc_t>(base, stride, b, h, row0 + i0, rows - i0, d, ref, out + i0, 1, ld);
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

// A per-thread scratch buffer of at least n elements (contents unspecified).
template <typename acc_t>
inline acc_t* thread_scratch(int64_t n) {
  thread_local std::vector<acc_t> buf;
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
  return buf.data();
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

// Whether x[0, n) holds no NaN or Inf. x - x is 0 for a finite x and NaN otherwise; summed in
// 16 partial sums per block of 256 (the loop vectorizes, where a test per element with an
// early exit did not), a block's sum is NaN exactly when the block holds a NaN or an Inf.
template <typename T>
inline bool all_finite_impl(const T* x, int64_t n) {
  constexpr int64_t L = 16, kBlock = 256;
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    T part[L] = {};
    for (int64_t j = i; j < i + kBlock; j += L)
      for (int64_t l = 0; l < L; ++l) part[l] += x[j + l] - x[j + l];
    T sum = 0;
    for (int64_t l = 0; l < L; ++l) sum += part[l];
    if (!(sum == 0)) return false;
  }
  for (; i < n; ++i)
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

}  // namespace cpu
}  // namespace csq
