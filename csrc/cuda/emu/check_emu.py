"""Checks the CUDA kernels of csrc/cuda, run by the CPU emulator (build_emu.py), against the
float64 reference csq_ext/reference.py: y, b, den and all gradients, for the four dtypes, causal
or not, centered or not, normalized or not, strided inputs, odd N and head sizes spanning
several feature tiles and slabs. Emulator only: it says nothing about speed.

    python build_emu.py /tmp/csqemu && python check_emu.py /tmp/csqemu/libcsqemu.so [quick]

Heads above 128, up to the limit of 256, run too (WIDE_CASES: the first ones in quick mode,
all of them in the full check; `wide` runs only those). The direct path's kernels run too
(check_emu_direct.py; `direct` runs only those), the state pool's (check_emu_pool.py; `pool`
runs only those), and the input classes of the spec's accuracy table with the backward's
causality (check_emu_classes.py; `classes` runs only those).
"""
import contextlib
import ctypes
import sys

import torch

from emu_cases import (DECODE_CASES, STATE_CASES, STATE_OP_CASES, VARLEN_CASES, WIDE_CASES,
                       WIDE_QUICK)
from emu_common import (C, DT, HERE, TOL, Emu, acc_of, arr, call, cu_seqlens, forward_outputs,
                        gradient_outputs, nan_full, opt_ptr, packed_batch, ptr, qkv_args,
                        reference, rel, report, scalar_args, shift_grad, strided)
from emu_inputs import nonfinite_reach

lib = ctypes.CDLL(sys.argv[1] if len(sys.argv) > 1 else "/tmp/csqemu/libcsqemu.so")
EMU = Emu(lib)
emu_fwd, emu_bwd, emu_decode = EMU.fwd, EMU.bwd, EMU.decode
QUICK = "quick" in sys.argv


# Shared memory a block may opt into (bytes) on the devices the emulator can pose as: the state
# scans stage fewer rows per step where less is available (csrc/cuda/csq_state.cuh,
# state_rows). The emulator poses as an H100 unless a check says otherwise.
DEVICES = {"H100": 227 * 1024, "A100": 163 * 1024, "sm86": 99 * 1024}


@contextlib.contextmanager
def device(name_or_bytes):
    """The calls inside run on an emulated device with that much opt-in shared memory."""
    lib.emu_set_smem_optin(DEVICES.get(name_or_bytes, name_or_bytes))
    try:
        yield
    finally:
        lib.emu_set_smem_optin(DEVICES["H100"])


LAST_ERRS = {}  # the errors of the last check_case


def check_tensor_cores():
    """The half-precision state products on tensor cores (csq_mma.cuh): with the 3xTF32 split
    (the default) as accurate as on the CUDA cores, plain TF32 less so (which also shows that
    the tensor-core path is the one that ran), all within the half-precision bar."""
    ok = True
    for causal in (True, False):
        errs = {}
        for passes in (0, 1, 3):
            lib.emu_set_tensor_cores(passes)
            try:
                ok &= check_case(torch.float16, 1, 2, 1, 97, 16, 8, causal, True, True,
                                 (C, C, C), seed=77)
            finally:
                lib.emu_set_tensor_cores(3)
            errs[passes] = max(LAST_ERRS.values())
        good = errs[3] <= 2 * errs[0] + 1e-6 and errs[1] > 2 * errs[3]
        print(("ok   " if good else "FAIL ") + f"tensor cores causal={int(causal)}: max error "
              f"CUDA cores {errs[0]:.2e}, TF32 {errs[1]:.2e}, 3xTF32 {errs[3]:.2e}", flush=True)
        ok &= good
    return ok


def check_case(dtype, B, Hq, Hk, N, Dk, Dv, causal, center, normalize, kinds, seed,
               key_offset=0.0, grads=True, label=""):
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
    # r: the lower median of the first min(N, 64) keys (csq_params.h), centered or not
    r = (kr[:, :, : min(N, 64)].median(2, keepdim=True).values if N > 0
         else torch.zeros_like(kr[:, :, :1]))
    if center:
        mu = (kr.cumsum(2) if causal else kr.sum(2, keepdim=True).expand_as(kr)) / n[:, None]
    else:
        mu = torch.zeros_like(kr)
    b_ref = s64.detach()[None, :, None] - scale * (q64.detach() * (mu - r)).sum(-1)
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
    LAST_ERRS.clear()
    LAST_ERRS.update(errs)
    name = (f"{label}{str(dtype)[6:]:8s} B{B} Hq{Hq} Hk{Hk} N{N:<4d} Dk{Dk:<3d} Dv{Dv:<3d} "
            f"causal={int(causal)} center={int(center)} norm={int(normalize)} "
            f"{'/'.join(kk[:5] for kk in kinds)} off={key_offset}")
    return report(name, errs, tol)


