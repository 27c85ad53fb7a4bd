"""The O(N^2) PyTorch version of CSQ attention, written from docs/SPEC.md (the specification).

This is the tests' oracle: short, obviously correct, and slow. Run it in float64.
"""
from __future__ import annotations

import torch


def csq_attention_reference(q, k, v, *, causal=True, scale=None, shift=1.0, center=True,
                            normalize=True, eps=1e-6):
    """CSQ attention computed directly from the definition, with an N x N weight matrix.

    Shapes as in ``csq_ext.attention``: q (B, Hq, N, Dk), k (B, Hk, N, Dk), v (B, Hk, N, Dv).
    ``shift`` is a float or a tensor of shape (Hq,). Computes in the dtype of the inputs.
    """
    return weighted_attention_reference(lambda s: s ** 2, q, k, v, causal=causal, scale=scale,
                                        shift=shift, center=center, normalize=normalize, eps=eps)


def weighted_attention_reference(weight, q, k, v, *, causal=True, scale=None, shift=1.0,
                                 center=True, normalize=True, eps=1e-6):
    """The same definition with w_ij = weight(s_ij) in place of s_ij^2: the reference of any
    feature map (csq_ext/feature_map.py; the tests' second map)."""
    B, Hq, N, Dk = q.shape
    Hk = k.shape[1]
    tau = Dk ** -0.5 if scale is None else scale
    k_ = k.repeat_interleave(Hq // Hk, dim=1)
    v_ = v.repeat_interleave(Hq // Hk, dim=1)
    if isinstance(shift, torch.Tensor):
        c = shift.to(q.dtype).view(1, Hq, 1)
    else:
        c = torch.full((1, Hq, 1), float(shift), dtype=q.dtype, device=q.device)

    if center:
        if causal:
            n = torch.arange(1, N + 1, dtype=q.dtype, device=q.device)
            mu = k_.cumsum(2) / n[:, None]
        else:
            mu = k_.sum(2, keepdim=True) / max(N, 1)
        b = c - tau * (q * mu).sum(-1)  # per-query effective shift
    else:
        b = c.expand(B, Hq, N)

    w = weight(tau * q @ k_.transpose(-1, -2) + b[..., None])
    if causal:
        w = w.tril()
    num = w @ v_
    if not normalize:
        return num
    return num / (w.sum(-1, keepdim=True) + eps)
