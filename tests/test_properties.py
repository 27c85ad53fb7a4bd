"""Properties the spec promises, checked on the kernel itself (kernel against kernel, or
against closed forms), plus the float32 accuracy bar with keys that share a large offset."""
import pytest
import torch

import csq_ext
from conftest import (SHAPES, TOL_F32_OFFSET, assert_rel_close, call_op,
                      check_float32_offset_keys, csq, csq_grads, make_qkv, rand_shift, randn,
                      reference, rel_err)

CAUSAL = pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])


# --------------------------------------------------------------------------------------------
# Translation invariance with centering
# --------------------------------------------------------------------------------------------
@CAUSAL
@pytest.mark.parametrize("shape_name", ["gqa", "long"])
def test_translation_invariance_float64(gen, shape_name, causal):
    """attention(q, k + t, v) == attention(q, k, v) for one random t, outputs and gradients."""
    shape = SHAPES[shape_name]
    q, k, v = make_qkv(gen, shape)
    t = 5 * randn(gen, shape[4])
    shift = rand_shift(gen, shape[1])
    dy = randn(gen, shape[0], shape[1], shape[3], shape[5])
    kw = dict(causal=causal, tile_size=7)
    y, grads = csq_grads(q, k, v, shift, dy, **kw)
    y_t, grads_t = csq_grads(q, k + t, v, shift, dy, **kw)
    assert rel_err(y, reference(q, k, v, shift, **kw)) <= 1e-10  # and both are right
    assert_rel_close(y_t, y, 1e-10, "y(k + t)")
    for name in grads:
        assert_rel_close(grads_t[name], grads[name], 1e-10, f"d{name}(k + t)")


@CAUSAL
@pytest.mark.parametrize("n", [13, 100])
def test_translation_invariance_float32_large_t(gen, causal, n):
    """float32 keys moved by a vector of magnitude 30 per coordinate: still within 1e-4 of the
    float64 reference of the unmoved keys."""
    q, k, v = make_qkv(gen, (2, 4, 2, n, 8, 4), torch.float64)
    t = 30 * torch.sign(randn(gen, 8))
    q32, k32, v32 = q.float(), (k + t).float(), v.float()
    y = csq(q32, k32, v32, causal=causal)
    # reference of the moved keys as float32 saw them, and of the original keys: both agree.
    assert_rel_close(y, reference(q32, k32, v32, causal=causal), TOL_F32_OFFSET)
    assert_rel_close(y, reference(q, k, v, causal=causal), TOL_F32_OFFSET)


def test_no_invariance_without_center(gen):
    """Control: without centering, moving the keys does change the result (so the invariance
    tests above measure centering, not an insensitive comparison)."""
    q, k, v = make_qkv(gen, SHAPES["gqa"])
    t = randn(gen, 3)
    y, y_t = csq(q, k, v, center=False), csq(q, k + t, v, center=False)
    assert rel_err(y_t, y) > 1e-3


# --------------------------------------------------------------------------------------------
# f32 with a common key offset (spec: <= 1e-4)
# --------------------------------------------------------------------------------------------
@CAUSAL
@pytest.mark.parametrize("n", [9, 64, 200, 513])
def test_float32_keys_with_large_common_offset(gen, causal, n):
    """Keys = N(0, 1) + o with |o_x| = 30 (30x their spread), in float32: outputs and gradients
    within 1e-4 of the float64 reference run on the same float32 numbers."""
    check_float32_offset_keys(gen, causal, n, dk=16, dv=8)


# --------------------------------------------------------------------------------------------
# Chunk length
# --------------------------------------------------------------------------------------------
@CAUSAL
@pytest.mark.parametrize("center,normalize", [(True, True), (False, False)],
                         ids=["ctr-norm", "noctr-raw"])
def test_independent_of_tile_size(gen, causal, center, normalize):
    """Outputs and all gradients agree to 1e-12 across chunk lengths: 1, divisors and
    non-divisors of N, N itself, longer than N, and the default."""
    shape = (2, 4, 2, 37, 5, 3)
    q, k, v = make_qkv(gen, shape)
    shift = rand_shift(gen, 4)
    dy = randn(gen, 2, 4, 37, 3)
    kw = dict(causal=causal, center=center, normalize=normalize)
    base_y, base_g = csq_grads(q, k, v, shift, dy, tile_size=1, **kw)
    for chunk in (2, 3, 5, 8, 13, 36, 37, 64, None):
        y, g = csq_grads(q, k, v, shift, dy, tile_size=chunk, **kw)
        assert_rel_close(y, base_y, 1e-12, f"y chunk {chunk}")
        for name in g:
            assert_rel_close(g[name], base_g[name], 1e-12, f"d{name} chunk {chunk}")


