// The backward's centering and reference-key kernels, after the state scans' pass 1 and the
// in-chunk pairs (they need the final db):
//   center_dq_kernel         dq_i -= tau db_i mu'_i; with a carried state the gradient of its
//                            key count
//   center_chunk_sum_kernel  per-chunk sums of the centering terms of dk (then chunk_scan_kernel
//                            in reverse over them)
//   center_dk_kernel         dk_j += the centering terms of the queries that see key j
//   ref_state_grad_kernel    dref; with a carried state the gradient of its key sum
#pragma once

#include "csq_keys.cuh"

namespace csq {
namespace cuda {

// dq_i -= tau db_i mu'_i (ChunkKeyMeans) for the rows of chunk t of key head (b, g) and every
// query head of its group (also without centering, where mu' = -r adds tau db_i r). With a
// carried state and centering, mu'_i also depends on the carried key count, whose gradient
// sum_i tau db_i <q_i, mu'_i> / n_i is added to the constant row's last column of dstate_in
// (one atomic per CTA). Grid (B Hk, nchunks).
// The minimum of CTAs per SM lifts ptxas's default cap of 64 registers here (spills).
template <typename T, typename Acc, typename Map>
__global__ void __launch_bounds__(kThreads, 3) center_dq_kernel(const BwdParams p, Work w) {
  extern __shared__ __align__(16) unsigned char smem_raw[];  // key_mean_smem_bytes
  Acc* mu_s = reinterpret_cast<Acc*>(smem_raw);
  __shared__ Acc dcount_part[kThreads / 32];
  const int64_t bg = blockIdx.x, t = blockIdx.y, bi = bg / p.heads_k, g = bg % p.heads_k;
  const ChunkSpan c = chunk_span(p, w, bi, t);
  if (!c.valid) return;  // uniform over the block
  const int D = static_cast<int>(p.dim_k);
  const int64_t N = p.seqlen, G = p.group;
  const Acc tau = Acc(p.scale);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
  const bool count_grad = p.state_in != nullptr && p.center;
  const int sub = key_mean_rows(D, sizeof(Acc)), ms = D + 1;
  ChunkKeyMeans<T, Acc, Map> means(p, w, c, bi, g, t);

  Acc dcount = 0;  // lane 0 of each warp: its rows' part of the gradient of the carried count
  for (int64_t row0 = c.row0; row0 < c.row1; row0 += sub) {  // uniform over the block
    const int nrows = static_cast<int>(min64(sub, c.row1 - row0));
    __syncthreads();  // mu_s of the previous sub-block is no longer read
    means.fill(mu_s, row0, nrows);
    __syncthreads();
    // One warp per (query head, row).
    for (int64_t e = warp; e < G * nrows; e += nwarps) {
      const int64_t hh = e / nrows, h = g * G + hh, bh = bi * p.heads_q + h;
      const int r = static_cast<int>(e % nrows);
      const int64_t row = row0 + r;
      const Acc coef = tau * static_cast<const Acc*>(p.db)[bh * N + row];
      Acc* dq = static_cast<Acc*>(p.dq) + (bh * N + row) * D;
      for (int d = lane; d < D; d += 32) dq[d] -= coef * mu_s[r * ms + d];
      if (count_grad) {
        Acc dot = 0;
        for (int d = lane; d < D; d += 32)
          dot += load_el<Acc, T>(p.q, p.q_stride, bi, h, row, d) * mu_s[r * ms + d];
        dot = warp_sum(dot);
        dcount += coef * dot / (means.carried + Acc(row - c.start + 1));
      }
    }
  }
  if (count_grad) {
    if (lane == 0) dcount_part[warp] = dcount;
    __syncthreads();
    if (tid == 0) {
      Acc sum = 0;
      for (int i = 0; i < nwarps; ++i) sum += dcount_part[i];
      Acc* ds = head_sums<Map>(static_cast<Acc*>(p.dstate_in), p, c.seq, g);
      atomicAdd(&state_key_count<Map>(ds, D, p.dim_v), sum);
    }
  }
}

// The centering term of dk at a row: cq_i = sum_{h in group} -tau db_hi q_hi / n_i (n_i =
// position in the sequence + 1 + the carried key count, or the length when not causal).
template <typename T, typename Acc>
__device__ __forceinline__ Acc centering_term(const BwdParams& p, const ChunkSpan& c,
                                              int64_t bi, int64_t g, int64_t row, int d,
                                              Acc tau, Acc carried) {
  const Acc* db = static_cast<const Acc*>(p.db);
  const Acc n = p.causal ? carried + Acc(row - c.start + 1) : Acc(c.len);
  Acc s = 0;
  for (int64_t hh = 0; hh < p.group; ++hh) {
    const int64_t h = g * p.group + hh, bh = bi * p.heads_q + h;
    s += db[bh * p.seqlen + row] * load_el<Acc, T>(p.q, p.q_stride, bi, h, row, d);
  }
  return -tau * s / n;
}

// center_sums[b, g, t, :] = the centering terms summed over the rows of chunk slot t.
// Grid (B Hk, nchunks). Needs the final db.
// The minimum of CTAs per SM lifts ptxas's default cap of 64 registers here (spills).
template <typename T, typename Acc, typename Map>
__global__ void __launch_bounds__(kColThreads, 4) center_chunk_sum_kernel(const BwdParams p,
                                                                          Work w) {
  const int64_t bg = blockIdx.x, t = blockIdx.y, bi = bg / p.heads_k, g = bg % p.heads_k;
  const ChunkSpan c = chunk_span(p, w, bi, t);
  if (!c.valid) return;
  const int D = static_cast<int>(p.dim_k);
  const Acc tau = Acc(p.scale);
  const Acc carried = carried_count<Map, Acc, false>(p, c.seq, g);
  Acc* out = static_cast<Acc*>(w.center_sums) + (bg * w.nchunks + t) * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    Acc sum = 0;
    for (int64_t j = c.row0; j < c.row1; ++j)
      sum += centering_term<T, Acc>(p, c, bi, g, j, d, tau, carried);
    out[d] = sum;
  }
}

// dk_j += sum over i >= j (causal) or all i of cq_i: a reverse cumulative sum within the chunk
// plus center_prefix[t] (the terms of later chunks; reverse scan). Grid (B Hk, nchunks).
template <typename T, typename Acc, typename Map>
__global__ void __launch_bounds__(kColThreads) center_dk_kernel(const BwdParams p, Work w) {
  const int64_t bg = blockIdx.x, t = blockIdx.y, bi = bg / p.heads_k, g = bg % p.heads_k;
  const ChunkSpan c = chunk_span(p, w, bi, t);
  if (!c.valid) return;
  const int D = static_cast<int>(p.dim_k);
  const int64_t N = p.seqlen, nch = w.nchunks;
  const Acc tau = Acc(p.scale);
  const Acc* pre = static_cast<const Acc*>(w.center_prefix) + bg * (nch + 1) * D;
  const Acc* cs = static_cast<const Acc*>(w.center_sums) + bg * nch * D;
  Acc* dk = static_cast<Acc*>(p.dk) + bg * N * D;
  const Acc carried = carried_count<Map, Acc, false>(p, c.seq, g);
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    if (p.causal) {
      Acc run = pre[t * D + d];
      for (int64_t j = c.row1 - 1; j >= c.row0; --j) {
        run += centering_term<T, Acc>(p, c, bi, g, j, d, tau, carried);
        dk[j * D + d] += run;
      }
    } else {
      const Acc total = seq_total(pre, cs, c, D, d, true);
      for (int64_t j = c.row0; j < c.row1; ++j) dk[j * D + d] += total;
    }
  }
}

