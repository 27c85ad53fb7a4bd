"""Loads the compiled operators and wires them into PyTorch: shapes for fake tensors
(torch.compile, meta) and the autograd formulas (the backward ops).

The two algorithms' operators, csq_chunked_fwd / csq_chunked_bwd and csq_direct_fwd /
csq_direct_bwd, take the same arguments and return the same outputs (the direct forward returns
its ref only when it reads or returns a state), so one autograd formula serves both. The
state-only operator csq_state / csq_state_bwd has its own. Which ref a sequence's sums are
relative to, and where a picked ref's gradient goes, is decided by the operators
(csrc/csq_params.h); Python only passes gradients along."""
from __future__ import annotations

import os

import torch

from . import _C  # noqa: F401  (loading the library registers torch.ops.csq_ext.*)
from ._args import acc_dtype as _acc_dtype
from .state import num_features as _num_features

ops = torch.ops.csq_ext

# Which library runs the CPU kernels' float32 products (csrc/cpu/csq_gemm_choice.cpp reads it;
# unset or "auto": measured once per process). Refused here, by name, rather than ignored there.
if os.environ.get("CSQ_CPU_GEMM", "auto") not in ("auto", "microkernel", "blas"):
    raise ValueError(f"CSQ_CPU_GEMM must be 'auto', 'microkernel' or 'blas', got "
                     f"{os.environ['CSQ_CPU_GEMM']!r}")


def _check_devices(q, *others):
    # The real kernels refuse tensors on other devices; so must their shape functions, or a
    # meta tensor among CPU tensors would return uninitialised CPU outputs.
    for t in others:
        if t is not None:
            torch._check(t.device == q.device,
                         lambda: f"csq_ext: all tensors must be on the device of q ({q.device}), "
                                 f"got {t.device}")


def _num_sequences(k, cu_seqlens):
    return k.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


def _state_fakes(k, v, cu_seqlens, returns, with_ref):
    """The fake state_out (S, Hk, F, Dv + 1) and ref (S, Hk, Dk), or empty tensors."""
    S, (Hk, Dk), Dv = _num_sequences(k, cu_seqlens), (k.shape[1], k.shape[3]), v.shape[-1]
    acc = _acc_dtype(k.dtype)
    state_shape = (S, Hk, _num_features(Dk), Dv + 1) if returns else (0,)
    return (k.new_empty(state_shape, dtype=acc),
            k.new_empty((S, Hk, Dk) if with_ref else (0,), dtype=acc))


def _fwd_fake(q, k, v, shift, cu_seqlens, state_in, ref_in, return_state, with_ref):
    _check_devices(q, k, v, shift, state_in, ref_in)
    B, Hq, N, _ = q.shape
    acc = _acc_dtype(q.dtype)
    y = q.new_empty((B, Hq, N, v.shape[-1]), dtype=acc)
    return (y, q.new_empty((B, Hq, N), dtype=acc), q.new_empty((B, Hq, N), dtype=acc),
            *_state_fakes(k, v, cu_seqlens, return_state, with_ref))


@torch.library.register_fake("csq_ext::csq_chunked_fwd")
def _chunked_fwd_fake(q, k, v, shift, cu_seqlens, state_in, ref_in, causal, scale, center,
                      normalize, eps, tile_size, return_state):
    return _fwd_fake(q, k, v, shift, cu_seqlens, state_in, ref_in, return_state, True)


@torch.library.register_fake("csq_ext::csq_direct_fwd")
def _direct_fwd_fake(q, k, v, shift, cu_seqlens, state_in, ref_in, causal, scale, center,
                     normalize, eps, tile_size, return_state):
    return _fwd_fake(q, k, v, shift, cu_seqlens, state_in, ref_in, return_state,
                     return_state or state_in is not None)


def _bwd_fake(dy, q, k, v, shift, cu_seqlens, state_in, ref, y, b, den, dstate_out, dref_out,
              ref_given, causal, scale, center, normalize, eps, tile_size):
    _check_devices(q, dy, k, v, shift, state_in, ref, y, b, den, dstate_out, dref_out)
    # The kernels return contiguous gradients whatever the inputs' strides: say so here too.
    dstate = q.new_empty(state_in.shape if state_in is not None else (0,), dtype=ref.dtype)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            shift.new_empty(shift.shape), dstate, ref.new_empty(ref.shape))


torch.library.register_fake("csq_ext::csq_chunked_bwd")(_bwd_fake)
torch.library.register_fake("csq_ext::csq_direct_bwd")(_bwd_fake)


@torch.library.register_fake("csq_ext::csq_state")
def _state_fake(k, v, cu_seqlens, state_in, ref_in, tile_size):
    _check_devices(k, v, state_in, ref_in)
    return _state_fakes(k, v, cu_seqlens, True, True)


