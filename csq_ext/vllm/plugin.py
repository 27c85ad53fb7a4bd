"""register(): the ``vllm.general_plugins`` entry point of csq_ext (pyproject.toml), which vLLM
runs in each of its processes before it reads a model's config.

Routing without user flags: a CSQ checkpoint keeps transformers' ``architectures`` (e.g.
``LlamaForCausalLM``) and adds a ``csq_attention`` record to config.json
(docs/saved_models.md). vLLM picks a model class by architecture name alone, and what it
learns from that class (attention-free, one state per request) must differ between a CSQ and
a softmax checkpoint of the same architecture; so the name has to differ. register() wraps
vLLM's config parser for the "hf" format (``register_config_parser``): a config with a
``csq_attention`` record gets the architecture of our class (``CSQLlamaForCausalLM``, ...) in
memory (config.json is never changed), and every other config passes through untouched, so
plain softmax checkpoints are served by vLLM's own classes. Our classes are registered under
those names (``ModelRegistry.register_model``), with their state backend and a config check."""
from __future__ import annotations

import logging

from .record import raw_record, read_record

logger = logging.getLogger(__name__)
_registered = False


def _route(config) -> None:
    """Points a CSQ config's architectures at our classes; raises for what we cannot serve."""
    from .models import ROUTES

    if raw_record(config) is None:
        return
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    read_record(text)  # a record we cannot honour is refused before anything is built
    archs = list(getattr(config, "architectures", None) or [])
    if any(a in ROUTES.values() for a in archs):
        return  # routed already (a config parsed twice)
    served = [ROUTES[a] for a in archs if a in ROUTES]
    if not served:
        raise ValueError(f"csq_ext.vllm serves CSQ checkpoints of {sorted(ROUTES)}; this one "
                         f"is {archs}")
    config.architectures = served[:1]


def _wrap_hf_parser() -> None:
    from vllm.transformers_utils.config import get_config_parser, register_config_parser

    base = type(get_config_parser("hf"))
    if getattr(base, "_csq_routes", False):
        return

    class CSQConfigParser(base):
        """vLLM's "hf" config parser, then CSQ routing (_route)."""

        _csq_routes = True

        def parse(self, *args, **kwargs):
            config_dict, config = super().parse(*args, **kwargs)
            _route(config)
            return config_dict, config

    register_config_parser("hf")(CSQConfigParser)


def _register_config_check() -> None:
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from .config_check import CSQModelConfig
    from .models import CLASSES

    for arch in CLASSES:
        MODELS_CONFIG_MAP[arch] = CSQModelConfig


def _register_backend() -> None:
    from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

    from .backend import NAME

    if NAME not in MambaAttentionBackendEnum.__members__:
        MambaAttentionBackendEnum.register(NAME, "csq_ext.vllm.backend.CSQStateBackend")


def _register_splitting_op() -> None:
    """vLLM's compiled graphs end before and start after each attention op; ours joins them."""
    from vllm.config.compilation import CompilationConfig

    from .layer import OP_NAME

    name = f"vllm::{OP_NAME}"
    if name not in CompilationConfig._attention_ops:
        CompilationConfig._attention_ops.append(name)


def register() -> None:
    """Makes vLLM serve CSQ checkpoints (idempotent; vLLM calls it in every process)."""
    global _registered
    if _registered:
        return
    from vllm import ModelRegistry

    from .models import CLASSES

    _register_backend()
    _register_splitting_op()
    for arch, cls in CLASSES.items():
        ModelRegistry.register_model(arch, cls)
    _register_config_check()
    _wrap_hf_parser()
    _registered = True
