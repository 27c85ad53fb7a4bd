"""float32 accuracy when keys drift along the sequence or a few keys are far larger than the
rest (docs/SPEC.md, section 6), on every path, outputs and gradients.

* Drift: keys = N(0, 1) + a trend along one direction whose size reaches R times the keys'
  norm (linear, or a sine over the sequence, as position terms make). The chunked path's
  float32 state used to lose digits with the square of the spread (2e-4 to 2e-3 at R = 1000,
  rows up to 6e-2); the op now measures the state's conditioning and computes such calls in
  float64 (csrc/csq_params.h, state_read_ill_conditioned).
* Outliers: one key 1e4 to 1e10 times the others at Dk = 128 after which the direct path met
  its 2e-5 only marginally (3e-5 measured at Dk = 128 and 256): its tile references are keys
  near the mean, and far keys' scores are taken in float64; now ~3e-7."""
import math

import pytest
import torch

import csq_ext
from conftest import assert_rel_close, poisoned_memory, randn, reference_grads, rel_err

# docs/SPEC.md, section 6: rows after keys up to 1000x the typical norm, either path.
TOL_LARGE_KEYS = 2e-4
# and no single row far off it (the old chunked path: rows at 1e-2 to 6e-2).
TOL_ROW = 1e-3
# Rows after one key of any size, direct path (docs/SPEC.md); held with a 10x margin here.
TOL_OUTLIER_DIRECT = 2e-6


def _drift_keys(gen, n, d, R, kind, hk=2):
    noise = randn(gen, 1, hk, n, d)
    u = randn(gen, 1, hk, 1, d)
    u = u / u.norm(dim=-1, keepdim=True) * noise.norm(dim=-1).mean()
    t = torch.arange(n, dtype=torch.float64)[None, None, :, None] / n
    trend = t if kind == "linear" else torch.sin(2 * math.pi * t)
    return noise + R * trend * u


def _max_row_err(y, want):
    y, want = y.detach().cpu().double(), want.double()
    return ((y - want).norm(dim=-1) / want.norm(dim=-1).clamp_min(1e-30)).max().item()


@pytest.mark.parametrize("R", [30, 1000])
@pytest.mark.parametrize("kind", ["linear", "sine"])
@pytest.mark.parametrize("d", [16, 128])
@pytest.mark.parametrize("path", ["chunked", "direct", "auto"])
def test_drifting_keys(gen, device, path, d, kind, R):
    n = 400
    q = randn(gen, 1, 4, n, d, dtype=torch.float32, device=device)
    k = _drift_keys(gen, n, d, R, kind).to(device, torch.float32)
    v = randn(gen, 1, 2, n, d, dtype=torch.float32, device=device)
    dy = randn(gen, 1, 4, n, d, dtype=torch.float32, device=device)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    with poisoned_memory(device):
        y = csq_ext.attention(*leaves, path=path)
        grads = torch.autograd.grad(y, leaves, dy)
    y_ref, g_ref = reference_grads(q, k, v, 1.0, dy)
    assert_rel_close(y.cpu(), y_ref, TOL_LARGE_KEYS, "y")
    assert _max_row_err(y, y_ref) <= TOL_ROW
    for name, g in zip("qkv", grads):
        assert_rel_close(g.cpu(), g_ref[name], TOL_LARGE_KEYS, f"d{name}")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("path", ["chunked", "direct"])
