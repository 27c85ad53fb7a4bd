"""CSQ attention in plain PyTorch, chunked: the baseline for the benchmarks.

This is what a user would write without csq_ext's kernels: the chunked algorithm of
docs/SPEC.md (the decomposition in docs/kernels.md) with full D x D key features, a Python loop over
chunks and plain autograd for the backward. It never forms an N x N matrix, but autograd keeps
every chunk's features and state alive for the backward, so its memory grows like
N (Dk^2 + Dk) plus (N / C) Dk^2 Dv, where csq_ext keeps O(N (Dk + Dv)).

Augmented-feature form. With a_ij = <q_i, k_j> and the per-query shift b_i,

    w_ij = tau^2 a_ij^2 + 2 tau b_i a_ij + b_i^2 = phi_q(i) . phi_k(j),
    phi_q(i) = [tau^2 vec(q_i q_i^T), 2 tau b_i q_i, b_i^2],   phi_k(j) = [vec(k_j k_j^T), k_j, 1],

and a column of ones appended to v makes the denominator the last column of the numerator.
So the six running sums S2, S1, S0, Z2, Z1, Z0 of the spec are the blocks of one state
S = sum_j phi_k(j)^T [v_j, 1] of shape (Dk^2 + Dk + 1, Dv + 1).

Run this file to check it against csq_ext.reference in float64.
"""
from __future__ import annotations

import torch

DEFAULT_CHUNK = 128


def _shift_per_head(shift, q):
    """The shift c as a (1, Hq, 1) tensor in q's dtype (a float or an (Hq,) tensor)."""
    Hq = q.shape[1]
    if isinstance(shift, torch.Tensor):
        return shift.to(q.dtype).view(1, Hq, 1)
    return torch.full((1, Hq, 1), float(shift), dtype=q.dtype, device=q.device)


def _query_shift(q, k, c, tau, causal, center):
    """b_i = c_h - tau <q_i, mu_i>, mu_i the mean of the keys query i attends to. (B, H, N)."""
    B, H, N, _ = q.shape
    if not center:
        return c.expand(B, H, N)
    if causal:
        n = torch.arange(1, N + 1, dtype=q.dtype, device=q.device)
        mu = k.cumsum(2) / n[:, None]
    else:
        mu = k.sum(2, keepdim=True) / max(N, 1)
    return c - tau * (q * mu).sum(-1)


def _outer_flat(x):
    """vec(x x^T) per row: (..., D) -> (..., D * D)."""
    return (x[..., :, None] * x[..., None, :]).flatten(-2)


def _query_features(q, b, tau):
    return torch.cat([tau * tau * _outer_flat(q), (2 * tau) * b[..., None] * q,
                      (b * b)[..., None]], dim=-1)


def _key_features(k):
    return torch.cat([_outer_flat(k), k, torch.ones_like(k[..., :1])], dim=-1)


def _chunk_bounds(N, chunk):
    return [(s, min(s + chunk, N)) for s in range(0, N, chunk)]


def _causal(q, k, v1, b, tau, chunk):
    """Inside a chunk the weights are computed directly (C x C, masked); earlier chunks are
    read from the running state S, updated once per chunk."""
    N = q.shape[2]
    outs, state = [], None
    for s, e in _chunk_bounds(N, chunk):
        qc, kc, vc, bc = q[:, :, s:e], k[:, :, s:e], v1[:, :, s:e], b[:, :, s:e]
        w = (tau * (qc @ kc.transpose(-1, -2)) + bc[..., None]) ** 2
        out = w.tril() @ vc
        if state is not None:
            out = out + _query_features(qc, bc, tau) @ state
        if e < N:  # the last chunk's keys are never read through the state
            update = _key_features(kc).transpose(-1, -2) @ vc
            state = update if state is None else state + update
        outs.append(out)
    return torch.cat(outs, dim=2)


