"""What only a GPU can show: CUDA against the CPU backend on the same inputs (outputs, every
gradient, carried states, decode steps), bfloat16 / float16 at N = 65536, the current stream,
memory, and the tensor-core choices. Every other check runs on CUDA too, from
tests/test_devices.py and the other device-parametrized files. Skipped without a GPU."""
import pytest
import torch

import csq_ext
from conftest import (HALF_DTYPES, SHAPES, TOL, assert_rel_close, csq, csq_grads, make_qkv,
                      poisoned_memory, prefill_state, rand_shift, randn, reference,
                      reference_blocked, reference_grads, rel_err, shift_dtype)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEV = "cuda"
FLOAT_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
CAUSAL = pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@CAUSAL
def test_half_long_sequence(gen, causal, dtype):
    """bf16 / fp16 at N = 65536 (the spec's upper length) against a row-blocked float64
    reference on the GPU."""
    n = 65536
    q, k, v = make_qkv(gen, (1, 1, 1, n, 32, 32), dtype, device=DEV)
    y = csq(q, k, v, causal=causal)
    assert_rel_close(y, reference_blocked(q, k, v, causal=causal, block=2048), TOL[dtype])


# --------------------------------------------------------------------------------------------
# CUDA against CPU, properties
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@CAUSAL
def test_matches_cpu(gen, causal, dtype):
    """The same inputs on both devices: outputs and gradients agree to twice the dtype's
    tolerance (each is within one tolerance of the reference)."""
    shape = (2, 4, 2, 150, 16, 8)
    q, k, v = make_qkv(gen, shape, dtype)
    shift = rand_shift(gen, 4, shift_dtype(dtype))
    dy = randn(gen, 2, 4, 150, 8, dtype=dtype)
    kw = dict(causal=causal)
    y_cpu, g_cpu = csq_grads(q, k, v, shift, dy, **kw)
    y_gpu, g_gpu = csq_grads(*(t.to(DEV) for t in (q, k, v, shift, dy)), **kw)
    names = ["q", "k", "v"] + (["shift"] if dtype in (torch.float64, torch.float32) else [])
    assert_rel_close(y_gpu, y_cpu, 2 * TOL[dtype], "y")
    for name in names:
        assert_rel_close(g_gpu[name], g_cpu[name], 2 * TOL[dtype], f"d{name}")


def test_rejects_mixed_devices(gen):
    q, k, v = make_qkv(gen, SHAPES["gqa"], torch.float32)
    with pytest.raises((ValueError, RuntimeError), match="device"):
        csq_ext.attention(q.to(DEV), k, v.to(DEV))
    with pytest.raises((ValueError, RuntimeError), match="shift"):
        csq_ext.attention(q.to(DEV), k.to(DEV), v.to(DEV), shift=torch.ones(4))


def test_no_quadratic_memory(gen):
    """N = 32768, Dk = Dv = 16, float32, forward + backward: the peak allocation grows by far
    less than an N x N float32 matrix (4 GiB)."""
    n = 32768
    q, k, v = (randn(gen, 1, 1, n, 16, dtype=torch.float32, device=DEV, requires_grad=True)
               for _ in range(3))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    for causal in (True, False):
        y = csq_ext.attention(q, k, v, causal=causal)
        grads = torch.autograd.grad(y, (q, k, v), torch.ones_like(y))
        assert all(torch.isfinite(g).all() for g in grads)
        del y, grads
    torch.cuda.synchronize()
    growth = torch.cuda.max_memory_allocated() - base
    assert growth < 256 * 2 ** 20, f"peak CUDA memory grew by {growth / 2 ** 20:.0f} MiB"


def test_current_stream_and_device(gen):
    """Runs on the current stream: results produced on a side stream are correct when read on
    that stream."""
    q, k, v = make_qkv(gen, (2, 4, 2, 200, 16, 8), torch.float32, device=DEV)
    expected = reference(q, k, v)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y = csq_ext.attention(q, k, v)
        y_host = y.to("cpu", non_blocking=False)
    stream.synchronize()
    assert rel_err(y_host, expected) <= TOL[torch.float32]


