"""Inputs shared by check_emu.py and check_emu_direct.py, and the check of where a non-finite
input reaches that both run on their kernel family (emulator only)."""
import torch


def nonfinite_case(g, n, j, bad, what, causal):
    """float64 q (2, 4, n, 3), k and v (2, 2, n, 3 / 4), shift (4,) drawn from g, with `bad`
    (NaN or Inf) put into `what` ("v", "q", "k" or "shift") at position j, and the mask of the
    outputs y (2, 4, n, 4) it must reach (the spec's propagation rule), causal or not."""
    q = torch.randn(2, 4, n, 3, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, n, 3, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, n, 4, generator=g, dtype=torch.float64)
    shift = torch.rand(4, generator=g, dtype=torch.float64) + 0.5
    mask = torch.zeros(2, 4, n, 4, dtype=torch.bool)
    if what == "v":
        v[1, 0, j, 2] = bad
        mask[1, 0:2, j if causal else 0:, 2] = True
    elif what == "q":
        q[0, 3, j - 1, 1] = bad
        mask[0, 3, j - 1, :] = True
    elif what == "k":
        k[1, 1, j, 0] = bad
        mask[1, 2:4, j if causal else 0:, :] = True
    else:
        shift[2] = bad
        mask[:, 2] = True
    return q, k, v, shift, mask


def nonfinite_reach(fwd, bwd, g, n, j, bad, what, causal, center):
    """One nonfinite_case through a kernel family, fwd and bwd taking Emu.fwd's and Emu.bwd's
    arguments: whether the forward's non-finite outputs are exactly the mask and, for a NaN in
    v, whether the backward keeps it out of the other batch entry and (causal) out of dq of the
    rows before j. Returns (good, the backward's (dq, dk, dv) or None where it did not run), so
    that a family adds the checks of its own."""
    q, k, v, shift, mask = nonfinite_case(g, n, j, bad, what, causal)
    y, b, den = fwd(q, k, v, shift, causal, 0.6, center, True, 1e-6)
    nonfin = ~torch.isfinite(y)
    good = bool(nonfin[mask].all()) and not bool((nonfin & ~mask).any())
    if what != "v" or bad == bad:  # the backward runs with a NaN in v
        return good, None
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    dq, dk, dv, _ = bwd(dy, q, k, v, shift, y, b, den, causal, 0.6, center, True, 1e-6)
    good &= all(bool(torch.isfinite(t[0]).all()) for t in (dq, dk, dv))
    if causal:
        good &= bool(torch.isfinite(dq[1, :, :j]).all())
    return good, (dq, dk, dv)
