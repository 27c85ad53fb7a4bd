"""The direct path's CUDA kernels (csq_direct_*.cuh), run by the CPU emulator, against the
float64 reference csq_ext/reference.py and against the CPU backend's direct operator with the
same tile length (64: then b, which goes with the tile's reference key, matches too): y, b, den,
dq, dk, dv, dshift for the four dtypes, causal or not, centered or not, normalized or not,
grouped heads, Dk != Dv, strided inputs, odd N, packed batches, head sizes up to 256,
non-finite inputs, keys with a large common offset, and (bfloat16 / float16) the tensor-core
products against the CUDA-core ones. Every output starts as NaN.

Used by check_emu.py (which prints "direct" on every line of this family); alone:
    python check_emu_direct.py LIB [quick]
"""
import ctypes
import sys

import torch

from emu_common import (C, TOL, acc_of, arr, call, cu_seqlens, forward_outputs, gradient_outputs,
                        opt_ptr, ptr, qkv_args, reference, rel, report, scalar_args, shift_grad,
                        strided)
from emu_inputs import nonfinite_reach

TILE = 64  # kDirectTile
MAX_ERR = {}  # dtype -> worst error against the reference over every case


def _cu_args(cu):
    if cu is None:
        return ctypes.c_void_p(None), ctypes.c_int64(0)
    return ctypes.c_void_p(cu.data_ptr()), ctypes.c_int64(cu.numel() - 1)


def emu_direct_fwd(lib, q, k, v, shift, cu, opts, tensor_cores=1, row_shift=None,
                   row_sums=None):
    causal, scale, center, normalize, eps = opts
    acc = acc_of(q.dtype)
    shift_acc = shift.to(acc).contiguous()
    y, b, den = forward_outputs(q, v)
    # The optional per-query inputs, as the host layer passes them: contiguous, accumulation dtype.
    row_shift, row_sums = (None if t is None else t.to(acc).contiguous()
                           for t in (row_shift, row_sums))
    call(lib.emu_direct_fwd, *qkv_args(q, k, v, shift_acc),
         *scalar_args(scale, eps, causal, center, normalize), *_cu_args(cu), int(tensor_cores),
         opt_ptr(row_shift), opt_ptr(row_sums), ptr(y), ptr(b), ptr(den))
    return y, b, den


def emu_direct_bwd(lib, dy, q, k, v, shift, cu, y, b, den, opts, tensor_cores=1):
    causal, scale, center, normalize, eps = opts
    shift_acc = shift.to(acc_of(q.dtype)).contiguous()
    dq, dk, dv, db = gradient_outputs(q, k, v)
    call(lib.emu_direct_bwd, *qkv_args(q, k, v, shift_acc),
         *scalar_args(scale, eps, causal, center, normalize), *_cu_args(cu), int(tensor_cores),
         ptr(dy), arr(dy.stride()), ptr(y), ptr(b), ptr(den), ptr(dq), ptr(dk), ptr(dv), ptr(db))
    return dq, dk, dv, shift_grad(db)


def _report(name, errs, tol, track=None):
    if track is not None:
        MAX_ERR[track] = max(MAX_ERR.get(track, 0.0), max(errs.values()))
    return report("direct " + name, errs, tol)


def _cpu_op():
    """The CPU backend's direct operators (the CPU build of csq_ext), or None."""
    try:
        import csq_ext  # noqa: F401
        return torch.ops.csq_ext
    except Exception as e:  # pragma: no cover
        print(f"direct: CPU backend not importable ({e}); checking against the reference only")
        return None