# --------------------------------------------------------------------------------------------
# Streaming: the in-place decode step (csq_decode_ on CUDA)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("center,normalize", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("dk,dv,hq,hk", [(8, 6, 4, 2), (16, 40, 6, 1), (64, 64, 8, 8)])
def test_decode_in_place_matches_cpu(gen, dk, dv, hq, hk, center, normalize, dtype):
    """Steps of decode_ on CUDA equal the CPU kernel's steps (outputs and the state), from a
    prefilled state; group sizes above and below the kernel's 4 heads per pass."""
    B = 3
    shift = rand_shift(gen, hq, shift_dtype(dtype))
    kw = dict(shift=shift, center=center, normalize=normalize)
    _, st = prefill_state(gen, B, hq, hk, 37, dk, dv, dtype, shift, key_offset=1.5,
                               center=center, normalize=normalize)
    st_cpu, st_gpu = st.clone(), st.to(DEV)
    tol = TOL[dtype]
    for _ in range(5):
        q = randn(gen, B, hq, 1, dk, dtype=dtype)
        k = (randn(gen, B, hk, 1, dk) + 1.5).to(dtype)
        v = randn(gen, B, hk, 1, dv, dtype=dtype)
        y_cpu = csq_ext.decode_(q, k, v, st_cpu, **kw)
        y_gpu = csq_ext.decode_(q.to(DEV), k.to(DEV), v.to(DEV), st_gpu,
                                **{**kw, "shift": shift.to(DEV)})
        assert y_gpu.device.type == "cuda" and y_gpu.dtype == dtype
        assert_rel_close(y_gpu.cpu(), y_cpu, tol, "y")
    assert_rel_close(st_gpu.sums.cpu(), st_cpu.sums, TOL[torch.float32] if dtype != torch.float64
                     else TOL[torch.float64], "sums")
    assert st_gpu.count.eq(37 + 5).all()


def test_decode_in_place_allocates_nothing(gen):
    """With out and a shift tensor given, a CUDA step allocates no device memory and leaves the
    state's and the output's storage where they are."""
    q, k, v = (randn(gen, 2, h, 1, 8, dtype=torch.float32, device=DEV) for h in (4, 2, 2))
    state = csq_ext.CSQState.empty(2, 2, 8, 8, device=DEV)
    out = torch.empty(2, 4, 1, 8, device=DEV)
    shift = torch.full((4,), 1.0, device=DEV)
    args = (q, k, v, shift, out, 8 ** -0.5, True, True, 1e-6)
    torch.ops.csq_ext.csq_decode_(state.sums, state.ref, *args)  # warm-up
    torch.cuda.synchronize()
    ptrs = (state.sums.data_ptr(), out.data_ptr())
    before = torch.cuda.memory_stats().get("allocation.all.allocated", 0)
    for _ in range(3):
        torch.ops.csq_ext.csq_decode_(state.sums, state.ref, *args)
    torch.cuda.synchronize()
    assert torch.cuda.memory_stats().get("allocation.all.allocated", 0) == before
    assert ptrs == (state.sums.data_ptr(), out.data_ptr())
    assert state.count.eq(4).all()


def test_varlen_matches_cpu_and_gradcheck(gen):
    cu = torch.tensor([0, 3, 4, 11])
    q, k, v = make_qkv(gen, (1, 2, 1, 11, 3, 2), device=DEV)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda q, k, v: csq_ext.attention(q, k, v, cu_seqlens=cu), (q, k, v))
    y_cpu = csq_ext.attention(q.detach().cpu(), k.detach().cpu(), v.detach().cpu(),
                              cu_seqlens=cu)
    assert rel_err(csq_ext.attention(q, k, v, cu_seqlens=cu).detach().cpu(), y_cpu) <= 1e-10


# --------------------------------------------------------------------------------------------
# Carried state (initial_state / return_state) on CUDA. tests/test_streaming.py runs its
# streaming checks (pieces + 2048 decode steps, gradcheck through the state, varlen with
# per-segment states) on CUDA too; these add every dtype and CUDA against CPU.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("center", [True, False], ids=["ctr", "noctr"])
def test_carried_state_matches_cpu_and_reference(gen, center, dtype):
    """A state in (from a prefill), a state out with a loss on it: y, the returned state and
    every gradient (q, k, v, shift, the carried sums and ref) on CUDA equal the CPU backend on
    the same inputs, and y equals the float64 reference over prefill + piece."""
    B, Hq, Hk, N0, N, Dk, Dv = 2, 4, 2, 90, 150, 16, 8
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    q0, k0, v0 = make_qkv(gen, (B, Hq, Hk, N0, Dk, Dv), dtype)
    q, k, v = make_qkv(gen, (B, Hq, Hk, N, Dk, Dv), dtype)
    shift = rand_shift(gen, Hq, shift_dtype(dtype))
    _, s0 = csq_ext.attention(q0, k0, v0, shift=shift, return_state=True)
    dy = randn(gen, B, Hq, N, Dv, dtype=acc)
    dsums = randn(gen, *s0.sums.shape, dtype=acc)

    def run(device):
        leaves = [t.to(device).requires_grad_() for t in (q, k, v, shift, s0.sums, s0.ref)]
        with poisoned_memory(device):
            y, st = csq_ext.attention(*leaves[:3], shift=leaves[3], center=center,
                                      initial_state=csq_ext.CSQState(leaves[4], leaves[5]),
                                      return_state=True)
            loss = (y.to(acc) * dy.to(device)).sum() + (st.sums * dsums.to(device)).sum()
            grads = torch.autograd.grad(loss, leaves)
        assert y.device.type == device and st.sums.device.type == device
        return [t.detach().cpu() for t in (y, st.sums, st.ref, *grads)]

    gpu, cpu = run(DEV), run("cpu")
    tol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, TOL[dtype])
    for name, a, b in zip("y sums ref dq dk dv dshift dsums dref".split(), gpu, cpu):
        assert_rel_close(a, b, tol, name)
    expected = reference(torch.cat([q0, q], 2), torch.cat([k0, k], 2), torch.cat([v0, v], 2),
                         shift=shift, center=center)[:, :, N0:]
    assert_rel_close(gpu[0], expected, TOL[dtype], "y vs reference")


