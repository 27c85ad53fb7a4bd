"""The state-pool ops' CUDA path (csq_pool.cuh and the forward / decode kernels reading slots
through StatePool), run by the CPU emulator, against the CPU backend's pool ops on identical
pools (tests/test_state_pool.py checks those against the float64 reference) and against the
float64 reference itself: a packed prefill whose sequences continue their slots' states or
start fresh (slots holding NaN), then decode steps over a different subset of the slots, some
fresh; the outputs and the whole pool after each call, including the slots not named and the
page padding between them (NaN, which must stay NaN). Pools are paged like vLLM's: each slot's
sums and ref in one page, pages one stride apart.

Used by check_emu.py (which prints "pool" on every line of this family); alone:
    python check_emu_pool.py LIB [quick]
"""
import ctypes
import sys

import torch

from emu_common import (TOL, acc_of, call, forward_outputs, nan_full, ptr, qkv_args, reference,
                        scalar_args)


def _rel(a, b):
    a, b = a.double(), b.double()
    return (a - b).norm().item() / max(b.norm().item(), 1e-30)


def paged_pool(P, Hk, Dk, Dv, acc):
    """(page buffer, sums view, ref view): P pages of [sums | ref | 3 padding], all NaN."""
    F = (Dk + 1) * (Dk + 2) // 2
    ns, nr = Hk * F * (Dv + 1), Hk * Dk
    buf = torch.full((P, ns + nr + 3), float("nan"), dtype=acc)
    return buf, buf[:, :ns].view(P, Hk, F, Dv + 1), buf[:, ns:ns + nr].view(P, Hk, Dk)


def _same_pool(a, b):
    """The relative difference of two page buffers where both are finite; inf if their NaNs
    differ (a slot the kernels should not have touched, or one they left unwritten)."""
    if not torch.equal(torch.isnan(a), torch.isnan(b)):
        return float("inf")
    keep = ~torch.isnan(a)
    return _rel(a[keep], b[keep])


def _set_pool(lib, slots, fresh, sums, ref):
    lib.emu_set_pool(ctypes.cast(slots.data_ptr(), ctypes.POINTER(ctypes.c_int64)),
                     None if fresh is None else ctypes.cast(fresh.data_ptr(),
                                                            ctypes.POINTER(ctypes.c_uint8)),
                     ctypes.c_int64(sums.stride(0)), ctypes.c_int64(ref.stride(0)))


def emu_pool_prefill(lib, q, k, v, shift, cu, slots, fresh, sums, ref, opts):
    scale, center, normalize, eps = opts
    y, b, den = forward_outputs(q, v)
    null = ctypes.c_void_p(None)
    lib.emu_set_seqs(ctypes.cast(cu.data_ptr(), ctypes.POINTER(ctypes.c_int64)), cu.numel() - 1)
    lib.emu_set_state(ptr(sums), ptr(ref), ptr(sums), ptr(ref), null, null, null)
    _set_pool(lib, slots, fresh, sums, ref)
    try:
        call(lib.emu_fwd, *qkv_args(q, k, v, shift),
             *scalar_args(scale, eps, True, center, normalize), ptr(y), ptr(b), ptr(den))
    finally:
        lib.emu_set_seqs(None, 0)
        lib.emu_set_state(null, null, null, null, null, null, null)
        lib.emu_set_pool(None, None, 0, 0)
    return y


def emu_pool_decode(lib, q, k, v, shift, slots, fresh, sums, ref, opts):
    scale, center, normalize, eps = opts
    y = nan_full(q.shape[:3] + v.shape[-1:], q.dtype)
    _set_pool(lib, slots, fresh, sums, ref)
    try:
        call(lib.emu_decode, *qkv_args(q, k, v, shift),
             *scalar_args(scale, eps, center, normalize), ptr(sums), ptr(ref), ptr(y))
    finally:
        lib.emu_set_pool(None, None, 0, 0)
    return y


