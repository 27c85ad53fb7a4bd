"""Constant-size generation by default: generate() of a csq model (and a text-generation
pipeline over it) uses a CSQCache that nobody handed in, with the tokens of the explicit
``past_key_values=CSQCache(...)`` path (greedy, seeded sampling, beam search, left-padded
batches); another cache only when asked for.

Skipped only when transformers is not installed."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from transformers import DynamicCache  # noqa: E402

from csq_ext import hf  # noqa: E402
from hf_models import VOCAB, left_padded_prompts, tiny_model, tokens  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def generate(model, ids, seed=None, **kw):
    """(sequences, the cache generate() used)."""
    if seed is not None:
        torch.manual_seed(seed)
    out = model.generate(ids, return_dict_in_generate=True, **kw)
    return out.sequences, out.past_key_values


CASES = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True, top_k=20, temperature=0.9),
    "beams": dict(do_sample=False, num_beams=3, num_return_sequences=2),
    "beam_sampling": dict(do_sample=True, num_beams=2),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_default_cache_is_csq_cache(family, case, gen):
    model = tiny_model(family, seed=31)
    prompt = tokens(gen, 2, 6)
    kw = dict(max_new_tokens=15, min_new_tokens=15, pad_token_id=0, **CASES[case])
    default, cache = generate(model, prompt, seed=5, **kw)
    assert isinstance(cache, hf.CSQCache)
    assert cache.get_seq_length() == default.shape[1] - 1
    explicit, _ = generate(model, prompt, seed=5, past_key_values=hf.CSQCache(model.config), **kw)
    assert torch.equal(default, explicit)
    if not kw["do_sample"]:  # and the tokens of recomputing everything (no cache at all)
        assert torch.equal(default, generate(model, prompt, use_cache=False, **kw)[0])


def test_left_padded_batch_uses_csq_cache(gen):
    model = tiny_model("llama", seed=32)
    ids, mask, short, long = left_padded_prompts(gen)
    kw = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
    both, cache = generate(model, ids, attention_mask=mask, **kw)
    assert isinstance(cache, hf.CSQCache)
    assert torch.equal(both[0, 5:], generate(model, short, **kw)[0][0])
    assert torch.equal(both[1], generate(model, long, **kw)[0][0])


def test_other_caches_only_when_asked(gen):
    model = tiny_model("llama", seed=33)
    prompt = tokens(gen, 1, 5)
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    want, cache = generate(model, prompt, **kw)
    assert isinstance(cache, hf.CSQCache)
    got, cache = generate(model, prompt, cache_implementation="dynamic", **kw)
    assert type(cache) is DynamicCache and torch.equal(got, want)
    mine = DynamicCache()
    got, cache = generate(model, prompt, past_key_values=mine, **kw)
    assert cache is mine and torch.equal(got, want)
    got, cache = generate(model, prompt, use_cache=False, **kw)
    assert cache is None and torch.equal(got, want)


def test_assisted_decoding_keeps_transformers_cache(gen):
    """Assisted decoding crops its caches, which a CSQ state cannot do: transformers' own
    cache serves it (exact too), and it gives greedy's tokens."""
    model, assistant = tiny_model("llama", seed=34), tiny_model("llama", seed=35)
    prompt = tokens(gen, 1, 6)
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
    want, _ = generate(model, prompt, **kw)
    got, cache = generate(model, prompt, assistant_model=assistant, **kw)
    assert not isinstance(cache, hf.CSQCache) and torch.equal(got, want)


def test_softmax_models_keep_dynamic_cache(gen):
    model = tiny_model("llama", seed=36, attn="sdpa")
    _, cache = generate(model, tokens(gen, 1, 5), max_new_tokens=3, do_sample=False)
    assert type(cache) is DynamicCache


def _word_tokenizer():
    """A word-level tokenizer over the tiny models' vocabulary (w1 ... w99), built in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<pad>": 0, **{f"w{i}": i for i in range(1, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")


def test_text_generation_pipeline_uses_csq_cache(gen, monkeypatch):
    from transformers import pipeline

    from csq_ext.hf import generation
    made = []

    class Recorded(hf.CSQCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(generation, "CSQCache", Recorded)
    model = tiny_model("qwen2", seed=37)
    tokenizer = _word_tokenizer()
    text = " ".join(f"w{int(t)}" for t in tokens(gen, 7))
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    out = pipe(text, max_new_tokens=10, min_new_tokens=10, do_sample=False, return_tensors=True)
    assert len(made) == 1 and made[0].get_seq_length() == 7 + 10 - 1
    ids = tokenizer(text, return_tensors="pt").input_ids
    want = model.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False,
                          past_key_values=hf.CSQCache(model.config))
    assert list(out[0]["generated_token_ids"]) == want[0].tolist()
