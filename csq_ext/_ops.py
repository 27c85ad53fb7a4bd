"""Loads the compiled operators and wires them into PyTorch: shapes for fake tensors
(torch.compile, meta) and the autograd formula (the backward op)."""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loading the library registers torch.ops.csq_ext.*)

ops = torch.ops.csq_ext


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("csq_ext::csq_fwd")
def _csq_fwd_fake(q, k, v, shift, causal, scale, center, normalize, eps, chunk_size):
    B, Hq, N, _ = q.shape
    acc = _acc_dtype(q.dtype)
    y = q.new_empty((B, Hq, N, v.shape[-1]))
    return y, q.new_empty((B, Hq, N), dtype=acc), q.new_empty((B, Hq, N), dtype=acc)


@torch.library.register_fake("csq_ext::csq_bwd")
def _csq_bwd_fake(dy, q, k, v, shift, y, b, den, causal, scale, center, normalize, eps,
                  chunk_size):
    # The kernels return contiguous gradients whatever the inputs' strides: say so here too.
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), shift.new_empty(shift.shape)


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, shift, causal, scale, center, normalize, eps, chunk_size = inputs
    y, b, den = output
    ctx.save_for_backward(q, k, v, shift, y, b, den)
    ctx.options = (causal, scale, center, normalize, eps, chunk_size)


def _fwd_backward(ctx, dy, _db, _dden):
    # b and den are auxiliary outputs for the backward; the public function never returns them,
    # so their incoming gradients are None or zero and are ignored.
    q, k, v, shift, y, b, den = ctx.saved_tensors
    dq, dk, dv, dshift = ops.csq_bwd(dy, q, k, v, shift, y, b, den, *ctx.options)
    return dq, dk, dv, dshift, None, None, None, None, None, None


torch.library.register_autograd("csq_ext::csq_fwd", _fwd_backward,
                                setup_context=_fwd_setup_context)


def _bwd_setup_context(ctx, inputs, output):
    pass


def _bwd_backward(ctx, *grads):
    raise RuntimeError(
        "csq_ext.attention does not support double backward (gradients of gradients). "
        "Use the reference implementation csq_ext.reference.csq_attention_reference "
        "for higher-order derivatives.")


torch.library.register_autograd("csq_ext::csq_bwd", _bwd_backward,
                                setup_context=_bwd_setup_context)
