"""The "csq" attention and mask functions for transformers' AttentionInterface and
AttentionMaskInterface.

transformers calls an attention function with q (B, Hq, Nq, D), k and v (B, Hk, Nk, D) (grouped
heads not repeated), a mask made by the mask function registered under the same name, the
module's ``scaling`` and keyword arguments (``position_ids``, varlen ``cu_seq_lens_q/k``, ...);
it expects ``(output (B, Nq, Hq, Dv), weights or None)``.

CSQ never builds an N x N mask: our mask function returns ``None`` when every key is a real
token, else the (B, Nk) boolean mask of real keys, and refuses mask patterns it cannot express
(sliding windows, chunks, custom overlays). Padding and packing are computed exactly by packing
the real tokens of each sequence into one varlen call (``cu_seqlens``): a padded key is never
attended and never counted in the centering mean, causal or not.

A module converted to another kernel (``csq_kernel``, set by ``convert``) runs "rebased" through
the same path (shift 0, no centering) and "linear" / "taylor" through csq_ext.nn's feature
maps; a per-head ``csq_head_scale`` (an attention-transfer parameter) scales the query.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.masking_utils import (AttentionMaskInterface, bidirectional_mask_function,
                                        causal_mask_function)
from transformers.modeling_utils import AttentionInterface

from .._args import acc_dtype as _acc_dtype
from ..attention import attention
from ..nn import feature_kernel_attention
from ..packing import run_packed
from .saved import NAME

# Kernels of csq_ext.nn that convert() can select besides "csq" itself ("rebased" runs through
# csq_ext.attention with shift 0 and no centering; these two through their feature maps).
FEATURE_KERNELS = ("linear", "taylor")


def register(name: str = NAME) -> str:
    """Registers CSQ attention and its mask function with transformers under ``name``; then
    ``from_config(cfg, attn_implementation=name)`` and ``model.set_attn_implementation(name)``
    select it. Also installs (once) what makes saved CSQ models load as CSQ
    (csq_ext.hf.saved) and generate() default to a CSQCache (csq_ext.hf.generation).
    ``import csq_ext.hf`` calls it. Idempotent. Returns ``name``."""
    from . import generation, saved
    AttentionInterface.register(name, csq_attention_forward)
    AttentionMaskInterface.register(name, csq_mask)
    saved.install()
    generation.install()
    return name


def runs_csq(config) -> bool:
    """Whether a model with this config runs csq attention (under any registered name)."""
    impl = getattr(config, "_attn_implementation", None)
    return AttentionInterface._global_mapping.get(impl) is csq_attention_forward


# --------------------------------------------------------------------------------------------
# Mask
# --------------------------------------------------------------------------------------------
def _mask_pattern(fn) -> str | None:
    """"causal", "bidirectional" or "packed" for the mask functions CSQ can express, None for
    any other. transformers wraps the base pattern for packed sequences as
    ``and_masks(packed_sequence_mask_function(...), remap_positions_for_packed_sequence(base))``;
    we recognize that composition by the closures' names and refuse everything else."""
    if fn is causal_mask_function:
        return "causal"
    if fn is bidirectional_mask_function:
        return "bidirectional"
    parts = [c.cell_contents for c in (getattr(fn, "__closure__", None) or ())]
    tuples = [p for p in parts if isinstance(p, tuple)]
    if getattr(fn, "__qualname__", "").startswith("and_masks.") and len(tuples) == 1:
        inner = tuples[0]
        names = [getattr(f, "__qualname__", "") for f in inner]
        if (len(inner) == 2 and names[0].startswith("packed_sequence_mask_function.")
                and names[1].startswith("remap_positions_for_packed_sequence.")):
            base = [c.cell_contents for c in inner[1].__closure__ if callable(c.cell_contents)]
            if len(base) == 1 and _mask_pattern(base[0]) in ("causal", "bidirectional"):
                return "packed"
    return None


