// The in-place decoding step (csq_decode_): one new token per sequence joins the carried sums,
// and every query head of the group reads them. The sums are in the feature map's layout
// (csq_feature_map.h; CSQState's for StateMap): per (sequence, kv head) a row-major
// F x (Dv + 1) matrix, F = Map::num_features(Dk), columns [v | 1]; the rows are walked with
// Map::Walk (no division per row).
//
// A decode step is memory bound: every element of the state is read once and (except the
// last column) written once, O(F (Dv + 1)) per head, with a handful of flops per element. So
// the grid splits each head's state over value columns, never over feature rows:
//
//   decode_kernel        grid (B Hk, ceil(Dv / kDecCols)), 256 threads. CTA (bg, c) owns the
//                        value columns [16 c, 16 c + 16) of every feature row: it adds
//                        psi_f(k - ref) v_n to them and, in the same pass, computes the complete
//                        numerators num_h[n] = sum_f phi_f(q_h, b_h) S_new[f, n] of its columns
//                        for every query head h of the group. Nothing has to be reduced across
//                        CTAs, so no scratch memory and no atomics.
//   decode_count_kernel  grid (B Hk), 256 threads: the last column (the key count, the key sums
//                        Z1 and Z2) += psi_f, after decode_kernel (stream order).
//
// Every CTA of decode_kernel also needs the last column: the key sums and count give b_h (the
// centered shift) and the column gives the denominators. It reads the old values and adds
// psi_f itself; nobody writes that column until decode_count_kernel, so there is no race
// between the column CTAs (they read the same 4-byte elements, served from L2 after the first).
#pragma once

#include "csq_chunked_work.cuh"

namespace csq {
namespace cuda {

constexpr int kDecCols = 16;                     // value columns per CTA (a 64-byte row segment)
constexpr int kDecRows = kThreads / kDecCols;    // feature rows in flight per CTA
constexpr int kDecHeads = 4;                     // query heads per pass (registers)

// decode_kernel's per-coordinate values live in dynamic shared memory sized from Dk (small heads
// do not pay for kMaxHeadDim), coordinate-major: the kDecCoordVals values of coordinate d are
// cv[kDecCoordVals d + i], i = kDecK (k - ref), kDecRef (ref), kDecKsum (the key sum after this
// token), kDecQ + j (tau q of the pass's head j). Every one is then a fixed offset from one base
// address, as with static arrays: separate Dk-long arrays cost decode_kernel registers (a
// pointer each) and spilled it on sm_90a. With the static buffers (at most 9.5 KB) this stays
// below the 48 KB a block gets without opting in.
constexpr int kDecK = 0, kDecRef = 1, kDecKsum = 2, kDecQ = 3;
constexpr int kDecCoordVals = kDecQ + kDecHeads;
static_assert(kDecCoordVals * kMaxHeadDim * sizeof(double) <= 32 * 1024,
              "decode_kernel's shared memory must not need an opt-in");
template <typename Acc>
inline size_t decode_smem_bytes(int D) {
  return sizeof(Acc) * size_t(kDecCoordVals) * size_t(D);
}

// psi_f(ke) of the walk's row (csq_feature_map.h), ke = [kq, 1]; coordinate d of kq is
// kq[kStride * d].
template <int kStride, typename Acc, typename Walk>
__device__ __forceinline__ Acc key_feature_at(const Walk& fw, const Acc* kq, int D) {
  return key_feature<Acc>(fw.x, fw.y, [&](int z) { return z < D ? kq[kStride * z] : Acc(1); });
}

// phi_f(qe) of the walk's row, qe = [tq, b] with tq = tau q; coordinate d of tq is
// tq[kStride * d].
template <int kStride, typename Map, typename Acc, typename Walk>
__device__ __forceinline__ Acc query_feature_at(const Walk& fw, const Acc* tq, Acc b, int D) {
  return query_feature<Map, Acc>(fw.x, fw.y, [&](int z) { return z < D ? tq[kStride * z] : b; });
}

// The sums and the ref of (sequence, kv head) bg: its entry of p.sums / p.ref, or with a pool
// (csq_pool_decode_) those of its slot.
template <typename Map, typename Acc>
__device__ __forceinline__ Acc* decode_head_sums(const DecodeParams& p, int64_t bg) {
  return static_cast<Acc*>(p.sums) + state_sums_offset(p.pool, bg / p.heads_k, bg % p.heads_k,
                                                       p.heads_k,
                                                       state_head_elems<Map>(p.dim_k, p.dim_v));
}
template <typename Acc>
__device__ __forceinline__ Acc* decode_head_ref(const DecodeParams& p, int64_t bg) {
  return static_cast<Acc*>(p.ref) +
         state_ref_offset(p.pool, bg / p.heads_k, bg % p.heads_k, p.heads_k, p.dim_k);
}

// Coordinate d of the ref of a decode step: the state's, or when the state holds no key yet
// (count 0) the median of this one key, i.e. the key itself if finite (csq_params.h), as a
// prefill would pick it. decode_count_kernel, which runs last, writes it into the state.
template <typename Acc>
__device__ __forceinline__ Acc decode_ref(const DecodeParams& p, Acc count_before, int64_t bg,
                                          int d, Acc key) {
  if (count_before != Acc(0)) return decode_head_ref<Acc>(p, bg)[d];
  return ref_key_median<Acc>(1, [&](int64_t) { return key; });
}

// p.sums: (B, Hk, F, Dv + 1) acc, contiguous, or a pool (p.pool); p.ref: (B, Hk, Dk) acc;
// p.y: (B, Hq, 1, Dv) in the input dtype, contiguous; q, k, v strided with N = 1.
template <typename T, typename Acc, typename Map>
__global__ void __launch_bounds__(kThreads) decode_kernel(const DecodeParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];  // decode_smem_bytes
  __shared__ Acc vt[kDecCols];                   // this CTA's value columns of v
  __shared__ Acc bq[kDecHeads];                  // the shifts b_h of the pass's heads
  __shared__ Acc cnt_s;                          // key count after this token
  __shared__ Acc red[kDecHeads][kDecRows][kDecCols + 1];
  __shared__ Acc dred[kDecHeads][kDecRows];