@torch.library.register_fake("csq_ext::csq_state_bwd")
def _state_bwd_fake(k, v, cu_seqlens, state_in, ref, dstate_out, dref_out, ref_given,
                    tile_size):
    _check_devices(k, v, state_in, ref, dstate_out, dref_out)
    dstate = k.new_empty(state_in.shape if state_in is not None else (0,), dtype=ref.dtype)
    return k.new_empty(k.shape), v.new_empty(v.shape), dstate, ref.new_empty(ref.shape)


@torch.library.register_fake("csq_ext::csq_decode_")
def _csq_decode_fake(sums, ref, q, k, v, shift, y, scale, center, normalize, eps):
    _check_devices(q, sums, ref, k, v, shift, y)
    return None


@torch.library.register_fake("csq_ext::csq_pool_prefill_")
def _csq_pool_prefill_fake(sums, ref, slots, has_initial_state, q, k, v, shift, cu_seqlens,
                           scale, center, normalize, eps, tile_size):
    _check_devices(q, sums, ref, k, v, shift)
    return q.new_empty((1, q.shape[1], q.shape[2], v.shape[-1]))


@torch.library.register_fake("csq_ext::csq_pool_decode_")
def _csq_pool_decode_fake(sums, ref, slots, has_initial_state, q, k, v, shift, y, scale, center,
                          normalize, eps):
    _check_devices(q, sums, ref, k, v, shift, y)
    return None


def _fwd_setup_context(ctx, inputs, output):
    (q, k, v, shift, cu_seqlens, state_in, ref_in, causal, scale, center, normalize, eps,
     tile_size, return_state) = inputs
    y, b, den, _state_out, ref = output
    # Outputs the loss does not use arrive as None, not zeros: the returned state and ref
    # are unused by most callers, and only a used one may pass the ref's gradient on to the
    # keys it was picked from (_fwd_backward), where a NaN after them would otherwise reach
    # them too.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, shift, cu_seqlens, state_in, ref, y, b, den)
    ctx.has_ref_in = ref_in is not None
    ctx.options = (causal, scale, center, normalize, eps, tile_size)


def _backward_with(bwd_op):
    def backward(ctx, dy, _db, _dden, dstate_out, dref_out):
        # b and den are auxiliary outputs for the backward; the public function never returns
        # them, so their incoming gradients are None or zero and are ignored.
        q, k, v, shift, cu_seqlens, state_in, ref, y, b, den = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(y)
        # dref_in: the gradient of ref_in where the op kept it (0 where it picked its own ref
        # from the keys: dk holds that part).
        dq, dk, dv, dshift, dstate_in, dref_in = bwd_op(
            dy, q, k, v, shift, cu_seqlens, state_in, ref, y, b, den, dstate_out, dref_out,
            ctx.has_ref_in, *ctx.options)
        return (dq, dk, dv, dshift, None, dstate_in if state_in is not None else None,
                dref_in if ctx.has_ref_in else None, None, None, None, None, None, None, None)
    return backward


torch.library.register_autograd("csq_ext::csq_chunked_fwd", _backward_with(ops.csq_chunked_bwd),
                                setup_context=_fwd_setup_context)
torch.library.register_autograd("csq_ext::csq_direct_fwd", _backward_with(ops.csq_direct_bwd),
                                setup_context=_fwd_setup_context)


def _state_setup_context(ctx, inputs, output):
    k, v, cu_seqlens, state_in, ref_in, tile_size = inputs
    ctx.save_for_backward(k, v, cu_seqlens, state_in, output[1])
    ctx.has_ref_in = ref_in is not None
    ctx.tile_size = tile_size


def _state_backward(ctx, dstate_out, dref_out):
    k, v, cu_seqlens, state_in, ref = ctx.saved_tensors
    dk, dv, dstate_in, dref_in = ops.csq_state_bwd(k, v, cu_seqlens, state_in, ref, dstate_out,
                                                   dref_out, ctx.has_ref_in, ctx.tile_size)
    return (dk, dv, None, dstate_in if state_in is not None else None,
            dref_in if ctx.has_ref_in else None, None)


torch.library.register_autograd("csq_ext::csq_state", _state_backward,
                                setup_context=_state_setup_context)


def _bwd_setup_context(ctx, inputs, output):
    pass


def _bwd_backward(ctx, *grads):
    raise RuntimeError(
        "csq_ext.attention does not support double backward (gradients of gradients). "
        "Use the reference implementation csq_ext.reference.csq_attention_reference "
        "for higher-order derivatives.")


for _name in ("csq_chunked_bwd", "csq_direct_bwd", "csq_state_bwd"):
    torch.library.register_autograd(f"csq_ext::{_name}", _bwd_backward,
                                    setup_context=_bwd_setup_context)
