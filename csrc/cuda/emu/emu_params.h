// The inputs' part of the params (QkvParams) from the C arguments that check_emu.py passes,
// shared by the chunked ops' harness (emu_harness.cc) and the direct path's
// (emu_direct_harness.cc). Emulator only.
#pragma once

#include <cstdint>

#include "csq_launch.h"  // csq_params.h: QkvParams

namespace csq {

// sz = (B, Hq, Hk, N, Dk, Dv); qs, ks, vs the element strides; cu = packed cu_seqlens (int64)
// of num_seqs sequences, or null for one sequence per batch entry.
inline void fill_qkv(QkvParams& p, const int64_t* sz, const void* q, const int64_t* qs,
                     const void* k, const int64_t* ks, const void* v, const int64_t* vs,
                     const void* shift, double scale, double eps, int causal, int center,
                     int normalize, const int64_t* cu, int64_t num_seqs) {
  p.batch = sz[0];
  p.heads_q = sz[1];
  p.heads_k = sz[2];
  p.seqlen = sz[3];
  p.dim_k = sz[4];
  p.dim_v = sz[5];
  p.group = p.heads_q / p.heads_k;
  for (int i = 0; i < 4; ++i) {
    p.q_stride[i] = qs[i];
    p.k_stride[i] = ks[i];
    p.v_stride[i] = vs[i];
  }
  p.q = q;
  p.k = k;
  p.v = v;
  p.shift = shift;
  p.scale = scale;
  p.eps = eps;
  p.causal = causal;
  p.center = center;
  p.normalize = normalize;
  p.cu_seqlens = cu;
  p.num_seqs = cu != nullptr ? num_seqs : p.batch;
}

}  // namespace csq
