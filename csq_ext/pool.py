"""A pool of CSQ states, for serving many requests at once (docs/SPEC.md section 8).

A server keeps the states of all its running requests in one pool, ``CSQState`` tensors with
one *slot* per request: ``sums`` (P, Hk, F, Dv + 1) and ``ref`` (P, Hk, Dk), e.g.
``CSQState.empty(P, Hk, Dk, Dv)``, or views into a cache manager's pages (each slot's block
contiguous, slots any distance apart). Each step names the slot of every request it runs:

* ``pool_prefill_``: a packed batch of prompts, or of pieces of prompts (chunked prefill), each
  continuing the state in its slot and leaving its new state there;
* ``pool_decode_``: one token for each of a batch of requests, in place.

Nothing is gathered or scattered: the kernels read and write the named slots directly, and
touch no other slot. ``has_initial_state[s] = False`` starts request s from an empty state
whatever its slot holds (a slot freed by a finished request is reused without clearing).
Neither op is differentiable.
"""
from __future__ import annotations

import torch

from . import _args
from ._ops import ops
from .state import CSQState, num_features


def pool_prefill_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                  pool: CSQState, slots: torch.Tensor, *,
                  has_initial_state: torch.Tensor | None = None, scale: float | None = None,
                  shift: float | torch.Tensor = 1.0, center: bool = True,
                  normalize: bool = True, eps: float = 1e-6,
                  tile_size: int | None = None,
                  chunk_size: int | None = None) -> torch.Tensor:
    """Causal CSQ attention over S packed sequences, each continuing the state in its slot of
    ``pool`` and leaving its final state there (in place).

    Args:
        q (1, Hq, T, Dk), k (1, Hk, T, Dk), v (1, Hk, T, Dv): the sequences packed along T
            (any strides, e.g. views of a (T, H, D) projection).
        cu_seqlens: (S + 1,) int32/int64 offsets of the sequences (FlashAttention's varlen).
        pool: a ``CSQState`` of P slots, float32 (float64 for float64 inputs).
        slots: (S,) int32/int64, the slot of each sequence; distinct, in [0, P).
        has_initial_state: optional (S,) bool; False: the sequence starts from an empty state,
            its slot's contents are ignored. None: every sequence continues its slot's state
            (a slot of ``CSQState.empty`` is an empty state).
        scale, shift, center, normalize, eps, tile_size (and its deprecated alias
            chunk_size): as in ``csq_ext.attention``.

    Returns (1, Hq, T, Dv) in q's dtype: equal to ``attention(..., causal=True)`` of each
    sequence after everything its slot's state holds. Slots not named are not touched.
    """
    S = _check_common(q, k, v, pool, slots, has_initial_state)
    _args.check(cu_seqlens is not None, lambda: "cu_seqlens is required: the (S + 1,) offsets "
                "of the packed sequences")
    _args.check(_args.cu_seqlens(cu_seqlens, q) == S,
                lambda: f"slots must name one slot per sequence: cu_seqlens holds "
                f"{cu_seqlens.shape[0] - 1} sequences, slots {S}")
    tau, options = _options(q, scale, center, normalize, eps)
    shift_t = _args.shift(shift, q)
    chunk = _args.tile_size(tile_size, chunk_size)
    with torch.no_grad():
        return ops.csq_pool_prefill_(pool.sums, pool.ref, slots, has_initial_state, q, k, v,
                                     shift_t, cu_seqlens, tau, *options, chunk)


def pool_decode_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pool: CSQState,
                 slots: torch.Tensor, *, has_initial_state: torch.Tensor | None = None,
                 out: torch.Tensor | None = None, scale: float | None = None,
                 shift: float | torch.Tensor = 1.0, center: bool = True, normalize: bool = True,
                 eps: float = 1e-6) -> torch.Tensor:
    """One decoding step for B requests: token b (q (B, Hq, 1, Dk), k (B, Hk, 1, Dk),
    v (B, Hk, 1, Dv)) joins the state in slot ``slots[b]`` of ``pool`` in place, and y
    (B, Hq, 1, Dv) is written into ``out`` (allocated when None) and returned.
    ``has_initial_state``, ``pool`` and the options as in :func:`pool_prefill_`; equal to
    ``csq_ext.decode_`` on each request's state. With ``out`` and a ``shift`` tensor of the
    pool's dtype, a step allocates nothing on the device but the checked slot indices."""
    S = _check_common(q, k, v, pool, slots, has_initial_state)
    _args.one_token("pool_decode_", q, k, v)
    _args.check(q.shape[0] == S, lambda: f"slots must name one slot per request: q holds "
                f"{q.shape[0]} requests (B), slots {S}")
    tau, options = _options(q, scale, center, normalize, eps)
    shift_t = _args.shift(shift, q).to(_args.acc_dtype(q.dtype)).contiguous()
    out = _args.out(out, q, v)
    with torch.no_grad():
        ops.csq_pool_decode_(pool.sums, pool.ref, slots, has_initial_state, q, k, v, shift_t,
                             out, tau, *options)
    return out