def check_pool(lib, dtype, Hq, Hk, Dk, Dv, lens, fresh_mask, decode_steps, center, seed):
    """lens: the prefill's sequence lengths (S = len(lens), in slots 5, 2, 7, ... of a pool of
    P = S + 4); the first sequences continue prefixes of `prefix` tokens already in their slots
    (a CPU prefill), those with fresh_mask set start fresh from NaN slots. Then decode_steps
    steps over the named slots in another order plus one fresh slot (a one-token request)."""
    import csq_ext  # the CPU build: its pool ops are what the emulated kernels must match
    g = torch.Generator().manual_seed(seed)
    acc = acc_of(dtype)
    S, P, prefix = len(lens), len(lens) + 4, 9
    opts = (Dk ** -0.5, center, True, 1e-6)
    scale, _, normalize, eps = opts
    shift = (torch.rand(Hq, generator=g, dtype=torch.float64) + 0.5).to(acc)
    slots = torch.tensor([(5 + 3 * s) % P for s in range(S)], dtype=torch.int64)
    fresh = torch.tensor(fresh_mask, dtype=torch.uint8)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    buf_emu, sums_emu, ref_emu = paged_pool(P, Hk, Dk, Dv, acc)
    # The continued sequences' prefixes, in their slots (the CPU backend's state).
    q0, k0, v0 = rnd(S, Hq, prefix, Dk), rnd(S, Hk, prefix, Dk) + 0.5, rnd(S, Hk, prefix, Dv)
    _, st = csq_ext.attention(q0.to(dtype), k0.to(dtype), v0.to(dtype), shift=shift,
                              center=center, return_state=True, path="chunked")
    for s in range(S):
        if not fresh_mask[s]:
            sums_emu[slots[s]] = st.sums[s]
            ref_emu[slots[s]] = st.ref[s]
    cpu_buf, sums_cpu, ref_cpu = paged_pool(P, Hk, Dk, Dv, acc)
    cpu_buf.copy_(buf_emu)
    cpu_pool = csq_ext.CSQState(sums_cpu, ref_cpu)

    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int64)
    T = int(cu[-1])
    q = rnd(1, T, Hq, Dk).to(dtype).transpose(1, 2)  # views of (T, H, D) projections
    k = (rnd(1, T, Hk, Dk) + 0.5).to(dtype).transpose(1, 2)
    v = rnd(1, T, Hk, Dv).to(dtype).transpose(1, 2)
    has = torch.tensor([not f for f in fresh_mask])
    y_emu = emu_pool_prefill(lib, q, k, v, shift, cu, slots, fresh, sums_emu, ref_emu, opts)
    y_cpu = csq_ext.pool_prefill_(q, k, v, cu, cpu_pool, slots, has_initial_state=has,
                                  shift=shift, center=center)
    errs = {"y": _rel(y_emu, y_cpu.to(acc)), "pool": _same_pool(buf_emu, cpu_buf)}
    # Against the float64 reference: each sequence after its prefix (if continued).
    yr = []
    for s in range(S):
        a, e = int(cu[s]), int(cu[s + 1])
        parts = [(q[:, :, a:e], k[:, :, a:e], v[:, :, a:e])]
        if not fresh_mask[s]:
            parts.insert(0, (q0[s:s + 1].to(dtype), k0[s:s + 1].to(dtype), v0[s:s + 1].to(dtype)))
        qq, kk, vv = (torch.cat([p[i].double() for p in parts], 2) for i in range(3))
        ys = reference(qq, kk, vv, causal=True, scale=scale, shift=shift.double(),
                       center=center, normalize=normalize, eps=eps)
        yr.append(ys[:, :, ys.shape[2] - (e - a):])
    errs["y_ref"] = _rel(y_emu, torch.cat(yr, 2))

    # Decode: the named slots in reverse order, the last one fresh again (a finished request's
    # slot reused by a new one), plus a never-named slot, fresh.
    unused = [s for s in range(P) if s not in slots.tolist()]
    dslots = torch.cat([slots.flip(0), torch.tensor(unused[:1])])
    dfresh = torch.zeros(S + 1, dtype=torch.uint8)
    dfresh[S - 1] = dfresh[S] = 1
    dhas = dfresh == 0
    B = S + 1
    for t in range(decode_steps):
        qd = rnd(B, 1, Hq, Dk).to(dtype).transpose(1, 2)
        kd = (rnd(B, 1, Hk, Dk) + 0.5).to(dtype).transpose(1, 2)
        vd = rnd(B, 1, Hk, Dv).to(dtype).transpose(1, 2)
        fr = dfresh if t == 0 else None  # fresh at its first step only
        y_emu = emu_pool_decode(lib, qd, kd, vd, shift, dslots, fr, sums_emu, ref_emu, opts)
        y_cpu = csq_ext.pool_decode_(qd, kd, vd, cpu_pool, dslots,
                                     has_initial_state=dhas if t == 0 else None, shift=shift,
                                     center=center)
        errs[f"y{t}"] = _rel(y_emu, y_cpu)
    errs["pool_after_decode"] = _same_pool(buf_emu, cpu_buf)
    tol = TOL[dtype]
    bad = {n: e for n, e in errs.items() if not e <= tol}
    print(("FAIL " if bad else "ok   ") + f"pool {str(dtype)[6:]:8s} Hq{Hq} Hk{Hk} Dk{Dk} Dv{Dv} "
          f"lens={lens} fresh={fresh_mask} steps={decode_steps} center={int(center)}  "
          f"max err {max(errs.values()):.2e}" + (f"  {bad}" if bad else ""), flush=True)
    return not bad


CASES = [
    (torch.float64, 2, 1, 5, 3, [70, 0, 5, 1], [0, 1, 0, 1], 2, True),
    (torch.float32, 4, 2, 8, 6, [3, 66, 20], [1, 0, 0], 2, True),
    (torch.bfloat16, 2, 2, 16, 8, [40, 7], [0, 1], 1, True),
    (torch.float32, 2, 1, 4, 4, [5, 130], [0, 1], 1, False),
]


def run(lib, quick):
    ok = True
    for i, c in enumerate(CASES[:2] if quick else CASES):
        ok &= check_pool(lib, *c, seed=900 + i)
    return ok


if __name__ == "__main__":
    lib = ctypes.CDLL(sys.argv[1])
    ok = run(lib, "quick" in sys.argv)
    print("ALL OK" if ok else "SOME FAILED")
    sys.exit(0 if ok else 1)
