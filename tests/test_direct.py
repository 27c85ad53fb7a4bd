"""The two exact algorithms, forced one at a time (``path="direct"`` / ``"chunked"``) on the
same configurations, against the float64 reference; the direct path's own edge cases (tile
boundaries, head sizes up to 256, offset keys, NaN, causality, packed sequences); its
operators under gradcheck, opcheck and torch.compile; and the automatic choice."""
import itertools
import sys

import pytest
import torch

import csq_ext
from csq_ext import CSQState
from csq_ext._cost import choose_path
from conftest import (FLOAT_DTYPES, TOL, assert_rel_close, check_float32_offset_keys, csq,
                      csq_grads, make_qkv, rand_shift, randn, reference, reference_grads,
                      shift_dtype)

PATHS = ["direct", "chunked"]
FLAGS = list(itertools.product([True, False], [True, False], [True, False]))
FLAG_IDS = [f"{'causal' if c else 'full'}-{'ctr' if m else 'noctr'}-{'norm' if n else 'raw'}"
            for c, m, n in FLAGS]
ops = torch.ops.csq_ext


def _check(gen, shape, dtype, path, layout="contiguous", tol=None, floor=0.0, **kw):
    """Output and gradients (q, k, v, shift tensor) of one forced path against the
    reference (``floor``: see conftest.rel_err)."""
    B, Hq, _, N, _, Dv = shape
    q, k, v = make_qkv(gen, shape, dtype, layout=layout)
    shift = rand_shift(gen, Hq, shift_dtype(dtype))
    dy = randn(gen, B, Hq, N, Dv, dtype=shift_dtype(dtype))
    y, grads = csq_grads(q, k, v, shift, dy, path=path, **kw)
    y_ref, grads_ref = reference_grads(q, k, v, shift, dy, **kw)
    tol = TOL[dtype] if tol is None else tol
    assert y.dtype == dtype
    assert_rel_close(y, y_ref, tol, "y")
    for name, g in grads.items():
        assert_rel_close(g, grads_ref[name], tol, f"d{name}", floor=floor)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("causal,center,normalize", FLAGS, ids=FLAG_IDS)
def test_paths_match_reference(gen, path, dtype, causal, center, normalize):
    """GQA (Hq = 4 over Hk = 2), Dk = 3 != Dv = 5, N = 13 over blocks of 4 (three full tiles
    and a partial one), custom scale and eps, a per-head shift tensor with its gradient."""
    _check(gen, (2, 4, 2, 13, 3, 5), dtype, path, causal=causal, center=center,
           normalize=normalize, scale=0.6, eps=0.05, tile_size=4)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded"])
def test_strided_inputs(gen, path, layout):
    _check(gen, (2, 3, 1, 21, 6, 4), torch.float64, path, layout=layout, tile_size=8)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("n", [1, 2, 127, 128, 129, 300])
def test_direct_lengths_around_the_default_tile(gen, causal, n):
    """The default tile (128): one row, a partial tile, exactly one, one more, several. (At
    N = 1 the gradients of q and k vanish in exact arithmetic: measured against a floor.)"""
    _check(gen, (1, 2, 1, n, 8, 8), torch.float64, "direct", floor=1.0 if n == 1 else 0.0,
           causal=causal)


@pytest.mark.parametrize("path", PATHS)
def test_empty_sequence(gen, path):
    q, k, v = make_qkv(gen, (1, 2, 1, 0, 4, 3))
    y = csq(q, k, v, path=path)
    assert y.shape == (1, 2, 0, 3)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dk,dv", [(256, 256), (256, 32), (32, 256)])
def test_head_sizes_up_to_256(gen, path, dk, dv):
    """Gemma-style heads of 256, float32, forward and backward; N spans two chunks/tiles of
    the default size on neither path, so both run their partial-block code."""
    _check(gen, (1, 2, 1, 70, dk, dv), torch.float32, path)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("n", [100, 1000])
def test_direct_float32_offset_keys(gen, causal, n):
    """Keys 30x their spread away from 0, float32: within 1e-4 (the tile reference removes the
    offset before the products)."""
    check_float32_offset_keys(gen, causal, n, dk=32, dv=16, path="direct", tile_size=64)


