"""Loads the compiled operators and gives them shapes for fake tensors (torch.compile, meta).

Their autograd is registered by the library itself, in C++ (csrc/csq_autograd.cpp: the forward
ops save what the backward ops read; a double backward raises): a Python autograd wrapper cost
more than the whole operator at small N. The two algorithms' operators, csq_chunked_fwd /
csq_chunked_bwd and csq_direct_fwd / csq_direct_bwd, take the same arguments and return the
same outputs (the direct forward returns its ref only when it reads or returns a state)."""
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
