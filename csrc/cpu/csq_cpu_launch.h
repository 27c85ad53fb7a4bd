// The interface between the CPU host file (csq_ops_cpu.cpp: the shared entries' run
// functions, dtype dispatch, TORCH_LIBRARY_IMPL) and the CPU kernels (csq_*_kernel.cpp), the
// mirror of csrc/cuda/csq_launch.h. The caller passes the params that prepare_* filled
// (outputs allocated, zeroed where the contract says so) and the input dtype scalar_t (double,
// float, at::Half, at::BFloat16); each launcher runs the whole op on the ATen thread pool and
// returns when done. Map: the feature map (csq_feature_maps.h; the ops pass StateMap).
#pragma once

#include <type_traits>

#include "../csq_direct_params.h"
#include "../csq_feature_maps.h"
#include "../csq_params.h"

namespace csq {
namespace cpu {

// The launchers, one per op family: name and params. Each is declared here as
//   template <typename scalar_t, typename Map> void NAME(const PARAMS& p);
// and defined and instantiated (CSQ_CPU_INSTANTIATE) in its kernel file.
#define CSQ_CPU_LAUNCHERS(X)            \
  X(launch_fwd, FwdParams)              \
  X(launch_bwd, BwdParams)              \
  X(launch_decode, DecodeParams)        \
  X(launch_direct_fwd, DirectFwdParams) \
  X(launch_direct_bwd, DirectBwdParams) \
  X(launch_state, StateParams)          \
  X(launch_state_bwd, StateBwdParams)

#define CSQ_CPU_DECLARE_LAUNCHER(NAME, PARAMS) \
  template <typename scalar_t, typename Map>   \
  void NAME(const PARAMS& p);
CSQ_CPU_LAUNCHERS(CSQ_CPU_DECLARE_LAUNCHER)
#undef CSQ_CPU_DECLARE_LAUNCHER

// Accumulation type of an input type: double for double, float for the rest.
template <typename scalar_t>
using acc_type_of = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

}  // namespace cpu
}  // namespace csq

// Instantiates launcher NAME for the four input dtypes and StateMap (in the kernel file that
// defines it). A test build that includes the kernel files for another map defines it first.
#ifndef CSQ_CPU_INSTANTIATE
#define CSQ_CPU_INSTANTIATE(NAME, PARAMS)                  \
  template void NAME<double, StateMap>(const PARAMS&);     \
  template void NAME<float, StateMap>(const PARAMS&);      \
  template void NAME<c10::Half, StateMap>(const PARAMS&);  \
  template void NAME<c10::BFloat16, StateMap>(const PARAMS&)
#endif