def test_decode_functional_equals_cpu(gen):
    """csq_ext.decode (the functional step, through csq_chunked_fwd with a state) on CUDA."""
    q, k, v = make_qkv(gen, (2, 4, 2, 40, 8, 6), torch.float64)
    _, st = csq_ext.attention(q[:, :, :39], k[:, :, :39], v[:, :, :39], return_state=True)
    last = [t[:, :, 39:] for t in (q, k, v)]
    y_cpu, st_cpu = csq_ext.decode(*last, st)
    y_gpu, st_gpu = csq_ext.decode(*(t.to(DEV) for t in last), st.to(DEV))
    assert y_gpu.device.type == DEV and st_gpu.sums.device.type == DEV
    assert rel_err(y_gpu.cpu(), y_cpu) <= 1e-10
    assert rel_err(st_gpu.sums.cpu(), st_cpu.sums) <= 1e-10
    assert rel_err(y_gpu.cpu(), reference(q, k, v)[:, :, 39:]) <= 1e-10


# --------------------------------------------------------------------------------------------
# Heads up to 256 on the chunked path (kMaxHeadDim; where the device's shared memory needs it,
# the state scans stage 16 or 8 rows per step instead of 32: csrc/cuda/csq_state.cuh)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dk,dv,dtype", [(256, 256, torch.float32), (256, 256, torch.bfloat16),
                                         (200, 129, torch.float32), (256, 64, torch.bfloat16),
                                         (64, 256, torch.float32)], ids=str)
def test_chunked_large_heads_match_cpu(gen, dk, dv, dtype):
    """path="chunked" with a state in (from a prefill) and out, a loss on both: y, the returned
    state and every gradient on CUDA equal the CPU backend on the same inputs, y equals the
    float64 reference over prefill + piece; then decode_ steps on both devices agree."""
    B, Hq, Hk, N0, N = 1, 2, 1, 20, 70
    acc = torch.float32
    shift = rand_shift(gen, Hq, torch.float32)
    (q0, k0, v0), s0 = prefill_state(gen, B, Hq, Hk, N0, dk, dv, dtype, shift)
    q, k, v = make_qkv(gen, (B, Hq, Hk, N, dk, dv), dtype)
    dy = randn(gen, B, Hq, N, dv, dtype=acc)
    dsums = randn(gen, *s0.sums.shape, dtype=acc)

    def run(device):
        leaves = [t.to(device).requires_grad_() for t in (q, k, v, shift, s0.sums, s0.ref)]
        with poisoned_memory(device):
            y, st = csq_ext.attention(*leaves[:3], shift=leaves[3], path="chunked",
                                      initial_state=csq_ext.CSQState(leaves[4], leaves[5]),
                                      return_state=True)
            loss = (y.to(acc) * dy.to(device)).sum() + (st.sums * dsums.to(device)).sum()
            grads = torch.autograd.grad(loss, leaves)
        return [t.detach().cpu() for t in (y, st.sums, st.ref, *grads)], st.detach()

    (gpu, st_gpu), (cpu, st_cpu) = run(DEV), run("cpu")
    tol = 1e-5 if dtype == torch.float32 else TOL[dtype]
    for name, a, b in zip("y sums ref dq dk dv dshift dsums dref".split(), gpu, cpu):
        assert_rel_close(a, b, tol, name)
    expected = reference(torch.cat([q0, q], 2), torch.cat([k0, k], 2), torch.cat([v0, v], 2),
                         shift=shift)[:, :, N0:]
    assert_rel_close(gpu[0], expected, TOL[dtype], "y vs reference")
    for _ in range(2):
        qt, kt, vt = (t[:, :, :1] for t in make_qkv(gen, (B, Hq, Hk, 1, dk, dv), dtype))
        y_cpu = csq_ext.decode_(qt, kt, vt, st_cpu, shift=shift)
        y_gpu = csq_ext.decode_(qt.to(DEV), kt.to(DEV), vt.to(DEV), st_gpu, shift=shift.to(DEV))
        assert_rel_close(y_gpu.cpu(), y_cpu, TOL[dtype], "decode y")
    assert_rel_close(st_gpu.sums.cpu(), st_cpu.sums, TOL[torch.float32], "decode sums")


