"""Bad input: every case the spec lists raises ValueError/RuntimeError naming the argument,
through the public function and through the raw operator; NaN/Inf propagate exactly to the
outputs they reach."""
import re

import pytest
import torch

import csq_ext
from conftest import csq, fwd_op_args, make_qkv, rand_shift, randn

B, HQ, HK, N, DK, DV = 2, 4, 2, 7, 3, 5


def _good(gen):
    q, k, v = make_qkv(gen, (B, HQ, HK, N, DK, DV), torch.float32)
    return dict(q=q, k=k, v=v, shift=rand_shift(gen, HQ, torch.float32), eps=1e-6)


# name -> (function that breaks the good kwargs, regexes that must all appear in the message)
CASES = {
    "q_rank3": (lambda a: a.update(q=a["q"][0]), [r"\bq\b", r"\(B, Hq, N, Dk\)"]),
    "q_rank5": (lambda a: a.update(q=a["q"][None]), [r"\bq\b", r"\(B, Hq, N, Dk\)"]),
    "k_rank3": (lambda a: a.update(k=a["k"][0]), [r"\bk\b", r"\(B, Hk, N, Dk\)"]),
    "v_rank2": (lambda a: a.update(v=a["v"][0, 0]), [r"\bv\b", r"\(B, Hk, N, Dv\)"]),
    "k_batch": (lambda a: a.update(k=a["k"][:1]), [r"\bk\b", r"batch|\bB\b"]),
    "v_batch": (lambda a: a.update(v=torch.cat([a["v"], a["v"]])), [r"\bv\b", r"batch|\bB\b"]),
    "k_length": (lambda a: a.update(k=a["k"][:, :, :-1]), [r"\bk\b", r"length|\bN\b"]),
    "v_length": (lambda a: a.update(v=a["v"][:, :, :-2]), [r"\bv\b", r"length|\bN\b"]),
    "k_head_size": (lambda a: a.update(k=torch.randn(B, HK, N, DK + 1)), [r"\bk\b", r"Dk"]),
    "v_heads": (lambda a: a.update(v=torch.randn(B, HK + 1, N, DV)), [r"\bv\b", r"Hk"]),
    "heads_not_multiple": (lambda a: a.update(k=torch.randn(B, 3, N, DK),
                                              v=torch.randn(B, 3, N, DV)),
                           [r"Hq", r"Hk", r"multiple"]),
    "k_dtype": (lambda a: a.update(k=a["k"].double()), [r"\bk\b", r"dtype"]),
    "v_dtype": (lambda a: a.update(v=a["v"].half()), [r"\bv\b", r"dtype"]),
    "k_device": (lambda a: a.update(k=a["k"].to("meta")), [r"\bk\b", r"device"]),
    "q_device": (lambda a: a.update(q=a["q"].to("meta")), [r"\bq\b", r"device"]),
    "int_dtype": (lambda a: a.update(q=a["q"].long(), k=a["k"].long(), v=a["v"].long()),
                  [r"\bq\b", r"floating"]),
    "bool_dtype": (lambda a: a.update(v=a["v"] > 0), [r"\bv\b", r"dtype|floating"]),
    "shift_long": (lambda a: a.update(shift=torch.ones(HQ + 1)), [r"shift", r"\(Hq,\)"]),
    "shift_kv_heads": (lambda a: a.update(shift=torch.ones(HK)), [r"shift", r"\(Hq,\)"]),
    "shift_2d": (lambda a: a.update(shift=torch.ones(1, HQ)), [r"shift", r"\(Hq,\)"]),
    "shift_0d": (lambda a: a.update(shift=torch.tensor(1.0)), [r"shift", r"\(Hq,\)"]),
    "shift_int": (lambda a: a.update(shift=torch.ones(HQ, dtype=torch.int64)),
                  [r"shift", r"floating"]),
    "shift_device": (lambda a: a.update(shift=a["shift"].to("meta")), [r"shift", r"device"]),
    "eps_negative": (lambda a: a.update(eps=-1e-6), [r"\beps\b"]),
    "eps_nan": (lambda a: a.update(eps=float("nan")), [r"\beps\b"]),
}


