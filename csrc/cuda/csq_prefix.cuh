// The cheap per-position kernels: the reference key, prefix sums of the keys and the per-query
// shift b (forward), and the centering terms and shift gradient (backward). All work on
// per-column sums of D-vectors, one thread per feature column.
#pragma once

#include "csq_common.cuh"

namespace csq {
namespace cuda {

constexpr int kColThreads = static_cast<int>(kMaxHeadDim);  // one thread per key coordinate

// cu_seqlens only: the chunk slots of every sequence (see csq_common.cuh). One block:
// seq_chunk0 = exclusive scan of ceil(len_s / C) over s (a block scan per 256 sequences),
// then chunk_seq[t] = the last s with seq_chunk0[s] <= t (an upper-bound search; empty
// sequences own no slot), -1 past the end.
// (A template only so that the header can be included by several units.)
template <int kBlock>
__global__ void __launch_bounds__(kBlock) chunk_map_kernel(const AttnParams p, Work w) {
  __shared__ int64_t scan[kBlock];
  __shared__ int64_t carry;
  const int tid = threadIdx.x;
  const int64_t S = p.num_seqs;
  if (tid == 0) carry = 0;
  for (int64_t base = 0; base < S; base += kBlock) {
    const int64_t s = base + tid;
    const int64_t n = s < S ? (p.cu_seqlens[s + 1] - p.cu_seqlens[s] + kChunk - 1) / kChunk : 0;
    __syncthreads();  // carry is written; the previous round's scan is read
    scan[tid] = n;
    __syncthreads();
    for (int off = 1; off < kBlock; off <<= 1) {  // inclusive Hillis-Steele scan
      const int64_t add = tid >= off ? scan[tid - off] : 0;
      __syncthreads();
      scan[tid] += add;
      __syncthreads();
    }
    if (s < S) w.seq_chunk0[s] = static_cast<int>(carry + scan[tid] - n);
    __syncthreads();
    if (tid == kBlock - 1) carry += scan[tid];
  }
  __syncthreads();
  if (tid == 0) w.seq_chunk0[S] = static_cast<int>(carry);
  __syncthreads();
  const int64_t used = carry;
  for (int64_t t = tid; t < w.nchunks; t += blockDim.x) {
    int sq = -1;
    if (t < used) {
      int64_t lo = 0, hi = S;  // seq_chunk0[lo] <= t < seq_chunk0[hi]
      while (hi - lo > 1) {
        const int64_t mid = (lo + hi) / 2;
        if (w.seq_chunk0[mid] <= t) lo = mid; else hi = mid;
      }
      sq = static_cast<int>(lo);
    }
    w.chunk_seq[t] = sq;
  }
}

// r of each (sequence, kv head), csq_params.h: the given ref_in when the carried state holds
// keys (or there is no carried state: the backward passes the forward's r), else the
// coordinate-wise median of the finite values among the first min(len, kRefKeys) keys.
// Grid (S Hk).
template <typename T, typename Acc>
__global__ void __launch_bounds__(kColThreads) ref_key_kernel(const AttnParams p, Work w) {
  const int64_t tg = blockIdx.x, s = tg / p.heads_k, g = tg % p.heads_k;
  const int D = static_cast<int>(p.dim_k);
  const SeqSpan q = seq_span(p, w, s);
  Acc* ref = static_cast<Acc*>(w.ref) + tg * D;
  if (p.ref_in != nullptr &&
      (p.state_in == nullptr || q.len == 0 || carried_count<Acc>(p, s, g) != Acc(0))) {
    for (int d = threadIdx.x; d < D; d += blockDim.x)
      ref[d] = static_cast<const Acc*>(p.ref_in)[tg * D + d];
    return;
  }
  const int64_t m = q.len < kRefKeys ? q.len : kRefKeys;
  for (int d = threadIdx.x; d < D; d += blockDim.x)
    ref[d] = ref_key_median<Acc>(m, [&](int64_t j) {
      return load_el<Acc, T>(p.k, p.k_stride, q.bi, g, q.start + j, d);
    });
}

// The reference key of the sequence of a chunk.
template <typename Acc>
__device__ __forceinline__ const Acc* seq_ref(const AttnParams& p, const Work& w, int64_t seq,
                                              int64_t g) {
  return static_cast<const Acc*>(w.ref) + (seq * p.heads_k + g) * p.dim_k;
}

// csum[b, g, t, :] = sum over the rows of chunk slot t of (k_j - r). Grid (B Hk, nchunks).
// The minimum of CTAs per SM lifts ptxas's default cap of 64 registers here (spills).
template <typename T, typename Acc>
__global__ void __launch_bounds__(kColThreads, 4) key_chunk_sum_kernel(const AttnParams p, Work w) {
  const int64_t bg = blockIdx.x, t = blockIdx.y, bi = bg / p.heads_k, g = bg % p.heads_k;
  const ChunkSpan c = chunk_span(p, w, bi, t);
  if (!c.valid) return;
  const int D = static_cast<int>(p.dim_k);
  const Acc* ref = seq_ref<Acc>(p, w, c.seq, g);
  Acc* out = static_cast<Acc*>(w.csum) + (bg * w.nchunks + t) * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    const Acc r = ref[d];
    Acc sum = 0;
    for (int64_t j = c.row0; j < c.row1; ++j)
      sum += load_el<Acc, T>(p.k, p.k_stride, bi, g, j, d) - r;
    out[d] = sum;
  }
}

// The centering terms of dk: cq_i = sum_{h in group} -tau db_hi q_hi / n_i (n_i = position in
// the sequence + 1 + the carried key count n0, or the length when not causal), summed over the rows of chunk slot t into
// csum[b, g, t, :]. Grid (B Hk, nchunks). Needs the final db.
template <typename T, typename Acc>
__device__ __forceinline__ Acc centering_term(const AttnParams& p, const ChunkSpan& c,
                                              int64_t bi, int64_t g, int64_t row, int d,
                                              Acc tau, Acc n0) {
  const Acc* db = static_cast<const Acc*>(p.db);
  const Acc n = p.causal ? n0 + Acc(row - c.start + 1) : Acc(c.len);
  Acc s = 0;
  for (int64_t hh = 0; hh < p.group; ++hh) {
    const int64_t h = g * p.group + hh, bh = bi * p.heads_q + h;
    s += db[bh * p.seqlen + row] * load_el<Acc, T>(p.q, p.q_stride, bi, h, row, d);
  }
  return -tau * s / n;
}

// The minimum of CTAs per SM lifts ptxas's default cap of 64 registers here (spills).
template <typename T, typename Acc>
__global__ void __launch_bounds__(kColThreads, 4) cq_chunk_sum_kernel(const AttnParams p, Work w) {
  const int64_t bg = blockIdx.x, t = blockIdx.y, bi = bg / p.heads_k, g = bg % p.heads_k;
  const ChunkSpan c = chunk_span(p, w, bi, t);
  if (!c.valid) return;
  const int D = static_cast<int>(p.dim_k);
  const Acc tau = Acc(p.scale);
  const Acc n0 = carried_count<Acc>(p, c.seq, g);
  Acc* out = static_cast<Acc*>(w.csum) + (bg * w.nchunks + t) * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    Acc sum = 0;
    for (int64_t j = c.row0; j < c.row1; ++j)
      sum += centering_term<T, Acc>(p, c, bi, g, j, d, tau, n0);
    out[d] = sum;
  }
}

