"""Checks the CUDA kernels of csrc/cuda, run by the CPU emulator (build_emu.py), against the
float64 reference csq_ext/reference.py: y, b, den and all gradients, for the four dtypes, causal
or not, centered or not, normalized or not, strided inputs, odd N and head sizes spanning
several feature tiles and slabs. Emulator only: it says nothing about speed.

    python build_emu.py /tmp/csqemu && python check_emu.py /tmp/csqemu/libcsqemu.so [quick]
"""
import ctypes
import math
import os
import runpy
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
reference = runpy.run_path(os.path.join(ROOT, "csq_ext", "reference.py"))["csq_attention_reference"]
lib = ctypes.CDLL(sys.argv[1] if len(sys.argv) > 1 else "/tmp/csqemu/libcsqemu.so")
QUICK = "quick" in sys.argv
DT = {torch.float64: 0, torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}


def arr(xs):
    return (ctypes.c_int64 * len(xs))(*[int(x) for x in xs])


def ptr(t):
    return ctypes.c_void_p(t.data_ptr())


def acc_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def emu_fwd(q, k, v, shift, causal, scale, center, normalize, eps):
    B, Hq, N, Dk = q.shape
    Hk, Dv = k.shape[1], v.shape[-1]
    acc = acc_of(q.dtype)
    shift_acc = shift.to(acc).contiguous()
    y = torch.full((B, Hq, N, Dv), float("nan"), dtype=acc)  # the op's y is unrounded
    b = torch.full((B, Hq, N), float("nan"), dtype=acc)
    den = torch.full((B, Hq, N), float("nan"), dtype=acc)
    msg = ctypes.create_string_buffer(512)
    rc = lib.emu_fwd(DT[q.dtype], arr([B, Hq, Hk, N, Dk, Dv]), ptr(q), arr(q.stride()), ptr(k),
                     arr(k.stride()), ptr(v), arr(v.stride()), ptr(shift_acc),
                     ctypes.c_double(scale), ctypes.c_double(eps), int(causal), int(center),
                     int(normalize), ptr(y), ptr(b), ptr(den), msg, 512)
    assert rc == 0, msg.value
    return y, b, den


def emu_bwd(dy, q, k, v, shift, y, b, den, causal, scale, center, normalize, eps):
    B, Hq, N, Dk = q.shape
    Hk, Dv = k.shape[1], v.shape[-1]
    acc = acc_of(q.dtype)
    shift_acc = shift.to(acc).contiguous()
    nan = float("nan")
    dq = torch.full(q.shape, nan, dtype=acc)
    dk = torch.full(k.shape, nan, dtype=acc)
    dv = torch.full(v.shape, nan, dtype=acc)
    db = torch.full((B, Hq, N), nan, dtype=acc)
    dshift = torch.full((B, Hq), nan, dtype=acc)
    msg = ctypes.create_string_buffer(512)
    rc = lib.emu_bwd(DT[q.dtype], arr([B, Hq, Hk, N, Dk, Dv]), ptr(q), arr(q.stride()), ptr(k),
                     arr(k.stride()), ptr(v), arr(v.stride()), ptr(shift_acc),
                     ctypes.c_double(scale), ctypes.c_double(eps), int(causal), int(center),
                     int(normalize), ptr(dy), arr(dy.stride()), ptr(y), ptr(b), ptr(den), ptr(dq),
                     ptr(dk), ptr(dv), ptr(db), ptr(dshift), msg, 512)
    assert rc == 0, msg.value
    return dq, dk, dv, dshift.sum(0)


def rel(a, b):
    a, b = a.double(), b.double()
    # Relative, with a floor of 1: some gradients vanish (N = 1 with centering) or nearly.
    return (a - b).norm().item() / max(b.norm().item(), 1.0)


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


