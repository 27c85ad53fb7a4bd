"""The CPU kernels' float32 products run on the library measured faster on this machine
(csrc/cpu/csq_gemm_choice.cpp), or the one CSQ_CPU_GEMM names; both give CSQ to the spec's
accuracy, and a bad value of the switch is refused by name."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import csq_ext

_CHILD = """
import torch, csq_ext
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 2, 300, 16, generator=g, dtype=torch.float64) for _ in range(3))
ref = csq_ext.csq_attention_reference(q, k, v)
errs = []
for path in ("direct", "chunked"):
    y = csq_ext.attention(q.float(), k.float(), v.float(), path=path).double()
    errs.append(((y - ref).norm() / ref.norm()).item())
print(torch.ops.csq_ext.cpu_gemm_backend())
print(max(errs))
"""


def _run(env_value):
    env = dict(os.environ)
    env.pop("CSQ_CPU_GEMM", None)
    if env_value is not None:
        env["CSQ_CPU_GEMM"] = env_value
    return subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True,
                          env=env)


def test_the_choice_is_reported():
    text = torch.ops.csq_ext.cpu_gemm_backend()
    assert text.split()[0] in ("microkernel", "blas")
    assert "(" in text and text.endswith(")")


@pytest.mark.parametrize("backend", [None, "microkernel", "blas"])
def test_each_backend_computes_csq(backend):
    out = _run(backend)
    assert out.returncode == 0, out.stderr
    report, err = out.stdout.strip().splitlines()[-2:]
    if backend is not None:
        assert report.startswith(backend) and f"CSQ_CPU_GEMM={backend}" in report
    else:
        assert "measured" in report or "no oneDNN" in report
    assert float(err) < 1e-5


def test_a_bad_switch_is_refused_by_name():
    out = _run("fastest")
    assert out.returncode != 0
    assert "CSQ_CPU_GEMM" in out.stderr and "fastest" in out.stderr
