"""No silent wrong answers (issue #10): gradients of a returned state, forward-mode AD,
float32 from an empty state, outlier and sink keys.
Every check is against the float64 reference (or float64 gradcheck) on fresh random inputs."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD

import csq_ext
from conftest import (assert_rel_close, poisoned_memory, rand_shift,
                      randn, reference, reference_blocked, rel_err)
from csq_ext import CSQState


# --------------------------------------------------------------------------------------------
# 1. Gradients of a returned state: its ref is picked from the keys (a median), so the keys
#    receive the state's gradient through ref too.
# --------------------------------------------------------------------------------------------
def test_issue_example_ref_gradient_is_the_median_selection(gen):
    """d ref / d k is the derivative of the coordinate-wise median of the first keys (the
    issue: it was all zeros)."""
    q, k, v = (randn(gen, 1, 1, 9, 3) for _ in range(3))
    k.requires_grad_()
    _, st = csq_ext.attention(q, k, v, return_state=True)
    (got,) = torch.autograd.grad(st.ref.sum(), k)
    k2 = k.detach().clone().requires_grad_()
    (want,) = torch.autograd.grad(k2.median(dim=2).values.sum(), k2)  # lower median, like ref
    assert torch.equal(got, want)


@pytest.mark.parametrize("center", [True, False], ids=["center", "plain"])
@pytest.mark.parametrize("start", ["none", "empty", "prefill"])
def test_gradcheck_returned_state(gen, center, start):
    """gradcheck of (q, k, v, shift) -> (state.sums, state.ref) and -> y, float64, with the
    sequence longer than the ref's 64 keys, from no state, an empty one, or a prefill's."""
    Hq, Hk, N, D, Dv = 2, 1, 70, 3, 2
    q, k, v = (randn(gen, 1, h, N, d, requires_grad=True)
               for h, d in ((Hq, D), (Hk, D), (Hk, Dv)))
    shift = rand_shift(gen, Hq, requires_grad=True)
    state = None
    if start == "empty":
        state = CSQState.empty(1, Hk, D, Dv, dtype=torch.float64)
    elif start == "prefill":
        _, state = csq_ext.attention(*(randn(gen, 1, h, 5, d) for h, d in
                                       ((Hq, D), (Hk, D), (Hk, Dv))), return_state=True)

    def f(q, k, v, shift):
        y, st = csq_ext.attention(q, k, v, shift=shift, center=center, tile_size=16,
                                  initial_state=state, return_state=True)
        return y, st.sums, st.ref

    assert torch.autograd.gradcheck(f, (q, k, v, shift))


def test_gradcheck_returned_state_packed(gen):
    """The same through cu_seqlens: each segment's ref comes from its own first keys."""
    cu = torch.tensor([0, 0, 65, 67])
    q, k, v = (randn(gen, 1, 1, 67, 2) for _ in range(3))
    state = CSQState.empty(3, 1, 2, 2, dtype=torch.float64)

    def f(k):
        _, st = csq_ext.attention(q, k, v, cu_seqlens=cu, tile_size=32, initial_state=state,
                                  return_state=True)
        return st.sums, st.ref

    assert torch.autograd.gradcheck(f, (k.requires_grad_(),))


@pytest.mark.parametrize("packed", [False, True], ids=["batch", "packed"])
def test_returned_state_gradient_without_keys(gen, packed):
    """No key at all (N = 0, packed or not): the returned state is the carried one, its
    gradient reaches the carried state unchanged, and k gets an empty gradient (a context-
    parallel rank with an empty shard differentiates exactly this)."""
    q, k, v = (randn(gen, 1, 2, 0, 3, requires_grad=True) for _ in range(3))
    S = 3 if packed else 1
    cu = torch.zeros(S + 1, dtype=torch.int64) if packed else None
    _, st0 = csq_ext.attention(*(randn(gen, S, 2, 5, 3) for _ in range(3)), return_state=True)
    sums, ref = st0.sums.requires_grad_(), st0.ref.requires_grad_()
    _, st = csq_ext.attention(q.expand(S, -1, -1, -1) if not packed else q, k if packed else
                              k.expand(S, -1, -1, -1), v if packed else v.expand(S, -1, -1, -1),
                              cu_seqlens=cu, initial_state=CSQState(sums, ref),
                              return_state=True)
    ds, dr = randn(gen, *st.sums.shape), randn(gen, *st.ref.shape)
    gs, gr, gk = torch.autograd.grad((st.sums * ds).sum() + (st.ref * dr).sum(), (sums, ref, k))
    assert torch.equal(st.sums, sums) and torch.equal(gs, ds)
    assert gk.shape == k.shape and rel_err(gr, dr) <= 1e-12


