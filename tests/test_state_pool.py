"""The state-pool ops for serving (csq_ext.pool_prefill_, csq_ext.pool_decode_; docs/SPEC.md
section 8): requests' states in the slots of one pool, prefilled (packed, in pieces) and
decoded in place by slot index.

Pools here are paged like vLLM's cache (each slot's sums and ref in one page, pages one stride
apart, a few padding numbers after each) and start as NaN: a slot the ops must not touch, or
the padding, still holds NaN afterwards, and a fresh request's NaN slot never reaches its
outputs. Every output is checked against the float64 reference over the request's whole
sequence so far, and the final states against the one-request API (attention with
initial_state / return_state, decode_)."""
from __future__ import annotations

import pytest
import torch

import csq_ext
from csq_ext.state import num_features
from conftest import TOL, assert_rel_close, poisoned_memory, rand_shift, randn, reference

NAN = float("nan")


def paged_pool(P, Hk, Dk, Dv, acc, device, pad=3):
    """(page buffer (P, page), CSQState of views into it), every number NaN."""
    F = num_features(Dk)
    ns, nr = Hk * F * (Dv + 1), Hk * Dk
    buf = torch.full((P, ns + nr + pad), NAN, dtype=acc, device=device)
    return buf, csq_ext.CSQState(buf[:, :ns].view(P, Hk, F, Dv + 1),
                                 buf[:, ns:ns + nr].view(P, Hk, Dk))


class Request:
    """One request's tokens so far (in the input dtype, on the CPU) and the outputs the pool
    ops gave it, for the reference; and its state through the one-request API."""

    def __init__(self, slot):
        self.slot, self.q, self.k, self.v, self.state = slot, [], [], [], None

    def add(self, q, k, v):  # (1, H, n, D) pieces
        self.q.append(q.cpu()), self.k.append(k.cpu()), self.v.append(v.cpu())

    def reference_tail(self, n, shift, center):
        q, k, v = (torch.cat(x, 2) for x in (self.q, self.k, self.v))
        y = reference(q, k, v, shift, causal=True, center=center)
        return y[:, :, y.shape[2] - n:]


def draw(gen, n, Hq, Hk, Dk, Dv, dtype):
    """q, k, v of n tokens, as views of (n, H, D) projections (what a serving engine has);
    keys with an offset."""
    q = randn(gen, 1, n, Hq, Dk, dtype=dtype).transpose(1, 2)
    k = (randn(gen, 1, n, Hk, Dk) + 0.7).to(dtype).transpose(1, 2)
    v = randn(gen, 1, n, Hk, Dv, dtype=dtype).transpose(1, 2)
    return q, k, v


def prefill(gen, pool, requests, lens, fresh, dims, dtype, device, shift, center, chunk=None):
    """One packed prefill of the given requests (lens tokens each) through the pool; checks
    each request's rows against the reference. Returns nothing; records the tokens."""
    Hq, Hk, Dk, Dv = dims
    pieces = [draw(gen, n, Hq, Hk, Dk, Dv, dtype) for n in lens]
    q, k, v = (torch.cat([p[i] for p in pieces], 2).to(device) for i in range(3))
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    slots = torch.tensor([r.slot for r in requests], dtype=torch.int64, device=device)
    has = torch.tensor([not f for f in fresh], device=device)
    with poisoned_memory(device):
        y = csq_ext.pool_prefill_(q, k, v, cu.to(device), pool, slots, has_initial_state=has,
                                  shift=shift, center=center, tile_size=chunk)
    assert y.shape == (1, Hq, sum(lens), Dv) and y.dtype == dtype
    for r, (pq, pk, pv), n, a, f in zip(requests, pieces, lens, cu[:-1].tolist(), fresh):
        if f:
            r.q, r.k, r.v, r.state = [], [], [], None
        r.add(pq, pk, pv)
        # The one-request API on the same tokens: the state a pool slot must hold.
        _, r.state = csq_ext.attention(pq.to(device), pk.to(device), pv.to(device),
                                       shift=shift, center=center, initial_state=r.state,
                                       return_state=True, path="chunked")
        if n:
            assert_rel_close(y[:, :, a:a + n], r.reference_tail(n, shift, center), TOL[dtype],
                             f"prefill rows of slot {r.slot}")