def check_decode(dtype, B, Hq, Hk, Dk, Dv, center, normalize, prefill, steps, kinds, seed,
                 key_offset=0.0, label=""):
    """Decode steps of the CUDA kernels against the CPU backend's csq_decode_ (same state, same
    tokens): the output of every step and the state (sums, ref) after the last one. The state
    comes from a CPU prefill of `prefill` tokens (0: CSQState.empty, whose first step picks the
    ref)."""
    import csq_ext  # the CPU build: the behavioural reference for the state layout
    g = torch.Generator().manual_seed(seed)
    acc = acc_of(dtype)
    shift = (torch.rand(Hq, generator=g, dtype=torch.float64) + 0.5).to(acc)
    scale, eps = Dk ** -0.5, 1e-6
    if prefill:
        q0 = strided((B, Hq, prefill, Dk), dtype, g, "contiguous")
        k0 = strided((B, Hk, prefill, Dk), dtype, g, "contiguous", key_offset)
        v0 = strided((B, Hk, prefill, Dv), dtype, g, "contiguous")
        _, st = csq_ext.attention(q0, k0, v0, shift=shift, center=center, normalize=normalize,
                                  return_state=True)
    else:
        st = csq_ext.CSQState.empty(B, Hk, Dk, Dv, dtype=acc)
    sums_cpu, sums_emu = st.sums.clone(), st.sums.clone()
    ref_cpu, ref_emu = st.ref.clone(), st.ref.clone()  # written by a step from an empty state
    errs = {}
    for t in range(steps):
        q = strided((B, Hq, 1, Dk), dtype, g, kinds[0])
        k = strided((B, Hk, 1, Dk), dtype, g, kinds[1], key_offset)
        v = strided((B, Hk, 1, Dv), dtype, g, kinds[2])
        y_cpu = torch.empty(B, Hq, 1, Dv, dtype=dtype)
        torch.ops.csq_ext.csq_decode_(sums_cpu, ref_cpu, q, k, v, shift, y_cpu, scale, center,
                                      normalize, eps)
        y = emu_decode(q, k, v, shift, sums_emu, ref_emu, scale, center, normalize, eps)
        errs[f"y{t}"] = rel(y, y_cpu)
    errs["sums"] = rel(sums_emu, sums_cpu)
    errs["ref"] = rel(ref_emu, ref_cpu)
    tol = TOL[dtype] * (10 if key_offset else 1)
    name = (f"{label}decode {str(dtype)[6:]:8s} B{B} Hq{Hq} Hk{Hk} Dk{Dk:<3d} Dv{Dv:<3d} "
            f"center={int(center)} norm={int(normalize)} prefill={prefill} steps={steps} "
            f"{'/'.join(kk[:5] for kk in kinds)} off={key_offset}")
    return report(name, errs, tol)


