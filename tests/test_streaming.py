"""Carried state, decoding and packed variable-length batches: each equals the one-call,
whole-sequence result (issue: streaming and serving). The tests that take `device` run on the
CPU and, when there is one, on a CUDA device (the same checks: the two backends share the state
layout)."""
import functools

import pytest
import torch

import csq_ext
from csq_ext import CSQState
from conftest import poisoned_memory, rand_shift, randn, reference, rel_err

TOL_STREAM = {torch.float64: 1e-10, torch.float32: 1e-5}
# Both exact algorithms carry states (each op computes its own).
PATHS = ["chunked", "direct"]


def qkv(gen, B, Hq, Hk, N, Dk, Dv, dtype=torch.float64, key_offset=0.0, device="cpu"):
    """Drawn on the CPU (so both devices see the same numbers), then moved."""
    return (randn(gen, B, Hq, N, Dk, dtype=dtype).to(device),
            (randn(gen, B, Hk, N, Dk) + key_offset).to(dtype).to(device),
            randn(gen, B, Hk, N, Dv, dtype=dtype).to(device))


def piece(t, a, b):
    return t[:, :, a:b]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_prefill_in_two_pieces_then_2048_decode_steps_equals_one_call(gen, dtype, device, path):
    attend = functools.partial(csq_ext.attention, path=path)
    B, Hq, Hk, Dk, Dv = 2, 4, 2, 8, 6
    p1, p2, steps = 45, 83, 2048
    N = p1 + p2 + steps
    q, k, v = qkv(gen, B, Hq, Hk, N, Dk, Dv, dtype, key_offset=2.0, device=device)
    shift = rand_shift(gen, Hq, dtype=dtype, device=device)
    whole = attend(q, k, v, shift=shift)
    expected = reference(q, k, v, shift=shift)
    assert rel_err(whole, expected) <= TOL_STREAM[dtype]

    y1, state = attend(piece(q, 0, p1), piece(k, 0, p1), piece(v, 0, p1),
                       shift=shift, return_state=True, tile_size=16)
    y2, state = attend(piece(q, p1, p1 + p2), piece(k, p1, p1 + p2),
                       piece(v, p1, p1 + p2), shift=shift, initial_state=state,
                       return_state=True)
    assert state.count.eq(p1 + p2).all()
    # Half the steps through the functional decode, half in place into one output buffer.
    ys = [y1, y2]
    out = torch.full((B, Hq, 1, Dv), float("nan"), dtype=dtype, device=device)
    for t in range(p1 + p2, N):
        qt, kt, vt = piece(q, t, t + 1), piece(k, t, t + 1), piece(v, t, t + 1)
        if t < p1 + p2 + steps // 2:
            y, state = csq_ext.decode(qt, kt, vt, state, shift=shift)
            ys.append(y)
        else:
            ys.append(csq_ext.decode_(qt, kt, vt, state, out=out, shift=shift).clone())
    streamed = torch.cat(ys, dim=2)
    assert streamed.device.type == device and state.sums.device.type == device
    assert torch.isfinite(streamed).all()
    assert rel_err(streamed, expected) <= TOL_STREAM[dtype]
    # The state holds every key, and only a constant amount of memory.
    assert state.count.eq(N).all()
    assert state.sums.shape == (B, Hk, Dk * (Dk + 1) // 2 + Dk + 1, Dv + 1)
    # The last step alone, too: decode's output is the last row of the one call.
    assert rel_err(ys[-1], whole[:, :, -1:]) <= TOL_STREAM[dtype]


@pytest.mark.parametrize("path", PATHS)
def test_empty_state_continues_like_no_state(gen, device, path):
    attend = functools.partial(csq_ext.attention, path=path)
    q, k, v = qkv(gen, 1, 2, 1, 30, 4, 3, device=device)
    empty = CSQState.empty(1, 1, 4, 3, dtype=torch.float64, device=device)
    y = attend(q, k, v, initial_state=empty)
    assert rel_err(y, reference(q, k, v)) <= 1e-10
    state = CSQState.empty(1, 1, 4, 3, dtype=torch.float64, device=device)
    ys = [csq_ext.decode_(piece(q, t, t + 1), piece(k, t, t + 1), piece(v, t, t + 1),
                          state).clone() for t in range(30)]
    assert rel_err(torch.cat(ys, 2), reference(q, k, v)) <= 1e-10


@pytest.mark.parametrize("path", PATHS)
def test_state_options_flags_and_scale(gen, device, path):
    attend = functools.partial(csq_ext.attention, path=path)
    q, k, v = qkv(gen, 1, 2, 2, 40, 5, 4, device=device)
    kw = dict(center=False, normalize=False, scale=0.7, shift=-0.4)
    y1, st = attend(piece(q, 0, 13), piece(k, 0, 13), piece(v, 0, 13),
                    return_state=True, **kw)
    y2 = attend(piece(q, 13, 40), piece(k, 13, 40), piece(v, 13, 40),
                initial_state=st, **kw)
    assert rel_err(torch.cat([y1, y2], 2), reference(q, k, v, **kw)) <= 1e-10


@pytest.mark.parametrize("path", PATHS)
def test_float32_state_with_offset_keys_stays_accurate(gen, device, path):
    """The state's ref keeps float32 sums accurate when keys share an offset 30x their
    spread, across pieces and decode steps."""
    attend = functools.partial(csq_ext.attention, path=path)
    q, k, v = qkv(gen, 1, 2, 1, 600, 16, 16, torch.float64, key_offset=30.0, device=device)
    expected = reference(q, k, v)
    q, k, v = q.float(), k.float(), v.float()
    y1, st = attend(piece(q, 0, 300), piece(k, 0, 300), piece(v, 0, 300),
                    return_state=True)
    ys = [y1]
    for t in range(300, 600):
        ys.append(csq_ext.decode_(piece(q, t, t + 1), piece(k, t, t + 1), piece(v, t, t + 1),
                                  st).clone())
    assert rel_err(torch.cat(ys, 2), expected) <= 1e-4


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("center", [True, False])
def test_gradcheck_through_initial_state(gen, center, device, path):
    """Gradients flow into the carried state (sums and ref) and out of the returned one."""
    attend = functools.partial(csq_ext.attention, path=path)
    _, s0 = attend(*qkv(gen, 1, 2, 1, 7, 3, 2, key_offset=1.0, device=device),
                   return_state=True)
    q, k, v = (t.requires_grad_() for t in qkv(gen, 1, 2, 1, 9, 3, 2, device=device))
    noise = torch.rand(s0.sums.shape, generator=gen, dtype=torch.float64).to(device)
    sums = (s0.sums + 0.1 * noise)
    sums = sums.detach().requires_grad_()
    ref = s0.ref.detach().clone().requires_grad_()

    def run(q, k, v, sums, ref):
        y, st = attend(q, k, v, center=center, initial_state=CSQState(sums, ref),
                       return_state=True, tile_size=4)
        return y, st.sums, st.ref

    assert torch.autograd.gradcheck(run, (q, k, v, sums, ref))


@pytest.mark.parametrize("path", PATHS)
def test_gradients_of_state_pieces_equal_one_call(gen, device, path):
    """Truncated BPTT with a state that is not detached gives the one-call gradients."""
    attend = functools.partial(csq_ext.attention, path=path)
    q, k, v = (t.requires_grad_() for t in qkv(gen, 1, 4, 2, 50, 4, 3, device=device))
    shift = rand_shift(gen, 4, device=device, requires_grad=True)
    dy = randn(gen, 1, 4, 50, 3, device=device)
    y = attend(q, k, v, shift=shift)
    full = torch.autograd.grad(y, (q, k, v, shift), dy)
    y1, st = attend(piece(q, 0, 21), piece(k, 0, 21), piece(v, 0, 21), shift=shift,
                    return_state=True)
    y2 = attend(piece(q, 21, 50), piece(k, 21, 50), piece(v, 21, 50), shift=shift,
                initial_state=st)
    pieces = torch.autograd.grad(torch.cat([y1, y2], 2), (q, k, v, shift), dy)
    for a, b in zip(pieces, full):
        assert rel_err(a, b) <= 1e-10


def test_state_to_and_detach(gen):
    _, st = csq_ext.attention(*qkv(gen, 1, 2, 1, 5, 3, 2), return_state=True)
    assert st.to(torch.float32).sums.dtype == torch.float32
    assert st.to(torch.float32).ref.dtype == torch.float32
    q, k, v = (t.requires_grad_() for t in qkv(gen, 1, 2, 1, 5, 3, 2))
    _, st = csq_ext.attention(q, k, v, return_state=True)
    assert st.sums.requires_grad and not st.detach().sums.requires_grad


def test_bad_states_are_rejected(gen):
    q, k, v = qkv(gen, 2, 2, 1, 6, 3, 2)
    _, st = csq_ext.attention(q, k, v, return_state=True)
    with pytest.raises(ValueError, match="causal"):
        csq_ext.attention(q, k, v, causal=False, initial_state=st)
    with pytest.raises(ValueError, match="return_state needs causal"):
        csq_ext.attention(q, k, v, causal=False, return_state=True)
    with pytest.raises(ValueError, match=r"initial_state.sums must have shape"):
        csq_ext.attention(q, k, v, initial_state=CSQState(st.sums[:, :, :-1], st.ref))
    with pytest.raises(ValueError, match=r"initial_state.ref must have shape"):
        csq_ext.attention(q, k, v, initial_state=CSQState(st.sums, st.ref[..., :2]))
    with pytest.raises(ValueError, match="initial_state.sums must be torch.float64"):
        csq_ext.attention(q, k, v, initial_state=st.to(torch.float32))
    with pytest.raises(ValueError, match="device"):
        csq_ext.attention(q, k, v, initial_state=st.to("meta"))
    with pytest.raises(ValueError, match="CSQState"):
        csq_ext.attention(q, k, v, initial_state=(st.sums,))
    with pytest.raises(ValueError, match=r"\(B, Hq, 1, Dk\)"):
        csq_ext.decode(q, k, v, st)
    with pytest.raises(ValueError, match="state.sums must have shape"):
        csq_ext.decode_(q[:, :, :1], k[:, :, :1], v[:, :, :1], CSQState(st.sums[:1], st.ref[:1]))


def segments(cu):
    return list(zip(cu[:-1].tolist(), cu[1:].tolist()))


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_equals_per_sequence_calls(gen, index_dtype, causal):
    # Segments of length 1, 0, a multiple of the chunk (8) and not.
    cu = torch.tensor([0, 1, 9, 9, 26, 27, 60], dtype=index_dtype)
    T = int(cu[-1])
    q, k, v = (t.requires_grad_() for t in qkv(gen, 1, 4, 2, T, 5, 3))
    shift = rand_shift(gen, 4, requires_grad=True)
    dy = randn(gen, 1, 4, T, 3)
    with poisoned_memory():
        y = csq_ext.attention(q, k, v, causal=causal, shift=shift, cu_seqlens=cu, tile_size=8)
        grads = torch.autograd.grad(y, (q, k, v, shift), dy)
    ys, gs = [], [torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), 0]
    for a, b in segments(cu):
        yi = csq_ext.attention(piece(q, a, b), piece(k, a, b), piece(v, a, b), causal=causal,
                               shift=shift)
        ys.append(yi)
        if b > a:
            gi = torch.autograd.grad(yi, (q, k, v, shift), piece(dy, a, b))
            gs = [x + y for x, y in zip(gs, gi)]
    assert rel_err(y, torch.cat(ys, 2)) <= 1e-10
    ref = torch.cat([reference(piece(q, a, b), piece(k, a, b), piece(v, a, b), shift=shift,
                               causal=causal) for a, b in segments(cu)], 2)
    assert rel_err(y, ref) <= 1e-10
    for name, a, b in zip("q k v shift".split(), grads, gs):
        assert rel_err(a, b) <= 1e-10, name


