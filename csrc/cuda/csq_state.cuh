// The state scans' shared machinery (both directions): where the FLOPs are. One CTA per
// (sequence, key/value head, tile of FT state rows = features) walks the chunks of its
// sequence, holding its FT x (Dv + 1) slice of a state in shared memory. Per chunk it first
// "reads" the state (the queries or keys of the chunk against the state of the earlier, or
// later, chunks) and then "updates" it with the chunk. Every scan is one kernel,
// state_scan_kernel (below), run with a policy (csq_fwd_state.cuh, csq_bwd_state.cuh); the
// policies differ only in which state they hold, what they read and where it goes:
//
//   KeyStateFwd     S = sum_j psi(ke_j) v~_j^T (keys in order).
//                   read: num~_i += phi(qe_i) . S_tile              -> atomics into num_state
//   KeyStateBwd     the same S (backward pass 1).
//                   read: u_i = S_tile g~_i, dqe_i += d/dqe <phi(qe_i), u_i>
//                                                                   -> atomics into dq, db
//   QueryStateBwd   R = sum_i phi(qe_i) g~_i^T over all query heads of the group
//                   (reverse order; backward pass 2).
//                   read: dv_j += psi(ke_j) . R_tile, u_j = R_tile v~_j,
//                         dke_j += d/dke <psi(ke_j), u_j>           -> atomics into dv, dk
//   KeyStateBuild, StateKeysBwd: the state-only op's S, and its backward's keys reading R.
//
// Grid (S Hk, feature tiles): a CTA per (sequence, kv head, tile), which walks the chunks of
// its sequence (t is the chunk index within the sequence; rows are global). Causal: chunk t
// reads the state of chunks before t (after t for R); the pairs inside a chunk are the
// in-chunk kernels' job. Not causal: the full state, then every chunk reads it. Each tile adds
// a partial sum over its features, hence the atomics. The rows of a tile are features
// f0 .. f0 + FT - 1 in the feature map's order (csq_feature_map.h; the public order for
// StateMap), the order of the carried state, which is therefore read and written as is.
#pragma once

#include "csq_block_gemm.cuh"
#include "csq_chunked_work.cuh"
#include "csq_mma.cuh"