def check_direct(lib, dtype, B, Hq, Hk, N, Dk, Dv, causal, center, normalize, kinds, seed,
                 lens=None, key_offset=0.0, tensor_cores=1, grads=True, cpu=True):
    """One configuration: the emulated kernels against the float64 reference (per sequence
    when packed) and against the CPU backend's csq_direct_fwd / csq_direct_bwd."""
    g = torch.Generator().manual_seed(seed)
    cu = None
    if lens is not None:
        cu = cu_seqlens(lens)
        B, N = 1, int(cu[-1])
    q = strided((B, Hq, N, Dk), dtype, g, kinds[0])
    k = strided((B, Hk, N, Dk), dtype, g, kinds[1], key_offset)
    v = strided((B, Hk, N, Dv), dtype, g, kinds[2])
    acc = acc_of(dtype)
    shift = (torch.rand(Hq, generator=g, dtype=torch.float64) + 0.5).to(acc)
    opts = (causal, Dk ** -0.5, center, normalize, 1e-6)
    y, b, den = emu_direct_fwd(lib, q, k, v, shift, cu, opts, tensor_cores)
    dy = torch.randn(B, Hq, N, Dv, generator=g, dtype=torch.float64).to(acc)
    if kinds[0] == "transposed":  # a strided incoming gradient too
        dy = dy.transpose(1, 2).contiguous().transpose(1, 2)
    if grads:
        dq, dk, dv, dshift = emu_direct_bwd(lib, dy, q, k, v, shift, cu, y, b, den, opts,
                                            tensor_cores)
    # The reference, per packed sequence.
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    s64 = shift.double().requires_grad_()
    bounds = [(0, N)] if cu is None else list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    yref = torch.zeros(B, Hq, N, Dv, dtype=torch.float64)
    loss = 0
    for a, e in bounds:
        if e == a:
            continue
        sl = (slice(None), slice(None), slice(a, e))
        yr = reference(q64[sl], k64[sl], v64[sl], causal=causal, scale=opts[1], shift=s64,
                       center=center, normalize=normalize, eps=opts[4])
        yref[sl] = yr.detach()
        loss = loss + (yr * dy[sl].double()).sum()
    tol = TOL[dtype] * (10 if key_offset else 1)
    errs = {"y": rel(y, yref)}
    if grads and N > 0:
        loss.backward()
        errs.update(dq=rel(dq, q64.grad), dk=rel(dk, k64.grad), dv=rel(dv, v64.grad),
                    dshift=rel(dshift, s64.grad))
    ops = _cpu_op() if cpu else None
    if ops is not None:
        cy, cb, cden, _, cref = ops.csq_direct_fwd(q, k, v, shift, cu, None, None, causal,
                                                   opts[1], center, normalize, opts[4], TILE,
                                                   False)
        errs.update(y_cpu=rel(y, cy), b_cpu=rel(b, cb), den_cpu=rel(den, cden))
        if grads:
            cq, ck, cv, cs, _, _ = ops.csq_direct_bwd(dy, q, k, v, shift, cu, None, cref, cy, cb,
                                                      cden, None, None, False, causal, opts[1],
                                                      center, normalize, opts[4], TILE)
            # The op returns dq, dk, dv in the input dtype (the host file rounds them).
            errs.update(dq_cpu=rel(dq.to(dtype), cq), dk_cpu=rel(dk.to(dtype), ck),
                        dv_cpu=rel(dv.to(dtype), cv), dshift_cpu=rel(dshift, cs))
    name = (f"{str(dtype)[6:]:8s} B{B} Hq{Hq} Hk{Hk} N{N:<4d} Dk{Dk:<3d} Dv{Dv:<3d} "
            f"causal={int(causal)} center={int(center)} norm={int(normalize)} "
            f"{'/'.join(kk[:5] for kk in kinds)}" + (f" lens={lens}" if lens else "") +
            (f" off={key_offset}" if key_offset else "") +
            ("" if tensor_cores else " cuda-cores"))
    return _report(name, errs, tol, track=None if key_offset else dtype)


def _dense_with_rows(q, k, v, shift, row_shift, row_sums, causal, scale, normalize, eps):
    """Centered CSQ in float64 from the definition, with a per-query row_shift added to every
    score of the row and row_sums added to the row's [num | den] before the division."""
    q, k, v = q.double(), k.double(), v.double()
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    N = q.shape[2]
    mask = torch.ones(N, N, dtype=torch.bool)
    mask = mask.tril() if causal else mask
    mu = (k.cumsum(2) / torch.arange(1, N + 1, dtype=torch.float64)[:, None] if causal
          else k.mean(2, keepdim=True).expand_as(k))
    b = shift.double()[None, :, None] - scale * (q * mu).sum(-1) + row_shift.double()
    w = torch.where(mask, (scale * q @ k.transpose(-1, -2) + b[..., None]) ** 2, 0.0)
    num = w @ v + row_sums[..., :-1].double()
    den = w.sum(-1) + row_sums[..., -1].double()
    return (num / (den + eps)[..., None] if normalize else num), den


