"""One colour per implementation in every plot of bench/ and quality/: a fixed mapping, so a
colour means the same implementation in every panel and figure, also when an implementation
is missing from one (matplotlib's colour cycle would shift). Unknown names get a colour from
their name, stable from run to run."""
from __future__ import annotations

import zlib

COLORS = {
    # csq_ext (path="auto") and its two algorithms
    "csq_ext": "#1f77b4", "csq": "#1f77b4",
    "direct": "#17becf", "csq_direct": "#17becf",
    "chunked": "#9467bd", "csq_chunked": "#9467bd",
    # softmax attention (SDPA and its CUDA backends)
    "sdpa": "#d62728", "softmax": "#d62728", "sdpa_flash": "#d62728",
    "sdpa_cudnn": "#ff9896", "sdpa_efficient": "#e377c2", "sdpa_math": "#7f7f7f",
    "sdpa_default": "#bcbd22",
    # CSQ written by hand (bench/flex_csq.py, bench/chunked_torch.py)
    "flex_csq": "#ff7f0e", "chunked_torch": "#8c564b",
    # the other kernels of csq_ext.nn
    "linear": "#2ca02c", "taylor": "#aec7e8", "rebased": "#c5b0d5",
}
_SPARE = ("#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d")


def color(name: str) -> str:
    return COLORS.get(name) or _SPARE[zlib.crc32(name.encode()) % len(_SPARE)]
