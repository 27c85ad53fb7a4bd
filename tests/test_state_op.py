"""The state-only operator csq_state / csq_state_bwd (the state of a call's keys and values, no
queries, no outputs: what context parallelism and a serving prefill need), and the carried
state as the ops compute it: one rule for the ref (csrc/csq_params.h), whose picked value's
gradient reaches the keys it was picked from."""
import pytest
import torch

import csq_ext
from conftest import assert_rel_close, randn
from csq_ext import CSQState
from csq_ext._ops import ops
from csq_ext.feature_map import SQUARE

F64 = torch.float64


def _kv(gen, B, Hk, N, Dk, Dv, offset=2.0, dtype=F64):
    return ((randn(gen, B, Hk, N, Dk) + offset).to(dtype), randn(gen, B, Hk, N, Dv, dtype=dtype))


@pytest.mark.parametrize("packed", [False, True], ids=["batch", "packed"])
@pytest.mark.parametrize("carried", [False, True], ids=["fresh", "carried"])
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=str)
def test_state_op_is_attentions_returned_state(gen, packed, carried, dtype):
    """csq_state gives the state (sums and ref) that attention returns on either path."""
    B, Hq, Hk, N, Dk, Dv = (1, 4, 2, 61, 5, 3) if packed else (2, 4, 2, 61, 5, 3)
    cu = torch.tensor([0, 20, 20, 61]) if packed else None
    S = 3 if packed else B
    q = randn(gen, B, Hq, N, Dk, dtype=dtype)
    k, v = _kv(gen, B, Hk, N, Dk, Dv, dtype=dtype)
    st = None
    if carried:
        kp, vp = _kv(gen, S, Hk, 17, Dk, Dv, dtype=dtype)
        _, st = csq_ext.attention(randn(gen, S, Hq, 17, Dk, dtype=dtype), kp, vp,
                                  return_state=True)
    sums, ref = ops.csq_state(k, v, cu, None if st is None else st.sums,
                              None if st is None else st.ref, 0)
    tol = 1e-12 if dtype == F64 else 1e-5
    for path in ("chunked", "direct"):
        _, want = csq_ext.attention(q, k, v, cu_seqlens=cu, initial_state=st, return_state=True,
                                    path=path)
        assert torch.equal(ref, want.ref)
        assert_rel_close(sums, want.sums, tol, f"sums vs {path}")


def test_a_given_ref_without_a_state_is_kept(gen):
    """ref_in without state_in is kept: the sums are relative to it, equal to the op's own
    (picked) state moved there exactly (the mirror's recenter)."""
    k, v = _kv(gen, 2, 3, 40, 4, 2, offset=5.0)
    own_sums, own_ref = ops.csq_state(k, v, None, None, None, 0)
    target = randn(gen, 2, 3, 4)
    sums, ref = ops.csq_state(k, v, None, None, target, 0)
    assert torch.equal(ref, target)
    assert_rel_close(sums, SQUARE.recenter(own_sums, own_ref - target), 1e-12, "sums")


def test_state_op_gradcheck(gen):
    """Gradients to k, v, state_in and ref_in (a carried state with keys keeps its ref)."""
    k, v = _kv(gen, 1, 2, 9, 3, 2)
    _, st = csq_ext.attention(randn(gen, 1, 2, 6, 3), *_kv(gen, 1, 2, 6, 3, 2),
                              return_state=True)
    args = [t.detach().requires_grad_() for t in (k, v, st.sums, st.ref)]
    assert torch.autograd.gradcheck(lambda *a: ops.csq_state(a[0], a[1], None, a[2], a[3], 4),
                                    args)


def test_picked_ref_gradient_reaches_its_keys(gen):
    """With no carried keys the op picks ref from the sequence's first keys (the lower median
    of each coordinate): a loss on the returned ref reaches exactly those keys, and none of it
    goes to an empty carried state's ref."""
    k, v = _kv(gen, 1, 1, 7, 3, 2)
    k = k.requires_grad_()
    empty = CSQState.empty(1, 1, 3, 2, dtype=F64)
    ref_in = randn(gen, 1, 1, 3).requires_grad_()
    _, ref = ops.csq_state(k, v, None, empty.sums, ref_in, 0)
    w = randn(gen, 1, 1, 3)
    dk, dref_in = torch.autograd.grad((ref * w).sum(), (k, ref_in))
    picked = k[0, 0].median(0).indices
    want = torch.zeros_like(k)
    want[0, 0, picked, torch.arange(3)] = w[0, 0]
    assert torch.equal(dk, want) and torch.equal(dref_in, torch.zeros_like(ref_in))


def test_state_op_opcheck(gen):
    k, v = _kv(gen, 2, 2, 11, 3, 4, dtype=torch.float32)
    _, st = csq_ext.attention(randn(gen, 2, 2, 5, 3, dtype=torch.float32),
                              *_kv(gen, 2, 2, 5, 3, 4, dtype=torch.float32), return_state=True)
    for rg in (False, True):
        kk, vv = (t.detach().requires_grad_(rg) for t in (k, v))
        torch.library.opcheck(ops.csq_state.default, (kk, vv, None, None, None, 4))
        sums, ref = (t.detach().requires_grad_(rg) for t in (st.sums, st.ref))
        torch.library.opcheck(ops.csq_state.default, (kk, vv, None, sums, ref, 0))
    sums, ref = ops.csq_state(k, v, None, st.sums, st.ref, 0)
    torch.library.opcheck(ops.csq_state_bwd.default,
                          (k, v, None, st.sums, ref, torch.randn_like(sums),
                           torch.randn_like(ref), True, 0))


def test_state_op_rejects_bad_input(gen):
    k, v = _kv(gen, 1, 2, 5, 3, 2)
    with pytest.raises(RuntimeError, match="v must have shape"):
        ops.csq_state(k, v[:, :1], None, None, None, 0)
    with pytest.raises(RuntimeError, match="state sums"):
        ops.csq_state(k, v, None, torch.zeros(1, 2, 3, 3, dtype=F64), torch.zeros(1, 2, 3,
                                                                                  dtype=F64), 0)
    with pytest.raises(RuntimeError, match="tile_size"):
        ops.csq_state(k, v, None, None, None, -1)


def test_state_op_double_backward_raises(gen):
    """Gradients of csq_state with create_graph=True can be taken; differentiating them again
    raises (csrc/csq_autograd.cpp), never silent zeros."""
    k, v = (t.requires_grad_() for t in _kv(gen, 1, 2, 9, 3, 2))
    sums, _ = ops.csq_state(k, v, None, None, None, 4)
    (dk,) = torch.autograd.grad(sums.square().sum(), k, create_graph=True)
    assert dk.requires_grad
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(dk.sum(), (k, v), allow_unused=True)