// Exclusive scan of the chunk sums over the chunks of each sequence: prefix[t] = sum of csum
// over the sequence's chunks before t (reverse: after t). The sequence total is then
// prefix[t] + csum[t] at its last chunk (reverse: its first), see seq_total. Without
// cu_seqlens prefix[nchunks] also holds the total. Grid (B Hk).
template <typename Acc>
__global__ void __launch_bounds__(kColThreads) chunk_scan_kernel(const AttnParams p, Work w,
                                                                 bool reverse) {
  const int64_t bg = blockIdx.x, nch = w.nchunks;
  const int D = static_cast<int>(p.dim_k);
  const Acc* __restrict__ cs = static_cast<const Acc*>(w.csum) + bg * nch * D;
  Acc* __restrict__ pre = static_cast<Acc*>(w.prefix) + bg * (nch + 1) * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    Acc run = 0;
    int prev = -2;
    for (int64_t s = 0; s < nch; ++s) {
      const int64_t t = reverse ? nch - 1 - s : s;
      if (p.cu_seqlens != nullptr) {
        const int sq = w.chunk_seq[t];
        if (sq < 0) continue;
        if (sq != prev) run = 0;  // a new sequence
        prev = sq;
      }
      pre[t * D + d] = run;
      run += cs[t * D + d];
    }
    pre[nch * D + d] = run;
  }
}

