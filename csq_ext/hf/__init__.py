"""Hugging Face transformers integration: CSQ attention inside transformers models.

* ``register()`` adds "csq" to transformers' attention and mask interfaces, so that
  ``AutoModelForCausalLM.from_config(cfg, attn_implementation="csq")`` and
  ``model.set_attn_implementation("csq")`` run ``csq_ext.attention`` in every attention layer.
* ``CSQCache`` is a transformers ``Cache`` that holds one ``CSQState`` per layer: generation
  with a state of constant size instead of a growing KV cache.
* ``convert(model, ...)`` switches a pretrained softmax model (or a sentence-transformers
  ``SentenceTransformer``) to CSQ (or another kernel of ``csq_ext.nn``) in place; ``transfer``
  holds the attention-transfer parameters and their loader (``convert(model, params=...)``),
  ``pretrained`` the parameters shipped with csq_ext (``params="all-MiniLM-L6-v2"``).

Importing this module calls ``register()``: "csq" is registered, a converted model saved with
``save_pretrained`` loads back as the same CSQ model (``saved``; docs/saved_models.md), and
``generate()`` of a csq model uses a CSQCache unless asked otherwise (``generation``).

transformers is an optional dependency: ``import csq_ext`` works without it; importing this
module without it raises an ImportError that says what to install.
"""
from __future__ import annotations

TESTED_TRANSFORMERS = ("5.17.0", "5.19.0", "5.23.0")

try:
    import transformers  # noqa: F401
    from transformers.cache_utils import Cache, CacheLayerMixin  # noqa: F401  (v5 API)
    from transformers.masking_utils import AttentionMaskInterface  # noqa: F401
except ImportError as e:  # transformers missing, or a version without the v5 interfaces
    raise ImportError(
        "csq_ext.hf needs transformers v5 (tested with "
        f"{', '.join(TESTED_TRANSFORMERS)}): pip install transformers==5.23.0"
    ) from e

from .attention import csq_attention_forward, csq_mask, register
from .cache import CSQCache, CSQCacheLayer
from .convert import convert
from . import pretrained, transfer  # noqa: E402  (after convert, which they build on)

register()

__all__ = ["register", "csq_attention_forward", "csq_mask", "CSQCache", "CSQCacheLayer",
           "convert", "pretrained", "transfer", "TESTED_TRANSFORMERS"]