def check_direct_row_inputs(lib):
    """The kernels' per-query row_shift and row_sums (a carried state's share, internal to the
    launchers): the forward against the definition; the backward, which reads them back
    through b and den, against the CPU op's on the same y, b, den."""
    ok = True
    ops = _cpu_op()
    cases = [  # dtype, Hq, Hk, N, Dk, Dv, causal, normalize, tensor_cores
        (torch.float64, 2, 1, 70, 6, 5, True, True, 1),
        (torch.float32, 4, 2, 130, 32, 20, True, True, 1),
        (torch.float32, 2, 2, 65, 9, 70, False, False, 1),
        (torch.bfloat16, 2, 1, 100, 32, 16, True, True, 1),
        (torch.float16, 2, 1, 67, 16, 8, True, False, 0),
    ]
    for i, (dtype, Hq, Hk, N, Dk, Dv, causal, normalize, tc) in enumerate(cases):
        g = torch.Generator().manual_seed(1500 + i)
        acc = acc_of(dtype)
        q, k, v = (torch.randn(1, h, N, d, generator=g, dtype=torch.float64).to(dtype)
                   for h, d in ((Hq, Dk), (Hk, Dk), (Hk, Dv)))
        shift = (torch.rand(Hq, generator=g, dtype=torch.float64) + 0.5).to(acc)
        row_shift = (0.3 * torch.randn(1, Hq, N, generator=g, dtype=torch.float64)).to(acc)
        row_sums = torch.randn(1, Hq, N, Dv + 1, generator=g, dtype=torch.float64)
        row_sums[..., -1] = row_sums[..., -1].abs() * 5  # a state's weights sum to > 0
        row_sums = row_sums.to(acc)
        opts = (causal, Dk ** -0.5, True, normalize, 1e-6)
        y, b, den = emu_direct_fwd(lib, q, k, v, shift, None, opts, tc, row_shift, row_sums)
        yref, dref = _dense_with_rows(q, k, v, shift, row_shift, row_sums, causal, opts[1],
                                      normalize, opts[4])
        errs = {"y": rel(y, yref), "den": rel(den, dref)}
        if ops is not None:
            dy = torch.randn(1, Hq, N, Dv, generator=g, dtype=torch.float64).to(acc)
            dq, dk, dv, dshift = emu_direct_bwd(lib, dy, q, k, v, shift, None, y, b, den, opts, tc)
            no_ref = torch.empty(0, dtype=acc)
            cq, ck, cv, cs, _, _ = ops.csq_direct_bwd(dy, q, k, v, shift, None, None, no_ref, y,
                                                      b, den, None, None, False, causal, opts[1],
                                                      True, normalize, opts[4], TILE)
            errs.update(dq_cpu=rel(dq.to(dtype), cq), dk_cpu=rel(dk.to(dtype), ck),
                        dv_cpu=rel(dv.to(dtype), cv), dshift_cpu=rel(dshift, cs))
        ok &= _report(f"row inputs {str(dtype)[6:]:8s} Hq{Hq} Hk{Hk} N{N} Dk{Dk} Dv{Dv} "
                      f"causal={int(causal)} norm={int(normalize)} tc={tc}", errs,
                      TOL[dtype], track=dtype)
    return ok


def check_direct_nonfinite(lib):
    """A NaN or Inf in v, q or k reaches exactly the outputs that see it (forward); a NaN in v
    stays out of the other batch entry's gradients and, causal, of dq of earlier rows."""
    ok = True
    s = 0
    # Emu.fwd's and Emu.bwd's arguments (nonfinite_reach), unpacked.
    fwd = lambda q, k, v, shift, *opts: emu_direct_fwd(lib, q, k, v, shift, None, opts)
    bwd = lambda dy, q, k, v, shift, y, b, den, *opts: emu_direct_bwd(lib, dy, q, k, v, shift,
                                                                       None, y, b, den, opts)
    for bad, n, j in ((float("nan"), 10, 6), (float("inf"), 70, 66), (float("nan"), 150, 70)):
        for causal in (True, False):
            for what in ("v", "q", "k"):
                g = torch.Generator().manual_seed(900 + s)
                s += 1
                good, grads = nonfinite_reach(fwd, bwd, g, n, j, bad, what, causal, True)
                if grads is not None and causal:  # dv of the keys before the NaN's position
                    good &= bool(torch.isfinite(grads[2][1, :, :j]).all())
                print(("ok   " if good else "FAIL ") + f"direct non-finite {bad} at {j} of N={n} "
                      f"in {what}, causal={int(causal)}", flush=True)
                ok &= good
    return ok