@pytest.mark.parametrize("dk,dv", [(257, 8), (8, 257)])
def test_chunked_refuses_heads_above_256(gen, dk, dv):
    """Heads above the chunked kernels' 256: the forward and the decode step refuse them with
    a message that names the limit; no CUDA path runs them ("auto" sends them to the direct
    path, which refuses them too)."""
    q, k, v = make_qkv(gen, (1, 2, 1, 5, dk, dv), torch.float32, device=DEV)
    for path in ("chunked", "auto"):
        with pytest.raises(RuntimeError, match=r"1 <= Dk <= 256 and 1 <= Dv <= 256"):
            csq_ext.attention(q, k, v, path=path)
    st = csq_ext.CSQState.empty(1, 1, dk, dv, dtype=torch.float32, device=DEV)
    with pytest.raises(RuntimeError, match=r"1 <= Dk <= 256 and 1 <= Dv <= 256"):
        csq_ext.decode_(q[:, :, :1], k[:, :, :1], v[:, :, :1], st)


# --------------------------------------------------------------------------------------------
# Tensor cores (bfloat16 / float16 state products, csrc/cuda/csq_mma.cuh)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_tensor_core_passes(gen, monkeypatch, dtype):
    """CSQ_CUDA_TENSOR_CORES = 3 (3xTF32, the default), 1 (TF32) and 0 (CUDA cores): every
    choice meets the half-precision bar against the float64 reference at Dk = Dv = 64, and
    3xTF32 stays as close to the reference as the CUDA cores."""
    shape = (1, 4, 2, 2048, 64, 64)
    q, k, v = make_qkv(gen, shape, dtype, device=DEV)
    shift = rand_shift(gen, 4, torch.float32, device=DEV)
    dy = randn(gen, 1, 4, 2048, 64, dtype=dtype, device=DEV)
    y_ref, g_ref = reference_grads(q, k, v, shift, dy)
    errs = {}
    for passes in ("0", "1", "3"):
        monkeypatch.setenv("CSQ_CUDA_TENSOR_CORES", passes)
        y, grads = csq_grads(q, k, v, shift, dy)
        errs[passes] = max([rel_err(y, y_ref)] + [rel_err(grads[n], g_ref[n]) for n in g_ref])
        assert errs[passes] <= TOL[dtype], (passes, errs)
    assert errs["3"] <= 2 * errs["0"] + 1e-4, errs
    monkeypatch.setenv("CSQ_CUDA_TENSOR_CORES", "2")
    with pytest.raises(RuntimeError, match="CSQ_CUDA_TENSOR_CORES"):
        csq_ext.attention(q, k, v)



# --------------------------------------------------------------------------------------------
# The direct path on CUDA (csrc/cuda/csq_direct_*.cuh) against its CPU kernel
# --------------------------------------------------------------------------------------------
DIRECT_FLAGS = [(True, True, True), (False, True, True), (True, False, True),
                (True, True, False), (False, False, False)]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("causal,center,normalize", DIRECT_FLAGS,
                         ids=lambda x: str(int(x)) if isinstance(x, bool) else str(x))