def _expect(exc_info, patterns):
    msg = str(exc_info.value)
    for pat in patterns:
        assert re.search(pat, msg), f"message {msg!r} does not match {pat!r}"


@pytest.mark.parametrize("case", list(CASES))
def test_public_api_rejects(gen, case):
    args = _good(gen)
    csq_ext.attention(**args)  # the unbroken arguments are fine
    CASES[case][0](args)
    with pytest.raises((ValueError, RuntimeError)) as exc_info:
        csq_ext.attention(**args)
    _expect(exc_info, CASES[case][1])


# Cases the raw operator sees as tensors on one device (the meta cases dispatch to the fake
# kernel, which has no data to check, and float eps NaN is the public function's concern).
OP_CASES = [c for c in CASES if "device" not in c and c != "eps_nan"]


@pytest.mark.parametrize("case", OP_CASES)
def test_raw_op_rejects(gen, case):
    """torch.ops.csq_ext.csq_chunked_fwd checks what the kernel relies on: a RuntimeError, never a
    crash or a read out of bounds."""
    args = _good(gen)
    CASES[case][0](args)
    shift = args["shift"]
    with pytest.raises(RuntimeError) as exc_info:
        torch.ops.csq_ext.csq_chunked_fwd(*fwd_op_args(args["q"], args["k"], args["v"], shift, True,
                                               0.5, True, True, args["eps"], 4))
    _expect(exc_info, CASES[case][1])


def test_raw_op_rejects_negative_chunk(gen):
    a = _good(gen)
    with pytest.raises(RuntimeError, match="tile_size"):
        torch.ops.csq_ext.csq_chunked_fwd(*fwd_op_args(a["q"], a["k"], a["v"], a["shift"], True, 0.5,
                                               True, True, 1e-6, -1))
    with pytest.raises((ValueError, RuntimeError), match="tile_size"):
        csq_ext.attention(a["q"], a["k"], a["v"], tile_size=-4)


@pytest.mark.parametrize("which", ["k", "v", "shift"])
def test_raw_op_rejects_meta_tensor_among_cpu_tensors(gen, which):
    """A meta tensor next to CPU tensors sends torch.ops.csq_ext.csq_chunked_fwd to the fake (Meta)
    kernel, whatever the other devices are. It must refuse, not hand back uninitialized CPU
    tensors as if they were results."""
    a = _good(gen)
    a[which] = a[which].to("meta")
    with pytest.raises(RuntimeError, match="device"):
        torch.ops.csq_ext.csq_chunked_fwd(*fwd_op_args(a["q"], a["k"], a["v"], a["shift"], True, 0.5,
                                               True, True, 1e-6, 4))


@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="this torch has no float8")
def test_raw_ops_reject_a_floating_dtype_without_kernels(gen):
    """float8 passes the host layer's floating-point check but has no kernel: each backend's
    dtype dispatch (csrc/cpu/csq_ops_cpu.cpp) refuses it naming the op and the dtype."""
    a = _good(gen)
    q8, k8, v8 = (a[name].to(torch.float8_e4m3fn) for name in ("q", "k", "v"))
    ops = torch.ops.csq_ext
    for op, name in ((ops.csq_chunked_fwd, "csq_chunked_fwd"),
                     (ops.csq_direct_fwd, "csq_direct_fwd")):
        with pytest.raises(RuntimeError, match=name + r".*dtype Float8_e4m3fn"):
            op(*fwd_op_args(q8, k8, v8, a["shift"], True, 0.5, True, True, 1e-6, 4))
    with pytest.raises(RuntimeError, match=r"csq_state.*dtype Float8_e4m3fn"):
        ops.csq_state(k8, v8, None, None, None, 0)


def test_not_a_tensor(gen):
    a = _good(gen)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=r"\bq\b"):
        csq_ext.attention(a["q"].tolist(), a["k"], a["v"])