# --------------------------------------------------------------------------------------------
# 2. Forward-mode AD is refused, never a silent zero tangent.
# --------------------------------------------------------------------------------------------
def _qkv(gen):
    return tuple(randn(gen, 1, 2, 6, 3) for _ in range(3))


def test_forward_ad_dual_tensors_refused(gen):
    q, k, v = _qkv(gen)
    with fwAD.dual_level():
        qd = fwAD.make_dual(q, torch.randn_like(q))
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            csq_ext.attention(qd, k, v)


@pytest.mark.parametrize("transform", ["jvp", "jacfwd"])
def test_functorch_forward_mode_refused(gen, transform):
    q, k, v = _qkv(gen)
    f = lambda k_: csq_ext.attention(q, k_, v)  # noqa: E731
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        if transform == "jvp":
            torch.func.jvp(f, (k,), (torch.randn_like(k),))
        else:
            torch.func.jacfwd(f)(k)


def test_forward_ad_refused_in_decode_and_shift(gen):
    q, k, v = (randn(gen, 1, 2, 1, 3) for _ in range(3))
    st = CSQState.empty(1, 2, 3, 3, dtype=torch.float64)
    with fwAD.dual_level():
        shift = fwAD.make_dual(torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
        with pytest.raises(NotImplementedError, match="shift"):
            csq_ext.decode(q, k, v, st, shift=shift)
        with pytest.raises(NotImplementedError, match="shift"):
            csq_ext.decode_(q, k, v, st, shift=shift)


# --------------------------------------------------------------------------------------------
# 3. float32 from an empty state is as accurate as a prefill when keys share a large offset.
# --------------------------------------------------------------------------------------------
B, HQ, HK, D = 1, 2, 1, 8


def _offset_inputs(gen, n):
    offset = 30 * torch.sign(randn(gen, 1, HK, 1, D))
    q = randn(gen, B, HQ, n, D)
    k = randn(gen, B, HK, n, D) + offset
    v = randn(gen, B, HK, n, D)
    return q, k, v


# Measured 5e-7 (prefill and empty alike) on the CPU; the bar leaves room for other seeds and
# devices while staying 10x below the spec's 1e-4 for offset keys (the old code: 1.4e-4).
TOL_EMPTY_OFFSET = 1e-5


def test_attention_from_empty_state_offset_keys(gen, device):
    q, k, v = _offset_inputs(gen, 300)
    f32 = [t.to(device, torch.float32) for t in (q, k, v)]
    with poisoned_memory(device):
        y = csq_ext.attention(*f32, initial_state=CSQState.empty(B, HK, D, D, device=device))
    assert_rel_close(y.cpu(), reference(*f32), TOL_EMPTY_OFFSET)


@pytest.mark.parametrize("step", ["decode_", "decode"])
def test_decoding_10000_steps_from_empty_state_offset_keys(gen, device, step):
    """10 000 decoding steps from CSQState.empty with offset keys: every output and the last
    10% within the bar (the old code: 4.8e-4 overall, 2.2e-3 over the last 10% for decode_)."""
    n = 10_000
    q, k, v = (t.to(device, torch.float32) for t in _offset_inputs(gen, n))
    st = CSQState.empty(B, HK, D, D, device=device)
    out = torch.empty(B, HQ, n, D, device=device)
    with torch.no_grad():
        for i in range(n):
            tok = (q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1])
            if step == "decode_":
                out[:, :, i:i + 1] = csq_ext.decode_(*tok, st)
            else:
                out[:, :, i:i + 1], st = csq_ext.decode(*tok, st)
    want = reference_blocked(q, k, v, device="cpu")
    assert_rel_close(out.cpu(), want, TOL_EMPTY_OFFSET, "all steps")
    assert_rel_close(out[:, :, -n // 10:].cpu(), want[:, :, -n // 10:], TOL_EMPTY_OFFSET,
                     "last 10%")


def test_decode_from_empty_state_picks_its_first_key_as_ref(gen, device):
    """The documented behaviour: a state that holds no key takes the first key as its ref,
    per sequence; a state that holds keys keeps its ref."""
    q, k, v = (randn(gen, 2, 2, 1, 3, dtype=torch.float32, device=device) for _ in range(3))
    st = CSQState.empty(2, 2, 3, 3, device=device)
    st.sums[1, :, -1, -1] = 1.0  # sequence 1 "holds a key" (count 1)
    st.ref[1] = 5.0
    csq_ext.decode_(q, k, v, st)
    assert torch.equal(st.ref[0], k[0, :, 0])
    assert torch.equal(st.ref[1], torch.full_like(st.ref[1], 5.0))


# --------------------------------------------------------------------------------------------
# 4. Outlier and sink keys.
# --------------------------------------------------------------------------------------------
N_OUT = 200


@pytest.mark.parametrize("magnitude", [1e4, 1e6, 1e20])
@pytest.mark.parametrize("position", [1, 50, 63])
def test_earlier_rows_do_not_see_an_outlier_key(gen, device, magnitude, position):
    """A huge finite key at position p leaves rows before p unchanged up to rounding (the old
    code: 3.3e-4 for 1e6, 0.42 for 1e20)."""
    q, k, v = (randn(gen, B, h, N_OUT, D, dtype=torch.float32, device=device)
               for h in (HQ, HK, HK))
    k_out = k.clone()
    k_out[:, :, position] = magnitude * torch.sign(randn(gen, D)).to(device, torch.float32)
    y = csq_ext.attention(q, k, v)
    y_out = csq_ext.attention(q, k_out, v)
    assert rel_err(y_out[:, :, :position].cpu(), y[:, :, :position].cpu()) <= 1e-6


def test_earlier_rows_do_not_see_a_block_of_outliers(gen, device):
    """Up to 31 outliers among the first 64 keys (the ref is their median): rows before them
    unchanged up to rounding."""
    q, k, v = (randn(gen, B, h, N_OUT, D, dtype=torch.float32, device=device)
               for h in (HQ, HK, HK))
    k_out = k.clone()
    k_out[:, :, 33:] = 1e6 * randn(gen, B, HK, N_OUT - 33, D).to(device, torch.float32)
    y, y_out = csq_ext.attention(q, k, v), csq_ext.attention(q, k_out, v)
    assert rel_err(y_out[:, :, :33].cpu(), y[:, :, :33].cpu()) <= 1e-6


# Measured on the CPU (float32, D = 8, N = 200): a 1000x sink key costs 2e-5 to 8e-5 on the
# chunked path, where a dense float32 computation gets 1e-6: a query nearly orthogonal to a
# large key reads a cancellation of size eps |k_out - r|^2 in the expanded square (docs/SPEC.md,
# section 6). The bar holds that line on both paths.
TOL_SINK = 2e-4


def test_sink_key(gen, device):
    q, k, v = (randn(gen, B, h, N_OUT, D) for h in (HQ, HK, HK))
    k[:, :, 0] *= 1000
    f32 = [t.to(device, torch.float32) for t in (q, k, v)]
    with poisoned_memory(device):
        y = csq_ext.attention(*f32)
    assert_rel_close(y.cpu(), reference(*f32), TOL_SINK)


@pytest.mark.parametrize("path", ["chunked", "direct"])
@pytest.mark.parametrize("scale", [100.0, 1000.0])
def test_sink_key_both_paths(gen, device, path, scale):
    q, k, v = (randn(gen, B, h, N_OUT, 32) for h in (HQ, HK, HK))
    k[:, :, 0] *= scale
    f32 = [t.to(device, torch.float32) for t in (q, k, v)]
    with poisoned_memory(device):
        y = csq_ext.attention(*f32, path=path)
    assert_rel_close(y.cpu(), reference(*f32), TOL_SINK)


def _one_outlier(gen, device, n, d, magnitude, position=50, dtype=torch.float32):
    q, k, v = (randn(gen, B, h, n, d) for h in (HQ, HK, HK))
    k[:, :, position] = magnitude * torch.sign(randn(gen, d))
    return [t.to(device, dtype) for t in (q, k, v)]


# The direct path computes every score as one dot product, as a dense computation does: rows
# after an outlier key keep dense float32 accuracy (measured <= 1e-5, D = 8-128, keys up to
# 1e8 times the typical norm) until w = s^2 overflows float32 (|s| ~ 1.8e19).
@pytest.mark.parametrize("magnitude", [1e4, 1e6, 1e10])
@pytest.mark.parametrize("d", [8, 64])
def test_rows_after_an_outlier_key_direct_path(gen, device, magnitude, d):
    q, k, v = _one_outlier(gen, device, 300, d, magnitude)
    with poisoned_memory(device):
        y = csq_ext.attention(q, k, v, path="direct")
    assert_rel_close(y[:, :, 51:].cpu(), reference(q, k, v)[:, :, 51:], 2e-5, "rows after")
    assert_rel_close(y[:, :, :50].cpu(), reference(q, k, v)[:, :, :50], 2e-5, "rows before")


# The chunked path's bar in docs/SPEC.md: keys up to 1000x the typical norm cost at most 2e-4
# in the rows after them (measured 3e-6 at 100x, 8e-5 to 1e-4 at 1000x, D = 8-128, N = 600).
@pytest.mark.parametrize("magnitude", [1e2, 1e3])
@pytest.mark.parametrize("d", [8, 64])
def test_rows_after_a_large_key_chunked_path(gen, device, magnitude, d):
    q, k, v = _one_outlier(gen, device, 600, d, magnitude)
    with poisoned_memory(device):
        y = csq_ext.attention(q, k, v, path="chunked")
    assert_rel_close(y[:, :, 51:].cpu(), reference(q, k, v)[:, :, 51:], TOL_SINK, "rows after")


def test_rows_after_a_huge_key_chunked_path_float64(gen, device):
    """float64 inputs hold keys of 1e8 on the chunked path (float32 inputs beyond 1000x are
    computed in float64 by the op itself: tests/test_drift_outliers.py)."""
    q, k, v = _one_outlier(gen, device, 600, 16, 1e8, dtype=torch.float64)
    y = csq_ext.attention(q, k, v, path="chunked")
    assert_rel_close(y[:, :, 51:].cpu(), reference(q, k, v)[:, :, 51:], 1e-8, "rows after")


def test_automatic_choice_with_a_huge_key_at_short_length(gen, device):
    """At short N the automatic choice is the direct path, so huge keys cost nothing there."""
    q, k, v = _one_outlier(gen, device, 256, 64, 1e6)
    y = csq_ext.attention(q, k, v)
    assert_rel_close(y.cpu(), reference(q, k, v), 2e-5)


# --------------------------------------------------------------------------------------------
# 6. Near-zero scores without centering: every score of a row close to 0 (keys near a common
#    point k0 with tau <q, k0> = -shift). The sums are taken relative to r, the keys' median,
#    so the expanded square never subtracts the large parts: both paths stay at a dense float32
#    computation's accuracy (measured equal to it: 1e-6, 1e-5, 9e-5 for spreads 0.1, 0.01,
#    0.001; the old code with r = 0: up to 0.44 in float16).
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["chunked", "direct"])
@pytest.mark.parametrize("spread", [1e-1, 1e-2, 1e-3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_center_false_near_zero_scores(gen, device, path, spread, dtype):
    n, d = 300, 16
    tau = d ** -0.5
    k0 = randn(gen, d)
    k0 = k0 / k0.norm()
    q = randn(gen, B, HQ, n, d)
    q = q - ((q @ k0) - 1.0)[..., None] * k0  # <q_i, k0> = 1 for every query
    k = 5.0 * k0 + spread * randn(gen, B, HK, n, d)
    v = randn(gen, B, HK, n, d)
    q, k, v = (t.to(device, dtype) for t in (q, k, v))
    shift = torch.full((HQ,), -5.0 * tau, dtype=torch.float64)
    kw = dict(center=False, eps=0.0)
    want = reference(q, k, v, shift, **kw)
    # A dense float32 computation on the same (rounded) inputs: the accuracy to match.
    s = (q.double().float() @ k.double().float().transpose(-1, -2)) * tau - 5.0 * tau
    w = (s * s).cpu().tril()
    dense = (w @ v.cpu().float()) / w.sum(-1, keepdim=True)
    rounding = {torch.float32: 0.0, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    with poisoned_memory(device):
        y = csq_ext.attention(q, k, v, shift=shift.to(device, torch.float32), path=path, **kw)
    assert torch.isfinite(y).all()
    assert rel_err(y.cpu(), want) <= 3 * rel_err(dense, want) + 1e-6 + rounding
