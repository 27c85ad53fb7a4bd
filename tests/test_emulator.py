"""The CUDA kernels, run on the CPU by the emulator of csrc/cuda/emu/, against the float64
reference and the CPU backend: the quick subset of check_emu.py (forward and backward of every
kernel family, several dtypes, strided inputs, carried state, packed batches, the decode step,
non-finite inputs, outlier and sink keys, the tensor-core path, heads up to 256, the direct
path's kernels, the state pool's, and the accuracy table's input classes: key offsets up to
1e6, drifts, outliers, and the backward's causality under NaN / Inf, on both kernel families).
This is the kernels' correctness evidence between GPU runs; the full check
(`python csrc/cuda/emu/check_emu.py LIB`) stays a script.

Needs g++ (every CI machine has it); no GPU, no nvcc."""
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import repository_folder

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to build the "
                                "emulator")
# The emulator checks a checkout's CUDA sources, not an installed package: CI's installed-wheel
# stage runs the tests from a copy without csrc/ (the README's test command runs this file).
EMU = repository_folder("csrc", "cuda", "emu")


@pytest.fixture(scope="module")
def emulator_library(tmp_path_factory):
    out = tmp_path_factory.mktemp("csqemu")
    subprocess.run([sys.executable, os.path.join(EMU, "build_emu.py"), str(out)], check=True,
                   capture_output=True, text=True)
    lib = out / "libcsqemu.so"
    assert lib.exists()
    return str(lib)


def test_cuda_kernels_in_the_emulator(emulator_library):
    run = subprocess.run([sys.executable, os.path.join(EMU, "check_emu.py"), emulator_library,
                          "quick"], capture_output=True, text=True, timeout=1800)
    report = run.stdout + run.stderr
    assert run.returncode == 0 and "ALL OK" in run.stdout, report[-6000:]
    # Every family of kernels was exercised (a check that silently ran nothing must fail).
    for family in ("decode", "varlen", "state", "tensor", "outlier", "sink", "wide", "direct",
                   "direct row inputs", "map linear", "state op", "pool", "classes direct",
                   "classes chunked", "backward causality"):
        assert family in report.lower(), f"no {family} case ran:\n{report[-3000:]}"
    # Heads of 256 (the limit of the chunked CUDA kernels) ran through the forward and backward,
    # the carried state and the decode step, and larger ones were refused.
    for case in (r"wide \S+ float32 .* Dk256 Dv256 ", r"wide \S+ bfloat16 .* Dk256 ",
                 r"wide \S+ state .* Dk256 ", r"wide \S+ decode .* Dk256 Dv256 ",
                 r"wide \S+ float32 Dk=257 .* refused",
                 # the tests' second feature map (csrc/testing/csq_linear_map.h) through the
                 # chunked and direct kernels, a carried state and the decode step
                 r"map linear float64 N130 causal=1 center=1 norm=1 ",
                 r"map linear float64 N130 causal=0 ", r"map linear float64 state and decode",
                 r"map linear float32 refused"):
        assert re.search(r"^ok +" + case, report, re.M), f"no passing {case!r}:\n{report[-3000:]}"