def check_varlen(dtype, Hq, Hk, lens, Dk, Dv, causal, center, normalize, seed, grads=True):
    """A packed batch (cu_seqlens) against one emulator call per sequence (each checked against
    the reference by check_case) and against the float64 reference: y, b, den, and dq, dk, dv,
    dshift."""
    g = torch.Generator().manual_seed(seed)
    cu = cu_seqlens(lens)
    T = int(cu[-1])
    q = strided((1, Hq, T, Dk), dtype, g, "transposed")
    k = strided((1, Hk, T, Dk), dtype, g, "padded", 0.5)
    v = strided((1, Hk, T, Dv), dtype, g, "contiguous")
    shift = (torch.rand(Hq, generator=g, dtype=torch.float64) + 0.5).to(acc_of(dtype))
    scale, eps = Dk ** -0.5, 1e-6
    dy = torch.randn(1, Hq, T, Dv, generator=g, dtype=torch.float64).to(acc_of(dtype))
    opts = (causal, scale, center, normalize, eps)
    lib.emu_set_seqs(ctypes.cast(cu.data_ptr(), ctypes.POINTER(ctypes.c_int64)), len(lens))
    try:
        y, b, den = emu_fwd(q, k, v, shift, *opts)
        if grads:
            dq, dk, dv, dshift = emu_bwd(dy, q, k, v, shift, y, b, den, *opts)
    finally:
        lib.emu_set_seqs(None, 0)
    parts = {n: [] for n in ("y", "b", "den", "dq", "dk", "dv")}
    dshift_sum = torch.zeros_like(shift)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    s64 = shift.double().requires_grad_()
    loss = 0
    yref = []
    for a, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        sl = (slice(None), slice(None), slice(a, e))
        if e > a:
            ys, bs, ds = emu_fwd(q[sl], k[sl], v[sl], shift, *opts)
            parts["y"].append(ys), parts["b"].append(bs), parts["den"].append(ds)
            yr = reference(q64[sl], k64[sl], v64[sl], causal=causal, scale=scale, shift=s64,
                           center=center, normalize=normalize, eps=eps)
            yref.append(yr)
            loss = loss + (yr * dy[sl].double()).sum()
            if grads:
                gq, gk, gv, gs = emu_bwd(dy[sl], q[sl], k[sl], v[sl], shift, ys, bs, ds, *opts)
                parts["dq"].append(gq), parts["dk"].append(gk), parts["dv"].append(gv)
                dshift_sum += gs
    got = dict(y=y, b=b, den=den)
    if grads:
        got.update(dq=dq, dk=dk, dv=dv)
    errs = {n: rel(got[n], torch.cat(parts[n], 2)) for n in ("y", "b", "den")}
    tol = TOL[dtype]
    errs["y_ref"] = rel(y, torch.cat(yref, 2))
    if grads:
        loss.backward()
        errs.update({n: rel(got[n], torch.cat(parts[n], 2)) for n in ("dq", "dk", "dv")})
        errs["dshift"] = rel(dshift, dshift_sum)
        errs.update(dq_ref=rel(dq, q64.grad), dk_ref=rel(dk, k64.grad), dv_ref=rel(dv, v64.grad),
                    dshift_ref=rel(dshift, s64.grad))
    name = (f"varlen {str(dtype)[6:]:8s} Hq{Hq} Hk{Hk} lens={lens} Dk{Dk} Dv{Dv} "
            f"causal={int(causal)} center={int(center)} norm={int(normalize)}")
    return report(name, errs, tol)