// The gradients of a carried state's ref and key sum, after everything else (dk final).
// Every key of the sequence enters as k - r, and so do the key means, so r receives minus the
// sum of the final dk over the chunk (plus, without centering, tau db_i q_i through
// b_i = c + tau <q_i, r>). The carried key sum Z1 enters every mu'_i, so it receives the sum of
// all centering terms of the sequence: the reverse scan's total, added once, by the CTA of the
// sequence's first chunk. Grid (B Hk, nchunks). Without a carried state only dref is written:
// it carries the gradient of a returned state into the keys that r was picked from.
template <typename T, typename Acc, typename Map>
__global__ void __launch_bounds__(kColThreads) ref_state_grad_kernel(const BwdParams p, Work w) {
  const int64_t bg = blockIdx.x, t = blockIdx.y, bi = bg / p.heads_k, g = bg % p.heads_k;
  const ChunkSpan c = chunk_span(p, w, bi, t);
  if (!c.valid) return;
  const int D = static_cast<int>(p.dim_k);
  const int64_t N = p.seqlen, nch = w.nchunks;
  const Acc tau = Acc(p.scale);
  const Acc* dk = static_cast<const Acc*>(p.dk) + bg * N * D;
  const Acc* db = static_cast<const Acc*>(p.db);
  const Acc* pre = static_cast<const Acc*>(w.center_prefix) + bg * (nch + 1) * D;
  const Acc* cs = static_cast<const Acc*>(w.center_sums) + bg * nch * D;
  Acc* dref = static_cast<Acc*>(p.dref) + (c.seq * p.heads_k + g) * D;
  const bool carried = p.state_in != nullptr;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    Acc sum = 0;
    for (int64_t j = c.row0; j < c.row1; ++j) {
      sum -= dk[j * D + d];
      if (!p.center)
        for (int64_t hh = 0; hh < p.group; ++hh) {
          const int64_t h = g * p.group + hh, bh = bi * p.heads_q + h;
          sum += tau * db[bh * N + j] * load_el<Acc, T>(p.q, p.q_stride, bi, h, j, d);
        }
    }
    atomicAdd(dref + d, sum);
    if (carried && p.center && t == c.t0) {
      Acc* ds = head_sums<Map>(static_cast<Acc*>(p.dstate_in), p, c.seq, g);
      state_key_sum<Map>(ds, d, D, p.dim_v) += seq_total(pre, cs, c, D, d, true);
    }
  }
}

}  // namespace cuda
}  // namespace csq