def test_drifting_keys_packed_and_not_causal(gen, device, path, causal):
    """Each packed sequence drifts on its own; causal or not."""
    cu = torch.tensor([0, 150, 150, 400])
    q = randn(gen, 1, 2, 400, 32, dtype=torch.float32, device=device)
    k = torch.cat([_drift_keys(gen, 150, 32, 1000, "linear", 1),
                   _drift_keys(gen, 250, 32, 500, "sine", 1)], 2).to(device, torch.float32)
    v = randn(gen, 1, 1, 400, 32, dtype=torch.float32, device=device)
    with poisoned_memory(device):
        y = csq_ext.attention(q, k, v, path=path, causal=causal, cu_seqlens=cu.to(device))
    for a, b in ((0, 150), (150, 400)):
        want = reference_grads(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], 1.0,
                               torch.zeros(1, 2, b - a, 32), causal=causal)[0]
        assert_rel_close(y[:, :, a:b].cpu(), want, TOL_LARGE_KEYS, f"sequence {a}:{b}")
        assert _max_row_err(y[:, :, a:b], want) <= TOL_ROW


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_drifting_keys_half(gen, device, dtype):
    """Half inputs keep float32 states and their own bar (2e-2), drift or not."""
    n, d = 300, 32
    q = randn(gen, 1, 2, n, d).to(device, dtype)
    k = (_drift_keys(gen, n, d, 1000, "linear", 1) / 100).to(device, dtype)
    v = randn(gen, 1, 1, n, d).to(device, dtype)
    for path in ("chunked", "direct"):
        with poisoned_memory(device):
            y = csq_ext.attention(q, k, v, path=path)
        want = reference_grads(q, k, v, 1.0, torch.zeros(1, 2, n, d))[0]
        assert_rel_close(y.float().cpu(), want, 2e-2, path)


@pytest.mark.parametrize("magnitude", [1e4, 1e6, 1e10])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("seed", range(3))
def test_rows_after_an_outlier_key_direct_path_d128(device, d, magnitude, seed):
    """The seeds of the old failure (3e-5 at d = 128, 1e6) among others: rows after the
    outlier, and every row before it, within a tenth of the bar."""
    g = torch.Generator().manual_seed(1000 * seed + d)
    q, k, v = (randn(g, 1, 2, 300, d) for _ in range(3))
    k[:, :, 50] = magnitude * torch.sign(randn(g, d))
    q, k, v = (t.to(device, torch.float32) for t in (q, k, v))
    with poisoned_memory(device):
        y = csq_ext.attention(q, k, v, path="direct")
    want = reference_grads(q, k, v, 1.0, torch.zeros(1, 2, 300, d))[0]
    assert_rel_close(y[:, :, 51:].cpu(), want[:, :, 51:], TOL_OUTLIER_DIRECT, "rows after")
    assert_rel_close(y[:, :, :50].cpu(), want[:, :, :50], TOL_OUTLIER_DIRECT, "rows before")


def test_rows_after_an_outlier_nearly_orthogonal_query(device):
    """The worst row of the old failure, built on purpose: a query orthogonal to a 1e6 key up
    to 1e-6 gives that key a moderate score, which a float32 GEMM over the key's large terms
    got wrong by 1e-3 (row error 8e-4)."""
    g = torch.Generator().manual_seed(7)
    d, n = 128, 300
    q, k, v = (randn(g, 1, 1, n, d) for _ in range(3))
    k[:, :, 50] = 1e6 * torch.sign(randn(g, d))
    ko = k[0, 0, 50] / k[0, 0, 50].norm()
    q[:, :, 51:] -= ((q[:, :, 51:] @ ko) - 1e-6 * randn(g, 1, 1, n - 51))[..., None] * ko
    q, k, v = (t.to(device, torch.float32) for t in (q, k, v))
    with poisoned_memory(device):
        y = csq_ext.attention(q, k, v, path="direct")
    want = reference_grads(q, k, v, 1.0, torch.zeros(1, 1, n, d))[0]
    assert_rel_close(y[:, :, 51:].cpu(), want[:, :, 51:], TOL_OUTLIER_DIRECT, "rows after")
    assert _max_row_err(y[:, :, 51:], want[:, :, 51:]) <= 2e-5


