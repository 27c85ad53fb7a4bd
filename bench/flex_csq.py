"""CSQ attention as a user would write it with FlexAttention: the benchmark's "what you could
do without csq_ext" baseline.

softmax(log w) = w / sum w, so a score_mod returning log(s^2), s = tau <q, k> + b_i (b_i the
per-query shift that carries the centering), turns flex_attention's softmax into CSQ's
normalization (without eps, which changes nothing at these sizes). Causal masking goes through
a block mask, so flex skips the blocks above the diagonal as csq_ext's direct path does.
"""
from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

_flex = torch.compile(flex_attention, dynamic=False)


def _causal(b, h, qi, kj):
    return qi >= kj


@functools.lru_cache(maxsize=16)
def _causal_block_mask(n: int, device: str):
    return create_block_mask(_causal, None, None, n, n, device=device)


def csq_attention_flex(q, k, v, *, causal=True, scale=None, shift=1.0):
    """Centered, normalized CSQ with Hq == Hk; q, k, v (B, H, N, D)."""
    n = q.shape[2]
    tau = q.shape[-1] ** -0.5 if scale is None else scale
    count = torch.arange(1, n + 1, dtype=q.dtype, device=q.device)[:, None]
    mu = k.cumsum(2) / count if causal else k.mean(2, keepdim=True)
    b = shift - tau * (q * mu).sum(-1)  # (B, H, N)

    def score_mod(score, batch, head, qi, kj):
        return torch.log(torch.square(score + b[batch, head, qi]))

    mask = _causal_block_mask(n, str(q.device)) if causal else None
    return _flex(q, k, v, score_mod=score_mod, block_mask=mask, scale=tau)