def csq_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
             mask_function=causal_mask_function, attention_mask: torch.Tensor | None = None,
             **kwargs) -> torch.Tensor | None:
    """transformers' mask interface for CSQ: ``None`` when all ``kv_length`` keys are real
    tokens, else their (B, kv_length) boolean mask (True = real). Causality comes from the
    attention module (``is_causal``), packing from ``position_ids``; patterns CSQ cannot compute
    without an N x N matrix raise a ValueError."""
    if _mask_pattern(mask_function) is None:
        raise ValueError(
            "csq attention computes full causal or bidirectional attention, with padding and "
            "packed sequences; this model asked for another mask pattern "
            f"({getattr(mask_function, '__qualname__', mask_function)}): sliding windows, "
            "chunked attention and custom mask overlays are not supported")
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or attention_mask.shape[1] < kv_length:
        raise ValueError(
            f"attention_mask must be a 2D padding mask (B, >= {kv_length}) for csq attention, "
            f"got shape {tuple(attention_mask.shape)}")
    keep = attention_mask[:, attention_mask.shape[1] - kv_length:].to(torch.bool)
    return None if bool(keep.all()) else keep


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------
def _options(module, scaling, query) -> dict:
    """csq_ext.attention's keyword options for this module: ``scaling`` -> ``scale``, and the
    CSQ parameters that ``convert`` stores on the module (defaults otherwise). Kernel
    "rebased" is CSQ with no shift and no centering."""
    if getattr(module, "csq_kernel", "csq") == "rebased":
        return dict(scale=scaling, shift=0.0, center=False, eps=getattr(module, "csq_eps", 1e-6))
    shift = getattr(module, "csq_shift", 1.0)
    if isinstance(shift, torch.Tensor):  # a learnable per-head shift, kept in accumulation dtype
        shift = shift.to(_acc_dtype(query.dtype))
    return dict(scale=scaling, shift=shift, center=getattr(module, "csq_center", True),
                eps=getattr(module, "csq_eps", 1e-6))


def _scaled_query(module, query: torch.Tensor) -> torch.Tensor:
    """The query times the module's per-head score scale ``csq_head_scale`` (Hq,), an attention
    transfer parameter (csq_ext.hf.transfer), when it has one: for the score kernels this is a
    per-head temperature, scale_h * <q, k> = <scale_h q, k>."""
    gain = getattr(module, "csq_head_scale", None)
    if gain is None:
        return query
    return query * gain.to(query.dtype).view(1, -1, 1, 1)


def _feature_forward(module, query, key, value, keep, scaling, is_causal):
    """Kernels "linear" and "taylor" (csq_ext.nn's plain-PyTorch forms): whole sequences, no
    cache; padding (non-causal) by zeroing padded keys' features. Returns (B, N, Hq, Dv)."""
    if query.shape[2] != key.shape[2]:
        raise ValueError(f"kernel {module.csq_kernel!r} in transformers: queries and keys must "
                         "have the same length (no KV cache)")
    y = feature_kernel_attention(query, key, value, module.csq_kernel, causal=is_causal,
                                 scale=scaling, eps=getattr(module, "csq_eps", 1e-6),
                                 key_mask=keep).to(query.dtype).transpose(1, 2)
    return y if keep is None else y * keep[:, :, None, None].to(y.dtype)  # 0 where padded


def _packed_position_ids(position_ids, batch: int, n: int) -> torch.Tensor | None:
    """cu_seqlens over the flattened (B * N) tokens when ``position_ids`` restart inside a row
    (sequences packed in one row, transformers' convention: a new sequence wherever the
    position does not grow by one); None when every row is one sequence."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[1] != n:
        return None
    pos = position_ids.expand(batch, n)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] - pos[:, :-1] != 1
    if not bool(starts[:, 1:].any()):
        return None
    first = starts.reshape(-1).nonzero().squeeze(1)
    return torch.cat([first, first.new_tensor([batch * n])])


def _varlen_cu(kwargs) -> torch.Tensor | None:
    """cu_seqlens from transformers' flash-style varlen keyword arguments (e.g. from
    ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``)."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None and cu_k is None:
        return None
    if cu_q is None or cu_k is None or not torch.equal(cu_q.cpu(), cu_k.cpu()):
        raise ValueError("csq attention: cu_seq_lens_q and cu_seq_lens_k must be given together "
                         "and be equal (self-attention over packed sequences)")
    return cu_q.to(torch.int64)


