"""The host layer's contract (csrc/csq_host.h), the same for every backend: the state's row
count is Python's num_features; the shift gradient is db summed over batch entries and
positions, also with packed sequences; dref is written for every (sequence, key/value head),
with or without a carried state; dstate_in is empty without one. Each check runs on every
device of DEVICES, and the two backends are compared where a GPU is present."""
from __future__ import annotations

import pytest
import torch

from csq_ext._ops import ops
from csq_ext.state import CSQState, num_features, num_pairs

from conftest import DEVICES, randn

OPTS = dict(causal=True, scale=0.7, center=True, normalize=True, eps=1e-6)


def _inputs(gen, B, Hq, Hk, N, Dk, Dv, device, dtype=torch.float64):
    q = randn(gen, B, Hq, N, Dk, dtype=dtype, device=device)
    k = randn(gen, B, Hk, N, Dk, dtype=dtype, device=device)
    v = randn(gen, B, Hk, N, Dv, dtype=dtype, device=device)
    shift = randn(gen, Hq, dtype=dtype, device=device)
    return q, k, v, shift


def _fwd(q, k, v, shift, cu=None, state=None, return_state=True, **kw):
    o = {**OPTS, **kw}
    return ops.csq_chunked_fwd(q, k, v, shift, cu, None if state is None else state[0],
                       None if state is None else state[1], o["causal"], o["scale"], o["center"],
                       o["normalize"], o["eps"], 0, return_state)


def _bwd(dy, q, k, v, shift, fwd, cu=None, state=None, dstate_out=None, **kw):
    o = {**OPTS, **kw}
    y, b, den, _, ref = fwd
    # ref_given: dref is the gradient of the forward's ref through k - ref and b, whether the
    # forward picked it or was given it.
    return ops.csq_chunked_bwd(dy, q, k, v, shift, cu, None if state is None else state[0], ref,
                               y, b, den, dstate_out, None, True, o["causal"], o["scale"],
                               o["center"], o["normalize"], o["eps"], 0)


@pytest.mark.parametrize("Dk", [1, 3, 16, 33])
def test_num_features_is_the_state_row_count(gen, device, Dk):
    """Python's num_features (csq_ext/state.py) and the C++ one (csrc/csq_feature_map.h) agree:
    the op's returned state, CSQState.empty and the fake kernel have the same shape."""
    B, Hq, Hk, N, Dv = 2, 2, 1, 5, 3
    q, k, v, shift = _inputs(gen, B, Hq, Hk, N, Dk, Dv, device)
    state_out = _fwd(q, k, v, shift)[3]
    assert state_out.shape == (B, Hk, num_features(Dk), Dv + 1)
    assert num_features(Dk) == num_pairs(Dk) + Dk + 1 == (Dk + 1) * (Dk + 2) // 2
    assert CSQState.empty(B, Hk, Dk, Dv, dtype=torch.float64).sums.shape == state_out.shape
    with torch.device("meta"):
        fake = _fwd(*(t.to("meta") for t in (q, k, v, shift)))[3]
    assert fake.shape == state_out.shape
    # The linear rows' last column is the key sum (relative to ref), the constant row's the count.
    ref = _fwd(q, k, v, shift)[4]
    lin = state_out[:, :, num_pairs(Dk):num_pairs(Dk) + Dk, -1]
    torch.testing.assert_close(lin, (k - ref.unsqueeze(2)).sum(2), rtol=1e-12, atol=1e-12)
    assert torch.equal(state_out[:, :, -1, -1], torch.full((B, Hk), float(N), dtype=q.dtype,
                                                           device=device))


