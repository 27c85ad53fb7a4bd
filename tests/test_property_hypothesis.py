"""Property-based check (hypothesis, derandomized so CI is reproducible) of csq_ext.attention
against the float64 reference over shapes, strides, dtypes, flags, options, value scales and
algorithms (path: the automatic choice, or the chunked or the direct path forced), forward and
the gradient of q, k, v."""
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")  # pip install hypothesis==6.170.17
from hypothesis import given, settings, strategies as st  # noqa: E402

import csq_ext  # noqa: E402
from conftest import DEVICES, poisoned_memory, reference, rel_err  # noqa: E402
from csq_ext.reference import csq_attention_reference  # noqa: E402

# float32 on N(0, s^2) inputs with s up to 4 and keys offset by up to 30x: the offset bar.
TOLS = {torch.float64: 1e-9, torch.float32: 1e-4}


@st.composite
def cases(draw):
    Hk = draw(st.integers(1, 2))
    device = draw(st.sampled_from(DEVICES))
    # The direct path has CPU and CUDA kernels (forcing it elsewhere is refused).
    path = draw(st.sampled_from(["auto", "chunked"] +
                                (["direct"] if device in ("cpu", "cuda") else [])))
    return dict(path=path,
        B=draw(st.integers(1, 2)), Hk=Hk, Hq=Hk * draw(st.integers(1, 3)),
        N=draw(st.integers(0, 150)), Dk=draw(st.integers(1, 9)), Dv=draw(st.integers(1, 6)),
        dtype=draw(st.sampled_from(list(TOLS))), causal=draw(st.booleans()),
        center=draw(st.booleans()), normalize=draw(st.booleans()),
        chunk=draw(st.sampled_from([None, 1, 7, 64])), layout=draw(st.sampled_from(["c", "t"])),
        scale=draw(st.sampled_from([None, 0.3, 2.0])),
        shift=draw(st.sampled_from([1.0, 0.5, "tensor"])),
        spread=draw(st.sampled_from([0.25, 1.0, 4.0])), offset=draw(st.sampled_from([0.0, 30.0])),
        seed=draw(st.integers(0, 2**31 - 1)), device=device)


def _make(g, b, h, n, d, layout, dtype, device, scale=1.0, offset=0.0):
    x = torch.randn(b, h, n, d, generator=g, dtype=torch.float64) * scale + offset
    if layout == "t":  # a strided (B, N, H, D) view
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    return x.to(device=device, dtype=dtype)


@settings(max_examples=120, deadline=None, derandomize=True, database=None)
@given(cases())
def test_attention_matches_reference(c):
    g = torch.Generator().manual_seed(c["seed"])
    dt, dev = c["dtype"], c["device"]
    q = _make(g, c["B"], c["Hq"], c["N"], c["Dk"], c["layout"], dt, dev, c["spread"])
    k = _make(g, c["B"], c["Hk"], c["N"], c["Dk"], c["layout"], dt, dev, c["spread"],
              c["offset"] * c["spread"])
    v = _make(g, c["B"], c["Hk"], c["N"], c["Dv"], "c", dt, dev)
    shift = c["shift"]
    if shift == "tensor":
        shift = (torch.rand(c["Hq"], generator=g, dtype=torch.float64) + 0.5).to(dev, dt)
    if c["offset"] and not c["center"]:
        k = k - c["offset"] * c["spread"]  # offsets are the centered case's concern
    kw = dict(causal=c["causal"], center=c["center"], normalize=c["normalize"],
              scale=c["scale"], shift=shift)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    with poisoned_memory(dev):
        y = csq_ext.attention(*leaves, tile_size=c["chunk"], path=c["path"], **kw)
    y_ref = reference(q, k, v, **kw)
    tol = TOLS[dt]
    assert y.shape == y_ref.shape and torch.isfinite(y).all()
    assert rel_err(y.cpu(), y_ref, 1e-30) <= tol
    if c["N"] == 0:
        return
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(y, leaves, dy.to(dev, dt))
    r_leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    shift_ref = shift.cpu().double() if isinstance(shift, torch.Tensor) else shift
    y64 = csq_attention_reference(*r_leaves, **{**kw, "shift": shift_ref})
    grads_ref = torch.autograd.grad(y64, r_leaves, dy)
    # Gradients that vanish in exact arithmetic (dq, dk at N = 1) are measured against a floor
    # on the scale of dy, where a relative error would only measure rounding noise.
    floor = 1e-2 * dy.norm().item()
    for name, a, b in zip("qkv", grads, grads_ref):
        assert rel_err(a.cpu(), b, floor) <= 10 * tol, f"d{name}"
