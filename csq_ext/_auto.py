"""The automatic choice between the two paths as one operator, for torch.compile.

Eager calls choose in Python (csq_ext/_cost.py) and call the chosen path's operator. A
compiled graph cannot do that without a guard on N: a Python branch on the cost model's
comparison makes dynamo recompile on each side of the crossover. ``csq_ext::auto_fwd`` makes
the same choice inside the operator, at run time, for the N at hand, so one graph serves
every N. Its backward, ``csq_ext::auto_bwd``, runs the backward of the path the forward ran
(which the forward returns as a 0-dim tensor, so a change of thread count between the two
cannot mix them up).

Only calls without a carried or returned state take it; those keep the Python choice and a
graph per side of the crossover (docs/compile.md).
"""
from __future__ import annotations

from typing import Optional

import torch

from ._args import acc_dtype
from ._cost import choose_path
from ._ops import _check_devices, ops


def _sequences(q, cu_seqlens) -> int:
    return q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


@torch.library.custom_op("csq_ext::auto_fwd", mutates_args=())
def auto_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shift: torch.Tensor,
             cu_seqlens: Optional[torch.Tensor], causal: bool, scale: float, center: bool,
             normalize: bool, eps: float, chunk: int,
             grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                  torch.Tensor]:
    """(y, b, den, ref, path) of the path the cost model picks for this call (``grad``: a
    backward will follow); path is 1 for the direct path, 0 for the chunked one (on the CPU),
    ref the chunked path's (zeros for the direct path, whose backward does not read it)."""
    S, Hk = _sequences(q, cu_seqlens), k.shape[1]
    # The calibrated rates where they were measured, else the shipped ones: a measurement
    # (forward and backward runs) cannot run inside an operator, where autograd is off.
    direct = choose_path(q.shape[2], q.shape[3], v.shape[3], causal, q.device.type,
                         torch.get_num_threads(), S * Hk, packed=cu_seqlens is not None,
                         grad=grad, measure=False) == "direct"
    # Both ops take the same arguments; the direct one returns no ref without a state (its
    # backward takes an empty one back), so this op returns zeros of the ref's shape for it.
    op = ops.csq_direct_fwd if direct else ops.csq_chunked_fwd
    y, b, den, _, ref = op(q, k, v, shift, cu_seqlens, None, None, causal, scale, center,
                           normalize, eps, chunk, False)
    if direct:
        ref = q.new_zeros((S, Hk, q.shape[3]), dtype=acc_dtype(q.dtype))
    return y, b, den, ref, torch.tensor(int(direct))


@auto_fwd.register_fake
def _auto_fwd_fake(q, k, v, shift, cu_seqlens, causal, scale, center, normalize, eps, chunk,
                   grad):
    _check_devices(q, k, v, shift)
    B, Hq, N, Dk = q.shape
    acc = acc_dtype(q.dtype)
    return (q.new_empty((B, Hq, N, v.shape[3]), dtype=acc), q.new_empty((B, Hq, N), dtype=acc),
            q.new_empty((B, Hq, N), dtype=acc),
            q.new_empty((_sequences(q, cu_seqlens), k.shape[1], Dk), dtype=acc),
            torch.empty((), dtype=torch.int64))


@torch.library.custom_op("csq_ext::auto_bwd", mutates_args=())
def auto_bwd(dy: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             shift: torch.Tensor, cu_seqlens: Optional[torch.Tensor], y: torch.Tensor,
             b: torch.Tensor, den: torch.Tensor, ref: torch.Tensor, path: torch.Tensor,
             causal: bool, scale: float, center: bool, normalize: bool, eps: float,
             chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv, dshift through the path auto_fwd ran."""
    options = (causal, scale, center, normalize, eps, chunk)
    direct = bool(int(path))
    op = ops.csq_direct_bwd if direct else ops.csq_chunked_bwd
    ref = ref.new_empty((0,)) if direct else ref  # the direct forward's empty ref
    return tuple(op(dy, q, k, v, shift, cu_seqlens, None, ref, y, b, den, None, None, True,
                    *options)[:4])


@auto_bwd.register_fake
def _auto_bwd_fake(dy, q, k, v, shift, cu_seqlens, y, b, den, ref, path, causal, scale, center,
                   normalize, eps, chunk):
    _check_devices(q, dy, k, v, shift, y, b, den, ref)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            shift.new_empty(shift.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, shift, cu_seqlens, causal, scale, center, normalize, eps, chunk, _grad = inputs
    y, b, den, ref, path = output
    ctx.save_for_backward(q, k, v, shift, cu_seqlens, y, b, den, ref, path)
    ctx.options = (causal, scale, center, normalize, eps, chunk)
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, _db, _dden, _dref, _dpath):
    # b, den, ref and path are the backward's; only y is the caller's.
    q, k, v, shift, cu_seqlens, y, b, den, ref, path = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(y)
    dq, dk, dv, dshift = auto_bwd(dy, q, k, v, shift, cu_seqlens, y, b, den, ref, path,
                                  *ctx.options)
    return dq, dk, dv, dshift, None, None, None, None, None, None, None, None


def _no_double_backward(ctx, *grads):
    # The message of the compiled ops' double backward (csrc/csq_autograd.cpp).
    raise RuntimeError(
        "csq_ext.attention does not support double backward (gradients of gradients). "
        "Use the reference implementation csq_ext.reference.csq_attention_reference "
        "for higher-order derivatives.")


auto_fwd.register_autograd(_backward, setup_context=_setup_context)
auto_bwd.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)
