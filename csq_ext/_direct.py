"""Wires the direct path's operators into PyTorch: shapes for fake tensors (torch.compile,
meta) and the autograd formula (csq_direct_bwd). The path itself is chosen in attention.py
(csq_ext/_cost.py says which is cheaper)."""
from __future__ import annotations

import torch

from ._ops import _acc_dtype, _bwd_backward, _bwd_setup_context, _check_devices, ops


@torch.library.register_fake("csq_ext::csq_direct_fwd")
def _direct_fwd_fake(q, k, v, shift, cu_seqlens, row_shift, row_sums, causal, scale, center,
                     normalize, eps, tile_size):
    _check_devices(q, k, v, shift, *(t for t in (row_shift, row_sums) if t is not None))
    B, Hq, N, _ = q.shape
    acc = _acc_dtype(q.dtype)
    return (q.new_empty((B, Hq, N, v.shape[-1]), dtype=acc), q.new_empty((B, Hq, N), dtype=acc),
            q.new_empty((B, Hq, N), dtype=acc))


@torch.library.register_fake("csq_ext::csq_direct_bwd")
def _direct_bwd_fake(dy, q, k, v, shift, cu_seqlens, y, b, den, causal, scale, center,
                     normalize, eps, tile_size):
    _check_devices(q, dy, k, v, shift, y, b, den)
    # The kernel returns contiguous gradients whatever the inputs' strides.
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            shift.new_empty(shift.shape), b.new_empty(b.shape))


def _setup_context(ctx, inputs, output):
    (q, k, v, shift, cu_seqlens, row_shift, row_sums, causal, scale, center, normalize, eps,
     tile_size) = inputs
    y, b, den = output
    ctx.save_for_backward(q, k, v, shift, cu_seqlens, y, b, den)
    ctx.options = (causal, scale, center, normalize, eps, tile_size)
    ctx.row_dtypes = tuple(None if t is None else t.dtype for t in (row_shift, row_sums))


def _backward(ctx, dy, _db, _dden):
    # b and den are saved for the backward only; their incoming gradients are ignored.
    q, k, v, shift, cu_seqlens, y, b, den = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(y)
    dq, dk, dv, dshift, db = ops.csq_direct_bwd(dy, q, k, v, shift, cu_seqlens, y, b, den,
                                                *ctx.options)
    shift_dtype, sums_dtype = ctx.row_dtypes
    # row_shift enters b_i as the head's shift does; row_sums enters [num | den], whose
    # gradient is [dy / (den + eps), -<dy, y> / (den + eps)] when normalizing, [dy, 0] if not.
    drow_shift = None if shift_dtype is None else db.to(shift_dtype)
    drow_sums = None
    if sums_dtype is not None:
        normalize, eps = ctx.options[3], ctx.options[4]
        if normalize:
            inv = 1.0 / (den + eps)
            dnum = dy.to(y.dtype) * inv[..., None]
            dden = -(dnum * y).sum(-1, keepdim=True)
        else:
            dnum, dden = dy.to(y.dtype), torch.zeros_like(den)[..., None]
        drow_sums = torch.cat([dnum, dden], -1).to(sums_dtype)
    return (dq, dk, dv, dshift, None, drow_shift, drow_sums, None, None, None, None, None,
            None)


torch.library.register_autograd("csq_ext::csq_direct_fwd", _backward,
                                setup_context=_setup_context)


# Double backward is refused with the chunked path's message.
torch.library.register_autograd("csq_ext::csq_direct_bwd", _bwd_backward,
                                setup_context=_bwd_setup_context)
