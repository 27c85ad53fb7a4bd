// C entry points over the launchers, for check_emu.py (ctypes). Emulator only.
#include <cstdio>
#include <cstdlib>

#include "csq_launch.h"
#include "emu_params.h"

using namespace csq;
using namespace csq::cuda;

namespace {

// Packed sequences for the next emu_fwd / emu_bwd calls (emu_set_seqs), host memory.
const int64_t* g_cu_seqlens = nullptr;
int64_t g_num_seqs = 0;

// The carried state and its gradients for the next emu_fwd / emu_bwd / emu_state calls
// (emu_set_state, emu_set_ref_grad); all null for none. A backward reads carried.ref_in as the
// forward's ref (as the op does).
struct StateArgs {
  CarriedState carried;      // its pool stays empty: emu_set_pool's is g_pool
  CarriedStateGrads grads;
} g_state;

// The state pool of the following emu_fwd / emu_decode calls (emu_set_pool): slot indices and
// fresh flags (host memory) and the slot strides; slots null for none.
StatePool g_pool;

// The tensor-core passes for bfloat16 / float16 (FwdParams::tensor_core_passes: 0, 1, 3),
// emu_set_tensor_cores.
int g_tensor_core_passes = 3;

void fill(QkvParams& p, const int64_t* sz, const void* q, const int64_t* qs, const void* k,
          const int64_t* ks, const void* v, const int64_t* vs, const void* shift, double scale,
          double eps, int causal, int center, int normalize) {
  fill_qkv(p, sz, q, qs, k, ks, v, vs, shift, scale, eps, causal, center, normalize,
           g_cu_seqlens, g_num_seqs);
}

// The forward's own fields beyond QkvParams (the carried state of emu_set_state).
void fill_forward(FwdParams& p) {
  p.chunk = 7;  // ignored by the CUDA backend
  p.tensor_core_passes = g_tensor_core_passes;
  static_cast<CarriedState&>(p) = g_state.carried;
  p.pool = g_pool;
}

}  // namespace

// cu (S + 1 offsets) for the following calls, or nullptr for none.
extern "C" void emu_set_seqs(const int64_t* cu, int64_t num_seqs) {
  g_cu_seqlens = cu;
  g_num_seqs = num_seqs;
}

// A state pool for the following emu_fwd and emu_decode calls (csq_params.h, StatePool): the
// slot of each sequence, optional fresh flags, and the slot strides of sums and ref; the
// forward takes the pool through emu_set_state (state_in == state_out, ref_in == ref_out).
// slots = nullptr: no pool.
extern "C" void emu_set_pool(const int64_t* slots, const uint8_t* fresh, int64_t sums_stride,
                             int64_t ref_stride) {
  g_pool = StatePool{slots, fresh, sums_stride, ref_stride};
}

// How the following calls run the half-precision state products (0, 1 or 3 tensor-core passes).
extern "C" void emu_set_tensor_cores(int passes) { g_tensor_core_passes = passes; }

// The shared memory a block may opt into on the emulated device (bytes; an H100's 227 KB at
// first), for the following calls: the state scans stage fewer rows where less is available.
// The kernels' raised limits are forgotten, as on a fresh device.
extern "C" void emu_set_smem_optin(int bytes) {
  emu::smem_optin() = bytes;
  emu::smem_limits().clear();
}

// The feature map of the following calls: 0 StateMap, 1 the tests' LinearMap (float64).
extern "C" void emu_set_feature_map(int map) { feature_map() = map; }

// The carried-state tensors of the following calls (any may be null).
extern "C" void emu_set_state(const void* state_in, const void* ref_in, void* state_out,
                              void* ref_out, const void* dstate_out, void* dstate_in,
                              void* dref) {
  g_state.carried = CarriedState{state_in, ref_in, state_out, ref_out, StatePool{}};
  g_state.grads = CarriedStateGrads{dstate_out, nullptr, true, dstate_in, dref};
}

// For the next backward (after emu_set_state): the incoming gradient of the returned ref, and
// whether the forward was given its ref_in (CarriedStateGrads::ref_given).
extern "C" void emu_set_ref_grad(const void* dref_out, int ref_given) {
  g_state.grads.dref_out = dref_out;
  g_state.grads.ref_given = ref_given != 0;
}

