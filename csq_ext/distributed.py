"""Context parallelism: one sequence split over the ranks of a ``torch.distributed`` group.

CSQ's state is a sum over keys (``csq_ext.CSQState``), so a rank needs from the ranks before it
only the sum of their states, O(Dk^2 Dv) numbers per head whatever the sequence length
(LASP-2's scheme for linear attention). A call, on every rank of the group:

1. a handshake: one all-gather of HANDSHAKE_INTS (20) integers per rank (shard length, shapes,
   options, an error flag), so that bad input on one rank, or ranks that disagree on an
   option, raise on every rank instead of hanging or computing something else;
2. one common reference key per sequence (centering, or an ``initial_state``): an all-gather
   of one candidate key per sequence and head; the sums are taken relative to it;
3. the rank's state of its own keys (the state-only op, csq_state), then one all-gather of the
   states (causal: rank r starts from the sum of the states of ranks < r) or one all-reduce
   (non-causal: every query reads the state of the whole sequence);
4. local attention from that carried state (``csq_ext.attention``; the non-causal read of a
   full state is a small PyTorch function here, since the op takes states only when causal).

The backward mirrors it: the all-gather's backward is a reduce-scatter, which brings the
gradients of a carried state back to the ranks whose keys made it. Nothing here grows with N.
"""
from __future__ import annotations

import hashlib
import struct

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from . import _args
from ._args import acc_dtype as _acc_dtype, check as _check
from ._ops import ops
from .attention import attention as _attention
from .feature_map import SQUARE
from .state import CSQState, num_pairs

# all_gather_into_tensor / reduce_scatter_tensor were renamed *_single (same arguments) in
# recent torch; the old names warn there.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

_READ_CHUNK = 256    # queries per step of the non-causal read (bounds its O(C Dk Dv) buffers)

# ----------------------------------------------------------------------------------------------
# Bytes sent: counted at the collectives, on ring algorithms' wire sizes
# ----------------------------------------------------------------------------------------------
_sent = {"bytes": 0, "collectives": 0}


def comm_stats() -> dict:
    """Bytes this process has sent through this module's collectives since
    ``reset_comm_stats()``, and how many collectives. The bytes are the wire size of ring
    algorithms, counted from the tensors actually passed: all-gather of s bytes per rank sends
    (W - 1) s, all-reduce of s bytes 2 (W - 1) / W s, reduce-scatter of W s bytes (W - 1) s."""
    return dict(_sent)


def reset_comm_stats() -> None:
    _sent["bytes"] = _sent["collectives"] = 0


def _count(kind: str, t: torch.Tensor, world: int) -> None:
    s = t.numel() * t.element_size()
    wire = {"all_gather": (world - 1) * s, "all_reduce": 2 * (world - 1) * s // world,
            "reduce_scatter": (world - 1) * s // world}[kind]
    _sent["bytes"] += wire
    _sent["collectives"] += 1


class _AllGather(torch.autograd.Function):
    """(…) on each rank -> (W, …) on every rank; backward: reduce-scatter (sum) of the
    gradients, so each rank receives the gradient of its own piece from every rank."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        world = dist.get_world_size(group)
        x = x.contiguous()
        out = x.new_empty((world,) + tuple(x.shape))
        _count("all_gather", x, world)
        _all_gather(out.view(-1), x.view(-1), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        world = dist.get_world_size(ctx.group)
        grad = grad.contiguous()
        out = grad.new_empty(grad.shape[1:])
        _count("reduce_scatter", grad, world)
        _reduce_scatter(out.view(-1), grad.view(-1), group=ctx.group)
        return out, None


class _AllReduce(torch.autograd.Function):
    """Sum over ranks; its backward is the same sum of the gradients."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.contiguous().clone()
        _count("all_reduce", out, dist.get_world_size(group))
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out = grad.contiguous().clone()
        _count("all_reduce", out, dist.get_world_size(ctx.group))
        dist.all_reduce(out, group=ctx.group)
        return out, None


# ----------------------------------------------------------------------------------------------
# Handshake: every rank checks its input, then all learn whether every rank could go on
# ----------------------------------------------------------------------------------------------
_DTYPES = {torch.float64: 1, torch.float32: 2, torch.bfloat16: 3, torch.float16: 4}
_PATHS = ("auto", "direct", "chunked")
# The fields every rank must agree on; the shard length (first) may differ. Every option that
# changes the result is here (tile_size, a tuning knob, does not change it): scale and eps as
# their float64 bits, shift as a digest of its (Hq,) values (a float or a tensor alike).
_AGREE = ("batch", "heads_q", "heads_k", "dim_k", "dim_v", "dtype", "causal", "center",
          "normalize", "initial_state", "return_state", "sequences", "cu_seqlens",
          "requires_grad", "scale", "eps", "shift", "path")
HANDSHAKE_INTS = 2 + len(_AGREE)  # an error flag and the shard length, then the fields


def _check_cu_seqlens(cu_seqlens, q):
    """Checks the whole batch's offsets; returns them on the CPU (int64)."""
    _check(isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.dim() == 1
           and cu_seqlens.shape[0] >= 2 and cu_seqlens.dtype in (torch.int32, torch.int64),
           lambda: "cu_seqlens must be an int32 or int64 tensor of shape (S + 1,): the offsets of "
           "S sequences packed along the whole (all ranks') sequence")
    _check(q.shape[0] == 1, lambda: "with cu_seqlens, q, k, v must pack the sequences along N "
           f"with batch size 1: q of shape (1, Hq, N_r, Dk), got {tuple(q.shape)}")
    c = cu_seqlens.detach().cpu().long()
    _check(int(c[0]) == 0 and bool((c[1:] >= c[:-1]).all()),
           lambda: "cu_seqlens must be non-decreasing offsets from 0 to the total length T")
    return c


def _inputs_requiring_grad(q, k, v, shift, initial_state) -> bool:
    ts = [q, k, v, shift] + (list(initial_state) if initial_state is not None else [])
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                           for t in ts)