def decode(gen, pool, requests, fresh, dims, dtype, device, shift, center):
    Hq, Hk, Dk, Dv = dims
    B = len(requests)
    q, k, v = (x.transpose(0, 2) for x in draw(gen, B, Hq, Hk, Dk, Dv, dtype))  # (B, H, 1, D)
    slots = torch.tensor([r.slot for r in requests], dtype=torch.int32, device=device)
    has = torch.tensor([not f for f in fresh], device=device)
    out = torch.full((B, Hq, 1, Dv), NAN, dtype=dtype, device=device)
    y = csq_ext.pool_decode_(q.to(device), k.to(device), v.to(device), pool, slots,
                             has_initial_state=has, out=out, shift=shift, center=center)
    assert y is out
    for i, (r, f) in enumerate(zip(requests, fresh)):
        if f:
            r.q, r.k, r.v = [], [], []
            r.state = csq_ext.CSQState.empty(1, Hk, Dk, Dv, dtype=pool.sums.dtype,
                                             device=device)
        r.add(q[i:i + 1], k[i:i + 1], v[i:i + 1])
        csq_ext.decode_(q[i:i + 1].to(device), k[i:i + 1].to(device), v[i:i + 1].to(device),
                        r.state, shift=shift, center=center)
        assert_rel_close(y[i:i + 1], r.reference_tail(1, shift, center), TOL[dtype],
                         f"decode row of slot {r.slot}")


