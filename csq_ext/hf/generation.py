"""Constant-size generation by default: ``model.generate()`` (and a text-generation pipeline)
of a model that runs csq attention decodes with a :class:`CSQCache` unless the caller asks for
another cache.

transformers picks generate()'s cache in ``GenerationMixin._prepare_cache_for_generation``
(a DynamicCache unless ``cache_implementation`` or ``past_key_values`` says otherwise) and
offers no per-model hook for a cache class of one's own, so :func:`install` wraps that method
once: it hands a fresh ``CSQCache`` to models that run csq attention in every attention module
(kernels "csq" / "rebased", causal), and leaves everything else to transformers:

* a cache passed by the caller (``past_key_values=DynamicCache()``), ``cache_implementation=
  "dynamic"`` (or any other), ``use_cache=False``: as asked;
* generation modes a CSQCache cannot serve (assisted / speculative decoding removes tokens from
  the cache, which a sum over past tokens cannot): transformers' DynamicCache, which csq
  attention also computes exactly (at O(length) per token);
* models running another attention, encoder-decoder models: untouched.
"""
from __future__ import annotations

import functools

from transformers.generation.configuration_utils import GenerationMode
from transformers.generation.utils import GenerationMixin

from .attention import runs_csq
from .cache import CSQCache
from .convert import attention_modules

# The modes whose cache use CSQCache supports (beams reorder and expand rows; nothing crops).
CSQ_CACHE_MODES = {GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE,
                   GenerationMode.BEAM_SEARCH, GenerationMode.BEAM_SAMPLE}


def wants_csq_cache(model, generation_config, model_kwargs, generation_mode) -> bool:
    """Whether generate() should get a CSQCache it was not handed."""
    if model_kwargs.get("past_key_values") is not None or generation_config.use_cache is False:
        return False
    if generation_config.cache_implementation is not None or generation_mode not in CSQ_CACHE_MODES:
        return False
    if getattr(generation_config, "is_assistant", False):  # its caller crops its cache
        return False
    if getattr(model.config, "is_encoder_decoder", False) or not runs_csq(model.config):
        return False
    modules = attention_modules(model)
    return bool(modules) and all(
        m.is_causal and getattr(m, "csq_kernel", "csq") in ("csq", "rebased") for m in modules)


_installed = False


def install() -> None:
    """Wraps ``GenerationMixin._prepare_cache_for_generation`` once (idempotent)."""
    global _installed
    if _installed:
        return
    prepare = GenerationMixin._prepare_cache_for_generation

    @functools.wraps(prepare)
    def csq_prepare(self, generation_config, model_kwargs, generation_mode, *args, **kwargs):
        if wants_csq_cache(self, generation_config, model_kwargs, generation_mode):
            model_kwargs["past_key_values"] = CSQCache(self.config)
            return None
        return prepare(self, generation_config, model_kwargs, generation_mode, *args, **kwargs)

    GenerationMixin._prepare_cache_for_generation = csq_prepare
    _installed = True