def check_case(dtype, B, Hq, Hk, N, Dk, Dv, causal, center, normalize, kinds, seed,
               key_offset=0.0, grads=True):
    g = torch.Generator().manual_seed(seed)
    q = strided((B, Hq, N, Dk), dtype, g, kinds[0])
    k = strided((B, Hk, N, Dk), dtype, g, kinds[1], key_offset)
    v = strided((B, Hk, N, Dv), dtype, g, kinds[2])
    shift = (torch.rand(Hq, generator=g, dtype=torch.float64) + 0.5).to(
        torch.float32 if dtype != torch.float64 else torch.float64)
    scale, eps = Dk ** -0.5, 1e-6
    y, b, den = emu_fwd(q, k, v, shift, causal, scale, center, normalize, eps)

    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    s64 = shift.double().requires_grad_()
    yr = reference(q64, k64, v64, causal=causal, scale=scale, shift=s64, center=center,
                   normalize=normalize, eps=eps)
    tol = TOL[dtype] * (10 if key_offset else 1)
    errs = {"y": rel(y, yr)}
    # den and b (b is saved relative to the reference key r).
    group = Hq // Hk
    kr = k64.detach().repeat_interleave(group, 1)
    n = torch.arange(1, N + 1, dtype=torch.float64) if causal else torch.full((N,), float(N))
    r = kr[:, :, : min(N, 64)].mean(2, keepdim=True) if center else torch.zeros_like(kr[:, :, :1])
    if center:
        mu = (kr.cumsum(2) if causal else kr.sum(2, keepdim=True).expand_as(kr)) / n[:, None]
    else:
        mu = torch.zeros_like(kr)
    b_ref = s64.detach()[None, :, None] - scale * (q64.detach() * (mu - r)).sum(-1)
    if not center:
        b_ref = s64.detach()[None, :, None].expand(B, Hq, N)
    w = (scale * q64.detach() @ kr.transpose(-1, -2) + (s64.detach()[None, :, None]
         - scale * (q64.detach() * mu).sum(-1) if center else s64.detach()[None, :, None]
         .expand(B, Hq, N))[..., None]) ** 2
    if causal:
        w = w.tril()
    errs["b"] = rel(b, b_ref)
    errs["den"] = rel(den, w.sum(-1))
    if grads:
        dy = strided((B, Hq, N, Dv), acc_of(dtype), g, kinds[0])  # the gradient of y
        yr.backward(dy.double())
        dq, dk, dv, dshift = emu_bwd(dy, q, k, v, shift, y, b, den, causal, scale, center,
                                     normalize, eps)
        errs.update(dq=rel(dq, q64.grad), dk=rel(dk, k64.grad), dv=rel(dv, v64.grad),
                    dshift=rel(dshift, s64.grad))
    bad = {k_: e for k_, e in errs.items() if not (e <= tol)}
    name = (f"{str(dtype)[6:]:8s} B{B} Hq{Hq} Hk{Hk} N{N:<4d} Dk{Dk:<3d} Dv{Dv:<3d} "
            f"causal={int(causal)} center={int(center)} norm={int(normalize)} "
            f"{'/'.join(kk[:5] for kk in kinds)} off={key_offset}")
    worst = max(errs.values())
    print(("FAIL " if bad else "ok   ") + name + f"  max err {worst:.2e}" +
          (f"  {bad}" if bad else ""), flush=True)
    return not bad


