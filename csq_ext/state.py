"""The carried state of causal CSQ attention: what a sequence's keys and values leave behind
for the queries that come after them. Its size does not depend on the sequence length."""
from __future__ import annotations

from typing import NamedTuple

import torch

from .feature_map import SQUARE


def num_pairs(dim_k: int) -> int:
    """Quadratic features k_x k_y (x <= y): the first rows of the state (CSQ's feature map,
    csq_ext/feature_map.py, mirroring csrc/csq_feature_map.h)."""
    return SQUARE.num_pairs(dim_k)


def num_features(dim_k: int) -> int:
    """Length of the key feature vector psi(k) = [k_x k_y (x <= y), k_x, 1]: the state's rows
    (the feature map's count, csq_ext/feature_map.py)."""
    return SQUARE.num_features(dim_k)


class CSQState(NamedTuple):
    """Running sums of CSQ attention, per sequence and key/value head.

    sums: (S, Hk, F, Dv + 1), F = Dk (Dk + 1) / 2 + Dk + 1, ``sum_j psi(k_j - ref) [v_j, 1]^T``.
        Its blocks are the spec's running sums: rows of pairs x <= y hold ``S2`` (columns
        ``:Dv``) and ``Z2`` (last column), the next Dk rows ``S1`` and ``Z1`` (the key sum that
        centering needs), the last row ``S0`` and ``Z0`` (the key count).
    ref: (S, Hk, Dk), the key offset the sums are taken relative to (the median of the
        sequence's first keys, picked by the first call or decoding step of a state whose count
        is 0; it keeps float32 sums accurate when keys share a large offset).

    float32 for float32 / bfloat16 / float16 inputs, float64 for float64 inputs. S is the
    batch size, or the number of packed sequences with ``cu_seqlens``. Differentiable: pass a
    state that requires grad and gradients flow into it (truncated backpropagation through
    time). Use the same ``scale``, ``shift``, ``center`` options for every piece of a sequence.
    """

    sums: torch.Tensor
    ref: torch.Tensor

    @staticmethod
    def empty(batch: int, heads_k: int, dim_k: int, dim_v: int, *,
              dtype: torch.dtype = torch.float32, device=None) -> "CSQState":
        """The state before any token: zero sums (count 0) and a zero ref, which the first
        call or decoding step replaces by one picked from its keys."""
        from . import _args  # _args imports this module

        batch, heads_k = _args.size("batch", batch, 0), _args.size("heads_k", heads_k, 1)
        dim_k, dim_v = _args.size("dim_k", dim_k, 1), _args.size("dim_v", dim_v, 1)
        _args.check(dtype in (torch.float32, torch.float64),
                    lambda: f"dtype must be torch.float32 or torch.float64, got {dtype}")
        sums = torch.zeros(batch, heads_k, num_features(dim_k), dim_v + 1, dtype=dtype,
                           device=device)
        return CSQState(sums, torch.zeros(batch, heads_k, dim_k, dtype=dtype, device=device))

    @property
    def count(self) -> torch.Tensor:
        """(S, Hk): how many keys the state holds."""
        return self.sums[..., -1, -1]

    def __repr__(self) -> str:
        """Shapes, dtype, device and how many positions each sequence holds, never the sums
        themselves (a state is O(Dk^2 Dv) numbers per head)."""
        sums, ref = self.sums, self.ref
        if not (isinstance(sums, torch.Tensor) and isinstance(ref, torch.Tensor)
                and sums.dim() == 4 and ref.dim() == 3):
            return f"CSQState(sums={_describe(sums)}, ref={_describe(ref)})"
        S, Hk, _, Dv1 = sums.shape
        grad = ", requires_grad=True" if sums.requires_grad or ref.requires_grad else ""
        return (f"CSQState(sequences={S}, heads_k={Hk}, dim_k={ref.shape[-1]}, dim_v={Dv1 - 1}, "
                f"sums={tuple(sums.shape)}, ref={tuple(ref.shape)}, dtype={sums.dtype}, "
                f"device={sums.device}{grad}, positions={_positions(self.count)})")

    def to(self, *args, **kwargs) -> "CSQState":
        return CSQState(self.sums.to(*args, **kwargs), self.ref.to(*args, **kwargs))

    def detach(self) -> "CSQState":
        return CSQState(self.sums.detach(), self.ref.detach())

    def clone(self) -> "CSQState":
        return CSQState(self.sums.clone(), self.ref.clone())


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)}, {x.dtype}, {x.device}"
    return type(x).__name__


def _positions(count: torch.Tensor, shown: int = 8) -> str:
    """The positions (keys) each sequence holds: a list for a few sequences, else the range.
    The count is the same for every key/value head of a sequence, unless the state was built
    by hand."""
    if count.is_meta:
        return "unknown (meta tensors)"
    if count.numel() == 0:
        return "[]"
    count = count.detach().to("cpu", torch.float64)
    per_seq = count[:, 0]
    note = "" if bool((count == per_seq[:, None]).all()) else " (differs between heads)"
    values = [int(c) if c == int(c) else c for c in per_seq.tolist()]
    if len(values) <= shown:
        return f"{values}{note}"
    low, high = min(values), max(values)
    span = f"{low} each" if low == high else f"{low} to {high}"
    return f"{span} over {len(values)} sequences{note}"
