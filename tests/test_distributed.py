"""Context parallelism (csq_ext.distributed) against one process.

Each world size is one group of spawned processes (gloo, 127.0.0.1) that runs every check in
turn: starting a process costs seconds here, a check milliseconds. Every collective has a
timeout and the whole group a deadline, so a failure ends in an error, never a hang. The
expected values are computed on every rank from the whole sequence, in one process: outputs
and gradients from ``csq_ext.attention`` (and the float64 oracle), the returned state from a
direct float64 sum over the keys.
"""
from __future__ import annotations

import datetime
import socket
import sys
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import csq_ext
from csq_ext import distributed as cd
from csq_ext.state import CSQState, num_features
from conftest import TOL, TOL_F32_OFFSET, rand_shift, randn, reference, rel_err

COLLECTIVE_TIMEOUT_S = 60
GROUP_DEADLINE_S = 240

# Shard lengths per world size: unequal, empty and length-1 shards, and equal ones.
LAYOUTS = {1: [[9]], 2: [[5, 8], [0, 7], [1, 1]], 3: [[4, 0, 7], [1, 6, 2]],
           4: [[3, 1, 0, 6], [2, 2, 2, 2]]}

# Each case: options of one call. Sizes: B = 2 (1 packed), Hq = 4, Hk = 2 (gqa) or 2, Dk 3, Dv 4.
CASES = [
    dict(causal=True, gqa=True, shift_tensor=True),
    dict(causal=False, gqa=True, shift_tensor=True),
    dict(causal=True, center=False, normalize=False),
    dict(causal=False, center=False, normalize=False),
    dict(causal=True, offset=30.0, return_state=True),
    dict(causal=False, offset=30.0, gqa=True),
    dict(causal=True, dtype=torch.float32, gqa=True, shift_tensor=True),
    dict(causal=False, dtype=torch.float32),
    dict(causal=True, dtype=torch.float32, offset=30.0),
    dict(causal=False, dtype=torch.float32, offset=30.0),
    dict(causal=True, packed=True, initial_state=True, return_state=True, shift_tensor=True),
    dict(causal=True, packed=True, return_state=True, gqa=True),
    dict(causal=False, packed=True, gqa=True),
    dict(causal=True, center=False, initial_state=True, return_state=True),
    # path= as csq_ext.attention takes it (README: the options of attention).
    dict(causal=True, gqa=True, path="direct", return_state=True),
    dict(causal=True, dtype=torch.float32, path="chunked", shift_tensor=True),
    dict(causal=False, path="direct"),
    dict(causal=True, packed=True, path="direct", gqa=True),
]


