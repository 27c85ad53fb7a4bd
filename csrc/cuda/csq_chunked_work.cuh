// The chunked path's sequences, chunks and workspace, shared by its kernels of both directions
// (and the decode step's thread count): chunk slots of packed sequences, the spans of a
// sequence and of a chunk, the workspace layout, and the carried state's key sums. Torch-free.
//
// Notation (README.md): D = Dk, De = D + 1, V1 = Dv + 1. Extended vectors
//   qe_i = [tau q_i, b_i],  ke_j = [k_j - r, 1],  v~_j = [v_j, 1],  g~_i = [dnum_i, dden_i],
// so that s_ij = <qe_i, ke_j> = tau <q_i, k'_j> + b_i and w_ij = s_ij^2. The features and their
// order are the feature map's (csq_feature_map.h; the public state order, as on the CPU).
#pragma once

#include "csq_elements.cuh"

namespace csq {
namespace cuda {

constexpr int kThreads = 256;  // every kernel but the tiny per-column ones
constexpr int kSub = 32;       // rows staged in shared memory per step (state kernels: at most)
constexpr int kSlab = 32;      // feature columns staged per step by the in-chunk kernels
constexpr int kChunkI = static_cast<int>(kChunk);
static_assert(kChunkI % kSub == 0, "the chunk must be a whole number of sub-blocks");
static_assert(kChunkI == 64 && kThreads == 256, "in-chunk kernels map 256 threads on 64 x 64");

// ---------------------------------------------------------------------------------------------
// Sequences. Without cu_seqlens, sequence s is batch entry s (positions [0, N)); with it,
// batch == 1 and sequence s holds positions [cu[s], cu[s + 1]) of the packed inputs. Chunks of
// kChunk positions never cross a sequence boundary. The per-chunk kernels run on chunk
// *slots* t (grid.y): without cu_seqlens slot t is chunk t of every batch entry; with it, the
// slots of sequence s are seq_chunk0[s] .. seq_chunk0[s + 1] - 1 (chunk_map_kernel), and slots
// past the last sequence are unused (the CTA returns). Global row indices (the position in
// the (B, H, N, ...) tensors) are used everywhere; only n_i and the chunk walk are per sequence.
//
// Workspace: 256-byte aligned pieces, in the accumulation dtype but for the chunk map. Each
// piece holds one thing for the whole op.
//   ref          (S, Hk, D)               reference key r per (sequence, key/value head)
//   key_sums     (B, Hk, nchunks, D)      per-chunk sums of k - r
//   key_prefix   (B, Hk, nchunks + 1, D)  their exclusive scan within each sequence
//   num_state    (B, Hq, N, Dv + 1)       forward: the state part of num~
//   g_ext        (B, Hq, N, Dv + 1)       backward: g~ = [dnum, dden]
//   center_sums  (B, Hk, nchunks, D)      backward: per-chunk sums of the centering terms of dk
//   center_prefix (B, Hk, nchunks + 1, D) backward: their exclusive scan (reverse)
//   chunk_seq    (nchunks) int32          cu_seqlens only: the sequence of each slot, -1 if unused
//   seq_chunk0   (S + 1) int32            cu_seqlens only: the first slot of each sequence

struct Work {
  void* ref = nullptr;
  void* key_sums = nullptr;
  void* key_prefix = nullptr;
  void* num_state = nullptr;      // forward only
  void* g_ext = nullptr;          // backward only
  void* center_sums = nullptr;    // backward only
  void* center_prefix = nullptr;  // backward only
  int* chunk_seq = nullptr;
  int* seq_chunk0 = nullptr;
  int64_t nchunks = 0;  // chunk slots per (batch entry, head)
};

// kState: the state-only op (no query rows).
enum class Direction : int { kForward = 0, kBackward = 1, kState = 2 };

// Chunk slots: ceil(N / C), or with cu_seqlens an upper bound of sum_s ceil(len_s / C).
__host__ __device__ inline int64_t num_chunk_slots(const QkvParams& p) {
  const int64_t base = (p.seqlen + kChunk - 1) / kChunk;
  return p.cu_seqlens != nullptr ? base + p.num_seqs : base;
}

// Returns the bytes the op of direction `dir` needs; fills *w when base is not null.
inline size_t carve_workspace(const QkvParams& p, DType dt, Direction dir, void* base, Work* w) {
  const size_t a = acc_size(dt);
  const int64_t nchunks = num_chunk_slots(p);
  const bool varlen = p.cu_seqlens != nullptr, bwd = dir == Direction::kBackward;
  const size_t bhk = size_t(p.batch * p.heads_k);
  const size_t shk = size_t(num_sequences(p) * p.heads_k);
  const size_t chunk_cols = a * bhk * size_t(nchunks) * size_t(p.dim_k);
  const size_t prefix_cols = a * bhk * size_t(nchunks + 1) * size_t(p.dim_k);
  enum { kRef, kKeySums, kKeyPrefix, kRows, kCenterSums, kCenterPrefix, kChunkSeq, kSeqChunk0, kN };
  size_t sizes[kN] = {
      align256(a * shk * size_t(p.dim_k)),
      align256(chunk_cols),
      align256(prefix_cols),
      dir == Direction::kState
          ? 0
          : align256(a * size_t(p.batch * p.heads_q) * size_t(p.seqlen) * size_t(p.dim_v + 1)),
      bwd ? align256(chunk_cols) : 0,
      bwd ? align256(prefix_cols) : 0,
      varlen ? align256(sizeof(int) * size_t(nchunks)) : 0,
      varlen ? align256(sizeof(int) * size_t(p.num_seqs + 1)) : 0};
  size_t off[kN], total = 0;
  for (int i = 0; i < kN; ++i) {
    off[i] = total;
    total += sizes[i];
  }
  if (base != nullptr && w != nullptr) {
    char* c = static_cast<char*>(base);
    *w = Work{};
    w->ref = c + off[kRef];
    w->key_sums = c + off[kKeySums];
    w->key_prefix = c + off[kKeyPrefix];
    if (dir != Direction::kState) (bwd ? w->g_ext : w->num_state) = c + off[kRows];
    if (bwd) {
      w->center_sums = c + off[kCenterSums];
      w->center_prefix = c + off[kCenterPrefix];
    }
    w->chunk_seq = varlen ? reinterpret_cast<int*>(c + off[kChunkSeq]) : nullptr;
    w->seq_chunk0 = varlen ? reinterpret_cast<int*>(c + off[kSeqChunk0]) : nullptr;
    w->nchunks = nchunks;
  }
  return total;
}

// One sequence: its batch entry, first position, length, first chunk slot and chunk count.
struct SeqSpan {
  int64_t bi, start, len, t0, nch;
};

__device__ __forceinline__ SeqSpan seq_span(const QkvParams& p, const Work& w, int64_t s) {
  if (p.cu_seqlens == nullptr) return SeqSpan{s, 0, p.seqlen, 0, w.nchunks};
  const int64_t a = p.cu_seqlens[s], b = p.cu_seqlens[s + 1];
  return SeqSpan{0, a, b - a, w.seq_chunk0[s], (b - a + kChunk - 1) / kChunk};
}

// One chunk slot t of batch entry bi: its sequence and global rows [row0, row1).
struct ChunkSpan {
  bool valid;
  int64_t seq, start, len, t0, row0, row1;
};

__device__ __forceinline__ ChunkSpan chunk_span(const QkvParams& p, const Work& w, int64_t bi,
                                                int64_t t) {
  ChunkSpan c{false, 0, 0, 0, 0, 0, 0};
  int64_t s = bi;
  if (p.cu_seqlens != nullptr) {
    s = w.chunk_seq[t];
    if (s < 0) return c;
  }
  const SeqSpan seq = seq_span(p, w, s);
  c.seq = s;
  c.start = seq.start;
  c.len = seq.len;
  c.t0 = seq.t0;
  c.row0 = seq.start + (t - seq.t0) * kChunk;
  c.row1 = min64(seq.start + seq.len, c.row0 + kChunk);
  c.valid = c.row0 < c.row1;
  return c;
}

// ---------------------------------------------------------------------------------------------
// Carried state (csq_feature_map.h): per (sequence, kv head) the sums (F, Dv + 1) in the row
// order of the feature map Map (StateMap's: the public order), shared with the CPU backend (a
// state moves between devices with .to()) and used as is by the state scans. The last column
// of the key-sum rows is the carried key sum (relative to ref), that of the count row the
// carried key count.

// The sums of one (sequence, kv head) in a state tensor (state_in, state_out, dstate_*).
// Ptr is a typed (const) Acc pointer.
template <typename Map, typename Ptr>
__device__ __forceinline__ Ptr head_sums(Ptr base, const QkvParams& p, int64_t seq, int64_t g) {
  return base + (seq * p.heads_k + g) * state_head_elems<Map>(p.dim_k, p.dim_v);
}

// The same in the forward's carried state (state_in, state_out), which may be a pool: its
// entry, or its slot (csq_params.h, StatePool; csq_pool_prefill_). The gradients of a state
// (dstate_*) are never pooled: head_sums, which costs the backward's kernels no registers.
template <typename Map, typename Ptr>
__device__ __forceinline__ Ptr carried_sums(Ptr base, const FwdParams& p, int64_t seq,
                                            int64_t g) {
  return base + state_sums_offset(p.pool, seq, g, p.heads_k,
                                  state_head_elems<Map>(p.dim_k, p.dim_v));
}

// The carried key count of a (sequence, kv head), 0 without a carried state. kPool = false
// for the backward's own kernels, whose state is never a pool (the slot lookup spilled
// center_dk_kernel<double> on sm_90a).
template <typename Map, typename Acc, bool kPool = true>
__device__ __forceinline__ Acc carried_count(const FwdParams& p, int64_t seq, int64_t g) {
  if (p.state_in == nullptr) return Acc(0);
  const Acc* state = static_cast<const Acc*>(p.state_in);
  return state_key_count<Map>(kPool ? carried_sums<Map>(state, p, seq, g)
                                    : head_sums<Map>(state, p, seq, g),
                              p.dim_k, p.dim_v);
}

// Coordinate d of the carried key sum (relative to ref), 0 without a carried state.
template <typename Map, typename Acc>
__device__ __forceinline__ Acc carried_key_sum(const FwdParams& p, int64_t seq, int64_t g,
                                               int d) {
  if (p.state_in == nullptr) return Acc(0);
  return state_key_sum<Map>(carried_sums<Map>(static_cast<const Acc*>(p.state_in), p, seq, g), d,
                            p.dim_k, p.dim_v);
}

}  // namespace cuda
}  // namespace csq
