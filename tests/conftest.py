"""Shared helpers for the csq_ext tests: seeded inputs, the float64 oracle, error measures,
tolerances, and output poisoning.

Conventions
-----------
* Every test gets its own seeded ``torch.Generator`` (fixture ``gen``), seeded from the test's
  node id, so inputs are fresh random numbers (never zeros) and every failure reproduces.
* Accuracy is the relative Frobenius error ``||x - ref|| / ||ref||`` against
  ``csq_ext.reference.csq_attention_reference`` run in float64 on float64 copies of the very
  inputs the kernel saw (after rounding to the kernel's dtype). ``TOL`` is the spec's table.
* Kernel calls go through :func:`poisoned_memory`, so an output element that the kernel forgets
  to write is NaN, not a stale number that happens to look right (see its docstring).
"""
from __future__ import annotations

import contextlib
import os
import sys
import zlib

import pytest
import torch

# The test modules import their helpers as plain modules (``from conftest import ...``,
# ``from hf_models import ...``): keep this folder importable under
# ``pytest --import-mode=importlib`` too, which does not put it on sys.path.
if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# The cost model's per-machine calibration (csq_ext/_calibrate.py) measures at the first
# path="auto" call: the tests pin the shipped rates, so that the paths auto picks (and the
# crossovers some tests assert) are the same on every machine. tests/test_calibration.py turns
# it on where it is the subject.
os.environ.setdefault("CSQ_CALIBRATE", "0")

import csq_ext
from csq_ext.reference import csq_attention_reference

# CI's installed-package stage (.ci/run) sets CSQ_EXPECT_INSTALLED=1: these tests must then
# exercise the installed wheel, never a checkout's csq_ext that would hide what the wheel lacks.
if os.environ.get("CSQ_EXPECT_INSTALLED") == "1" and "site-packages" not in csq_ext.__file__:
    raise RuntimeError(f"CSQ_EXPECT_INSTALLED=1 but csq_ext comes from {csq_ext.__file__}")

# The repository around tests/: its bench/, quality/, transfer/ and csrc/ hold scripts and
# sources that some tests run but that are not part of the installed package.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def repository_folder(*parts: str) -> str:
    """A folder of the repository beside tests/; skips the calling test (or, at import, its
    module) where the tests run from a copy without it, e.g. against an installed wheel."""
    path = os.path.join(REPO, *parts)
    if not os.path.isdir(path):
        pytest.skip(f"{'/'.join(parts)}/ is not beside the tests: it holds repository scripts "
                    "or sources, not part of the installed package (run the tests from a "
                    "checkout, or copy the folder beside them)", allow_module_level=True)
    return path


# The spec's accuracy table (relative Frobenius error against the float64 reference).
TOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.bfloat16: 2e-2,
    torch.float16: 2e-2,
}
# float32 with keys that share a common offset 30x their spread (spec, "Accuracy").
TOL_F32_OFFSET = 1e-4

FLOAT_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
HALF_DTYPES = [torch.bfloat16, torch.float16]

# Shapes (B, Hq, Hk, N, Dk, Dv) used across files. Names show up in test ids.
SHAPES = {
    "gqa": (2, 4, 2, 13, 3, 5),        # grouped-query heads, Dk != Dv, N not a chunk multiple
    "mha": (1, 3, 3, 11, 4, 4),        # Hq == Hk
    "mqa": (2, 3, 1, 9, 5, 2),         # one key/value head for all query heads
    "n1": (2, 2, 1, 1, 3, 4),          # a single position
    "n2": (1, 2, 2, 2, 4, 3),
    "chunk_multiple": (1, 2, 1, 16, 4, 6),
    "long": (1, 2, 1, 300, 8, 8),      # several default-size chunks (128) and a partial one
    "wide": (1, 2, 2, 70, 32, 16),     # larger head sizes, N > the 64 reference keys
}


