"""What the emulator's check scripts share (check_emu.py, check_emu_direct.py, check_emu_pool.py):
the dtype codes of the harnesses, the tolerances (docs/SPEC.md), ctypes argument helpers (the
inputs' leading arguments of every entry point, a call that raises with the harness's message),
outputs poisoned with NaN, packed batches, the error measure and the report line, and random
inputs with the strides a case names."""
import contextlib
import ctypes
import os
import runpy

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
reference = runpy.run_path(os.path.join(ROOT, "csq_ext", "reference.py"))["csq_attention_reference"]
DT = {torch.float64: 0, torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}
C = "contiguous"  # the layout of most inputs (strided() makes the others)


def arr(xs):
    return (ctypes.c_int64 * len(xs))(*[int(x) for x in xs])


def ptr(t):
    return ctypes.c_void_p(t.data_ptr())


def opt_ptr(t):
    return ctypes.c_void_p(None) if t is None else ptr(t)


def acc_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def qkv_args(q, k, v, shift):
    """The leading C arguments of the harnesses' entry points (emu_params.h, fill_qkv): the
    dtype code, the sizes (B, Hq, Hk, N, Dk, Dv), q, k, v with their element strides, and shift
    (a tensor the caller keeps alive: the accumulation dtype, contiguous)."""
    B, Hq, N, Dk = q.shape
    return (DT[q.dtype], arr([B, Hq, k.shape[1], N, Dk, v.shape[-1]]), ptr(q), arr(q.stride()),
            ptr(k), arr(k.stride()), ptr(v), arr(v.stride()), ptr(shift))


def scalar_args(scale, eps, *flags):
    """The C arguments after qkv_args: scale and eps as doubles, then the flags as ints."""
    return (ctypes.c_double(scale), ctypes.c_double(eps), *(int(f) for f in flags))


def call_status(entry, *args):
    """entry(*args, msg, msglen) (a harness entry point): its return code and message."""
    msg = ctypes.create_string_buffer(512)
    rc = entry(*args, msg, 512)
    return rc, msg.value.decode()


def call(entry, *args):
    """entry(*args, msg, msglen), which must succeed (an AssertionError with its message)."""
    rc, msg = call_status(entry, *args)
    assert rc == 0, msg


def nan_full(shape, dtype):
    """An output buffer that the kernels must write everywhere: NaN until they do."""
    return torch.full(shape, float("nan"), dtype=dtype)


def forward_outputs(q, v):
    """A forward's y (B, Hq, N, Dv), b and den (B, Hq, N) for q (B, Hq, N, Dk) and v (.., Dv):
    the accumulation dtype (the op's y is unrounded), NaN."""
    B, Hq, N, _ = q.shape
    acc = acc_of(q.dtype)
    return (nan_full((B, Hq, N, v.shape[-1]), acc), nan_full((B, Hq, N), acc),
            nan_full((B, Hq, N), acc))


def gradient_outputs(q, k, v):
    """A backward's dq, dk, dv (the shapes of q, k, v) and db (B, Hq, N): the accumulation
    dtype, NaN."""
    acc = acc_of(q.dtype)
    return (nan_full(q.shape, acc), nan_full(k.shape, acc), nan_full(v.shape, acc),
            nan_full(q.shape[:3], acc))


def cu_seqlens(lens):
    """The int64 cu_seqlens (S + 1 offsets) of sequences of these lengths."""
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int64)


def packed_batch(lens):
    """(B, S, T, cu) of a carried-state case: lens an int N, two batch entries of N positions
    (B = S = 2, no cu_seqlens), or a list of sequence lengths packed into one batch entry
    (B = 1, S = len(lens), T their sum, cu their cu_seqlens)."""
    if isinstance(lens, list):
        return 1, len(lens), sum(lens), cu_seqlens(lens)
    return 2, 2, lens, None


def rel(a, b):
    a, b = a.double(), b.double()
    # Relative, with a floor of 1: some gradients vanish (N = 1 with centering) or nearly.
    return (a - b).norm().item() / max(b.norm().item(), 1.0)