def check_pool(buf, pool, requests, P, dtype):
    """Named slots hold their request's state (ref exactly, sums to rounding); every other slot
    and all padding are still NaN."""
    live = {r.slot for r in requests}
    ns = pool.sums[0].numel() + pool.ref[0].numel()
    for s in range(P):
        if s in live:
            continue
        assert torch.isnan(buf[s]).all(), f"slot {s} was not named but was written"
    assert torch.isnan(buf[:, ns:]).all(), "the padding between slots was written"
    for r in requests:
        assert torch.equal(pool.ref[r.slot], r.state.ref[0]), f"ref of slot {r.slot}"
        assert_rel_close(pool.sums[r.slot], r.state.sums[0], TOL[dtype] if dtype in
                         (torch.float64,) else 1e-5, f"sums of slot {r.slot}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("center", [True, False])
def test_pool_serving_sequence_matches_reference(device, gen, dtype, center):
    """A serving schedule: requests of different lengths prefilled together (one empty, one of
    a single token), continued by a second prefill piece (chunked prefill) beside a new
    request, decoded while one finishes and a new one-token request joins in its slot."""
    Hq, Hk, Dk, Dv, P = 4, 2, 6, 5, 9
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    dims = (Hq, Hk, Dk, Dv)
    shift = rand_shift(gen, Hq, acc, device=device)
    buf, pool = paged_pool(P, Hk, Dk, Dv, acc, device)
    a, b, c, d, e = (Request(s) for s in (6, 0, 3, 8, 2))
    args = dict(dims=dims, dtype=dtype, device=device, shift=shift, center=center)
    # Round 1: four new requests (their slots hold NaN).
    prefill(gen, pool, [a, b, c, d], [70, 0, 1, 13], [True] * 4, **args, chunk=16)
    check_pool(buf, pool, [a, b, c, d], P, dtype)
    # Slot 2 holds some old request's finite state; the new request e must not read it.
    pool.sums[2].copy_(randn(gen, *pool.sums[2].shape, dtype=acc, device=device))
    pool.ref[2].copy_(randn(gen, *pool.ref[2].shape, dtype=acc, device=device))
    # Round 2: a and d continue (chunked prefill), e starts.
    prefill(gen, pool, [d, e, a], [64, 5, 25], [False, True, False], **args)
    check_pool(buf, pool, [a, b, c, d, e], P, dtype)
    # Decoding: a, c, d, e, b (b's prompt was empty: it continues an empty state).
    decode(gen, pool, [a, c, d, e, b], [False] * 5, **args)
    decode(gen, pool, [e, d, c, a, b], [False] * 5, **args)
    # c finishes; f takes its slot with a one-token prompt (a fresh decode row).
    f = Request(3)
    decode(gen, pool, [d, f, a], [False, True, False], **args)
    decode(gen, pool, [f, a, d, e], [False] * 4, **args)
    check_pool(buf, pool, [a, b, d, e, f], P, dtype)


def test_pool_ops_equal_the_one_request_ops(gen):
    """On the CPU the pool ops run the very kernels of the chunked path and of decode_: the
    same numbers, bit for bit, as those ops on the requests' states gathered by hand."""
    Hq, Hk, Dk, Dv, P = 2, 1, 8, 4, 5
    dtype = torch.float32
    shift = rand_shift(gen, Hq, dtype)
    lens, slots = [33, 7, 90], torch.tensor([4, 1, 2])
    _, pool = paged_pool(P, Hk, Dk, Dv, dtype, "cpu")
    q0, k0, v0 = draw(gen, 20, Hq, Hk, Dk, Dv, dtype)
    _, st0 = csq_ext.attention(q0, k0, v0, shift=shift, return_state=True)
    for s in slots.tolist():
        pool.sums[s], pool.ref[s] = st0.sums[0], st0.ref[0]
    q, k, v = draw(gen, sum(lens), Hq, Hk, Dk, Dv, dtype)
    cu = torch.tensor([0, 33, 40, 130])
    before = csq_ext.CSQState(pool.sums[slots].clone(), pool.ref[slots].clone())
    y_pool = csq_ext.pool_prefill_(q, k, v, cu, pool, slots, shift=shift, tile_size=32)
    y_one, st = csq_ext.attention(q, k, v, shift=shift, cu_seqlens=cu, initial_state=before,
                                  return_state=True, path="chunked", tile_size=32)
    assert torch.equal(y_pool, y_one)
    assert torch.equal(pool.sums[slots], st.sums) and torch.equal(pool.ref[slots], st.ref)
    qd, kd, vd = (x.transpose(0, 2).contiguous() for x in draw(gen, 3, Hq, Hk, Dk, Dv, dtype))
    y_pool = csq_ext.pool_decode_(qd, kd, vd, pool, slots, shift=shift)
    y_one = csq_ext.decode_(qd, kd, vd, st, shift=shift)
    assert torch.equal(y_pool, y_one)
    assert torch.equal(pool.sums[slots], st.sums) and torch.equal(pool.ref[slots], st.ref)


def test_pool_prefill_tile_size_and_its_alias(gen):
    """pool_prefill_'s block length is attention's tile_size: chunk_size is its deprecated alias
    (a DeprecationWarning, the same numbers), both at once and bad values are refused by name."""
    Hq, Hk, Dk, Dv, P = 2, 1, 8, 4, 3
    shift = rand_shift(gen, Hq, torch.float32)
    q, k, v = draw(gen, 50, Hq, Hk, Dk, Dv, torch.float32)
    cu, slots = torch.tensor([0, 20, 50]), torch.tensor([2, 0])
    outs = []
    for kw in (dict(tile_size=16), dict(chunk_size=16)):
        _, pool = paged_pool(P, Hk, Dk, Dv, torch.float32, "cpu")
        pool.sums.zero_()
        pool.ref.zero_()
        if "chunk_size" in kw:
            with pytest.warns(DeprecationWarning, match="chunk_size is deprecated"):
                outs.append(csq_ext.pool_prefill_(q, k, v, cu, pool, slots, shift=shift, **kw))
        else:
            outs.append(csq_ext.pool_prefill_(q, k, v, cu, pool, slots, shift=shift, **kw))
        outs.append(pool.sums[slots].clone())
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[3])
    _, pool = paged_pool(P, Hk, Dk, Dv, torch.float32, "cpu")
    for kw, name in ((dict(tile_size=0), "tile_size"), (dict(tile_size=2.5), "tile_size"),
                     (dict(tile_size=16, chunk_size=16), "tile_size")):
        with pytest.raises((ValueError, TypeError), match=name):
            csq_ext.pool_prefill_(q, k, v, cu, pool, slots, shift=shift, **kw)