// Column d of the total of the sequence of chunk c (after chunk_scan_kernel): forward scans
// end at the last chunk of the sequence, reverse scans at its first.
template <typename Acc>
__device__ __forceinline__ Acc seq_total(const Acc* pre, const Acc* cs, const ChunkSpan& c,
                                         int D, int d, bool reverse) {
  const int64_t t = reverse ? c.t0 : c.t0 + (c.len + kChunk - 1) / kChunk - 1;
  return pre[t * D + d] + cs[t * D + d];
}

// Row kernels that need mu'_i = mean of (k_j - r) over J(i), for the rows of chunk t of key
// head (b, g) and every query head of its group. Grid (B Hk, nchunks).
//   kRowShiftB:   b_i = c_h - tau <q_i, mu'_i>
//   kRowCenterQ:  dq_i -= tau db_i mu'_i
// A carried state (causal only) holds n0 earlier keys with sum Z1 (relative to r): then
// mu'_i = (Z1 + sum of this sequence's keys up to i) / (n0 + position + 1), and kRowCenterQ
// also adds the gradient of n0 through every mu'_i, sum_i tau db_i <q_i, mu'_i> / n_i, to the
// carried state's gradient. Without centering r is not 0 either (csq_params.h): the keys are
// k - r, and mu' = -r puts tau <q_i, r> back into b_i (and tau db_i r into dq_i).
enum RowMode : int { kRowShiftB = 0, kRowCenterQ = 1 };

// The minimum of CTAs per SM lifts ptxas's default cap of 64 registers here (spills).
template <typename T, typename Acc, int MODE>
__global__ void __launch_bounds__(kThreads, 3) rowshift_kernel(const AttnParams p, Work w) {
  __shared__ Acc mu_s[kSub][kMaxHeadDim + 1];
  __shared__ Acc dn0_part[kThreads / 32];
  const int64_t bg = blockIdx.x, t = blockIdx.y, bi = bg / p.heads_k, g = bg % p.heads_k;
  const ChunkSpan c = chunk_span(p, w, bi, t);
  if (!c.valid) return;  // uniform over the block
  const int D = static_cast<int>(p.dim_k);
  const int64_t N = p.seqlen, G = p.group, nch = w.nchunks;
  const Acc tau = Acc(p.scale);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
  const Acc* ref = seq_ref<Acc>(p, w, c.seq, g);
  const Acc* pre = static_cast<const Acc*>(w.prefix) + bg * (nch + 1) * D;
  const Acc* cs = static_cast<const Acc*>(w.csum) + bg * nch * D;
  const bool carried = p.state_in != nullptr;
  const Acc n0 = carried_count<Acc>(p, c.seq, g);

  // Thread d < D carries the running sum of column d (causal) or holds the total mean.
  Acc run = 0;
  if (p.center && tid < D)
    run = p.causal ? pre[t * D + tid] + carried_key_sum<Acc>(p, c.seq, g, tid)
                   : seq_total(pre, cs, c, D, tid, false) / Acc(c.len);

  Acc dn0 = 0;  // lane 0 of each warp: its rows' part of the gradient of n0
  for (int sb = 0; sb < kChunkI / kSub; ++sb) {
    const int64_t row0 = c.row0 + sb * kSub;
    if (row0 >= c.row1) break;  // uniform over the block
    const int nrows = static_cast<int>(min64(kSub, c.row1 - row0));
    __syncthreads();  // mu_s of the previous sub-block is no longer read
    if (p.center && tid < D) {
      for (int r = 0; r < nrows; ++r) {
        if (p.causal) {
          run += load_el<Acc, T>(p.k, p.k_stride, bi, g, row0 + r, tid) - ref[tid];
          mu_s[r][tid] = run / (n0 + Acc(row0 + r - c.start + 1));
        } else {
          mu_s[r][tid] = run;
        }
      }
    } else if (tid < D) {
      for (int r = 0; r < nrows; ++r) mu_s[r][tid] = -ref[tid];
    }
    __syncthreads();
    // One warp per (query head, row).
    for (int64_t e = warp; e < G * nrows; e += nwarps) {
      const int64_t hh = e / nrows, h = g * G + hh, bh = bi * p.heads_q + h;
      const int r = static_cast<int>(e % nrows);
      const int64_t row = row0 + r;
      if (MODE == kRowShiftB) {
        Acc dot = 0;
        {
          for (int d = lane; d < D; d += 32)
            dot += load_el<Acc, T>(p.q, p.q_stride, bi, h, row, d) * mu_s[r][d];
          dot = warp_sum(dot);
        }
        if (lane == 0)
          static_cast<Acc*>(p.b)[bh * N + row] =
              static_cast<const Acc*>(p.shift)[h] - tau * dot;
      } else {
        const Acc coef = tau * static_cast<const Acc*>(p.db)[bh * N + row];
        Acc* dq = static_cast<Acc*>(p.dq) + (bh * N + row) * D;
        for (int d = lane; d < D; d += 32) dq[d] -= coef * mu_s[r][d];
        if (carried && p.center) {
          Acc dot = 0;
          for (int d = lane; d < D; d += 32)
            dot += load_el<Acc, T>(p.q, p.q_stride, bi, h, row, d) * mu_s[r][d];
          dot = warp_sum(dot);
          dn0 += coef * dot / (n0 + Acc(row - c.start + 1));
        }
      }
    }
  }
  if (MODE == kRowCenterQ && carried && p.center) {
    if (lane == 0) dn0_part[warp] = dn0;
    __syncthreads();
    if (tid == 0) {
      Acc sum = 0;
      for (int i = 0; i < nwarps; ++i) sum += dn0_part[i];
      Acc* ds = head_sums(static_cast<Acc*>(p.dstate_in), p, c.seq, g);
      atomicAdd(ds + public_row(D, D, D) * (p.dim_v + 1) + p.dim_v, sum);
    }
  }
}

