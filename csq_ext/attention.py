"""The public entry point: checks its arguments, then calls the registered operator."""
from __future__ import annotations

import torch

from . import _args, _auto
from ._cost import choose_path
from ._ops import ops
from .state import CSQState


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
              scale: float | None = None, shift: float | torch.Tensor = 1.0,
              center: bool = True, normalize: bool = True, eps: float = 1e-6,
              tile_size: int | None = None, cu_seqlens: torch.Tensor | None = None,
              initial_state: CSQState | None = None, return_state: bool = False,
              path: str = "auto", chunk_size: int | None = None):
    """CSQ attention: ``y_i = sum_j w_ij v_j / (sum_j w_ij + eps)`` with
    ``w_ij = (scale * <q_i, k_j - mu_i> + shift)^2``, mu_i the mean of the keys query i attends
    to (``center``), over j <= i (``causal``) or all j.

    Args:
        q: (B, Hq, N, Dk). k: (B, Hk, N, Dk). v: (B, Hk, N, Dv). Hq must be a multiple of Hk
            (grouped-query heads: query head h reads key/value head h // (Hq // Hk)).
            float64, float32, bfloat16 or float16, one dtype, one device; strided views are fine.
        causal: attend to positions j <= i only.
        scale: tau, default 1 / sqrt(Dk).
        shift: c, a float or a tensor of shape (Hq,) (one per query head, differentiable).
        center: subtract from the keys the mean of the keys each query attends to.
        normalize: divide by the sum of weights plus eps; if False return the weighted sum.
        eps: added to the denominator, >= 0.
        tile_size: internal block length: the chunk of the chunked path, the tile of the
            direct path (tuning only; the result does not depend on it). None: the default.
        cu_seqlens: (S + 1,) int32/int64 offsets of S sequences packed along N (batch size 1),
            as in FlashAttention's varlen API; each attends only within itself.
        initial_state: a CSQState (causal only) that the sequences continue: the keys and
            values of their earlier pieces. Differentiable. Its dtype is the accumulation
            dtype, or float64 for any inputs: a float64 state keeps float64 sums (the call
            then computes in float64), for streams whose keys spread far beyond their norm
            (docs/SPEC.md, section 6); start one with CSQState.empty(..., dtype=torch.float64).
        return_state: also return the state after the last position.
        path: "auto" (default: the cheaper algorithm for this call, see docs/performance.md's
            crossover table), "direct" (tiles of q against tiles of k, O(N^2 (Dk + Dv)), plus
            O(N Dk^2 Dv) to read a carried state or build the returned one; CPU and CUDA) or
            "chunked" (the state scan, O(N Dk^2 Dv)). The result is the same to rounding.
        chunk_size: deprecated alias of tile_size (a DeprecationWarning; not both).

    Returns:
        (B, Hq, N, Dv) in the dtype of the inputs (half precision is computed in float32),
        or ``(y, state)`` with ``return_state``.

    Equivalent to ``csq_ext.reference.csq_attention_reference`` (docs/SPEC.md) without the
    N x N matrix: time O(N Dk^2 Dv) on the chunked path, O(N^2 (Dk + Dv)) on the direct one;
    memory O(N (Dk + Dv)) plus O(Dk^2 Dv) per head.
    """
    _args.qkv(q, k, v)
    options = dict(causal=_args.flag("causal", causal), center=_args.flag("center", center),
                   normalize=_args.flag("normalize", normalize), eps=_args.eps(eps),
                   scale=_args.scale(scale, q.shape[3]))
    shift_t = _args.shift(shift, q)
    tile = _args.tile_size(tile_size, chunk_size)
    _args.flag("return_state", return_state)
    _args.no_forward_ad(q=q, k=k, v=v, shift=shift_t)
    _args.no_functorch_grad()
    S, cu = _args.packed_sequences(cu_seqlens, q)
    _args.check(causal or not return_state,
                lambda: "return_state needs causal=True: a non-causal output depends on future keys")
    state_in = ref_in = None
    if initial_state is not None:
        _args.check(causal, lambda: "initial_state: a carried state continues a causal sequence; "
                    "causal=False attends to future keys, which a state cannot hold")
        _args.state(initial_state, q, k, v, S, "initial_state", wide=True)
        _args.no_forward_ad(**{"initial_state.sums": initial_state.sums,
                               "initial_state.ref": initial_state.ref})
        if _args.wide_state(initial_state, q):  # the call in float64, y back in q's dtype
            out = attention(*(t.double() for t in (q, k, v)), causal=causal, scale=scale,
                            shift=shift.double() if isinstance(shift, torch.Tensor) else shift,
                            center=center, normalize=normalize, eps=eps, tile_size=tile or None,
                            cu_seqlens=cu_seqlens, initial_state=initial_state,
                            return_state=return_state, path=path)
            return (out[0].to(q.dtype), out[1]) if return_state else out.to(q.dtype)
        state_in, ref_in = initial_state.sums.contiguous(), initial_state.ref.contiguous()
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, shift_t, state_in, ref_in))
    path = _path(path, q, k, v, causal, S, cu is not None, initial_state is not None,
                 return_state, grad)
    if path == "in graph":
        y = _auto.auto_fwd(q, k, v, shift_t, cu, options["causal"], options["scale"],
                           options["center"], options["normalize"], options["eps"], tile,
                           grad)[0]
        return y if y.dtype == q.dtype else y.to(q.dtype)
    # Both algorithms' ops take the same arguments and carry the same states.
    op = ops.csq_direct_fwd if path == "direct" else ops.csq_chunked_fwd
    y, _, _, sums, ref = op(q, k, v, shift_t, cu, state_in, ref_in, options["causal"],
                            options["scale"], options["center"], options["normalize"],
                            options["eps"], tile, return_state)
    y = y if y.dtype == q.dtype else y.to(q.dtype)  # half precision is computed in float32
    return (y, CSQState(sums, ref)) if return_state else y


