"""The core checks on CUDA: forward and gradients against the float64 reference, gradcheck,
CUDA against CPU, offset keys, strided inputs, odd lengths, memory. Skipped without a GPU.

Inputs are drawn on the CPU (float64, seeded) and moved, so CPU and CUDA runs see the same
numbers; the reference always runs in float64 (on the CPU for short sequences, row-blocked on
the GPU for long ones).
"""
import itertools

import pytest
import torch

import csq_ext
from conftest import (FLOAT_DTYPES, HALF_DTYPES, SHAPES, TOL, TOL_F32_OFFSET, assert_rel_close,
                      check_float32_offset_keys, csq, csq_grads, make_qkv, poisoned_memory,
                      rand_shift, randn, reference, reference_blocked, reference_grads, rel_err)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEV = "cuda"
FLAGS = list(itertools.product([True, False], [True, False], [True, False]))
FLAG_IDS = [f"{'causal' if c else 'full'}-{'ctr' if m else 'noctr'}-{'norm' if n else 'raw'}"
            for c, m, n in FLAGS]
CAUSAL = pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])


def _shift_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grads_check(gen, shape, dtype, names=None, layout="contiguous", tol=None, **kw):
    q, k, v = make_qkv(gen, shape, dtype, device=DEV, layout=layout)
    shift = rand_shift(gen, shape[1], _shift_dtype(dtype), device=DEV)
    dy = randn(gen, shape[0], shape[1], shape[3], shape[5], dtype=dtype, device=DEV)
    y, grads = csq_grads(q, k, v, shift, dy, **kw)
    y_ref, grads_ref = reference_grads(q, k, v, shift, dy, **kw)
    tol = TOL[dtype] if tol is None else tol
    assert y.device.type == "cuda" and y.dtype == dtype
    assert_rel_close(y, y_ref, tol, "y")
    for name in names or grads_ref:
        assert grads[name].device.type == "cuda"
        assert_rel_close(grads[name], grads_ref[name], tol, f"d{name}")
    return y, grads


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("causal,center,normalize", FLAGS, ids=FLAG_IDS)
@pytest.mark.parametrize("n", [13, 67])
def test_cuda_forward_flags(gen, n, causal, center, normalize, dtype):
    q, k, v = make_qkv(gen, (2, 4, 2, n, 8, 5), dtype, device=DEV)
    shift = rand_shift(gen, 4, _shift_dtype(dtype), device=DEV)
    kw = dict(causal=causal, center=center, normalize=normalize, scale=0.6, shift=shift)
    y = csq(q, k, v, **kw)
    assert y.device.type == "cuda" and y.dtype == dtype
    assert_rel_close(y, reference(q, k, v, **kw), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@CAUSAL
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_cuda_forward_shapes(gen, shape_name, causal, dtype):
    q, k, v = make_qkv(gen, SHAPES[shape_name], dtype, device=DEV)
    assert_rel_close(csq(q, k, v, causal=causal), reference(q, k, v, causal=causal), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@CAUSAL
@pytest.mark.parametrize("n", [1, 2, 31, 63, 64, 65, 127, 129, 1000])
def test_cuda_odd_lengths(gen, n, causal, dtype):
    """Lengths around multiples of the CUDA chunk (64) and of typical tile sizes."""
    q, k, v = make_qkv(gen, (1, 2, 1, n, 16, 16), dtype, device=DEV)
    assert_rel_close(csq(q, k, v, causal=causal), reference(q, k, v, causal=causal), TOL[dtype])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded"])
@CAUSAL
def test_cuda_strided_inputs(gen, layout, causal, dtype):
    q, k, v = make_qkv(gen, (2, 4, 2, 70, 16, 8), dtype, device=DEV, layout=layout)
    assert not any(t.is_contiguous() for t in (q, k, v))
    assert_rel_close(csq(q, k, v, causal=causal), reference(q, k, v, causal=causal), TOL[dtype])


@pytest.mark.parametrize("dk,dv", [(16, 16), (32, 64), (64, 64), (128, 128), (8, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_head_sizes(gen, dk, dv, dtype):
    """Common head sizes. A size the kernel does not support must raise an error that names
    the head size, never return numbers."""
    q, k, v = make_qkv(gen, (1, 2, 1, 100, dk, dv), dtype, device=DEV)
    try:
        y = csq(q, k, v)
    except (ValueError, RuntimeError) as e:
        assert "Dk" in str(e) or "Dv" in str(e) or "head" in str(e), str(e)
        pytest.skip(f"head sizes ({dk}, {dv}) unsupported on CUDA: {e}")
    assert_rel_close(y, reference(q, k, v), TOL[dtype])


def test_cuda_empty_sequence(gen):
    q = randn(gen, 2, 4, 0, 8, device=DEV, dtype=torch.float32, requires_grad=True)
    k = randn(gen, 2, 2, 0, 8, device=DEV, dtype=torch.float32, requires_grad=True)
    v = randn(gen, 2, 2, 0, 4, device=DEV, dtype=torch.float32, requires_grad=True)
    y = csq_ext.attention(q, k, v)
    assert y.shape == (2, 4, 0, 4) and y.device.type == "cuda"
    y.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@CAUSAL
def test_cuda_half_long_sequence(gen, causal, dtype):
    """bf16 / fp16 at N = 65536 (the spec's upper length) against a row-blocked float64
    reference on the GPU."""
    n = 65536
    q, k, v = make_qkv(gen, (1, 1, 1, n, 32, 32), dtype, device=DEV)
    y = csq(q, k, v, causal=causal)
    assert_rel_close(y, reference_blocked(q, k, v, causal=causal, block=2048), TOL[dtype])


# --------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("causal,center,normalize", FLAGS, ids=FLAG_IDS)
def test_cuda_grads_full_precision(gen, causal, center, normalize, dtype):
    _grads_check(gen, (2, 4, 2, 77, 8, 5), dtype, causal=causal, center=center,
                 normalize=normalize)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("causal,center", [(True, True), (True, False), (False, True),
                                           (False, False)])
@pytest.mark.parametrize("shape", [(1, 2, 1, 64, 16, 16), (2, 4, 2, 300, 32, 32),
                                   (1, 2, 2, 4096, 64, 64)], ids=["n64", "n300", "n4096"])
def test_cuda_grads_half(gen, shape, causal, center, dtype):
    _grads_check(gen, shape, dtype, names=["q", "k", "v"], causal=causal, center=center)


@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded"])
def test_cuda_grads_strided(gen, layout):
    for causal in (True, False):
        _grads_check(gen, (2, 4, 2, 70, 16, 8), torch.float32, layout=layout, causal=causal)


@pytest.mark.parametrize("causal,center,normalize", FLAGS, ids=FLAG_IDS)
def test_cuda_gradcheck(gen, causal, center, normalize):
    q, k, v = make_qkv(gen, (1, 4, 2, 11, 3, 4), device=DEV)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    shift = rand_shift(gen, 4, device=DEV, requires_grad=True)

    def fn(q, k, v, shift):
        return csq_ext.attention(q, k, v, shift=shift, causal=causal, center=center,
                                 normalize=normalize, scale=0.6, chunk_size=4)
    assert torch.autograd.gradcheck(fn, (q, k, v, shift), fast_mode=False)


def test_cuda_double_backward_raises(gen):
    q, k, v = make_qkv(gen, SHAPES["gqa"], device=DEV)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    (dq,) = torch.autograd.grad(csq_ext.attention(q, k, v).square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(dq.sum(), (q, k, v), allow_unused=True)


# --------------------------------------------------------------------------------------------
# CUDA against CPU, properties
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@CAUSAL
def test_cuda_matches_cpu(gen, causal, dtype):
    """The same inputs on both devices: outputs and gradients agree to twice the dtype's
    tolerance (each is within one tolerance of the reference)."""
    shape = (2, 4, 2, 150, 16, 8)
    q, k, v = make_qkv(gen, shape, dtype)
    shift = rand_shift(gen, 4, _shift_dtype(dtype))
    dy = randn(gen, 2, 4, 150, 8, dtype=dtype)
    kw = dict(causal=causal)
    y_cpu, g_cpu = csq_grads(q, k, v, shift, dy, **kw)
    y_gpu, g_gpu = csq_grads(*(t.to(DEV) for t in (q, k, v, shift, dy)), **kw)
    names = ["q", "k", "v"] + (["shift"] if dtype in (torch.float64, torch.float32) else [])
    assert_rel_close(y_gpu, y_cpu, 2 * TOL[dtype], "y")
    for name in names:
        assert_rel_close(g_gpu[name], g_cpu[name], 2 * TOL[dtype], f"d{name}")


@CAUSAL
@pytest.mark.parametrize("n", [50, 1000])
def test_cuda_float32_offset_keys(gen, causal, n):
    """Keys with a common offset 30x their spread, float32: outputs and gradients within 1e-4
    of the float64 reference."""
    check_float32_offset_keys(gen, causal, n, dk=32, dv=16, device=DEV)


@CAUSAL
def test_cuda_translation_invariance(gen, causal):
    q, k, v = make_qkv(gen, (2, 4, 2, 90, 16, 8))
    t = 30 * torch.sign(randn(gen, 16))
    y = csq(q.to(DEV, torch.float32), (k + t).to(DEV, torch.float32), v.to(DEV, torch.float32),
            causal=causal)
    assert_rel_close(y, reference(q, k, v, causal=causal), TOL_F32_OFFSET)
    y64 = csq(q.to(DEV), k.to(DEV), v.to(DEV), causal=causal)
    y64_t = csq(q.to(DEV), (k + t).to(DEV), v.to(DEV), causal=causal)
    assert_rel_close(y64_t, y64, 1e-10)


@CAUSAL
def test_cuda_independent_of_chunk_size(gen, causal):
    q, k, v = make_qkv(gen, (1, 2, 1, 150, 8, 4), device=DEV)
    base = csq(q, k, v, causal=causal)
    for chunk in (16, 32, 64, 128):
        assert_rel_close(csq(q, k, v, causal=causal, chunk_size=chunk), base, 1e-12,
                         f"chunk {chunk}")


@CAUSAL
def test_cuda_nan_in_v_stays_causal(gen, causal):
    q, k, v = make_qkv(gen, (1, 2, 1, 100, 8, 4), device=DEV)
    v[0, 0, 70, 1] = float("nan")
    y = csq(q, k, v, causal=causal)
    bad = ~torch.isfinite(y)
    first = 70 if causal else 0
    assert bad[0, :, first:, 1].all()
    bad[0, :, first:, 1] = False
    assert not bad.any()


def test_cuda_opcheck(gen):
    q, k, v = make_qkv(gen, SHAPES["gqa"], torch.float32, device=DEV)
    shift = rand_shift(gen, 4, torch.float32, device=DEV)
    for rg in (False, True):
        args = [t.detach().requires_grad_(rg) for t in (q, k, v, shift)]
        torch.library.opcheck(torch.ops.csq_ext.csq_fwd.default,
                              (*args, True, 0.5, True, True, 1e-6, 0))


def test_cuda_rejects_mixed_devices(gen):
    q, k, v = make_qkv(gen, SHAPES["gqa"], torch.float32)
    with pytest.raises((ValueError, RuntimeError), match="device"):
        csq_ext.attention(q.to(DEV), k, v.to(DEV))
    with pytest.raises((ValueError, RuntimeError), match="shift"):
        csq_ext.attention(q.to(DEV), k.to(DEV), v.to(DEV), shift=torch.ones(4))


def test_cuda_no_quadratic_memory(gen):
    """N = 32768, Dk = Dv = 16, float32, forward + backward: the peak allocation grows by far
    less than an N x N float32 matrix (4 GiB)."""
    n = 32768
    q, k, v = (randn(gen, 1, 1, n, 16, dtype=torch.float32, device=DEV, requires_grad=True)
               for _ in range(3))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    for causal in (True, False):
        y = csq_ext.attention(q, k, v, causal=causal)
        grads = torch.autograd.grad(y, (q, k, v), torch.ones_like(y))
        assert all(torch.isfinite(g).all() for g in grads)
        del y, grads
    torch.cuda.synchronize()
    growth = torch.cuda.max_memory_allocated() - base
    assert growth < 256 * 2 ** 20, f"peak CUDA memory grew by {growth / 2 ** 20:.0f} MiB"


def test_cuda_current_stream_and_device(gen):
    """Runs on the current stream: results produced on a side stream are correct when read on
    that stream."""
    q, k, v = make_qkv(gen, (2, 4, 2, 200, 16, 8), torch.float32, device=DEV)
    expected = reference(q, k, v)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y = csq_ext.attention(q, k, v)
        y_host = y.to("cpu", non_blocking=False)
    stream.synchronize()
    assert rel_err(y_host, expected) <= TOL[torch.float32]


# --------------------------------------------------------------------------------------------
# Streaming: the in-place decode step (csq_decode_ on CUDA)
# --------------------------------------------------------------------------------------------
def _prefill_state_cpu(gen, B, Hq, Hk, n, dk, dv, dtype, shift, key_offset=0.0, **kw):
    """A state after n tokens, built by the CPU backend and moved to the GPU."""
    q = randn(gen, B, Hq, n, dk, dtype=dtype)
    k = (randn(gen, B, Hk, n, dk) + key_offset).to(dtype)
    v = randn(gen, B, Hk, n, dv, dtype=dtype)
    _, st = csq_ext.attention(q, k, v, shift=shift.cpu(), return_state=True, **kw)
    return (q, k, v), st


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("center,normalize", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("dk,dv,hq,hk", [(8, 6, 4, 2), (16, 40, 6, 1), (64, 64, 8, 8)])
def test_cuda_decode_in_place_matches_cpu(gen, dk, dv, hq, hk, center, normalize, dtype):
    """Steps of decode_ on CUDA equal the CPU kernel's steps (outputs and the state), from a
    prefilled state; group sizes above and below the kernel's 4 heads per pass."""
    B = 3
    shift = rand_shift(gen, hq, _shift_dtype(dtype))
    kw = dict(shift=shift, center=center, normalize=normalize)
    _, st = _prefill_state_cpu(gen, B, hq, hk, 37, dk, dv, dtype, shift, key_offset=1.5,
                               center=center, normalize=normalize)
    st_cpu, st_gpu = st.clone(), st.to(DEV)
    tol = TOL[dtype]
    for _ in range(5):
        q = randn(gen, B, hq, 1, dk, dtype=dtype)
        k = (randn(gen, B, hk, 1, dk) + 1.5).to(dtype)
        v = randn(gen, B, hk, 1, dv, dtype=dtype)
        y_cpu = csq_ext.decode_(q, k, v, st_cpu, **kw)
        y_gpu = csq_ext.decode_(q.to(DEV), k.to(DEV), v.to(DEV), st_gpu,
                                **{**kw, "shift": shift.to(DEV)})
        assert y_gpu.device.type == "cuda" and y_gpu.dtype == dtype
        assert_rel_close(y_gpu.cpu(), y_cpu, tol, "y")
    assert_rel_close(st_gpu.sums.cpu(), st_cpu.sums, TOL[torch.float32] if dtype != torch.float64
                     else TOL[torch.float64], "sums")
    assert st_gpu.count.eq(37 + 5).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_cuda_decode_steps_equal_one_call(gen, dtype):
    """An empty state, then token by token on the GPU, equals the one-call reference; strided
    single-token views are fine."""
    B, Hq, Hk, N, Dk, Dv = 2, 4, 2, 150, 8, 5
    q, k, v = make_qkv(gen, (B, Hq, Hk, N, Dk, Dv), dtype, device=DEV, layout="transposed")
    shift = rand_shift(gen, Hq, _shift_dtype(dtype), device=DEV)
    state = csq_ext.CSQState.empty(B, Hk, Dk, Dv, dtype=_shift_dtype(dtype), device=DEV)
    out = torch.empty(B, Hq, 1, Dv, dtype=dtype, device=DEV)
    ys = [csq_ext.decode_(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state, out=out,
                          shift=shift).clone() for t in range(N)]
    assert_rel_close(torch.cat(ys, 2), reference(q, k, v, shift=shift), TOL[dtype])
    assert state.count.eq(N).all()


def test_cuda_decode_float32_offset_keys(gen):
    """A prefill state (ref = mean of the first keys) keeps float32 decoding accurate when keys
    share an offset 30x their spread."""
    (q, k, v), st = _prefill_state_cpu(gen, 1, 2, 1, 300, 16, 16, torch.float64,
                                       torch.ones(2, dtype=torch.float64), key_offset=30.0)
    q2, k2, v2 = (randn(gen, 1, h, 100, d) for h, d in ((2, 16), (1, 16), (1, 16)))
    k2 = k2 + 30.0
    expected = reference(torch.cat([q, q2], 2), torch.cat([k, k2], 2), torch.cat([v, v2], 2))
    st = st.to(DEV, torch.float32)
    ys = [csq_ext.decode_(*(t[:, :, i:i + 1].to(DEV, torch.float32) for t in (q2, k2, v2)),
                          st).clone() for i in range(100)]
    assert rel_err(torch.cat(ys, 2).cpu().double(), expected[:, :, 300:]) <= TOL_F32_OFFSET


def test_cuda_decode_in_place_allocates_nothing(gen):
    """With out and a shift tensor given, a CUDA step allocates no device memory and leaves the
    state's and the output's storage where they are."""
    q, k, v = (randn(gen, 2, h, 1, 8, dtype=torch.float32, device=DEV) for h in (4, 2, 2))
    state = csq_ext.CSQState.empty(2, 2, 8, 8, device=DEV)
    out = torch.empty(2, 4, 1, 8, device=DEV)
    shift = torch.full((4,), 1.0, device=DEV)
    args = (q, k, v, shift, out, 8 ** -0.5, True, True, 1e-6)
    torch.ops.csq_ext.csq_decode_(state.sums, state.ref, *args)  # warm-up
    torch.cuda.synchronize()
    ptrs = (state.sums.data_ptr(), out.data_ptr())
    before = torch.cuda.memory_stats().get("allocation.all.allocated", 0)
    for _ in range(3):
        torch.ops.csq_ext.csq_decode_(state.sums, state.ref, *args)
    torch.cuda.synchronize()
    assert torch.cuda.memory_stats().get("allocation.all.allocated", 0) == before
    assert ptrs == (state.sums.data_ptr(), out.data_ptr())
    assert state.count.eq(4).all()


def test_cuda_decode_rejects_bad_states(gen):
    q, k, v = (randn(gen, 1, h, 1, 4, dtype=torch.float32, device=DEV) for h in (2, 1, 1))
    state = csq_ext.CSQState.empty(1, 1, 4, 4, device=DEV)
    with pytest.raises((ValueError, RuntimeError), match="device"):
        csq_ext.decode_(q, k, v, state.to("cpu"))
    with pytest.raises((ValueError, RuntimeError), match="float32"):
        csq_ext.decode_(q, k, v, state.to(torch.float64))


# --------------------------------------------------------------------------------------------
# Streaming: packed variable-length batches (cu_seqlens)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@CAUSAL
def test_cuda_varlen_equals_per_sequence_calls(gen, causal, index_dtype, dtype):
    """Segments of length 1, 0, a multiple of the CUDA chunk (64) and not: forward and
    gradients of one packed call equal per-segment calls (and the reference)."""
    cu = torch.tensor([0, 1, 65, 65, 129, 200, 201, 330], dtype=index_dtype)
    T = int(cu[-1])
    q, k, v = make_qkv(gen, (1, 4, 2, T, 8, 5), dtype, device=DEV)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    shift = rand_shift(gen, 4, _shift_dtype(dtype), device=DEV, requires_grad=True)
    dy = randn(gen, 1, 4, T, 5, dtype=dtype, device=DEV)
    y = csq_ext.attention(q, k, v, causal=causal, shift=shift, cu_seqlens=cu.to(DEV))
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


def test_cuda_varlen_matches_cpu_and_gradcheck(gen):
    cu = torch.tensor([0, 3, 4, 11])
    q, k, v = make_qkv(gen, (1, 2, 1, 11, 3, 2), device=DEV)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda q, k, v: csq_ext.attention(q, k, v, cu_seqlens=cu), (q, k, v))
    y_cpu = csq_ext.attention(q.detach().cpu(), k.detach().cpu(), v.detach().cpu(),
                              cu_seqlens=cu)
    assert rel_err(csq_ext.attention(q, k, v, cu_seqlens=cu).detach().cpu(), y_cpu) <= 1e-10


def test_cuda_varlen_many_sequences(gen):
    """More sequences than one block of the chunk-map scan (256), most of them tiny."""
    lens = torch.randint(0, 5, (700,), generator=gen)
    lens[10] = 300
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)])
    T = int(cu[-1])
    q, k, v = make_qkv(gen, (1, 2, 1, T, 4, 3), torch.float32, device=DEV)
    for causal in (True, False):
        y = csq_ext.attention(q, k, v, causal=causal, cu_seqlens=cu)
        ref = torch.cat([reference(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], causal=causal)
                         for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], 2)
        assert_rel_close(y, ref, TOL[torch.float32])


# --------------------------------------------------------------------------------------------
# Carried state (initial_state / return_state) on CUDA. tests/test_streaming.py runs its
# streaming checks (pieces + 2048 decode steps, gradcheck through the state, varlen with
# per-segment states) on CUDA too; these add every dtype and CUDA against CPU.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("center", [True, False], ids=["ctr", "noctr"])
def test_cuda_carried_state_matches_cpu_and_reference(gen, center, dtype):
    """A state in (from a prefill), a state out with a loss on it: y, the returned state and
    every gradient (q, k, v, shift, the carried sums and ref) on CUDA equal the CPU backend on
    the same inputs, and y equals the float64 reference over prefill + piece."""
    B, Hq, Hk, N0, N, Dk, Dv = 2, 4, 2, 90, 150, 16, 8
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    q0, k0, v0 = make_qkv(gen, (B, Hq, Hk, N0, Dk, Dv), dtype)
    q, k, v = make_qkv(gen, (B, Hq, Hk, N, Dk, Dv), dtype)
    shift = rand_shift(gen, Hq, _shift_dtype(dtype))
    _, s0 = csq_ext.attention(q0, k0, v0, shift=shift, return_state=True)
    dy = randn(gen, B, Hq, N, Dv, dtype=acc)
    dsums = randn(gen, *s0.sums.shape, dtype=acc)

    def run(device):
        leaves = [t.to(device).requires_grad_() for t in (q, k, v, shift, s0.sums, s0.ref)]
        with poisoned_memory(device):
            y, st = csq_ext.attention(*leaves[:3], shift=leaves[3], center=center,
                                      initial_state=csq_ext.CSQState(leaves[4], leaves[5]),
                                      return_state=True)
            loss = (y.to(acc) * dy.to(device)).sum() + (st.sums * dsums.to(device)).sum()
            grads = torch.autograd.grad(loss, leaves)
        assert y.device.type == device and st.sums.device.type == device
        return [t.detach().cpu() for t in (y, st.sums, st.ref, *grads)]

    gpu, cpu = run(DEV), run("cpu")
    tol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, TOL[dtype])
    for name, a, b in zip("y sums ref dq dk dv dshift dsums dref".split(), gpu, cpu):
        assert_rel_close(a, b, tol, name)
    expected = reference(torch.cat([q0, q], 2), torch.cat([k0, k], 2), torch.cat([v0, v], 2),
                         shift=shift, center=center)[:, :, N0:]
    assert_rel_close(gpu[0], expected, TOL[dtype], "y vs reference")


def test_cuda_decode_functional_equals_cpu(gen):
    """csq_ext.decode (the functional step, through csq_fwd with a state) on CUDA."""
    q, k, v = make_qkv(gen, (2, 4, 2, 40, 8, 6), torch.float64)
    _, st = csq_ext.attention(q[:, :, :39], k[:, :, :39], v[:, :, :39], return_state=True)
    last = [t[:, :, 39:] for t in (q, k, v)]
    y_cpu, st_cpu = csq_ext.decode(*last, st)
    y_gpu, st_gpu = csq_ext.decode(*(t.to(DEV) for t in last), st.to(DEV))
    assert y_gpu.device.type == DEV and st_gpu.sums.device.type == DEV
    assert rel_err(y_gpu.cpu(), y_cpu) <= 1e-10
    assert rel_err(st_gpu.sums.cpu(), st_cpu.sums) <= 1e-10
    assert rel_err(y_gpu.cpu(), reference(q, k, v)[:, :, 39:]) <= 1e-10


def test_cuda_bad_states_are_rejected(gen):
    """A state on the wrong device, or with causal=False, is refused with a clear message."""
    q, k, v = make_qkv(gen, (1, 2, 1, 10, 4, 3), torch.float32, device=DEV)
    _, st = csq_ext.attention(q, k, v, return_state=True)
    with pytest.raises(ValueError, match="device"):
        csq_ext.attention(q, k, v, initial_state=st.to("cpu"))
    with pytest.raises(ValueError, match="causal"):
        csq_ext.attention(q, k, v, causal=False, initial_state=st)
    with pytest.raises(ValueError, match="return_state needs causal"):
        csq_ext.attention(q, k, v, causal=False, return_state=True)


# --------------------------------------------------------------------------------------------
# Tensor cores (bfloat16 / float16 state products, csrc/cuda/csq_mma.cuh)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_cuda_tensor_core_passes(gen, monkeypatch, dtype):
    """CSQ_CUDA_TENSOR_CORES = 3 (3xTF32, the default), 1 (TF32) and 0 (CUDA cores): every
    choice meets the half-precision bar against the float64 reference at Dk = Dv = 64, and
    3xTF32 stays as close to the reference as the CUDA cores."""
    shape = (1, 4, 2, 2048, 64, 64)
    q, k, v = make_qkv(gen, shape, dtype, device=DEV)
    shift = rand_shift(gen, 4, torch.float32, device=DEV)
    dy = randn(gen, 1, 4, 2048, 64, dtype=dtype, device=DEV)
    y_ref, g_ref = reference_grads(q, k, v, shift, dy)
    errs = {}
    for passes in ("0", "1", "3"):
        monkeypatch.setenv("CSQ_CUDA_TENSOR_CORES", passes)
        y, grads = csq_grads(q, k, v, shift, dy)
        errs[passes] = max([rel_err(y, y_ref)] + [rel_err(grads[n], g_ref[n]) for n in g_ref])
        assert errs[passes] <= TOL[dtype], (passes, errs)
    assert errs["3"] <= 2 * errs["0"] + 1e-4, errs
    monkeypatch.setenv("CSQ_CUDA_TENSOR_CORES", "2")
    with pytest.raises(RuntimeError, match="CSQ_CUDA_TENSOR_CORES"):
        csq_ext.attention(q, k, v)
