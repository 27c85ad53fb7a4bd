"""Saved CSQ models stay CSQ (docs/saved_models.md is the format's contract).

``convert`` and ``add_transfer_parameters`` record what they did in the model's config under
``"csq_attention"`` (and set ``attn_implementation = "csq"``), so that ``save_pretrained``
writes it into config.json. Importing csq_ext.hf installs three small hooks on transformers'
``PreTrainedModel`` (:func:`install`), active only for configs that carry such a record:

* at construction (``__init__``) the model is made to run "csq" attention; another attention
  asked for explicitly (``attn_implementation="sdpa"``) raises, since the weights were trained
  for CSQ;
* at the end of construction (``post_init``, which every transformers model calls once its
  modules exist) the recorded conversion is applied, so that the CSQ parameters exist when
  ``from_pretrained`` loads the weights into them by name;
* a CSQ parameter that the weights file lacks is initialized (``_initialize_weights``, the
  step where transformers initializes missing weights) to its initial value, and transformers'
  load report lists it as MISSING.

A process that never imported csq_ext.hf cannot load such a checkpoint: transformers itself
refuses ``attn_implementation="csq"`` as unknown.
"""
from __future__ import annotations

import functools
import math
import numbers

import torch

FORMAT = "csq_ext.hf/1"
KEY = "csq_attention"
NAME = "csq"  # the name csq attention is registered under (csq_ext.hf.attention.register)
KERNELS = ("csq", "rebased", "taylor", "linear")  # convert()'s kernels

# field -> (type check, what it must be): every field a record of FORMAT holds.
_FIELDS = {
    "format": (lambda v: v == FORMAT, f"{FORMAT!r}"),
    "kernel": (lambda v: v in KERNELS, f"one of {KERNELS}"),
    "shift": (lambda v: _is_real(v), "a finite number"),
    "learnable_shift": (lambda v: isinstance(v, bool), "a bool"),
    "center": (lambda v: isinstance(v, bool), "a bool"),
    "eps": (lambda v: _is_real(v) and v >= 0, "a finite number >= 0"),
    "head_scale": (lambda v: isinstance(v, bool), "a bool"),
    "adapter_rank": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                     "an int >= 0"),
    "csq_ext_version": (lambda v: isinstance(v, str), "a string"),
}


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def conversion_record(*, kernel: str, shift: float, learnable_shift: bool, center: bool,
                      eps: float) -> dict:
    """The record of a ``convert`` call (no transfer parameters yet), its options checked."""
    from .. import __version__
    record = {"format": FORMAT, "kernel": kernel, "shift": shift,
              "learnable_shift": learnable_shift, "center": center, "eps": eps,
              "head_scale": False, "adapter_rank": 0, "csq_ext_version": __version__}
    _check_fields(record, "convert: ")
    return dict(record, shift=float(shift), eps=float(eps))


def write(model, record: dict) -> None:
    """Stores ``record`` in ``model.config``, with ``attn_implementation = "csq"`` (a plain
    attribute, so that save_pretrained writes it: transformers' own one is not saved)."""
    model.config.attn_implementation = NAME
    setattr(model.config, KEY, dict(record))


def record_transfer(model, *, head_scale: bool, adapter_rank: int) -> None:
    """Adds the transfer parameters that ``add_transfer_parameters`` created to the record."""
    record = read(model.config)
    if record is None:
        raise ValueError("add_transfer_parameters: the model has not been converted "
                         "(csq_ext.hf.convert records the conversion in model.config)")
    record.update(head_scale=bool(head_scale), adapter_rank=int(adapter_rank))
    write(model, record)


def _check_fields(record: dict, where: str) -> None:
    for field, (ok, expected) in _FIELDS.items():
        if field not in record:
            raise ValueError(f"{where}{field!r} is missing (docs/saved_models.md)")
        if not ok(record[field]):
            raise ValueError(f"{where}{field} must be {expected}, got {record[field]!r}")


