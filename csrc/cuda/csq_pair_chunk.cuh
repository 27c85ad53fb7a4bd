// The CTA of the in-chunk kernels (fwd_finalize_kernel, csq_fwd_chunk.cuh; bwd_pairs_kernel,
// csq_bwd_chunk.cuh), grid (B Hq, nchunks): its chunk's rows (ChunkRows, csq_pairs.cuh), its
// shared memory, the thread's 4 x 4 block of the C x C pair matrix, and the products of a
// causal pair matrix with the rows of a source, slab by slab.
#pragma once

#include "csq_pairs.cuh"

namespace csq {
namespace cuda {

// Shared memory (finalize_smem_bytes, bwd_pairs_smem_bytes): the staged slabs A and B (C x
// kSlab, stride kAS), then C x C pair matrices (stride kWS; the forward's second one holds
// only C values). The thread's pairs: rows r = 4 mg + i and columns c = ng + 16 j.
template <typename T, typename Acc>
struct PairChunk : ChunkRows<T, Acc> {
  Acc* A;
  Acc* B;
  Acc* pairs;
  int mg, ng;
  __device__ PairChunk(const FwdParams& p, const Work& w, unsigned char* smem)
      : ChunkRows<T, Acc>(p, w, blockIdx.x, blockIdx.y), A(reinterpret_cast<Acc*>(smem)),
        B(A + kChunkI * kAS), pairs(B + kChunkI * kAS), mg(threadIdx.x / 16),
        ng(threadIdx.x % 16) {}

  // Pair matrix i (0 or 1) in shared memory.
  __device__ __forceinline__ Acc* pair_matrix(int i) const { return pairs + i * kChunkI * kWS; }
  // The chunk's rows of a query-side tensor (B, Hq, N, width) or a key-side one (B, Hk, N,
  // width), contiguous, in the accumulation dtype.
  __device__ __forceinline__ Acc* query_rows(void* base, int width) const {
    return static_cast<Acc*>(base) + (this->bh * this->p.seqlen + this->row0) * width;
  }
  __device__ __forceinline__ Acc* key_rows(void* base, int width) const {
    return static_cast<Acc*>(base) + (this->bg * this->p.seqlen + this->row0) * width;
  }

  // P[r][c] = value(i, j) for the thread's pairs in the causal triangle of the chunk's rows
  // (c <= r < nrows), 0 elsewhere: read transposed, a row past nrows would be a query that is
  // not there.
  template <typename Value>
  __device__ __forceinline__ void fill_causal(Acc* P, const Value& value) const {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int r = 4 * mg + i, c = ng + 16 * j;
        P[r * kWS + c] = c <= r && r < this->nrows ? value(i, j) : Acc(0);
      }
  }

  // emit(r, z, sum_l P(r, l) src(l, z)) for the chunk's rows r < nrows and the columns z <
  // ncols of a row source (pair_times_slab: kTrans reads P transposed), slab by slab through
  // the staging buffer buf (A or B). The first barrier also orders the writes of P.
  template <bool kTrans, typename Src, typename Emit>
  __device__ __forceinline__ void pairs_times_rows(const Acc* P, Acc* buf, int ncols,
                                                   const Src& src, const Emit& emit) const {
    for (int z0 = 0; z0 < ncols; z0 += kSlab) {
      __syncthreads();  // P is written; the previous slab of buf is no longer read
      stage_slab(buf, this->nrows, z0, ncols, src);
      __syncthreads();
      Acc o[4][2];
      pair_times_slab<kTrans>(P, buf, mg, ng, o);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int r = 4 * mg + i, z = z0 + ng + 16 * j;
          if (r < this->nrows && z < ncols) emit(r, z, o[i][j]);
        }
    }
  }
};

}  // namespace cuda
}  // namespace csq
