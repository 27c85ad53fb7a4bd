// The key side of the chunked algorithm, shared by both directions: the chunk map of packed
// sequences, the reference key r, per-chunk sums of k - r and their scan over chunks, and the
// key means mu'_i they give (ChunkKeyMeans, read by query_shift_kernel in the forward and
// center_dq_kernel in the backward). Per-column work, one thread per key coordinate.
#pragma once

#include "csq_chunked_work.cuh"

namespace csq {
namespace cuda {

// Threads of the per-column kernels below, which loop over the D key coordinates: one column
// per thread up to D = 128, two at D = 256 (the heads the limit was raised for; more threads
// would idle half the block at D <= 128).
constexpr int kColThreads = 128;

// The key means mu' (ChunkKeyMeans::fill) are staged in dynamic shared memory sized from D:
// rows of D + 1 (odd: column walks free of bank conflicts), kSub rows per step, halved while
// the buffer exceeds what a block gets without opting in (float64 at D >= 192: 16 rows).
constexpr size_t kSmemNoOptIn = 48 * 1024;
__host__ __device__ inline int key_mean_rows(int D, size_t acc_bytes) {
  int rows = kSub;
  while (rows > 1 && size_t(rows) * size_t(D + 1) * acc_bytes > kSmemNoOptIn) rows /= 2;
  return rows;
}
template <typename Acc>
inline size_t key_mean_smem_bytes(int D) {
  return size_t(key_mean_rows(D, sizeof(Acc))) * size_t(D + 1) * sizeof(Acc);
}

// cu_seqlens only: the chunk slots of every sequence (see csq_chunked_work.cuh). One block:
// seq_chunk0 = exclusive scan of ceil(len_s / C) over s (a block scan per 256 sequences),
// then chunk_seq[t] = the last s with seq_chunk0[s] <= t (an upper-bound search; empty
// sequences own no slot), -1 past the end.
// (A template only so that the header can be included by several units.)
template <int kBlock>
__global__ void __launch_bounds__(kBlock) chunk_map_kernel(const QkvParams p, Work w) {
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

// Whether (sequence s, kv head g) keeps ref_in (csq_params.h, keeps_ref_in). A fresh pool
// slot's ref is never read: the sequence starts as one without ref_in.
template <typename Map, typename Acc>
__device__ __forceinline__ bool seq_keeps_ref(const FwdParams& p, const SeqSpan& seq, int64_t s,
                                              int64_t g) {
  return keeps_ref_in(p.ref_in != nullptr && !state_fresh(p.pool, s), p.state_in != nullptr,
                      seq.len, carried_count<Map, Acc>(p, s, g) != Acc(0));
}

// r of each (sequence, kv head), csq_params.h: the given ref_in when the carried state holds
// keys (or there is no carried state: the backward passes the forward's r), else the
// coordinate-wise median of the finite values among the first min(len, kRefKeys) keys (0 for
// none: a fresh pool slot's r is never read).
// Grid (S Hk).

template <typename T, typename Acc, typename Map>
__global__ void __launch_bounds__(kColThreads) ref_key_kernel(const FwdParams p, Work w) {
  const int64_t tg = blockIdx.x, s = tg / p.heads_k, g = tg % p.heads_k;
  const int D = static_cast<int>(p.dim_k);
  const SeqSpan seq = seq_span(p, w, s);
  Acc* ref = static_cast<Acc*>(w.ref) + tg * D;
  if (seq_keeps_ref<Map, Acc>(p, seq, s, g)) {
    const Acc* ref_in =
        static_cast<const Acc*>(p.ref_in) + state_ref_offset(p.pool, s, g, p.heads_k, D);
    for (int d = threadIdx.x; d < D; d += blockDim.x) ref[d] = ref_in[d];
    return;
  }
  const int64_t m = seq.len < kRefKeys ? seq.len : kRefKeys;
  for (int d = threadIdx.x; d < D; d += blockDim.x)
    ref[d] = ref_key_median<Acc>(m, [&](int64_t j) {
      return load_el<Acc, T>(p.k, p.k_stride, seq.bi, g, seq.start + j, d);
    });
}

// The end of a backward, once dk is complete: ref's gradient, p.dref (the op's through k - ref
// and b; with `sum_keys`, computed here as minus the sum of dk over the sequence) plus that of
// the returned ref (dref_out), goes to ref_in where the sequence kept it, else, when the
// returned state or ref carries a gradient, to the keys the median picked (ref_key_position;
// the outputs alone do not depend on a picked ref); p.dref then holds ref_in's gradient (0
// where picked). As the CPU's finish_ref_gradient. Grid (S Hk); one thread per coordinate.
template <typename T, typename Acc, typename Map>
__global__ void __launch_bounds__(kColThreads) ref_gradient_kernel(const BwdParams p, Work w,
                                                                   bool sum_keys) {
  const int64_t tg = blockIdx.x, s = tg / p.heads_k, g = tg % p.heads_k;
  const int D = static_cast<int>(p.dim_k);
  const SeqSpan seq = seq_span(p, w, s);
  const bool keeps = keeps_ref_in(p.ref_given, p.state_in != nullptr, seq.len,
                                  carried_count<Map, Acc>(p, s, g) != Acc(0));
  Acc* dk = static_cast<Acc*>(p.dk) + ((seq.bi * p.heads_k + g) * p.seqlen + seq.start) * D;
  const Acc* ref = static_cast<const Acc*>(w.ref) + tg * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    Acc* dref = static_cast<Acc*>(p.dref) + tg * D + d;
    Acc total = *dref;
    if (sum_keys) {
      total = Acc(0);
      for (int64_t j = 0; j < seq.len; ++j) total -= dk[j * D + d];
    }
    if (p.dref_out != nullptr) total += static_cast<const Acc*>(p.dref_out)[tg * D + d];
    *dref = keeps ? total : Acc(0);
    if (keeps || (p.dstate_out == nullptr && p.dref_out == nullptr)) continue;
    const int64_t m = seq.len < kRefKeys ? seq.len : kRefKeys;
    const int64_t j = ref_key_position<Acc>(m, ref[d], [&](int64_t i) {
      return load_el<Acc, T>(p.k, p.k_stride, seq.bi, g, seq.start + i, d);
    });
    if (j >= 0) dk[j * D + d] += total;
  }
}

// The reference key of the sequence of a chunk.
template <typename Acc>
__device__ __forceinline__ const Acc* seq_ref(const QkvParams& p, const Work& w, int64_t seq,
                                              int64_t g) {
  return static_cast<const Acc*>(w.ref) + (seq * p.heads_k + g) * p.dim_k;
}

// key_sums[b, g, t, :] = sum over the rows of chunk slot t of (k_j - r). Grid (B Hk, nchunks).
// The minimum of CTAs per SM lifts ptxas's default cap of 64 registers here (spills).
template <typename T, typename Acc>
__global__ void __launch_bounds__(kColThreads, 4) key_chunk_sum_kernel(const FwdParams p, Work w) {
  const int64_t bg = blockIdx.x, t = blockIdx.y, bi = bg / p.heads_k, g = bg % p.heads_k;
  const ChunkSpan c = chunk_span(p, w, bi, t);
  if (!c.valid) return;
  const int D = static_cast<int>(p.dim_k);
  const Acc* ref = seq_ref<Acc>(p, w, c.seq, g);
  Acc* out = static_cast<Acc*>(w.key_sums) + (bg * w.nchunks + t) * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    const Acc r = ref[d];
    Acc sum = 0;
    for (int64_t j = c.row0; j < c.row1; ++j)
      sum += load_el<Acc, T>(p.k, p.k_stride, bi, g, j, d) - r;
    out[d] = sum;
  }
}

// Exclusive scan of per-chunk column sums (B, Hk, nchunks, D) over the chunks of each
// sequence: prefix[t] = sum of sums[t'] over the sequence's chunks t' before t (reverse: after
// t). The sequence total is then prefix[t] + sums[t] at its last chunk (reverse: its first),
// see seq_total. Without cu_seqlens prefix[nchunks] also holds the total. Grid (B Hk). Used for
// the key sums (forward order) and for the centering terms of dk (reverse).
template <typename Acc>
__global__ void __launch_bounds__(kColThreads) chunk_scan_kernel(const QkvParams p, Work w,
                                                                 const Acc* sums, Acc* prefix,
                                                                 bool reverse) {
  const int64_t bg = blockIdx.x, nch = w.nchunks;
  const int D = static_cast<int>(p.dim_k);
  const Acc* __restrict__ cs = sums + bg * nch * D;
  Acc* __restrict__ pre = prefix + bg * (nch + 1) * D;
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

// mu'_i = mean of (k_j - r) over J(i) for the rows of one chunk, column d = threadIdx.x < D
// per thread (so the block needs D threads), sub-block by sub-block (key_mean_rows rows) into
// shared memory. A carried state (causal only) holds `carried` earlier keys with sum Z1
// (relative to r): then
// mu'_i = (Z1 + sum of this sequence's keys up to i) / (carried + position + 1). Without
// centering r is not 0 either (csq_params.h): the keys are k - r, and mu' = -r puts
// tau <q_i, r> back into b_i (and tau db_i r into dq_i).
template <typename T, typename Acc, typename Map>
struct ChunkKeyMeans {
  static_assert(kThreads >= kMaxHeadDim, "ChunkKeyMeans: one thread per key coordinate");
  const FwdParams& p;
  const ChunkSpan& c;
  const Acc* ref;
  int64_t bi, g;
  int D;
  Acc carried;  // the carried key count (0 without a carried state)
  Acc run;      // thread d < D: the running key sum of column d (causal) or the total mean

  __device__ ChunkKeyMeans(const FwdParams& p_, const Work& w, const ChunkSpan& c_, int64_t bi_,
                           int64_t g_, int64_t t)
      : p(p_), c(c_), bi(bi_), g(g_) {
    D = static_cast<int>(p.dim_k);
    ref = seq_ref<Acc>(p, w, c.seq, g);
    carried = carried_count<Map, Acc>(p, c.seq, g);
    const int64_t bg = bi * p.heads_k + g, nch = w.nchunks;
    const Acc* pre = static_cast<const Acc*>(w.key_prefix) + bg * (nch + 1) * D;
    const Acc* cs = static_cast<const Acc*>(w.key_sums) + bg * nch * D;
    const int tid = threadIdx.x;
    run = 0;
    if (p.center && tid < D)
      run = p.causal ? pre[t * D + tid] + carried_key_sum<Map, Acc>(p, c.seq, g, tid)
                     : seq_total(pre, cs, c, D, tid, false) / Acc(c.len);
  }

  // mu[r * (D + 1) + d] = mu'_{row0 + r} for r < nrows (rows of this chunk, in order).
  __device__ void fill(Acc* mu, int64_t row0, int nrows) {
    const int tid = threadIdx.x, ms = D + 1;
    if (tid >= D) return;
    if (!p.center) {
      for (int r = 0; r < nrows; ++r) mu[r * ms + tid] = -ref[tid];
      return;
    }
    for (int r = 0; r < nrows; ++r) {
      if (p.causal) {
        run += load_el<Acc, T>(p.k, p.k_stride, bi, g, row0 + r, tid) - ref[tid];
        mu[r * ms + tid] = run / (carried + Acc(row0 + r - c.start + 1));
      } else {
        mu[r * ms + tid] = run;
      }
    }
  }
};

}  // namespace cuda
}  // namespace csq
