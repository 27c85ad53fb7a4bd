"""``csq_ext.scaled_dot_product_attention``: CSQ attention behind the call of
``torch.nn.functional.scaled_dot_product_attention`` (its names, positional order, defaults,
shapes and grouped-query rule), so that switching a model from softmax to CSQ is one changed
name. What CSQ cannot compute raises a ValueError that says what to use instead."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _args
from .attention import attention
from .packing import run_packed

# csq_ext.attention's options that can be passed through **csq_options.
CSQ_OPTIONS = ("shift", "center", "normalize", "eps", "tile_size", "chunk_size", "path")


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, scale=None, enable_gqa=False, **csq_options):
    """CSQ attention with the signature of ``torch.nn.functional.scaled_dot_product_attention``.

    Args:
        query: (..., Hq, L, E). key: (..., Hk, S, E). value: (..., Hk, S, Ev). The leading
            (batch) dimensions must be equal (they are not broadcast); float64, float32,
            bfloat16 or float16, one dtype and device.
        attn_mask: None, or a **key-padding** mask: a bool tensor (True = take part, SDPA's
            convention) or a float tensor of 0 (take part) and -inf (or the dtype's lowest
            value, transformers' convention) that broadcasts to (..., Hq, L, S) and is the
            same for every head and every query, e.g. shape (B, 1, 1, S). Masked keys are
            neither attended nor counted in the centering mean (the real keys of each row
            are computed as one packed sequence); needs L == S, and the output rows at masked
            positions are 0 (SDPA attends from them; they are padding). Any other mask (one
            that differs by query or head: causal, sliding-window, a bias) raises: use
            ``is_causal`` for causality and ``cu_seqlens`` of ``csq_ext.attention`` for
            packed sequences.
        dropout_p: must be 0: CSQ has no attention-weight matrix to drop from (any other value
            raises, in training as in evaluation, since SDPA applies it in both).
        is_causal: query i attends to keys j <= i (SDPA's top-left alignment when L != S).
        scale: tau, default 1 / sqrt(E).
        enable_gqa: as SDPA: with False, Hq must equal Hk; with True, Hq must be a multiple of
            Hk and query head h reads key/value head h // (Hq // Hk).
        **csq_options: ``shift``, ``center``, ``normalize``, ``eps``, ``tile_size`` (or its
            deprecated alias ``chunk_size``), ``path`` of ``csq_ext.attention`` (anything else
            raises a TypeError).

    Returns:
        (..., Hq, L, Ev) in the dtype of the inputs.

    L != S (no mask): computed exactly; not causal, every query reads all S keys; causal,
    query i reads keys j <= i (top-left, as SDPA). Without a mask the call is traceable by
    ``torch.compile(fullgraph=True)``; a mask's packing depends on its values (a graph break).
    """
    unknown = sorted(set(csq_options) - set(CSQ_OPTIONS))
    if unknown:
        hint = " (use is_causal=)" if "causal" in unknown else ""
        raise _args.ArgumentTypeError(
            f"scaled_dot_product_attention() got unexpected keyword argument(s) {unknown}"
            f"{hint}; CSQ options are {list(CSQ_OPTIONS)}")
    q, k, v, lead = _as_4d(query, key, value)
    _check_heads(q, k, v, enable_gqa)
    _check_dropout(dropout_p)
    causal = _args.flag("is_causal", is_causal)
    options = dict(csq_options, scale=scale)
    keep = None if attn_mask is None else _key_padding(attn_mask, query, q, k)
    L, S = q.shape[2], k.shape[2]
    if keep is not None:
        _args.check(L == S, lambda: f"attn_mask: a key-padding mask needs as many queries as "
                    f"keys (L = {L}, S = {S}); mask cross-attention keys by packing them "
                    "(csq_ext.attention's cu_seqlens)")
        y = run_packed(q, k, v, keep, None, causal=causal, **options)[0].transpose(1, 2)
    elif L == S:
        y = attention(q, k, v, causal=causal, **options)
    else:
        y = _unequal_lengths(q, k, v, causal, options)
    return y.reshape(*lead, *y.shape[1:])


def _as_4d(query, key, value):
    """(..., H, N, D) -> (B, H, N, D) views, and the leading dimensions to restore."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        _args.check_type(isinstance(t, torch.Tensor),
                         lambda: f"{name} must be a torch.Tensor, got {type(t).__name__}")
        _args.check(t.dim() >= 3, lambda: f"{name} must have shape (..., H, N, D) with a head "
                    f"dimension, got {tuple(t.shape)}")
    lead = query.shape[:-3]
    _args.check(key.shape[:-3] == lead and value.shape[:-3] == lead,
                lambda: f"query, key and value must have the same leading (batch) dimensions, "
                f"got {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    _args.check(key.shape[-2] == value.shape[-2],
                lambda: f"key and value must have the same length S, got {tuple(key.shape)} "
                f"and {tuple(value.shape)}")
    _args.check(query.shape[-1] == key.shape[-1],
                lambda: f"query and key must have the same head size E, got "
                f"{tuple(query.shape)} and {tuple(key.shape)}")
    _args.check(query.is_floating_point() and query.dtype == key.dtype == value.dtype,
                lambda: f"query, key and value must share one floating dtype, got "
                f"{query.dtype}, {key.dtype}, {value.dtype}")
    _args.check(query.device == key.device == value.device,
                lambda: f"query, key and value must be on one device, got {query.device}, "
                f"{key.device}, {value.device}")
    batch = 1
    for d in lead:
        batch *= d
    return (query.reshape(batch, *query.shape[-3:]), key.reshape(batch, *key.shape[-3:]),
            value.reshape(batch, *value.shape[-3:]), lead)


def _check_heads(q, k, v, enable_gqa) -> None:
    Hq, Hk = q.shape[1], k.shape[1]
    _args.flag("enable_gqa", enable_gqa)
    _args.check(v.shape[1] == Hk, lambda: f"key and value must have the same number of heads, "
                f"got {Hk} and {v.shape[1]}")
    if not enable_gqa:
        _args.check(Hq == Hk, lambda: f"query has {Hq} heads and key/value {Hk}: pass "
                    "enable_gqa=True for grouped-query attention (as with SDPA)")
    else:
        _args.check(Hk > 0 and Hq % Hk == 0, lambda: f"enable_gqa=True: the query heads "
                    f"({Hq}) must be a multiple of the key/value heads ({Hk})")


def _check_dropout(p) -> None:
    _args.check_type(isinstance(p, (int, float)) and not isinstance(p, bool),
                     lambda: f"dropout_p must be a float, got {type(p).__name__}")
    _args.check(p == 0, lambda: f"dropout_p = {p}: CSQ attention has no attention-weight "
                "matrix to apply dropout to; pass dropout_p=0.0 (regularize elsewhere, e.g. "
                "dropout on the attention output)")


def _key_padding(mask, query, q, k) -> torch.Tensor:
    """The (B, S) bool mask of the keys that take part, from an SDPA attn_mask that is a
    key-padding mask; anything else raises."""
    _args.check_type(isinstance(mask, torch.Tensor),
                     lambda: f"attn_mask must be None or a torch.Tensor, got {type(mask).__name__}")
    full = (*query.shape[:-2], query.shape[-2], k.shape[2])  # (..., Hq, L, S)
    _args.check(mask.dim() <= len(full) and all(
        m in (1, f) for m, f in zip(mask.shape[::-1], full[::-1])),
        lambda: f"attn_mask of shape {tuple(mask.shape)} does not broadcast to (..., Hq, L, S) "
        f"= {full}")
    if mask.dtype == torch.bool:
        keep = mask
    else:
        _args.check(mask.is_floating_point(), lambda: f"attn_mask must be bool or floating "
                    f"point, got {mask.dtype}")
        masked = (mask == -math.inf) | (mask == torch.finfo(mask.dtype).min)
        _args.check(bool(((mask == 0) | masked).all()), lambda: "attn_mask: a float mask adds a "
                    "bias to softmax's scores, which CSQ's weights have no place for; only "
                    "key-padding masks (0 = take part, -inf = masked) are accepted")
        keep = ~masked
    m = keep.reshape((1,) * (len(full) - keep.dim()) + tuple(keep.shape))
    for dim, what in ((-3, "head"), (-2, "query")):  # a key mask is the same for all of them
        if m.shape[dim] > 1:
            _args.check(bool((m == m.narrow(dim, 0, 1)).all()), lambda: f"attn_mask differs "
                        f"from {what} to {what}: CSQ takes key-padding masks only (the same for "
                        "every head and query); use is_causal=True for causality and "
                        "csq_ext.attention's cu_seqlens for packed sequences")
    keys = m.select(-2, 0).select(-2, 0)  # (..., S) with size-1 leading dims
    return keys.expand(*full[:-3], k.shape[2]).reshape(q.shape[0], k.shape[2]).to(q.device)


def _unequal_lengths(q, k, v, causal: bool, options) -> torch.Tensor:
    """L != S. Not causal: the queries in blocks of S, each block one call over all S keys
    (queries do not interact). Causal, SDPA's top-left alignment: query i < S reads keys
    j <= i (the first min(L, S) queries over the first positions), queries i >= S read all
    keys."""
    B, Hq, L, _ = q.shape
    S = k.shape[2]
    if S == 0:  # no key at all: an empty numerator over an empty denominator
        y = q.new_zeros(B, Hq, L, v.shape[3])
        normalize = _args.flag("normalize", options.get("normalize", True))
        return y.fill_(math.nan) if normalize and _args.eps(options.get("eps", 1e-6)) == 0 else y
    if not causal:
        blocks = -(-L // S)
        qb = F.pad(q, (0, 0, 0, blocks * S - L)).reshape(B, Hq, blocks, S, -1).transpose(1, 2)
        rep = lambda t: t.unsqueeze(1).expand(B, blocks, *t.shape[1:]).reshape(  # noqa: E731
            B * blocks, *t.shape[1:])
        y = attention(qb.reshape(B * blocks, Hq, S, -1), rep(k), rep(v), causal=False, **options)
        return y.reshape(B, blocks, Hq, S, -1).transpose(1, 2).reshape(B, Hq, blocks * S, -1)[
            :, :, :L]
    if L < S:  # queries at the first L positions of the keys' sequence
        y = attention(F.pad(q, (0, 0, 0, S - L)), k, v, causal=True, **options)
        return y[:, :, :L]
    head = attention(q[:, :, :S], k, v, causal=True, **options)
    tail = _unequal_lengths(q[:, :, S:], k, v, False, options)
    return torch.cat([head, tail], dim=2)
