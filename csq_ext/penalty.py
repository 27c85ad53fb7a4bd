"""``negativity_penalty``: our reading of the paper's "soft penalties".

The paper proposes CSQ attention "with soft penalties" and does not say on what. Our reading:
CSQ weighs key j for query i by the square of the pre-square score

    s_ij = tau * <q_i, k_j - mu_i> + c

so a key the query scores far *below* the others (s_ij << 0) gets as much weight as one it
scores far above them: the square forgets the sign, and the kernel stops being a monotone
function of the match. A soft penalty on negative scores,

    P = mean over causal pairs (i, j) with i - W < j <= i of relu(-s_ij)^2,

added to the training loss with a small weight, pushes the layer towards the regime where
s_ij >= 0 and the square is monotone (as exp is for softmax), without constraining it hard.
The window W keeps it cheap: the penalty looks at each query's W most recent keys only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def negativity_penalty(q: torch.Tensor, k: torch.Tensor, *, window: int = 64,
                       scale: float | None = None, shift: float | torch.Tensor = 1.0,
                       center: bool = True) -> torch.Tensor:
    """Mean of ``relu(-s_ij)^2`` over the causal pairs ``i - window < j <= i``.

    ``s_ij = scale * <q_i, k_j - mu_i> + shift_h`` is CSQ's score before the square (see
    ``csq_ext.attention``); ``mu_i`` is the mean of keys 0..i when ``center`` (the causal
    running mean over the whole prefix, as in CSQ attention, not only over the window),
    else 0. The mean runs over every such pair, every head and every batch element.

    Args:
        q: (B, Hq, N, Dk). k: (B, Hk, N, Dk), Hq a multiple of Hk (grouped-query heads).
        window: W >= 1, how many of the most recent keys (the query's own included) count.
        scale: tau, default 1 / sqrt(Dk). shift: c, a float or a tensor of shape (Hq,).
        center: subtract the causal running mean of the keys.

    Returns:
        A scalar tensor, differentiable in q, k and a tensor ``shift``: float64 for float64
        inputs, float32 otherwise. Zero when N == 0.

    Computed in blocks of W queries against their 2W-key window (time O(N W Dk), memory
    O(N (W + Dk)) per head); no N x N tensor is formed. Equivalent to the O(N^2) masked form
    ``mean(relu(-S)^2 over mask)`` that tests/test_penalty.py checks it against.
    """
    _check(isinstance(q, torch.Tensor) and q.dim() == 4,
           "q must be a tensor of shape (B, Hq, N, Dk)")
    _check(isinstance(k, torch.Tensor) and k.dim() == 4,
           "k must be a tensor of shape (B, Hk, N, Dk)")
    B, Hq, N, D = q.shape
    Hk = k.shape[1]
    _check(k.shape[0] == B and k.shape[2] == N and k.shape[3] == D,
           f"k must have shape (B, Hk, N, Dk) = ({B}, Hk, {N}, {D}) like q, "
           f"got {tuple(k.shape)}")
    _check(Hk > 0 and Hq % Hk == 0, f"the number of query heads Hq = {Hq} must be a multiple "
           f"of the number of key heads Hk = {Hk}")
    _check(q.is_floating_point() and k.is_floating_point(), "q and k must be floating point")
    _check(int(window) >= 1, f"window must be >= 1, got {window}")
    if isinstance(shift, torch.Tensor):
        _check(shift.shape == (Hq,), f"shift must be a float or a tensor of shape (Hq,) = "
               f"({Hq},), got {tuple(shift.shape)}")
    dt = torch.float64 if torch.float64 in (q.dtype, k.dtype) else torch.float32
    if N == 0:
        return q.new_zeros((), dtype=dt)
    tau = D ** -0.5 if scale is None else float(scale)

    with torch.autocast(q.device.type, enabled=False):
        q = q.to(dt)
        k = k.to(dt).repeat_interleave(Hq // Hk, dim=1)
        c = shift.to(dt).view(1, Hq, 1) if isinstance(shift, torch.Tensor) else float(shift)
        if center:
            n = torch.arange(1, N + 1, dtype=dt, device=q.device)
            mu = k.cumsum(2) / n[:, None]
            b = c - tau * (q * mu).sum(-1)                      # (B, Hq, N)
        else:
            b = (torch.zeros(B, Hq, N, dtype=dt, device=q.device) + c)

        W = min(int(window), N)     # a window longer than the sequence sees every prefix
        nb = -(-N // W)
        pad = nb * W - N
        qb = F.pad(q, (0, 0, 0, pad)).view(B, Hq, nb, W, D)
        bb = F.pad(b, (0, pad)).view(B, Hq, nb, W, 1)
        kb = F.pad(k, (0, 0, W, pad)).view(B, Hq, nb + 1, W, D)  # W zero keys in front
        # Block m's queries are positions mW + r; its key window is positions mW - W + t.
        kw = torch.cat([kb[:, :, :-1], kb[:, :, 1:]], dim=3)    # (B, Hq, nb, 2W, D)
        s = tau * (qb @ kw.transpose(-1, -2)) + bb               # (B, Hq, nb, W, 2W)

        dev = q.device
        r = torch.arange(W, device=dev).view(1, W, 1)
        t = torch.arange(2 * W, device=dev).view(1, 1, 2 * W)
        m = torch.arange(nb, device=dev).view(nb, 1, 1)
        i, j = m * W + r, m * W - W + t
        mask = (t > r) & (t <= r + W) & (i < N) & (j >= 0)      # i - W < j <= i, both real
        pen = torch.where(mask, torch.relu(-s), 0.0).square()
        count = mask.sum() * (B * Hq)
        return pen.sum() / count
