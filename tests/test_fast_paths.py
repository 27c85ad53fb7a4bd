"""The per-call fast paths of csq_ext.attention (csq_ext/_args.py, csq_ext/_cost.py) keep the
semantics of the slow ones: a cached float-shift tensor made under inference mode still works in
a later training step, the cached path choice follows the calibration, and bad input still gets
its named error."""
from __future__ import annotations

import pytest
import torch

import csq_ext
from csq_ext import _args

from conftest import randn


def test_float_shift_made_under_inference_mode_serves_training_later(gen):
    _args._SHIFT_TENSORS.clear()
    q, k, v = (randn(gen, 1, 2, 9, 4, dtype=torch.float32) for _ in range(3))
    with torch.inference_mode():
        csq_ext.attention(q, k, v, shift=0.75)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    y = csq_ext.attention(*leaves, shift=0.75)
    y.sum().backward()  # would raise if the shift tensor were an inference tensor
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float_shift_cache_is_per_value_and_dtype(gen, dtype):
    q, k, v = (randn(gen, 1, 2, 9, 4, dtype=dtype) for _ in range(3))
    y1 = csq_ext.attention(q, k, v, shift=0.5)
    y2 = csq_ext.attention(q, k, v, shift=2.0)
    ref1 = csq_ext.csq_attention_reference(q.double(), k.double(), v.double(), shift=0.5)
    ref2 = csq_ext.csq_attention_reference(q.double(), k.double(), v.double(), shift=2.0)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert ((y1.double() - ref1).norm() / ref1.norm()) < tol
    assert ((y2.double() - ref2).norm() / ref2.norm()) < tol
    assert _args.shift(0.5, q).dtype == _args.acc_dtype(dtype)
    assert _args.shift(0.5, q) is _args.shift(0.5, q)  # cached, not rebuilt per call


def test_shift_tensor_cache_is_bounded():
    q = torch.zeros(1, 3, 1, 2)
    for i in range(600):
        _args.shift(float(i), q)
    assert len(_args._SHIFT_TENSORS) <= 256


def test_fake_and_meta_inputs_get_fresh_shift_tensors():
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    _args._SHIFT_TENSORS.clear()
    with FakeTensorMode():
        q, k, v = (torch.empty(1, 2, 5, 4) for _ in range(3))
        y = csq_ext.attention(q, k, v, path="chunked")
        assert y.shape == (1, 2, 5, 4)
    assert not any(isinstance(t, FakeTensor) for t in _args._SHIFT_TENSORS.values())
    meta = torch.empty(1, 2, 5, 4, device="meta")
    assert _args.shift(1.0, meta).device.type == "meta"


@pytest.mark.parametrize("bad, match", [
    (lambda q, k, v: (q, k[:, :, :-1], v), "length N"),
    (lambda q, k, v: (q, k, v[..., :1, :, :]), "Hk"),
    (lambda q, k, v: (q, k.double(), v), "one dtype"),
    (lambda q, k, v: (q[0], k, v), "q must have shape"),
    (lambda q, k, v: (q, k, v.int()), "floating point"),
])
def test_fast_argument_check_still_names_the_problem(gen, bad, match):
    q, k, v = (randn(gen, 2, 2, 6, 4, dtype=torch.float32) for _ in range(3))
    with pytest.raises(ValueError, match=match):
        csq_ext.attention(*bad(q, k, v))
