"""float32 accuracy independent of a common key offset (docs/SPEC.md, section 6): centered CSQ
does not change when every key moves by one vector, float32 holds such keys exactly, and
every path keeps the accuracy of N(0, 1) inputs (1e-5) with keys offset by up to 1e6 times
their spread: outputs and gradients, causal or not, from no state or a carried one, packed.

The direct path used to lose the digits in the rounding of its tile references (a key mean
rounded to float32 is off by an offset-sized amount, which the per-query shifts did not see):
4e-6 at 1e3, 6e-5 at 1e4, 4e-3 at 1e6 (D = 16, N = 600)."""
import pytest
import torch

import csq_ext
from conftest import TOL, assert_rel_close, poisoned_memory, randn, reference_grads

F32 = TOL[torch.float32]
OFFSETS = [1e2, 1e4, 1e6]


def _offset_qkv(gen, device, n, d, offset, batch=1, hq=4, hk=2):
    """q, v N(0, 1); k N(0, 1) plus one vector per key head whose coordinates are +-offset."""
    o = offset * torch.sign(randn(gen, 1, hk, 1, d))
    q = randn(gen, batch, hq, n, d, dtype=torch.float32, device=device)
    k = (randn(gen, batch, hk, n, d) + o).to(device, torch.float32)
    v = randn(gen, batch, hk, n, d, dtype=torch.float32, device=device)
    return q, k, v


def _check(q, k, v, dy, tol=F32, rows=None, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    with poisoned_memory(q.device):
        y = csq_ext.attention(*leaves, **kw)
        grads = torch.autograd.grad(y, leaves, dy)
    ref_kw = {key: kw[key] for key in ("causal",) if key in kw}
    y_ref, g_ref = reference_grads(q, k, v, 1.0, dy, **ref_kw)
    assert_rel_close(y.cpu(), y_ref, tol, "y")
    for name, g in zip("qkv", grads):
        assert_rel_close(g.cpu(), g_ref[name], tol, f"d{name}")


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("d", [16, 64])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("path", ["direct", "chunked", "auto"])
def test_common_key_offset(gen, device, path, causal, d, offset):
    q, k, v = _offset_qkv(gen, device, 300, d, offset)
    dy = randn(gen, *q.shape[:3], d, dtype=torch.float32, device=device)
    _check(q, k, v, dy, path=path, causal=causal)


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("tile", [None, 7, 64])
def test_common_key_offset_any_tile(gen, device, tile, offset):
    """The direct path's tiles each have their own reference key: any tile length."""
    q, k, v = _offset_qkv(gen, device, 200, 16, offset)
    dy = randn(gen, *q.shape, dtype=torch.float32, device=device)
    _check(q, k, v, dy, path="direct", tile_size=tile)


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("path", ["direct", "chunked"])
def test_common_key_offset_packed(gen, device, path, offset):
    """Packed sequences, each with its own offset (a sequence's mean is its own)."""
    cu = torch.tensor([0, 37, 37, 170, 200])
    q, k, v = _offset_qkv(gen, device, 200, 16, offset)
    for s in range(4):  # another offset per sequence
        k[:, :, cu[s]:cu[s + 1]] += float(s) * offset / 3
    dy = randn(gen, *q.shape, dtype=torch.float32, device=device)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    with poisoned_memory(device):
        y = csq_ext.attention(*leaves, path=path, cu_seqlens=cu.to(device))
        grads = torch.autograd.grad(y, leaves, dy)
    for s in range(4):
        sl = slice(int(cu[s]), int(cu[s + 1]))
        if sl.start == sl.stop:
            continue
        parts = [t[:, :, sl] for t in (q, k, v)]
        y_ref, g_ref = reference_grads(*parts, 1.0, dy[:, :, sl])
        assert_rel_close(y[:, :, sl].cpu(), y_ref, F32, f"y of sequence {s}")
        for name, g in zip("qkv", grads):
            assert_rel_close(g[:, :, sl].cpu(), g_ref[name], F32, f"d{name} of sequence {s}")


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("path", ["direct", "chunked"])
def test_common_key_offset_carried_state(gen, device, path, offset):
    """A prefill's state carried into a second piece (and the piece's returned state into
    decode): the piece's rows as accurate as without an offset."""
    n0, n1, d = 90, 120, 16
    q, k, v = _offset_qkv(gen, device, n0 + n1, d, offset)
    with torch.no_grad():
        _, st = csq_ext.attention(q[:, :, :n0], k[:, :, :n0], v[:, :, :n0], path=path,
                                  return_state=True)
    dy = randn(gen, 1, 4, n1, d, dtype=torch.float32, device=device)
    leaves = [t[:, :, n0:].detach().clone().requires_grad_() for t in (q, k, v)]
    with poisoned_memory(device):
        y, st1 = csq_ext.attention(*leaves, path=path, initial_state=st, return_state=True)
        grads = torch.autograd.grad(y, leaves, dy)
    full_dy = torch.cat([torch.zeros(1, 4, n0, d, device=device), dy], 2)
    y_ref, g_ref = reference_grads(q, k, v, 1.0, full_dy)
    assert_rel_close(y.cpu(), y_ref[:, :, n0:], F32, "y")
    for name, g in zip("qkv", grads):
        assert_rel_close(g.cpu(), g_ref[name][:, :, n0:], F32, f"d{name}")
    # One more token through decode from the returned state.
    tok = _offset_qkv(gen, device, 1, d, 0.0)
    tok = (tok[0], tok[1] + k[:, :, -1:], tok[2])
    y2, _ = csq_ext.decode(*tok, st1)
    all_q, all_k, all_v = (torch.cat([a, b], 2) for a, b in zip((q, k, v), tok))
    want = reference_grads(all_q, all_k, all_v, 1.0, torch.zeros(1, 4, n0 + n1 + 1, d))[0]
    assert_rel_close(y2.cpu(), want[:, :, -1:], F32, "decode")