@pytest.mark.parametrize("path", PATHS)
def test_varlen_gradcheck_and_returned_states(gen, device, path):
    attend = functools.partial(csq_ext.attention, path=path)
    cu = torch.tensor([0, 3, 4, 11])
    q, k, v = (t.requires_grad_() for t in qkv(gen, 1, 2, 1, 11, 3, 2, device=device))
    assert torch.autograd.gradcheck(
        lambda q, k, v: attend(q, k, v, cu_seqlens=cu, tile_size=2), (q, k, v))
    # Per-sequence states: continuing segment s equals attention over its longer sequence.
    _, st = attend(q, k, v, cu_seqlens=cu, return_state=True)
    assert st.sums.shape[0] == 3 and st.count.flatten().tolist() == [3.0, 1.0, 7.0]
    qn, kn, vn = qkv(gen, 3, 2, 1, 1, 3, 2, device=device)
    y, _ = csq_ext.decode(qn, kn, vn, st)
    a, b = 4, 11
    longer = [torch.cat([piece(t, a, b), n[2:3]], 2) for t, n in ((q, qn), (k, kn), (v, vn))]
    assert rel_err(y[2:3], reference(*longer)[:, :, -1:]) <= 1e-10


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("center", [True, False])
def test_varlen_with_initial_states_equals_per_sequence_calls(gen, device, center, path):
    """Packed segments, each continuing its own state (lengths 0, 1, 70, 5: empty, one token,
    more than a CUDA chunk), return their states: outputs, returned states and all gradients
    (q, k, v, shift, the carried sums and ref) equal one call per segment."""
    attend = functools.partial(csq_ext.attention, path=path)
    lens = [0, 1, 70, 5]
    cu = torch.tensor([0, 0, 1, 71, 76])
    S, T, Hq, Hk, Dk, Dv = 4, 76, 4, 2, 4, 3
    _, s0 = attend(*qkv(gen, S, Hq, Hk, 6, Dk, Dv, key_offset=1.0, device=device),
                   return_state=True)
    sums = s0.sums.detach().requires_grad_()
    ref = s0.ref.detach().clone().requires_grad_()
    q, k, v = (t.requires_grad_() for t in qkv(gen, 1, Hq, Hk, T, Dk, Dv, device=device))
    shift = rand_shift(gen, Hq, device=device, requires_grad=True)
    dy = randn(gen, 1, Hq, T, Dv, device=device)
    dsums = randn(gen, *sums.shape, device=device)
    inputs = (q, k, v, shift, sums, ref)
    kw = dict(shift=shift, center=center, return_state=True)

    y, st = attend(q, k, v, cu_seqlens=cu, initial_state=CSQState(sums, ref), **kw)
    grads = torch.autograd.grad((y * dy).sum() + (st.sums * dsums).sum(), inputs)
    loss, ys, outs = 0, [], []
    for s, (a, b) in enumerate(segments(cu)):
        yi, si = attend(piece(q, a, b), piece(k, a, b), piece(v, a, b),
                        initial_state=CSQState(sums[s:s + 1], ref[s:s + 1]), **kw)
        ys.append(yi)
        outs.append(si)
        loss = loss + (yi * piece(dy, a, b)).sum() + (si.sums * dsums[s:s + 1]).sum()
    one_by_one = torch.autograd.grad(loss, inputs)
    assert [b - a for a, b in segments(cu)] == lens
    assert rel_err(y, torch.cat(ys, 2)) <= 1e-10
    assert rel_err(st.sums, torch.cat([o.sums for o in outs])) <= 1e-10
    assert torch.equal(st.ref, ref)  # a carried ref is kept
    assert st.count.flatten().tolist() == [6.0 + n for n in lens for _ in range(Hk)]
    for name, a, b in zip("q k v shift sums ref".split(), grads, one_by_one):
        assert rel_err(a, b) <= 1e-10, name