def _options(q, scale, center, normalize, eps):
    center, normalize = _args.flag("center", center), _args.flag("normalize", normalize)
    return _args.scale(scale, q.shape[3]), (center, normalize, _args.eps(eps))


def _check_common(q, k, v, pool, slots, has_initial_state) -> int:
    """Checks what both ops take; returns S, the number of slots named."""
    _args.qkv(q, k, v)
    _args.check(q.device.type in ("cpu", "cuda"),
                lambda: f"the pool ops run on CPU and CUDA tensors, got {q.device}")
    _args.no_forward_ad(q=q, k=k, v=v)
    _check_pool(pool, q, k, v)
    S = _check_slots(slots, pool.sums.shape[0], q.device)
    if has_initial_state is not None:
        _args.check_type(isinstance(has_initial_state, torch.Tensor),
                         lambda: "has_initial_state must be None or a bool tensor of shape (S,)")
        _args.check(has_initial_state.dtype == torch.bool and has_initial_state.shape == (S,),
                    lambda: f"has_initial_state must be a bool tensor of shape (S,) = ({S},), "
                    f"got {has_initial_state.dtype} {tuple(has_initial_state.shape)}")
    return S


def _check_pool(pool, q, k, v) -> None:
    _args.check_type(isinstance(pool, CSQState),
                     lambda: "pool must be a csq_ext.CSQState (sums, ref) with one slot per "
                     "request, e.g. CSQState.empty(P, Hk, Dk, Dv)")
    Hk, Dk, Dv = k.shape[1], k.shape[3], v.shape[3]
    acc = _args.acc_dtype(q.dtype)
    shapes = {"sums": ("(P, Hk, F, Dv + 1)", (Hk, num_features(Dk), Dv + 1)),
              "ref": ("(P, Hk, Dk)", (Hk, Dk))}
    for part, (text, inner) in shapes.items():
        t = getattr(pool, part)
        _args.check_type(isinstance(t, torch.Tensor),
                         lambda: f"pool.{part} must be a torch.Tensor of shape {text}")
        _args.check(t.dim() == 1 + len(inner) and tuple(t.shape[1:]) == inner,
                    lambda: f"pool.{part} must have shape {text} = (P, "
                    f"{', '.join(map(str, inner))}), got {tuple(t.shape)}")
        _args.check(t.dtype == acc,
                    lambda: f"pool.{part} must be {acc} for {q.dtype} inputs, got {t.dtype}")
        _args.check(t.device == q.device,
                    lambda: f"pool.{part} must be on the device of q ({q.device}), got {t.device}")
        _args.check(t[0].is_contiguous() if t.shape[0] else True,
                    lambda: f"each slot of pool.{part} must be one contiguous block "
                    f"(strides (any, ..., 1)), got strides {t.stride()}")
    _args.check(pool.sums.shape[0] == pool.ref.shape[0],
                lambda: f"pool.sums and pool.ref must have the same number of slots P, got "
                f"{pool.sums.shape[0]} and {pool.ref.shape[0]}")


def _check_slots(slots, P: int, device) -> int:
    what = "an int32 or int64 tensor of shape (S,): the pool slot of each sequence"
    _args.check_type(isinstance(slots, torch.Tensor), lambda: f"slots must be {what}, got "
                     f"{type(slots).__name__}")
    _args.check(slots.dim() == 1 and slots.dtype in (torch.int32, torch.int64),
                lambda: f"slots must be {what}, got {slots.dtype} {tuple(slots.shape)}")
    _args.check(slots.device == device or slots.device.type == "cpu",
                lambda: f"slots must be on the device of q ({device}) or the CPU, got "
                f"{slots.device}")
    host = slots.cpu()
    bad = (host < 0) | (host >= P)
    _args.check(not bool(bad.any()), lambda: f"slots must be in [0, P) = [0, {P}), got "
                f"{host[bad].tolist()[:8]}")
    _args.check(host.unique().numel() == host.numel(),
                lambda: f"slots must be distinct (each sequence needs a slot of its own), got "
                f"{host.tolist()[:32]}")
    return slots.shape[0]