def _check_mask(mask, batch: int, n: int):
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or tuple(mask.shape) != (batch, n):
        raise ValueError(
            f"csq attention expects the mask of csq_ext.hf.csq_mask: None or a (B, Nk) = "
            f"{(batch, n)} bool padding mask; got "
            f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}. "
            "Register the mask function with csq_ext.hf.register() and select "
            "attn_implementation='csq' (a 4D additive or boolean mask cannot be used)")
    return mask.to(torch.bool)


def csq_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                          value: torch.Tensor, attention_mask: torch.Tensor | None,
                          scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """transformers attention function running ``csq_ext.attention``.

    Args as transformers passes them: query (B, Hq, Nq, D), key / value (B, Hk, Nk, D) with
    Hq % Hk == 0 (passed to our grouped-query heads as they are), ``attention_mask`` from
    :func:`csq_mask`, ``scaling`` (our ``scale``). Causal unless ``module.is_causal`` (or an
    ``is_causal`` keyword) is False. Keys longer than queries (a KV cache such as
    DynamicCache, causal only) are handled exactly. With a :class:`CSQCache`, key and value are
    the new tokens only and the cache layer carries the state.

    Returns ``(output (B, Nq, Hq, Dv), None)``: CSQ has no attention-weight matrix.
    """
    is_causal = kwargs.pop("is_causal", None)
    is_causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    if dropout and module.training:
        raise ValueError(
            f"csq attention has no weight matrix to apply attention dropout to (dropout = "
            f"{dropout}); set the model's attention dropout to 0 (csq_ext.hf.convert does)")
    if key.dtype != query.dtype or value.dtype != query.dtype:  # e.g. mixed under autocast
        key, value = key.to(query.dtype), value.to(query.dtype)
    options = _options(module, scaling, query)
    query = _scaled_query(module, query)
    B, _, Nq, _ = query.shape
    Nk = key.shape[2]
    keep = _check_mask(attention_mask, B, Nk)
    if getattr(module, "csq_kernel", "csq") in FEATURE_KERNELS:
        if getattr(key, "_csq_cache_layer", None) is not None or _varlen_cu(kwargs) is not None:
            raise ValueError(f"kernel {module.csq_kernel!r} supports neither a CSQCache nor "
                             "packed sequences in transformers")
        return _feature_forward(module, query, key, value, keep, scaling, is_causal), None

    layer = getattr(key, "_csq_cache_layer", None)  # set by CSQCache.update
    if layer is not None:
        if not is_causal:
            raise ValueError("CSQCache holds the state of causal attention; this attention "
                             "module is not causal (is_causal=False)")
        if _varlen_cu(kwargs) is not None:
            raise ValueError("packed sequences (cu_seq_lens_q/k) cannot be used with a CSQCache: "
                             "its state has one entry per batch row")
        return layer.attend(query, key, value, keep, options), None

    if Nq > Nk or (Nq < Nk and not is_causal):
        raise ValueError(
            f"csq attention: query length {Nq} and key length {Nk} must be equal (or, causal "
            "only, queries may be the last positions of a longer key sequence)")
    if Nq < Nk:  # the last Nq positions of a cached sequence: earlier queries contribute nothing
        query = F.pad(query, (0, 0, Nk - Nq, 0))
    options["causal"] = is_causal
    cu = _varlen_cu(kwargs)
    if cu is not None or keep is not None:
        if cu is not None and (keep is not None or B != 1):
            raise ValueError("cu_seq_lens_q/k describe sequences packed in one row (batch size 1, "
                             "no padding mask)")
        y, _ = run_packed(query, key, value, keep, cu, **options)
    else:
        cu = _packed_position_ids(kwargs.get("position_ids"), B, Nk)
        if cu is not None:
            y, _ = run_packed(query, key, value, None, cu, **options)
        else:
            y = attention(query, key, value, **options).transpose(1, 2)
    return y[:, Nk - Nq:], None
