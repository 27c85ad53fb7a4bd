"""Loads the compiled operators and wires them into PyTorch: shapes for fake tensors
(torch.compile, meta) and the autograd formula (the backward op)."""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loading the library registers torch.ops.csq_ext.*)

ops = torch.ops.csq_ext


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _num_features(dim_k: int) -> int:
    return dim_k * (dim_k + 1) // 2 + dim_k + 1


def _check_devices(q, *others):
    # The real kernels refuse tensors on other devices; so must their shape functions, or a
    # meta tensor among CPU tensors would return uninitialised CPU outputs.
    for t in others:
        if t is not None:
            torch._check(t.device == q.device,
                         lambda: f"csq_ext: all tensors must be on the device of q ({q.device}), "
                                 f"got {t.device}")


@torch.library.register_fake("csq_ext::csq_fwd")
def _csq_fwd_fake(q, k, v, shift, cu_seqlens, state_in, ref_in, causal, scale, center,
                  normalize, eps, chunk_size, return_state):
    _check_devices(q, k, v, shift, state_in, ref_in)
    B, Hq, N, Dk = q.shape
    Hk, Dv = k.shape[1], v.shape[-1]
    S = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    acc = _acc_dtype(q.dtype)
    y = q.new_empty((B, Hq, N, Dv), dtype=acc)
    state_shape = (S, Hk, _num_features(Dk), Dv + 1) if return_state else (0,)
    return (y, q.new_empty((B, Hq, N), dtype=acc), q.new_empty((B, Hq, N), dtype=acc),
            q.new_empty(state_shape, dtype=acc), q.new_empty((S, Hk, Dk), dtype=acc))


@torch.library.register_fake("csq_ext::csq_bwd")
def _csq_bwd_fake(dy, q, k, v, shift, cu_seqlens, state_in, ref, y, b, den, dstate_out, causal,
                  scale, center, normalize, eps, chunk_size):
    _check_devices(q, dy, k, v, shift, state_in, ref, y, b, den, dstate_out)
    # The kernels return contiguous gradients whatever the inputs' strides: say so here too.
    dstate = q.new_empty(state_in.shape if state_in is not None else (0,), dtype=ref.dtype)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            shift.new_empty(shift.shape), dstate, ref.new_empty(ref.shape))


@torch.library.register_fake("csq_ext::csq_decode_")
def _csq_decode_fake(sums, ref, q, k, v, shift, y, scale, center, normalize, eps):
    _check_devices(q, sums, ref, k, v, shift, y)
    return None


def _fwd_setup_context(ctx, inputs, output):
    (q, k, v, shift, cu_seqlens, state_in, ref_in, causal, scale, center, normalize, eps,
     chunk_size, return_state) = inputs
    y, b, den, _state_out, ref = output
    ctx.save_for_backward(q, k, v, shift, cu_seqlens, state_in, ref, y, b, den)
    ctx.has_ref_in = ref_in is not None
    ctx.options = (causal, scale, center, normalize, eps, chunk_size)


def _fwd_backward(ctx, dy, _db, _dden, dstate_out, dref_out):
    # b and den are auxiliary outputs for the backward; the public function never returns them,
    # so their incoming gradients are None or zero and are ignored.
    q, k, v, shift, cu_seqlens, state_in, ref, y, b, den = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(y)
    dq, dk, dv, dshift, dstate_in, dref = ops.csq_bwd(
        dy, q, k, v, shift, cu_seqlens, state_in, ref, y, b, den, dstate_out, *ctx.options)
    dref_in = None
    if ctx.has_ref_in:  # ref_out is ref_in passed through
        dref_in = dref if dref_out is None else dref + dref_out
    return (dq, dk, dv, dshift, None, dstate_in if state_in is not None else None, dref_in,
            None, None, None, None, None, None, None)


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
