// The state scans: where the FLOPs are. One CTA per (batch, key/value head, tile of FT state
// rows = features) walks the chunks in order, holding its FT x (Dv + 1) slice of the state in
// shared memory. Per chunk it first "reads" the state (the queries or keys of the chunk against
// the state of the earlier, or later, chunks) and then "updates" it with the chunk.
//
//   kStateFwd   S = sum_j psi(ke_j) v~_j^T (keys in order).
//               read:   num~_i += phi(qe_i) . S_tile           -> atomics into Work::num_state
//   kStateBwdQ  the same S.
//               read:   u_i = S_tile g~_i,  dqe_i += d/dqe <phi(qe_i), u_i> -> atomics into dq, db
//   kStateBwdK  R = sum_i phi(qe_i) g~_i^T over all query heads of the group (reverse order).
//               read:   dv_j += psi(ke_j) . R_tile,  u_j = R_tile v~_j,
//                       dke_j += d/dke <psi(ke_j), u_j>        -> atomics into dv, dk
//
// Grid (S Hk, feature tiles): a CTA per (sequence, kv head), which walks the chunks of its
// sequence (t is the chunk index within the sequence; rows are global).
// Causal: chunk t reads the state of chunks before t (after t for kStateBwdK); the pairs
// inside a chunk are the in-chunk kernels' job. Not causal: the full state, then every chunk
// reads it. Each tile adds a partial sum over its features, hence the atomics.
// The rows of a tile are features f0 .. f0 + FT - 1 in the public order (csq_features.h), the
// order of the carried state, which is therefore read and written as is.
#pragma once

#include "csq_common.cuh"
#include "csq_mma.cuh"

