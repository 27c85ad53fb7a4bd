"""Attention-transfer parameters shipped with csq_ext, loaded by name:
``csq_ext.hf.convert(model, params="all-MiniLM-L6-v2")``.

``all-MiniLM-L6-v2`` (sentence-transformers' 6-layer BERT encoder; ``model`` is its
``BertModel`` or the ``SentenceTransformer`` itself): parameters trained by ``transfer/`` in the
repository so that the CSQ model's sentence embeddings match the softmax original's. Measured
on 1000 held-out sentences (bench/results/transfer.md, a reduced-budget run of 150 steps per
variant), the cosine between the converted and the original embeddings, and how often a
sentence keeps its nearest neighbour:

============================================  ==================  ===========  ======
name                                          what is trained     cosine       NN kept
============================================  ==================  ===========  ======
``all-MiniLM-L6-v2`` (= ``/csq_lora4``)       per-head scale and  0.968        0.71
                                              shift, rank-4 q/k
                                              adapters
``all-MiniLM-L6-v2/csq``                      per-head scale and  0.938        0.64
                                              shift (144 numbers)
``all-MiniLM-L6-v2/csq_fixed_shift``          scale (shift 1)     0.937        0.64
``all-MiniLM-L6-v2/csq_no_center``            scale and shift,    0.902        0.57
                                              no centering
``all-MiniLM-L6-v2/taylor``                   scale               0.829        0.48
``all-MiniLM-L6-v2/linear``                   scale               0.509        0.21
``all-MiniLM-L6-v2/rebased``                  scale (no effect)   0.054        0.09
============================================  ==================  ===========  ======

(the zero-shot swap to CSQ, without these parameters: cosine 0.855, NN kept 0.50).
"""
from __future__ import annotations

import os

HERE = os.path.dirname(os.path.abspath(__file__))
# name -> the variant a bare model name stands for.
DEFAULT_VARIANT = {"all-MiniLM-L6-v2": "csq_lora4"}


def available() -> list[str]:
    """Every shipped name: ``model`` (its default variant) and ``model/variant``."""
    names = []
    for model in sorted(DEFAULT_VARIANT):
        names.append(model)
        names += [f"{model}/{f[:-5]}" for f in sorted(os.listdir(os.path.join(HERE, model)))
                  if f.endswith(".json")]
    return names


def path(name: str) -> str:
    """The JSON file of a shipped name (``available()``); a ValueError lists them otherwise."""
    model, _, variant = name.partition("/")
    if model in DEFAULT_VARIANT:
        file = os.path.join(HERE, model, f"{variant or DEFAULT_VARIANT[model]}.json")
        if "/" not in variant and os.path.isfile(file):
            return file
    raise ValueError(f"no shipped transfer parameters named {name!r}; shipped: {available()}")


def resolve(params: str | os.PathLike) -> str:
    """A path for ``convert(params=...)``: an existing file as it is, else a shipped name."""
    if not isinstance(params, (str, os.PathLike)):
        raise ValueError(f"params must be a dict, a JSON path or a shipped name "
                         f"({available()}), got {type(params).__name__}")
    if os.path.isfile(params):
        return os.fspath(params)
    try:
        return path(os.fspath(params))
    except ValueError:
        raise ValueError(f"params={os.fspath(params)!r} is neither a file nor a shipped name "
                         f"({available()})") from None
