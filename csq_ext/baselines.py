"""The study baselines of ``CSQAttention``: the "linear" and "taylor" kernels in plain PyTorch.

They are what a quality study compares CSQ with (csq_ext/nn.py's table), not part of the
operator: an O(N) chunked form (inside a block of ``tile_size`` positions the C x C weights are
computed directly and masked; across blocks each query reads prefix sums of the earlier blocks'
feature-map states) and ``kernel_attention_reference``, the O(N^2) masked form the tests
compare them against. The feature map of "taylor" has ``1 + D + D(D+1)/2`` entries (the
symmetric trick), that of "linear" D. The default block is 64 for "linear" and 256 for
"taylor" (whose large feature map makes the states dear: at the sequence lengths of the
quality study, N <= 256, "taylor" is in effect the O(N^2) masked form).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

def _elu1(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1.0


def _linear_weights(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    return _elu1(q) @ _elu1(k).transpose(-1, -2)


def _linear_features(x: torch.Tensor, scale: float) -> torch.Tensor:
    return _elu1(x)


def _taylor_weights(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    s = scale * (q @ k.transpose(-1, -2))
    return 1.0 + s + 0.5 * s * s


def _taylor_features(x: torch.Tensor, scale: float) -> torch.Tensor:
    """[1, sqrt(scale) x, scale / sqrt(2) * x_a x_b (a <= b, off-diagonal times sqrt(2))], so
    that <phi(q), phi(k)> = 1 + s + s^2 / 2 with s = scale <q, k>. Built from D slices rather
    than a gather, whose backward (a scatter) is slow on CPU."""
    D = x.shape[-1]
    diag = scale / math.sqrt(2.0)
    parts = [torch.ones_like(x[..., :1]), x * math.sqrt(scale)]
    for a in range(D):
        row = x[..., a:a + 1] * x[..., a:]                     # x_a x_b for b >= a
        parts.append(torch.cat([row[..., :1] * diag, row[..., 1:] * scale], dim=-1))
    return torch.cat(parts, dim=-1)


_FEATURE_KERNELS = {
    "linear": (_linear_weights, _linear_features),
    "taylor": (_taylor_weights, _taylor_features),
}
# Per position, the C x C block costs about C (D + Dv) and the chunk states about 2 F Dv, so
# the best block grows with the feature size F: D for "linear", 1 + D + D(D+1)/2 for "taylor"
# (561 at D = 32, where a block of 64 is about 5x slower than 256 on CPU, forward + backward).
_DEFAULT_TILE = {"linear": 64, "taylor": 256}
# The C x C blocks of a chunk: a longer tile_size acts as this one (memory O(N C), not N^2).
_MAX_TILE = 1024


def _feature_attention(q, k, v, kind: str, *, causal: bool, scale: float, normalize: bool,
                       eps: float, tile_size: int, key_mask=None) -> torch.Tensor:
    """Chunked O(N C D + N F Dv) attention for a kernel with a finite feature map.

    q, k: (B, H, N, D), v: (B, H, N, Dv), one head count (the caller repeats GQA heads).
    key_mask (B, N) bool, non-causal only: keys that count (False: padding, never attended).
    """
    weights, features = _FEATURE_KERNELS[kind]
    B, H, N, D = q.shape
    Dv = v.shape[-1]
    if not causal:
        fq, fk = features(q, scale), features(k, scale)
        if key_mask is not None:  # a zero feature vector adds nothing to numerator or sum
            fk = fk * key_mask[:, None, :, None].to(fk.dtype)
        num = fq @ (fk.transpose(-1, -2) @ v)
        if not normalize:
            return num
        return num / (fq @ fk.sum(2).unsqueeze(-1) + eps)

    C = max(1, min(tile_size, N, _MAX_TILE))
    nc = -(-N // C)
    pad = nc * C - N
    if pad:  # padded keys come after every real query, so the causal mask hides them
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    qc, kc, vc = (t.reshape(B, H, nc, C, t.shape[-1]) for t in (q, k, v))

    mask = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    w = weights(qc, kc, scale).masked_fill(~mask, 0.0)       # (B, H, nc, C, C)
    num = w @ vc
    den = w.sum(-1, keepdim=True)
    if nc > 1:
        fq, fk = features(qc, scale), features(kc, scale)     # (B, H, nc, C, F)
        state = fk.transpose(-1, -2) @ vc                      # (B, H, nc, F, Dv)
        zsum = fk.sum(-2)                                      # (B, H, nc, F)
        # Exclusive prefix sums: chunk c reads the states of chunks 0 .. c-1.
        state = torch.cat([torch.zeros_like(state[:, :, :1]), state.cumsum(2)[:, :, :-1]], 2)
        zsum = torch.cat([torch.zeros_like(zsum[:, :, :1]), zsum.cumsum(2)[:, :, :-1]], 2)
        num = num + fq @ state
        den = den + fq @ zsum.unsqueeze(-1)
    out = num if not normalize else num / (den + eps)
    return out.reshape(B, H, nc * C, Dv)[:, :, :N]


def feature_kernel_attention(q, k, v, kernel: str, *, causal: bool, scale: float,
                             normalize: bool = True, eps: float = 1e-6,
                             tile_size: int | None = None, key_mask=None) -> torch.Tensor:
    """The "linear" or "taylor" kernel on q (B, Hq, N, D), k, v (B, Hk, N, D) -> (B, Hq, N, Dv),
    in float32 (or float64) math outside autocast. ``key_mask`` (B, N) bool, non-causal only:
    the real keys (padding is neither attended nor counted in the normalizer)."""
    if key_mask is not None and causal:
        raise ValueError(f"kernel {kernel!r}: a key mask is supported for non-causal attention "
                         "only (causal padding would need a varlen chunked form)")
    dt = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    if dt in (torch.float16, torch.bfloat16):
        dt = torch.float32
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    if k.shape[1] != q.shape[1]:
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    with torch.autocast(q.device.type, enabled=False):
        return _feature_attention(q, k, v, kernel, causal=causal, scale=scale,
                                  normalize=normalize, eps=eps,
                                  tile_size=tile_size or _DEFAULT_TILE[kernel],
                                  key_mask=key_mask)


def kernel_attention_reference(q, k, v, kernel: str, *, causal: bool = True,
                               scale: float | None = None, normalize: bool = True,
                               eps: float = 1e-6) -> torch.Tensor:
    """O(N^2) masked form of the "linear" and "taylor" kernels (the tests' oracle).

    q (B, Hq, N, D), k (B, Hk, N, D), v (B, Hk, N, Dv), Hq a multiple of Hk.
    """
    weights, _ = _FEATURE_KERNELS[kernel]
    Hq, Hk, N = q.shape[1], k.shape[1], q.shape[2]
    tau = q.shape[-1] ** -0.5 if scale is None else scale
    k, v = k.repeat_interleave(Hq // Hk, 1), v.repeat_interleave(Hq // Hk, 1)
    w = weights(q, k, tau)
    if causal:
        w = w.masked_fill(~torch.ones(N, N, dtype=torch.bool, device=q.device).tril(), 0.0)
    num = w @ v
    return num if not normalize else num / (w.sum(-1, keepdim=True) + eps)
