// The feature maps the kernels are built for (the policy: csq_feature_map.h). StateMap is the
// map of every op that ships, hence of CSQState's layout (csq_ext/state.py). The tests' maps
// (csrc/testing/) are compiled only into the test builds, which define CSQ_TEST_FEATURE_MAPS:
// the CUDA emulator (csrc/cuda/emu) and tests/test_feature_map.py's harness
// (csrc/testing/csq_test_maps.cpp). A new map: its header, and its line here.
#pragma once

#include "csq_feature_map.h"

namespace csq {

using StateMap = SquareMap;

}  // namespace csq

#ifdef CSQ_TEST_FEATURE_MAPS
#include "testing/csq_linear_map.h"
#endif