def test_pool_decode_does_not_drift(device, gen):
    """600 float32 decode steps of three requests through the pool, keys sharing an offset 30x
    their spread, against the float64 reference: within the spec's 1e-5 at every step."""
    Hq, Hk, Dk, Dv, P, steps = 2, 1, 8, 8, 4, 600
    shift = rand_shift(gen, Hq, torch.float32, device=device)
    pool = csq_ext.CSQState.empty(P, Hk, Dk, Dv, device=device)
    slots = torch.tensor([3, 0, 1], device=device)
    q = randn(gen, 3, Hq, steps, Dk, dtype=torch.float32, device=device)
    k = (randn(gen, 3, Hk, steps, Dk) + 30 * torch.sign(randn(gen, 1, Hk, 1, Dk))).to(
        device, torch.float32)
    v = randn(gen, 3, Hk, steps, Dv, dtype=torch.float32, device=device)
    out = torch.empty(3, Hq, 1, Dv, device=device)
    ys = []
    for t in range(steps):
        csq_ext.pool_decode_(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], pool, slots,
                             out=out, shift=shift)
        ys.append(out.clone())
    y_ref = reference(q, k, v, shift, causal=True)
    for t in (0, 1, 63, 64, 299, steps - 1):
        assert_rel_close(ys[t], y_ref[:, :, t:t + 1], 1e-5, f"step {t}")
    assert_rel_close(torch.cat(ys, 2), y_ref, 1e-5, "all steps")


def test_pool_empty_calls(device, gen):
    """No token at all: a fresh slot becomes an empty state (count 0), a continued one is
    unchanged, other slots untouched; a decode of no request changes nothing."""
    Hq, Hk, Dk, Dv, P = 2, 1, 3, 2, 4
    buf, pool = paged_pool(P, Hk, Dk, Dv, torch.float32, device)
    pool.sums[1].copy_(randn(gen, *pool.sums[1].shape, dtype=torch.float32, device=device))
    pool.ref[1].copy_(randn(gen, *pool.ref[1].shape, dtype=torch.float32, device=device))
    kept = buf[1].clone()
    q = torch.empty(1, Hq, 0, Dk, device=device)
    k, v = torch.empty(1, Hk, 0, Dk, device=device), torch.empty(1, Hk, 0, Dv, device=device)
    y = csq_ext.pool_prefill_(q, k, v, torch.zeros(3, dtype=torch.int64, device=device), pool,
                              torch.tensor([1, 2], device=device),
                              has_initial_state=torch.tensor([True, False], device=device))
    assert y.shape == (1, Hq, 0, Dv)
    assert torch.allclose(buf[1], kept, rtol=0, atol=0, equal_nan=True)
    assert (pool.sums[2] == 0).all() and (pool.ref[2] == 0).all()  # CSQState.empty
    assert torch.isnan(buf[0]).all() and torch.isnan(buf[3]).all()
    before = buf.clone()
    q, k, v = torch.empty(0, Hq, 1, Dk), torch.empty(0, Hk, 1, Dk), torch.empty(0, Hk, 1, Dv)
    y = csq_ext.pool_decode_(q.to(device), k.to(device), v.to(device), pool,
                             torch.empty(0, dtype=torch.int64, device=device))
    assert y.shape == (0, Hq, 1, Dv)
    assert torch.equal(torch.isnan(buf), torch.isnan(before))


def _bad_call_args(device):
    Hq, Hk, Dk, Dv, P = 2, 1, 3, 2, 4
    q, k, v = (torch.randn(1, h, 5, d, device=device) for h, d in ((Hq, Dk), (Hk, Dk), (Hk, Dv)))
    pool = csq_ext.CSQState.empty(P, Hk, Dk, Dv, device=device)
    cu = torch.tensor([0, 2, 5], device=device)
    return q, k, v, cu, pool


@pytest.mark.parametrize("case,match", [
    ("duplicate", "distinct"), ("range", r"\[0, P\)"), ("negative", r"\[0, P\)"),
    ("float_slots", "int32 or int64"), ("count", "one slot per sequence"),
    ("has_dtype", "has_initial_state"), ("has_shape", "has_initial_state"),
    ("pool_dtype", "pool.sums must be torch.float32"), ("pool_shape", "pool.ref must have"),
    ("pool_inner", "contiguous block"), ("pool_type", "CSQState"), ("no_cu", "cu_seqlens")])