def check_direct_nonfinite_half(lib):
    """The tensor-core kernels (bfloat16 / float16): a NaN in v, q or k at a position of a
    diagonal tile reaches exactly the outputs that see it, and in the backward stays out of the
    other batch entry and (causal) of dq, dk, dv of the rows it does not reach: the masked
    scalar fallback of the diagonal tile ran where an mma would have spread 0 * NaN."""
    ok = True
    s = 0
    for dtype in (torch.float16, torch.bfloat16):
        for what in ("v", "q", "k"):
            n, j = 100, 70
            g = torch.Generator().manual_seed(950 + s)
            s += 1
            q = torch.randn(2, 2, n, 8, generator=g, dtype=torch.float64)
            k = torch.randn(2, 1, n, 8, generator=g, dtype=torch.float64)
            v = torch.randn(2, 1, n, 4, generator=g, dtype=torch.float64)
            mask = torch.zeros(2, 2, n, 4, dtype=torch.bool)
            if what == "v":
                v[1, 0, j, 2] = float("nan")
                mask[1, :, j:, 2] = True
            elif what == "q":
                q[1, 1, j, 1] = float("nan")
                mask[1, 1, j, :] = True
            else:
                k[1, 0, j, 0] = float("nan")
                mask[1, :, j:, :] = True
            q, k, v = (t.to(dtype) for t in (q, k, v))
            shift = torch.rand(2, generator=g, dtype=torch.float64).float() + 0.5
            opts = (True, 0.4, True, True, 1e-6)
            y, b, den = emu_direct_fwd(lib, q, k, v, shift, None, opts)
            nonfin = ~torch.isfinite(y)
            good = bool(nonfin[mask].all()) and not bool((nonfin & ~mask).any())
            dy = torch.randn(y.shape, generator=g, dtype=torch.float64).float()
            dq, dk, dv, _ = emu_direct_bwd(lib, dy, q, k, v, shift, None, y, b, den, opts)
            good &= all(bool(torch.isfinite(t[0]).all()) for t in (dq, dk, dv))
            if what in ("v", "k"):  # rows before j do not see position j
                good &= bool(torch.isfinite(dq[1, :, :j]).all())
            if what == "v":  # (dk of earlier keys is NaN through the key means: not checked)
                good &= bool(torch.isfinite(dv[1, :, :j]).all())
            if what == "q":  # keys after j are not seen by query j
                good &= bool(torch.isfinite(dk[1, :, j + 1:]).all()) and \
                    bool(torch.isfinite(dv[1, :, j + 1:]).all())
            print(("ok   " if good else "FAIL ") + f"direct non-finite nan at {j} of N={n} in "
                  f"{what}, {str(dtype)[6:]} tensor cores, causal=1", flush=True)
            ok &= good
    return ok


def check_direct_tensor_cores(lib):
    """bfloat16 / float16, the same inputs on the tensor-core and the CUDA-core kernels: both
    within the bar of the reference (check_direct), and their outputs differ in rounding
    (which shows the tensor-core kernels are the ones that ran)."""
    ok = True
    for i, dtype in enumerate((torch.float16, torch.bfloat16)):
        outs = []
        for tc in (1, 0):
            ok &= check_direct(lib, dtype, 1, 2, 1, 90, 24, 12, False, True, True, (C, C, C),
                               seed=1500 + i, tensor_cores=tc, cpu=False)
            g = torch.Generator().manual_seed(1500 + i)
            q = strided((1, 2, 90, 24), dtype, g, C)
            k = strided((1, 1, 90, 24), dtype, g, C)
            v = strided((1, 1, 90, 12), dtype, g, C)
            shift = (torch.rand(2, generator=g, dtype=torch.float64) + 0.5).float()
            opts = (False, 24 ** -0.5, True, True, 1e-6)
            outs.append(emu_direct_fwd(lib, q, k, v, shift, None, opts, tc)[0])
        differ = not torch.equal(outs[0], outs[1])
        print(("ok   " if differ else "FAIL ") + f"direct tensor cores {str(dtype)[6:]}: the "
              f"tensor-core and CUDA-core outputs differ by {rel(outs[0], outs[1]):.1e} "
              f"(rounding)", flush=True)
        ok &= differ
    return ok