namespace csq {
namespace cuda {

enum StateMode : int { kStateFwd = 0, kStateBwdQ = 1, kStateBwdK = 2 };

// The parameters a mode reads: the forward's, or the backward's (which derive from them).
template <int MODE>
using StateScanParams = typename std::conditional<MODE == kStateFwd, FwdParams, BwdParams>::type;

// Shared memory of the state kernels, in Acc elements (the feature table, 2 FT ints, follows).
//   S    [FT][SS]     the state tile (rows: features f0 .. f0 + FT - 1; columns: Dv + 1)
//   Feat [kSub][FS]   features of the staged rows (phi or psi), later u
//   Vec  [kSub][VS]   v~ or g~ of the staged rows
//   Xe   [kSub][XS]   qe or ke of the staged rows
//   Dx   [kSub][XS]   dqe or dke of the staged rows (backward only)
//   ref  [D]          the reference key
// Strides are odd (bank-conflict free column walks) and rows padded to multiples of 4.
struct StateLayout {
  int SS, FS, VS, XS;
  int feat, vec, xe, dx, ref, n_acc;
  __host__ __device__ StateLayout(int D, int Dv, int FT, bool with_dx) {
    SS = round_up4(Dv + 1) + 1;
    FS = FT + 1;
    VS = SS;
    XS = round_up4(D + 1) + 1;
    feat = FT * SS;
    vec = feat + kSub * FS;
    xe = vec + kSub * VS;
    dx = xe + kSub * XS;
    ref = dx + (with_dx ? kSub * XS : 0);
    n_acc = ref + round_up4(D);
  }
};

template <typename Acc>
inline size_t state_smem_bytes(int D, int Dv, int FT, int mode) {
  const StateLayout L(D, Dv, FT, mode != kStateFwd);
  return size_t(L.n_acc) * sizeof(Acc) + size_t(2 * FT) * sizeof(int);
}

// At least 3 CTAs per SM (80 registers) for float32 accumulation, 2 (128) for float64: left
// to itself ptxas held these kernels at 64 registers and spilled in pass 1.
template <typename Acc>
constexpr int state_min_blocks() { return sizeof(Acc) == 8 ? 2 : 3; }

// TC: the three products run on tensor cores (block_mma_tf32, float accumulation only) instead
// of the CUDA cores (block_gemm); everything else is the same. split: 3xTF32 (csq_mma.cuh).
template <int TM, int TN, bool TC, typename Acc, typename FA, typename FB, typename FE>
__device__ __forceinline__ void state_gemm(int M, int N, int K, const FA& a, const FB& b,
                                           const FE& emit, bool split) {
  if constexpr (TC)
    block_mma_tf32(M, N, K, a, b, emit, split);
  else
    block_gemm<TM, TN, Acc>(M, N, K, a, b, emit);
}

// The same for N = Dv + 1 columns (block_gemm_aug on the CUDA cores).
template <int TM, int TN, bool TC, typename Acc, typename FA, typename FB, typename FE>
__device__ __forceinline__ void state_gemm_aug(int M, int dv, int K, const FA& a, const FB& b,
                                               const FE& emit, bool split) {
  if constexpr (TC)
    block_mma_tf32(M, dv + 1, K, a, b, emit, split);
  else
    block_gemm_aug<TM, TN, Acc>(M, dv, K, a, b, emit);
}

template <typename T, typename Acc, int FT, int MODE, bool TC = false>
__global__ void __launch_bounds__(kThreads, state_min_blocks<Acc>())
    state_scan_kernel(const StateScanParams<MODE> p, Work w) {
  static_assert(!TC || std::is_same<Acc, float>::value, "tensor cores: float accumulation");
  static_assert((kSub * FT) % kThreads == 0 && FT % 32 == 0,
                "one warp must cover 32 features of one row in accumulate_dx");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  constexpr bool kBwd = MODE != kStateFwd;
  const int D = static_cast<int>(p.dim_k), Dv = static_cast<int>(p.dim_v);
  const int De = D + 1, V1 = Dv + 1;
  const StateLayout L(D, Dv, FT, kBwd);
  Acc* S = reinterpret_cast<Acc*>(smem_raw);
  Acc* Feat = S + L.feat;
  Acc* Vec = S + L.vec;
  Acc* Xe = S + L.xe;
  Acc* Dx = S + L.dx;
  Acc* rs = S + L.ref;
  int* fx = reinterpret_cast<int*>(S + L.n_acc);
  int* fy = fx + FT;
  const int SS = L.SS, FS = L.FS, VS = L.VS, XS = L.XS;

  const int tid = threadIdx.x, nthr = blockDim.x;
  // One (sequence, kv head) task: its chunks are walked in order (reverse for kStateBwdK).
  // The sequence's first and end rows live in shared memory (read once per staged step): kept
  // in registers across the whole kernel they push it into spills.
  __shared__ int64_t seq_rows[2];
  const int64_t tg = blockIdx.x, g = tg % p.heads_k;
  const SeqSpan sq = seq_span(p, w, tg / p.heads_k);  // the sequence
  const int64_t bi = sq.bi, bg = bi * p.heads_k + g;
  const int64_t N = p.seqlen, G = p.group, Hq = p.heads_q, nch = sq.nch;
  if (threadIdx.x == 0) {
    seq_rows[0] = sq.start;
    seq_rows[1] = sq.start + sq.len;
  }
  const int64_t F = num_features(D), f0 = int64_t(blockIdx.y) * FT;
  const int nf = static_cast<int>(min64(FT, F - f0));
  const Acc tau = Acc(p.scale);

  for (int i = tid; i < L.ref; i += nthr) S[i] = Acc(0);  // everything but ref and the table
  for (int fi = tid; fi < FT; fi += nthr) {
    int x = -1, y = -1;
    if (fi < nf) feature_pair(f0 + fi, D, &x, &y);
    fx[fi] = x;
    fy[fi] = y;
  }
  for (int d = tid; d < D; d += nthr) rs[d] = static_cast<const Acc*>(w.ref)[tg * D + d];
  __syncthreads();
  // Every coordinate this tile touches is >= zlo: its first x, or 0 once the tile reaches the
  // linear rows (x, D), whose x start again from 0.
  const int zlo = f0 + nf > num_pairs(D) ? 0 : fx[0];

  // Carried state (causal only; the host refuses it otherwise). The scans start from it:
  // the key state S from state_in, the query state R (walked in reverse) from the gradient of
  // the returned state, dstate_out, which gives every key exactly what a later query gives.
  // Where the final tile goes: the returned state (forward), or the gradient of the carried
  // state, which every query of the sequence read (R summed over all of them; backward).
  // (Read from p where used: held in registers across the walk, they made it spill.)
  auto seed_ptr = [&]() -> const Acc* {
    if constexpr (MODE == kStateBwdK)
      return static_cast<const Acc*>(p.dstate_out);
    else
      return static_cast<const Acc*>(p.state_in);
  };
  auto keep_ptr = [&]() -> Acc* {
    if constexpr (MODE == kStateFwd)
      return static_cast<Acc*>(p.state_out);
    else if constexpr (MODE == kStateBwdK)
      return static_cast<Acc*>(p.dstate_in);
    else
      return nullptr;
  };
  if (seed_ptr() != nullptr) {
    const Acc* src = head_sums(seed_ptr(), p, tg / p.heads_k, g) + f0 * V1;
    for (int e = tid; e < nf * V1; e += nthr) {
      const int fi = e / V1, n = e % V1;
      S[fi * SS + n] = src[int64_t(fi) * V1 + n];
    }
    __syncthreads();
  }

  // ---- staging: rows [row0, row0 + nrows) into rows [0, kSub) of the buffers, zero-padded.
  auto stage_q = [&](int64_t h, int64_t row0, int nrows) {  // Xe = qe = [tau q, b]
    const Acc* bsave = static_cast<const Acc*>(p.b) + (bi * Hq + h) * N;
    for (int e = tid; e < kSub * De; e += nthr) {
      const int r = e / De, d = e % De;
      Acc val = 0;
      if (r < nrows)
        val = d < D ? tau * load_el<Acc, T>(p.q, p.q_stride, bi, h, row0 + r, d)
                    : bsave[row0 + r];
      Xe[r * XS + d] = val;
    }
  };
  auto stage_k = [&](int64_t row0, int nrows) {  // Xe = ke = [k - r, 1]
    for (int e = tid; e < kSub * De; e += nthr) {
      const int r = e / De, d = e % De;
      Acc val = 0;
      if (r < nrows)
        val = d < D ? load_el<Acc, T>(p.k, p.k_stride, bi, g, row0 + r, d) - rs[d] : Acc(1);
      Xe[r * XS + d] = val;
    }
  };
  auto stage_v = [&](int64_t row0, int nrows) {  // Vec = v~ = [v, 1]
    for (int e = tid; e < kSub * V1; e += nthr) {
      const int r = e / V1, n = e % V1;
      Acc val = 0;
      if (r < nrows) val = n < Dv ? load_el<Acc, T>(p.v, p.v_stride, bi, g, row0 + r, n) : Acc(1);
      Vec[r * VS + n] = val;
    }
  };
  auto stage_g = [&](int64_t h, int64_t row0, int nrows) {  // Vec = g~ (from grad_ext_kernel)
    const Acc* gs = static_cast<const Acc*>(w.g_ext) + ((bi * Hq + h) * N + row0) * V1;
    for (int e = tid; e < kSub * V1; e += nthr) {
      const int r = e / V1, n = e % V1;
      Vec[r * VS + n] = r < nrows ? gs[int64_t(r) * V1 + n] : Acc(0);
    }
  };
  auto zero_dx = [&]() {
    for (int e = tid; e < kSub * XS; e += nthr) Dx[e] = Acc(0);
  };
  // Feat[r][fi] = phi_f or psi_f of the staged extended vectors (csq_features.h: m_xy = 2 off
  // the diagonal for phi, 1 for psi).
  auto build_feat = [&](bool phi) {
    for (int e = tid; e < kSub * FT; e += nthr) {
      const int r = e / FT, fi = e % FT;
      Acc val = 0;
      if (fi < nf) {
        const int x = fx[fi], y = fy[fi];
        val = Xe[r * XS + x] * Xe[r * XS + y];
        if (phi) val *= pair_weight<Acc>(x, y);
      }
      Feat[r * FS + fi] = val;
    }
  };
  // With u in Feat: Dx[r][z] += d/dXe[r][z] of sum_f m_f u[r][f] Xe[r][x_f] Xe[r][y_f], i.e.
  // m u Xe[y] to x and m u Xe[x] to y. The y side hits distinct addresses across a warp; the
  // x side is nearly constant across a warp (the pair rows are sorted by x), so it is summed by
  // a segmented warp scan first and added once per run. A run is a stretch of pair rows with
  // one x; each linear row (x, D) and the constant row is a run of its own (their x repeat
  // those of the pair rows a few lanes earlier when D < 32, so runs are told apart by `run`,
  // not by x).
  auto accumulate_dx = [&](int nrows, bool phi) {
    const int lane = tid & 31;
    const int64_t pairs = num_pairs(D);
    for (int e = tid; e < kSub * FT; e += nthr) {  // the same trip count on every thread
      const int r = e / FT, fi = e % FT;           // one r per warp (FT % 32 == 0)
      int key = -1, run = -1;
      Acc xv = 0;
      if (r < nrows && fi < nf) {
        const int x = fx[fi], y = fy[fi];
        Acc u = Feat[r * FS + fi];
        if (phi) u *= pair_weight<Acc>(x, y);
        atomicAdd(&Dx[r * XS + y], u * Xe[r * XS + x]);
        xv = u * Xe[r * XS + y];
        key = x;
        run = f0 + fi < pairs ? x : De + fi;
      }
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const Acc ov = __shfl_up_sync(0xffffffffu, xv, off);
        const int orun = __shfl_up_sync(0xffffffffu, run, off);
        if (lane >= off && orun == run) xv += ov;
      }
      const int next = __shfl_down_sync(0xffffffffu, run, 1);
      if (run >= 0 && (lane == 31 || next != run)) atomicAdd(&Dx[r * XS + key], xv);
    }
  };

