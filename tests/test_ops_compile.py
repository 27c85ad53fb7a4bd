"""The registered operators under torch.library.opcheck, fake/meta tensors, and torch.compile
(fullgraph, forward and backward) against eager."""
import pytest
import torch
import torch._dynamo

import csq_ext
from conftest import SHAPES, fwd_op_args, make_qkv, rand_shift, randn

ops = torch.ops.csq_ext


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _fwd_args(gen, dtype, requires_grad, layout="contiguous", causal=True, center=True,
              normalize=True, tile_size=4):
    q, k, v = make_qkv(gen, SHAPES["gqa"], dtype, layout=layout)
    shift = rand_shift(gen, 4, dtype)
    tensors = [t.detach().requires_grad_(requires_grad) for t in (q, k, v, shift)]
    return fwd_op_args(*tensors, causal, 0.6, center, normalize, 1e-6, tile_size)


# --------------------------------------------------------------------------------------------
# opcheck
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("causal,center,normalize", [(True, True, True), (False, True, True),
                                                     (True, False, False),
                                                     (False, False, True)])
def test_opcheck_fwd(gen, dtype, requires_grad, causal, center, normalize):
    """Schema, autograd registration, fake tensor and AOT-dispatch (with the backward when
    inputs require grad) checks of csq_chunked_fwd, args (q, k, v, shift, causal, scale, center,
    normalize, eps, tile_size)."""
    args = _fwd_args(gen, dtype, requires_grad, causal=causal, center=center,
                     normalize=normalize)
    torch.library.opcheck(ops.csq_chunked_fwd.default, args)


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_opcheck_fwd_strided(gen, layout, requires_grad):
    torch.library.opcheck(ops.csq_chunked_fwd.default,
                          _fwd_args(gen, torch.float64, requires_grad, layout=layout))


def test_opcheck_fwd_empty_sequence(gen):
    q = randn(gen, 2, 4, 0, 3, requires_grad=True)
    k = randn(gen, 2, 2, 0, 3, requires_grad=True)
    v = randn(gen, 2, 2, 0, 5, requires_grad=True)
    shift = rand_shift(gen, 4, requires_grad=True)
    torch.library.opcheck(ops.csq_chunked_fwd.default,
                          fwd_op_args(q, k, v, shift, True, 0.5, True, True, 1e-6, 0))


def _bwd_args(gen, layout):
    args = _fwd_args(gen, torch.float64, False, layout=layout)
    q, k, v, shift = args[:4]
    opts = args[7:13]  # causal, scale, center, normalize, eps, tile_size
    y, b, den, _, ref = ops.csq_chunked_fwd(*args)
    dy = randn(gen, *y.shape)
    return (dy, q, k, v, shift, None, None, ref, y, b, den, None, None, False, *opts)


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
def test_opcheck_bwd(gen, layout):
    """csq_chunked_bwd's fake kernel must describe what the real kernel returns, strides included:
    torch.compile plans memory from the fake outputs. Transposed (B, N, H, D) views are the
    common case (a fused QKV projection)."""
    torch.library.opcheck(ops.csq_chunked_bwd.default, _bwd_args(gen, layout))