def test_bad_cu_seqlens_are_rejected(gen):
    q, k, v = qkv(gen, 1, 2, 1, 10, 3, 2)
    with pytest.raises(ValueError, match="cu_seqlens must be an int32 or int64"):
        csq_ext.attention(q, k, v, cu_seqlens=torch.tensor([0.0, 10.0]))
    with pytest.raises(ValueError, match="from 0 to T = 10"):
        csq_ext.attention(q, k, v, cu_seqlens=torch.tensor([0, 4, 9]))
    with pytest.raises(ValueError, match="non-decreasing"):
        csq_ext.attention(q, k, v, cu_seqlens=torch.tensor([0, 6, 4, 10]))
    q2, k2, v2 = qkv(gen, 2, 2, 1, 10, 3, 2)
    with pytest.raises(ValueError, match=r"batch size 1"):
        csq_ext.attention(q2, k2, v2, cu_seqlens=torch.tensor([0, 10]))


def test_decode_in_place_allocates_nothing(gen):
    """The in-place step writes into the state and the given output buffer: their storage
    does not move, and the profiler sees no allocation in the step."""
    q, k, v = qkv(gen, 2, 4, 2, 1, 8, 8, torch.float32)
    state = CSQState.empty(2, 2, 8, 8)
    out = torch.empty(2, 4, 1, 8)
    shift = torch.full((4,), 1.0)
    csq_ext.decode_(q, k, v, state, out=out, shift=shift)  # warm-up
    ptrs = (state.sums.data_ptr(), out.data_ptr())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        torch.ops.csq_ext.csq_decode_(state.sums, state.ref, q, k, v, shift, out, 8 ** -0.5,
                                      True, True, 1e-6)
    allocs = [e for e in prof.events() if e.name == "[memory]" and e.cpu_memory_usage > 0]
    assert allocs == []
    assert ptrs == (state.sums.data_ptr(), out.data_ptr())
    assert state.count.eq(2).all()