  // ---- the three block products on the staged rows.
  // S += Feat^T Vec over the nrows staged rows.
  auto update_state = [&](int nrows) {
    state_gemm_aug<4, 4, TC, Acc>(
        nf, Dv, nrows, [&](int m, int k) { return Feat[k * FS + m]; },
        [&](int k, int n) { return Vec[k * VS + n]; },
        [&](int m, int n, Acc val) { S[m * SS + n] += val; }, p.tensor_core_passes > 1);
  };
  // Feat[r][f] = u = sum_n Vec[r][n] S[f][n]: the gradient of the features (overwrites Feat).
  auto features_grad = [&](int nrows) {
    state_gemm<2, 4, TC, Acc>(
        nrows, FT, V1, [&](int m, int k) { return Vec[m * VS + k]; },
        [&](int k, int n) { return S[n * SS + k]; },
        [&](int m, int n, Acc val) { Feat[m * FS + n] = val; }, p.tensor_core_passes > 1);
  };

  // ---- one chunk: update the state with it.
  auto update_chunk = [&](int64_t t) {
    for (int sb = 0; sb < kChunkI / kSub; ++sb) {
      const int64_t row0 = seq_rows[0] + t * kChunk + sb * kSub, seq_end = seq_rows[1];
      if (row0 >= seq_end) break;
      const int nrows = static_cast<int>(min64(kSub, seq_end - row0));
      if constexpr (MODE != kStateBwdK) {
        __syncthreads();
        stage_k(row0, nrows);
        stage_v(row0, nrows);
        __syncthreads();
        build_feat(false);
        __syncthreads();
        update_state(nrows);
      } else {
        for (int64_t hh = 0; hh < G; ++hh) {
          const int64_t h = g * G + hh;
          __syncthreads();
          stage_q(h, row0, nrows);
          stage_g(h, row0, nrows);
          __syncthreads();
          build_feat(true);
          __syncthreads();
          update_state(nrows);
        }
      }
    }
  };