def test_fake_outputs_match_real(gen):
    """Under FakeTensorMode the op gives the real op's shapes, dtypes and strides, for every
    output of both ops and every input dtype."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        q, k, v = make_qkv(gen, SHAPES["gqa"], dtype)
        shift = rand_shift(gen, 4, torch.float32)
        opts = (True, 0.5, True, True, 1e-6, 4)
        real = ops.csq_chunked_fwd(*fwd_op_args(q, k, v, shift, *opts, return_state=True))
        dy = randn(gen, *real[0].shape, dtype=real[0].dtype)  # the gradient of y
        real_b = ops.csq_chunked_bwd(dy, q, k, v, shift, None, None, real[4], *real[:3], real[3],
                                     None, False, *opts)
        with FakeTensorMode() as mode:
            f = [mode.from_tensor(t) for t in (q, k, v, shift, dy)]
            fake = ops.csq_chunked_fwd(*fwd_op_args(*f[:4], *opts, return_state=True))
            fake_b = ops.csq_chunked_bwd(f[4], *f[:4], None, None, fake[4], *fake[:3], fake[3],
                                         None, False, *opts)
        for r, fk in zip(real + real_b, fake + fake_b):
            assert (r.shape, r.dtype, r.stride()) == (fk.shape, fk.dtype, fk.stride())


def test_meta_tensors():
    """The public function on meta tensors: shapes only, no kernel (the fake kernel)."""
    q = torch.empty(2, 4, 9, 3, device="meta")
    k = torch.empty(2, 2, 9, 3, device="meta")
    v = torch.empty(2, 2, 9, 5, device="meta")
    y = csq_ext.attention(q, k, v)
    assert y.device.type == "meta" and y.shape == (2, 4, 9, 5) and y.dtype == torch.float32


# --------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------
def _train_step(q, k, v, shift, w):
    """Forward, a loss, and loss.backward() in one compiled function."""
    y = csq_ext.attention(q, k, v, shift=shift, scale=0.5, tile_size=4)
    loss = (y * w).square().sum()
    loss.backward()
    return y.detach(), loss.detach()


def _leaves(gen, layout, dtype=torch.float32):
    q, k, v = make_qkv(gen, (2, 4, 2, 11, 4, 3), dtype, layout=layout)
    shift = rand_shift(gen, 4, dtype)
    w = randn(gen, 2, 4, 11, 3, dtype=dtype)
    return [t.detach().requires_grad_() for t in (q, k, v, shift)], w


def _compare_compiled(gen, backend, layout, dtype=torch.float32):
    leaves, w = _leaves(gen, layout, dtype)
    y_e, loss_e = _train_step(*leaves, w)
    grads_e = [t.grad for t in leaves]
    for t in leaves:  # same tensors (same strides) for the compiled run
        t.grad = None
    compiled = torch.compile(_train_step, backend=backend, fullgraph=True)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        y_c, loss_c = compiled(*leaves, w)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=0)
    torch.testing.assert_close(y_c, y_e, **tol)
    torch.testing.assert_close(loss_c, loss_e, **tol)
    for name, t, g_e in zip(("q", "k", "v", "shift"), leaves, grads_e):
        assert g_e is not None and t.grad is not None, f"no gradient reached {name}"
        torch.testing.assert_close(t.grad, g_e, **tol, msg=f"d{name}")


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_compile_fullgraph_aot_eager(gen, layout, dtype):
    _compare_compiled(gen, "aot_eager", layout, dtype)


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_compile_fullgraph_inductor(gen, layout):
    """The default backend, once per layout: inductor plans buffers from the fake kernels and
    checks the real outputs' strides against them."""
    # No FX-graph/AOT cache: its key does not cover the fake kernels' Python source, so a
    # graph compiled before a fake-kernel fix would be replayed with the old strides.
    import torch._inductor.config as inductor_config
    with inductor_config.patch(force_disable_caches=True):
        _compare_compiled(gen, "inductor", layout)


@pytest.mark.parametrize("dynamic", [None, True], ids=["auto_dynamic", "dynamic"])
def test_compile_many_lengths(gen, dynamic):
    """Training with variable sequence lengths: one compiled step (fullgraph, forward and
    backward) serves 12 different lengths with at most 2 compilations (a static one, then a
    dynamic-N one under automatic dynamic shapes), equal to eager every time. Each new length
    costing a recompile would hit dynamo's recompile limit (8), which fullgraph=True turns into
    a hard error."""
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    def step(q, k, v):
        y = csq_ext.attention(q, k, v, tile_size=4)
        return y.detach(), torch.autograd.grad(y.square().sum(), (q, k, v))

    compiled = torch.compile(step, backend=counting_backend, fullgraph=True, dynamic=dynamic)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        for n in range(5, 17):
            q, k, v = (t.requires_grad_() for t in make_qkv(gen, (1, 2, 1, n, 3, 2)))
            y_c, g_c = compiled(q, k, v)
            y_e, g_e = step(q, k, v)
            torch.testing.assert_close(y_c, y_e, rtol=1e-12, atol=0)
            for a, b in zip(g_c, g_e):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    assert len(compiles) <= 2, f"{len(compiles)} compilations for 12 lengths"
