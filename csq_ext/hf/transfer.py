"""Attention-transfer parameters: the few numbers a converted model trains so that each of its
attention layers (CSQ or another kernel of ``csq_ext.nn``) imitates the softmax layer it
replaced, and their saving and loading. The approach is that of Hedgehog (Zhang et al., 2024)
and LoLCATs (Zhang et al., 2024): keep every pretrained weight, train a small add-on to match
each layer's softmax output. The training loop lives in ``transfer/`` at the repository root.

Per attention module (``convert.attention_modules``):

* ``csq_head_scale`` (Hq,): a per-head factor on the score scale (1 at first), applied to the
  query by the attention function;
* ``csq_shift`` (Hq,): CSQ's per-head shift, with ``convert(..., learnable_shift=True)``;
* with ``adapter_rank = r > 0``, low-rank adapters on the query and key projections:
  ``csq_lora_a`` (r, in) and ``csq_lora_b`` (out, r, 0 at first), parameters of the projection
  itself, which then computes ``x W^T + b + (x A^T) B^T`` (a forward hook), so the pretrained
  W is kept unchanged and keeps its name.

At their initial values the model computes exactly what ``convert`` alone gives. Every such
parameter's name ends in a component starting with ``csq_``; they are recorded in the model's
config and saved by ``save_pretrained`` (docs/saved_models.md). ``save_params`` writes them,
with the conversion options, to a small JSON file that ``convert(model, params=...)`` loads.
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torch import nn

from . import saved
from .convert import _num_query_heads, attention_modules, convert

FORMAT = "csq_ext.hf.transfer/1"
# Names of the query and key projections in transformers' attention modules (BERT, Llama-style).
_QK_NAMES = (("query", "key"), ("q_proj", "k_proj"))
# Adapter names of parameter files written before the adapters were hooks (a parametrization).
_OLD_ADAPTER = ".parametrizations.weight.0.csq_lora_"


def _adapter_hook(proj: nn.Linear, args, out: torch.Tensor) -> torch.Tensor:
    """Forward hook of an adapted projection: adds ``(x A^T) B^T`` to its output. A module-level
    function that reads the adapter from the module, so deep copies and pickles keep it."""
    a, b = proj.csq_lora_a, proj.csq_lora_b
    return out + F.linear(F.linear(args[0], a.to(out.dtype)), b.to(out.dtype))


def _add_adapter(proj: nn.Linear, rank: int) -> None:
    proj.csq_lora_a = saved.new_parameter((rank, proj.in_features), proj.weight, "csq_lora_a")
    proj.csq_lora_b = saved.new_parameter((proj.out_features, rank), proj.weight, "csq_lora_b")
    proj.register_forward_hook(_adapter_hook)


def _remove_adapter(proj: nn.Module) -> None:
    proj._parameters.pop("csq_lora_a", None)
    proj._parameters.pop("csq_lora_b", None)
    for key, hook in list(proj._forward_hooks.items()):
        if hook is _adapter_hook:
            del proj._forward_hooks[key]


def _qk_projections(module) -> list[nn.Linear]:
    for names in _QK_NAMES:
        layers = [getattr(module, n, None) for n in names]
        if all(isinstance(layer, nn.Linear) for layer in layers):
            return layers
    raise ValueError(f"{type(module).__name__}: no query/key projections named "
                     f"{' or '.join('/'.join(n) for n in _QK_NAMES)} to put adapters on")


def add_transfer_parameters(model: nn.Module, *, head_scale: bool = True,
                            adapter_rank: int = 0) -> nn.Module:
    """Gives every attention module of a model that ``convert`` switched exactly these transfer
    parameters, at their initial values: ``csq_head_scale`` (ones) when ``head_scale``, q/k
    adapters of rank ``adapter_rank`` when it is > 0 (earlier ones are replaced or removed).
    Records them in the model's config; returns the model."""
    if not isinstance(head_scale, bool):
        raise ValueError(f"head_scale must be a bool, got {head_scale!r}")
    if isinstance(adapter_rank, bool) or not isinstance(adapter_rank, int) or adapter_rank < 0:
        raise ValueError(f"adapter_rank must be an int >= 0, got {adapter_rank!r}")
    modules = attention_modules(model)
    if adapter_rank > 0:
        for module in modules:
            _qk_projections(module)  # every module has them, before anything changes
    remove_transfer_parameters(model)
    for module in modules:
        if head_scale:
            module.csq_head_scale = saved.new_parameter(
                (_num_query_heads(module),), next(module.parameters()), "csq_head_scale")
        if adapter_rank > 0:
            for proj in _qk_projections(module):
                _add_adapter(proj, adapter_rank)
    saved.record_transfer(model, head_scale=head_scale, adapter_rank=adapter_rank)
    return model


