"""Multi-query associative recall (MQAR), the synthetic task of the Zoology study
(Arora et al., 2023, "Zoology: Measuring and Improving Recall in Efficient Language Models").

A sequence starts with ``num_kv_pairs`` key-value pairs ``k1 v1 k2 v2 ...`` (keys from the
lower half of the vocabulary, values from the upper half, all distinct within a sequence);
the rest of the sequence holds every key once more, at positions drawn from a power law that
favours short gaps, with random filler tokens in between. At the position of a repeated key
the model must predict the value that followed it in the context. ``labels`` is -100
everywhere else, so the loss and the accuracy only count those ``num_kv_pairs`` positions.

This follows ``zoology/data/associative_recall.py`` (``multiquery_ar``): same layout, same
power law ``p(gap) ~ a * gap^(a - 1)``, same filler (uniform over the whole vocabulary). The
sampling is vectorized with numpy's ``Generator``, so sequences for a given seed differ from
Zoology's. Nothing is downloaded.
"""
from __future__ import annotations

import numpy as np
import torch

IGNORE = -100


def _sample_without_replacement(rng: np.random.Generator, rows: int, n: int, k: int,
                                weights: np.ndarray | None = None,
                                block: int = 1024) -> np.ndarray:
    """(rows, k) indices in [0, n), distinct per row, in the order a sequential draw gives.

    Uniform: the k smallest of n uniform numbers, ordered by value. Weighted: Efraimidis and
    Spirakis (key u^(1/w), equivalently log(u) / w; the k largest keys, largest first), which
    is distributed like numpy's sequential ``choice(n, k, replace=False, p=w)``.
    """
    out = np.empty((rows, k), dtype=np.int64)
    logw = None if weights is None else np.log(weights)
    for start in range(0, rows, block):
        b = min(block, rows - start)
        u = rng.random((b, n))
        # keys to sort ascending: uniform -> u; weighted -> -log(u) / w (= -(log u) / w)
        key = u if logw is None else -np.log(u) * np.exp(-logw)
        idx = np.argpartition(key, k - 1, axis=1)[:, :k] if k < n else np.tile(np.arange(n),
                                                                              (b, 1))
        order = np.argsort(np.take_along_axis(key, idx, axis=1), axis=1)
        out[start:start + b] = np.take_along_axis(idx, order, axis=1)
    return out


def multiquery_ar(*, num_examples: int, seq_len: int, num_kv_pairs: int,
                  vocab_size: int = 8192, seed: int = 0, power_a: float = 0.01,
                  random_non_queries: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate MQAR examples.

    Args:
        num_examples: number of sequences.
        seq_len: tokens per sequence (even).
        num_kv_pairs: key-value pairs per sequence; ``4 * num_kv_pairs <= seq_len``.
        vocab_size: keys are drawn from [1, vocab_size // 2), values from
            [vocab_size // 2, vocab_size); token 0 is the filler before ``random_non_queries``.
        seed: the whole output is a function of the arguments.
        power_a: exponent of the power law over query gaps (Zoology's default 0.01).
        random_non_queries: replace filler zeros by uniform random tokens.

    Returns:
        ``inputs`` (num_examples, seq_len) int64, and ``labels`` of the same shape: the value
        token at the position of each repeated key, -100 elsewhere.
    """
    if seq_len % 2 != 0:
        raise ValueError(f"seq_len must be even, got {seq_len}")
    if num_kv_pairs < 1 or 4 * num_kv_pairs > seq_len:
        raise ValueError(f"need 1 <= num_kv_pairs <= seq_len / 4 = {seq_len // 4}, "
                         f"got {num_kv_pairs}")
    if vocab_size // 2 - 1 < num_kv_pairs:
        raise ValueError(f"vocab_size = {vocab_size} leaves fewer than num_kv_pairs = "
                         f"{num_kv_pairs} distinct keys")
    rng = np.random.default_rng(seed)
    E, ctx, half = num_examples, 2 * num_kv_pairs, vocab_size // 2

    keys = 1 + _sample_without_replacement(rng, E, half - 1, num_kv_pairs)
    values = half + _sample_without_replacement(rng, E, vocab_size - half, num_kv_pairs)
    kvs = np.zeros((E, ctx), dtype=np.int64)
    kvs[:, 0::2] = keys
    kvs[:, 1::2] = values

    # Query i (for key i) sits at context + 2 * gap_i; its value is the label at that position.
    space = (seq_len - ctx) // 2
    p = power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)
    gaps = _sample_without_replacement(rng, E, space, num_kv_pairs, weights=p / p.sum())
    queries = np.zeros((E, seq_len - ctx), dtype=np.int64)
    np.put_along_axis(queries, 2 * gaps, keys, axis=1)
    inputs = np.concatenate([kvs, queries], axis=1)
    labels = np.full((E, seq_len), IGNORE, dtype=np.int64)
    np.put_along_axis(labels, ctx + 2 * gaps, values, axis=1)

    if random_non_queries:
        filler = rng.integers(0, vocab_size, size=inputs.shape)
        inputs = np.where(inputs == 0, filler, inputs)
    return torch.from_numpy(inputs), torch.from_numpy(labels)