def _float_bits(x: float) -> int:
    """The float64 bits of x as an int64 (exact: ranks agree only on equal values)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _shift_digest(shift_t: torch.Tensor) -> int:
    """An int64 digest of the (Hq,) shift values, the same on every rank for the same values."""
    data = shift_t.detach().to("cpu", torch.float64).contiguous().numpy().tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def _local_fields(q, k, v, shift, scale, eps, tile_size, chunk_size, causal, center, normalize,
                  cu_seqlens, initial_state, return_state, path):
    """Checks this rank's input (the checks of csq_ext.attention, csq_ext/_args.py, with
    cu_seqlens describing the whole batch) and returns the handshake fields, the options as
    shown in a disagreement's message and the block length, or raises ValueError / TypeError."""
    _args.qkv(q, k, v)
    for name, value in (("causal", causal), ("center", center), ("normalize", normalize),
                        ("return_state", return_state)):
        _args.flag(name, value)
    eps_v = _args.eps(eps)
    tau = _args.scale(scale, q.shape[3])
    tile = _args.tile_size(tile_size, chunk_size, stacklevel=4)
    _check(isinstance(path, str) and path in _PATHS,
           lambda: f"path must be 'auto', 'direct' or 'chunked', got {path!r}")
    shift_t = _args.shift(shift, q)
    _args.no_forward_ad(q=q, k=k, v=v, shift=shift_t)
    _check(causal or not return_state,
           lambda: "return_state needs causal=True: a non-causal output depends on future keys")
    cu = None
    if cu_seqlens is not None:
        cu = _check_cu_seqlens(cu_seqlens, q)
    S = q.shape[0] if cu is None else cu.shape[0] - 1
    if initial_state is not None:
        _check(causal, lambda: "initial_state: a carried state continues a causal sequence; "
               "causal=False attends to future keys, which a state cannot hold")
        _args.state(initial_state, q, k, v, S, "initial_state")
    # The offsets' total and a position-weighted sum: ranks given different cu_seqlens disagree.
    cu_sig = 0 if cu is None else int(cu[-1]) * 1_000_003 + int((cu * torch.arange(
        1, cu.shape[0] + 1)).sum())
    B, Hq, N, Dk = q.shape
    fields = dict(batch=B, heads_q=Hq, heads_k=k.shape[1], dim_k=Dk, dim_v=v.shape[3],
                  dtype=_DTYPES[q.dtype], causal=int(causal), center=int(center),
                  normalize=int(normalize), initial_state=int(initial_state is not None),
                  return_state=int(return_state), sequences=S, cu_seqlens=cu_sig,
                  requires_grad=int(_inputs_requiring_grad(q, k, v, shift, initial_state)),
                  scale=_float_bits(tau), eps=_float_bits(eps_v), shift=_shift_digest(shift_t),
                  path=_PATHS.index(path))
    values = shift_t.detach().cpu().tolist()
    shown = dict(scale=tau, eps=eps_v, path=path,
                 shift=values[0] if len(set(values)) == 1 else values)
    return N, fields, cu, shown, tile or None


