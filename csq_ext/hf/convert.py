"""convert(): switch a pretrained softmax transformers model (or a SentenceTransformer) to CSQ
attention in place, and record the conversion in its config (csq_ext.hf.saved)."""
from __future__ import annotations

import torch
from transformers import PreTrainedModel

from . import saved
from .attention import register

KERNELS = saved.KERNELS  # "csq", "rebased" and the FEATURE_KERNELS


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


def transformers_models(model: torch.nn.Module) -> list[PreTrainedModel]:
    """The outermost transformers models in ``model``: ``[model]`` for a PreTrainedModel; for a
    container such as a sentence-transformers ``SentenceTransformer``, the PreTrainedModel of
    each of its modules (its ``Transformer`` module's ``auto_model``)."""
    if isinstance(model, PreTrainedModel):
        return [model]
    found, todo = [], list(model.children()) if isinstance(model, torch.nn.Module) else []
    while todo:
        m = todo.pop(0)
        if isinstance(m, PreTrainedModel):
            found.append(m)
        else:
            todo.extend(m.children())
    if not found:
        raise ValueError(f"convert: {type(model).__name__} is neither a transformers "
                         "PreTrainedModel nor a module (e.g. a SentenceTransformer) holding one")
    return found


def convert(model: torch.nn.Module, *, shift: float = 1.0, learnable_shift: bool = False,
            center: bool = True, eps: float = 1e-6, kernel: str = "csq",
            params: dict | str | None = None) -> torch.nn.Module:
    """Switch ``model`` from softmax to CSQ attention in place, keeping every weight: the first
    step of fine-tuning or attention transfer. ``model`` is a transformers PreTrainedModel or a
    sentence-transformers ``SentenceTransformer`` (every transformer module inside it is
    converted: ``csq_ext.hf.convert(SentenceTransformer(path), params="all-MiniLM-L6-v2")``).

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
        params: attention-transfer parameters: the name of a set shipped with csq_ext
            (``"all-MiniLM-L6-v2"``: rank-4 q/k adapters, per-head scale and shift; cosine
            0.968 between the converted and the original sentence embeddings on 1000 held-out
            sentences, 0.855 without them; every set and its cosine:
            ``csq_ext.hf.pretrained``), a dict saved by
            ``csq_ext.hf.transfer.save_params`` or its JSON path. They carry their own
            conversion options, which replace the arguments above, and their trained values
            (per-head shift and scale, low-rank q/k adapters) are loaded into the model.

    Attention-weight dropout is set to 0 (``attention_dropout`` / ``dropout.p`` of the
    attention modules): CSQ has no weight matrix to drop from. The conversion is recorded in
    ``model.config`` (``csq_attention``, docs/saved_models.md), so that ``save_pretrained`` /
    ``from_pretrained`` (after ``import csq_ext.hf``) give back the same CSQ model; converting
    again replaces an earlier conversion and its transfer parameters. Returns ``model``.
    """
    inner = transformers_models(model)
    if inner != [model]:
        for m in inner:
            convert(m, shift=shift, learnable_shift=learnable_shift, center=center, eps=eps,
                    kernel=kernel, params=params)
        return model
    if params is not None:
        from .transfer import load_params_into
        return load_params_into(model, params)
    record = saved.conversion_record(kernel=kernel, shift=shift, learnable_shift=learnable_shift,
                                     center=center, eps=eps)  # checks every option
    if learnable_shift and kernel != "csq":
        raise ValueError(f"learnable_shift applies to kernel='csq' only, got {kernel!r}")
    modules = attention_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no attention module with `scaling` and "
                         "`is_causal` attributes (transformers v5 attention interface)")
    model.set_attn_implementation(register())
    from .transfer import remove_transfer_parameters
    remove_transfer_parameters(model)  # an earlier conversion's
    for module in modules:
        module._parameters.pop("csq_shift", None)  # an earlier conversion's learnable shift
        if learnable_shift:
            like = next(module.parameters(), torch.empty(0))
            module.csq_shift = saved.new_parameter((_num_query_heads(module),), like,
                                                   "csq_shift", float(shift))
        else:
            module.csq_shift = float(shift)
        module.csq_center, module.csq_eps, module.csq_kernel = bool(center), float(eps), kernel
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
        if isinstance(getattr(module, "dropout", None), torch.nn.Dropout):
            module.dropout.p = 0.0
    saved.write(model, record)
    return model