@pytest.mark.parametrize("store", ["whole", "per-tile"])
def test_far_keys_every_key_store_d128(monkeypatch, store):
    """The far keys of a tile (found once per tile, csrc/cpu/csq_direct_cpu.h) serve the keys
    converted once per sequence and those converted per tile pair
    (CSQ_CPU_KEY_STORE_MAX_ELEMS=0) alike, forward and backward: a 1e6 key at 50 with queries
    nearly orthogonal to it and a 1e4 key at 200 (two tiles of 64 with a far key), Dk = 128.
    Outputs within a tenth of the bar, every row within the bar; gradients within 5x a dense
    float32 computation (docs/SPEC.md, section 6); a NaN key in the far key's tile reaches
    exactly the rows after it, outputs and dq."""
    if store == "per-tile":
        monkeypatch.setenv("CSQ_CPU_KEY_STORE_MAX_ELEMS", "0")
    g = torch.Generator().manual_seed(11)
    d, n = 128, 300
    q, k, v = (randn(g, 1, 2, n, d) for _ in range(3))
    k[:, :, 50] = 1e6 * torch.sign(randn(g, d))
    k[:, :, 200] = 1e4 * torch.sign(randn(g, d))
    ko = k[0, 0, 50] / k[0, 0, 50].norm()
    q[:, :, 51:] -= ((q[:, :, 51:] @ ko) - 1e-6 * randn(g, 1, 2, n - 51))[..., None] * ko
    q, k, v = (t.float() for t in (q, k, v))
    dy = randn(g, 1, 2, n, d).float()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with poisoned_memory("cpu"):
        y = csq_ext.attention(*leaves, path="direct", tile_size=64)
        grads = torch.autograd.grad(y, leaves, dy)
    y_ref, g_ref = reference_grads(q, k, v, 1.0, dy)
    assert_rel_close(y[:, :, 51:], y_ref[:, :, 51:], TOL_OUTLIER_DIRECT, "rows after")
    assert_rel_close(y[:, :, :50], y_ref[:, :, :50], TOL_OUTLIER_DIRECT, "rows before")
    assert _max_row_err(y, y_ref) <= 2e-5
    dense = [t.clone().requires_grad_() for t in (q, k, v)]
    g_dense = torch.autograd.grad(csq_ext.reference.csq_attention_reference(*dense), dense, dy)
    for name, got, want in zip("qkv", grads, g_dense):
        dense_err = rel_err(want, g_ref[name])
        assert rel_err(got, g_ref[name]) <= max(TOL_LARGE_KEYS, 5 * dense_err), f"d{name}"

    p = 70  # in the 1e6 key's tile, after it
    k[:, :, p, 3] = float("nan")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with poisoned_memory("cpu"):
        y = csq_ext.attention(*leaves, path="direct", tile_size=64)
        dq = torch.autograd.grad(y, leaves[0], dy)[0]
    for what, t in (("y", y), ("dq", dq)):
        bad = ~torch.isfinite(t)
        assert not bad[:, :, :p].any() and bad[:, :, p:].all(), what
    assert_rel_close(y[:, :, 51:p], y_ref[:, :, 51:p], TOL_OUTLIER_DIRECT, "rows before NaN")


@pytest.mark.parametrize("magnitude", [1e3, 1e6])
def test_rows_after_a_huge_key_chunked_path(gen, device, magnitude):
    """The chunked path used to lose digits beyond 1000x (docs/SPEC.md's old "limits of the
    state form": 0.1 to 2 at 1e5 to 1e8); its conditioning check now computes such calls in
    float64."""
    q, k, v = (randn(gen, 1, 2, 600, 32) for _ in range(3))
    k[:, :, 50] = magnitude * torch.sign(randn(gen, 32))
    q, k, v = (t.to(device, torch.float32) for t in (q, k, v))
    dy = randn(gen, 1, 2, 600, 32, dtype=torch.float32, device=device)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    with poisoned_memory(device):
        y = csq_ext.attention(*leaves, path="chunked")
        grads = torch.autograd.grad(y, leaves, dy)
    y_ref, g_ref = reference_grads(q, k, v, 1.0, dy)
    assert_rel_close(y[:, :, 51:].cpu(), y_ref[:, :, 51:], 2e-5, "rows after")
    for name, g in zip("qkv", grads):
        assert rel_err(g.cpu(), g_ref[name]) <= TOL_LARGE_KEYS, f"d{name}"


