"""csq_ext.scaled_dot_product_attention: SDPA's call (names, positional order, defaults,
shapes, grouped-query rule) computing CSQ attention, against a float64 oracle written from the
spec for any visibility pattern (queries and keys of different lengths, key-padding masks);
what CSQ cannot compute raises a ValueError naming the argument; torch.compile fullgraph."""
from __future__ import annotations

import math

import pytest
import torch

import csq_ext
from conftest import TOL, assert_rel_close, randn
from csq_ext.reference import csq_attention_reference

sdpa = csq_ext.scaled_dot_product_attention


def oracle(q, k, v, visible, scale=None, shift=1.0, center=True, normalize=True, eps=1e-6):
    """docs/SPEC.md's definition in float64 for any (L, S) or (B, H, L, S) boolean visibility:
    each query's mean is over the keys it sees. GQA heads repeated."""
    q, k, v = q.double(), k.double(), v.double()
    rep = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(rep, -3), v.repeat_interleave(rep, -3)
    tau = q.shape[-1] ** -0.5 if scale is None else scale
    vis = visible.to(q.dtype).expand(*q.shape[:-1], k.shape[-2])
    n = vis.sum(-1, keepdim=True)
    mu = (vis @ k) / n.clamp_min(1) if center else torch.zeros_like(q)
    c = torch.as_tensor(shift, dtype=q.dtype).reshape(-1, 1, 1) if not isinstance(
        shift, float) else shift
    w = (tau * (q @ k.transpose(-1, -2) - (q * mu).sum(-1, keepdim=True)) + c) ** 2 * vis
    num = w @ v
    return num / (w.sum(-1, keepdim=True) + eps) if normalize else num


def causal_top_left(L, S):
    return torch.ones(L, S, dtype=torch.bool).tril()


def qkv(gen, lead, hq, hk, L, S, e=8, ev=5, dtype=torch.float64):
    return (randn(gen, *lead, hq, L, e, dtype=dtype), randn(gen, *lead, hk, S, e, dtype=dtype),
            randn(gen, *lead, hk, S, ev, dtype=dtype))


@pytest.mark.parametrize("lead", [(), (2,), (2, 3)], ids=["3d", "4d", "5d"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(4, 4, False), (4, 2, True), (3, 1, True)],
                         ids=["mha", "gqa", "mqa"])
def test_equals_the_definition(gen, lead, causal, heads):
    hq, hk, gqa = heads
    q, k, v = qkv(gen, lead, hq, hk, 13, 13)
    y = sdpa(q, k, v, is_causal=causal, enable_gqa=gqa)
    assert y.shape == (*lead, hq, 13, 5) and y.dtype == q.dtype
    assert_rel_close(y, oracle(q, k, v, causal_top_left(13, 13) if causal else
                               torch.ones(13, 13, dtype=torch.bool)), TOL[torch.float64])
    # and csq_ext.attention itself, bit for bit (one changed name, the same computation)
    q4, k4, v4 = (t.reshape(-1, *t.shape[-3:]) for t in (q, k, v))
    assert torch.equal(y.reshape(q4.shape[0], hq, 13, 5),
                       csq_ext.attention(q4, k4, v4, causal=causal))


def test_positional_order_defaults_and_options(gen):
    """(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) as SDPA; the
    defaults are SDPA's (not causal, scale 1/sqrt(E)); CSQ options pass through."""
    q, k, v = qkv(gen, (2,), 4, 2, 11, 11)
    shift = randn(gen, 4)
    got = sdpa(q, k, v, None, 0.0, True, 0.3, True, shift=shift, center=False, eps=1e-3)
    want = csq_attention_reference(q, k, v, causal=True, scale=0.3, shift=shift, center=False,
                                   eps=1e-3)
    assert_rel_close(got, want, TOL[torch.float64])
    q, k, v = qkv(gen, (2,), 2, 2, 9, 9)
    assert_rel_close(sdpa(q, k, v), csq_attention_reference(q, k, v, causal=False),
                     TOL[torch.float64], "defaults")
    assert_rel_close(sdpa(q, k, v, normalize=False, path="direct", tile_size=4),
                     csq_attention_reference(q, k, v, causal=False, normalize=False),
                     TOL[torch.float64], "options")


