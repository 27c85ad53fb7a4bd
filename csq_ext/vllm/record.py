"""The conversion record of a saved CSQ checkpoint (docs/saved_models.md): config.json's
``csq_attention``, read and checked for serving. Torch- and vLLM-free, so that the checks can
be tested anywhere and run in every vLLM process before a model is built."""
from __future__ import annotations

import dataclasses
import numbers

KEY = "csq_attention"
FORMAT = "csq_ext.hf/1"
# The kernels a vLLM model can serve: the state-carrying ones. "taylor" and "linear" are
# csq_ext.nn's whole-sequence feature maps: no state to decode with.
SERVED_KERNELS = ("csq", "rebased")
KERNELS = SERVED_KERNELS + ("taylor", "linear")


@dataclasses.dataclass(frozen=True)
class CSQRecord:
    """What an attention module computes (docs/saved_models.md, "The computation")."""

    kernel: str = "csq"
    shift: float = 1.0
    learnable_shift: bool = False
    center: bool = True
    eps: float = 1e-6
    head_scale: bool = False
    adapter_rank: int = 0

    @property
    def attention_shift(self) -> float:
        """The shift of every head when there is no trained one ("rebased": 0)."""
        return 0.0 if self.kernel == "rebased" else self.shift

    @property
    def attention_center(self) -> bool:
        return False if self.kernel == "rebased" else self.center


def raw_record(config) -> dict | None:
    """config's csq_attention entry (a transformers config or a dict), None if absent."""
    if isinstance(config, dict):
        return config.get(KEY)
    return getattr(config, KEY, None)


def read_record(config) -> CSQRecord:
    """The checked record of a config that has one; ValueError naming the field otherwise."""
    rec = raw_record(config)
    if not isinstance(rec, dict):
        raise ValueError(f"config.json has no valid '{KEY}' record (got {type(rec).__name__}): "
                         "not a checkpoint saved by csq_ext.hf (docs/saved_models.md)")
    if rec.get("format") != FORMAT:
        raise ValueError(f"{KEY}.format must be {FORMAT!r} (this csq_ext reads that format), "
                         f"got {rec.get('format')!r}: upgrade csq_ext")
    fields = {f.name for f in dataclasses.fields(CSQRecord)}
    unknown = sorted(set(rec) - fields - {"format", "csq_ext_version"})
    if unknown:
        raise ValueError(f"{KEY} has fields this csq_ext does not know: {unknown} (they could "
                         "change the computation); upgrade csq_ext")

    def want(name, ok, what):
        if name in rec and not ok(rec[name]):
            raise ValueError(f"{KEY}.{name} must be {what}, got {rec[name]!r}")

    is_bool = lambda x: isinstance(x, bool)  # noqa: E731
    is_real = lambda x: isinstance(x, numbers.Real) and not isinstance(x, bool) and x == x \
        and abs(x) != float("inf")  # noqa: E731
    want("kernel", lambda x: x in KERNELS, f"one of {KERNELS}")
    want("shift", is_real, "a finite number")
    want("eps", lambda x: is_real(x) and x >= 0, "a finite number >= 0")
    for name in ("learnable_shift", "center", "head_scale"):
        want(name, is_bool, "true or false")
    want("adapter_rank", lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 0,
         "an integer >= 0")
    want("csq_ext_version", lambda x: isinstance(x, str), "a string")
    out = CSQRecord(**{k: rec[k] for k in fields if k in rec})
    if out.kernel not in SERVED_KERNELS:
        raise ValueError(f"{KEY}.kernel = {out.kernel!r}: csq_ext.vllm serves the kernels "
                         f"{SERVED_KERNELS} (they carry a state of constant size); "
                         f"{out.kernel!r} is a whole-sequence feature map without one")
    return out