def _path(path, q, k, v, causal, S, packed, reads_state, returns_state, grad) -> str:
    """The path this call runs: "direct" or "chunked", forced by ``path`` or chosen by the
    cost model (``grad``: a backward will follow), or "in graph": under torch.compile, the
    automatic choice of a call without states is csq_ext::auto_fwd's, made when the graph
    runs, so that one graph serves every N (csq_ext/_auto.py)."""
    _args.check(isinstance(path, str) and path in ("auto", "direct", "chunked"),
                lambda: f"path must be 'auto', 'direct' or 'chunked', got {path!r}")
    if path == "direct":
        _args.check(q.device.type in ("cpu", "cuda"), lambda: f"path='direct' has CPU and CUDA "
                    f"kernels only, got {q.device}; use path='chunked' (or 'auto', which picks "
                    f"it)")
        return path
    if path == "chunked":
        return path
    if (torch.compiler.is_compiling() and q.device.type in ("cpu", "cuda")
            and not (reads_state or returns_state)):
        return "in graph"
    return choose_path(q.shape[2], q.shape[3], v.shape[3], bool(causal), q.device.type,
                       _num_threads(), S * k.shape[1], reads_state, returns_state, packed, grad,
                       measure=True)


@torch.compiler.assume_constant_result
def _num_threads() -> int:
    # A constant to torch.compile (which cannot trace torch.get_num_threads): a compiled
    # graph keeps the choice made for the thread count it was traced with.
    return torch.get_num_threads()


def decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: CSQState, *,
           scale: float | None = None, shift: float | torch.Tensor = 1.0, center: bool = True,
           normalize: bool = True, eps: float = 1e-6):
    """One decoding step: q (B, Hq, 1, Dk), k (B, Hk, 1, Dk), v (B, Hk, 1, Dv) for the next
    token of each sequence, and the state of everything before it. Returns ``(y, new_state)``
    with y (B, Hq, 1, Dv); differentiable. Costs O(Dk^2 Dv) per head whatever the position;
    equal to ``attention`` over the whole sequence. ``decode_`` is the in-place variant.
    ``state`` is required: start a sequence with ``CSQState.empty(...)``."""
    _args.qkv(q, k, v)
    _args.one_token("decode", q, k, v)
    _args.state(state, q, k, v, q.shape[0], "state", wide=True)
    return attention(q, k, v, causal=True, scale=scale, shift=shift, center=center,
                     normalize=normalize, eps=eps, initial_state=state, return_state=True)


def decode_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: CSQState, *,
            out: torch.Tensor | None = None, scale: float | None = None,
            shift: float | torch.Tensor = 1.0, center: bool = True, normalize: bool = True,
            eps: float = 1e-6) -> torch.Tensor:
    """In-place decoding step for serving: adds the token to ``state.sums`` in place and writes
    y into ``out`` (B, Hq, 1, Dv). Not differentiable. With ``out`` given and ``shift`` a
    tensor (Hq,) of the state's dtype, a step allocates nothing (a float shift costs one
    small tensor per call).

    Start a sequence with ``CSQState.empty(...)`` or with the state that a prefill
    ``attention(..., return_state=True)`` returned. A state that holds no key yet (count 0)
    takes the first key as its ``ref`` (written into ``state.ref``), as a prefill picks its
    ref from the first keys: that keeps float32 sums accurate when keys share a large offset."""
    _args.qkv(q, k, v)
    _args.one_token("decode_", q, k, v)
    _args.state(state, q, k, v, q.shape[0], "state", wide=True)
    if _args.wide_state(state, q):  # the step in float64, y into q's dtype
        y = decode_(*(t.double() for t in (q, k, v)), state, scale=scale,
                    shift=shift.double() if isinstance(shift, torch.Tensor) else shift,
                    center=center, normalize=normalize, eps=eps)
        return _args.out(out, q, v).copy_(y)
    _args.check(q.device.type in ("cpu", "cuda"), lambda: "decode_ runs on CPU and CUDA tensors, "
                f"got {q.device} (csq_ext.decode works wherever attention does)")
    _args.check(state.sums.is_contiguous() and state.ref.is_contiguous(),
                lambda: "state.sums and state.ref must be contiguous for the in-place update")
    center, normalize = _args.flag("center", center), _args.flag("normalize", normalize)
    tau, eps = _args.scale(scale, q.shape[3]), _args.eps(eps)
    shift_t = _args.shift(shift, q).to(_args.acc_dtype(q.dtype)).contiguous()
    out = _args.out(out, q, v)
    _args.no_forward_ad(q=q, k=k, v=v, shift=shift_t, **{"state.sums": state.sums})
    with torch.no_grad():
        ops.csq_decode_(state.sums, state.ref, q, k, v, shift_t, out, tau, center, normalize, eps)
    return out