  // ---- one chunk: read the state for it.
  auto read_chunk = [&](int64_t t) {
    for (int sb = 0; sb < kChunkI / kSub; ++sb) {
      const int64_t row0 = seq_rows[0] + t * kChunk + sb * kSub, seq_end = seq_rows[1];
      if (row0 >= seq_end) break;
      const int nrows = static_cast<int>(min64(kSub, seq_end - row0));
      if constexpr (MODE == kStateFwd) {
        for (int64_t hh = 0; hh < G; ++hh) {
          const int64_t h = g * G + hh;
          __syncthreads();
          stage_q(h, row0, nrows);
          __syncthreads();
          build_feat(true);
          __syncthreads();
          Acc* num = static_cast<Acc*>(w.num_state) + ((bi * Hq + h) * N + row0) * V1;
          state_gemm_aug<2, 4, TC, Acc>(
              nrows, Dv, nf, [&](int m, int k) { return Feat[m * FS + k]; },
              [&](int k, int n) { return S[k * SS + n]; },
              [&](int m, int n, Acc val) { atomicAdd(num + int64_t(m) * V1 + n, val); },
              p.tensor_core_passes > 1);
        }
      } else if constexpr (MODE == kStateBwdQ) {
        for (int64_t hh = 0; hh < G; ++hh) {
          const int64_t h = g * G + hh, bh = bi * Hq + h;
          __syncthreads();
          stage_q(h, row0, nrows);
          stage_g(h, row0, nrows);
          zero_dx();
          __syncthreads();
          features_grad(nrows);
          __syncthreads();
          accumulate_dx(nrows, true);
          __syncthreads();
          Acc* dq = static_cast<Acc*>(p.dq) + (bh * N + row0) * D;
          Acc* db = static_cast<Acc*>(p.db) + bh * N + row0;
          for (int e = tid; e < nrows * De; e += nthr) {
            const int r = e / De, z = e % De;
            if (z < zlo) continue;
            const Acc val = Dx[r * XS + z];
            if (val == Acc(0)) continue;  // untouched by this tile (NaN still goes through)
            if (z < D)
              atomicAdd(dq + int64_t(r) * D + z, tau * val);
            else
              atomicAdd(db + r, val);
          }
        }
      } else {  // kStateBwdK
        __syncthreads();
        stage_k(row0, nrows);
        stage_v(row0, nrows);
        zero_dx();
        __syncthreads();
        build_feat(false);
        __syncthreads();
        Acc* dv = static_cast<Acc*>(p.dv) + (bg * N + row0) * Dv;
        state_gemm<2, 4, TC, Acc>(
            nrows, Dv, nf, [&](int m, int k) { return Feat[m * FS + k]; },
            [&](int k, int n) { return S[k * SS + n]; },
            [&](int m, int n, Acc val) { atomicAdd(dv + int64_t(m) * Dv + n, val); },
            p.tensor_core_passes > 1);
        __syncthreads();
        features_grad(nrows);
        __syncthreads();
        accumulate_dx(nrows, false);
        __syncthreads();
        Acc* dk = static_cast<Acc*>(p.dk) + (bg * N + row0) * D;
        for (int e = tid; e < nrows * De; e += nthr) {
          const int r = e / De, z = e % De;
          if (z < zlo || z >= D) continue;  // z == D is the constant coordinate of ke
          const Acc val = Dx[r * XS + z];
          if (val == Acc(0)) continue;
          atomicAdd(dk + int64_t(r) * D + z, val);
        }
      }
    }
  };

