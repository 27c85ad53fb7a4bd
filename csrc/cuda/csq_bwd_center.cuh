// The backward's centering and reference-key kernels, after the state scans' pass 1 and the
// in-chunk pairs (they need the final db):
//   center_dq_kernel         dq_i -= tau db_i mu'_i; with a carried state the gradient of its
//                            key count
//   center_chunk_sum_kernel  per-chunk sums of the centering terms of dk (then chunk_scan_kernel
//                            in reverse over them)
//   center_dk_kernel         dk_j += the centering terms of the queries that see key j
//   ref_state_grad_kernel    dref; with a carried state the gradient of its key sum
#pragma once

#include "csq_key_chunk.cuh"

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
  __shared__ Acc dcount_part[kThreads / 32];
  const KeyChunk<Acc> kc(p, w);
  if (!kc.c.valid) return;  // uniform over the block
  const bool count_grad = p.state_in != nullptr && p.center;
  ChunkKeyMeans<T, Acc, Map> means(p, w, kc.c, kc.bi, kc.g, kc.t);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  Acc dcount = 0;  // lane 0 of each warp: its rows' part of the gradient of the carried count
  for_each_query_mean(p, kc, means, [&](int64_t h, int64_t row, const Acc* mu) {
    const int64_t bh = kc.bi * p.heads_q + h;
    const Acc coef = kc.tau * static_cast<const Acc*>(p.db)[bh * kc.N + row];
    Acc* dq = static_cast<Acc*>(p.dq) + (bh * kc.N + row) * kc.D;
    for (int d = lane; d < kc.D; d += 32) dq[d] -= coef * mu[d];
    if (count_grad)
      dcount += coef * query_dot<T>(p, kc, h, row, mu) /
                (means.carried + Acc(row - kc.c.start + 1));
  });
  if (count_grad) {
    if (lane == 0) dcount_part[warp] = dcount;
    __syncthreads();
    if (threadIdx.x == 0) {
      Acc sum = 0;
      for (int i = 0; i < int(blockDim.x >> 5); ++i) sum += dcount_part[i];
      Acc* ds = head_sums<Map>(static_cast<Acc*>(p.dstate_in), p, kc.c.seq, kc.g);
      atomicAdd(&state_key_count<Map>(ds, kc.D, p.dim_v), sum);
    }
  }
}

// The centering term of dk at a row: cq_i = sum_{h in group} -tau db_hi q_hi / n_i (n_i =
// position in the sequence + 1 + the carried key count, or the length when not causal).
template <typename T, typename Acc>
__device__ __forceinline__ Acc centering_term(const BwdParams& p, const KeyChunk<Acc>& kc,
                                              int64_t row, int d, Acc carried) {
  const Acc* db = static_cast<const Acc*>(p.db);
  const Acc n = p.causal ? carried + Acc(row - kc.c.start + 1) : Acc(kc.c.len);
  Acc s = 0;
  for (int64_t hh = 0; hh < p.group; ++hh) {
    const int64_t h = kc.g * p.group + hh, bh = kc.bi * p.heads_q + h;
    s += db[bh * p.seqlen + row] * load_el<Acc, T>(p.q, p.q_stride, kc.bi, h, row, d);
  }
  return -kc.tau * s / n;
}

// The reverse scan of the centering terms of the CTA's kv head (center_chunk_sum_kernel, then
// chunk_scan_kernel<reverse>): the per-chunk sums and their exclusive prefix.
template <typename Acc>
struct CenterScan {
  const Acc* pre;
  const Acc* cs;
  __device__ CenterScan(const Work& w, const KeyChunk<Acc>& kc)
      : pre(static_cast<const Acc*>(w.center_prefix) + kc.bg * (w.nchunks + 1) * kc.D),
        cs(static_cast<const Acc*>(w.center_sums) + kc.bg * w.nchunks * kc.D) {}
  // Column d of the total over the chunk's sequence.
  __device__ __forceinline__ Acc seq_total(const KeyChunk<Acc>& kc, int d) const {
    return ::csq::cuda::seq_total(pre, cs, kc.c, kc.D, d, true);
  }
};

