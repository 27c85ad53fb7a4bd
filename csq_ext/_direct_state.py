"""The direct path with a carried state (``initial_state`` / ``return_state``, causal only).

The O(N^2) part stays in the direct op; the state adds O(N Dk^2 Dv) that this module computes
with differentiable torch (so it runs on every device the direct op runs on):

* centering: each query's mean mu_i counts the state's keys as well as the call's, but the op
  centers on the call's keys alone (mu'_i). ``row_shift_i = -tau <q_i, mu_i - mu'_i>`` moves
  its b_i to the full mean.
* reading: the state's keys add ``phi(tau q_i, b0_i) . sums`` to each query's [num | den]
  (``row_sums``), b0_i being the query's shift relative to the state's ref r:
  ``c_h - tau <q_i, mu_i - r>`` when centering, ``c_h + tau <q_i, r>`` if not
  (csrc/csq_features.h has the features; their rows here are the state's rows).
* returning: ``sums + sum_j psi(k_j - r) [v_j, 1]^T`` over the call's keys, built only when
  asked, with ref r the carried state's (when it holds keys) or the lower median of the
  sequence's first keys, as the chunked op picks it (csrc/csq_params.h).

The features of a block of rows are built, multiplied and dropped; the backward rebuilds them
(no (N, F) tensor is kept). Packed sequences (cu_seqlens) are handled one sequence at a time.
"""
from __future__ import annotations

import torch

from . import _ops
from ._args import acc_dtype
from ._ops import ops
from .state import num_features, num_pairs

# Elements of one block of feature rows (rows x F): 1 M, 4 MB in float32, so that a block stays
# in cache between its construction and its GEMM (16 MB blocks ran 1.75x slower; bench/NOTES.md).
_BLOCK_ELEMS = 1 << 20


def _features(u: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(..., F): [u_x u_y for x <= y | c u | c^2], the pairs in the state's row order (row-major
    upper triangle). With c = 1 these are the key features psi(u); with u = tau q and c = b_i
    they are the query features up to the weights m_xy = 2 of the off-diagonal pairs and 2 of
    the linear rows, which `_query_weights` moves onto the state. Built from one contiguous
    slice per x and a single concatenation: no gather (indexing with a (P,) index tensor ran
    four times slower on the CPU, bench/NOTES.md)."""
    d = u.shape[-1]
    return torch.cat([u[..., x:] * u[..., x:x + 1] for x in range(d)] + [c[..., None] * u,
                                                                         (c * c)[..., None]], -1)


def _features_grad(g: torch.Tensor, u: torch.Tensor, c: torch.Tensor):
    """The gradients with respect to u and c of sum_f g_f _features(u, c)_f: the pair (x, y)
    gives g_xy u_y to coordinate x and g_xy u_x to y (twice u_x at x = y)."""
    d, off = u.shape[-1], 0
    P = num_pairs(d)
    glin, gconst = g[..., P:P + d], g[..., -1]
    du = c[..., None] * glin
    for x in range(d):
        seg = g[..., off:off + d - x]
        du[..., x] += (seg * u[..., x:]).sum(-1)
        du[..., x:] += seg * u[..., x:x + 1]
        off += d - x
    return du, (u * glin).sum(-1) + 2 * c * gconst


def _query_weights(d: int, dtype, device) -> torch.Tensor:
    """(F, 1): phi(tau q, b) = weights * _features(tau q, b), so phi . sums =
    _features(tau q, b) . (weights * sums): 2 for the off-diagonal pairs and the linear rows,
    1 for the diagonal pairs and the constant (csrc/csq_features.h)."""
    w = torch.full((num_features(d), 1), 2.0, dtype=dtype, device=device)
    x = torch.arange(d, device=device)
    w[x * d - x * (x - 1) // 2] = 1.0  # the pairs (x, x)
    w[-1] = 1.0
    return w


def _blocks(bh: int, rows: int, features: int):
    """(flat heads, rows) blocks of at most _BLOCK_ELEMS feature elements."""
    r = max(1, min(rows, max(64, _BLOCK_ELEMS // features)))
    h = max(1, min(bh, _BLOCK_ELEMS // (r * features)))
    for h0 in range(0, bh, h):
        for r0 in range(0, rows, r):
            yield slice(h0, h0 + h), slice(r0, r0 + r)


class _StateRead(torch.autograd.Function):
    """[num | den] that the state's keys give each query row: _features(a_i, b_i) . sums
    (sums already weighted by _query_weights). a (BH, R, D), b (BH, R), sums (BH, F, Dv + 1)
    -> (BH, R, Dv + 1)."""

    @staticmethod
    def forward(ctx, a, b, sums):
        ctx.save_for_backward(a, b, sums)
        out = a.new_empty(a.shape[0], a.shape[1], sums.shape[-1])
        for h, r in _blocks(a.shape[0], a.shape[1], sums.shape[1]):
            out[h, r] = _features(a[h, r], b[h, r]) @ sums[h]
        return out

    @staticmethod
    def backward(ctx, dout):
        a, b, sums = ctx.saved_tensors
        da, db, dsums = torch.empty_like(a), torch.empty_like(b), torch.zeros_like(sums)
        for h, r in _blocks(a.shape[0], a.shape[1], sums.shape[1]):
            ab, bb, g = a[h, r], b[h, r], dout[h, r]
            dsums[h].baddbmm_(_features(ab, bb).mT, g)
            da[h, r], db[h, r] = _features_grad(g @ sums[h].mT, ab, bb)
        return da, db, dsums


def _with_ones(x, v):
    """[v, 1] (the values with the ones column whose sums count the keys) and the key
    features' c = 1, rebuilt by the backward rather than saved."""
    return torch.cat([v, torch.ones_like(v[..., :1])], -1), x.new_ones(x.shape[:-1])


