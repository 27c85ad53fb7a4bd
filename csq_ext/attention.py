"""The public entry point: checks its arguments, then calls the registered operator."""
from __future__ import annotations

import torch

from ._ops import ops


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _validate(q, k, v, shift, eps):
    for name, t, shape in (("q", q, "(B, Hq, N, Dk)"), ("k", k, "(B, Hk, N, Dk)"),
                           ("v", v, "(B, Hk, N, Dv)")):
        _check(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor of shape {shape}")
        _check(t.dim() == 4, f"{name} must have shape {shape}, got {tuple(t.shape)}")
        _check(t.is_floating_point(),
               f"{name} must be floating point (float64, float32, bfloat16, float16), "
               f"got {t.dtype}")
    B, Hq, N, Dk = q.shape
    Hk = k.shape[1]
    _check(k.shape[0] == B and v.shape[0] == B,
           f"k and v must have batch size B = {B} like q; got k {tuple(k.shape)}, "
           f"v {tuple(v.shape)}")
    _check(k.shape[2] == N and v.shape[2] == N,
           f"k and v must have length N = {N} like q; got k {tuple(k.shape)}, "
           f"v {tuple(v.shape)}")
    _check(k.shape[3] == Dk, f"k must have shape (B, Hk, N, Dk) with Dk = {Dk} like q, "
           f"got {tuple(k.shape)}")
    _check(v.shape[1] == Hk, f"v must have shape (B, Hk, N, Dv) with Hk = {Hk} like k, "
           f"got {tuple(v.shape)}")
    _check(Hk > 0 and Hq % Hk == 0,
           f"the number of query heads Hq = {Hq} must be a multiple of the number of "
           f"key/value heads Hk = {Hk}")
    _check(Dk > 0 and v.shape[3] > 0, "head sizes Dk and Dv must be positive")
    _check(q.dtype == k.dtype == v.dtype,
           f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    _check(q.device == k.device == v.device,
           f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if isinstance(shift, torch.Tensor):
        _check(shift.shape == (Hq,),
               f"shift must be a float or a tensor of shape (Hq,) = ({Hq},), "
               f"got {tuple(shift.shape)}")
        _check(shift.is_floating_point(), f"shift must be floating point, got {shift.dtype}")
        _check(shift.device == q.device,
               f"shift must be on the device of q ({q.device}), got {shift.device}")
    _check(eps >= 0, f"eps must be >= 0, got {eps}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
              scale: float | None = None, shift: float | torch.Tensor = 1.0,
              center: bool = True, normalize: bool = True, eps: float = 1e-6,
              chunk_size: int | None = None) -> torch.Tensor:
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
        chunk_size: internal chunk length (tuning only; the result does not depend on it).

    Returns:
        (B, Hq, N, Dv) in the dtype of the inputs. Half precision is computed in float32.

    Equivalent to ``csq_ext.reference.csq_attention_reference`` without the N x N matrix:
    time O(N Dk^2 Dv), memory O(N (Dk + Dv)) plus O(Dk^2 Dv) per head.
    """
    _validate(q, k, v, shift, eps)
    Hq, Dk = q.shape[1], q.shape[3]
    tau = float(Dk ** -0.5 if scale is None else scale)
    if not isinstance(shift, torch.Tensor):
        shift = torch.full((Hq,), float(shift), dtype=torch.float32 if q.dtype != torch.float64
                           else torch.float64, device=q.device)
    y, _, _ = ops.csq_fwd(q, k, v, shift, bool(causal), tau, bool(center), bool(normalize),
                          float(eps), int(chunk_size or 0))
    return y