def _cu_seqlens(T: int) -> torch.Tensor:
    """Offsets of 4 sequences over T positions: one empty, the others crossing shards."""
    cuts = sorted([0, T // 5, T // 5, (3 * T) // 5, T])
    return torch.tensor(cuts, dtype=torch.int32)


def _psi(u: torch.Tensor) -> torch.Tensor:
    """Key features [u_x u_y (x <= y), u_x, 1] (the state's row order), (..., F)."""
    iu = torch.triu_indices(u.shape[-1], u.shape[-1])
    return torch.cat([u[..., iu[0]] * u[..., iu[1]], u, torch.ones_like(u[..., :1])], dim=-1)


def _expected_state(k, v, cu, lengths, center, init):
    """(sums, ref) after the whole sequence, in float64 PyTorch: the ref the distributed call
    documents (the initial state's; else the lower median of the first keys of the first rank's
    piece of each sequence, all of them at these sizes; else 0) and sums of psi(k - ref) [v, 1]."""
    B, Hk, T, Dk = k.shape
    starts = [sum(lengths[:r]) for r in range(len(lengths) + 1)]
    bounds = [(0, T)] * B if cu is None else list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    sums, refs = [], []
    for s, (a, b) in enumerate(bounds):
        ks, vs = (k[s] if cu is None else k[0, :, a:b]), (v[s] if cu is None else v[0, :, a:b])
        if init is not None:
            ref = init.ref[s]
        elif center and b > a:
            r0 = next(r for r in range(len(lengths)) if min(b, starts[r + 1]) > max(a, starts[r]))
            lo, hi = max(a, starts[r0]) - a, min(b, starts[r0 + 1]) - a
            ref = ks[:, lo:hi].median(1).values
        else:
            ref = k.new_zeros(Hk, Dk)
        feats = _psi(ks - ref[:, None])
        vals = torch.cat([vs, torch.ones_like(vs[..., :1])], dim=-1)
        sums.append(feats.transpose(-1, -2) @ vals)
        refs.append(ref)
    sums = torch.stack(sums)
    if init is not None:
        sums = sums + init.sums
    return sums, torch.stack(refs)


def _run_case(rank, lengths, seed, *, causal, dtype=torch.float64, center=True,
              normalize=True, gqa=False, shift_tensor=False, offset=0.0, packed=False,
              initial_state=False, return_state=False, path="auto"):
    """Runs one call on every rank; returns [(what, error, tolerance)] for this rank."""
    gen = torch.Generator().manual_seed(seed)
    world, T = len(lengths), sum(lengths)
    B, Hq, Hk, Dk, Dv = (1 if packed else 2), 4, (2 if gqa else 4), 3, 4
    q = randn(gen, B, Hq, T, Dk, dtype=dtype)
    k = (randn(gen, B, Hk, T, Dk) + offset * torch.randn(Dk, generator=gen,
                                                          dtype=torch.float64)).to(dtype)
    v = randn(gen, B, Hk, T, Dv, dtype=dtype)
    shift = rand_shift(gen, Hq, dtype=dtype) if shift_tensor else 0.75
    cu = _cu_seqlens(T) if packed else None
    S = B if cu is None else cu.shape[0] - 1
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    init = None
    if initial_state:
        init = CSQState(randn(gen, S, Hk, num_features(Dk), Dv + 1, dtype=acc).abs(),
                        randn(gen, S, Hk, Dk, dtype=acc))
    dy = randn(gen, B, Hq, T, Dv, dtype=dtype)
    ds, dr = randn(gen, S, Hk, num_features(Dk), Dv + 1, dtype=acc), randn(gen, S, Hk, Dk, dtype=acc)
    opts = dict(causal=causal, center=center, normalize=normalize, cu_seqlens=cu)

    def leaves(full, local):
        xs = dict(q=q, k=k, v=v)
        if local:
            a, b = sum(lengths[:rank]), sum(lengths[:rank + 1])
            xs = {n: t[:, :, a:b] for n, t in xs.items()}
        xs = {n: t.detach().clone().requires_grad_() for n, t in xs.items()}
        if shift_tensor:
            xs["shift"] = shift.detach().clone().requires_grad_()
        if init is not None:
            xs["init_sums"] = init.sums.detach().clone().requires_grad_()
            xs["init_ref"] = init.ref.detach().clone().requires_grad_()
        return xs

    def state_of(xs):
        return CSQState(xs["init_sums"], xs["init_ref"]) if init is not None else None

    # One process, the whole sequence.
    full = leaves(True, False)
    y_full = csq_ext.attention(full["q"], full["k"], full["v"], shift=full.get("shift", shift),
                               initial_state=state_of(full), **opts)
    loss = (y_full * dy).sum()
    if return_state:
        sums_full, ref_full = _expected_state(full["k"].double(), full["v"].double(), cu,
                                              lengths, center, state_of(full))
        loss = loss + (sums_full * ds).sum() + (ref_full * dr).sum()
    g_full = dict(zip(full, torch.autograd.grad(loss, list(full.values()), allow_unused=True)))

    # Every rank its shard.
    loc = leaves(False, True)
    out = cd.attention(loc["q"], loc["k"], loc["v"], shift=loc.get("shift", shift),
                       initial_state=state_of(loc), return_state=return_state, path=path,
                       **opts)
    y, state = out if return_state else (out, None)
    loss = (y * dy[:, :, sum(lengths[:rank]):sum(lengths[:rank + 1])]).sum()
    if return_state and rank == world - 1:  # the state's loss counted once, on one rank
        loss = loss + (state.sums * ds).sum() + (state.ref * dr).sum()
    g_loc = dict(zip(loc, torch.autograd.grad(loss, list(loc.values()), allow_unused=True)))

    tol = TOL[dtype]
    a, b = sum(lengths[:rank]), sum(lengths[:rank + 1])
    checks = [("y vs one process", rel_err(y, y_full[:, :, a:b]), tol)]
    if init is None and (dtype == torch.float64 or offset == 0.0):
        checks.append(("y vs float64 oracle", rel_err(
            y, reference(q, k, v, shift, **opts)[:, :, a:b] if cu is None else
            _packed_reference(q, k, v, shift, cu, opts)[:, :, a:b]),
            TOL[dtype] if offset == 0.0 else TOL_F32_OFFSET))
    if return_state:
        checks += [("state sums", rel_err(state.sums, sums_full), tol),
                   ("state ref", rel_err(state.ref, ref_full), tol)]
    grad_tol = tol if offset == 0.0 or dtype == torch.float64 else TOL_F32_OFFSET
    for name in ("q", "k", "v"):
        want = g_full[name][:, :, a:b]
        got = g_loc[name] if g_loc[name] is not None else torch.zeros_like(want)
        checks.append((f"d{name}", _grad_err(got, want, g_full[name]), grad_tol))
    if shift_tensor:  # each rank holds the part from its queries: the sum is the gradient
        dshift = g_loc["shift"].clone()
        dist.all_reduce(dshift)
        checks.append(("dshift", rel_err(dshift, g_full["shift"]), grad_tol))
    if init is not None and rank == 0:  # read on rank 0: its gradient arrives there
        for name in ("init_sums", "init_ref"):
            checks.append((f"d{name}", rel_err(g_loc[name], g_full[name], floor=1e-12), tol))
    return checks


def _grad_err(got, want, whole):
    """Relative error of a gradient. One may vanish in exact arithmetic (a shard of sequences
    of one key; the key bias under centering): errors there are measured against the whole
    gradient's size, or 1, not against the rounding noise."""
    return rel_err(got, want, floor=max(1e-3 * whole.norm().item(), 1.0))


def _packed_reference(q, k, v, shift, cu, opts):
    kw = {n: opts[n] for n in ("causal", "center", "normalize")}
    c = cu.tolist()
    return torch.cat([reference(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], shift, **kw)
                      for a, b in zip(c[:-1], c[1:])], dim=2)


def _expected_bytes(world, S, Hk, Dk, Dv, causal, elem):
    """The module's count for one forward call with centering: handshake (20 int64, README),
    candidate reference keys, states (all-gather if causal, else all-reduce)."""
    state = S * Hk * num_features(Dk) * (Dv + 1) * elem
    states = (world - 1) * state if causal else 2 * (world - 1) * state // world
    return (world - 1) * 20 * 8 + (world - 1) * S * Hk * (Dk + 1) * elem + states


def _check_bytes(rank, world):
    """Bytes per rank: the documented count, and the same at two sequence lengths."""
    checks = []
    for causal in (True, False):
        sent = []
        for n in (4, 64):
            gen = torch.Generator().manual_seed(n)
            q, k, v = (randn(gen, 2, 2, n, 3, requires_grad=True) for _ in range(3))
            cd.reset_comm_stats()
            y = cd.attention(q, k, v, causal=causal)
            forward = cd.comm_stats()["bytes"]
            y.sum().backward()
            sent.append((forward, cd.comm_stats()["bytes"]))
        want = _expected_bytes(world, 2, 2, 3, 3, causal, 8)
        checks.append((f"forward bytes (causal={causal}) - formula", abs(sent[0][0] - want), 0))
        checks.append((f"bytes at N=4 vs N=64 (causal={causal})",
                       abs(sent[0][1] - sent[1][1]) + abs(sent[0][0] - sent[1][0]), 0))
    return checks


def _expect_error(call, *fragments):
    try:
        call()
    except ValueError as e:
        missing = [f for f in fragments if f not in str(e)]
        return [] if not missing else [f"error message lacks {missing}: {e}"]
    return [f"no error raised (expected one naming {fragments})"]


def _check_errors(rank, world):
    """Bad input on the last rank, or options that differ: every rank raises, nobody hangs."""
    gen = torch.Generator().manual_seed(7)
    q, k, v = randn(gen, 1, 2, 3, 4), randn(gen, 1, 2, 3, 4), randn(gen, 1, 2, 3, 4)
    bad_k = k[..., :3] if rank == world - 1 else k
    problems = _expect_error(lambda: cd.attention(q, bad_k, v), "k must have shape",
                             *([f"rank {world - 1}"] if world > 1 else []))
    if world > 1:
        problems += _expect_error(lambda: cd.attention(q, k, v, causal=rank != 0),
                                  "agree on causal")
        problems += _expect_error(lambda: cd.attention(q, k, v, cu_seqlens=torch.tensor(
            [0, 1, 3 * world - 1], dtype=torch.int32)), "cu_seqlens must end")
        # Every option that changes the result, each with the ranks' values in the message.
        first = rank == 0
        other_shift = torch.full((2,), 0.5 if first else 0.75, dtype=torch.float64)
        for kw, name, shown in (
                (dict(scale=0.5 if first else 0.25), "scale", "0.25"),
                (dict(eps=1e-6 if first else 1e-3), "eps", "0.001"),
                (dict(shift=1.0 if first else 2.0), "shift", "2.0"),
                (dict(shift=other_shift), "shift", "0.75"),
                (dict(shift=1.0 if first else torch.tensor([1.0, 3.0], dtype=torch.float64)),
                 "shift", "3.0"),
                (dict(center=first), "center", ""),
                (dict(normalize=first), "normalize", ""),
                (dict(path="direct" if first else "chunked"), "path", "'chunked'")):
            problems += _expect_error(lambda: cd.attention(q, k, v, **kw), f"agree on {name}",
                                      shown)
        problems += _expect_error(lambda: cd.attention(q, k, v, path="fast"), "path must be")
    # A float shift and a tensor of the same values agree (the same computation).
    same = cd.attention(q, k, v, shift=1.0 if rank == 0 else torch.ones(2, dtype=torch.float64))
    problems += [] if torch.isfinite(same).all() else ["a float and an equal tensor shift"]
    # The group still works afterwards.
    y = cd.attention(q, k, v)
    return problems + ([] if torch.isfinite(y).all() else ["no output after the errors"])


def _check_layer(rank, world):
    """CSQAttention(process_group=...) on shards: the whole sequence's output, and parameter
    gradients that sum over the ranks to the one-process ones."""
    lengths = LAYOUTS[world][0]
    a, b = sum(lengths[:rank]), sum(lengths[:rank + 1])
    gen = torch.Generator().manual_seed(11)
    x, dy = randn(gen, 2, sum(lengths), 8), randn(gen, 2, sum(lengths), 8)
    layers = []
    for group in (None, dist.group.WORLD):
        torch.manual_seed(5)
        layers.append(csq_ext.CSQAttention(8, 2, learnable_shift=True, process_group=group,
                                           dtype=torch.float64))
    single, split = layers
    y_full, y = single(x), split(x[:, a:b])
    (y_full * dy).sum().backward()
    (y * dy[:, a:b]).sum().backward()
    checks = [("layer y", rel_err(y, y_full[:, a:b]), TOL[torch.float64])]
    for (name, p1), p2 in zip(single.named_parameters(), split.parameters()):
        dist.all_reduce(p2.grad)
        checks.append((f"layer d{name}", _grad_err(p2.grad, p1.grad, p1.grad),
                       TOL[torch.float64]))
    return [f"{what}: {err:.3e} > {tol}" for what, err, tol in checks if not err <= tol]


def _worker(rank, world, port):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    failures = []
    try:
        for lengths in LAYOUTS[world]:
            for i, case in enumerate(CASES):
                for what, err, tol in _run_case(rank, lengths, 1000 * world + i, **case):
                    if not err <= tol:  # NaN fails too
                        failures.append(f"shards {lengths} case {case}: {what}: {err:.3e} > {tol}")
        for what, err, tol in _check_bytes(rank, world):
            if not err <= tol:
                failures.append(f"{what}: {err}")
        failures += _check_errors(rank, world)
        failures += _check_layer(rank, world)
    except BaseException:
        # The spawner reports the first rank to exit, often a peer left waiting in a
        # collective: print this rank's own traceback so the root cause shows.
        sys.stderr.write(f"rank {rank} of {world} raised:\n{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()
    if failures:
        raise AssertionError(f"rank {rank} of {world}:\n" + "\n".join(failures))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", sorted(LAYOUTS))
def test_context_parallel_matches_one_process(world):
    ctx = mp.start_processes(_worker, args=(world, _free_port()), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + GROUP_DEADLINE_S
    while not ctx.join(timeout=1.0):  # raises with the failing rank's traceback
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the group of {world} ranks did not finish in {GROUP_DEADLINE_S} s")


# ----------------------------------------------------------------------------------------------
# The local pieces, in one process
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("center", [True, False])
def test_full_state_read_gradcheck(gen, center):
    """The non-causal read of a state: gradcheck, and equal to the op on the same keys."""
    q, k, v = randn(gen, 1, 4, 6, 3), randn(gen, 1, 2, 6, 3) + 2.0, randn(gen, 1, 2, 6, 2)
    shift, ref = rand_shift(gen, 4), randn(gen, 1, 2, 3)
    sums = _expected_state(k, v, None, [6], False, CSQState(torch.zeros(1, 2, num_features(3),
                                                                         3, dtype=torch.float64),
                                                            ref))[0]
    y = cd._read_full_state(q, sums, ref, shift, 0.6, center, True, 1e-6)
    want = reference(q, k, v, shift, causal=False, scale=0.6, center=center)
    assert rel_err(y, want) <= TOL[torch.float64]
    args = [t.detach().requires_grad_() for t in (q, sums, ref, shift)]
    assert torch.autograd.gradcheck(
        lambda *a: cd._read_full_state(*a, 0.6, center, True, 1e-6), args)


def test_ref_candidates_gradcheck(gen):
    """The candidate reference keys: per piece of a sequence the lower median of its first keys
    (the op's rule), a flag where the rank holds keys of it; differentiable."""
    k = randn(gen, 1, 2, 7, 3, requires_grad=True)
    v = randn(gen, 1, 2, 7, 2)
    cu = torch.tensor([0, 0, 2, 7], dtype=torch.int64)

    def candidates(x):  # the ref the state-only op picks for this rank's own state
        return cd._ref_candidates(cd._local_state(x, v, cu, None, 0)[1], cu, x)
    cand = candidates(k)
    assert cand[..., -1].tolist() == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
    assert rel_err(cand[2, :, :-1], k[0, :, 2:7].median(1).values) <= 1e-15
    assert rel_err(cand[1, :, :-1], k[0, :, 0:2].median(1).values) <= 1e-15
    assert torch.autograd.gradcheck(candidates, (k,))
