"""convert(): switch a pretrained softmax transformers model to CSQ attention in place."""
from __future__ import annotations

import torch

from .attention import FEATURE_KERNELS, register

KERNELS = ("csq", "rebased") + FEATURE_KERNELS


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
            center: bool = True, eps: float = 1e-6, kernel: str = "csq",
            params: dict | str | None = None) -> torch.nn.Module:
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
        kernel: the similarity, as in ``csq_ext.CSQAttention``: "csq" (default), "rebased"
            (CSQ with shift 0, no centering), "taylor" or "linear" (feature maps; whole
            sequences only: no cache, no packed rows, padding in non-causal models only).
        params: attention-transfer parameters saved by ``csq_ext.hf.transfer.save_params``
            (a dict or a JSON path): they carry their own conversion options, which replace
            the arguments above, and their trained values (per-head shift and scale, low-rank
            q/k adapters) are loaded into the model.

    Attention-weight dropout is set to 0 (``attention_dropout`` / ``dropout.p`` of the
    attention modules): CSQ has no weight matrix to drop from. Returns ``model``.
    """
    if params is not None:
        from .transfer import load_params_into
        return load_params_into(model, params)
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if learnable_shift and kernel != "csq":
        raise ValueError(f"learnable_shift applies to kernel='csq' only, got {kernel!r}")
    modules = attention_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no attention module with `scaling` and "
                         "`is_causal` attributes (transformers v5 attention interface)")
    model.set_attn_implementation(register())
    for module in modules:
        # A previous conversion's learnable shift and transfer scale (csq_ext.hf.transfer).
        module._parameters.pop("csq_shift", None)
        module._parameters.pop("csq_head_scale", None)
        if learnable_shift:
            weight = next(module.parameters(), None)
            module.csq_shift = torch.nn.Parameter(torch.full(
                (_num_query_heads(module),), float(shift),
                dtype=torch.float32 if weight is None or not weight.is_floating_point()
                else weight.dtype, device=None if weight is None else weight.device))
        else:
            module.csq_shift = float(shift)
        module.csq_center, module.csq_eps, module.csq_kernel = bool(center), float(eps), kernel
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
        if isinstance(getattr(module, "dropout", None), torch.nn.Dropout):
            module.dropout.p = 0.0
    return model