# The devices every device-parametrized check runs on: the CPU always, CUDA where a GPU is.
# Only devices that exist are listed, so a check is never reported as skipped for want of one.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """One list of checks for every device (pytorch_scatter's pattern): a test that takes
    ``device`` runs on each entry of ``DEVICES``."""
    return request.param


# --------------------------------------------------------------------------------------------
# Randomness
# --------------------------------------------------------------------------------------------
@pytest.fixture
def gen(request) -> torch.Generator:
    """A CPU generator seeded from the test id: fresh inputs per test, reproducible runs."""
    g = torch.Generator()
    g.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    return g


def randn(gen, *shape, dtype=torch.float64, device="cpu", requires_grad=False):
    """N(0, 1) numbers drawn in float64 on the CPU (so every dtype/device sees the same draw),
    then rounded to ``dtype`` and moved to ``device``."""
    x = torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    return x.requires_grad_(requires_grad)


def shift_dtype(dtype):
    """The dtype of a shift tensor (and of states) for inputs of ``dtype``: the accumulation dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rand_shift(gen, hq, dtype=torch.float64, device="cpu", requires_grad=False):
    """A per-head shift tensor (Hq,) with values in +-[0.5, 1.5] (both signs, away from 0)."""
    mag = 0.5 + torch.rand(hq, generator=gen, dtype=torch.float64)
    sign = torch.where(torch.rand(hq, generator=gen) < 0.5, -1.0, 1.0).to(torch.float64)
    return (mag * sign).to(dtype=dtype, device=device).requires_grad_(requires_grad)


def strided_randn(gen, b, h, n, d, layout, dtype=torch.float64, device="cpu",
                  requires_grad=False):
    """A (b, h, n, d) random tensor in one of several memory layouts:

    * ``contiguous``
    * ``transposed``: a (b, n, h, d) tensor viewed through ``.transpose(1, 2)`` (the usual
      output of a fused QKV projection)
    * ``sliced``: every other element of a (b, h, n, 2d) tensor (last-dim stride 2)
    * ``expanded``: one batch row broadcast with stride 0 over the batch dimension
    """
    if layout == "contiguous":
        x = randn(gen, b, h, n, d, dtype=dtype, device=device)
    elif layout == "transposed":
        x = randn(gen, b, n, h, d, dtype=dtype, device=device).transpose(1, 2)
    elif layout == "sliced":
        x = randn(gen, b, h, n, 2 * d, dtype=dtype, device=device)[..., ::2]
    elif layout == "expanded":
        x = randn(gen, 1, h, n, d, dtype=dtype, device=device).expand(b, h, n, d)
    else:
        raise ValueError(layout)
    assert x.shape == (b, h, n, d)
    return x.requires_grad_(requires_grad)


def make_qkv(gen, shape, dtype=torch.float64, device="cpu", layout="contiguous",
             requires_grad=False):
    """q (B, Hq, N, Dk), k (B, Hk, N, Dk), v (B, Hk, N, Dv) for a SHAPES tuple."""
    B, Hq, Hk, N, Dk, Dv = shape
    kw = dict(layout=layout, dtype=dtype, device=device, requires_grad=requires_grad)
    return (strided_randn(gen, B, Hq, N, Dk, **kw), strided_randn(gen, B, Hk, N, Dk, **kw),
            strided_randn(gen, B, Hk, N, Dv, **kw))