def test_shift_gradient_is_the_sum_over_sequences(gen, device):
    """dshift is (Hq,), in shift's dtype, and a packed call's is the sum of the per-segment
    calls' (the CPU once kept it per sequence, CUDA per batch entry)."""
    Hq, Hk, Dk, Dv, lens = 4, 2, 3, 2, [5, 0, 70, 1]
    T = sum(lens)
    q, k, v, _ = _inputs(gen, 1, Hq, Hk, T, Dk, Dv, device)
    shift = randn(gen, Hq, dtype=torch.float32, device=device)  # another dtype than q
    dy = randn(gen, 1, Hq, T, Dv, device=device)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=device)
    packed = _bwd(dy, q, k, v, shift, _fwd(q, k, v, shift, cu), cu)
    assert packed[3].shape == (Hq,) and packed[3].dtype == shift.dtype
    total = torch.zeros(Hq, dtype=torch.float64, device=device)
    dq_parts = []
    for s in range(len(lens)):
        sl = slice(int(cu[s]), int(cu[s + 1]))
        args = [t[:, :, sl].contiguous() for t in (q, k, v)]
        one = _bwd(dy[:, :, sl].contiguous(), *args, shift, _fwd(*args, shift))
        total += one[3].double()
        dq_parts.append(one[0])
    torch.testing.assert_close(packed[3].double(), total, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[0], torch.cat(dq_parts, 2), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("carried", [False, True])
def test_dref_always_written(gen, device, carried):
    """dref (S, Hk, Dk) is the gradient of the state's ref, with or without a carried state:
    checked against a finite difference of a loss on the returned state."""
    B, Hq, Hk, N, Dk, Dv = 2, 2, 1, 6, 3, 2
    q, k, v, shift = _inputs(gen, B, Hq, Hk, N, Dk, Dv, device)
    state = None
    if carried:
        k0, v0 = randn(gen, B, Hk, 4, Dk, device=device), randn(gen, B, Hk, 4, Dv, device=device)
        pre = _fwd(randn(gen, B, Hq, 4, Dk, device=device), k0, v0, shift)
        state = (pre[3], pre[4])
    fwd = _fwd(q, k, v, shift, state=state)
    dstate_out = randn(gen, *fwd[3].shape, device=device)
    dy = torch.zeros(B, Hq, N, Dv, dtype=q.dtype, device=device)
    grads = _bwd(dy, q, k, v, shift, fwd, state=state, dstate_out=dstate_out)
    dstate_in, dref = grads[4], grads[5]
    assert dref.shape == (B, Hk, Dk)
    assert dstate_in.shape == (fwd[3].shape if carried else (0,))
    if carried:  # ref is an input: the returned sums move with it through k - ref
        def loss(r):
            return (_fwd(q, k, v, shift, state=(state[0], r))[3] * dstate_out).sum()
        base = state[1]
    else:  # ref is picked from the keys; the returned sums still depend on it through k - ref
        assert torch.isfinite(dref).all() and dref.abs().sum() > 0
        return
    eps = 1e-6
    fd = torch.zeros_like(base)
    for idx in range(base.numel()):
        e = torch.zeros_like(base).view(-1)
        e[idx] = eps
        e = e.view_as(base)
        fd.view(-1)[idx] = (loss(base + e) - loss(base - e)) / (2 * eps)
    torch.testing.assert_close(dref, fd, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif("cuda" not in DEVICES, reason="compares the CPU and CUDA backends")
@pytest.mark.parametrize("carried", [False, True])
def test_backends_share_the_backward_contract(gen, carried):
    """The same dshift and dref from both backends, packed sequences included."""
    Hq, Hk, Dk, Dv, lens = 2, 1, 4, 3, [3, 66, 0, 9]
    T = sum(lens)
    q, k, v, shift = _inputs(gen, 1, Hq, Hk, T, Dk, Dv, "cpu")
    dy = randn(gen, 1, Hq, T, Dv)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int64)
    S = len(lens)
    state = None
    if carried:
        state = CSQState(randn(gen, S, Hk, num_features(Dk), Dv + 1).abs(), randn(gen, S, Hk, Dk))
    out = {}
    for dev in ("cpu", "cuda"):
        t = [x.to(dev) for x in (q, k, v, shift, dy, cu)]
        st = None if state is None else tuple(x.to(dev) for x in state)
        fwd = _fwd(*t[:4], t[5], st)
        out[dev] = [g.cpu() for g in _bwd(t[4], *t[:4], fwd, t[5], st, fwd[3])]
    for i in (3, 5) + ((4,) if carried else ()):
        torch.testing.assert_close(out["cuda"][i], out["cpu"][i], rtol=1e-9, atol=1e-9)