def _non_causal(q, k, v1, b, tau, chunk):
    """Every query reads the same state, the sum over all keys (built chunk by chunk so the
    forward never holds all N key features at once)."""
    N = q.shape[2]
    bounds = _chunk_bounds(N, chunk)
    state = sum(_key_features(k[:, :, s:e]).transpose(-1, -2) @ v1[:, :, s:e]
                for s, e in bounds)
    outs = [_query_features(q[:, :, s:e], b[:, :, s:e], tau) @ state for s, e in bounds]
    return torch.cat(outs, dim=2)


def csq_attention_chunked(q, k, v, *, causal=True, scale=None, shift=1.0, center=True,
                          normalize=True, eps=1e-6, chunk_size=None):
    """CSQ attention by the chunked algorithm in plain PyTorch (differentiable by autograd).

    Same arguments and result as ``csq_ext.attention``; computes in the dtype of the inputs.
    Grouped-query heads are expanded with ``repeat_interleave``.
    """
    B, Hq, N, Dk = q.shape
    Hk, Dv = k.shape[1], v.shape[3]
    if N == 0:
        return q.new_zeros((B, Hq, 0, Dv))
    tau = Dk ** -0.5 if scale is None else scale
    chunk = chunk_size or DEFAULT_CHUNK
    k = k.repeat_interleave(Hq // Hk, dim=1)
    v = v.repeat_interleave(Hq // Hk, dim=1)
    b = _query_shift(q, k, _shift_per_head(shift, q), tau, causal, center)
    v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # last column: the denominator

    out = (_causal if causal else _non_causal)(q, k, v1, b, tau, chunk)
    num, den = out[..., :Dv], out[..., Dv:]
    return num / (den + eps) if normalize else num


def _rel_err(a, b):
    # The floor keeps gradients that (nearly) vanish by cancellation from dividing rounding
    # noise by rounding noise: with N == 1 and centering every weight is c^2, so dq = dk = 0
    # and dshift ~ eps is a difference of two O(1) terms.
    return ((a - b).norm() / b.norm().clamp_min(1e-3)).item()


def _self_check():
    """Outputs and gradients against the O(N^2) reference in float64, over the options."""
    from csq_ext.reference import csq_attention_reference

    torch.manual_seed(0)
    dt = torch.float64
    B, Hq, Hk, Dk, Dv = 2, 4, 2, 5, 3
    worst = 0.0
    for N in (2, 7, 37, 64, 130):
        for causal in (True, False):
            for center, normalize in ((True, True), (False, True), (True, False)):
                for chunk in (5, 16, 128):
                    q = torch.randn(B, Hq, N, Dk, dtype=dt, requires_grad=True)
                    k = torch.randn(B, Hk, N, Dk, dtype=dt, requires_grad=True)
                    v = torch.randn(B, Hk, N, Dv, dtype=dt, requires_grad=True)
                    shift = (0.5 + torch.rand(Hq, dtype=dt)).requires_grad_()
                    opts = dict(causal=causal, shift=shift, center=center,
                                normalize=normalize, scale=0.7)
                    y = csq_attention_chunked(q, k, v, chunk_size=chunk, **opts)
                    y_ref = csq_attention_reference(q, k, v, **opts)
                    dy = torch.randn_like(y)
                    grads = torch.autograd.grad(y, (q, k, v, shift), dy)
                    grads_ref = torch.autograd.grad(y_ref, (q, k, v, shift), dy)
                    errs = [_rel_err(y, y_ref)] + [_rel_err(g, r)
                                                   for g, r in zip(grads, grads_ref)]
                    worst = max(worst, *errs)
                    if max(errs) > 1e-10:
                        raise SystemExit(f"FAIL N={N} causal={causal} center={center} "
                                         f"normalize={normalize} chunk={chunk}: errors {errs}")
    print(f"chunked_torch matches csq_ext.reference in float64 (outputs and gradients of q, k, "
          f"v, shift): worst relative error {worst:.2e} <= 1e-10  PASS")


if __name__ == "__main__":
    _self_check()