def check_state(dtype, Hq, Hk, lens, prefill, Dk, Dv, center, normalize, seed, carried=True,
                grads=True, label=""):
    """Carried state: a causal call continuing from a state (initial_state), returning its state
    (return_state) and taking the gradient of that state (dstate_out), against the CPU backend's
    op on the same inputs (the reference for the state layout; tests/ check it against the
    float64 reference with gradcheck): y, b, den, state_out, ref_out, dq, dk, dv, dshift,
    dstate_in, dref. lens is an int N (B = 2 batch entries of length N) or a list of segment
    lengths (cu_seqlens, B = 1). The state comes from a CPU prefill of `prefill` tokens per sequence with centering (so that
    its ref is not 0 even when this call does not centre); carried=False: no initial state."""
    import csq_ext  # noqa: F401  (loads the CPU operators)
    g = torch.Generator().manual_seed(seed)
    acc = acc_of(dtype)
    B, S, T, cu = packed_batch(lens)
    q = strided((B, Hq, T, Dk), dtype, g, "transposed")
    k = strided((B, Hk, T, Dk), dtype, g, "padded", 0.5)
    v = strided((B, Hk, T, Dv), dtype, g, "contiguous")
    shift = (torch.rand(Hq, generator=g, dtype=torch.float64) + 0.5).to(acc)
    scale, eps = Dk ** -0.5, 1e-6
    state_in = ref_in = None
    if carried and prefill == 0:  # a state that holds no key: the call picks its own ref
        F0 = (Dk + 1) * (Dk + 2) // 2
        state_in = torch.zeros(S, Hk, F0, Dv + 1, dtype=acc)
        ref_in = torch.randn(S, Hk, Dk, generator=g, dtype=torch.float64).to(acc)
    elif carried:
        q0 = strided((S, Hq, prefill, Dk), dtype, g, "contiguous")
        k0 = strided((S, Hk, prefill, Dk), dtype, g, "contiguous", 0.5)
        v0 = strided((S, Hk, prefill, Dv), dtype, g, "contiguous")
        out0 = torch.ops.csq_ext.csq_chunked_fwd(q0, k0, v0, shift, None, None, None, True, scale, True,
                                         normalize, eps, 0, True)
        state_in, ref_in = out0[3].contiguous(), out0[4].contiguous()
    cpu = torch.ops.csq_ext.csq_chunked_fwd(q, k, v, shift, cu, state_in, ref_in, True, scale, center,
                                    normalize, eps, 0, True)
    F = csq_ext.state.num_features(Dk)
    y, b, den = forward_outputs(q, v)
    state_out = nan_full((S, Hk, F, Dv + 1), acc)
    ref_out = nan_full((S, Hk, Dk), acc)
    null = ctypes.c_void_p(None)
    if cu is not None:
        lib.emu_set_seqs(ctypes.cast(cu.data_ptr(), ctypes.POINTER(ctypes.c_int64)), S)
    try:
        lib.emu_set_state(opt_ptr(state_in), opt_ptr(ref_in), ptr(state_out), ptr(ref_out), null,
                          null, null)
        call(lib.emu_fwd, *qkv_args(q, k, v, shift),
             *scalar_args(scale, eps, True, center, normalize), ptr(y), ptr(b), ptr(den))
        errs = {"y": rel(y, cpu[0]), "b": rel(b, cpu[1]), "den": rel(den, cpu[2]),
                "state_out": rel(state_out, cpu[3]), "ref_out": rel(ref_out, cpu[4])}
        if grads:
            dy = torch.randn(B, Hq, T, Dv, generator=g, dtype=torch.float64).to(acc)
            dstate_out = torch.randn(S, Hk, F, Dv + 1, generator=g, dtype=torch.float64).to(acc)
            dref_out = torch.randn(S, Hk, Dk, generator=g, dtype=torch.float64).to(acc)
            gc = torch.ops.csq_ext.csq_chunked_bwd(dy, q, k, v, shift, cu, state_in, cpu[4],
                                                   cpu[0], cpu[1], cpu[2], dstate_out, dref_out,
                                                   carried, True, scale, center, normalize, eps,
                                                   0)
            dq, dk, dv, db = gradient_outputs(q, k, v)
            dstate_in = nan_full((S, Hk, F, Dv + 1), acc)
            dref = nan_full((S, Hk, Dk), acc)
            lib.emu_set_state(opt_ptr(state_in), ptr(ref_out), null, null, ptr(dstate_out),
                              opt_ptr(dstate_in if carried else None), ptr(dref))
            lib.emu_set_ref_grad(ptr(dref_out), int(carried))
            call(lib.emu_bwd, *qkv_args(q, k, v, shift),
                 *scalar_args(scale, eps, True, center, normalize), ptr(dy), arr(dy.stride()),
                 ptr(y), ptr(b), ptr(den), ptr(dq), ptr(dk), ptr(dv), ptr(db))
            errs.update(dq=rel(dq, gc[0]), dk=rel(dk, gc[1]), dv=rel(dv, gc[2]),
                        dshift=rel(shift_grad(db), gc[3]))
            errs.update(dref=rel(dref, gc[5]))
            if carried:
                errs.update(dstate_in=rel(dstate_in, gc[4]))
    finally:
        lib.emu_set_seqs(None, 0)
        lib.emu_set_state(null, null, null, null, null, null, null)
    tol = TOL[dtype]
    name = (f"{label}state  {str(dtype)[6:]:8s} Hq{Hq} Hk{Hk} lens={lens} prefill={prefill} Dk{Dk} "
            f"Dv{Dv} center={int(center)} norm={int(normalize)} carried={int(carried)}")
    return report(name, errs, tol)


