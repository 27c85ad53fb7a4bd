"""The public entry point: checks its arguments, then calls the registered operator."""
from __future__ import annotations

import torch

from . import _direct  # noqa: F401  (registers the direct path's fake and autograd)
from ._cost import choose_path
from ._ops import ops
from .state import CSQState, num_features


def _check(cond: bool, message) -> None:
    # The message is a callable, formatted only on failure: formatting sizes when the check
    # passes would make torch.compile specialize on them (a recompile for every length).
    if not cond:
        raise ValueError(message())


def _validate(q, k, v, shift, eps):
    for name, t, shape in (("q", q, "(B, Hq, N, Dk)"), ("k", k, "(B, Hk, N, Dk)"),
                           ("v", v, "(B, Hk, N, Dv)")):
        _check(isinstance(t, torch.Tensor), lambda: f"{name} must be a torch.Tensor of shape {shape}")
        _check(t.dim() == 4, lambda: f"{name} must have shape {shape}, got {tuple(t.shape)}")
        _check(t.is_floating_point(),
               lambda: f"{name} must be floating point (float64, float32, bfloat16, float16), "
               f"got {t.dtype}")
    B, Hq, N, Dk = q.shape
    Hk = k.shape[1]
    _check(k.shape[0] == B and v.shape[0] == B,
           lambda: f"k and v must have batch size B = {B} like q; got k {tuple(k.shape)}, "
           f"v {tuple(v.shape)}")
    _check(k.shape[2] == N and v.shape[2] == N,
           lambda: f"k and v must have length N = {N} like q; got k {tuple(k.shape)}, "
           f"v {tuple(v.shape)}")
    _check(k.shape[3] == Dk, lambda: f"k must have shape (B, Hk, N, Dk) with Dk = {Dk} like q, "
           f"got {tuple(k.shape)}")
    _check(v.shape[1] == Hk, lambda: f"v must have shape (B, Hk, N, Dv) with Hk = {Hk} like k, "
           f"got {tuple(v.shape)}")
    _check(Hk > 0 and Hq % Hk == 0,
           lambda: f"the number of query heads Hq = {Hq} must be a multiple of the number of "
           f"key/value heads Hk = {Hk}")
    _check(Dk > 0 and v.shape[3] > 0, lambda: "head sizes Dk and Dv must be positive")
    _check(q.dtype == k.dtype == v.dtype,
           lambda: f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    _check(q.device == k.device == v.device,
           lambda: f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if isinstance(shift, torch.Tensor):
        _check(shift.shape == (Hq,),
               lambda: f"shift must be a float or a tensor of shape (Hq,) = ({Hq},), "
               f"got {tuple(shift.shape)}")
        _check(shift.is_floating_point(), lambda: f"shift must be floating point, got {shift.dtype}")
        _check(shift.device == q.device,
               lambda: f"shift must be on the device of q ({q.device}), got {shift.device}")
    _check(eps >= 0, lambda: f"eps must be >= 0, got {eps}")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _num_sequences(q, cu_seqlens) -> int:
    if cu_seqlens is None:
        return q.shape[0]
    _check(isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.dim() == 1
           and cu_seqlens.shape[0] >= 2 and cu_seqlens.dtype in (torch.int32, torch.int64),
           lambda: "cu_seqlens must be an int32 or int64 tensor of shape (S + 1,): the offsets of S "
           "packed sequences")
    _check(q.shape[0] == 1,
           lambda: f"with cu_seqlens, q, k, v must pack the sequences along N with batch size 1: "
           f"q of shape (1, Hq, T, Dk), got {tuple(q.shape)}")
    if not torch.compiler.is_compiling():  # a data-dependent check; the op checks it too
        c = cu_seqlens.cpu()
        _check(int(c[0]) == 0 and int(c[-1]) == q.shape[2] and bool((c[1:] >= c[:-1]).all()),
               lambda: f"cu_seqlens must be non-decreasing offsets from 0 to T = {q.shape[2]}")
    return cu_seqlens.shape[0] - 1


def _check_state(state, q, k, v, S, causal, name="initial_state"):
    _check(causal, lambda: f"{name}: a carried state continues a causal sequence; causal=False "
           "attends to future keys, which a state cannot hold")
    _check(isinstance(state, CSQState),
           lambda: f"{name} must be a csq_ext.CSQState (sums, ref), got {type(state).__name__}")
    Hk, Dk, Dv = k.shape[1], k.shape[3], v.shape[3]
    acc = _acc_dtype(q.dtype)
    want = (S, Hk, num_features(Dk), Dv + 1)
    _check(tuple(state.sums.shape) == want,
           lambda: f"{name}.sums must have shape (S, Hk, F, Dv + 1) = {want}, got "
           f"{tuple(state.sums.shape)}")
    _check(tuple(state.ref.shape) == (S, Hk, Dk),
           lambda: f"{name}.ref must have shape (S, Hk, Dk) = {(S, Hk, Dk)}, got "
           f"{tuple(state.ref.shape)}")
    for part in ("sums", "ref"):
        t = getattr(state, part)
        _check(t.dtype == acc, lambda: f"{name}.{part} must be {acc} for {q.dtype} inputs, got {t.dtype}")
        _check(t.device == q.device,
               lambda: f"{name}.{part} must be on the device of q ({q.device}), got {t.device}")


def _shift_tensor(shift, q):
    if isinstance(shift, torch.Tensor):
        return shift
    return torch.full((q.shape[1],), float(shift), dtype=_acc_dtype(q.dtype), device=q.device)


def _scale(scale, q) -> float:
    return float(q.shape[3] ** -0.5 if scale is None else scale)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
              scale: float | None = None, shift: float | torch.Tensor = 1.0,
              center: bool = True, normalize: bool = True, eps: float = 1e-6,
              chunk_size: int | None = None, cu_seqlens: torch.Tensor | None = None,
              initial_state: CSQState | None = None, return_state: bool = False,
              path: str = "auto"):
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
        chunk_size: internal block length: the chunk of the chunked path, the tile of the
            direct path (tuning only; the result does not depend on it).
        cu_seqlens: (S + 1,) int32/int64 offsets of S sequences packed along N (batch size 1),
            as in FlashAttention's varlen API; each attends only within itself.
        initial_state: a CSQState (causal only) that the sequences continue: the keys and
            values of their earlier pieces. Differentiable.
        return_state: also return the state after the last position.
        path: "auto" (default: the cheaper algorithm for this call, see the README's
            crossover table), "direct" (tiles of q against tiles of k, O(N^2 (Dk + Dv)); CPU,
            no carried state) or "chunked" (the state scan, O(N Dk^2 Dv)). The result is the
            same to rounding.

    Returns:
        (B, Hq, N, Dv) in the dtype of the inputs (half precision is computed in float32),
        or ``(y, state)`` with ``return_state``.

    Equivalent to ``csq_ext.reference.csq_attention_reference`` without the N x N matrix:
    time O(N Dk^2 Dv), memory O(N (Dk + Dv)) plus O(Dk^2 Dv) per head.
    """
    _validate(q, k, v, shift, eps)
    S = _num_sequences(q, cu_seqlens)
    _check(causal or not return_state,
           lambda: "return_state needs causal=True: a non-causal output depends on future keys")
    state_in = ref_in = None
    if initial_state is not None:
        _check_state(initial_state, q, k, v, S, causal)
        state_in, ref_in = initial_state.sums.contiguous(), initial_state.ref.contiguous()
    if _use_direct(path, q, k, v, causal, S, initial_state is not None or return_state):
        y = ops.csq_direct_fwd(q, k, v, _shift_tensor(shift, q), cu_seqlens, bool(causal),
                               _scale(scale, q), bool(center), bool(normalize), float(eps),
                               int(chunk_size or 0))[0]
        return y.to(q.dtype)
    y, _, _, sums, ref = ops.csq_fwd(
        q, k, v, _shift_tensor(shift, q), cu_seqlens, state_in, ref_in, bool(causal),
        _scale(scale, q), bool(center), bool(normalize), float(eps), int(chunk_size or 0),
        bool(return_state))
    y = y.to(q.dtype)  # the op computes half precision in float32
    return (y, CSQState(sums, ref)) if return_state else y


def _use_direct(path, q, k, v, causal, S, has_state) -> bool:
    """Whether this call runs the direct path: forced by ``path``, or chosen by the cost
    model."""
    _check(path in ("auto", "direct", "chunked"),
           lambda: f"path must be 'auto', 'direct' or 'chunked', got {path!r}")
    if path == "direct":
        _check(not has_state, lambda: "path='direct' does not carry a state yet: initial_state "
               "and return_state need path='chunked' (or 'auto', which picks it)")
        _check(q.device.type == "cpu", lambda: f"path='direct' has a CPU kernel only so far, got "
               f"{q.device}; use path='chunked' (or 'auto', which picks it)")
        return True
    if path == "chunked":
        return False
    return choose_path(q.shape[2], q.shape[3], v.shape[3], bool(causal), q.device.type,
                       _num_threads(), S * k.shape[1], has_state) == "direct"


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
    equal to ``attention`` over the whole sequence. ``decode_`` is the in-place variant."""
    _check(q.dim() == 4 and q.shape[2] == 1,
           lambda: f"decode takes one token per sequence: q of shape (B, Hq, 1, Dk), got "
           f"{tuple(q.shape)}")
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

    Start a sequence with ``CSQState.empty(...)`` (ref = 0) or with the state that a prefill
    ``attention(..., return_state=True)`` returned (its ref is the mean of the first keys, which
    keeps float32 sums accurate when keys share a large offset)."""
    _validate(q, k, v, shift, eps)
    _check(q.shape[2] == 1,
           lambda: f"decode_ takes one token per sequence: q of shape (B, Hq, 1, Dk), got "
           f"{tuple(q.shape)}")
    _check_state(state, q, k, v, q.shape[0], True, name="state")
    _check(q.device.type in ("cpu", "cuda"), lambda: "decode_ runs on CPU and CUDA tensors, "
           f"got {q.device} (csq_ext.decode works wherever attention does)")
    _check(state.sums.is_contiguous() and state.ref.is_contiguous(),
           lambda: "state.sums and state.ref must be contiguous for the in-place update")
    B, Hq, _, _ = q.shape
    want = (B, Hq, 1, v.shape[3])
    if out is None:
        out = q.new_empty(want)
    _check(tuple(out.shape) == want and out.dtype == q.dtype and out.is_contiguous(),
           lambda: f"out must be a contiguous {q.dtype} tensor of shape (B, Hq, 1, Dv) = {want}")
    shift_t = _shift_tensor(shift, q).to(_acc_dtype(q.dtype)).contiguous()
    with torch.no_grad():
        ops.csq_decode_(state.sums, state.ref, q, k, v, shift_t, out, _scale(scale, q),
                        bool(center), bool(normalize), float(eps))
    return out