def report(name, errs, tol):
    """Prints one case's line (ok / FAIL, its worst error, the errors over tol); True if ok."""
    bad = {k_: e for k_, e in errs.items() if not (e <= tol)}
    print(("FAIL " if bad else "ok   ") + name + f"  max err {max(errs.values()):.2e}" +
          (f"  {bad}" if bad else ""), flush=True)
    return not bad


def strided(shape, dtype, g, kind, offset=0.0):
    """A random (B, H, N, D) tensor, as a non-contiguous view when kind says so."""
    B, H, N, D = shape
    if kind == "transposed":
        t = torch.randn(B, N, H, D, generator=g, dtype=torch.float64).transpose(1, 2)
    elif kind == "padded":
        t = torch.randn(B, H, N, D + 3, generator=g, dtype=torch.float64)[..., :D]
    elif kind == "every_other":
        t = torch.randn(B, H, N, 2 * D, generator=g, dtype=torch.float64)[..., ::2]
    elif kind == "expanded":
        t = torch.randn(1, H, N, D, generator=g, dtype=torch.float64)
    else:
        t = torch.randn(B, H, N, D, generator=g, dtype=torch.float64)
    t = t + offset
    if kind == "expanded":  # stride 0 over the batch
        return t.to(dtype).expand(B, H, N, D)
    if kind == "transposed":
        return t.transpose(1, 2).contiguous().to(dtype).transpose(1, 2)
    if kind == "padded":
        base = torch.zeros(B, H, N, D + 3, dtype=dtype)
        base[..., :D] = t.to(dtype)
        return base[..., :D]
    if kind == "every_other":
        base = torch.zeros(B, H, N, 2 * D, dtype=dtype)
        base[..., ::2] = t.to(dtype)
        return base[..., ::2]
    return t.to(dtype).contiguous()


def shift_grad(db):
    """The op's shift gradient from the kernels' db, as the host layer takes it
    (csrc/csq_host.h: db summed over batch entries and positions)."""
    return db.sum((0, 2))


class Emu:
    """The chunked ops' C entry points (emu_harness.cc) with tensors: outputs start as NaN, a
    failed launch raises (fwd with refusal=True returns its code and message instead)."""

    def __init__(self, lib):
        self.lib = lib

    @contextlib.contextmanager
    def feature_map(self, index):
        """The calls inside run the kernels built for feature map `index` (emu_params.h: 0
        StateMap, 1 the tests' LinearMap, float64 only)."""
        self.lib.emu_set_feature_map(index)
        try:
            yield
        finally:
            self.lib.emu_set_feature_map(0)

    def fwd(self, q, k, v, shift, causal, scale, center, normalize, eps, refusal=False):
        """The forward of the CUDA kernels: y, b, den; refusal=True: the launcher's return code and
        message instead (for shapes it must refuse)."""
        shift_acc = shift.to(acc_of(q.dtype)).contiguous()
        y, b, den = forward_outputs(q, v)
        rc, msg = call_status(self.lib.emu_fwd, *qkv_args(q, k, v, shift_acc),
                              *scalar_args(scale, eps, causal, center, normalize), ptr(y), ptr(b),
                              ptr(den))
        if refusal:
            return rc, msg
        assert rc == 0, msg
        return y, b, den

    def bwd(self, dy, q, k, v, shift, y, b, den, causal, scale, center, normalize, eps):
        shift_acc = shift.to(acc_of(q.dtype)).contiguous()
        dq, dk, dv, db = gradient_outputs(q, k, v)
        call(self.lib.emu_bwd, *qkv_args(q, k, v, shift_acc),
             *scalar_args(scale, eps, causal, center, normalize), ptr(dy), arr(dy.stride()), ptr(y),
             ptr(b), ptr(den), ptr(dq), ptr(dk), ptr(dv), ptr(db))
        return dq, dk, dv, shift_grad(db)

    def decode(self, q, k, v, shift, sums, ref, scale, center, normalize, eps):
        """One in-place step of the CUDA decode kernels on (sums, ref); returns y."""
        y = nan_full(q.shape[:3] + v.shape[-1:], q.dtype)
        call(self.lib.emu_decode, *qkv_args(q, k, v, shift),
             *scalar_args(scale, eps, center, normalize), ptr(sums), ptr(ref), ptr(y))
        return y