@pytest.mark.parametrize("L,S", [(5, 12), (12, 5), (17, 5), (1, 9), (9, 1), (7, 7)])
@pytest.mark.parametrize("causal", [False, True])
def test_queries_and_keys_of_different_lengths(gen, L, S, causal):
    """Cross-attention lengths: not causal, every query reads all keys; causal, SDPA's
    top-left alignment (query i reads keys j <= i)."""
    q, k, v = qkv(gen, (2,), 4, 2, L, S)
    vis = causal_top_left(L, S) if causal else torch.ones(L, S, dtype=torch.bool)
    y = sdpa(q, k, v, is_causal=causal, enable_gqa=True)
    assert y.shape == (2, 4, L, 5)
    assert_rel_close(y, oracle(q, k, v, vis), TOL[torch.float64])


def test_no_keys(gen):
    q, k, v = qkv(gen, (2,), 2, 2, 3, 0)
    assert torch.equal(sdpa(q, k, v), torch.zeros(2, 2, 3, 5, dtype=torch.float64))
    assert sdpa(q, k, v, eps=0.0).isnan().all()  # 0 / 0: the definition, as the reference


def padding(lengths, S, side):
    keep = torch.zeros(len(lengths), S, dtype=torch.bool)
    for b, n in enumerate(lengths):
        if side == "right":
            keep[b, :n] = True
        elif side == "left":
            keep[b, S - n:] = True
        else:  # holes: every other position of the first 2n
            keep[b, :2 * n:2] = True
    return keep


MASK_FORMS = {
    "bool_B11S": lambda keep, hq, L: keep[:, None, None, :],
    "bool_expanded": lambda keep, hq, L: keep[:, None, None, :].expand(-1, hq, L, -1),
    "bool_materialized": lambda keep, hq, L: keep[:, None, None, :].repeat(1, hq, L, 1),
    "float_inf": lambda keep, hq, L: torch.zeros(keep.shape).masked_fill(
        ~keep, -math.inf)[:, None, None, :].double(),
    "float_min": lambda keep, hq, L: torch.zeros(keep.shape, dtype=torch.float64).masked_fill(
        ~keep, torch.finfo(torch.float64).min)[:, None, None, :],
}


@pytest.mark.parametrize("form", list(MASK_FORMS))
@pytest.mark.parametrize("side", ["right", "left", "holes"])
@pytest.mark.parametrize("causal", [False, True])
def test_key_padding_mask(gen, form, side, causal):
    """A key-padding mask: masked keys are neither attended nor counted in the centering mean;
    every real query row equals the definition over the real keys it sees; masked rows are 0."""
    B, hq, hk, N = 3, 4, 2, 12
    q, k, v = qkv(gen, (B,), hq, hk, N, N)
    keep = padding([12, 5, 3], N, side)
    y = sdpa(q, k, v, attn_mask=MASK_FORMS[form](keep, hq, N), is_causal=causal,
             enable_gqa=True)
    vis = keep[:, None, None, :] & (causal_top_left(N, N) if causal else True)
    want = oracle(q, k, v, vis)
    rows = keep[:, None, :, None].expand_as(y)
    assert_rel_close(y[rows], want[rows], TOL[torch.float64])
    assert (y[~rows] == 0).all()


def test_key_padding_mask_broadcasts(gen):
    """A (S,) mask applies to every row; a mask of all True is no mask."""
    q, k, v = qkv(gen, (2,), 2, 2, 10, 10)
    keep = torch.tensor([True] * 7 + [False] * 3)
    y = sdpa(q, k, v, attn_mask=keep, is_causal=True)
    rows = keep[None, None, :, None].expand_as(y)
    vis = keep & causal_top_left(10, 10)
    assert_rel_close(y[rows], oracle(q, k, v, vis)[rows], TOL[torch.float64])
    full = torch.ones(2, 1, 1, 10, dtype=torch.bool)
    assert torch.equal(sdpa(q, k, v, attn_mask=full), sdpa(q, k, v))