CASES = [
    # dtype, B, Hq, Hk, N, Dk, Dv, causal, center, normalize, kinds
    (torch.float64, 2, 4, 2, 37, 8, 5, True, True, True, ("transposed", "padded", "every_other")),
    (torch.float32, 1, 2, 1, 130, 16, 8, True, True, True, (C, "transposed", C)),
    (torch.float16, 1, 2, 2, 97, 16, 24, False, True, True, ("padded", C, "transposed")),
    (torch.bfloat16, 2, 2, 1, 70, 32, 16, True, True, True, (C, C, C)),
    (torch.float64, 1, 2, 1, 70, 5, 3, True, False, True, (C, C, C)),
    (torch.float64, 1, 2, 1, 66, 6, 4, False, False, False, (C, C, C)),
    (torch.float32, 1, 3, 1, 129, 40, 33, True, True, False, ("transposed", C, C)),
    (torch.float32, 1, 1, 1, 1, 3, 2, True, True, True, (C, C, C)),
    (torch.float32, 3, 4, 2, 90, 12, 6, False, True, True, ("expanded",) * 3),
    (torch.float64, 1, 2, 2, 200, 9, 7, False, True, False, (C, C, C)),
    (torch.float16, 1, 4, 1, 65, 8, 8, True, False, False, (C, C, C)),
    (torch.bfloat16, 1, 2, 1, 128, 64, 64, False, False, True, (C, "padded", C)),
    (torch.float16, 2, 2, 2, 64, 20, 12, True, True, True, ("every_other", C, C)),
    (torch.bfloat16, 1, 3, 3, 33, 7, 9, False, True, False, (C, C, "transposed")),
]

BIG_CASES = [  # head sizes up to 256 (several column blocks of dq, dk, dv and y)
    (torch.float32, 1, 2, 1, 70, 256, 256, True, True, True, (C, C, C)),
    (torch.float64, 1, 1, 1, 67, 200, 130, False, True, True, (C, "padded", C)),
    (torch.bfloat16, 1, 2, 1, 65, 256, 96, True, True, True, (C, C, C)),
    (torch.float16, 1, 1, 1, 80, 96, 256, False, True, True, (C, C, C)),
]

PACKED_CASES = [
    # dtype, Hq, Hk, lens, Dk, Dv, causal, center, normalize
    (torch.float64, 4, 2, [1, 0, 70, 64, 5, 130], 5, 3, True, True, True),
    (torch.float32, 2, 1, [33, 0, 0, 100, 1], 6, 4, False, True, True),
    (torch.bfloat16, 2, 1, [40, 90], 8, 8, True, True, True),
    (torch.float16, 2, 2, [3, 65, 9], 4, 3, False, False, False),
]


def run(lib, quick):
    ok = True
    cases = CASES[:6] if quick else CASES
    for i, c in enumerate(cases):
        ok &= check_direct(lib, *c, seed=1000 + i)
    big = BIG_CASES[:1] if quick else BIG_CASES
    for i, c in enumerate(big):
        ok &= check_direct(lib, *c, seed=1100 + i)
    packed = PACKED_CASES[:2] if quick else PACKED_CASES
    for i, (dt, hq, hk, lens, dk, dv, causal, center, norm) in enumerate(packed):
        ok &= check_direct(lib, dt, 1, hq, hk, 0, dk, dv, causal, center, norm,
                           ("transposed", "padded", C), seed=1200 + i, lens=lens)
    # float32 keys sharing an offset 30x their spread: accurate through the tile reference.
    ok &= check_direct(lib, torch.float32, 1, 2, 1, 150, 8, 4, True, True, True, (C, C, C),
                       seed=1300, key_offset=30.0)
    if not quick:
        ok &= check_direct(lib, torch.bfloat16, 1, 2, 1, 100, 16, 8, False, True, True,
                           (C, C, C), seed=1301, key_offset=30.0)
    if not quick:
        ok &= check_direct_nonfinite(lib)
        for dtype in (torch.float16, torch.bfloat16):  # the CUDA-core kernels of half inputs
            ok &= check_direct(lib, dtype, 1, 2, 1, 77, 16, 8, True, True, True, (C, C, C),
                               seed=1400, tensor_cores=0)
    ok &= check_direct_nonfinite_half(lib)
    ok &= check_direct_tensor_cores(lib)
    ok &= check_direct_row_inputs(lib)
    print("direct: worst error against the reference per dtype: " +
          ", ".join(f"{str(k)[6:]} {v:.1e}" for k, v in MAX_ERR.items()), flush=True)
    return ok


if __name__ == "__main__":
    lib_ = ctypes.CDLL(sys.argv[1] if len(sys.argv) > 1 else "/tmp/csqemu/libcsqemu.so")
    good = run(lib_, "quick" in sys.argv)
    print("ALL OK" if good else "SOME FAILED")
    sys.exit(0 if good else 1)