def test_pool_prefill_refuses_bad_arguments(device, case, match):
    q, k, v, cu, pool = _bad_call_args(device)
    slots, has = torch.tensor([0, 2], device=device), None
    if case == "duplicate":
        slots = torch.tensor([2, 2], device=device)
    elif case == "range":
        slots = torch.tensor([0, 4], device=device)
    elif case == "negative":
        slots = torch.tensor([-1, 0], device=device)
    elif case == "float_slots":
        slots = slots.float()
    elif case == "count":
        slots = torch.tensor([0, 1, 2], device=device)
    elif case == "has_dtype":
        has = torch.ones(2, dtype=torch.int64, device=device)
    elif case == "has_shape":
        has = torch.ones(3, dtype=torch.bool, device=device)
    elif case == "pool_dtype":
        pool = pool.to(torch.float64)
    elif case == "pool_shape":
        pool = csq_ext.CSQState(pool.sums, pool.ref[:, :, :2])
    elif case == "pool_inner":
        pool = csq_ext.CSQState(pool.sums.transpose(2, 3).contiguous().transpose(2, 3), pool.ref)
    elif case == "pool_type":
        pool = (pool.sums, pool.ref)
    elif case == "no_cu":
        cu = None
    with pytest.raises((ValueError, TypeError), match=match):
        csq_ext.pool_prefill_(q, k, v, cu, pool, slots, has_initial_state=has)


def test_pool_decode_refuses_bad_arguments(device):
    _, _, _, _, pool = _bad_call_args(device)
    q, k, v = (torch.randn(2, h, 1, d, device=device) for h, d in ((2, 3), (1, 3), (1, 2)))
    with pytest.raises(ValueError, match="distinct"):
        csq_ext.pool_decode_(q, k, v, pool, torch.tensor([1, 1], device=device))
    with pytest.raises(ValueError, match="one slot per request"):
        csq_ext.pool_decode_(q, k, v, pool, torch.tensor([1], device=device))
    with pytest.raises(ValueError, match="one token"):
        csq_ext.pool_decode_(q.expand(2, 2, 2, 3), k.expand(2, 1, 2, 3), v.expand(2, 1, 2, 2),
                             pool, torch.tensor([0, 1], device=device))


def test_pool_ops_refuse_bad_slots_when_called_directly(device):
    """The operators check what the Python layer checks (a direct torch.ops call cannot
    corrupt memory): duplicate and out-of-range slots, and sums and ref sharing memory."""
    q, k, v, cu, pool = _bad_call_args(device)
    shift = torch.ones(2, device=device)
    op = torch.ops.csq_ext.csq_pool_prefill_
    for slots, match in (([3, 3], "named twice"), ([0, 9], "not a slot")):
        with pytest.raises(RuntimeError, match=match):
            op(pool.sums, pool.ref, torch.tensor(slots, device=device), None, q, k, v, shift, cu,
               0.5, True, True, 1e-6, 0)
    # ref inside the sums' memory
    F = num_features(3)
    buf = torch.zeros(4, F * 3 + 3, device=device)
    sums, ref = buf[:, :F * 3].view(4, 1, F, 3), buf[:, 2:5].view(4, 1, 3)
    with pytest.raises(RuntimeError, match="must not share memory"):
        op(sums, ref, torch.tensor([0, 1], device=device), None, q, k, v, shift, cu, 0.5, True,
           True, 1e-6, 0)
    qd, kd, vd = (t[:, :, :1].expand(2, -1, 1, -1).contiguous() for t in (q, k, v))
    with pytest.raises(RuntimeError, match="named twice"):
        torch.ops.csq_ext.csq_pool_decode_(pool.sums, pool.ref, torch.tensor([2, 2], device=device),
                                           None, qd, kd, vd, shift,
                                           torch.empty(2, 2, 1, 2, device=device), 0.5, True,
                                           True, 1e-6)


def test_pool_ops_pass_opcheck(device):
    """Schemas (what is mutated), fake tensors and dispatch agree (torch.library.opcheck)."""
    q, k, v, cu, pool = _bad_call_args(device)
    shift = torch.ones(2, device=device)
    slots = torch.tensor([3, 1], device=device)
    has = torch.tensor([False, True], device=device)
    torch.library.opcheck(torch.ops.csq_ext.csq_pool_prefill_,
                          (pool.sums, pool.ref, slots, has, q, k, v, shift, cu, 0.5, True, True,
                           1e-6, 0), test_utils=("test_schema", "test_faketensor"))
    qd, kd, vd = (t[:, :, :1].expand(2, -1, 1, -1).contiguous() for t in (q, k, v))
    torch.library.opcheck(torch.ops.csq_ext.csq_pool_decode_,
                          (pool.sums, pool.ref, slots, has, qd, kd, vd, shift,
                           torch.empty(2, 2, 1, 2, device=device), 0.5, True, True, 1e-6),
                          test_utils=("test_schema", "test_faketensor"))