def _comm_device(group, q):
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return q.device if isinstance(q, torch.Tensor) else torch.device("cpu")


def _handshake(group, q, local):
    """All-gathers (ok, length, fields...) and raises the same error on every rank if a rank
    rejected its input or the ranks disagree. Returns the shard lengths of all ranks."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    error = local if isinstance(local, Exception) else None
    row = torch.zeros(HANDSHAKE_INTS, dtype=torch.int64)
    if error is None:
        N, fields, _, shown, _ = local
        row[0], row[1] = 1, N
        row[2:] = torch.tensor([fields[f] for f in _AGREE])
    dev = _comm_device(group, q)
    row = row.to(dev)
    table = row.new_empty(world, row.shape[0])
    _count("all_gather", row, world)
    _all_gather(table.view(-1), row, group=group)
    table = table.cpu()
    if not bool(table[:, 0].all()):
        messages = [None] * world  # only on this error path: gather the messages as strings
        dist.all_gather_object(messages, None if error is None else str(error), group=group)
        bad = "; ".join(f"rank {r}: {m}" for r, m in enumerate(messages) if m is not None)
        raise ValueError(f"csq_ext.distributed.attention: bad input on rank(s) of the group: "
                         f"{bad} (this is rank {rank})")
    for i, name in enumerate(_AGREE):
        col = table[:, 2 + i]
        if not bool((col == col[0]).all()):
            if name in shown:  # every rank is here (the same table): gather the values shown
                values = [None] * world
                dist.all_gather_object(values, shown[name], group=group)
            else:
                values = col.tolist()
            raise ValueError(f"csq_ext.distributed.attention: the ranks must agree on {name}, "
                             f"got {values} on ranks 0..{world - 1} (every rank passes the "
                             "same options, head sizes, cu_seqlens and initial_state, and all "
                             "or none of them differentiate)")
    return table[:, 1].tolist()


# ----------------------------------------------------------------------------------------------
# The pieces of the computation
# ----------------------------------------------------------------------------------------------
def _local_state(k, v, local_cu, ref_in, tile_size):
    """This rank's state of its keys (the state-only op, csq_state: no queries, no outputs):
    (sums (S, Hk, F, Dv + 1), ref (S, Hk, Dk)), the sums relative to ref_in when given (the op
    keeps a ref_in that comes without a state), else to the ref the op picks from the rank's
    first keys (csrc/csq_params.h: its candidate for the common ref, 0 where it holds no key of
    a sequence). Differentiable, the picked ref too (its gradient reaches the picked keys)."""
    return ops.csq_state(k, v, local_cu, None, ref_in, tile_size or 0)


def _ref_candidates(ref, local_cu, k):
    """(S, Hk, Dk + 1): per sequence, this rank's candidate reference key (the ref its own
    state was taken relative to, _local_state) and, in the last column, 1 where the rank holds
    keys of it."""
    B, Hk, N, _ = k.shape
    if local_cu is None:
        has = torch.full((B, Hk, 1), float(N > 0), dtype=ref.dtype, device=ref.device)
    else:
        lengths = (local_cu[1:] - local_cu[:-1]).to(ref.device)
        has = (lengths > 0).to(ref.dtype).view(-1, 1, 1).expand(-1, Hk, 1)
    return torch.cat([ref, has], dim=-1)


def _common_state(k, v, local_cu, S, center, initial_state, group, tile_size):
    """(sums, ref): this rank's state, relative to the key every rank's sums are relative to.
    With an initial_state, its ref (rank 0's copy: the stream starts there); else with
    centering, the candidate of the first rank that holds keys of the sequence (the rank's
    own state moved to it, SQUARE.recenter); else zeros (no collective: without centering the
    sums' offset only matters for rounding). Differentiable: gathered with autograd, so the
    returned state's dependence on the keys through ref reaches them."""
    acc = _acc_dtype(k.dtype)
    Hk, Dk = k.shape[1], k.shape[3]
    if initial_state is not None or not center:
        ref = (_AllGather.apply(initial_state.ref, group)[0] if initial_state is not None
               else k.new_zeros(S, Hk, Dk, dtype=acc))
        return _local_state(k, v, local_cu, ref, tile_size)[0], ref
    sums, own = _local_state(k, v, local_cu, None, tile_size)
    cand = _AllGather.apply(_ref_candidates(own, local_cu, k), group)  # (W, S, Hk, Dk + 1)
    has = cand[..., -1] > 0
    first = has.to(torch.int64).argmax(0)                             # first rank with keys
    ref = cand[..., :-1].gather(0, first.unsqueeze(0).unsqueeze(-1).expand(1, S, Hk, Dk))[0]
    ref = ref * has.any(0).unsqueeze(-1).to(acc)                      # no keys anywhere: 0
    return SQUARE.recenter(sums, own - ref), ref


def _read_full_state(q, sums, ref, shift, tau, center, normalize, eps):
    """Non-causal read: every query of q (B, Hq, n, Dk) attends to all keys of a state
    (B, Hk, F, Dv + 1) relative to ref (B, Hk, Dk). With u = k - ref and the spec's
    b = c - tau <q, mu - ref> (mu = 0 without centering), w = (tau <q, u> + b)^2 =
    tau^2 q^T U2 q + 2 tau b <q, u> + b^2 summed against [v, 1]."""
    B, Hq, n, Dk = q.shape
    Hk, Dv1 = sums.shape[1], sums.shape[3]
    g, P = Hq // Hk, num_pairs(Dk)
    acc = sums.dtype
    s = sums.repeat_interleave(g, 1)
    pairs = SQUARE.table(Dk)[:P].to(q.device)         # the pair rows' factors x <= y < Dk
    upper = s.new_zeros(B, Hq, Dk, Dk, Dv1)
    upper[:, :, pairs[:, 0], pairs[:, 1]] = s[:, :, :P]
    sym = upper + upper.transpose(2, 3) - upper * torch.eye(Dk, dtype=acc, device=q.device)[
        :, :, None]
    lin, const = s[:, :, P:P + Dk], s[:, :, -1]       # (B, Hq, Dk, Dv1), (B, Hq, Dv1)
    if center:
        mu_rel = lin[..., -1] / const[..., -1:].clamp_min(1)
    else:
        mu_rel = -ref.repeat_interleave(g, 1)
    c = shift.to(acc).view(1, Hq, 1)
    sym_flat = sym.reshape(B, Hq, Dk, Dk * Dv1)

    def read(qc):
        qa = qc.to(acc)
        b = c - tau * (qa @ mu_rel.unsqueeze(-1)).squeeze(-1)                      # (B, Hq, m)
        quad = ((qa @ sym_flat).view(B, Hq, qa.shape[2], Dk, Dv1) * qa.unsqueeze(-1)).sum(-2)
        num = tau * tau * quad + (2 * tau * b).unsqueeze(-1) * (qa @ lin) \
            + (b * b).unsqueeze(-1) * const.unsqueeze(2)
        return num[..., :-1] / (num[..., -1:] + eps) if normalize else num[..., :-1]

    # Checkpointed chunks: autograd keeps q, not the (C, Dk, Dv + 1) products of each chunk.
    # An empty q still makes one (empty) chunk: the output must depend on the state, so that
    # every rank runs the backward of the collective that made it.
    ys = [checkpoint(read, q[:, :, i:i + _READ_CHUNK], use_reentrant=False)
          if torch.is_grad_enabled() else read(q[:, :, i:i + _READ_CHUNK])
          for i in range(0, max(n, 1), _READ_CHUNK)]
    return torch.cat(ys, dim=2)


def _read_full_packed(q, sums, ref, local_cu, shift, tau, center, normalize, eps):
    """_read_full_state for each local piece of packed sequences (q of batch size 1)."""
    lc = local_cu.tolist()
    pieces = [(s, a, b) for s, (a, b) in enumerate(zip(lc[:-1], lc[1:])) if b > a] or [(0, 0, 0)]
    return torch.cat([_read_full_state(q[:, :, a:b], sums[s:s + 1], ref[s:s + 1], shift, tau,
                                       center, normalize, eps) for s, a, b in pieces], dim=2)


# ----------------------------------------------------------------------------------------------
# The public function
# ----------------------------------------------------------------------------------------------
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group=None,
              causal: bool = True, scale: float | None = None,
              shift: float | torch.Tensor = 1.0, center: bool = True, normalize: bool = True,
              eps: float = 1e-6, tile_size: int | None = None,
              cu_seqlens: torch.Tensor | None = None, initial_state: CSQState | None = None,
              return_state: bool = False, path: str = "auto",
              chunk_size: int | None = None):
    """``csq_ext.attention`` over a sequence split across the ranks of ``group`` (default: the
    world; a single process when torch.distributed is not initialized).

    Call it on every rank of the group with the same options. Each rank passes its contiguous
    shard of the sequence, in rank order: q (B, Hq, N_r, Dk), k (B, Hk, N_r, Dk),
    v (B, Hk, N_r, Dv); shards may differ in length and may be empty. Returns this rank's
    shard of the output, equal to ``csq_ext.attention`` on the whole sequence; differentiable.

    cu_seqlens: the offsets of the whole packed batch (S + 1,), the same on every rank;
        sequences may cross rank boundaries.
    initial_state: the state before the whole sequence (causal); pass the same on every rank.
        It is read on rank 0, where its gradient arrives.
    return_state: also return the state after the whole sequence, the same on every rank
        (pass it as the next call's initial_state). Its gradient, like every output's, is
        summed over the ranks that use it: the loss is the sum of the ranks' losses.

    tile_size: the block length of the kernels (``csq_ext.attention``'s); chunk_size: its
        deprecated alias. path: the local attention's (``csq_ext.attention``'s); the same on
        every rank.

    Every rank must run the backward when one does. Bytes sent per rank: docs/distributed.md.
    """
    options = dict(causal=causal, scale=scale, shift=shift, center=center, normalize=normalize,
                   eps=eps, path=path)
    if group is None and not dist.is_initialized():
        world = 1
    else:
        world = dist.get_world_size(group)
    if world == 1:  # the whole sequence is here
        tile = _args.tile_size(tile_size, chunk_size) or None
        return _attention(q, k, v, cu_seqlens=cu_seqlens, initial_state=initial_state,
                          return_state=return_state, tile_size=tile, **options)
    rank = dist.get_rank(group)
    try:
        local = _local_fields(q, k, v, shift, scale, eps, tile_size, chunk_size, causal, center,
                              normalize, cu_seqlens, initial_state, return_state, path)
    except (ValueError, RuntimeError, TypeError) as e:
        local = e
    lengths = _handshake(group, q, local)  # raises on every rank if a rank's input is bad
    N_r, fields, cu, _, tile = local
    options["tile_size"] = tile
    offset, total = sum(lengths[:rank]), sum(lengths)
    S = fields["sequences"]
    local_cu = None
    if cu is not None:
        _check(int(cu[-1]) == total, lambda: f"cu_seqlens must end at the total length of the "
               f"shards, T = {total} (lengths {lengths}), got {int(cu[-1])}")
        local_cu = (cu - offset).clamp(0, N_r)  # on the CPU: the ops read no device memory

    sums, ref = _common_state(k, v, local_cu, S, center, initial_state, group, tile)
    if not causal:
        full = _AllReduce.apply(sums, group)
        tau, shift_t = _args.scale(scale, q.shape[3]), _args.shift(shift, q)
        if local_cu is None:
            y = _read_full_state(q, full, ref, shift_t, tau, center, normalize, eps)
        else:
            y = _read_full_packed(q, full, ref, local_cu, shift_t, tau, center, normalize, eps)
        return y.to(q.dtype)

    if initial_state is not None and rank == 0:  # the stream's start joins rank 0's piece
        sums = sums + initial_state.sums
    states = _AllGather.apply(sums, group)                          # (W, S, Hk, F, Dv + 1)
    prefix = states[:rank].sum(0)                                   # rank 0: zeros, in the graph
    if initial_state is not None and rank == 0:
        prefix = prefix + initial_state.sums
    y = _attention(q, k, v, cu_seqlens=local_cu, initial_state=CSQState(prefix, ref), **options)
    if return_state:
        return y, CSQState(states.sum(0), ref)
    return y