  if (p.causal) {
    for (int64_t s = 0; s < nch; ++s) {
      const int64_t t = MODE == kStateBwdK ? nch - 1 - s : s;
      // The state of the chunks already walked (and of the carried state).
      if (s > 0 || seed_ptr() != nullptr) read_chunk(t);
      // The last update is read only through the kept state.
      if (s + 1 < nch || keep_ptr() != nullptr) update_chunk(t);
    }
  } else {
    for (int64_t t = 0; t < nch; ++t) update_chunk(t);
    for (int64_t t = 0; t < nch; ++t) read_chunk(t);
  }
  if (keep_ptr() != nullptr) {
    __syncthreads();  // the last update_state is complete
    Acc* dst = head_sums(keep_ptr(), p, int64_t(blockIdx.x) / p.heads_k, g) + f0 * V1;
    for (int e = tid; e < nf * V1; e += nthr) {
      const int fi = e / V1, n = e % V1;
      Acc* out = dst + int64_t(fi) * V1 + n;
      // The forward returns the state; the backward adds to what the centering terms of the
      // carried key count put there before (center_dq_kernel), one CTA per row.
      if constexpr (MODE == kStateFwd)
        *out = S[fi * SS + n];
      else
        *out += S[fi * SS + n];
    }
  }
}

}  // namespace cuda
}  // namespace csq