namespace csq {
namespace cuda {

// Shared memory of the state kernels, in Acc elements (the feature table, 3 FT ints, follows).
//   S    [FT][SS]     the state tile (rows: features f0 .. f0 + FT - 1; columns: Dv + 1)
//   Feat [SUB][FS]    features of the staged rows (phi or psi), later u
//   Vec  [SUB][VS]    v~ or g~ of the staged rows
//   Xe   [SUB][XS]    qe or ke of the staged rows
//   Dx   [SUB][XS]    dqe or dke of the staged rows (backward only)
//   ref  [D]          the reference key
// Strides are odd (bank-conflict free column walks) and rows padded to multiples of 4.
// SUB: the rows staged per step (kSub, or fewer for large heads: state_rows).
struct StateLayout {
  int SS, FS, VS, XS;
  int feat, vec, xe, dx, ref, n_acc;
  __host__ __device__ StateLayout(int D, int Dv, int FT, int SUB, bool with_dx) {
    SS = round_up4(Dv + 1) + 1;
    FS = FT + 1;
    VS = SS;
    XS = round_up4(D + 1) + 1;
    feat = FT * SS;
    vec = feat + SUB * FS;
    xe = vec + SUB * VS;
    dx = xe + SUB * XS;
    ref = dx + (with_dx ? SUB * XS : 0);
    n_acc = ref + round_up4(D);
  }
};

// Bytes of dynamic shared memory of a state scan; the backward ones also hold Dx.
template <typename Acc>
inline size_t state_smem_bytes(int D, int Dv, int FT, int SUB, bool backward) {
  const StateLayout L(D, Dv, FT, SUB, backward);
  return size_t(L.n_acc) * sizeof(Acc) + size_t(3 * FT) * sizeof(int);
}

// The fewest rows a state scan stages per step.
constexpr int kMinStateRows = 8;

// Rows staged per step: kSub when that tile fits the device's `optin` bytes of shared memory,
// else the most of kSub / 2, kMinStateRows that fits (a staged row takes about Dk + Dv + FT
// elements, Dk more in the backward; the tile S does not shrink with them). Large heads need
// this: at Dk = Dv = 256 the backward's tile with kSub rows takes 173 KB in float32, 272 KB in
// float64, more than an A100's 163 KB. Heads up to 128 keep kSub on sm_80 and sm_90.
// kMinStateRows when nothing fits, for prepare_smem to refuse with its message. The kernels
// take the rows as a template argument (SUB): a runtime count spilled the float64 scans.
template <typename Acc>
inline int state_rows(int D, int Dv, int FT, bool backward, size_t optin) {
  int sub = kSub;
  while (sub > kMinStateRows && state_smem_bytes<Acc>(D, Dv, FT, sub, backward) > optin)
    sub /= 2;
  return sub;
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

// The same for N = Dv + 1 columns (block_gemm_aug on the CUDA cores; KU: block_gemm's).
template <int TM, int TN, bool TC, typename Acc, int KU = 0, typename FA, typename FB,
          typename FE>
__device__ __forceinline__ void state_gemm_aug(int M, int dv, int K, const FA& a, const FB& b,
                                               const FE& emit, bool split) {
  if constexpr (TC)
    block_mma_tf32(M, dv + 1, K, a, b, emit, split);
  else
    block_gemm_aug<TM, TN, Acc, KU>(M, dv, K, a, b, emit);
}

// One CTA's tile of a state scan: its shared memory, feature table and staged rows, and the
// steps every scan is made of. Built at the start of a kernel (it zeroes the tile and reads the
// feature table and ref, with a barrier); every method is called by all threads of the CTA.
template <typename T, typename Acc, int FT, int SUB, bool TC, typename Map>
struct StateTile {
  static_assert(!TC || std::is_same<Acc, float>::value, "tensor cores: float accumulation");
  static_assert((SUB * FT) % kThreads == 0 && FT % 32 == 0,
                "one warp must cover 32 features of one row in accumulate_dx");
  static_assert(kChunkI % SUB == 0, "the chunk must be a whole number of staged steps");
  using AccT = Acc;
  // Every row a product of two factors (Map::kDegree, csq_feature_map.h): known at compile time,
  // so CSQ's scan carries no test for rows of one factor (it spilled the float64
  // query-state scan (QueryStateBwd) on sm_90a by 40 B).
  static constexpr bool kTwoFactors = Map::kDegree == 2;
  const FwdParams& p;
  const Work& w;
  Acc *S, *Feat, *Vec, *Xe, *Dx, *rs;
  // The feature table [3][FT]: per row of the tile its factors (csq_feature_map.h) and its
  // run, behind one pointer (a pointer per column cost the backward scan a spill on sm_90a).
  int* ftab;
  __device__ __forceinline__ int& fx(int fi) const { return ftab[fi]; }
  __device__ __forceinline__ int& fy(int fi) const { return ftab[FT + fi]; }
  __device__ __forceinline__ int& fr(int fi) const { return ftab[2 * FT + fi]; }
  int SS, FS, VS, XS;
  int D, Dv, De, V1, nf, zlo, tid, nthr;
  // The sequence's first and end rows live in shared memory (read once per staged step): kept
  // in registers across the whole kernel they push it into spills.
  int64_t* seq_rows;
  int64_t seq, g, bi, bg, N, G, Hq, nch, f0;
  Acc tau;

  __device__ StateTile(const FwdParams& p_, const Work& w_, bool backward,
                       unsigned char* smem_raw, int64_t* seq_rows_)
      : p(p_), w(w_), seq_rows(seq_rows_) {
    D = static_cast<int>(p.dim_k);
    Dv = static_cast<int>(p.dim_v);
    De = D + 1;
    V1 = Dv + 1;
    const StateLayout L(D, Dv, FT, SUB, backward);
    S = reinterpret_cast<Acc*>(smem_raw);
    Feat = S + L.feat;
    Vec = S + L.vec;
    Xe = S + L.xe;
    Dx = S + L.dx;
    rs = S + L.ref;
    ftab = reinterpret_cast<int*>(S + L.n_acc);
    SS = L.SS;
    FS = L.FS;
    VS = L.VS;
    XS = L.XS;
    tid = threadIdx.x;
    nthr = blockDim.x;
    const int64_t tg = blockIdx.x;
    seq = tg / p.heads_k;
    g = tg % p.heads_k;
    const SeqSpan sq = seq_span(p, w, seq);
    bi = sq.bi;
    bg = bi * p.heads_k + g;
    N = p.seqlen;
    G = p.group;
    Hq = p.heads_q;
    nch = sq.nch;
    if (tid == 0) {
      seq_rows[0] = sq.start;
      seq_rows[1] = sq.start + sq.len;
    }
    const int64_t F = Map::num_features(D);
    f0 = int64_t(blockIdx.y) * FT;
    nf = static_cast<int>(min64(FT, F - f0));
    tau = Acc(p.scale);
    for (int i = tid; i < L.ref; i += nthr) S[i] = Acc(0);  // everything but ref and the table
    for (int fi = tid; fi < FT; fi += nthr) {
      int x = 0, y = 0;
      if (fi < nf) Map::row_factors(f0 + fi, D, &x, &y);
      fx(fi) = x;
      fy(fi) = y;
    }
    for (int d = tid; d < D; d += nthr) rs[d] = static_cast<const Acc*>(w.ref)[tg * D + d];
    __syncthreads();
    // Runs: stretches of consecutive rows with one x (accumulate_dx sums them in a warp first).
    if (tid == 0)
      for (int fi = 0; fi < FT; ++fi) fr(fi) = fi > 0 && fx(fi) == fx(fi - 1) ? fr(fi - 1) : fi;
    // Every coordinate this tile touches is >= zlo (rows past nf hold 0).
    zlo = D;
    for (int fi = 0; fi < nf; ++fi) {
      zlo = imin(zlo, fx(fi));
      if (fy(fi) != kOneFactor) zlo = imin(zlo, fy(fi));
    }
    __syncthreads();
  }

  // The tile starts from this (sequence, kv head)'s rows of a state tensor when one is given
  // (a carried state, possibly a pool: kCarried, or the gradient of a returned one), else it
  // stays 0. A template flag: the backward's kernels (never a pool) must not carry the slot
  // lookup's registers.
  template <bool kCarried = false>
  __device__ __forceinline__ void seed(const void* state) {
    if (state == nullptr) return;  // uniform over the block
    const Acc* base = static_cast<const Acc*>(state);
    const Acc* src = (kCarried ? carried_sums<Map>(base, p, seq, g)
                               : head_sums<Map>(base, p, seq, g)) +
                     f0 * V1;
    for (int e = tid; e < nf * V1; e += nthr) {
      const int fi = e / V1, n = e % V1;
      S[fi * SS + n] = src[int64_t(fi) * V1 + n];
    }
    __syncthreads();
  }

  // The final tile into (add: onto) this (sequence, kv head)'s rows of a state tensor when one
  // is given (kCarried: the forward's state_out, possibly a pool).
  template <bool kCarried = false>
  __device__ __forceinline__ void keep(void* state, bool add) {
    if (state == nullptr) return;  // uniform over the block
    __syncthreads();  // the last update_state is complete
    Acc* base = static_cast<Acc*>(state);
    Acc* dst = (kCarried ? carried_sums<Map>(base, p, seq, g)
                         : head_sums<Map>(base, p, seq, g)) +
               f0 * V1;
    for (int e = tid; e < nf * V1; e += nthr) {
      const int fi = e / V1, n = e % V1;
      Acc* out = dst + int64_t(fi) * V1 + n;
      if (add)
        *out += S[fi * SS + n];
      else
        *out = S[fi * SS + n];
    }
  }

  // ---- staging: rows [row0, row0 + nrows) into rows [0, SUB) of the buffers, zero-padded.
  __device__ __forceinline__ void stage_q(int64_t h, int64_t row0, int nrows) {  // Xe = qe = [tau q, b]
    const Acc* bsave = static_cast<const Acc*>(p.b) + (bi * Hq + h) * N;
    for (int e = tid; e < SUB * De; e += nthr) {
      const int r = e / De, d = e % De;
      Acc val = 0;
      if (r < nrows)
        val = d < D ? tau * load_el<Acc, T>(p.q, p.q_stride, bi, h, row0 + r, d)
                    : bsave[row0 + r];
      Xe[r * XS + d] = val;
    }
  }
  __device__ __forceinline__ void stage_k(int64_t row0, int nrows) {  // Xe = ke = [k - r, 1]
    for (int e = tid; e < SUB * De; e += nthr) {
      const int r = e / De, d = e % De;
      Acc val = 0;
      if (r < nrows)
        val = d < D ? load_el<Acc, T>(p.k, p.k_stride, bi, g, row0 + r, d) - rs[d] : Acc(1);
      Xe[r * XS + d] = val;
    }
  }
  __device__ __forceinline__ void stage_v(int64_t row0, int nrows) {  // Vec = v~ = [v, 1]
    for (int e = tid; e < SUB * V1; e += nthr) {
      const int r = e / V1, n = e % V1;
      Acc val = 0;
      if (r < nrows) val = n < Dv ? load_el<Acc, T>(p.v, p.v_stride, bi, g, row0 + r, n) : Acc(1);
      Vec[r * VS + n] = val;
    }
  }
  __device__ __forceinline__ void stage_g(int64_t h, int64_t row0, int nrows) {  // Vec = g~ (grad_ext_kernel)
    const Acc* gs = static_cast<const Acc*>(w.g_ext) + ((bi * Hq + h) * N + row0) * V1;
    for (int e = tid; e < SUB * V1; e += nthr) {
      const int r = e / V1, n = e % V1;
      Vec[r * VS + n] = r < nrows ? gs[int64_t(r) * V1 + n] : Acc(0);
    }
  }
  // One side's rows: a query head h's qe and g~ (kQueries), or the keys' ke and v~.
  template <bool kQueries>
  __device__ __forceinline__ void stage_rows(int64_t h, int64_t row0, int nrows) {
    if constexpr (kQueries) {
      stage_q(h, row0, nrows);
      stage_g(h, row0, nrows);
    } else {
      stage_k(row0, nrows);
      stage_v(row0, nrows);
    }
  }
  __device__ __forceinline__ void zero_dx() {
    for (int e = tid; e < SUB * XS; e += nthr) Dx[e] = Acc(0);
  }
  // Feat[r][fi] = phi_f or psi_f of the staged extended vectors (csq_feature_map.h: the row's
  // factors times Map::query_weight for phi, 1 for psi).
  __device__ __forceinline__ void build_feat(bool phi) {
    for (int e = tid; e < SUB * FT; e += nthr) {
      const int r = e / FT, fi = e % FT;
      Acc val = 0;
      if (fi < nf) {
        const int x = fx(fi), y = fy(fi);
        val = Xe[r * XS + x];
        if (kTwoFactors) val *= Xe[r * XS + y];
        if (phi) val *= Map::template query_weight<Acc>(x, y);
      }
      Feat[r * FS + fi] = val;
    }
  }
  // With u in Feat: Dx[r][z] += d/dXe[r][z] of sum_f m_f u[r][f] Xe[r][x_f] Xe[r][y_f], i.e.
  // m u Xe[y] to x and m u Xe[x] to y (m u to x for a row of one factor). The y side hits
  // distinct addresses across a warp; the x side is nearly constant across a warp (CSQ's pair
  // rows are sorted by x), so it is summed by a segmented warp scan first and added once per
  // run: a stretch of consecutive rows with one x (fr, told apart by their first row, since an
  // x may come back a few rows later).
  __device__ __forceinline__ void accumulate_dx(int nrows, bool phi) {
    const int lane = tid & 31;
    for (int e = tid; e < SUB * FT; e += nthr) {  // the same trip count on every thread
      const int r = e / FT, fi = e % FT;           // one r per warp (FT % 32 == 0)
      int key = -1, run = -1;
      Acc xv = 0;
      if (r < nrows && fi < nf) {
        const int x = fx(fi), y = fy(fi);
        Acc u = Feat[r * FS + fi];
        if (phi) u *= Map::template query_weight<Acc>(x, y);
        xv = u;
        if (kTwoFactors) {
          atomicAdd(&Dx[r * XS + y], u * Xe[r * XS + x]);
          xv = u * Xe[r * XS + y];
        }
        key = x;
        run = fr(fi);
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
  }

  // ---- the block products on the staged rows.
  // S += Feat^T Vec over the nrows staged rows. At SUB = kMinStateRows the loop over them
  // (nrows <= 8) is not unrolled: the compiler unrolled it completely, and unrolled 2 or 4
  // times it still spilled the float64 query-state scan (QueryStateBwd) on sm_80 or sm_90a.
  __device__ __forceinline__ void update_state(int nrows) {
    state_gemm_aug<4, 4, TC, Acc, SUB <= kMinStateRows ? 1 : 0>(
        nf, Dv, nrows, [&](int m, int k) { return Feat[k * FS + m]; },
        [&](int k, int n) { return Vec[k * VS + n]; },
        [&](int m, int n, Acc val) { S[m * SS + n] += val; }, p.tensor_core_passes > 1);
  }
  // Feat[r][f] = u = sum_n Vec[r][n] S[f][n]: the gradient of the features (overwrites Feat).
  __device__ __forceinline__ void features_grad(int nrows) {
    state_gemm<2, 4, TC, Acc>(
        nrows, FT, V1, [&](int m, int k) { return Vec[m * VS + k]; },
        [&](int k, int n) { return S[n * SS + k]; },
        [&](int m, int n, Acc val) { Feat[m * FS + n] = val; }, p.tensor_core_passes > 1);
  }
  // emit(m, n, sum_f Feat[m][f] S[f][n]) for the staged rows m < nrows and the value columns
  // n < Dv, and with kCount also n = Dv (the count column).
  template <bool kCount, typename Emit>
  __device__ __forceinline__ void features_times_state(int nrows, const Emit& emit) {
    const auto feat = [&](int m, int k) { return Feat[m * FS + k]; };
    const auto state = [&](int k, int n) { return S[k * SS + n]; };
    if constexpr (kCount)
      state_gemm_aug<2, 4, TC, Acc>(nrows, Dv, nf, feat, state, emit, p.tensor_core_passes > 1);
    else
      state_gemm<2, 4, TC, Acc>(nrows, Dv, nf, feat, state, emit, p.tensor_core_passes > 1);
  }
  // The read of a gradient through the features of the staged rows (Vec: g~ or v~ staged, Dx
  // zeroed, a barrier since): u = S_tile Vec, Dx = d/dXe <features, u>, then emit(r, z, Dx[r][z])
  // for each coordinate z >= zlo (every one the tile touches; kSkipConstant: but z == D, the
  // constant coordinate of ke, skipped before its load: the float64 QueryStateBwd spilled 40 B
  // on sm_90a when it was tested after) whose value is not 0: untouched by this tile (a NaN
  // still goes through).
  template <bool kSkipConstant, typename Emit>
  __device__ __forceinline__ void read_gradients(int nrows, bool phi, const Emit& emit) {
    features_grad(nrows);
    __syncthreads();
    accumulate_dx(nrows, phi);
    __syncthreads();
    for (int e = tid; e < nrows * De; e += nthr) {
      const int r = e / De, z = e % De;
      if (z < zlo || (kSkipConstant && z >= D)) continue;
      const Acc val = Dx[r * XS + z];
      if (val == Acc(0)) continue;
      emit(r, z, val);
    }
  }

  // f(row0, nrows) for each staged step of chunk t: rows [row0, row0 + nrows) of its
  // sequence, SUB at most; none past the sequence's end.
  template <typename F>
  __device__ __forceinline__ void for_each_step(int64_t t, const F& f) const {
    for (int sb = 0; sb < kChunkI / SUB; ++sb) {
      const int64_t row0 = seq_rows[0] + t * kChunk + sb * SUB;
      const int64_t seq_end = seq_rows[1];
      if (row0 >= seq_end) break;
      f(row0, static_cast<int>(min64(SUB, seq_end - row0)));
    }
  }
  // f(h, row0, nrows) for each staged step of chunk t and each query head h of the group.
  template <typename F>
  __device__ __forceinline__ void for_each_query_step(int64_t t, const F& f) const {
    for_each_step(t, [&](int64_t row0, int nrows) {
      for (int64_t hh = 0; hh < G; ++hh) f(g * G + hh, row0, nrows);
    });
  }

  // The walk over the chunks: read(t) and update(t) per chunk t, in order (reverse: from the
  // last chunk). Causal: each chunk reads the chunks already walked (and a seeded state), and
  // the last update is made only when the tile is kept. Not causal: every update, then every
  // read. seeded() / kept() are read where used (held in registers across the walk, the
  // pointers behind them made the scans spill).
  template <typename Seeded, typename Kept, typename Read, typename Update>
  __device__ __forceinline__ void walk(bool reverse, const Seeded& seeded, const Kept& kept, const Read& read,
                       const Update& update) {
    if (p.causal) {
      for (int64_t s = 0; s < nch; ++s) {
        const int64_t t = reverse ? nch - 1 - s : s;
        if (s > 0 || seeded()) read(t);
        if (s + 1 < nch || kept()) update(t);
      }
    } else {
      for (int64_t t = 0; t < nch; ++t) update(t);
      for (int64_t t = 0; t < nch; ++t) read(t);
    }
  }

  // The updates: a key state (S) with the keys of chunk t, a query state (R) with its queries
  // of every head of the group.
  __device__ __forceinline__ void absorb_keys(int64_t t) {
    for_each_step(t, [&](int64_t row0, int nrows) { absorb<false>(0, row0, nrows); });
  }
  __device__ __forceinline__ void absorb_queries(int64_t t) {
    for_each_query_step(t,
                        [&](int64_t h, int64_t row0, int nrows) { absorb<true>(h, row0, nrows); });
  }
  template <bool kQueries>
  __device__ __forceinline__ void absorb(int64_t h, int64_t row0, int nrows) {
    __syncthreads();
    stage_rows<kQueries>(h, row0, nrows);
    __syncthreads();
    build_feat(kQueries);
    __syncthreads();
    update_state(nrows);
  }
};

// The two kinds of scan policy: the forward's (FwdParams) and the backward's (BwdParams; its
// tiles also hold Dx).
struct ForwardScan {
  using Params = FwdParams;
  static constexpr bool kBackward = false;
};
struct BackwardScan {
  using Params = BwdParams;
  static constexpr bool kBackward = true;
};

// Every state scan: this CTA's tile, then what the policy Scan does with it (Scan::run; Scan:
// a ForwardScan or BackwardScan with kName, its name in errors). Launched by
// launch_state_scan (csq_chunked_launch.cuh).
template <typename Scan, typename T, typename Acc, int FT, int SUB, bool TC, typename Map>
__global__ void __launch_bounds__(kThreads, state_min_blocks<Acc>())
    state_scan_kernel(const typename Scan::Params p, Work w) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ int64_t seq_rows[2];
  StateTile<T, Acc, FT, SUB, TC, Map> st(p, w, Scan::kBackward, smem_raw, seq_rows);
  Scan::run(st, p, w);
}

}  // namespace cuda
}  // namespace csq
