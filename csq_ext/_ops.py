"""Loads the compiled operators and wires them into PyTorch: shapes for fake tensors
(torch.compile, meta) and the autograd formula (the backward op)."""
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


@torch.library.register_fake("csq_ext::csq_pool_prefill_")
def _csq_pool_prefill_fake(sums, ref, slots, has_initial_state, q, k, v, shift, cu_seqlens,
                           scale, center, normalize, eps, chunk_size):
    _check_devices(q, sums, ref, k, v, shift)
    return q.new_empty((1, q.shape[1], q.shape[2], v.shape[-1]))


@torch.library.register_fake("csq_ext::csq_pool_decode_")
def _csq_pool_decode_fake(sums, ref, slots, has_initial_state, q, k, v, shift, y, scale, center,
                          normalize, eps):
    _check_devices(q, sums, ref, k, v, shift, y)
    return None


def _fwd_setup_context(ctx, inputs, output):
    (q, k, v, shift, cu_seqlens, state_in, ref_in, causal, scale, center, normalize, eps,
     chunk_size, return_state) = inputs
    y, b, den, _state_out, ref = output
    ctx.save_for_backward(q, k, v, shift, cu_seqlens, state_in, ref, y, b, den)
    ctx.has_ref_in = ref_in is not None
    ctx.options = (causal, scale, center, normalize, eps, chunk_size)


# How many leading keys of a sequence its ref is picked from (kRefKeys in csrc/csq_params.h).
_REF_KEYS = 64


def _ref_picked_from_keys(state_in, cu_seqlens, N, device):
    """(S, Hk) or (S, 1) bool: where the op picked ref from the sequence's keys (the median of
    its first keys) rather than taking the carried state's: no carried state, or one that holds
    no key (count 0), and a sequence with keys (csrc/csq_params.h)."""
    lens = (torch.full((1,), N) if cu_seqlens is None else (cu_seqlens[1:] - cu_seqlens[:-1]))
    has_keys = (lens > 0).view(-1, 1).to(device)
    if state_in is None:
        return has_keys
    return has_keys & (state_in[..., -1, -1] == 0)


def first_keys(k, cu_seqlens):
    """Each sequence's first keys, those the op picks its ref from: ``(keys, valid, pos)`` with
    keys (S, Hk, m, D) in k's dtype, valid (S, m) bool (False past a sequence's end) and pos
    (S, m) their positions along N. Without cu_seqlens S = B and m = min(N, _REF_KEYS), all
    valid; with it m = _REF_KEYS. Indexing keeps keys differentiable with respect to k."""
    B, Hk, N, D = k.shape
    if cu_seqlens is None:
        m = min(N, _REF_KEYS)
        pos = torch.arange(m, device=k.device).expand(B, m)
        return k[:, :, :m], torch.ones(B, m, dtype=torch.bool, device=k.device), pos
    cu = cu_seqlens.to(device=k.device, dtype=torch.int64)
    pos = cu[:-1, None] + torch.arange(_REF_KEYS, device=k.device)
    valid = pos < cu[1:, None]
    pos = pos.clamp(max=max(N - 1, 0))
    if N == 0:  # nothing to gather from; every entry is invalid
        keys = k.new_zeros(Hk, pos.shape[0], _REF_KEYS, D)
    else:
        keys = k[0][:, pos]                          # (Hk, S, _REF_KEYS, D)
    return keys.transpose(0, 1), valid, pos


def state_ref(k, cu_seqlens, state_in, ref_in, acc):
    """(S, Hk, Dk) in acc: the ref the op sums a sequence's keys relative to
    (csrc/csq_params.h), for code that builds states outside it (csq_ext/_direct_state.py):
    the carried ref where the state holds keys or the sequence has none, else per coordinate
    the lower median of the finite values among the sequence's first keys (0 if there is no
    such value). Differentiable with respect to k and ref_in."""
    N = k.shape[2]
    if N == 0:  # no keys to pick from: the carried ref, or 0
        S = k.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
        return ref_in if ref_in is not None else k.new_zeros(S, k.shape[1], k.shape[3],
                                                             dtype=acc)
    picked = _ref_picked_from_keys(state_in, cu_seqlens, N, k.device)[..., None]
    carried = 0.0 if ref_in is None else ref_in
    keys, valid, _ = first_keys(k, cu_seqlens)
    keys = keys.to(acc)
    keep = valid[:, None, :, None] & torch.isfinite(keys)
    median = torch.where(keep, keys, float("nan")).nanmedian(dim=2).values
    return torch.where(picked, torch.nan_to_num(median, nan=0.0), carried)


def _ref_key_gradient(k, ref, dref, cu_seqlens):
    """The gradient that a picked ref (S, Hk, Dk) passes to the keys it was picked from: per
    coordinate, ref is the lower median of the first _REF_KEYS keys of the sequence, i.e. one of
    them (the first equal one receives dref). Returns a tensor shaped like k."""
    acc = ref.dtype
    B, Hk, N, D = k.shape
    if N == 0:  # no keys to pick from
        return torch.zeros_like(k)
    keys, valid, pos = first_keys(k, cu_seqlens)
    first = (keys.to(acc) == ref[:, :, None]) & valid[:, None, :, None]
    first = first & (first.cumsum(2) == 1)
    part = first * dref[:, :, None]                  # (S, Hk, m, D)
    if cu_seqlens is None:
        grad = torch.zeros(B, Hk, N, D, dtype=acc, device=k.device)
        grad[:, :, :part.shape[2]] = part
        return grad.to(k.dtype)
    part = part.transpose(0, 1).reshape(Hk, -1, D)
    grad = torch.zeros(Hk, N, D, dtype=acc, device=k.device).index_add_(1, pos.reshape(-1), part)
    return grad[None].to(k.dtype)


def _fwd_backward(ctx, dy, _db, _dden, dstate_out, dref_out):
    # b and den are auxiliary outputs for the backward; the public function never returns them,
    # so their incoming gradients are None or zero and are ignored.
    q, k, v, shift, cu_seqlens, state_in, ref, y, b, den = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(y)
    dq, dk, dv, dshift, dstate_in, dref = ops.csq_bwd(
        dy, q, k, v, shift, cu_seqlens, state_in, ref, y, b, den, dstate_out, *ctx.options)
    # dref: the gradient of the loss through ref, with the sums in and the keys held fixed;
    # the returned ref is ref itself. Where the carried state held keys, ref is its ref;
    # elsewhere the op picked ref from the sequence's keys, and the keys receive it.
    if dref_out is not None:
        dref = dref + dref_out
    picked = _ref_picked_from_keys(state_in, cu_seqlens, k.shape[2], ref.device)
    dref_in = torch.where(picked[..., None], 0, dref) if ctx.has_ref_in else None
    # Outputs alone do not depend on a picked ref (it only re-centres the keys of a state that
    # is empty); the returned state does.
    if dstate_out is not None or dref_out is not None:
        dk = dk + _ref_key_gradient(k, ref, torch.where(picked[..., None], dref, 0), cu_seqlens)
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
