// What the chunked ops' harness (emu_harness.cc) and the direct path's (emu_direct_harness.cc)
// share: the inputs' part of the params (QkvParams) and a backward's dy, saved outputs and
// gradients from the C arguments that check_emu.py passes, the launch for a runtime dtype on a
// poisoned workspace, and the Status -> C return code. Emulator only.
#pragma once

#include <cstdint>
#include <cstdio>
#include <type_traits>
#include <vector>

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

// A backward's arguments beyond the forward's, shared by both algorithms (GradientFields and
// the forward's saved outputs): dy with its element strides dys, the forward's y, b, den (read
// back, not written) and the gradient outputs dq, dk, dv, db.
inline void fill_gradients(ForwardOutputs& saved, GradientFields& grad, const void* dy,
                           const int64_t* dys, const void* y, const void* b, const void* den,
                           void* dq, void* dk, void* dv, void* db) {
  for (int i = 0; i < 4; ++i) grad.dy_stride[i] = dys[i];
  grad.dy = dy;
  saved.y = const_cast<void*>(y);
  saved.b = const_cast<void*>(b);
  saved.den = const_cast<void*>(den);
  grad.dq = dq;
  grad.dk = dk;
  grad.dv = dv;
  grad.db = db;
}

// The feature map of the following calls (emu_set_feature_map): 0 StateMap, 1 the tests'
// LinearMap (csq_feature_maps.h; float64 only).
inline int& feature_map() {
  static int map = 0;
  return map;
}

// f(std::integral_constant<DType, DT>{}, Map{}) for the runtime dtype d and feature_map(): a
// launcher template instantiated for each (dtype, map) in one place.
template <typename F>
cuda::Status for_launch(cuda::DType d, F f) {
  using cuda::DType;
  if (feature_map() == 1) {
    if (d != DType::kFloat64)
      return cuda::Status{cudaErrorInvalidValue, "for_launch",
                          "the tests' feature map is instantiated for float64 only"};
    return f(std::integral_constant<DType, DType::kFloat64>{}, LinearMap{});
  }
  switch (d) {
    case DType::kFloat64: return f(std::integral_constant<DType, DType::kFloat64>{}, StateMap{});
    case DType::kFloat32: return f(std::integral_constant<DType, DType::kFloat32>{}, StateMap{});
    case DType::kFloat16: return f(std::integral_constant<DType, DType::kFloat16>{}, StateMap{});
    case DType::kBFloat16:
      return f(std::integral_constant<DType, DType::kBFloat16>{}, StateMap{});
  }
  return cuda::Status{cudaErrorInvalidValue, "for_launch", "unknown dtype"};
}

// 0 when st is ok; else the message into msg and a nonzero code (-1 when the Status carries
// no CUDA error code).
inline int report(const cuda::Status& st, char* msg, int msglen) {
  if (st.ok()) return 0;
  snprintf(msg, msglen, "%s: %s", st.where, st.message ? st.message : "cuda error");
  return int(st.code) == 0 ? -1 : int(st.code);
}

// launch(tag, map, p, workspace, bytes) through for_launch for the dtype code dt, on a
// workspace of workspace_bytes(p, dtype) (+ 1, so that it is never empty) poisoned with 0xFF
// bytes (NaN in every float type: a kernel that reads what it did not write shows up); its
// Status reported into msg. `launch` is EMU_LAUNCHER(name) below.
template <typename Params, typename WorkspaceBytes, typename Launch>
int launch_with_workspace(int dt, const Params& p, WorkspaceBytes workspace_bytes, char* msg,
                          int msglen, const Launch& launch) {
  const cuda::DType d = cuda::DType(dt);
  std::vector<unsigned char> ws(workspace_bytes(p, d) + 1, 0xFF);
  const cuda::Status st = for_launch(
      d, [&](auto tag, auto map) { return launch(tag, map, p, ws.data(), ws.size()); });
  return report(st, msg, msglen);
}

// The launcher template NAME (csq_launch.h, csq_direct_launch.h: NAME<DT, Map>(p, workspace,
// bytes, stream)) as launch_with_workspace's `launch`. A macro: a function template cannot be
// passed to another template by its name.
#define EMU_LAUNCHER(NAME)                                                           \
  [](auto tag, auto map, const auto& params, void* workspace, size_t bytes) {        \
    return NAME<decltype(tag)::value, decltype(map)>(params, workspace, bytes, nullptr); \
  }

}  // namespace csq
