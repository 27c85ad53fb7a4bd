"""Gradients as causal as outputs (docs/SPEC.md, section 4, property 6): a NaN or Inf in q, k
or v at position p reaches exactly the gradients that depend on it, on every path, with and
without a carried state, with packed sequences, causal or not.

With loss <dy, y> (dy dense):
* a non-finite k_p or v_p reaches the outputs y_i and dq_i of the rows i >= p that see it;
  rows before p keep their values (and every key gradient may be reached through those rows);
* a non-finite q_p reaches y_p, dq_p and the gradients of the keys and values p sees (j <= p,
  and all of them through the key means); the keys after p keep theirs, and so does every
  other query row;
* packed sequences: nothing reaches another sequence, causal or not.

"Keep their values" is checked against the same call with a finite number at p (the values
do not depend on it), not merely for finiteness."""
import pytest
import torch

import csq_ext
from conftest import poisoned_memory, randn, rel_err

B, HQ, HK, N, D = 1, 4, 2, 150, 8
CU = torch.tensor([0, 61, 150])  # two packed sequences; the second starts inside a tile
# float32 values that do not depend on position p, computed with and without a non-finite
# number there: the same products, summed in another order where a masked GEMM is skipped.
TOL = 1e-5


def _grads(q, k, v, dy, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    with poisoned_memory(q.device):
        y = csq_ext.attention(*leaves, **kw)
        grads = torch.autograd.grad(y, leaves, dy)
    return (y.detach(),) + grads


def _inputs(gen, device, batch=B):
    q, k, v = (randn(gen, batch, h, N, D, dtype=torch.float32, device=device)
               for h in (HQ, HK, HK))
    dy = randn(gen, batch, HQ, N, D, dtype=torch.float32, device=device)
    return q, k, v, dy


def _state(gen, device, S):
    pre = [randn(gen, S, h, 9, D, dtype=torch.float32, device=device) for h in (HQ, HK, HK)]
    return csq_ext.attention(*pre, return_state=True)[1]


def _same(what, got, want):
    assert torch.isfinite(got).all(), f"{what}: a non-finite value reached it"
    err = rel_err(got, want)
    assert err <= TOL, f"{what}: relative error {err:.2e} against the finite run"


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("pos", [3, 70, 149])
@pytest.mark.parametrize("chunk", [None, 16])
@pytest.mark.parametrize("start", ["none", "state"])
@pytest.mark.parametrize("path", ["direct", "chunked"])
def test_nonfinite_reaches_only_what_sees_it(gen, device, path, start, chunk, pos, where,
                                             value):
    q, k, v, dy = _inputs(gen, device)
    kw = dict(path=path, tile_size=chunk)
    if start == "state":
        kw["initial_state"] = _state(gen, device, B)
    clean = _grads(q, k, v, dy, **kw)
    bad_in = {"q": q.clone(), "k": k.clone(), "v": v.clone()}
    bad_in[where][:, :, pos] = value
    y, dq, dk, dv = _grads(bad_in["q"], bad_in["k"], bad_in["v"], dy, **kw)
    _same("y before p", y[:, :, :pos], clean[0][:, :, :pos])
    assert not torch.isfinite(y[:, :, pos]).all(), "the row at p must see it"
    if where in "kv":
        _same("dq before p", dq[:, :, :pos], clean[1][:, :, :pos])
    else:
        _same("dq of the other rows", torch.cat([dq[:, :, :pos], dq[:, :, pos + 1:]], 2),
              torch.cat([clean[1][:, :, :pos], clean[1][:, :, pos + 1:]], 2))
        _same("dk after p", dk[:, :, pos + 1:], clean[2][:, :, pos + 1:])
        _same("dv after p", dv[:, :, pos + 1:], clean[3][:, :, pos + 1:])
        _same("y after p", y[:, :, pos + 1:], clean[0][:, :, pos + 1:])


@pytest.mark.parametrize("seq", [0, 1])
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("causal,start", [(True, "none"), (True, "state"), (False, "none")],
                         ids=["causal", "causal-state", "full"])
@pytest.mark.parametrize("path", ["direct", "chunked"])
def test_nonfinite_stays_in_its_packed_sequence(gen, device, path, causal, start, where, seq):
    q, k, v, dy = _inputs(gen, device)
    cu = CU.to(device)
    kw = dict(path=path, causal=causal, cu_seqlens=cu, tile_size=16)
    if start == "state":
        kw["initial_state"] = _state(gen, device, 2)
    clean = _grads(q, k, v, dy, **kw)
    lo, hi = int(CU[seq]), int(CU[seq + 1])
    bad_in = {"q": q.clone(), "k": k.clone(), "v": v.clone()}
    bad_in[where][:, :, (lo + hi) // 2] = float("nan")
    got = _grads(bad_in["q"], bad_in["k"], bad_in["v"], dy, **kw)
    other = slice(0, lo) if seq == 1 else slice(hi, N)
    for name, a, b in zip(("y", "dq", "dk", "dv"), got, clean):
        _same(f"{name} of the other sequence", a[:, :, other], b[:, :, other])


@pytest.mark.parametrize("path", ["direct", "chunked"])
def test_unused_returned_state_passes_nothing_to_the_ref_keys(gen, device, path):
    """A returned state's ref is picked from the first keys. When the loss uses y alone, a
    NaN query at p must not reach the gradients of the keys after p through that ref (the
    chunked path's backward took the unused state's gradient as zeros and passed its ref
    gradient, NaN, to the first 64 keys)."""
    q, k, v, dy = _inputs(gen, device)

    def grads(q):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        with poisoned_memory(device):
            y, _ = csq_ext.attention(*leaves, path=path, return_state=True)
            return torch.autograd.grad(y, leaves, dy)

    clean = grads(q)
    bad = q.clone()
    bad[:, :, 3] = float("nan")
    got = grads(bad)
    _same("dk after p", got[1][:, :, 4:], clean[1][:, :, 4:])
    _same("dv after p", got[2][:, :, 4:], clean[2][:, :, 4:])
