"""The CMake-built operator library (CMakeLists.txt) loads with torch.ops.load_library and
computes the same CSQ attention; built with CUDA, it registers a CUDA kernel for every operator.
.ci/run builds it (CPU, and with CUDA by .ci/cmake_cuda.sh) and points CSQ_CMAKE_LIB at it.

It runs in a fresh interpreter: the Python package registers the same operator names, and a
library cannot be loaded twice into one process."""
import importlib.util
import os
import subprocess
import sys

import pytest

LIB = os.environ.get("CSQ_CMAKE_LIB")
# The float64 oracle's file, found without importing csq_ext: .ci/cmake_cuda.sh runs this test
# under the CUDA build's torch, for which the checkout's csq_ext/_C (built for the tests' torch)
# does not load.
REFERENCE = os.path.join(os.path.dirname(importlib.util.find_spec("csq_ext").origin),
                         "reference.py")

CHECK = r"""
import runpy, sys, torch
torch.ops.load_library(sys.argv[1])
ref = runpy.run_path(sys.argv[2])["csq_attention_reference"]
g = torch.Generator().manual_seed(0)
q = torch.randn(2, 4, 23, 8, generator=g, dtype=torch.float64)
k = torch.randn(2, 2, 23, 8, generator=g, dtype=torch.float64)
v = torch.randn(2, 2, 23, 5, generator=g, dtype=torch.float64)
shift = torch.randn(4, generator=g, dtype=torch.float64)
y, b, den, _, _ = torch.ops.csq_ext.csq_chunked_fwd(q, k, v, shift, None, None, None, True, 8 ** -0.5,
                                            True, True, 1e-6, 4, False)
yr = ref(q, k, v, shift=shift)
err = ((y - yr).norm() / yr.norm()).item()
assert err < 1e-10, err
# A library built with CUDA must have registered a CUDA kernel for every operator.
if "cuda" in torch.ops.csq_ext.build_info():
    for op in ("csq_chunked_fwd", "csq_chunked_bwd", "csq_decode_", "csq_direct_fwd", "csq_direct_bwd",
               "csq_state", "csq_state_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"csq_ext::{op}", "CUDA"), op
print("cmake library ok", err, torch.ops.csq_ext.build_info())
"""


@pytest.mark.skipif(not LIB, reason="set CSQ_CMAKE_LIB to the CMake-built libcsq_ext_ops.so")
def test_cmake_library_matches_reference():
    out = subprocess.run(
        [sys.executable, "-c", CHECK, LIB, REFERENCE],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "cmake library ok" in out.stdout
