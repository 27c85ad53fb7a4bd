"""convert(): switch a pretrained softmax transformers model to CSQ attention in place."""
from __future__ import annotations

import torch

from .attention import register


def attention_modules(model: torch.nn.Module):
    """The modules that call transformers' attention interface: those with a ``scaling`` and an
    ``is_causal`` attribute (Llama, Qwen2, Mistral, BERT, ... in transformers v5)."""
    return [m for m in model.modules() if hasattr(m, "scaling") and hasattr(m, "is_causal")]


def _num_query_heads(module) -> int:
    for name in ("num_heads", "num_attention_heads"):
        if isinstance(getattr(module, name, None), int):
            return getattr(module, name)
    config = getattr(module, "config", None)
    if config is not None and isinstance(getattr(config, "num_attention_heads", None), int):
        return config.num_attention_heads
    raise ValueError(f"cannot tell the number of query heads of {type(module).__name__}: it has "
                     "no num_heads / num_attention_heads attribute nor a config that says it")


def convert(model: torch.nn.Module, *, shift: float = 1.0, learnable_shift: bool = False,
            center: bool = True, eps: float = 1e-6) -> torch.nn.Module:
    """Switch ``model`` (a transformers PreTrainedModel) from softmax to CSQ attention in place,
    keeping every weight: the first step of fine-tuning or attention transfer.

    Registers "csq" (``register()``) and selects it with ``model.set_attn_implementation``;
    each attention module keeps its own causality (``is_causal``: decoders causal, BERT-style
    encoders bidirectional) and its ``scaling``, and gets CSQ's options:

    Args:
        shift: c, CSQ's shift (a float, or the initial value with ``learnable_shift``).
        learnable_shift: give each attention module a trainable per-query-head shift
            ``csq_shift`` (an nn.Parameter of shape (Hq,)).
        center, eps: as in ``csq_ext.attention``.

    Attention-weight dropout is set to 0 (``attention_dropout`` / ``dropout.p`` of the
    attention modules): CSQ has no weight matrix to drop from. Returns ``model``.
    """
    modules = attention_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no attention module with `scaling` and "
                         "`is_causal` attributes (transformers v5 attention interface)")
    model.set_attn_implementation(register())
    for module in modules:
        module._parameters.pop("csq_shift", None)  # a previous convert's learnable shift
        if learnable_shift:
            weight = next(module.parameters(), None)
            module.csq_shift = torch.nn.Parameter(torch.full(
                (_num_query_heads(module),), float(shift),
                dtype=torch.float32 if weight is None or not weight.is_floating_point()
                else weight.dtype, device=None if weight is None else weight.device))
        else:
            module.csq_shift = float(shift)
        module.csq_center, module.csq_eps = bool(center), float(eps)
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
        if isinstance(getattr(module, "dropout", None), torch.nn.Dropout):
            module.dropout.p = 0.0
    return model