// dk_j += sum over i >= j (causal) or all i of cq_i: a reverse cumulative sum within the chunk
// plus prefix[t] (the terms of later chunks; reverse scan). Grid (B Hk, nchunks).
template <typename T, typename Acc>
__global__ void __launch_bounds__(kColThreads) center_k_kernel(const AttnParams p, Work w) {
  const int64_t bg = blockIdx.x, t = blockIdx.y, bi = bg / p.heads_k, g = bg % p.heads_k;
  const ChunkSpan c = chunk_span(p, w, bi, t);
  if (!c.valid) return;
  const int D = static_cast<int>(p.dim_k);
  const int64_t N = p.seqlen, nch = w.nchunks;
  const Acc tau = Acc(p.scale);
  const Acc* pre = static_cast<const Acc*>(w.prefix) + bg * (nch + 1) * D;
  const Acc* cs = static_cast<const Acc*>(w.csum) + bg * nch * D;
  Acc* dk = static_cast<Acc*>(p.dk) + bg * N * D;
  const Acc n0 = carried_count<Acc>(p, c.seq, g);
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    if (p.causal) {
      Acc run = pre[t * D + d];
      for (int64_t j = c.row1 - 1; j >= c.row0; --j) {
        run += centering_term<T, Acc>(p, c, bi, g, j, d, tau, n0);
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
template <typename T, typename Acc>
__global__ void __launch_bounds__(kColThreads) state_grad_kernel(const AttnParams p, Work w) {
  const int64_t bg = blockIdx.x, t = blockIdx.y, bi = bg / p.heads_k, g = bg % p.heads_k;
  const ChunkSpan c = chunk_span(p, w, bi, t);
  if (!c.valid) return;
  const int D = static_cast<int>(p.dim_k);
  const int64_t N = p.seqlen, nch = w.nchunks;
  const Acc tau = Acc(p.scale);
  const Acc* dk = static_cast<const Acc*>(p.dk) + bg * N * D;
  const Acc* db = static_cast<const Acc*>(p.db);
  const Acc* pre = static_cast<const Acc*>(w.prefix) + bg * (nch + 1) * D;
  const Acc* cs = static_cast<const Acc*>(w.csum) + bg * nch * D;
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
      Acc* ds = head_sums(static_cast<Acc*>(p.dstate_in), p, c.seq, g);
      ds[public_row(d, D, D) * (p.dim_v + 1) + p.dim_v] += seq_total(pre, cs, c, D, d, true);
    }
  }
}

// dshift[b, h] = sum_i db[b, h, i]. Grid (B Hq).
template <typename Acc>
__global__ void __launch_bounds__(kThreads) dshift_kernel(const AttnParams p) {
  __shared__ Acc part[kThreads / 32];
  const int64_t bh = blockIdx.x, N = p.seqlen;
  const Acc* db = static_cast<const Acc*>(p.db) + bh * N;
  Acc s = 0;
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) s += db[i];
  s = warp_sum(s);
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = s;
  __syncthreads();
  if (threadIdx.x < 32) {
    s = threadIdx.x < (blockDim.x >> 5) ? part[threadIdx.x] : Acc(0);
    s = warp_sum(s);
    if (threadIdx.x == 0) static_cast<Acc*>(p.dshift)[bh] = s;
  }
}

}  // namespace cuda
}  // namespace csq