def check_nonfinite():
    """A NaN or Inf input reaches exactly the outputs that depend on it (the spec's propagation
    rule, as the project's tests state it), forward; the backward does not leak across batch
    entries nor, causal, into dq of earlier rows."""
    ok = True
    C = 0
    for bad, n, j in ((float("nan"), 10, 6), (float("inf"), 10, 6), (float("nan"), 150, 70),
                      (float("inf"), 150, 6)):
        for causal in (True, False):
            for what, center in (("v", True), ("q", True), ("k", True), ("k", False),
                                 ("shift", True)):
                g = torch.Generator().manual_seed(C)
                C += 1
                q = torch.randn(2, 4, n, 3, generator=g, dtype=torch.float64)
                k = torch.randn(2, 2, n, 3, generator=g, dtype=torch.float64)
                v = torch.randn(2, 2, n, 4, generator=g, dtype=torch.float64)
                shift = torch.rand(4, generator=g, dtype=torch.float64) + 0.5
                mask = torch.zeros(2, 4, n, 4, dtype=torch.bool)
                if what == "v":
                    v[1, 0, j, 2] = bad
                    mask[1, 0:2, j if causal else 0:, 2] = True
                elif what == "q":
                    q[0, 3, j - 1, 1] = bad
                    mask[0, 3, j - 1, :] = True
                elif what == "k":
                    k[1, 1, j, 0] = bad
                    mask[1, 2:4, j if causal else 0:, :] = True
                else:
                    shift[2] = bad
                    mask[:, 2] = True
                y, b, den = emu_fwd(q, k, v, shift, causal, 0.6, center, True, 1e-6)
                nonfin = ~torch.isfinite(y)
                good = bool(nonfin[mask].all()) and not bool((nonfin & ~mask).any())
                if what == "v" and bad != bad:  # the backward with a NaN in v
                    dy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
                    dq, dk, dv, _ = emu_bwd(dy, q, k, v, shift, y, b, den, causal, 0.6, center,
                                            True, 1e-6)
                    good &= not bool(torch.isfinite(dq[1, 0:2, j:]).any())
                    good &= all(bool(torch.isfinite(t[0]).all()) for t in (dq, dk, dv))
                    if causal:
                        good &= bool(torch.isfinite(dq[1, :, :j]).all())
                print(("ok   " if good else "FAIL ") + f"non-finite {bad} at {j} of N={n} in {what}, "
                      f"causal={int(causal)} center={int(center)}", flush=True)
                ok &= good
    return ok


def main():
    cases = []
    C = "contiguous"
    # Shapes: partial chunks, odd N, several feature tiles (Dk = 16: F = 153; Dk = 40: 861),
    # several slabs (Dk or Dv > 32), grouped heads, N < 64 (reference key from fewer keys).
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        cases += [
            (dtype, 1, 2, 1, 1, 3, 2, True, True, True, (C, C, C)),
            (dtype, 2, 4, 2, 37, 8, 5, True, True, True, ("transposed", "padded", "every_other")),
            (dtype, 1, 2, 2, 130, 16, 8, True, True, True, (C, "transposed", C)),
            (dtype, 1, 2, 1, 97, 16, 8, False, True, True, ("padded", C, "transposed")),
        ]
    cases += [
        (torch.float64, 1, 2, 1, 70, 5, 3, True, False, True, (C, C, C)),
        (torch.float64, 1, 2, 1, 70, 5, 3, True, True, False, (C, C, C)),
        (torch.float64, 1, 1, 1, 66, 6, 4, False, False, False, (C, C, C)),
        (torch.float64, 1, 1, 1, 65, 40, 36, True, True, True, (C, "padded", C)),
        (torch.float32, 1, 3, 1, 129, 40, 33, True, True, True, ("transposed", C, C)),
        (torch.float32, 1, 1, 1, 64, 1, 1, True, True, True, (C, C, C)),
        (torch.float32, 1, 2, 1, 200, 9, 7, False, True, False, (C, C, C)),
        (torch.float32, 3, 4, 2, 90, 12, 6, True, True, True, ("expanded",) * 3),
        (torch.float64, 2, 2, 2, 70, 4, 3, False, True, True, ("expanded", C, "expanded")),
    ]
    if "big" in sys.argv:  # the largest supported heads: 131 (float32) / 263 (float64) tiles
        cases = [(torch.float32, 1, 2, 1, 70, 128, 128, True, True, True, (C, C, C)),
                 (torch.float64, 1, 1, 1, 67, 128, 128, False, True, True, (C, C, C)),
                 (torch.bfloat16, 1, 1, 1, 65, 128, 96, True, True, True, (C, C, C))]
    if QUICK:
        cases = cases[:6]
    ok = True
    for i, c in enumerate(cases):
        ok &= check_case(*c, seed=i)
    ok &= check_nonfinite()
    # Keys sharing a large offset: float32 must stay accurate through the reference key.
    ok &= check_case(torch.float32, 1, 2, 1, 150, 8, 4, True, True, True, (C, C, C), seed=99,
                     key_offset=30.0)
    print("ALL OK" if ok else "SOME FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