# --------------------------------------------------------------------------------------------
# NaN / Inf
# --------------------------------------------------------------------------------------------
def _assert_nonfinite_exactly(y, mask):
    """y is non-finite exactly where mask is True."""
    bad = ~torch.isfinite(y)
    assert bad[mask].all(), f"{int((~bad[mask]).sum())} reached elements are finite"
    leaked = bad & ~mask
    assert not leaked.any(), (f"{int(leaked.sum())} elements the bad value cannot reach are "
                              f"not finite, e.g. at {tuple(leaked.nonzero()[0].tolist())}")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("tile_size", [4, None], ids=["chunk4", "default_chunk"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_bad_value_in_v(gen, causal, tile_size, bad):
    """v[b=1, kv head 0, j=6, x=2] bad: it reaches y[1, heads 0-1, i, 2] for i >= 6 (causal)
    or every i (non-causal) and nothing else: other batch entries, other head groups, other
    value columns and, when causal, positions before 6 (even in the same chunk) stay
    finite."""
    q, k, v = make_qkv(gen, (2, 4, 2, 10, 3, 4))
    v[1, 0, 6, 2] = bad
    y = csq(q, k, v, causal=causal, tile_size=tile_size)
    mask = torch.zeros_like(y, dtype=torch.bool)
    mask[1, 0:2, 6 if causal else 0:, 2] = True
    _assert_nonfinite_exactly(y, mask)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_bad_value_in_q(gen, causal, bad):
    """q[0, head 3, i=5] bad: only row y[0, 3, 5] is affected (q_i enters only its own
    weights)."""
    q, k, v = make_qkv(gen, (2, 4, 2, 10, 3, 4))
    q[0, 3, 5, 1] = bad
    y = csq(q, k, v, causal=causal, tile_size=4)
    mask = torch.zeros_like(y, dtype=torch.bool)
    mask[0, 3, 5, :] = True
    _assert_nonfinite_exactly(y, mask)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("center", [True, False], ids=["ctr", "noctr"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_bad_value_in_k(gen, causal, center, bad):
    """k[1, kv head 1, j=6] bad: it reaches the rows i >= 6 (causal) or all rows (non-causal)
    of query heads 2-3 in batch 1, and nothing else; in particular, when causal, rows before 6
    stay finite with or without centering (the mean a query subtracts only covers j <= i)."""
    q, k, v = make_qkv(gen, (2, 4, 2, 10, 3, 4))
    k[1, 1, 6, 0] = bad
    y = csq(q, k, v, causal=causal, center=center, tile_size=4)
    mask = torch.zeros_like(y, dtype=torch.bool)
    mask[1, 2:4, 6 if causal else 0:, :] = True
    _assert_nonfinite_exactly(y, mask)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_bad_value_backward_does_not_crash(gen, causal):
    """A NaN in v: the backward runs and returns gradients of the right shapes; the NaN reaches
    dq of the rows that read v_6 and leaves the other batch entry finite."""
    q, k, v = make_qkv(gen, (2, 4, 2, 10, 3, 4), requires_grad=True)
    with torch.no_grad():
        v[1, 0, 6, 2] = float("nan")
    y = csq_ext.attention(q, k, v, causal=causal, tile_size=4)
    dq, dk, dv = torch.autograd.grad(y, (q, k, v), randn(gen, *y.shape))
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert not torch.isfinite(dq[1, 0:2, 6:]).any()
    for g in (dq, dk, dv):
        assert torch.isfinite(g[0]).all()
    if causal:
        assert torch.isfinite(dq[1, :, :6]).all()


def test_nan_shift_reaches_its_head_only(gen):
    q, k, v = make_qkv(gen, (2, 4, 2, 10, 3, 4))
    shift = rand_shift(gen, 4)
    shift[2] = float("nan")
    y = csq(q, k, v, shift=shift)
    mask = torch.zeros_like(y, dtype=torch.bool)
    mask[:, 2] = True
    _assert_nonfinite_exactly(y, mask)