def test_direct_matches_cpu(gen, causal, center, normalize, dtype):
    """path="direct" on both devices, the same inputs: GQA, Dk != Dv, N over several tiles of
    64 and a partial one, transposed (strided) inputs, a shift tensor with its gradient, a
    custom scale and eps: y and every gradient agree to twice the dtype's tolerance, and each
    is within the tolerance of the float64 reference."""
    shape = (2, 4, 2, 150, 24, 40)
    q, k, v = make_qkv(gen, shape, dtype, layout="transposed")
    shift = rand_shift(gen, 4, shift_dtype(dtype))
    dy = randn(gen, 2, 4, 150, 40, dtype=dtype)
    kw = dict(causal=causal, center=center, normalize=normalize, scale=0.3, eps=0.01,
              path="direct")
    y_cpu, g_cpu = csq_grads(q, k, v, shift, dy, **kw)
    y_gpu, g_gpu = csq_grads(*(t.to(DEV) for t in (q, k, v, shift, dy)), **kw)
    kw.pop("path")
    y_ref, g_ref = reference_grads(q, k, v, shift, dy, **kw)
    assert y_gpu.device.type == DEV and y_gpu.dtype == dtype
    assert_rel_close(y_gpu.cpu(), y_cpu, 2 * TOL[dtype], "y")
    assert_rel_close(y_gpu.cpu(), y_ref, TOL[dtype], "y vs reference")
    # (The shift gradient of half inputs sums rounded terms over every row: compared for
    # float64 / float32 only, as in test_matches_cpu.)
    names = ["q", "k", "v"] + (["shift"] if dtype in (torch.float64, torch.float32) else [])
    for name in names:
        assert_rel_close(g_gpu[name].cpu(), g_cpu[name], 2 * TOL[dtype], f"d{name}")
        assert_rel_close(g_gpu[name].cpu(), g_ref[name], TOL[dtype], f"d{name} vs reference")


@pytest.mark.parametrize("dk,dv", [(256, 256), (200, 64), (1, 256)])
def test_direct_large_heads_and_packed(gen, dk, dv):
    """Head sizes up to 256 (several column blocks) and packed sequences (cu_seqlens, with an
    empty one), float32, against the CPU direct path and its op-level outputs (b, den)."""
    cu = torch.tensor([0, 70, 70, 201, 202])
    q, k, v = make_qkv(gen, (1, 4, 2, 202, dk, dv), torch.float32)
    shift = rand_shift(gen, 4, torch.float32)
    dy = randn(gen, 1, 4, 202, dv, dtype=torch.float32)
    kw = dict(cu_seqlens=cu, path="direct")
    y_cpu, g_cpu = csq_grads(q, k, v, shift, dy, **kw)
    y_gpu, g_gpu = csq_grads(*(t.to(DEV) for t in (q, k, v, shift, dy)),
                             **{**kw, "cu_seqlens": cu.to(DEV)})
    assert_rel_close(y_gpu.cpu(), y_cpu, 2 * TOL[torch.float32], "y")
    for name in g_cpu:
        assert_rel_close(g_gpu[name].cpu(), g_cpu[name], 2 * TOL[torch.float32], f"d{name}")
    # The op's auxiliary outputs match the CPU's at the same tile length (64).
    args = (shift, cu, None, None, True, dk ** -0.5, True, True, 1e-6, 64, False)
    cpu = torch.ops.csq_ext.csq_direct_fwd(q, k, v, *args)
    gpu = torch.ops.csq_ext.csq_direct_fwd(q.to(DEV), k.to(DEV), v.to(DEV), shift.to(DEV),
                                           cu.to(DEV), *args[2:])
    for name, a, b in zip(("y", "b", "den"), gpu, cpu):
        assert_rel_close(a.cpu(), b, 2 * TOL[torch.float32], name)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_direct_tensor_core_switch(gen, monkeypatch, dtype):
    """bfloat16 / float16 on the direct path with CSQ_CUDA_TENSOR_CORES unset (tensor cores)
    and 0 (CUDA cores): both within the half-precision bar of the float64 reference."""
    shape = (1, 4, 2, 1000, 64, 64)
    q, k, v = make_qkv(gen, shape, dtype, device=DEV)
    shift = rand_shift(gen, 4, torch.float32, device=DEV)
    dy = randn(gen, 1, 4, 1000, 64, dtype=dtype, device=DEV)
    y_ref, g_ref = reference_grads(q, k, v, shift, dy)
    for passes in (None, "0"):
        if passes is None:
            monkeypatch.delenv("CSQ_CUDA_TENSOR_CORES", raising=False)
        else:
            monkeypatch.setenv("CSQ_CUDA_TENSOR_CORES", passes)
        y, grads = csq_grads(q, k, v, shift, dy, path="direct")
        assert_rel_close(y, y_ref, TOL[dtype], f"y ({passes})")
        for name in ("q", "k", "v"):
            assert_rel_close(grads[name], g_ref[name], TOL[dtype], f"d{name} ({passes})")


def test_direct_auto_choice_on_cuda(gen):
    """"auto" on CUDA runs the path the (uncalibrated) CUDA cost model names."""
    from csq_ext._cost import choose_path
    q, k, v = make_qkv(gen, (1, 2, 2, 256, 32, 32), torch.float32, device=DEV)
    chosen = choose_path(256, 32, 32, True, "cuda", 1, 2, False)
    assert chosen == "direct"
    assert torch.equal(csq(q, k, v), csq(q, k, v, path=chosen))