# --------------------------------------------------------------------------------------------
# Poisoning
# --------------------------------------------------------------------------------------------
def _leave_nan_garbage(device, nbytes=(256, 4096, 65536, 1 << 20), copies=2):
    """Allocates NaN-filled blocks of several sizes and frees them, so that the allocator's free
    lists (glibc malloc on the CPU, the caching allocator on CUDA) hand NaN memory to the next
    allocations of similar sizes."""
    blocks = [torch.full((n // 4,), float("nan"), dtype=torch.float32, device=device)
              for n in nbytes for _ in range(copies)]
    del blocks


@contextlib.contextmanager
def poisoned_memory(device="cpu"):
    """Makes fresh, uninitialized memory hold NaN while the block runs.

    The op allocates its outputs itself (``at::empty``), so the tests cannot hand it a buffer
    pre-filled with NaN. Two mechanisms make "forgot to write an element" visible instead:

    1. ``torch.use_deterministic_algorithms(True)`` with
       ``torch.utils.deterministic.fill_uninitialized_memory = True``: ATen's ``empty`` kernels
       (which ``at::empty`` inside the extension dispatches to, on CPU and CUDA) fill every new
       floating-point tensor with NaN. This is deterministic, and a canary below proves it.
       ``warn_only=True`` so nothing raises for lack of a deterministic implementation.
    2. Belt and braces, and the classic trick: allocate large NaN-filled tensors, delete them,
       then run the op, so recycled memory (malloc free lists; CUDA's caching allocator, which
       keeps freed blocks) holds NaN.

    A kernel that leaves any output element unwritten then returns NaN there, which the tests
    catch with ``torch.isfinite(out).all()`` next to the reference comparison.
    """
    prev = (torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.utils.deterministic.fill_uninitialized_memory)
    _set_deterministic(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        _leave_nan_garbage(device)
        canary = torch.empty(97, dtype=torch.float32, device=device)
        assert torch.isnan(canary).all(), "poisoning is not in effect"
        yield
    finally:
        _set_deterministic(prev[0], warn_only=prev[1])
        torch.utils.deterministic.fill_uninitialized_memory = prev[2]


# torch.use_deterministic_algorithms also imports and sets torch._inductor.config, which costs
# ~13 ms a call on this machine; the flag itself is one C call. Fall back to the public API if
# the private setter ever disappears.
_set_deterministic = getattr(torch._C, "_set_deterministic_algorithms",
                             torch.use_deterministic_algorithms)


# --------------------------------------------------------------------------------------------
# Running the kernel and the reference
# --------------------------------------------------------------------------------------------
_REF_KEYS = ("causal", "scale", "center", "normalize", "eps")


def _to64(x):
    return x.detach().to(device="cpu", dtype=torch.float64) if isinstance(x, torch.Tensor) else x


def reference(q, k, v, shift=1.0, **kw):
    """The float64 oracle on float64 CPU copies of the inputs. ``kw`` may contain any option of
    ``csq_ext.attention``; ``tile_size`` is ignored (the reference has no chunks)."""
    rkw = {key: kw[key] for key in _REF_KEYS if key in kw}
    return csq_attention_reference(_to64(q), _to64(k), _to64(v), shift=_to64(shift), **rkw)


def reference_grads(q, k, v, shift, dy, **kw):
    """(y, {name: grad}) of the float64 oracle; ``shift`` gets a gradient when it is a
    tensor."""
    q64, k64, v64 = (_to64(t).requires_grad_() for t in (q, k, v))
    inputs = {"q": q64, "k": k64, "v": v64}
    s64 = shift
    if isinstance(shift, torch.Tensor):
        s64 = _to64(shift).requires_grad_()
        inputs["shift"] = s64
    rkw = {key: kw[key] for key in _REF_KEYS if key in kw}
    y = csq_attention_reference(q64, k64, v64, shift=s64, **rkw)
    grads = torch.autograd.grad(y, list(inputs.values()), _to64(dy))
    return y.detach(), dict(zip(inputs, grads))


def csq(q, k, v, shift=1.0, **kw):
    """``csq_ext.attention`` with poisoned fresh memory."""
    with poisoned_memory(q.device):
        return csq_ext.attention(q, k, v, shift=shift, **kw)


def csq_grads(q, k, v, shift, dy, **kw):
    """(y, {name: grad}) of ``csq_ext.attention`` (forward and backward with poisoned memory),
    on leaf copies of the inputs that keep their dtype, device and strides."""
    qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))  # strides unchanged
    inputs = {"q": qq, "k": kk, "v": vv}
    s = shift
    if isinstance(shift, torch.Tensor):
        s = shift.detach().clone().requires_grad_()
        inputs["shift"] = s
    with poisoned_memory(q.device):
        y = csq_ext.attention(qq, kk, vv, shift=s, **kw)
        grads = torch.autograd.grad(y, list(inputs.values()), dy)
    return y.detach(), dict(zip(inputs, grads))


def rel_err(actual, expected, floor=0.0) -> float:
    """Relative Frobenius error ``||a - e|| / max(||e||, floor)`` in float64. ``floor`` is for
    quantities that vanish exactly in exact arithmetic (gradients at N = 1), where a relative
    error only measures rounding noise; a zero reference always falls back to the absolute
    error."""
    a = actual.detach().to(device="cpu", dtype=torch.float64)
    e = expected.detach().to(device="cpu", dtype=torch.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    den = max(e.norm().item(), floor)
    num = (a - e).norm().item()
    return num / den if den > 0 else num


def assert_rel_close(actual, expected, tol, what="output", floor=0.0):
    """Shape equality, every element finite (poisoned memory shows up here), and relative
    Frobenius error (see ``rel_err``) <= tol."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != " \
                                           f"{tuple(expected.shape)}"
    finite = torch.isfinite(actual)
    assert finite.all(), f"{what}: {int((~finite).sum())} of {actual.numel()} elements are " \
                         f"not finite (first at {tuple((~finite).nonzero()[0].tolist())})"
    err = rel_err(actual, expected, floor)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"
    return err


def call_op(q, k, v, shift, causal=True, scale=None, center=True, normalize=True, eps=1e-6,
            tile_size=0):
    """torch.ops.csq_ext.csq_chunked_fwd with the public defaults filled in: (y, b, den)."""
    tau = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.ops.csq_ext.csq_chunked_fwd(*fwd_op_args(q, k, v, shift, causal, tau, center,
                                                  normalize, eps, tile_size))[:3]


def fwd_op_args(q, k, v, shift, causal, scale, center, normalize, eps, tile_size,
                cu_seqlens=None, state_in=None, ref_in=None, return_state=False):
    """The positional arguments of torch.ops.csq_ext.csq_chunked_fwd, in schema order."""
    return (q, k, v, shift, cu_seqlens, state_in, ref_in, causal, scale, center, normalize,
            eps, tile_size, return_state)


def reference_blocked(q, k, v, shift=1.0, causal=True, scale=None, center=True,
                      normalize=True, eps=1e-6, block=1024, device=None, **_ignored):
    """The same definition as the reference, in float64, computed for ``block`` query rows at
    a time, so long sequences (N = 65536) need O(block * N) memory instead of O(N^2).
    Forward only. Runs on ``device`` (default: the device of q)."""
    device = q.device if device is None else device
    q, k, v = (t.detach().to(device=device, dtype=torch.float64) for t in (q, k, v))
    B, Hq, N, Dk = q.shape
    g = Hq // k.shape[1]
    tau = Dk ** -0.5 if scale is None else scale
    k_, v_ = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    if isinstance(shift, torch.Tensor):
        c = shift.detach().to(device=device, dtype=torch.float64).view(1, Hq, 1)
    else:
        c = torch.full((1, Hq, 1), float(shift), dtype=torch.float64, device=device)
    n = torch.arange(1, N + 1, dtype=torch.float64, device=device)
    if center:
        mu = k_.cumsum(2) / n[:, None] if causal else k_.mean(2, keepdim=True).expand_as(k_)
    out = torch.empty(B, Hq, N, v.shape[-1], dtype=torch.float64, device=device)
    j = torch.arange(N, device=device)
    for i0 in range(0, N, block):
        i1 = min(N, i0 + block)
        qb = q[:, :, i0:i1]
        b = c - tau * (qb * mu[:, :, i0:i1]).sum(-1) if center else c.expand(B, Hq, i1 - i0)
        w = (tau * qb @ k_.transpose(-1, -2) + b[..., None]).square()
        if causal:
            w = w.masked_fill(j[None, :] > torch.arange(i0, i1, device=device)[:, None], 0.0)
        num = w @ v_
        out[:, :, i0:i1] = num / (w.sum(-1, keepdim=True) + eps) if normalize else num
    return out


def check_float32_offset_keys(gen, causal, n, dk, dv, device="cpu", **kw):
    """Keys = N(0, 1) + o with |o_x| = 30 (30x their spread), float32 on ``device``: outputs
    and gradients within the spec's 1e-4 of the float64 reference on the same numbers. ``kw``:
    further options of ``csq_ext.attention`` (path, tile_size)."""
    B, Hq, Hk = 1, 4, 2
    offset = 30 * torch.sign(randn(gen, 1, Hk, 1, dk))
    q = randn(gen, B, Hq, n, dk, dtype=torch.float32, device=device)
    k = (randn(gen, B, Hk, n, dk) + offset).to(device, torch.float32)
    v = randn(gen, B, Hk, n, dv, dtype=torch.float32, device=device)
    shift = rand_shift(gen, Hq, torch.float32, device=device)
    dy = randn(gen, B, Hq, n, dv, dtype=torch.float32, device=device)
    y, grads = csq_grads(q, k, v, shift, dy, causal=causal, **kw)
    y_ref, grads_ref = reference_grads(q, k, v, shift, dy, causal=causal)
    assert_rel_close(y, y_ref, TOL_F32_OFFSET, "y")
    for name in grads:
        assert_rel_close(grads[name], grads_ref[name], TOL_F32_OFFSET, f"d{name}")


def prefill_state(gen, B, Hq, Hk, n, dk, dv, dtype, shift, key_offset=0.0, **kw):
    """Inputs of n tokens (drawn on the CPU) and the state the CPU backend leaves after them:
    ``((q, k, v), state)``. Move the state with ``state.to(device)``."""
    q = randn(gen, B, Hq, n, dk, dtype=dtype)
    k = (randn(gen, B, Hk, n, dk) + key_offset).to(dtype)
    v = randn(gen, B, Hk, n, dv, dtype=dtype)
    _, st = csq_ext.attention(q, k, v, shift=shift.cpu(), return_state=True, **kw)
    return (q, k, v), st