def check_state_op(dtype, Hk, lens, prefill, Dk, Dv, seed):
    """The state-only op (csq_state / csq_state_bwd; csq_state_launch.cu) against the CPU
    backend's: state_out, ref_out, then dk, dv, dstate_in and dref from random gradients of
    the returned state and ref (a picked ref's gradient reaches its keys). prefill 0: an empty
    carried state (count 0: the op picks its ref); None: no carried state."""
    import csq_ext  # noqa: F401  (loads the CPU operators)
    ops = torch.ops.csq_ext
    g = torch.Generator().manual_seed(seed)
    acc = acc_of(dtype)
    B, S, T, cu = packed_batch(lens)
    k = strided((B, Hk, T, Dk), dtype, g, "padded", 3.0)
    v = strided((B, Hk, T, Dv), dtype, g, "transposed")
    F = (Dk + 1) * (Dk + 2) // 2
    state_in = ref_in = None
    if prefill == 0:
        state_in = torch.zeros(S, Hk, F, Dv + 1, dtype=acc)
        ref_in = torch.randn(S, Hk, Dk, generator=g, dtype=torch.float64).to(acc)
    elif prefill is not None:
        state_in, ref_in = ops.csq_state(strided((S, Hk, prefill, Dk), dtype, g, C, 3.0),
                                         strided((S, Hk, prefill, Dv), dtype, g, C), None, None,
                                         None, 0)
    cpu = ops.csq_state(k, v, cu, state_in, ref_in, 0)
    null = ctypes.c_void_p(None)
    sums, ref = nan_full((S, Hk, F, Dv + 1), acc), nan_full((S, Hk, Dk), acc)
    dk, dv = nan_full(k.shape, acc), nan_full(v.shape, acc)
    dstate_in = None if state_in is None else nan_full(state_in.shape, acc)
    dref = nan_full((S, Hk, Dk), acc)
    dsums = torch.randn(S, Hk, F, Dv + 1, generator=g, dtype=torch.float64).to(acc)
    dref_out = torch.randn(S, Hk, Dk, generator=g, dtype=torch.float64).to(acc)
    sz = arr([B, Hk, Hk, T, Dk, Dv])
    if cu is not None:
        lib.emu_set_seqs(ctypes.cast(cu.data_ptr(), ctypes.POINTER(ctypes.c_int64)), S)
    try:
        lib.emu_set_state(opt_ptr(state_in), opt_ptr(ref_in), null, null, null, null, null)
        call(lib.emu_state, DT[dtype], sz, ptr(k), arr(k.stride()), ptr(v), arr(v.stride()),
             ptr(sums), ptr(ref))
        lib.emu_set_state(opt_ptr(state_in), ptr(ref), null, null, ptr(dsums),
                          opt_ptr(dstate_in), ptr(dref))
        lib.emu_set_ref_grad(ptr(dref_out), int(state_in is not None))
        call(lib.emu_state_bwd, DT[dtype], sz, ptr(k), arr(k.stride()), ptr(v), arr(v.stride()),
             ptr(dk), ptr(dv))
    finally:
        lib.emu_set_seqs(None, 0)
        lib.emu_set_state(null, null, null, null, null, null, null)
    gc = ops.csq_state_bwd(k, v, cu, state_in, cpu[1], dsums, dref_out, state_in is not None, 0)
    errs = {"sums": rel(sums, cpu[0]), "ref": rel(ref, cpu[1]), "dk": rel(dk, gc[0]),
            "dv": rel(dv, gc[1]), "dref": rel(dref, gc[3])}
    if state_in is not None:
        errs["dstate_in"] = rel(dstate_in, gc[2])
    name = (f"state op {str(dtype)[6:]:8s} Hk{Hk} lens={lens} prefill={prefill} Dk{Dk} Dv{Dv}")
    return report(name, errs, TOL[dtype])


