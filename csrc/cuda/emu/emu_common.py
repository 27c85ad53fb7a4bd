"""What the emulator's check scripts share (check_emu.py, check_emu_direct.py): the dtype codes
of the harnesses, the tolerances (docs/SPEC.md), ctypes argument helpers, the error measure and
the report line, and random inputs with the strides a case names."""
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
