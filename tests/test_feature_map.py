"""One feature-map policy (csrc/csq_feature_map.h) and its Python mirror (csq_ext/feature_map.py).

* The mirror against the C++ table the operator exposes (torch.ops.csq_ext.feature_map_rows),
  and against the states the kernels actually build.
* The seam: a second map (LinearMap, csrc/testing/csq_linear_map.h: w = s) plugged in through
  the policy runs the CPU kernels of every op (chunked forward and backward, carried state,
  decode step, direct forward and backward; built here by csrc/testing/csq_test_maps.cpp)
  against its own float64 reference. tests/test_emulator.py runs it through the CUDA kernels.
"""
import os

import pytest
import torch

import csq_ext
from conftest import randn, repository_folder
from csq_ext.feature_map import MAPS, SQUARE, LinearMap
from csq_ext.reference import weighted_attention_reference
from csq_ext.state import num_features

LINEAR = LinearMap()


@pytest.mark.parametrize("d", [1, 2, 3, 7, 16, 65])
def test_mirror_rows_are_the_cpp_rows(d):
    rows = torch.ops.csq_ext.feature_map_rows(d)
    assert torch.equal(rows, SQUARE.table(d))
    assert rows.shape[0] == num_features(d) == SQUARE.num_features(d)
    # The key sums and count that centering reads, where CSQState says they are.
    assert SQUARE.count_row(d) == num_features(d) - 1
    assert [SQUARE.key_sum_row(x, d) for x in range(d)] == list(range(d * (d + 1) // 2,
                                                                     d * (d + 1) // 2 + d))


@pytest.mark.parametrize("fmap", list(MAPS.values()), ids=list(MAPS))
def test_mirror_features_give_the_weight(gen, fmap):
    """phi(qe) . psi(ke) = weight(<qe, ke>) for the mirror's feature vectors."""
    d = 5
    qe, ke = randn(gen, 40, d + 1, dtype=torch.float64), randn(gen, 40, d + 1, dtype=torch.float64)
    ke[:, d] = 1.0
    got = (fmap.features(qe, query=True) * fmap.features(ke, query=False)).sum(-1)
    want = fmap.weight((qe * ke).sum(-1))
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path", ["chunked", "direct"])
def test_mirror_features_are_the_kernels_state(gen, path):
    """The state the kernels return is sum_j psi(k_j - ref) [v_j, 1] with the mirror's psi."""
    q, k, v = (randn(gen, 1, h, 37, dd, dtype=torch.float64) for h, dd in ((2, 6), (1, 6), (1, 3)))
    _, st = csq_ext.attention(q, k, v, return_state=True, path=path, tile_size=16)
    ke = torch.cat([k[0, 0] - st.ref[0, 0], torch.ones(37, 1, dtype=torch.float64)], -1)
    want = SQUARE.features(ke, query=False).T @ torch.cat([v[0, 0], torch.ones(37, 1,
                                                           dtype=torch.float64)], -1)
    assert torch.allclose(st.sums[0, 0], want, rtol=1e-12, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# The second map, end to end on the CPU kernels
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The CPU kernels built again with the toy map, from the repository's sources: skipped, with
    the reason, where the tests run against an installed wheel without csrc/ (CI's installed
    stage; the README's test command runs them)."""
    from torch.utils import cpp_extension
    csrc = repository_folder("csrc")
    build = tmp_path_factory.mktemp("csq_test_maps")
    return cpp_extension.load(
        name="csq_test_maps", build_directory=str(build), verbose=False,
        sources=[os.path.join(csrc, p) for p in ("testing/csq_test_maps.cpp",
                                                  "csq_host.cpp", "csq_direct_host.cpp")],
        extra_cflags=["-O1", "-std=c++17", "-fopenmp"], extra_ldflags=["-fopenmp"])


OPTS = dict(scale=0.4, eps=1e-6)


def _inputs(gen, B, Hq, Hk, N, D, Dv):
    q = randn(gen, B, Hq, N, D, dtype=torch.float64)
    k = randn(gen, B, Hk, N, D, dtype=torch.float64) + 2.0  # an offset: ref and centering
    v = randn(gen, B, Hk, N, Dv, dtype=torch.float64)
    shift = 3.0 + torch.rand(Hq, generator=gen, dtype=torch.float64)  # weights s > 0 mostly
    return q, k, v, shift


def _reference(q, k, v, shift, **kw):
    return weighted_attention_reference(LINEAR.weight, q, k, v, shift=shift, **OPTS, **kw)


def test_toy_rows(toy):
    for d in (1, 4, 9):
        assert torch.equal(toy.feature_map_rows(d), LINEAR.table(d))


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("causal,center,normalize", [(True, True, True), (False, True, True),
                                                     (True, False, True), (True, True, False)])
@pytest.mark.parametrize("path", ["chunked", "direct"])
def test_toy_forward_and_backward(gen, toy, path, causal, center, normalize):
    q, k, v, shift = _inputs(gen, 2, 4, 2, 45, 6, 5)
    dy = randn(gen, 2, 4, 45, 5, dtype=torch.float64)
    opts = dict(causal=causal, center=center, normalize=normalize)
    args = (OPTS["scale"], center, normalize, OPTS["eps"], 8)
    if path == "chunked":
        y, b, den, _, ref = toy.chunked_fwd(q, k, v, shift, None, None, None, causal, *args,
                                            False)
        dq, dk, dv, dshift, _, _ = toy.chunked_bwd(dy, q, k, v, shift, None, None, ref, y, b, den,
                                                    None, None, False, causal, *args)
    else:
        y, b, den, _, ref = toy.direct_fwd(q, k, v, shift, None, None, None, causal, *args,
                                           False)
        dq, dk, dv, dshift, _, _ = toy.direct_bwd(dy, q, k, v, shift, None, None, ref, y, b, den,
                                                  None, None, False, causal, *args)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, shift)]
    want = _reference(*leaves, **opts)
    grads = torch.autograd.grad(want, leaves, dy)
    assert _rel(y, want) < 1e-10
    for name, got, ref in zip(("dq", "dk", "dv", "dshift"), (dq, dk, dv, dshift), grads):
        assert _rel(got, ref) < 1e-9, name
    # The map made the difference: CSQ's squares give another result on the same inputs.
    csq = weighted_attention_reference(SQUARE.weight, q, k, v, shift=shift, **OPTS, **opts)
    assert _rel(y, csq) > 1e-2


def test_toy_carried_state_and_decode(gen, toy):
    """A prefix's state (chunked, return_state), the rest continued from it by the chunked
    kernels and then one token at a time by the decode step: the whole sequence's reference."""
    B, Hq, Hk, N, D, Dv, n0, n1 = 2, 4, 2, 50, 5, 3, 21, 44
    q, k, v, shift = _inputs(gen, B, Hq, Hk, N, D, Dv)
    want = _reference(q, k, v, shift)
    args = (True, OPTS["scale"], True, True, OPTS["eps"], 8)
    _, _, _, sums, ref = toy.chunked_fwd(q[:, :, :n0], k[:, :, :n0], v[:, :, :n0], shift, None,
                                         None, None, *args, True)
    assert sums.shape == (B, Hk, LINEAR.num_features(D), Dv + 1)
    y1, _, _, sums, ref = toy.chunked_fwd(q[:, :, n0:n1], k[:, :, n0:n1], v[:, :, n0:n1], shift,
                                          None, sums, ref, *args, True)
    assert _rel(y1, want[:, :, n0:n1]) < 1e-10
    # The state is the mirror's: sum_j psi(k_j - ref) [v_j, 1] over every key so far.
    ke = torch.cat([k[:, :, :n1] - ref[:, :, None], torch.ones(B, Hk, n1, 1,
                                                               dtype=torch.float64)], -1)
    va = torch.cat([v[:, :, :n1], torch.ones(B, Hk, n1, 1, dtype=torch.float64)], -1)
    assert _rel(sums, LINEAR.features(ke, query=False).transpose(-1, -2) @ va) < 1e-12
    y = torch.empty(B, Hq, 1, Dv, dtype=torch.float64)
    for i in range(n1, N):
        toy.decode_(sums, ref, q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], shift, y,
                    OPTS["scale"], True, True, OPTS["eps"])
        assert _rel(y, want[:, :, i:i + 1]) < 1e-10, i