def check_outliers():
    """Outlier and sink keys (docs/SPEC.md, section 6), float32 forward: a key of 1e4, 1e6 or
    1e20 at position 50 leaves the rows before it unchanged up to rounding (the reference key is
    the median of the first 64 keys); a first key 1000x the typical norm stays within 2e-4."""
    ok = True
    g = torch.Generator().manual_seed(77)
    B, Hq, Hk, N, D = 1, 2, 1, 150, 8
    q, k, v = (torch.randn(B, h, N, D, generator=g) for h in (Hq, Hk, Hk))
    shift = torch.ones(Hq)
    scale = D ** -0.5
    y, _, _ = emu_fwd(q, k, v, shift, True, scale, True, True, 1e-6)
    for magnitude in (1e4, 1e6, 1e20):
        k_out = k.clone()
        k_out[:, :, 50] = magnitude * torch.sign(torch.randn(D, generator=g))
        y_out, _, _ = emu_fwd(q, k_out, v, shift, True, scale, True, True, 1e-6)
        err = (y_out[:, :, :50] - y[:, :, :50]).norm().item() / y[:, :, :50].norm().item()
        ok &= report(f"float32  outlier key {magnitude:.0e} at 50: rows before unchanged",
                     {"y": err}, 1e-6)
    k_sink = k.clone()
    k_sink[:, :, 0] *= 1000
    y_sink, _, _ = emu_fwd(q, k_sink, v, shift, True, scale, True, True, 1e-6)
    want = reference(q.double(), k_sink.double(), v.double(), causal=True, scale=scale,
                     shift=shift.double(), center=True, normalize=True, eps=1e-6)
    err = (y_sink.double() - want).norm().item() / want.norm().item()
    ok &= report("float32  sink key 1000x at 0", {"y": err}, 2e-4)
    return ok


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
                good, grads = nonfinite_reach(emu_fwd, emu_bwd, g, n, j, bad, what, causal,
                                              center)
                if grads is not None:  # dq from j on, of the query heads that read the NaN
                    good &= not bool(torch.isfinite(grads[0][1, 0:2, j:]).any())
                print(("ok   " if good else "FAIL ") + f"non-finite {bad} at {j} of N={n} in {what}, "
                      f"causal={int(causal)} center={int(center)}", flush=True)
                ok &= good
    return ok


def check_wide(quick):
    """WIDE_CASES (the first WIDE_QUICK when quick); heads of 257 refused with a message that
    names the limit, and float64 heads of 256 on a device whose shared memory cannot hold the
    state scan's tile even with 8 rows (sm_86: 99 KB). Its lines start with "wide"."""
    ok = True
    checks = {"case": check_case, "state": check_state, "decode": check_decode}
    for i, (dev, kind, args) in enumerate(WIDE_CASES[:WIDE_QUICK] if quick else WIDE_CASES):
        with device(dev):
            ok &= checks[kind](*args, seed=700 + i, label=f"wide {dev} ")
    g = torch.Generator().manual_seed(799)
    limit = "Dk <= 256 and 1 <= Dv <= 256"
    refusals = [("H100", torch.float32, 257, 8, limit), ("H100", torch.float32, 8, 257, limit),
                ("sm86", torch.float64, 256, 256, "more shared memory")]
    for dev, dtype, dk, dv, why in refusals:
        q, k = (torch.randn(1, 1, 3, dk, generator=g, dtype=dtype) for _ in range(2))
        v = torch.randn(1, 1, 3, dv, generator=g, dtype=dtype)
        with device(dev):
            rc, msg = emu_fwd(q, k, v, torch.ones(1), True, 0.5, True, True, 1e-6, refusal=True)
        good = rc != 0 and why in msg
        print(("ok   " if good else "FAIL ") + f"wide {dev} {str(dtype)[6:]} Dk={dk} Dv={dv} "
              f"refused: {msg!r}", flush=True)
        ok &= good
    return ok


def run_classes(quick):
    """Offsets, drifts, outliers and the backward's causality on both kernel families
    (check_emu_classes.py: its lines start with "classes")."""
    sys.path.insert(0, HERE)
    import check_emu_classes
    return check_emu_classes.run(lib, emu_fwd, emu_bwd, quick)


def run_direct(quick):
    """The direct path's kernels (check_emu_direct.py: its lines start with "direct")."""
    sys.path.insert(0, HERE)
    import check_emu_direct
    return check_emu_direct.run(lib, quick)


def run_maps():
    """The tests' second feature map through the kernels (check_emu_maps.py: "map linear")."""
    sys.path.insert(0, HERE)
    import check_emu_maps
    return check_emu_maps.run(lib)


def run_pool(quick):
    """The state-pool ops' kernels (check_emu_pool.py: its lines start with "pool")."""
    sys.path.insert(0, HERE)
    import check_emu_pool
    return check_emu_pool.run(lib, quick)