@pytest.mark.parametrize("onednn", [True, False], ids=["microkernel", "blas"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_cpu_gemm_backends(gen, monkeypatch, onednn, path, causal):
    """float32 tile and state products run on oneDNN's GEMM microkernel, or on BLAS with
    torch.backends.mkldnn off (csrc/cpu/csq_gemm.h): both within tolerance of the float64
    reference, forward and backward, over several tiles / chunks and a partial one."""
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", onednn)
    _check(gen, (1, 4, 2, 300, 64, 48), torch.float32, path, causal=causal, tile_size=64)


@pytest.mark.parametrize("store", ["whole", "per-tile"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_direct_drifting_keys(gen, monkeypatch, store, dtype):
    """Causal, keys whose mean drifts along the sequence (a ramp of 5 spreads over N), so every
    key tile has its own reference r_j and a query tile reading it corrects its shifts and dq
    by <q, r_j - r_i>. Keys converted once per sequence, or per tile
    (CSQ_CPU_KEY_STORE_MAX_ELEMS=0). GQA, tiles of 16, a partial last tile."""
    if store == "per-tile":
        monkeypatch.setenv("CSQ_CPU_KEY_STORE_MAX_ELEMS", "0")
    B, Hq, Hk, N, Dk, Dv = 2, 4, 2, 150, 8, 6
    ramp = torch.linspace(0, 5, N, dtype=torch.float64).view(1, 1, N, 1)
    q = randn(gen, B, Hq, N, Dk, dtype=dtype)
    k = (randn(gen, B, Hk, N, Dk) + ramp * torch.sign(randn(gen, 1, Hk, 1, Dk))).to(dtype)
    v = randn(gen, B, Hk, N, Dv, dtype=dtype)
    shift = rand_shift(gen, Hq, dtype)
    dy = randn(gen, B, Hq, N, Dv, dtype=dtype)
    y, grads = csq_grads(q, k, v, shift, dy, path="direct", tile_size=16)
    y_ref, grads_ref = reference_grads(q, k, v, shift, dy)
    assert_rel_close(y, y_ref, TOL[dtype], "y")
    for name, g in grads.items():
        assert_rel_close(g, grads_ref[name], TOL[dtype], f"d{name}")


@pytest.mark.parametrize("n", [64, 1000])
def test_direct_float32_standard_normal(gen, n):
    _check(gen, (1, 4, 2, n, 64, 64), torch.float32, "direct", tile_size=128)


@pytest.mark.parametrize("what", ["k", "v", "q"])
def test_direct_nan_reaches_exactly_its_rows(gen, what):
    """A NaN key or value at position p reaches rows i >= p only (all columns for a key, its
    column for a value); a NaN query only its own row. p sits inside a tile, after the
    tile's first row, so the masked part of the diagonal tile holds it."""
    q, k, v = make_qkv(gen, (1, 2, 1, 40, 4, 3))
    p = 13
    {"q": q, "k": k, "v": v}[what][0, 0, p, 1] = float("nan")
    y = csq(q, k, v, path="direct", tile_size=8)
    bad = ~torch.isfinite(y)
    expect = torch.zeros_like(bad)
    if what == "q":
        expect[0, 0, p, :] = True
    elif what == "k":
        expect[0, :, p:, :] = True
    else:
        expect[0, :, p:, 1] = True
    assert torch.equal(bad, expect)


@pytest.mark.parametrize("p", [1, 8, 13, 31])
def test_direct_is_causal(gen, p):
    """Outputs before position p are bit-for-bit the same whatever the keys and values at p
    and later (including a huge offset), tile boundary or not."""
    q, k, v = make_qkv(gen, (1, 2, 1, 40, 4, 3), torch.float32)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, p:] = randn(gen, 1, 1, 40 - p, 4, dtype=torch.float32) + 1e4
    v2[:, :, p:] = randn(gen, 1, 1, 40 - p, 3, dtype=torch.float32)
    y1 = csq(q, k, v, path="direct", tile_size=8)
    y2 = csq(q, k2, v2, path="direct", tile_size=8)
    assert torch.equal(y1[:, :, :p], y2[:, :, :p])
    assert not torch.equal(y1[:, :, p:], y2[:, :, p:])


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_direct_cu_seqlens(gen, causal):
    """Packed sequences (one empty, one shorter than a tile, one spanning tiles) equal each
    sequence alone, outputs and gradients, shift tensor included."""
    lengths = [5, 0, 17, 9]
    cu = torch.tensor([0] + list(itertools.accumulate(lengths)))
    T, Hq, Hk, Dk, Dv = sum(lengths), 4, 2, 3, 4
    q, k, v = make_qkv(gen, (1, Hq, Hk, T, Dk, Dv))
    shift = rand_shift(gen, Hq)
    dy = randn(gen, 1, Hq, T, Dv)
    y, grads = csq_grads(q, k, v, shift, dy, causal=causal, cu_seqlens=cu, tile_size=4,
                         path="direct")
    dshift = torch.zeros_like(shift)
    for s0, s1 in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if s1 == s0:
            continue
        part = slice(s0, s1)
        y_ref, g_ref = reference_grads(q[:, :, part], k[:, :, part], v[:, :, part], shift,
                                       dy[:, :, part], causal=causal)
        assert_rel_close(y[:, :, part], y_ref, 1e-10, "y")
        for name in "qkv":
            assert_rel_close(grads[name][:, :, part], g_ref[name], 1e-10, f"d{name}")
        dshift += g_ref["shift"]
    assert_rel_close(grads["shift"], dshift, 1e-10, "dshift")


@pytest.mark.parametrize("causal,center,normalize", FLAGS, ids=FLAG_IDS)
def test_direct_gradcheck(gen, causal, center, normalize):
    q, k, v = make_qkv(gen, (1, 4, 2, 11, 3, 4), requires_grad=True)
    shift = rand_shift(gen, 4, requires_grad=True)

    def fn(q, k, v, shift):
        return csq_ext.attention(q, k, v, shift=shift, causal=causal, center=center,
                                 normalize=normalize, scale=0.6, tile_size=4, path="direct")
    assert torch.autograd.gradcheck(fn, (q, k, v, shift), fast_mode=False)


def test_direct_opcheck(gen):
    """The direct ops' fake kernels and autograd wiring, without and with a carried state and a
    returned one (the op computes the state itself; its schema is csq_chunked_fwd's)."""
    q, k, v = make_qkv(gen, (2, 4, 2, 13, 3, 5), torch.float32)
    shift = rand_shift(gen, 4, torch.float32)
    _, st = csq_ext.attention(*make_qkv(gen, (2, 4, 2, 9, 3, 5), torch.float32),
                              return_state=True)
    for rg in (False, True):
        args = [t.detach().requires_grad_(rg) for t in (q, k, v, shift)]
        torch.library.opcheck(ops.csq_direct_fwd.default,
                              (*args, None, None, None, True, 0.5, True, True, 1e-6, 4, False))
        state = [t.detach().requires_grad_(rg) for t in (st.sums, st.ref)]
        torch.library.opcheck(ops.csq_direct_fwd.default,
                              (*args, None, *state, True, 0.5, True, True, 1e-6, 4, True))
    y, b, den, _, ref = ops.csq_direct_fwd(q, k, v, shift, None, None, None, True, 0.5, True,
                                           True, 1e-6, 4, False)
    dy = randn(gen, *y.shape, dtype=torch.float32)
    torch.library.opcheck(ops.csq_direct_bwd.default,
                          (dy, q, k, v, shift, None, None, ref, y, b, den, None, None, False, True,
                           0.5, True, True, 1e-6, 4))
    y, b, den, sums, ref = ops.csq_direct_fwd(q, k, v, shift, None, st.sums, st.ref, True, 0.5,
                                              True, True, 1e-6, 4, True)
    torch.library.opcheck(ops.csq_direct_bwd.default,
                          (dy, q, k, v, shift, None, st.sums, ref, y, b, den,
                           torch.randn_like(sums), torch.randn_like(ref), True, True, 0.5, True,
                           True, 1e-6, 4))


def test_direct_compile_fullgraph(gen):
    """Forward and backward in one compiled function, forced and automatic, equal to eager."""
    def step(q, k, v, shift, path):
        y = csq_ext.attention(q, k, v, shift=shift, tile_size=4, path=path)
        return y.detach(), torch.autograd.grad(y.square().sum(), (q, k, v, shift))

    q, k, v = (t.requires_grad_() for t in make_qkv(gen, (2, 4, 2, 11, 4, 3), torch.float32,
                                                     layout="transposed"))
    shift = rand_shift(gen, 4, torch.float32, requires_grad=True)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        for path in ("direct", "auto"):
            y_c, g_c = compiled(q, k, v, shift, path)
            y_e, g_e = step(q, k, v, shift, path)
            torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-6)
            for a, b in zip(g_c, g_e):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_direct_state_compile_fullgraph(gen):
    """A piece continuing a state and returning the next, compiled in one graph (the op carries
    the state itself: no graph break), equal to eager with gradients into the carried sums and
    ref."""
    def step(q, k, v, sums, ref):
        y, st = csq_ext.attention(q, k, v, initial_state=CSQState(sums, ref), return_state=True,
                                  path="direct")
        loss = y.square().sum() + st.sums.sum()
        return y.detach(), torch.autograd.grad(loss, (q, k, v, sums, ref))

    _, s0 = csq_ext.attention(*make_qkv(gen, (2, 4, 2, 30, 4, 3), torch.float32),
                              return_state=True)
    q, k, v = (t.requires_grad_() for t in make_qkv(gen, (2, 4, 2, 11, 4, 3), torch.float32))
    sums, ref = s0.sums.requires_grad_(), s0.ref.requires_grad_()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        y_c, g_c = compiled(q, k, v, sums, ref)
    y_e, g_e = step(q, k, v, sums, ref)
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_double_backward_is_refused(gen):
    q, k, v = make_qkv(gen, (1, 2, 1, 6, 3, 2), requires_grad=True)
    y = csq_ext.attention(q, k, v, path="direct")
    (g,) = torch.autograd.grad(y.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


# --------------------------------------------------------------------------------------------
# The automatic choice
# --------------------------------------------------------------------------------------------
def test_auto_choice_both_outcomes():
    """Short sequences and large heads go direct; long sequences with small heads chunked;
    a device without a direct kernel always chunked; CUDA has its own (uncalibrated)
    constants."""
    assert choose_path(1024, 64, 64, True, "cpu", 2, 4, False) == "direct"
    assert choose_path(65536, 32, 32, True, "cpu", 2, 4, False) == "chunked"
    assert choose_path(4096, 256, 256, True, "cpu", 2, 4, False) == "direct"
    assert choose_path(512, 64, 64, True, "mps", 2, 4, False) == "chunked"
    assert choose_path(512, 64, 64, True, "cuda", 2, 4, False) == "direct"
    assert choose_path(65536, 32, 32, True, "cuda", 2, 4, False) == "chunked"
    # Heads up to 256 run on both CUDA paths: the cost model picks (chunked at this length).
    # Larger ones on neither: they go direct, whose op refuses them with its message.
    assert choose_path(1 << 20, 192, 64, True, "cuda", 2, 4, False) == "chunked"
    assert choose_path(1 << 20, 320, 64, True, "cuda", 2, 4, False) == "direct"
    # The direct path uses every thread for one head, the chunked one a thread per head.
    n = next(n for n in range(64, 1 << 20, 64)
             if choose_path(n, 16, 16, True, "cpu", 8, 8, False) == "chunked")
    assert choose_path(n, 16, 16, True, "cpu", 8, 1, False) == "direct"


def test_auto_tells_the_model_whether_a_backward_follows(gen, monkeypatch):
    """attention() passes grad=True exactly when autograd will need a backward: an input that
    requires grad, with grad mode on."""
    api = sys.modules["csq_ext.attention"]  # the module (the package exports the function)
    seen = []
    monkeypatch.setattr(api, "choose_path", lambda *a, **kw: seen.append(a[-1]) or "chunked")
    q, k, v = make_qkv(gen, (1, 2, 1, 16, 4, 4), torch.float32)
    csq_ext.attention(q, k, v)
    csq_ext.attention(q, k.requires_grad_(), v)
    with torch.no_grad():
        csq_ext.attention(q, k, v)
    csq_ext.attention(q, k.detach(), v, shift=torch.ones(2, requires_grad=True))
    assert seen == [False, True, False, True]


def test_auto_choice_knows_a_backward_follows():
    """With a backward to come (grad=True) the model uses the paths' forward + backward
    rates, whose ratio differs from the forwards' (the chunked backward is relatively dearer
    at Dk >= 64): the crossovers move, and each is where the model's own costs cross."""
    from csq_ext._cost import chunked_cost, crossover, direct_cost
    for d, causal in [(64, True), (128, True), (128, False)]:
        fwd, train = crossover(d, d, causal, 2, 4), crossover(d, d, causal, 2, 4, grad=True)
        assert fwd and train and fwd != train
        for n, g in [(fwd - 64, False), (train - 64, True)]:
            assert direct_cost(n, d, d, causal, 2, 4, g) <= chunked_cost(n, d, d, causal, 2, 4, g)
        for n, g in [(fwd, False), (train, True)]:
            assert direct_cost(n, d, d, causal, 2, 4, g) > chunked_cost(n, d, d, causal, 2, 4, g)


@pytest.mark.parametrize("n,d", [(64, 16), (2048, 4)])
def test_auto_runs_the_chosen_path(gen, n, d):
    """"auto" gives bit-for-bit the output of the path the cost model names (direct at the
    first point, chunked at the second), and that output matches the reference."""
    q, k, v = make_qkv(gen, (1, 2, 2, n, d, d), torch.float32)
    chosen = choose_path(n, d, d, True, "cpu", torch.get_num_threads(), 2, False)
    assert chosen == ("direct" if n == 64 else "chunked")
    y = csq(q, k, v)
    assert torch.equal(y, csq(q, k, v, path=chosen))
    assert_rel_close(y, reference(q, k, v), TOL[torch.float32])


def test_bad_path_is_refused(gen):
    q, k, v = make_qkv(gen, (1, 2, 1, 6, 3, 2))
    with pytest.raises(ValueError, match="path must be 'auto', 'direct' or 'chunked'"):
        csq_ext.attention(q, k, v, path="fast")
    with pytest.raises(ValueError, match="path must be"):
        csq_ext.attention(q, k, v, path=None)


# --------------------------------------------------------------------------------------------
# Carried state on the direct path (the op's: csrc/cpu/csq_direct_state_cpu.h)
# --------------------------------------------------------------------------------------------
def _state_run(path, q, k, v, shift, sums, ref, **kw):
    y, st = csq_ext.attention(q, k, v, shift=shift, initial_state=CSQState(sums, ref),
                              return_state=True, path=path, **kw)
    return y, st.sums, st.ref


@pytest.mark.parametrize("center,normalize", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("shape", [(2, 4, 2, 70, 6, 5), (1, 3, 1, 150, 16, 33),
                                   (1, 2, 2, 1, 4, 4)], ids=["gqa", "mqa-long", "n1"])
def test_direct_state_equals_chunked_state(gen, shape, center, normalize):
    """Continuing a carried state and returning the next: the direct path gives the chunked
    path's output, state (sums, ref) and every gradient (q, k, v, shift, sums, ref) in
    float64, with keys that share an offset."""
    B, Hq, Hk, N, Dk, Dv = shape
    _, s0 = csq_ext.attention(*make_qkv(gen, (B, Hq, Hk, 40, Dk, Dv)), return_state=True)
    q, k, v = make_qkv(gen, shape)
    k = (k + 3.0).detach()
    shift = rand_shift(gen, Hq, torch.float64)
    sums = (s0.sums * (1 + 0.1 * randn(gen, *s0.sums.shape))).detach()
    ref = s0.ref.detach()
    inputs = [t.detach().requires_grad_() for t in (q, k, v, shift, sums, ref)]
    dy = randn(gen, B, Hq, N, Dv)
    dsums, dref = randn(gen, *sums.shape), randn(gen, *ref.shape)
    results = {}
    for path in ("direct", "chunked"):
        y, so, ro = _state_run(path, *inputs, center=center, normalize=normalize)
        loss = (y * dy).sum() + (so * dsums).sum() + (ro * dref).sum()
        results[path] = (y, so, ro, torch.autograd.grad(loss, inputs))
    (yd, sd, rd, gd), (yc, sc, rc, gc) = results["direct"], results["chunked"]
    assert_rel_close(yd, yc, 1e-10, "y")
    assert_rel_close(sd, sc, 1e-10, "sums")
    assert torch.equal(rd, rc)
    for name, a, b in zip("q k v shift sums ref".split(), gd, gc):
        assert_rel_close(a, b, 1e-9, f"d{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_direct_state_pieces_match_reference(gen, dtype):
    """A sequence in three pieces on the direct path (prefill returning a state, a piece
    continuing it, a last piece) against the float64 reference of the whole sequence."""
    shape = (2, 4, 2, 200, 16, 8)
    q, k, v = make_qkv(gen, shape, dtype)
    shift = rand_shift(gen, 4, shift_dtype(dtype))
    ys, st = [], None
    for a, b in ((0, 77), (77, 150), (150, 200)):
        y, st = csq_ext.attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], shift=shift,
                                  initial_state=st, return_state=True, path="direct")
        ys.append(y)
    assert st.count.eq(200).all() and st.sums.dtype == torch.float32
    assert_rel_close(torch.cat(ys, 2), reference(q, k, v, shift=shift), TOL[dtype], "y")


def test_direct_state_feature_blocks(gen):
    """The state is read and built in blocks of rows (tiles, and blocks of at most 64 stacked
    query rows within a tile): any block size gives the same output, state and gradients."""
    q, k, v = make_qkv(gen, (2, 4, 2, 90, 5, 3))
    _, s0 = csq_ext.attention(q[:, :, :30], k[:, :, :30], v[:, :, :30], return_state=True)
    inputs = [t.detach().requires_grad_() for t in (q[:, :, 30:], k[:, :, 30:], v[:, :, 30:])]

    def run(tile):
        y, st = csq_ext.attention(*inputs, initial_state=s0, return_state=True, path="direct",
                                  tile_size=tile)
        return (y, st.sums, *torch.autograd.grad(y.sum() + st.sums.square().sum(), inputs))

    one_block = run(64)
    for tile in (3, 17, None):
        for a, b in zip(run(tile), one_block):
            assert_rel_close(a, b, 1e-12)


def test_direct_state_nan_stays_in_its_sequence(gen):
    """A NaN in one sequence's carried sums reaches that sequence's outputs only; the other
    batch entry is exact."""
    q, k, v = make_qkv(gen, (2, 2, 1, 20, 4, 3))
    _, st = csq_ext.attention(q, k, v, return_state=True, path="direct")
    sums = st.sums.clone()
    sums[0, 0, 3, 1] = float("nan")
    y = csq_ext.attention(q, k, v, initial_state=CSQState(sums, st.ref), path="direct")
    assert torch.isnan(y[0]).any() and torch.isfinite(y[1]).all()
    y_ok = csq_ext.attention(q, k, v, initial_state=st, path="chunked")
    assert_rel_close(y[1], y_ok[1], 1e-10)


def test_auto_takes_the_direct_path_with_a_state_when_cheaper(gen):
    """A state costs the direct path O(N Dk^2 Dv) more in torch (the chunked scan reads and
    builds it anyway), so the choice follows bench/bench_state.py's prefills returning their
    state (B = 1, H = 4, causal; bench/results/cpu_state*.json): on one thread chunked at
    D = 32 / 64 / 128 (measured 1.4-2x faster chunked) and direct at D = 256, N = 256 (1.11x
    faster direct); chunked on two threads (1.5-3.2x faster chunked below D = 256). Reading
    and returning both is never cheaper direct; packed sequences with a state stay chunked.
    auto gives the chosen path's output bit for bit."""
    assert choose_path(256, 256, 256, True, "cpu", 1, 4, returns_state=True) == "direct"
    assert choose_path(1024, 32, 32, True, "cpu", 1, 4, returns_state=True) == "chunked"
    assert choose_path(1024, 128, 128, True, "cpu", 1, 4, returns_state=True) == "chunked"
    assert choose_path(256, 64, 64, True, "cpu", 1, 4, returns_state=True) == "chunked"
    assert choose_path(1024, 128, 128, True, "cpu", 2, 4, returns_state=True) == "chunked"
    assert choose_path(256, 64, 64, True, "cpu", 2, 4, returns_state=True) == "chunked"
    assert choose_path(4096, 64, 64, True, "cpu", 2, 4) == "direct"
    assert choose_path(256, 128, 128, True, "cpu", 1, 4, True, True) == "chunked"
    assert choose_path(256, 256, 256, True, "cpu", 1, 4, True, packed=True) == "chunked"
    assert choose_path(1 << 20, 320, 64, True, "cuda", 2, 4, True) == "direct"
    q, k, v = make_qkv(gen, (1, 4, 4, 256, 64, 64), torch.float32)
    chosen = choose_path(256, 64, 64, True, "cpu", torch.get_num_threads(), 4,
                         returns_state=True)
    y, st = csq_ext.attention(q, k, v, return_state=True)
    y_c, st_c = csq_ext.attention(q, k, v, return_state=True, path=chosen)
    assert torch.equal(y, y_c) and torch.equal(st.sums, st_c.sums)