extern "C" int emu_fwd(int dt, const int64_t* sz, const void* q, const int64_t* qs, const void* k,
                       const int64_t* ks, const void* v, const int64_t* vs, const void* shift,
                       double scale, double eps, int causal, int center, int normalize, void* y,
                       void* b, void* den, char* msg, int msglen) {
  FwdParams p;
  fill(p, sz, q, qs, k, ks, v, vs, shift, scale, eps, causal, center, normalize);
  fill_forward(p);
  static_cast<ForwardOutputs&>(p) = ForwardOutputs{y, b, den};
  return launch_with_workspace(dt, p, fwd_workspace_bytes, msg, msglen,
                               EMU_LAUNCHER(launch_fwd));
}

extern "C" int emu_bwd(int dt, const int64_t* sz, const void* q, const int64_t* qs, const void* k,
                       const int64_t* ks, const void* v, const int64_t* vs, const void* shift,
                       double scale, double eps, int causal, int center, int normalize,
                       const void* dy, const int64_t* dys, const void* y, const void* b,
                       const void* den, void* dq, void* dk, void* dv, void* db, char* msg,
                       int msglen) {
  BwdParams p;
  fill(p, sz, q, qs, k, ks, v, vs, shift, scale, eps, causal, center, normalize);
  fill_forward(p);
  p.state_out = p.ref_out = nullptr;  // forward outputs; the backward reads ref_in
  static_cast<CarriedStateGrads&>(p) = g_state.grads;
  fill_gradients(p, p, dy, dys, y, b, den, dq, dk, dv, db);
  return launch_with_workspace(dt, p, bwd_workspace_bytes, msg, msglen,
                               EMU_LAUNCHER(launch_bwd));
}

// One in-place decoding step: sums (B, Hk, F, Dv + 1) and ref (B, Hk, Dk) in the acc dtype,
// y (B, Hq, 1, Dv) in the input dtype.
extern "C" int emu_decode(int dt, const int64_t* sz, const void* q, const int64_t* qs,
                          const void* k, const int64_t* ks, const void* v, const int64_t* vs,
                          const void* shift, double scale, double eps, int center, int normalize,
                          void* sums, const void* ref, void* y, char* msg, int msglen) {
  DecodeParams p;
  fill(p, sz, q, qs, k, ks, v, vs, shift, scale, eps, 1, center, normalize);
  // Nothing of emu_set_seqs / emu_set_state: the decode step takes only its own state (or the
  // pool of emu_set_pool).
  p.cu_seqlens = nullptr;
  p.num_seqs = p.batch;
  p.sums = sums;
  p.ref = const_cast<void*>(ref);  // written when the state holds no key yet
  p.y = y;
  p.pool = g_pool;  // with a pool: sums and ref are its tensors
  const Status st = for_launch(DType(dt), [&](auto tag, auto map) {
    return launch_decode<decltype(tag)::value, decltype(map)>(p, nullptr);
  });
  return report(st, msg, msglen);
}

// The state-only op (csq_state): sz = (B, Hk, Hk, N, Dk, Dv) (no queries: q mirrors k);
// state_in / ref_in and packed sequences from emu_set_state / emu_set_seqs.
extern "C" int emu_state(int dt, const int64_t* sz, const void* k, const int64_t* ks,
                         const void* v, const int64_t* vs, void* state_out, void* ref_out,
                         char* msg, int msglen) {
  StateParams p;
  fill(p, sz, k, ks, k, ks, v, vs, k, 1.0, 0.0, 1, 0, 1);
  p.state_in = g_state.carried.state_in;
  p.ref_in = g_state.carried.ref_in;
  p.state_out = state_out;
  p.ref_out = ref_out;
  p.tensor_core_passes = g_tensor_core_passes;
  return launch_with_workspace(dt, p, state_workspace_bytes, msg, msglen,
                               EMU_LAUNCHER(launch_state));
}

// Its backward: ref_in is the forward's ref; dstate_out, dstate_in, dref (emu_set_state) and
// dref_out (emu_set_ref_grad).
extern "C" int emu_state_bwd(int dt, const int64_t* sz, const void* k, const int64_t* ks,
                             const void* v, const int64_t* vs, void* dk, void* dv, char* msg,
                             int msglen) {
  StateBwdParams p;
  fill(p, sz, k, ks, k, ks, v, vs, k, 1.0, 0.0, 1, 0, 1);
  p.state_in = g_state.carried.state_in;
  p.ref_in = g_state.carried.ref_in;
  static_cast<CarriedStateGrads&>(p) = g_state.grads;
  p.dk = dk;
  p.dv = dv;
  p.tensor_core_passes = g_tensor_core_passes;
  return launch_with_workspace(dt, p, state_workspace_bytes, msg, msglen,
                               EMU_LAUNCHER(launch_state_bwd));
}
