"""The block length is ``tile_size`` everywhere (attention, the layer, context parallelism);
``chunk_size`` is its deprecated alias: it warns (DeprecationWarning), gives the same result,
is named by its own name in errors, and cannot be passed together with ``tile_size``."""
import warnings

import pytest
import torch

import csq_ext
from conftest import randn
from csq_ext import CSQAttention
from csq_ext import distributed


def _qkv(gen, n=21):
    return (randn(gen, 1, 2, n, 4, dtype=torch.float64), randn(gen, 1, 1, n, 4, dtype=torch.float64),
            randn(gen, 1, 1, n, 3, dtype=torch.float64))


@pytest.mark.parametrize("path", ["chunked", "direct"])
def test_chunk_size_is_a_deprecated_alias(gen, path):
    q, k, v = _qkv(gen)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tile_size itself does not warn
        want = csq_ext.attention(q, k, v, tile_size=4, path=path)
    with pytest.warns(DeprecationWarning, match="chunk_size is deprecated.*tile_size"):
        got = csq_ext.attention(q, k, v, chunk_size=4, path=path)
    assert torch.equal(got, want)


@pytest.mark.parametrize("fn", ["attention", "distributed", "layer"])
def test_both_names_raise(gen, fn):
    q, k, v = _qkv(gen)
    with pytest.raises(ValueError, match="tile_size or its deprecated alias chunk_size"):
        if fn == "attention":
            csq_ext.attention(q, k, v, tile_size=4, chunk_size=4)
        elif fn == "distributed":
            distributed.attention(q, k, v, tile_size=4, chunk_size=8)
        else:
            CSQAttention(8, 2, tile_size=4, chunk_size=4)


@pytest.mark.parametrize("name", ["tile_size", "chunk_size"])
@pytest.mark.parametrize("fn", ["attention", "distributed", "layer"])
def test_errors_name_the_argument_passed(gen, fn, name):
    q, k, v = _qkv(gen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises((ValueError, TypeError), match=f"^{name} must be a positive int"):
            if fn == "attention":
                csq_ext.attention(q, k, v, **{name: 0})
            elif fn == "distributed":
                distributed.attention(q, k, v, **{name: 2.5})
            else:
                CSQAttention(8, 2, **{name: -3})


def test_layer_and_distributed_accept_both(gen):
    torch.manual_seed(0)
    layer = CSQAttention(8, 2, kernel="csq", tile_size=4).double()
    x = torch.randn(2, 11, 8, dtype=torch.float64)
    with pytest.warns(DeprecationWarning):
        old = CSQAttention(8, 2, kernel="csq", chunk_size=4).double()
    old.load_state_dict(layer.state_dict())
    assert old.tile_size == layer.tile_size == 4 and old.chunk_size == 4
    assert torch.equal(old(x), layer(x))
    q, k, v = _qkv(gen)
    want = csq_ext.attention(q, k, v, tile_size=8)
    assert torch.equal(distributed.attention(q, k, v, tile_size=8), want)
    with pytest.warns(DeprecationWarning):
        assert torch.equal(distributed.attention(q, k, v, chunk_size=8), want)