# --------------------------------------------------------------------------------------------
# Degenerate lengths
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@CAUSAL
def test_empty_sequence(gen, causal, dtype):
    """N == 0: an empty (B, Hq, 0, Dv) output in the input dtype; backward gives empty q, k, v
    gradients and a zero shift gradient."""
    q = randn(gen, 2, 4, 0, 3, dtype=dtype, requires_grad=True)
    k = randn(gen, 2, 2, 0, 3, dtype=dtype, requires_grad=True)
    v = randn(gen, 2, 2, 0, 5, dtype=dtype, requires_grad=True)
    shift = rand_shift(gen, 4, requires_grad=True)
    y = csq_ext.attention(q, k, v, causal=causal, shift=shift)
    assert y.shape == (2, 4, 0, 5) and y.dtype == dtype
    (y.sum() + 0.0).backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape
    assert torch.equal(shift.grad, torch.zeros(4, dtype=torch.float64))


@CAUSAL
@pytest.mark.parametrize("center", [True, False], ids=["ctr", "noctr"])
def test_single_position_closed_form(gen, causal, center):
    """N == 1: w = s^2 with s = c (centered: the key equals its mean) or tau <q, k> + c, and
    y = w v / (w + eps). Gradients: with centering, q and k do not matter at all."""
    q, k, v = make_qkv(gen, (2, 4, 2, 1, 3, 5), requires_grad=True)
    shift = rand_shift(gen, 4)
    tau, eps = 0.8, 1e-3
    y = csq_ext.attention(q, k, v, causal=causal, center=center, shift=shift, scale=tau,
                          eps=eps)
    k_, v_ = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = shift.view(1, 4, 1, 1) + (0 if center else tau * (q * k_).sum(-1, keepdim=True))
    w = s.square()
    torch.testing.assert_close(y, w * v_ / (w + eps), rtol=1e-13, atol=0)
    if center:
        dq, dk = torch.autograd.grad(y.square().sum(), (q, k))
        assert dq.abs().max() <= 1e-12 and dk.abs().max() <= 1e-12


# --------------------------------------------------------------------------------------------
# The denominator
# --------------------------------------------------------------------------------------------
@CAUSAL
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_denominator_lower_bound(gen, causal, dtype):
    """With center and normalize, den_i = n_i c^2 + tau^2 q_i^T C_i q_i >= n_i c^2 (the third
    output of csq_chunked_fwd), checked against the closed form and the bound itself."""
    B, Hq, Hk, N, D = 2, 4, 2, 29, 4
    q, k, v = make_qkv(gen, (B, Hq, Hk, N, D, 3), dtype)
    c = rand_shift(gen, Hq, torch.float64 if dtype == torch.float64 else torch.float32)
    c[0] = 0.05  # small but nonzero: the bound must still hold
    tau = 0.9
    _, _, den = call_op(q, k, v, c, causal=causal, scale=tau, tile_size=8)
    # Closed form in float64: sum over J(i) of tau^2 <q_i, k_j - mu_i>^2, plus n_i c^2.
    q64, k64 = q.double(), k.double().repeat_interleave(Hq // Hk, 1)
    n = torch.arange(1, N + 1, dtype=torch.float64) if causal else torch.full((N,), float(N))
    mu = (k64.cumsum(2) if causal else k64.sum(2, keepdim=True)) / n[:, None]
    a = torch.einsum("bhid,bhjd->bhij", q64, k64) - (q64 * mu).sum(-1)[..., None]
    if causal:
        a = a.tril()
    c64 = c.double().view(1, Hq, 1)
    expected = n * c64 ** 2 + tau ** 2 * a.square().sum(-1)
    assert_rel_close(den, expected, 1e-12 if dtype == torch.float64 else 1e-5, "den")
    lower = n * c64 ** 2
    slack = 1e-12 if dtype == torch.float64 else 1e-5
    assert (den.double() >= lower * (1 - slack)).all()
    assert (den.double() > 0).all()


# --------------------------------------------------------------------------------------------
# Structure: heads, batch, causality, permutations
# --------------------------------------------------------------------------------------------
@CAUSAL
def test_grouped_heads_equal_repeated_heads(gen, causal):
    """Hq = 4 over Hk = 2 equals Hq = Hk = 4 with each key/value head repeated for its group
    (head h reads head h // 2), gradients of q included."""
    q, k, v = make_qkv(gen, SHAPES["gqa"])
    shift = rand_shift(gen, 4)
    dy = randn(gen, 2, 4, 13, 5)
    y, g = csq_grads(q, k, v, shift, dy, causal=causal, tile_size=4)
    y_r, g_r = csq_grads(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), shift, dy,
                         causal=causal, tile_size=4)
    assert_rel_close(y, y_r, 1e-13)
    assert_rel_close(g["q"], g_r["q"], 1e-13, "dq")
    assert_rel_close(g["k"], g_r["k"].view(2, 2, 2, 13, 3).sum(2), 1e-13, "dk")
    assert_rel_close(g["v"], g_r["v"].view(2, 2, 2, 13, 5).sum(2), 1e-13, "dv")
    assert_rel_close(g["shift"], g_r["shift"], 1e-13, "dshift")