class _StateBuild(torch.autograd.Function):
    """sum_j psi(x_j) [v_j, 1]^T: x (BH, n, D), v (BH, n, Dv) -> (BH, F, Dv + 1)."""

    @staticmethod
    def forward(ctx, x, v):
        ctx.save_for_backward(x, v)
        va, ones = _with_ones(x, v)
        out = x.new_zeros(x.shape[0], num_features(x.shape[-1]), va.shape[-1])
        for h, r in _blocks(x.shape[0], x.shape[1], out.shape[1]):
            out[h].baddbmm_(_features(x[h, r], ones[h, r]).mT, va[h, r])
        return out

    @staticmethod
    def backward(ctx, dsums):
        x, v = ctx.saved_tensors
        va, ones = _with_ones(x, v)
        dx, dv = torch.empty_like(x), torch.empty_like(v)
        for h, r in _blocks(x.shape[0], x.shape[1], dsums.shape[1]):
            xb, g = x[h, r], dsums[h]
            dv[h, r] = (_features(xb, ones[h, r]) @ g)[..., :-1]
            dx[h, r] = _features_grad(va[h, r] @ g.mT, xb, ones[h, r])[0]
        return dx, dv


def _piece(q, k, v, shift, sums, ref, scale, center, want_state):
    """One batch of whole sequences (B, H, n, D) continuing `sums` (or none) relative to
    `ref` (B, Hk, Dk): the direct op's row_shift (B, Hq, n) or None, row_sums
    (B, Hq, n, Dv + 1) or None, and the state after them or None."""
    B, Hq, n, D = q.shape
    Hk, Dv = k.shape[1], v.shape[-1]
    G = Hq // Hk
    acc = ref.dtype
    x = k.to(acc) - ref[:, :, None]                      # (B, Hk, n, D)
    qa = q.to(acc).reshape(B, Hk, G * n, D)             # a kv head's query heads, stacked
    c = shift.to(acc).view(Hk, G, 1).expand(Hk, G, n).reshape(1, Hk, G * n)
    row_shift = row_sums = state = None
    if sums is not None:
        if center:
            # mu_i - r = (S1 + sum_{j <= i} x_j) / (n0 + t_i), summed in float64 as the op does.
            pos = torch.arange(1, n + 1, dtype=torch.float64, device=q.device)
            run = x.double().cumsum(2)
            n0 = sums[..., -1, -1].double()[..., None]          # (B, Hk, 1)
            s1 = sums[..., num_pairs(D):num_pairs(D) + D, -1].double()[:, :, None]
            total = n0 + pos                                  # (B, Hk, n)
            mu_r = ((s1 + run) / total[..., None]).to(acc)
            # mu_i - mu'_i = (S1 - n0 (mu'_i - r)) / (n0 + t_i): no large difference.
            moved = ((s1 - n0[..., None] * (run / pos[:, None])) / total[..., None]).to(acc)
            # Per stacked query row: the G query heads of a key/value head share its keys.
            row_shift = -scale * (qa * moved.repeat(1, 1, G, 1)).sum(-1)
            b0 = c - scale * (qa * mu_r.repeat(1, 1, G, 1)).sum(-1)
        else:
            b0 = c + scale * (qa * ref[:, :, None]).sum(-1)
        weighted = sums * _query_weights(D, acc, q.device)
        read = _StateRead.apply((scale * qa).flatten(0, 1), b0.expand(B, Hk, G * n).flatten(0, 1),
                                weighted.flatten(0, 1))
        row_sums = read.view(B, Hq, n, Dv + 1)
        if row_shift is not None:
            row_shift = row_shift.view(B, Hq, n)
    if want_state:
        built = _StateBuild.apply(x.flatten(0, 1), v.to(acc).flatten(0, 1))
        built = built.view(B, Hk, *built.shape[1:])
        state = built if sums is None else sums + built
    return row_shift, row_sums, state


def attention(q, k, v, shift, cu_seqlens, S, state_in, ref_in, return_state, options, chunk):
    """Causal CSQ on the direct path continuing `state_in` / `ref_in` (or none) and/or returning
    the state: ``(y, sums, ref)`` with y in the accumulation dtype (sums and ref None unless
    return_state)."""
    ref = _ops.state_ref(k, cu_seqlens, state_in, ref_in, acc_dtype(q.dtype))
    scale, center = options["scale"], options["center"]
    if cu_seqlens is None:
        row_shift, row_sums, sums = _piece(q, k, v, shift, state_in, ref, scale, center,
                                           return_state)
    else:  # one sequence at a time: each has its own state
        bounds = cu_seqlens.tolist()
        pieces = []
        for s in range(S):
            sl = slice(bounds[s], bounds[s + 1])
            pieces.append(_piece(q[:, :, sl], k[:, :, sl], v[:, :, sl], shift,
                                 None if state_in is None else state_in[s:s + 1],
                                 ref[s:s + 1], scale, center, return_state))
        row_shift = (None if state_in is None or not center
                     else torch.cat([p[0] for p in pieces], 2))
        row_sums = None if state_in is None else torch.cat([p[1] for p in pieces], 2)
        sums = None if not return_state else torch.cat([p[2] for p in pieces], 0)
    y = ops.csq_direct_fwd(q, k, v, shift, cu_seqlens, row_shift, row_sums, True, scale,
                           center, options["normalize"], options["eps"], chunk)[0]
    return (y, sums, ref) if return_state else (y, None, None)
