"""CSQAttention: shapes for every kernel, agreement with direct computations in float64,
the learnable shift, torch.compile and bf16 autocast."""
import pytest
import torch
import torch.nn.functional as F

import csq_ext
from csq_ext.nn import KERNELS, CSQAttention, _feature_attention, kernel_attention_reference
from csq_ext.reference import csq_attention_reference


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _projected(layer, x):
    """q, k, v in the SDPA layout, computed by hand from the layer's weights."""
    B, N, _ = x.shape
    D = layer.head_dim
    q = F.linear(x, layer.q_proj.weight, layer.q_proj.bias).view(B, N, -1, D).transpose(1, 2)
    k = F.linear(x, layer.k_proj.weight, layer.k_proj.bias).view(B, N, -1, D).transpose(1, 2)
    v = F.linear(x, layer.v_proj.weight, layer.v_proj.bias).view(B, N, -1, D).transpose(1, 2)
    return q, k, v


def _out(layer, y):
    B, H, N, D = y.shape
    return layer.out_proj(y.transpose(1, 2).reshape(B, N, H * D))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])
def test_shape_every_kernel(kernel, causal, heads):
    torch.manual_seed(0)
    layer = CSQAttention(32, heads[0], heads[1], kernel=kernel, causal=causal)
    x = torch.randn(2, 19, 32, generator=_gen(1))
    y = layer(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("center,normalize", [(True, True), (False, True), (True, False)])
def test_csq_matches_reference_float64(causal, center, normalize):
    torch.manual_seed(0)
    layer = CSQAttention(24, 4, 2, kernel="csq", causal=causal, shift=0.7, center=center,
                         normalize=normalize).double()
    x = torch.randn(3, 21, 24, generator=_gen(2), dtype=torch.float64)
    q, k, v = _projected(layer, x)
    want = _out(layer, csq_attention_reference(q, k, v, causal=causal, shift=0.7,
                                               center=center, normalize=normalize))
    assert _rel(layer(x), want) < 1e-10


def test_rebased_is_csq_without_shift_and_centering():
    torch.manual_seed(0)
    layer = CSQAttention(24, 2, kernel="rebased").double()
    x = torch.randn(2, 17, 24, generator=_gen(3), dtype=torch.float64)
    q, k, v = _projected(layer, x)
    want = _out(layer, csq_attention_reference(q, k, v, shift=0.0, center=False))
    assert _rel(layer(x), want) < 1e-10


@pytest.mark.parametrize("causal", [True, False])
def test_softmax_matches_sdpa(causal):
    torch.manual_seed(0)
    layer = CSQAttention(32, 4, 2, kernel="softmax", causal=causal).double()
    x = torch.randn(2, 23, 32, generator=_gen(4), dtype=torch.float64)
    q, k, v = _projected(layer, x)
    k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    # SDPA's own math, written out: softmax(q k^T / sqrt(d)) v
    s = (q @ k.transpose(-1, -2)) / 8 ** 0.5
    if causal:
        s = s.masked_fill(~torch.ones(23, 23, dtype=torch.bool).tril(), float("-inf"))
    want = _out(layer, s.softmax(-1) @ v)
    assert _rel(layer(x), want) < 1e-10
    sdpa = _out(layer, F.scaled_dot_product_attention(q, k, v, is_causal=causal))
    assert _rel(layer(x), sdpa) < 1e-10


@pytest.mark.parametrize("kernel", ["linear", "taylor"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("N,chunk", [(37, 5), (32, 8), (7, 64), (1, 4)])
def test_feature_kernels_chunked_equal_masked(kernel, causal, N, chunk):
    g = _gen(5)
    q = torch.randn(2, 4, N, 6, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, N, 6, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, N, 5, generator=g, dtype=torch.float64)
    want = kernel_attention_reference(q, k, v, kernel, causal=causal)
    got = _feature_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), kernel,
                             causal=causal, scale=6 ** -0.5, normalize=True, eps=1e-6,
                             tile_size=chunk)
    assert _rel(got, want) < 1e-12


def test_taylor_and_linear_weights_are_their_definitions():
    g = _gen(6)
    q = torch.randn(1, 1, 9, 4, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, 9, 4, generator=g, dtype=torch.float64)
    v = torch.randn(1, 1, 9, 3, generator=g, dtype=torch.float64)
    s = (q @ k.transpose(-1, -2)) / 2.0
    for kernel, w in (("taylor", 1 + s + s * s / 2),
                      ("linear", (F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-1, -2))):
        w = w.tril()
        want = (w @ v) / (w.sum(-1, keepdim=True) + 1e-6)
        assert _rel(kernel_attention_reference(q, k, v, kernel), want) < 1e-12


def test_layer_taylor_linear_match_masked_form():
    torch.manual_seed(0)
    for kernel in ("linear", "taylor"):
        layer = CSQAttention(16, 2, 1, kernel=kernel, tile_size=4).double()
        x = torch.randn(2, 13, 16, generator=_gen(7), dtype=torch.float64)
        q, k, v = _projected(layer, x)
        assert _rel(layer(x), _out(layer, kernel_attention_reference(q, k, v, kernel))) < 1e-12


def test_learnable_shift_gets_gradient_and_matches_reference():
    torch.manual_seed(0)
    layer = CSQAttention(16, 4, 2, kernel="csq", learnable_shift=True, shift=0.5).double()
    assert isinstance(layer.shift, torch.nn.Parameter) and layer.shift.shape == (4,)
    assert torch.equal(layer.shift.detach(), torch.full((4,), 0.5, dtype=torch.float64))
    with torch.no_grad():
        layer.shift.copy_(torch.tensor([0.5, 1.0, -0.3, 2.0]))
    x = torch.randn(2, 11, 16, generator=_gen(8), dtype=torch.float64)
    y = layer(x)
    q, k, v = _projected(layer, x)
    want = _out(layer, csq_attention_reference(q, k, v, shift=layer.shift))
    assert _rel(y, want) < 1e-10
    (y * torch.randn_like(y)).sum().backward()
    assert layer.shift.grad is not None and layer.shift.grad.shape == (4,)
    assert torch.isfinite(layer.shift.grad).all() and layer.shift.grad.abs().sum() > 0


def test_penalty_from_layer():
    torch.manual_seed(0)
    layer = CSQAttention(16, 2, kernel="csq", learnable_shift=True, penalty_window=4)
    x = torch.randn(2, 9, 16, generator=_gen(9))
    y, p = layer(x, return_penalty=True)
    q, k, _ = _projected(layer, x)
    want = csq_ext.negativity_penalty(q, k, window=4, shift=layer.shift)
    assert y.shape == x.shape and torch.allclose(p, want)
    p.backward()
    assert layer.shift.grad is not None
    with pytest.raises(ValueError, match="return_penalty"):
        CSQAttention(16, 2, kernel="softmax")(x, return_penalty=True)


def test_torch_compile_fullgraph_csq():
    torch.manual_seed(0)
    layer = CSQAttention(32, 4, 2, kernel="csq", learnable_shift=True)
    x = torch.randn(2, 17, 32, generator=_gen(10), requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    eager = layer(x)
    assert torch.allclose(y, eager, atol=1e-5, rtol=1e-5)
    y.sum().backward()
    assert layer.shift.grad is not None and x.grad is not None


@pytest.mark.parametrize("kernel", KERNELS)
def test_bf16_autocast_cpu(kernel):
    torch.manual_seed(0)
    layer = CSQAttention(32, 4, 2, kernel=kernel, learnable_shift=(kernel == "csq"))
    x = torch.randn(2, 70, 32, generator=_gen(11))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y.float()).all()
    y.float().sum().backward()
    for p in layer.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    # close to the float32 result (bf16 projections: loose)
    assert _rel(y.float(), layer(x).detach()) < 5e-2


def test_mixed_dtypes_are_cast_for_csq():
    torch.manual_seed(0)
    layer = CSQAttention(16, 2, kernel="csq")
    g = _gen(12)
    q = torch.randn(1, 2, 8, 8, generator=g).bfloat16()
    k, v = torch.randn(1, 2, 8, 8, generator=g), torch.randn(1, 2, 8, 8, generator=g)
    y = layer.attend(q, k, v)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="kernel"):
        CSQAttention(16, 2, kernel="cosine")
    with pytest.raises(ValueError, match="embed_dim"):
        CSQAttention(18, 4)
    with pytest.raises(ValueError, match="num_kv_heads"):
        CSQAttention(16, 4, 3)
    with pytest.raises(ValueError, match="learnable_shift"):
        CSQAttention(16, 2, kernel="softmax", learnable_shift=True)


def test_op_compiled_backward_with_strided_inputs():
    def f(x):
        B, N, _ = x.shape
        q = x.view(B, N, 4, 8).transpose(1, 2)
        return csq_ext.attention(q, q, q)

    torch._dynamo.reset()
    x = torch.randn(2, 17, 32, generator=_gen(13), requires_grad=True)
    torch.compile(f, fullgraph=True, backend="aot_eager")(x).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    f(x2).sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)