def read(config) -> dict | None:
    """The config's CSQ record (a copy), checked field by field; None when it has none.
    A record this version cannot reproduce exactly raises a ValueError naming the field."""
    record = getattr(config, KEY, None)
    if record is None:
        return None
    if not isinstance(record, dict):
        raise ValueError(f"config.{KEY} must be a dict (docs/saved_models.md), got "
                         f"{type(record).__name__}")
    unknown = sorted(set(record) - set(_FIELDS))
    if unknown or record.get("format") != FORMAT:
        raise ValueError(
            f"config.{KEY} was written in a format this csq_ext does not know (format "
            f"{record.get('format')!r}{', unknown fields ' + str(unknown) if unknown else ''}; "
            f"this version reads {FORMAT!r}): upgrade csq_ext rather than run it differently")
    _check_fields(record, f"config.{KEY}: ")
    return dict(record)


def restore(model, record: dict) -> None:
    """Rebuilds the recorded conversion on a freshly constructed model: options, CSQ
    parameters (initial values; from_pretrained then loads the saved ones into them)."""
    from .convert import convert
    from .transfer import add_transfer_parameters
    convert(model, kernel=record["kernel"], shift=record["shift"],
            learnable_shift=record["learnable_shift"], center=record["center"],
            eps=record["eps"])
    if record["head_scale"] or record["adapter_rank"]:
        add_transfer_parameters(model, head_scale=record["head_scale"],
                                adapter_rank=record["adapter_rank"])


def new_parameter(shape, like: torch.Tensor, name: str, shift: float = 1.0) -> torch.nn.Parameter:
    """A CSQ parameter ``name`` at its initial value, with ``like``'s dtype and device."""
    dtype = like.dtype if like.is_floating_point() else torch.float32
    p = torch.nn.Parameter(torch.empty(shape, dtype=dtype, device=like.device))
    reset_parameter(name, p, shift)
    return p


@torch.no_grad()
def reset_parameter(name: str, p: torch.Tensor, shift: float) -> None:
    """The initial value of each CSQ parameter, at which a converted model computes exactly
    what ``convert`` alone gives: the shift c, a head scale of 1, an adapter B A = 0."""
    if name == "csq_shift":
        p.fill_(shift)
    elif name == "csq_head_scale":
        p.fill_(1.0)
    elif name == "csq_lora_a":
        p.normal_().div_(p.shape[1] ** 0.5)
    elif name == "csq_lora_b":
        p.zero_()
    else:
        raise ValueError(f"not a CSQ parameter: {name!r}")


def _runs_csq(config) -> bool:
    from .attention import runs_csq  # it imports this module
    return runs_csq(config)


def _check_requested_attention(config) -> None:
    """At construction: a config with a CSQ record runs csq attention."""
    if read(config) is None:
        return
    requested = config._attn_implementation
    if requested is None:
        config._attn_implementation = NAME
    elif not _runs_csq(config):
        raise ValueError(
            f"this config records a CSQ model (config.{KEY}): its weights were trained for csq "
            f"attention, and attn_implementation={requested!r} would run another attention on "
            f"them. To load the weights as a softmax model anyway, load the config, delete its "
            f"{KEY} and attn_implementation attributes, and pass it as config=")


_installed = False


def install() -> None:
    """Wraps ``PreTrainedModel.__init__``, ``post_init`` and ``_initialize_weights`` once
    (idempotent)."""
    global _installed
    if _installed:
        return
    from transformers import PreTrainedModel
    init, post_init = PreTrainedModel.__init__, PreTrainedModel.post_init
    initialize_weights = PreTrainedModel._initialize_weights

    @functools.wraps(init)
    def csq_init(self, config, *args, **kwargs):
        _check_requested_attention(config)
        init(self, config, *args, **kwargs)

    @functools.wraps(post_init)
    def csq_post_init(self):
        post_init(self)
        record = read(self.config)
        if record is not None:
            with torch.no_grad():
                restore(self, record)

    @functools.wraps(initialize_weights)
    def csq_initialize_weights(self, module, *args, **kwargs):
        initialize_weights(self, module, *args, **kwargs)
        missing = [(n, p) for n, p in module.named_parameters(recurse=False)
                   if n.startswith("csq_") and not getattr(p, "_is_hf_initialized", False)]
        if missing:
            record = read(self.config)
            for name, p in missing:
                reset_parameter(name, p, record["shift"] if record else 1.0)
                p._is_hf_initialized = True

    PreTrainedModel.__init__, PreTrainedModel.post_init = csq_init, csq_post_init
    PreTrainedModel._initialize_weights = csq_initialize_weights
    _installed = True
