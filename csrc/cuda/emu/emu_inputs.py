"""Inputs shared by check_emu.py and check_emu_direct.py (emulator only)."""
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