// center_sums[b, g, t, :] = the centering terms summed over the rows of chunk slot t.
// Grid (B Hk, nchunks). Needs the final db.
// The minimum of CTAs per SM lifts ptxas's default cap of 64 registers here (spills).
template <typename T, typename Acc, typename Map>
__global__ void __launch_bounds__(kColThreads, 4) center_chunk_sum_kernel(const BwdParams p,
                                                                          Work w) {
  const KeyChunk<Acc> kc(p, w);
  if (!kc.c.valid) return;
  const Acc carried = carried_count<Map, Acc, false>(p, kc.c.seq, kc.g);
  Acc* out = static_cast<Acc*>(w.center_sums) + (kc.bg * w.nchunks + kc.t) * kc.D;
  for (int d = threadIdx.x; d < kc.D; d += blockDim.x) {
    Acc sum = 0;
    for (int64_t j = kc.c.row0; j < kc.c.row1; ++j)
      sum += centering_term<T, Acc>(p, kc, j, d, carried);
    out[d] = sum;
  }
}

// dk_j += sum over i >= j (causal) or all i of cq_i: a reverse cumulative sum within the chunk
// plus center_prefix[t] (the terms of later chunks; reverse scan). Grid (B Hk, nchunks).
template <typename T, typename Acc, typename Map>
__global__ void __launch_bounds__(kColThreads) center_dk_kernel(const BwdParams p, Work w) {
  const KeyChunk<Acc> kc(p, w);
  if (!kc.c.valid) return;
  const CenterScan<Acc> scan(w, kc);
  Acc* dk = static_cast<Acc*>(p.dk) + kc.bg * kc.N * kc.D;
  const Acc carried = carried_count<Map, Acc, false>(p, kc.c.seq, kc.g);
  for (int d = threadIdx.x; d < kc.D; d += blockDim.x) {
    if (p.causal) {
      Acc run = scan.pre[kc.t * kc.D + d];
      for (int64_t j = kc.c.row1 - 1; j >= kc.c.row0; --j) {
        run += centering_term<T, Acc>(p, kc, j, d, carried);
        dk[j * kc.D + d] += run;
      }
    } else {
      const Acc total = scan.seq_total(kc, d);
      for (int64_t j = kc.c.row0; j < kc.c.row1; ++j) dk[j * kc.D + d] += total;
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
  const KeyChunk<Acc> kc(p, w);
  if (!kc.c.valid) return;
  const int D = kc.D;
  const int64_t N = kc.N, bi = kc.bi, g = kc.g;
  const Acc* dk = static_cast<const Acc*>(p.dk) + kc.bg * N * D;
  const Acc* db = static_cast<const Acc*>(p.db);
  Acc* dref = static_cast<Acc*>(p.dref) + (kc.c.seq * p.heads_k + g) * D;
  // The CTA of the sequence's first chunk adds the gradient of the carried key sum.
  const bool key_sum_grad = p.state_in != nullptr && p.center && kc.t == kc.c.t0;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    Acc sum = 0;
    for (int64_t j = kc.c.row0; j < kc.c.row1; ++j) {
      sum -= dk[j * D + d];
      if (!p.center)
        for (int64_t hh = 0; hh < p.group; ++hh) {
          const int64_t h = g * p.group + hh, bh = bi * p.heads_q + h;
          sum += kc.tau * db[bh * N + j] * load_el<Acc, T>(p.q, p.q_stride, bi, h, j, d);
        }
    }
    atomicAdd(dref + d, sum);
    if (key_sum_grad) {
      Acc* ds = head_sums<Map>(static_cast<Acc*>(p.dstate_in), p, kc.c.seq, g);
      state_key_sum<Map>(ds, d, D, p.dim_v) += CenterScan<Acc>(w, kc).seq_total(kc, d);
    }
  }
}

}  // namespace cuda
}  // namespace csq
