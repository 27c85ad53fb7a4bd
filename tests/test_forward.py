"""Forward pass against the float64 reference: every dtype, shape family, flag and layout."""
import itertools

import pytest
import torch

import csq_ext
from conftest import (FLOAT_DTYPES, SHAPES, TOL, assert_rel_close, call_op, csq, make_qkv,
                      poisoned_memory, rand_shift, reference, reference_blocked, strided_randn)

FLAGS = list(itertools.product([True, False], [True, False], [True, False]))
FLAG_IDS = [f"{'causal' if c else 'full'}-{'ctr' if m else 'noctr'}-{'norm' if n else 'raw'}"
            for c, m, n in FLAGS]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("causal,center,normalize", FLAGS, ids=FLAG_IDS)
def test_every_flag_every_dtype(gen, dtype, causal, center, normalize):
    """GQA shape, N = 13 over chunks of 4 (three full chunks and a partial one), a per-head
    shift tensor of both signs, a custom scale."""
    shape = SHAPES["gqa"]
    q, k, v = make_qkv(gen, shape, dtype)
    shift = rand_shift(gen, shape[1], torch.float32 if dtype != torch.float64 else dtype)
    kw = dict(causal=causal, center=center, normalize=normalize, scale=0.7, shift=shift)
    y = csq(q, k, v, tile_size=4, **kw)
    assert y.dtype == dtype and y.shape == (2, 4, 13, 5)
    assert_rel_close(y, reference(q, k, v, **kw), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("tile_size", [None, 4, 7, 16], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_shapes_and_chunks(gen, shape_name, causal, tile_size, dtype):
    """Every shape family (GQA, Hq == Hk, one kv head, N = 1, 2, a chunk multiple, several
    default chunks, wide heads) with chunk sizes that do and do not divide N."""
    shape = SHAPES[shape_name]
    q, k, v = make_qkv(gen, shape, dtype)
    y = csq(q, k, v, causal=causal, tile_size=tile_size)
    assert y.shape == (shape[0], shape[1], shape[3], shape[5])
    assert_rel_close(y, reference(q, k, v, causal=causal), TOL[dtype])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_defaults(gen, dtype, causal):
    """No options: scale 1/sqrt(Dk), shift 1, center, normalize, eps 1e-6, causal by default."""
    q, k, v = make_qkv(gen, (2, 2, 1, 40, 6, 3), dtype)
    with poisoned_memory():
        y = csq_ext.attention(q, k, v) if causal else csq_ext.attention(q, k, v, causal=False)
    expected = reference(q, k, v, causal=causal, scale=6 ** -0.5, shift=1.0, center=True,
                         normalize=True, eps=1e-6)
    assert_rel_close(y, expected, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shift", [1.0, -2.5, 0.0, 0.3, "tensor32", "tensor64"])
@pytest.mark.parametrize("scale", [None, 0.05, 1.7])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_scale_and_shift(gen, causal, scale, shift, dtype):
    """Custom scale tau, shift as a float (including 0 and negative) and as an (Hq,) tensor in
    either float dtype, whatever the dtype of q."""
    shape = SHAPES["gqa"]
    q, k, v = make_qkv(gen, shape, dtype)
    if isinstance(shift, str):
        shift = rand_shift(gen, shape[1], torch.float32 if shift == "tensor32" else torch.float64)
    y = csq(q, k, v, causal=causal, scale=scale, shift=shift, tile_size=4)
    assert_rel_close(y, reference(q, k, v, causal=causal, scale=scale, shift=shift), TOL[dtype])


@pytest.mark.parametrize("eps", [0.0, 1e-6, 0.5])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_eps(gen, causal, eps):
    q, k, v = make_qkv(gen, SHAPES["gqa"], torch.float64)
    y = csq(q, k, v, causal=causal, eps=eps, tile_size=4)
    assert_rel_close(y, reference(q, k, v, causal=causal, eps=eps), TOL[torch.float64])


def test_shift_tensor_distinguishes_heads(gen):
    """A per-head shift really is per head: changing the shift of head 1 changes head 1 only."""
    q, k, v = make_qkv(gen, SHAPES["gqa"], torch.float64)
    s = rand_shift(gen, 4)
    s2 = s.clone()
    s2[1] += 1.0
    y, y2 = csq(q, k, v, shift=s), csq(q, k, v, shift=s2)
    changed = (y - y2).abs().amax(dim=(0, 2, 3))
    assert changed[1] > 1e-3
    assert torch.equal(y[:, [0, 2, 3]], y2[:, [0, 2, 3]])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_strided_inputs(gen, layout, causal, dtype):
    """Transposed (B, N, H, D) views, last-dim stride 2, and stride-0 batch broadcasts."""
    q, k, v = make_qkv(gen, (2, 4, 2, 19, 4, 3), dtype, layout=layout)
    assert not any(t.is_contiguous() for t in (q, k, v))
    y = csq(q, k, v, causal=causal, tile_size=8)
    assert y.is_contiguous()
    assert_rel_close(y, reference(q, k, v, causal=causal), TOL[dtype])
    # Same numbers, contiguous copies: the layout must not matter beyond rounding.
    y_c = csq(q.contiguous(), k.contiguous(), v.contiguous(), causal=causal, tile_size=8)
    assert_rel_close(y, y_c, TOL[dtype] / 10 if dtype == torch.float64 else TOL[dtype])


def test_mixed_layouts(gen):
    """q, k, v each in a different layout, and a non-contiguous shift tensor."""
    q = strided_randn(gen, 2, 4, 17, 6, "transposed")
    k = strided_randn(gen, 2, 2, 17, 6, "sliced")
    v = strided_randn(gen, 2, 2, 17, 5, "expanded")
    shift = rand_shift(gen, 8)[::2]
    assert not shift.is_contiguous()
    for causal in (True, False):
        y = csq(q, k, v, causal=causal, shift=shift, tile_size=5)
        assert_rel_close(y, reference(q, k, v, causal=causal, shift=shift), TOL[torch.float64])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_output_is_fresh_and_inputs_untouched(gen, dtype):
    """The output is a new contiguous tensor in the input dtype; inputs are not modified."""
    q, k, v = make_qkv(gen, SHAPES["gqa"], dtype)
    copies = [t.clone() for t in (q, k, v)]
    y = csq(q, k, v)
    assert y.dtype == dtype and y.device == q.device and y.is_contiguous()
    for t in (q, k, v):
        assert y.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
    for t, c in zip((q, k, v), copies):
        assert torch.equal(t, c)


def test_repeatable(gen):
    """Two runs on the same inputs give bit-identical results (no uninitialized reads)."""
    q, k, v = make_qkv(gen, SHAPES["long"], torch.float32)
    for causal in (True, False):
        assert torch.equal(csq(q, k, v, causal=causal), csq_ext.attention(q, k, v, causal=causal))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_aux_outputs_of_the_op(gen, dtype):
    """torch.ops.csq_ext.csq_chunked_fwd returns y (B, Hq, N, Dv), b and den (B, Hq, N) in the
    accumulation dtype (float64 for float64, else float32: the public function rounds y)."""
    B, Hq, Hk, N, Dk, Dv = SHAPES["gqa"]
    q, k, v = make_qkv(gen, SHAPES["gqa"], dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    y, b, den = call_op(q, k, v, torch.ones(Hq, dtype=acc), scale=0.5, tile_size=4)
    assert y.shape == (B, Hq, N, Dv) and y.dtype == acc
    assert b.shape == den.shape == (B, Hq, N) and b.dtype == den.dtype == acc
    assert torch.isfinite(b).all() and torch.isfinite(den).all()


@pytest.mark.parametrize("causal,center,normalize", FLAGS, ids=FLAG_IDS)
def test_blocked_reference_matches_reference(gen, causal, center, normalize):
    """Harness check: the row-blocked float64 oracle (used for long sequences) is the
    reference."""
    q, k, v = make_qkv(gen, (2, 4, 2, 37, 3, 5))
    shift = rand_shift(gen, 4)
    kw = dict(causal=causal, center=center, normalize=normalize, scale=0.7, shift=shift)
    assert_rel_close(reference_blocked(q, k, v, block=8, **kw), reference(q, k, v, **kw),
                     1e-13)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_long_sequence(gen, dtype, causal):
    """N = 2048 with the default chunk (16 chunks), GQA, Dk = 16, Dv = 8."""
    q, k, v = make_qkv(gen, (1, 2, 1, 2048, 16, 8), dtype)
    y = csq(q, k, v, causal=causal)
    assert_rel_close(y, reference_blocked(q, k, v, causal=causal), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_half_inputs_accumulate_in_float32(gen, dtype, causal):
    """Weights far beyond the float16 range (s ~ 1e3, w ~ 1e6, sums over 300 keys ~ 1e8):
    with float32 accumulation the normalized output is still within 2e-2."""
    q, k, v = make_qkv(gen, (1, 2, 1, 300, 16, 8), torch.float64)
    q, k = 8 * q, 8 * k
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    y = csq(q, k, v, causal=causal)
    assert_rel_close(y, reference(q, k, v, causal=causal), TOL[dtype])
    _, _, den = call_op(q, k, v, torch.ones(2), causal=causal, scale=0.25)
    assert den.dtype == torch.float32 and den.max() > torch.finfo(torch.float16).max