def remove_transfer_parameters(model: nn.Module) -> None:
    """Removes every ``csq_head_scale`` and q/k adapter (not the record: the caller's)."""
    for module in attention_modules(model):
        module._parameters.pop("csq_head_scale", None)
        for names in _QK_NAMES:
            for name in names:
                if isinstance(getattr(module, name, None), nn.Module):
                    _remove_adapter(getattr(module, name))


def transfer_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The attention-transfer parameters of ``model`` by name (last component ``csq_*``)."""
    return {name: p for name, p in model.named_parameters()
            if name.rsplit(".", 1)[-1].startswith("csq_")}


def _json_values(p: torch.Tensor):
    """Nested lists of 9 significant digits: float32 values round-trip exactly, in a third of
    the characters of full float64 reprs."""
    return json.loads(json.dumps(p.detach().cpu().float().tolist()),
                      parse_float=lambda s: float(f"{float(s):.9g}"))


def save_params(model: nn.Module, path: str | None, *, convert_options: dict,
                adapter_rank: int = 0, head_scale: bool = True, meta: dict | None = None) -> dict:
    """The transfer parameters of ``model`` with what rebuilds them (``convert_options``: the
    keyword arguments of ``convert``; ``adapter_rank``, ``head_scale``: those of
    ``add_transfer_parameters``), written as JSON to ``path`` unless it is None. Returns the
    dict that ``convert(model, params=...)`` accepts."""
    params = {
        "format": FORMAT, "convert": dict(convert_options), "head_scale": bool(head_scale),
        "adapter_rank": int(adapter_rank), "meta": meta or {},
        "tensors": {name: _json_values(p) for name, p in transfer_parameters(model).items()},
    }
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(params, f)
    return params


def load_params_into(model: nn.Module, params: dict | str) -> nn.Module:
    """``convert`` ``model`` with the options stored in ``params`` (a dict from
    ``save_params``, its JSON path, or the name of a set shipped in ``csq_ext.hf.pretrained``),
    add the transfer parameters and load their values. Every stored tensor must match a
    parameter of the same name and shape, and every transfer parameter must be stored."""
    if not isinstance(params, dict):
        from .pretrained import resolve
        with open(resolve(params)) as f:
            params = json.load(f)
    if params.get("format") != FORMAT:
        raise ValueError(f"not attention-transfer parameters of format {FORMAT!r} "
                         f"(format {params.get('format')!r})")
    convert(model, **params["convert"])
    add_transfer_parameters(model, head_scale=params["head_scale"],
                            adapter_rank=params["adapter_rank"])
    wanted = transfer_parameters(model)
    stored = {name.replace(_OLD_ADAPTER, ".csq_lora_"): value
              for name, value in params["tensors"].items()}
    if set(wanted) != set(stored):
        raise ValueError(f"transfer parameters do not match the model: missing "
                         f"{sorted(set(wanted) - set(stored))[:3]}, unexpected "
                         f"{sorted(set(stored) - set(wanted))[:3]}")
    with torch.no_grad():
        for name, p in wanted.items():
            value = torch.tensor(stored[name], dtype=p.dtype, device=p.device)
            if value.shape != p.shape:
                raise ValueError(f"{name}: stored shape {tuple(value.shape)} != "
                                 f"{tuple(p.shape)}")
            p.copy_(value)
    return model
