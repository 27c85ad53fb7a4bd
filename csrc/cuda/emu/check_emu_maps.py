"""The feature-map seam in the CUDA kernels: the tests' second map (LinearMap, w = s;
csrc/testing/csq_linear_map.h), plugged in through the policy (csrc/csq_feature_map.h) and
instantiated in the emulator only (CSQ_TEST_FEATURE_MAPS), runs the chunked forward and backward,
a carried state, the decode step and the direct path against its own float64 reference
(csq_ext/reference.py's weighted_attention_reference with the mirror's weight,
csq_ext/feature_map.py). tests/test_feature_map.py does the same with the CPU kernels.

Used by check_emu.py (its lines start with "map linear"); alone:
    python check_emu_maps.py LIB
"""
import ctypes
import os
import runpy
import sys

import torch

from check_emu_direct import emu_direct_bwd, emu_direct_fwd
from emu_common import ROOT, Emu, ptr, rel, report

_mirror = runpy.run_path(os.path.join(ROOT, "csq_ext", "feature_map.py"))
LINEAR = _mirror["LinearMap"]()
_weighted = runpy.run_path(os.path.join(ROOT, "csq_ext", "reference.py"))[
    "weighted_attention_reference"]
TOL = 1e-10  # float64, the only dtype the test map is built for
SCALE, EPS = 0.4, 1e-6


def _inputs(g, B, Hq, Hk, N, D, Dv):
    q = torch.randn(B, Hq, N, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hk, N, D, generator=g, dtype=torch.float64) + 2.0
    v = torch.randn(B, Hk, N, Dv, generator=g, dtype=torch.float64)
    shift = 3.0 + torch.rand(Hq, generator=g, dtype=torch.float64)
    return q, k, v, shift


def _reference(q, k, v, shift, **kw):
    return _weighted(LINEAR.weight, q, k, v, shift=shift, scale=SCALE, eps=EPS, **kw)


def check_forward_backward(emu, causal, center, normalize, seed):
    """The chunked kernels and the direct path's, y and every gradient."""
    g = torch.Generator().manual_seed(seed)
    q, k, v, shift = _inputs(g, 1, 4, 2, 130, 6, 5)
    dy = torch.randn(1, 4, 130, 5, generator=g, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, shift)]
    want = _reference(*leaves, causal=causal, center=center, normalize=normalize)
    grads = torch.autograd.grad(want, leaves, dy)
    opts = (causal, SCALE, center, normalize, EPS)
    with emu.feature_map(1):
        y, b, den = emu.fwd(q, k, v, shift, *opts)
        got = emu.bwd(dy, q, k, v, shift, y, b, den, *opts)
        yd, bd, dend = emu_direct_fwd(emu.lib, q, k, v, shift, None, opts, tensor_cores=0)
        gotd = emu_direct_bwd(emu.lib, dy, q, k, v, shift, None, yd, bd, dend, opts,
                              tensor_cores=0)
    errs = {"y": rel(y, want), "y direct": rel(yd, want)}
    for n, a, ad, r in zip(("dq", "dk", "dv", "dshift"), got, gotd, grads):
        errs[n] = rel(a, r)
        errs[n + " direct"] = rel(ad, r)
    name = (f"map linear float64 N130 causal={int(causal)} center={int(center)} "
            f"norm={int(normalize)} (chunked and direct)")
    return report(name, errs, TOL)


def check_state_and_decode(emu, seed):
    """A prefix's state (return_state), the next piece from it, then decode steps: the whole
    sequence's reference; the state is the mirror's sum of psi(k - ref) [v, 1]."""
    g = torch.Generator().manual_seed(seed)
    B, Hq, Hk, N, D, Dv, n0, n1 = 2, 4, 2, 100, 5, 3, 70, 97
    q, k, v, shift = _inputs(g, B, Hq, Hk, N, D, Dv)
    want = _reference(q, k, v, shift)
    F = LINEAR.num_features(D)
    nan = float("nan")
    null = ctypes.c_void_p(None)
    sums = [torch.full((B, Hk, F, Dv + 1), nan, dtype=torch.float64) for _ in range(2)]
    refs = [torch.full((B, Hk, D), nan, dtype=torch.float64) for _ in range(2)]
    errs = {}
    try:
        with emu.feature_map(1):
            for i, (a, b_) in enumerate(((0, n0), (n0, n1))):
                qi, ki, vi = (t[:, :, a:b_].contiguous() for t in (q, k, v))
                st_in, ref_in = (null, null) if i == 0 else (ptr(sums[0]), ptr(refs[0]))
                emu.lib.emu_set_state(st_in, ref_in, ptr(sums[i]), ptr(refs[i]), null, null,
                                      null)
                y, _, _ = emu.fwd(qi, ki, vi, shift, True, SCALE, True, True, EPS)
                errs[f"y piece {i}"] = rel(y, want[:, :, a:b_])
            emu.lib.emu_set_state(null, null, null, null, null, null, null)
            ke = torch.cat([k[:, :, :n1] - refs[1][:, :, None],
                            torch.ones(B, Hk, n1, 1, dtype=torch.float64)], -1)
            va = torch.cat([v[:, :, :n1], torch.ones(B, Hk, n1, 1, dtype=torch.float64)], -1)
            errs["state"] = rel(sums[1], LINEAR.features(ke, query=False).mT @ va)
            st, ref = sums[1].clone(), refs[1].clone()
            for j in range(n1, N):
                y = emu.decode(q[:, :, j:j + 1], k[:, :, j:j + 1], v[:, :, j:j + 1], shift, st,
                               ref, SCALE, True, True, EPS)
                errs[f"decode {j}"] = rel(y, want[:, :, j:j + 1])
    finally:
        emu.lib.emu_set_state(null, null, null, null, null, null, null)
    return report("map linear float64 state and decode (prefix 70, piece 27, 3 steps)", errs, TOL)


def check_refused(emu):
    """The test map exists for float64 only: another dtype is refused with a message."""
    q = torch.randn(1, 1, 3, 4, dtype=torch.float32)
    with emu.feature_map(1):
        rc, msg = emu.fwd(q, q, q, torch.ones(1), True, SCALE, True, True, EPS, refusal=True)
    good = rc != 0 and "float64" in msg
    print(("ok   " if good else "FAIL ") + f"map linear float32 refused: {msg!r}", flush=True)
    return good


def run(lib):
    emu = Emu(lib)
    ok = True
    for i, flags in enumerate(((True, True, True), (False, True, True), (True, False, False))):
        ok &= check_forward_backward(emu, *flags, seed=900 + i)
    ok &= check_state_and_decode(emu, seed=950)
    ok &= check_refused(emu)
    return ok


if __name__ == "__main__":
    good = run(ctypes.CDLL(sys.argv[1] if len(sys.argv) > 1 else "/tmp/csqemu/libcsqemu.so"))
    print("ALL OK" if good else "SOME FAILED")
    sys.exit(0 if good else 1)