  const int64_t bg = blockIdx.x, bi = bg / p.heads_k, g = bg % p.heads_k;
  const int D = static_cast<int>(p.dim_k), Dv = static_cast<int>(p.dim_v), V1 = Dv + 1;
  Acc* cv = reinterpret_cast<Acc*>(smem_raw);  // coordinate-major, see kDecCoordVals
  const int64_t F = Map::num_features(D);
  const int col0 = static_cast<int>(blockIdx.y) * kDecCols;  // this CTA's first value column
  const int tid = threadIdx.x, r = tid / kDecCols, c = tid % kDecCols, n = col0 + c;
  const bool col_ok = n < Dv;
  const Acc tau = Acc(p.scale);
  Acc* S = decode_head_sums<Map, Acc>(p, bg);

  for (int d = tid; d < D; d += blockDim.x) {
    Acc* cd = cv + kDecCoordVals * d;
    const Acc kraw = load_el<Acc, T>(p.k, p.k_stride, bi, g, 0, d);
    const Acc rd = decode_ref(p, state_key_count<Map>(S, D, Dv), bg, d, kraw);
    const Acc kd = kraw - rd;
    cd[kDecRef] = rd;
    cd[kDecK] = kd;
    cd[kDecKsum] = state_key_sum<Map>(S, d, D, Dv) + kd;
  }
  if (tid < kDecCols)
    vt[tid] = col0 + tid < Dv ? load_el<Acc, T>(p.v, p.v_stride, bi, g, 0, col0 + tid) : Acc(0);
  if (tid == 0) cnt_s = state_key_count<Map>(S, D, Dv) + Acc(1);

