"""The feature maps in Python: the mirror of csrc/csq_feature_map.h, for what Python must compute
itself (the tests' references, context parallelism's non-causal read). tests/test_feature_map.py
checks it against the C++ table that the operator exposes (``torch.ops.csq_ext.feature_map_rows``).

A map turns the similarity of the extended vectors ``qe = [tau q, b]``, ``ke = [k - r, 1]``
(``d + 1`` coordinates, coordinate ``d`` the constant one), ``s = <qe, ke>``, into the weight
``w = weight(s) = sum_f phi_f(qe) psi_f(ke)``. Row ``f`` of the state is a monomial with factors
``(x, y)`` (``y = ONE_FACTOR`` for one factor): ``psi_f = ke_x ke_y``, ``phi_f = m_f qe_x qe_y``.
"""
from __future__ import annotations

import functools

import torch

ONE_FACTOR = -1


class FeatureMap:
    """What a map says (its C++ traits type): its rows in order, the query weights m_f, the rows
    that hold the key sums and the key count, and the weight of a score with its derivative.
    The feature vectors and their tables follow from the rows."""

    name = ""
    degree = 0

    def rows(self, d: int) -> tuple:
        raise NotImplementedError

    def query_weight(self, x: int, y: int) -> float:
        raise NotImplementedError

    def weight(self, s: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def weight_grad(self, s: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def num_features(self, d: int) -> int:
        return len(self.rows(d))

    def key_sum_row(self, x: int, d: int) -> int:
        """The row whose key feature is ke_x (x < d): its last column sums the keys."""
        return self._row_index(d)[self._single(x, d)]

    def count_row(self, d: int) -> int:
        """The row whose key feature is 1: its last column counts the keys."""
        return self._row_index(d)[self._single(d, d)]

    def _single(self, x: int, d: int):
        # The factors of the row whose key feature is ke_x: (x, d) with ke_d = 1 for a map of
        # pairs, (x,) alone for one factor.
        return (x, d) if self.degree == 2 else (x, ONE_FACTOR)

    @functools.lru_cache(maxsize=None)
    def _row_index(self, d: int) -> dict:
        return {r: f for f, r in enumerate(self.rows(d))}

    def table(self, d: int) -> torch.Tensor:
        """(F, 3) int64: x, y (ONE_FACTOR for one factor) and m_f of every row, in order: what
        ``torch.ops.csq_ext.feature_map_rows`` returns for this map."""
        return torch.tensor([(x, y, int(self.query_weight(x, y))) for x, y in self.rows(d)],
                            dtype=torch.int64).reshape(-1, 3)

    def recenter(self, sums: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """The same keys' state relative to another ref: sums (..., F, C) relative to r_from,
        d = r_from - r_to (..., D). Every key coordinate moves by d (the constant one by 0), so
        a row with factors (x, y) becomes (ke_x + d_x)(ke_y + d_y): itself, plus d_x times the
        row that sums ke_y, d_y times the one that sums ke_x, d_x d_y times the count (a row of
        one factor: plus d_x times the count). Exact and differentiable."""
        D = d.shape[-1]
        t = self.table(D).to(sums.device)
        x, y = t[:, 0], t[:, 1]
        y = torch.where(y == ONE_FACTOR, torch.full_like(y, D), y)   # one factor: x times ke_d
        single = torch.tensor([self.key_sum_row(z, D) for z in range(D)] + [self.count_row(D)],
                              device=sums.device)                     # the row summing ke_z
        dz = torch.cat([d, torch.zeros_like(d[..., :1])], -1)          # d_D = 0
        dx, dy = dz[..., x, None], dz[..., y, None]                    # (..., F, 1)
        count = sums[..., self.count_row(D):self.count_row(D) + 1, :]
        return (sums + dx * sums[..., single[y], :] + dy * sums[..., single[x], :]
                + dx * dy * count)

    def features(self, e: torch.Tensor, query: bool) -> torch.Tensor:
        """(..., d + 1) extended coordinates -> (..., F) features: phi (query) or psi."""
        d = e.shape[-1] - 1
        t = self.table(d).to(e.device)
        x, y, m = t[:, 0], t[:, 1], t[:, 2].to(e.dtype)
        ones = torch.ones_like(e[..., :1])
        ey = torch.cat([e, ones], -1)[..., y]  # y = -1 picks the ones column
        f = e[..., x] * ey
        return f * m if query else f


class SquareMap(FeatureMap):
    """CSQ's map: w = s^2. Rows: the pairs x <= y <= d of extended coordinates in the public
    order [pairs x <= y < d (row-major upper triangle) | linear (x, d) | constant (d, d)];
    m = 2 off the diagonal."""

    name = "square"
    degree = 2

    @staticmethod
    def num_pairs(d: int) -> int:
        """Pairs x <= y < d: the quadratic rows."""
        return d * (d + 1) // 2

    def num_features(self, d: int) -> int:  # the closed form of len(rows(d))
        return self.num_pairs(d) + d + 1

    @functools.lru_cache(maxsize=None)
    def rows(self, d: int) -> tuple:
        pairs = [(x, y) for x in range(d) for y in range(x, d)]
        return tuple(pairs + [(x, d) for x in range(d + 1)])

    def query_weight(self, x: int, y: int) -> float:
        return 1.0 if x == y else 2.0

    def weight(self, s):
        return s * s

    def weight_grad(self, s):
        return 2 * s


class LinearMap(FeatureMap):
    """The tests' second map (csrc/testing/csq_linear_map.h): w = s, psi(ke) = ke,
    phi(qe) = qe. Not a model anyone should train; it keeps the seam honest."""

    name = "linear"
    degree = 1

    @functools.lru_cache(maxsize=None)
    def rows(self, d: int) -> tuple:
        return tuple((x, ONE_FACTOR) for x in range(d + 1))

    def query_weight(self, x: int, y: int) -> float:
        return 1.0

    def weight(self, s):
        return s

    def weight_grad(self, s):
        return torch.ones_like(s)


SQUARE = SquareMap()
MAPS = {m.name: m for m in (SQUARE, LinearMap())}
