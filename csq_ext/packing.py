"""Padded batches as packed sequences: the real tokens of each row of a (B, H, N, D) batch
become one sequence of a varlen call (``cu_seqlens``), so a padded key is neither attended nor
counted in the centering mean, whatever the padding pattern. Used by
``csq_ext.scaled_dot_product_attention`` (key-padding masks) and csq_ext.hf (transformers'
padding masks, packed rows and the CSQCache prefill)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import attention


def _cu_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    return F.pad(lengths.cumsum(0), (1, 0)).to(torch.int64)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) -> (B * N, H, D): the tokens of every row one after the other."""
    B, H, N, D = x.shape
    return x.transpose(1, 2).reshape(B * N, H, D)


def _as_packed(x: torch.Tensor) -> torch.Tensor:
    """(T, H, D) -> (1, H, T, D), the layout of a packed varlen call."""
    return x.transpose(0, 1).unsqueeze(0)


def run_packed(q, k, v, keep, cu, **options):
    """Attention over the tokens of (B, H, N, D) inputs regrouped into packed sequences.

    ``keep`` (B, N) bool or None: the real tokens; each row's real tokens form one sequence
    (so a padded key is neither attended nor counted in the centering mean, for any padding
    pattern). ``cu``: cu_seqlens over the flattened B * N tokens instead (packed rows).
    Returns the output in transformers' layout (B, N, Hq, Dv), zeros at padded positions, and
    the state (one entry per sequence) when ``return_state`` is in ``options``."""
    B, Hq, N, _ = q.shape
    qf, kf, vf = _flat(q), _flat(k), _flat(v)
    idx = None
    if keep is not None:
        idx = keep.reshape(-1).nonzero().squeeze(1)
        qf, kf, vf = qf[idx], kf[idx], vf[idx]
        cu = _cu_from_lengths(keep.sum(1))
    out = attention(_as_packed(qf), _as_packed(kf), _as_packed(vf), cu_seqlens=cu.to(q.device),
                    **options)
    y, state = out if options.get("return_state") else (out, None)
    y = y[0].transpose(0, 1)  # (T, Hq, Dv)
    if idx is not None:
        y = y.new_zeros(B * N, Hq, y.shape[-1]).index_copy(0, idx, y)
    return y.reshape(B, N, Hq, -1), state