def main():
    cases = []
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
    if "big" in sys.argv:  # the largest supported heads: 519 (float32) / 1037 (float64) tiles
        cases = [(torch.float32, 1, 2, 1, 70, 256, 256, True, True, True, (C, C, C)),
                 (torch.float64, 1, 1, 1, 67, 256, 256, False, True, True, (C, C, C)),
                 (torch.bfloat16, 1, 1, 1, 65, 256, 96, True, True, True, (C, C, C))]
    decode_cases = DECODE_CASES
    if "big" in sys.argv:
        decode_cases = [(torch.float32, 1, 2, 1, 256, 256, True, True, 10, 2, (C, C, C)),
                        (torch.float64, 1, 1, 1, 256, 200, True, True, 10, 1, (C, C, C))]
    if QUICK:
        cases = cases[:6]
        decode_cases = decode_cases[:3]
    varlen_cases = VARLEN_CASES[:2] if QUICK else VARLEN_CASES
    if "decode" in sys.argv or "varlen" in sys.argv:  # only the decode step / packed batches
        cases = []
    if "decode" in sys.argv:
        varlen_cases = []
    if "varlen" in sys.argv:
        decode_cases = []
    # One family only: the second feature map (check_emu_maps.py), the direct path's kernels
    # (check_emu_direct.py), the state pool (check_emu_pool.py), the input classes
    # (check_emu_classes.py), the tensor-core comparison, the heads above 128 (all of WIDE_CASES).
    alone = {"maps": run_maps, "direct": lambda: run_direct(QUICK), "pool": lambda: run_pool(QUICK),
             "classes": lambda: run_classes(QUICK), "tc": check_tensor_cores,
             "wide": lambda: check_wide(False)}
    for name, run in alone.items():
        if name in sys.argv:
            ok = run()
            print("ALL OK" if ok else "SOME FAILED")
            sys.exit(0 if ok else 1)
    state_cases = [] if "decode" in sys.argv or "varlen" in sys.argv else STATE_CASES
    if QUICK:
        state_cases = state_cases[:2]
    if "state" in sys.argv:  # only the carried-state cases
        cases, varlen_cases, decode_cases = [], [], []
    ok = True
    for i, c in enumerate(state_cases):
        ok &= check_state(*c, seed=600 + i)
    if state_cases:  # the state-only op: fresh, carried, empty carried (picked ref), packed
        for i, c in enumerate(STATE_OP_CASES[:2] if QUICK else STATE_OP_CASES):
            ok &= check_state_op(*c, seed=680 + i)
    if state_cases:  # no initial state, but return_state and its gradient
        ok &= check_state(torch.float64, 2, 1, 70, 0, 4, 3, True, True, seed=650, carried=False)
        ok &= check_state(torch.float32, 2, 2, [5, 64, 0, 30], 0, 6, 5, True, True, seed=651,
                          carried=False)
        ok &= check_state(torch.float64, 2, 1, 70, 0, 4, 3, False, True, seed=652, carried=False)
    if "state" in sys.argv:
        print("ALL OK" if ok else "SOME FAILED")
        sys.exit(0 if ok else 1)
    for i, c in enumerate(varlen_cases):
        ok &= check_varlen(*c, seed=400 + i)
    for i, c in enumerate(decode_cases):
        ok &= check_decode(*c, seed=200 + i)
    if decode_cases:
        ok &= check_decode(torch.float32, 1, 2, 1, 8, 4, True, True, 50, 2, (C, C, C),
                           seed=299, key_offset=30.0)
    if "decode" in sys.argv or "varlen" in sys.argv:
        print("ALL OK" if ok else "SOME FAILED")
        sys.exit(0 if ok else 1)
    for i, c in enumerate(cases):
        ok &= check_case(*c, seed=i)
    ok &= check_nonfinite()
    ok &= check_tensor_cores()
    # Keys sharing a large offset: float32 must stay accurate through the reference key.
    ok &= check_case(torch.float32, 1, 2, 1, 150, 8, 4, True, True, True, (C, C, C), seed=99,
                     key_offset=30.0)
    ok &= check_outliers()
    if "big" not in sys.argv:
        ok &= check_wide(QUICK)
        ok &= run_direct(QUICK)
        ok &= run_maps()
        ok &= run_pool(QUICK)
        ok &= run_classes(QUICK)
    print("ALL OK" if ok else "SOME FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