def test_key_padding_mask_gradients(gen):
    q, k, v = (t.requires_grad_() for t in qkv(gen, (2,), 2, 1, 6, 6, e=3, ev=2))
    mask = padding([6, 4], 6, "left")[:, None, None, :]
    assert torch.autograd.gradcheck(
        lambda q, k, v: sdpa(q, k, v, attn_mask=mask, is_causal=True, enable_gqa=True),
        (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: sdpa(q[:, :, :4], k, v, enable_gqa=True),
                                    (q, k, v))


def test_refusals_name_the_argument(gen):
    q, k, v = qkv(gen, (2,), 4, 2, 8, 8)
    with pytest.raises(ValueError, match="enable_gqa=True"):
        sdpa(q, k, v)  # Hq != Hk without enable_gqa, as SDPA refuses it
    with pytest.raises(ValueError, match="multiple of the key/value heads"):
        sdpa(q[:, :3], k, v, enable_gqa=True)
    for p in (0.1, 1e-9):
        with pytest.raises(ValueError, match="dropout_p"):
            sdpa(q, k, v, dropout_p=p, enable_gqa=True)
    with pytest.raises(TypeError, match="dropout_p"):
        sdpa(q, k, v, dropout_p="0", enable_gqa=True)
    with pytest.raises(ValueError, match="bias"):
        sdpa(q, k, v, attn_mask=randn(gen, 2, 1, 1, 8), enable_gqa=True)
    with pytest.raises(ValueError, match="differs from query to query.*is_causal"):
        sdpa(q, k, v, attn_mask=causal_top_left(8, 8), enable_gqa=True)
    head_mask = torch.ones(2, 4, 1, 8, dtype=torch.bool)
    head_mask[:, 1, :, 3] = False
    with pytest.raises(ValueError, match="differs from head to head"):
        sdpa(q, k, v, attn_mask=head_mask, enable_gqa=True)
    with pytest.raises(ValueError, match="does not broadcast"):
        sdpa(q, k, v, attn_mask=torch.ones(2, 1, 1, 7, dtype=torch.bool), enable_gqa=True)
    with pytest.raises(ValueError, match="bool or floating"):
        sdpa(q, k, v, attn_mask=torch.ones(2, 1, 1, 8, dtype=torch.int64), enable_gqa=True)
    keep = torch.ones(8, dtype=torch.bool)
    keep[7] = False
    with pytest.raises(ValueError, match="L = 4, S = 8"):
        sdpa(q[:, :, :4], k, v, attn_mask=keep, enable_gqa=True)
    with pytest.raises(TypeError, match="use is_causal"):
        sdpa(q, k, v, causal=True, enable_gqa=True)
    with pytest.raises(TypeError, match="unexpected keyword"):
        sdpa(q, k, v, window=3, enable_gqa=True)
    with pytest.raises(TypeError, match="is_causal must be a bool"):
        sdpa(q, k, v, is_causal=1, enable_gqa=True)
    with pytest.raises(TypeError, match="query must be a torch.Tensor"):
        sdpa(q.tolist(), k, v)
    with pytest.raises(ValueError, match="leading"):
        sdpa(q, k[:1], v[:1], enable_gqa=True)
    with pytest.raises(ValueError, match="query, key and value must share one floating dtype"):
        sdpa(q.float(), k, v, enable_gqa=True)
    with pytest.raises(ValueError, match="head size E"):
        sdpa(q[..., :4], k, v, enable_gqa=True)
    with pytest.raises(ValueError, match="scale must be a finite"):
        sdpa(q, k, v, scale=math.inf, enable_gqa=True)


@pytest.mark.parametrize("case", ["causal_gqa", "full_mha", "cross"])
def test_compile_fullgraph(gen, case):
    """Without a mask the call is one graph, forward and backward, equal to eager."""
    hq, hk, L, S, causal = {"causal_gqa": (4, 2, 11, 11, True), "full_mha": (2, 2, 9, 9, False),
                            "cross": (2, 2, 5, 12, False)}[case]
    q, k, v = qkv(gen, (2,), hq, hk, L, S, dtype=torch.float32)

    def step(q, k, v):
        y = sdpa(q, k, v, is_causal=causal, enable_gqa=hq != hk, scale=0.4)
        y.square().sum().backward()
        return y.detach()

    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    eager = step(*leaves)
    grads = [t.grad for t in leaves]
    for t in leaves:
        t.grad = None
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        got = compiled(*leaves)
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-6)
    for t, g in zip(leaves, grads):
        torch.testing.assert_close(t.grad, g, rtol=1e-5, atol=1e-6)
