"""Tuning knobs (tile_size: the chunked path's chunk, the direct path's tile; chunk_size, its
deprecated alias, alike) change speed,
never the result or the memory beyond the problem's (docs/SPEC.md, sections 4 and 7):

* any int is accepted (Python or numpy; values beyond the sequence or a kernel's limit act as
  that limit, so a knob never allocates by its own value) or refused with an error that names
  the knob (0, negative, bool, float, a tensor);
* every accepted value gives the default's result within the dtype's bar, including chunks of
  one or two positions at Dk = 128 and |scale| = 1 (the chunked path runs chunks of at least
  16: a chunk of one key made dq 7e-5)."""
import numpy as np
import pytest
import torch

import csq_ext
from conftest import TOL, poisoned_memory, randn, reference_grads, rel_err

PATHS = ["chunked", "direct", "auto"]


def _qkv(gen, n, d=8, device="cpu"):
    return tuple(randn(gen, 1, h, n, d, dtype=torch.float32, device=device) for h in (4, 2, 2))


@pytest.mark.parametrize("value", [0, -1, -(2 ** 63), True, False, 64.0, "64", [64],
                                   torch.tensor(64), np.float32(8), np.bool_(True)],
                         ids=lambda x: f"{type(x).__name__}:{x!r}"[:24])
@pytest.mark.parametrize("name", ["tile_size", "chunk_size"])
@pytest.mark.filterwarnings("ignore:csq_ext. chunk_size is deprecated:DeprecationWarning")
def test_bad_tile_size_is_refused_by_name(gen, value, name):
    q, k, v = _qkv(gen, 5)
    with pytest.raises((ValueError, TypeError), match=name):
        csq_ext.attention(q, k, v, **{name: value})


@pytest.mark.parametrize("n", [1, 5, 300])
@pytest.mark.parametrize("value", [10 ** 5, 2 ** 31, 2 ** 63, 2 ** 64 + 3, 10 ** 30],
                         ids=lambda x: f"{x:.0e}")
@pytest.mark.parametrize("path", PATHS)
def test_huge_tile_size_acts_as_the_sequence(gen, device, path, value, n):
    """The old code allocated tile buffers by the knob (a MemoryError at N = 5 with
    tile_size = 100000) and could not pass 2**63 to the op (an error naming another
    argument)."""
    q, k, v = _qkv(gen, n, device=device)
    dy = randn(gen, *q.shape, dtype=torch.float32, device=device)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    with poisoned_memory(device):
        y = csq_ext.attention(*leaves, path=path, tile_size=value)
        grads = torch.autograd.grad(y, leaves, dy)
    y_ref, g_ref = reference_grads(q, k, v, 1.0, dy)
    assert rel_err(y.cpu(), y_ref) <= TOL[torch.float32]
    for name, g in zip("qkv", grads):
        assert rel_err(g.cpu(), g_ref[name], 1e-2 * dy.norm().item()) <= 10 * TOL[torch.float32]


@pytest.mark.parametrize("value", [np.int64(16), np.int32(7), np.uint8(3), np.int16(2)],
                         ids=lambda x: type(x).__name__)
def test_numpy_integers_are_accepted(gen, value):
    q, k, v = _qkv(gen, 40)
    want = csq_ext.attention(q, k, v, tile_size=int(value))
    assert torch.equal(csq_ext.attention(q, k, v, tile_size=value), want)


@pytest.mark.parametrize("n", [2, 3, 5, 17, 100])
@pytest.mark.parametrize("chunk", [1, 2, 3])
@pytest.mark.parametrize("path", ["chunked", "direct"])
def test_tiny_chunks_at_dk128_scale1(gen, device, path, chunk, n):
    """|scale| = 1 at Dk = 128 makes every term of a state read large (tau |q| ~ 11): as
    accurate with tile_size 1 to 3 as with the default (the old chunked path: 1.5e-5 in y,
    7e-5 in dq at N = 2)."""
    q, k, v = (randn(gen, 1, 2, n, 128, dtype=torch.float32, device=device) for _ in range(3))
    dy = randn(gen, 1, 2, n, 128, dtype=torch.float32, device=device)
    for scale in (1.0, -1.0):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        with poisoned_memory(device):
            y = csq_ext.attention(*leaves, scale=scale, path=path, tile_size=chunk)
            grads = torch.autograd.grad(y, leaves, dy)
        y_ref, g_ref = reference_grads(q, k, v, 1.0, dy, scale=scale)
        assert rel_err(y.cpu(), y_ref) <= TOL[torch.float32], f"y, scale {scale}"
        for name, g in zip("qkv", grads):
            assert rel_err(g.cpu(), g_ref[name]) <= TOL[torch.float32], f"d{name}, scale {scale}"


@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_short_direct_tiles_after_a_huge_key(chunk):
    """Not causal, centered, a 1e7 key: every row weighs all keys nearly equally, and the
    direct path sums a row's numerator and denominator in float32 over key tiles. Tiles of one
    key lost 3.5e-5 at N = 1500 (the default tile: 6e-7); a tile below 16 now acts as 16."""
    n, d = 1500, 64
    g = torch.Generator().manual_seed(n)
    q, k, v = (randn(g, 1, 1, n, d) for _ in range(3))
    k[:, :, 1] = 1e7 * torch.sign(randn(g, d))
    q, k, v = (t.float() for t in (q, k, v))
    with poisoned_memory("cpu"):
        y = csq_ext.attention(q, k, v, path="direct", tile_size=chunk, causal=False)
        y_default = csq_ext.attention(q, k, v, path="direct", causal=False)
    y_ref = reference_grads(q, k, v, 1.0, torch.zeros(1, 1, n, d), causal=False)[0]
    err = rel_err(y[:, :, 2:], y_ref[:, :, 2:])
    assert err <= 2e-5, err  # docs/SPEC.md, section 6
    assert err <= 10 * rel_err(y_default[:, :, 2:], y_ref[:, :, 2:]), err


def test_layer_validates_its_tile_size():
    with pytest.raises((ValueError, TypeError), match="tile_size"):
        csq_ext.nn.CSQAttention(16, 2, tile_size=0)
    with pytest.raises((ValueError, TypeError), match="tile_size"):
        csq_ext.nn.CSQAttention(16, 2, tile_size=2.5)
    layer = csq_ext.nn.CSQAttention(16, 2, kernel="taylor", tile_size=10 ** 12)
    x = torch.randn(1, 20, 16)
    assert layer(x).shape == x.shape


def test_op_refuses_a_negative_tile_by_its_name(gen):
    """Direct op calls (torch.ops) refuse what the public function cannot pass."""
    q, k, v = _qkv(gen, 5)
    shift = torch.ones(4)
    with pytest.raises(RuntimeError, match="tile_size|chunk_size"):
        torch.ops.csq_ext.csq_direct_fwd(q, k, v, shift, None, None, None, True, 0.3, True,
                                         True, 1e-6, -3, False)