# --------------------------------------------------------------------------------------------
# Carried states of such keys: a float32 state has lost the digits its readers need
# (docs/SPEC.md, section 6, "Limits"); a float64 state keeps them, for float32 inputs too.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["chunked", "direct"])
def test_float64_state_streams_drifting_keys(gen, device, path):
    """Pieces continuing a float64 state, then decode and decode_ steps, on float32 inputs
    with keys drifting 1000x: the whole stream within the bar (a float32 state: 7e-4)."""
    n, d = 300, 16
    q = randn(gen, 1, 2, n, d, dtype=torch.float32, device=device)
    k = _drift_keys(gen, n, d, 1000, "sine", 1).to(device, torch.float32)
    v = randn(gen, 1, 1, n, d, dtype=torch.float32, device=device)
    st = csq_ext.CSQState.empty(1, 1, d, d, dtype=torch.float64, device=device)
    ys = []
    for a, b in ((0, 120), (120, 297)):
        y, st = csq_ext.attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], path=path,
                                  initial_state=st, return_state=True)
        assert y.dtype == torch.float32 and st.sums.dtype == torch.float64
        ys.append(y)
    y, st = csq_ext.decode(q[:, :, 297:298], k[:, :, 297:298], v[:, :, 297:298], st)
    ys.append(y)
    for i in (298, 299):
        out = torch.empty(1, 2, 1, d, device=device)
        ys.append(csq_ext.decode_(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], st,
                                  out=out))
    want = reference_grads(q, k, v, 1.0, torch.zeros(1, 2, n, d))[0]
    got = torch.cat(ys, 2)
    assert_rel_close(got.cpu(), want, TOL_LARGE_KEYS)
    assert _max_row_err(got, want) <= TOL_LARGE_KEYS


def test_float64_state_gradients(gen, device):
    """Gradients through a call that continues a float64 state reach the float32 inputs and
    the state, equal to the float64 call's."""
    d = 8
    q, k, v = (randn(gen, 1, 2 if i == 0 else 1, 40, d, dtype=torch.float32, device=device)
               for i in range(3))
    _, st = csq_ext.attention(*(t.double() for t in (q, k, v)), return_state=True)
    sums = st.sums.clone().requires_grad_()
    leaves = [t[:, :, :20].detach().clone().requires_grad_() for t in (q, k, v)]
    y = csq_ext.attention(*leaves, initial_state=csq_ext.CSQState(sums, st.ref))
    dy = randn(gen, 1, 2, 20, d, dtype=torch.float32, device=device)
    got = torch.autograd.grad(y, leaves + [sums], dy)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    sums64 = st.sums.clone().requires_grad_()
    y64 = csq_ext.attention(*leaves64, initial_state=csq_ext.CSQState(sums64, st.ref))
    want = torch.autograd.grad(y64, leaves64 + [sums64], dy.double())
    assert rel_err(y, y64) <= 1e-7
    for a, b, leaf in zip(got, want, leaves + [sums]):
        assert a.dtype == leaf.dtype and rel_err(a, b) <= 1e-6


def test_state_dtype_errors(gen):
    q, k, v = (randn(gen, 1, 2, 4, 3, dtype=torch.float32) for _ in range(3))
    half = csq_ext.CSQState.empty(1, 2, 3, 3).to(torch.float16)
    with pytest.raises(ValueError, match="initial_state.sums must be torch.float32.*or float64"):
        csq_ext.attention(q, k, v, initial_state=half)
    mixed = csq_ext.CSQState(csq_ext.CSQState.empty(1, 2, 3, 3, dtype=torch.float64).sums,
                             torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="sums and ref alike"):
        csq_ext.attention(q, k, v, initial_state=mixed)
