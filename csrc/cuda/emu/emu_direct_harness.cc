// C entry points over the direct path's launchers (csq_direct_launch.h), for check_emu.py
// (ctypes). Emulator only. Packed sequences and the tensor-core switch are explicit arguments.
#include <cstdio>

#include "csq_direct_launch.h"
#include "emu_params.h"

using namespace csq;
using namespace csq::cuda;

namespace {

void fill_direct(DirectFwdParams& p, const int64_t* sz, const void* q, const int64_t* qs,
                 const void* k, const int64_t* ks, const void* v, const int64_t* vs,
                 const void* shift, double scale, double eps, int causal, int center,
                 int normalize, const int64_t* cu, int64_t num_seqs, int tensor_cores) {
  fill_qkv(p, sz, q, qs, k, ks, v, vs, shift, scale, eps, causal, center, normalize, cu,
           num_seqs);
  p.tile = 7;  // a CPU knob, ignored by the CUDA kernels
  p.tensor_core_passes = tensor_cores;
}

}  // namespace

extern "C" int emu_direct_fwd(int dt, const int64_t* sz, const void* q, const int64_t* qs,
                              const void* k, const int64_t* ks, const void* v, const int64_t* vs,
                              const void* shift, double scale, double eps, int causal,
                              int center, int normalize, const int64_t* cu, int64_t num_seqs,
                              int tensor_cores, const void* row_shift, const void* row_sums,
                              void* y, void* b, void* den, char* msg, int msglen) {
  DirectFwdParams p;
  fill_direct(p, sz, q, qs, k, ks, v, vs, shift, scale, eps, causal, center, normalize, cu,
              num_seqs, tensor_cores);
  p.row_shift = row_shift;  // may be null
  p.row_sums = row_sums;
  static_cast<ForwardOutputs&>(p) = ForwardOutputs{y, b, den};
  return launch_with_workspace(dt, p, direct_fwd_workspace_bytes, msg, msglen,
                               EMU_LAUNCHER(launch_direct_fwd));
}

extern "C" int emu_direct_bwd(int dt, const int64_t* sz, const void* q, const int64_t* qs,
                              const void* k, const int64_t* ks, const void* v, const int64_t* vs,
                              const void* shift, double scale, double eps, int causal,
                              int center, int normalize, const int64_t* cu, int64_t num_seqs,
                              int tensor_cores, const void* dy, const int64_t* dys,
                              const void* y, const void* b, const void* den, void* dq, void* dk,
                              void* dv, void* db, char* msg, int msglen) {
  DirectBwdParams p;
  fill_direct(p, sz, q, qs, k, ks, v, vs, shift, scale, eps, causal, center, normalize, cu,
              num_seqs, tensor_cores);
  fill_gradients(p, p, dy, dys, y, b, den, dq, dk, dv, db);
  return launch_with_workspace(dt, p, direct_bwd_workspace_bytes, msg, msglen,
                               EMU_LAUNCHER(launch_direct_bwd));
}