  const int64_t G = p.group;
  for (int64_t hb = 0; hb < G; hb += kDecHeads) {
    const int nh = static_cast<int>(min64(kDecHeads, G - hb));
    __syncthreads();  // k - ref, ref, key sums, vt written; the previous pass's q, bq, red read
    for (int e = tid; e < nh * D; e += blockDim.x) {
      const int j = e / D, d = e % D;
      cv[kDecCoordVals * d + kDecQ + j] =
          tau * load_el<Acc, T>(p.q, p.q_stride, bi, g * G + hb + j, 0, d);
    }
    __syncthreads();
    {  // b_h = c_h - tau <q, mu> (center; mu = ksum / count) or c_h + tau <q, ref>: warp j
      const int warp = tid >> 5, lane = tid & 31;
      if (warp < nh) {
        Acc dot = 0;
        for (int d = lane; d < D; d += 32) {
          const Acc* cd = cv + kDecCoordVals * d;
          dot += cd[kDecQ + warp] * (p.center ? cd[kDecKsum] : cd[kDecRef]);
        }
        dot = warp_sum(dot);
        if (lane == 0) {
          const Acc c_h = static_cast<const Acc*>(p.shift)[g * G + hb + warp];
          bq[warp] = p.center ? c_h - dot / cnt_s : c_h + dot;
        }
      }
    }
    __syncthreads();

    Acc num[kDecHeads], den[kDecHeads], bh[kDecHeads];
#pragma unroll
    for (int j = 0; j < kDecHeads; ++j) {
      num[j] = den[j] = Acc(0);
      bh[j] = j < nh ? bq[j] : Acc(0);
    }
    const bool first = hb == 0;  // the first pass writes the update; later ones re-read it
    const Acc vn = vt[c];
    for (typename Map::Walk fw(r, D); fw.f < F; fw.advance(kDecRows)) {
      const Acc psi = key_feature_at<kDecCoordVals>(fw, cv + kDecK, D);
      Acc* row = S + fw.f * V1;
      Acc s_new = 0;
      if (col_ok) {
        s_new = row[n];
        if (first) {
          s_new += psi * vn;
          row[n] = s_new;
        }
      }
      const Acc s_den = row[Dv] + psi;  // the last column after this token
#pragma unroll
      for (int j = 0; j < kDecHeads; ++j) {
        if (j >= nh) break;
        const Acc phi = query_feature_at<kDecCoordVals, Map>(fw, cv + kDecQ + j, bh[j], D);
        num[j] = fma(phi, s_new, num[j]);
        den[j] = fma(phi, s_den, den[j]);
      }
    }
#pragma unroll
    for (int j = 0; j < kDecHeads; ++j) {
      if (j >= nh) break;
      red[j][r][c] = num[j];
      if (c == 0) dred[j][r] = den[j];
    }
    __syncthreads();
    if (tid < nh * kDecCols) {
      const int j = tid / kDecCols, cc = tid % kDecCols, nn = col0 + cc;
      if (nn < Dv) {
        Acc s = 0, d = 0;
        for (int rr = 0; rr < kDecRows; ++rr) {
          s += red[j][rr][cc];
          d += dred[j][rr];
        }
        const Acc val = p.normalize ? s / (d + Acc(p.eps)) : s;
        T* y = static_cast<T*>(p.y) + (bi * p.heads_q + g * G + hb + j) * Dv;
        store_el(y + nn, val);
      }
    }
  }
}

// The last column += psi_f(k - ref), after decode_kernel; then the ref of a state that held no
// key (decode_ref) is written. Grid (B Hk).
template <typename T, typename Acc, typename Map>
__global__ void __launch_bounds__(kThreads) decode_count_kernel(const DecodeParams p) {
  __shared__ Acc kq[kMaxHeadDim];
  const int64_t bg = blockIdx.x, bi = bg / p.heads_k, g = bg % p.heads_k;
  const int D = static_cast<int>(p.dim_k), Dv = static_cast<int>(p.dim_v), V1 = Dv + 1;
  const int64_t F = Map::num_features(D);
  Acc* S = decode_head_sums<Map, Acc>(p, bg);
  const Acc count_before = state_key_count<Map>(S, D, Dv);
  Acc* ref_out = decode_head_ref<Acc>(p, bg);
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    const Acc kraw = load_el<Acc, T>(p.k, p.k_stride, bi, g, 0, d);
    const Acc r = decode_ref(p, count_before, bg, d, kraw);
    kq[d] = kraw - r;
    if (count_before == Acc(0)) ref_out[d] = r;  // read above by the same thread, same d
  }
  __syncthreads();  // kq written, and count_before read by every thread before it changes
  for (typename Map::Walk fw(threadIdx.x, D); fw.f < F; fw.advance(blockDim.x))
    S[fw.f * V1 + Dv] += key_feature_at<1>(fw, kq, D);
}

}  // namespace cuda
}  // namespace csq
