"""The core checks on every device present (CPU always, CUDA where a GPU is): forward and
gradients against the float64 reference, gradcheck, offset keys, strided inputs, odd lengths,
head sizes, decoding, packed batches, bad states. One list of checks, so the backends cannot
drift apart; tests/test_cuda_vs_cpu.py adds what only a GPU can show (CUDA against the CPU
backend on the same inputs, streams, memory, tensor cores).

Inputs are drawn on the CPU (float64, seeded) and moved, so every device sees the same numbers;
the reference always runs in float64 on the CPU.
"""
import itertools

import pytest
import torch

import csq_ext
from conftest import (FLOAT_DTYPES, HALF_DTYPES, SHAPES, TOL, TOL_F32_OFFSET, assert_rel_close,
                      check_float32_offset_keys, csq, csq_grads, fwd_op_args, make_qkv,
                      prefill_state, rand_shift, randn, reference, reference_grads, rel_err,
                      shift_dtype)

FLAGS = list(itertools.product([True, False], [True, False], [True, False]))
FLAG_IDS = [f"{'causal' if c else 'full'}-{'ctr' if m else 'noctr'}-{'norm' if n else 'raw'}"
            for c, m, n in FLAGS]
CAUSAL = pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
# Both algorithms on every device: "auto" would run the direct kernels at these lengths.
PATHS = pytest.mark.parametrize("path", ["direct", "chunked"])
# A device that is not the one under test, for the "wrong device" refusals.
OTHER_DEVICE = {"cpu": "meta", "cuda": "cpu"}