def test_batch_entries_are_independent(gen):
    """Each batch entry equals the op run on that entry alone (no cross-batch leakage in the
    parallel loop)."""
    q, k, v = make_qkv(gen, (3, 4, 2, 21, 3, 2))
    for causal in (True, False):
        y = csq(q, k, v, causal=causal, tile_size=8)
        for b in range(3):
            y_b = csq(q[b:b + 1], k[b:b + 1], v[b:b + 1], causal=causal, tile_size=8)
            assert_rel_close(y[b:b + 1], y_b, 1e-13, f"batch {b}")


@pytest.mark.parametrize("cut", [0, 5, 6, 11])
def test_causal_outputs_ignore_the_future(gen, cut):
    """Causal: changing q, k, v at positions > cut leaves y[..., :cut + 1, :] unchanged (to
    rounding) and changes the later rows."""
    q, k, v = make_qkv(gen, (2, 2, 1, 19, 4, 3))
    q2, k2, v2 = (t.clone() for t in (q, k, v))
    for t in (q2, k2, v2):
        t[:, :, cut + 1:] = randn(gen, *t[:, :, cut + 1:].shape)
    y = csq(q, k, v, tile_size=6)
    y2 = csq(q2, k2, v2, tile_size=6)
    assert_rel_close(y2[:, :, :cut + 1], y[:, :, :cut + 1], 1e-13, "past rows")
    assert rel_err(y2[:, :, cut + 1:], y[:, :, cut + 1:]) > 1e-3


def test_noncausal_permutation_equivariance(gen):
    """Non-causal: permuting positions of q, k, v together permutes the rows of y."""
    q, k, v = make_qkv(gen, (1, 2, 2, 23, 4, 3))
    perm = torch.randperm(23, generator=gen)
    y = csq(q, k, v, causal=False, tile_size=5)
    y_p = csq(q[:, :, perm], k[:, :, perm], v[:, :, perm], causal=False, tile_size=5)
    assert_rel_close(y_p, y[:, :, perm], 1e-13)


def test_normalized_rows_are_weighted_means(gen):
    """normalize with eps = 0: constant values pass through unchanged (weights sum to 1), and
    y = num / den where num is the unnormalized output and den that of v = 1."""
    q, k, v = make_qkv(gen, SHAPES["gqa"])
    for causal in (True, False):
        ones = torch.full_like(v, 3.25)
        torch.testing.assert_close(csq(q, k, ones, causal=causal, eps=0.0),
                                   torch.full((2, 4, 13, 5), 3.25, dtype=torch.float64),
                                   rtol=1e-13, atol=0)
        num = csq(q, k, v, causal=causal, normalize=False)
        den = csq(q, k, torch.ones_like(v[..., :1]), causal=causal, normalize=False)
        assert_rel_close(csq(q, k, v, causal=causal, eps=0.0), num / den, 1e-13)


def test_thread_count_does_not_change_results(gen):
    """The parallel loop over (batch, kv head) tasks: one thread and several give the same
    outputs and gradients (to rounding of the library GEMMs)."""
    q, k, v = make_qkv(gen, (2, 4, 2, 45, 6, 3))
    shift = rand_shift(gen, 4)
    dy = randn(gen, 2, 4, 45, 3)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            results.append(csq_grads(q, k, v, shift, dy, tile_size=8))
    finally:
        torch.set_num_threads(threads)
    (y1, g1), (y2, g2) = results
    assert_rel_close(y2, y1, 1e-13)
    for name in g1:
        assert_rel_close(g2[name], g1[name], 1e-13, f"d{name}")
