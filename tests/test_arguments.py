"""Every argument of every public function is checked (csq_ext/_args.py): one case per
rejected argument, each raising an error whose message names the argument. A wrong kind of
value raises csq_ext._args.ArgumentTypeError (a TypeError and a ValueError), a wrong value
ValueError."""
import numpy as np
import pytest
import torch

import csq_ext
from conftest import randn
from csq_ext import CSQState

B, HQ, HK, N, D = 1, 2, 1, 5, 3


def _qkv(gen, n=N):
    return tuple(randn(gen, B, h, n, D, dtype=torch.float32) for h in (HQ, HK, HK))


# attention keyword -> (bad value, pattern the message must contain)
ATTENTION = {
    "scale_nan": ("scale", float("nan"), "scale"),
    "scale_inf": ("scale", float("inf"), "scale"),
    "scale_str": ("scale", "0.5", "scale"),
    "scale_requires_grad": ("scale", torch.tensor(0.5, requires_grad=True), "scale"),
    "shift_str": ("shift", "1.0", "shift"),
    "shift_none": ("shift", None, "shift"),
    "shift_list": ("shift", [1.0, 1.0], "shift"),
    "shift_complex": ("shift", 1 + 2j, "shift"),
    "shift_numpy": ("shift", np.ones(HQ), "shift"),
    "shift_complex_tensor": ("shift", torch.ones(HQ, dtype=torch.complex64), "shift"),
    "eps_none": ("eps", None, "eps"),
    "eps_inf": ("eps", float("inf"), "eps"),
    "eps_str": ("eps", "1e-6", "eps"),
    "eps_requires_grad": ("eps", torch.tensor(1e-6, requires_grad=True), "eps"),
    "tile_size_float": ("tile_size", 7.5, "tile_size"),
    "tile_size_str": ("tile_size", "8", "tile_size"),
    "tile_size_zero": ("tile_size", 0, "tile_size"),
    "tile_size_bool": ("tile_size", True, "tile_size"),
    # the deprecated alias: named by its own name
    "chunk_size_float": ("chunk_size", 7.5, "chunk_size"),
    "chunk_size_str": ("chunk_size", "8", "chunk_size"),
    "chunk_size_zero": ("chunk_size", 0, "chunk_size"),
    "chunk_size_bool": ("chunk_size", True, "chunk_size"),
    "causal_str": ("causal", "yes", "causal"),
    "center_int": ("center", 1, "center"),
    "normalize_none": ("normalize", None, "normalize"),
    "return_state_str": ("return_state", "no", "return_state"),
    "cu_seqlens_meta": ("cu_seqlens", torch.tensor([0, N]).to("meta"), "cu_seqlens"),
    "cu_seqlens_list": ("cu_seqlens", [0, N], "cu_seqlens"),
    "cu_seqlens_float": ("cu_seqlens", torch.tensor([0.0, N]), "cu_seqlens"),
    "initial_state_tuple": ("initial_state", (1, 2), "initial_state"),
    "initial_state_nones": ("initial_state", CSQState(None, None), "initial_state.sums"),
}


@pytest.mark.parametrize("case", list(ATTENTION))
def test_attention_rejects(gen, case):
    name, bad, pattern = ATTENTION[case]
    q, k, v = _qkv(gen)
    csq_ext.attention(q, k, v)
    with pytest.raises((ValueError, TypeError), match=pattern):
        csq_ext.attention(q, k, v, **{name: bad})


def test_option_tensors_without_grad_are_accepted(gen):
    q, k, v = _qkv(gen)
    y = csq_ext.attention(q, k, v, scale=torch.tensor(0.5), eps=torch.tensor(1e-6))
    assert torch.equal(y, csq_ext.attention(q, k, v, scale=0.5, eps=1e-6))


def _token(gen):
    return _qkv(gen, 1)


def test_decode_requires_a_state(gen):
    with pytest.raises((ValueError, TypeError), match=r"state.*CSQState\.empty"):
        csq_ext.decode(*_token(gen), None)


@pytest.mark.parametrize("out_case", ["list", "meta", "wrong_dtype", "wrong_shape"])
def test_decode_rejects_out(gen, out_case):
    q, k, v = _token(gen)
    st = CSQState.empty(B, HK, D, D)
    bad = {"list": [0], "meta": torch.empty(B, HQ, 1, D, device="meta"),
           "wrong_dtype": torch.empty(B, HQ, 1, D, dtype=torch.float64),
           "wrong_shape": torch.empty(B, HQ, 2, D)}[out_case]
    with pytest.raises((ValueError, TypeError), match=r"\bout\b"):
        csq_ext.decode_(q, k, v, st, out=bad)


@pytest.mark.parametrize("fn", ["decode", "decode_"])
@pytest.mark.parametrize("case", ["state_nones", "scale_nan", "two_tokens_k", "center_str"])
def test_decoding_steps_reject(gen, fn, case):
    q, k, v = _token(gen)
    st = CSQState.empty(B, HK, D, D)
    kw, pattern = {}, None
    if case == "state_nones":
        st, pattern = CSQState(None, None), "state.sums"
    elif case == "scale_nan":
        kw, pattern = {"scale": float("nan")}, "scale"
    elif case == "two_tokens_k":
        k, pattern = torch.cat([k, k], 2), r"\bk\b"
    else:
        kw, pattern = {"center": "yes"}, "center"
    with pytest.raises((ValueError, TypeError), match=pattern):
        getattr(csq_ext, fn)(q, k, v, st, **kw)


@pytest.mark.parametrize("case", [("batch", -1), ("heads_k", 1.5), ("dim_k", 0),
                                  ("dim_v", "4")])
def test_empty_state_rejects(case):
    name, bad = case
    args = dict(batch=1, heads_k=1, dim_k=2, dim_v=2)
    args[name] = bad
    with pytest.raises((ValueError, TypeError), match=name):
        CSQState.empty(**args)