def _grads_check(gen, device, shape, dtype, names=None, layout="contiguous", tol=None, **kw):
    q, k, v = make_qkv(gen, shape, dtype, device=device, layout=layout)
    shift = rand_shift(gen, shape[1], shift_dtype(dtype), device=device)
    dy = randn(gen, shape[0], shape[1], shape[3], shape[5], dtype=dtype, device=device)
    y, grads = csq_grads(q, k, v, shift, dy, **kw)
    y_ref, grads_ref = reference_grads(q, k, v, shift, dy, **kw)
    tol = TOL[dtype] if tol is None else tol
    assert y.device.type == device and y.dtype == dtype
    assert_rel_close(y, y_ref, tol, "y")
    for name in names or grads_ref:
        assert grads[name].device.type == device
        assert_rel_close(grads[name], grads_ref[name], tol, f"d{name}")
    return y, grads


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("causal,center,normalize", FLAGS, ids=FLAG_IDS)
@pytest.mark.parametrize("n", [13, 67])
@PATHS
def test_forward_flags(gen, device, path, n, causal, center, normalize, dtype):
    q, k, v = make_qkv(gen, (2, 4, 2, n, 8, 5), dtype, device=device)
    shift = rand_shift(gen, 4, shift_dtype(dtype), device=device)
    kw = dict(causal=causal, center=center, normalize=normalize, scale=0.6, shift=shift)
    y = csq(q, k, v, path=path, **kw)
    assert y.device.type == device and y.dtype == dtype
    assert_rel_close(y, reference(q, k, v, **kw), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@CAUSAL
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_forward_shapes(gen, device, shape_name, causal, dtype):
    q, k, v = make_qkv(gen, SHAPES[shape_name], dtype, device=device)
    assert_rel_close(csq(q, k, v, causal=causal), reference(q, k, v, causal=causal), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@CAUSAL
@pytest.mark.parametrize("n", [1, 2, 31, 63, 64, 65, 127, 129, 1000])
@PATHS
def test_odd_lengths(gen, device, path, n, causal, dtype):
    """Lengths around multiples of the CUDA chunk (64) and of typical tile sizes."""
    q, k, v = make_qkv(gen, (1, 2, 1, n, 16, 16), dtype, device=device)
    assert_rel_close(csq(q, k, v, causal=causal, path=path), reference(q, k, v, causal=causal),
                     TOL[dtype])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded"])
@CAUSAL
@PATHS
def test_strided_inputs(gen, device, path, layout, causal, dtype):
    q, k, v = make_qkv(gen, (2, 4, 2, 70, 16, 8), dtype, device=device, layout=layout)
    assert not any(t.is_contiguous() for t in (q, k, v))
    assert_rel_close(csq(q, k, v, causal=causal, path=path), reference(q, k, v, causal=causal),
                     TOL[dtype])


@pytest.mark.parametrize("dk,dv", [(16, 16), (32, 64), (64, 64), (128, 128), (8, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_head_sizes(gen, device, dk, dv, dtype):
    """Common head sizes, every one supported on every device (the README's table)."""
    q, k, v = make_qkv(gen, (1, 2, 1, 100, dk, dv), dtype, device=device)
    assert_rel_close(csq(q, k, v), reference(q, k, v), TOL[dtype])


def test_empty_sequence(gen, device):
    q = randn(gen, 2, 4, 0, 8, device=device, dtype=torch.float32, requires_grad=True)
    k = randn(gen, 2, 2, 0, 8, device=device, dtype=torch.float32, requires_grad=True)
    v = randn(gen, 2, 2, 0, 4, device=device, dtype=torch.float32, requires_grad=True)
    y = csq_ext.attention(q, k, v)
    assert y.shape == (2, 4, 0, 4) and y.device.type == device
    y.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


# --------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("causal,center,normalize", FLAGS, ids=FLAG_IDS)
@PATHS
def test_grads_full_precision(gen, device, path, causal, center, normalize, dtype):
    _grads_check(gen, device, (2, 4, 2, 77, 8, 5), dtype, causal=causal, center=center,
                 normalize=normalize, path=path)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("causal,center", [(True, True), (True, False), (False, True),
                                           (False, False)])
@pytest.mark.parametrize("shape", [(1, 2, 1, 64, 16, 16), (2, 4, 2, 300, 32, 32),
                                   (1, 2, 2, 4096, 64, 64)], ids=["n64", "n300", "n4096"])
@PATHS
def test_grads_half(gen, device, path, shape, causal, center, dtype):
    _grads_check(gen, device, shape, dtype, names=["q", "k", "v"], causal=causal, center=center,
                 path=path)


@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded"])
@PATHS
def test_grads_strided(gen, device, path, layout):
    for causal in (True, False):
        _grads_check(gen, device, (2, 4, 2, 70, 16, 8), torch.float32, layout=layout,
                     causal=causal, path=path)


@pytest.mark.parametrize("causal,center,normalize", FLAGS, ids=FLAG_IDS)
def test_gradcheck(gen, device, causal, center, normalize):
    q, k, v = make_qkv(gen, (1, 4, 2, 11, 3, 4), device=device)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    shift = rand_shift(gen, 4, device=device, requires_grad=True)

    def fn(q, k, v, shift):
        return csq_ext.attention(q, k, v, shift=shift, causal=causal, center=center,
                                 normalize=normalize, scale=0.6, tile_size=4)
    assert torch.autograd.gradcheck(fn, (q, k, v, shift), fast_mode=False)


def test_double_backward_raises(gen, device):
    q, k, v = make_qkv(gen, SHAPES["gqa"], device=device)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    (dq,) = torch.autograd.grad(csq_ext.attention(q, k, v).square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(dq.sum(), (q, k, v), allow_unused=True)


@CAUSAL
@pytest.mark.parametrize("n", [50, 1000])
def test_float32_offset_keys(gen, device, causal, n):
    """Keys with a common offset 30x their spread, float32: outputs and gradients within 1e-4
    of the float64 reference."""
    check_float32_offset_keys(gen, causal, n, dk=32, dv=16, device=device)


@CAUSAL
def test_translation_invariance(gen, device, causal):
    q, k, v = make_qkv(gen, (2, 4, 2, 90, 16, 8))
    t = 30 * torch.sign(randn(gen, 16))
    y = csq(q.to(device, torch.float32), (k + t).to(device, torch.float32), v.to(device, torch.float32),
            causal=causal)
    assert_rel_close(y, reference(q, k, v, causal=causal), TOL_F32_OFFSET)
    y64 = csq(q.to(device), k.to(device), v.to(device), causal=causal)
    y64_t = csq(q.to(device), (k + t).to(device), v.to(device), causal=causal)
    assert_rel_close(y64_t, y64, 1e-10)


@CAUSAL
def test_nan_in_v_stays_causal(gen, device, causal):
    q, k, v = make_qkv(gen, (1, 2, 1, 100, 8, 4), device=device)
    v[0, 0, 70, 1] = float("nan")
    y = csq(q, k, v, causal=causal)
    bad = ~torch.isfinite(y)
    first = 70 if causal else 0
    assert bad[0, :, first:, 1].all()
    bad[0, :, first:, 1] = False
    assert not bad.any()


def test_opcheck(gen, device):
    q, k, v = make_qkv(gen, SHAPES["gqa"], torch.float32, device=device)
    shift = rand_shift(gen, 4, torch.float32, device=device)
    for rg in (False, True):
        args = [t.detach().requires_grad_(rg) for t in (q, k, v, shift)]
        torch.library.opcheck(torch.ops.csq_ext.csq_chunked_fwd.default,
                              fwd_op_args(*args, True, 0.5, True, True, 1e-6, 0))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_decode_steps_equal_one_call(gen, device, dtype):
    """An empty state, then token by token, equals the one-call reference; strided
    single-token views are fine."""
    B, Hq, Hk, N, Dk, Dv = 2, 4, 2, 150, 8, 5
    q, k, v = make_qkv(gen, (B, Hq, Hk, N, Dk, Dv), dtype, device=device, layout="transposed")
    shift = rand_shift(gen, Hq, shift_dtype(dtype), device=device)
    state = csq_ext.CSQState.empty(B, Hk, Dk, Dv, dtype=shift_dtype(dtype), device=device)
    out = torch.empty(B, Hq, 1, Dv, dtype=dtype, device=device)
    ys = [csq_ext.decode_(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state, out=out,
                          shift=shift).clone() for t in range(N)]
    assert_rel_close(torch.cat(ys, 2), reference(q, k, v, shift=shift), TOL[dtype])
    assert state.count.eq(N).all()


def test_decode_float32_offset_keys(gen, device):
    """A prefill state (ref = mean of the first keys) keeps float32 decoding accurate when keys
    share an offset 30x their spread."""
    (q, k, v), st = prefill_state(gen, 1, 2, 1, 300, 16, 16, torch.float64,
                                  torch.ones(2, dtype=torch.float64), key_offset=30.0)
    q2, k2, v2 = (randn(gen, 1, h, 100, d) for h, d in ((2, 16), (1, 16), (1, 16)))
    k2 = k2 + 30.0
    expected = reference(torch.cat([q, q2], 2), torch.cat([k, k2], 2), torch.cat([v, v2], 2))
    st = st.to(device, torch.float32)
    ys = [csq_ext.decode_(*(t[:, :, i:i + 1].to(device, torch.float32) for t in (q2, k2, v2)),
                          st).clone() for i in range(100)]
    assert rel_err(torch.cat(ys, 2).cpu().double(), expected[:, :, 300:]) <= TOL_F32_OFFSET


def test_decode_rejects_bad_states(gen, device):
    q, k, v = (randn(gen, 1, h, 1, 4, dtype=torch.float32, device=device) for h in (2, 1, 1))
    state = csq_ext.CSQState.empty(1, 1, 4, 4, device=device)
    with pytest.raises((ValueError, RuntimeError), match="device"):
        csq_ext.decode_(q, k, v, state.to(OTHER_DEVICE[device]))
    # float64 is accepted for any inputs (docs/SPEC.md, section 3); another dtype is not.
    with pytest.raises((ValueError, RuntimeError), match="float32"):
        csq_ext.decode_(q, k, v, state.to(torch.bfloat16))


# --------------------------------------------------------------------------------------------
# Streaming: packed variable-length batches (cu_seqlens)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@CAUSAL
def test_varlen_equals_per_sequence_calls(gen, device, causal, index_dtype, dtype):
    """Segments of length 1, 0, a multiple of the CUDA chunk (64) and not: forward and
    gradients of one packed call equal per-segment calls (and the reference)."""
    cu = torch.tensor([0, 1, 65, 65, 129, 200, 201, 330], dtype=index_dtype)
    T = int(cu[-1])
    q, k, v = make_qkv(gen, (1, 4, 2, T, 8, 5), dtype, device=device)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    shift = rand_shift(gen, 4, shift_dtype(dtype), device=device, requires_grad=True)
    dy = randn(gen, 1, 4, T, 5, dtype=dtype, device=device)
    y = csq_ext.attention(q, k, v, causal=causal, shift=shift, cu_seqlens=cu.to(device))
    grads = torch.autograd.grad(y, (q, k, v, shift), dy)
    ys, gs = [], [torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), 0]
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        yi = csq_ext.attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], causal=causal,
                               shift=shift)
        ys.append(yi)
        if b > a:
            gi = torch.autograd.grad(yi, (q, k, v, shift), dy[:, :, a:b])
            gs = [x + z for x, z in zip(gs, gi)]
    tol = TOL[dtype]
    assert_rel_close(y, torch.cat(ys, 2), tol, "y")
    ref = torch.cat([reference(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], shift=shift,
                               causal=causal) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())],
                    2)
    assert_rel_close(y, ref, tol, "y vs reference")
    for name, a, b in zip("q k v shift".split(), grads, gs):
        assert_rel_close(a, b, tol, f"d{name}")


def test_varlen_many_sequences(gen, device):
    """More sequences than one block of the chunk-map scan (256), most of them tiny."""
    lens = torch.randint(0, 5, (700,), generator=gen)
    lens[10] = 300
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)])
    T = int(cu[-1])
    q, k, v = make_qkv(gen, (1, 2, 1, T, 4, 3), torch.float32, device=device)
    for causal in (True, False):
        y = csq_ext.attention(q, k, v, causal=causal, cu_seqlens=cu)
        ref = torch.cat([reference(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], causal=causal)
                         for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], 2)
        assert_rel_close(y, ref, TOL[torch.float32])


def test_bad_states_are_rejected(gen, device):
    """A state on the wrong device, or with causal=False, is refused with a clear message."""
    q, k, v = make_qkv(gen, (1, 2, 1, 10, 4, 3), torch.float32, device=device)
    _, st = csq_ext.attention(q, k, v, return_state=True)
    with pytest.raises(ValueError, match="device"):
        csq_ext.attention(q, k, v, initial_state=st.to(OTHER_DEVICE[device]))
    with pytest.raises(ValueError, match="causal"):
        csq_ext.attention(q, k, v, causal=False, initial_state=st)
    with pytest.raises(ValueError, match="return_state needs causal"):
        csq_ext.attention(q, k, v, causal=False, return_state=True)
