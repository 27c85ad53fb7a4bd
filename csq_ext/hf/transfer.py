"""Attention-transfer parameters: the few numbers a converted model trains so that each of its
attention layers (CSQ or another kernel of ``csq_ext.nn``) imitates the softmax layer it
replaced, and their saving and loading. The approach is that of Hedgehog (Zhang et al., 2024)
and LoLCATs (Zhang et al., 2024): keep every pretrained weight, train a small add-on to match
each layer's softmax output. The training loop lives in ``transfer/`` at the repository root.

Per attention module (``convert.attention_modules``):

* ``csq_head_scale`` (Hq,): a per-head factor on the score scale (1 at first), applied to the
  query by the attention function;
* ``csq_shift`` (Hq,): CSQ's per-head shift, with ``convert(..., learnable_shift=True)``;
* with ``adapter_rank = r > 0``, low-rank adapters on the query and key projections: their
  weight becomes ``W + B A`` (``torch.nn.utils.parametrize``; A (r, in), B (out, r) = 0 at
  first), so the pretrained W is kept unchanged.

At their initial values the model computes exactly what ``convert`` alone gives. Every such
parameter's name ends in a component starting with ``csq_``; ``save_params`` writes them,
with the conversion options, to a small JSON file that ``convert(model, params=...)`` loads.
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn
from torch.nn.utils import parametrize

from .convert import _num_query_heads, attention_modules, convert

FORMAT = "csq_ext.hf.transfer/1"
# Names of the query and key projections in transformers' attention modules (BERT, Llama-style).
_QK_NAMES = (("query", "key"), ("q_proj", "k_proj"))


class LowRankDelta(nn.Module):
    """The parametrization ``W -> W + B A`` of a linear layer's weight (a LoRA-style adapter
    merged into the weight, so every caller of the layer sees it). B starts at 0."""

    def __init__(self, out_features: int, in_features: int, rank: int, like: torch.Tensor):
        super().__init__()
        kw = dict(dtype=like.dtype, device=like.device)
        self.csq_lora_a = nn.Parameter(torch.randn(rank, in_features, **kw) / in_features ** 0.5)
        self.csq_lora_b = nn.Parameter(torch.zeros(out_features, rank, **kw))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.csq_lora_b @ self.csq_lora_a


def _qk_projections(module) -> list[nn.Linear]:
    for names in _QK_NAMES:
        layers = [getattr(module, n, None) for n in names]
        if all(isinstance(layer, nn.Linear) for layer in layers):
            return layers
    raise ValueError(f"{type(module).__name__}: no query/key projections named "
                     f"{' or '.join('/'.join(n) for n in _QK_NAMES)} to put adapters on")


def add_transfer_parameters(model: nn.Module, *, head_scale: bool = True,
                            adapter_rank: int = 0) -> nn.Module:
    """Adds ``csq_head_scale`` and (``adapter_rank > 0``) q/k adapters to every attention module
    of a model that ``convert`` switched; returns the model."""
    for module in attention_modules(model):
        weight = next(module.parameters())
        if head_scale:
            module.csq_head_scale = nn.Parameter(torch.ones(
                _num_query_heads(module), dtype=weight.dtype, device=weight.device))
        if adapter_rank > 0:
            for proj in _qk_projections(module):
                if parametrize.is_parametrized(proj, "weight"):
                    parametrize.remove_parametrizations(proj, "weight")
                parametrize.register_parametrization(proj, "weight", LowRankDelta(
                    proj.out_features, proj.in_features, adapter_rank, proj.weight))
    return model


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
    ``save_params`` or its JSON path), add the transfer parameters and load their values.
    Every stored tensor must match a parameter of the same name and shape, and every transfer
    parameter must be stored."""
    if not isinstance(params, dict):
        with open(params) as f:
            params = json.load(f)
    if params.get("format") != FORMAT:
        raise ValueError(f"not attention-transfer parameters of format {FORMAT!r} "
                         f"(format {params.get('format')!r})")
    convert(model, **params["convert"])
    add_transfer_parameters(model, head_scale=params["head_scale"],
                            adapter_rank=params["adapter_rank"])
    wanted, stored = transfer_parameters(model), params["tensors"]
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
