"""``CSQAttention``: a multi-head attention layer whose similarity kernel is a switch.

Projections, head layout, grouped-query sharing and the output projection are the same for
every kernel, so a quality study that swaps ``kernel=`` changes only how a query weighs its
keys:

========== ==================================================================================
kernel     weight of key j for query i (s = scale * <q_i, k_j>, scale = 1/sqrt(head_dim))
========== ==================================================================================
"csq"      ``(scale * <q_i, k_j - mu_i> + c)^2``, normalized: ``csq_ext.attention``
"softmax"  ``exp(s)``, normalized: ``torch.nn.functional.scaled_dot_product_attention``
"linear"   ``<elu(q_i) + 1, elu(k_j) + 1>``, normalized (Katharopoulos et al., 2020)
"taylor"   ``1 + s + s^2 / 2``, normalized (the second-order Taylor map of Based)
"rebased"  ``s^2``, normalized: ``csq_ext.attention`` with ``center=False, shift=0.0``
========== ==================================================================================

"rebased" is our simplification of ReBased (Aksenov et al., 2024): ReBased squares a
learnable affine map of layer-normalized q and k; here it is the bare square of the score,
i.e. CSQ with no shift and no centering, so that it isolates what those two ingredients do.

"linear" and "taylor" are study baselines in plain PyTorch (csq_ext/baselines.py: an O(N)
chunked form and the O(N^2) masked form the tests compare it against); their names stay
importable from here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import _args
from .attention import attention as csq_attention
from .baselines import (_DEFAULT_TILE, _FEATURE_KERNELS, _feature_attention,  # noqa: F401
                        feature_kernel_attention, kernel_attention_reference)
from .distributed import attention as cp_attention
from .penalty import negativity_penalty

KERNELS = ("csq", "softmax", "linear", "taylor", "rebased")


# ----------------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------------
class CSQAttention(nn.Module):
    """Multi-head (optionally grouped-query) attention with a switchable similarity kernel.

    Args:
        embed_dim: model width E; input and output are (B, N, E).
        num_heads: query heads Hq; the head size is E // Hq.
        num_kv_heads: key/value heads Hk (default Hq); Hq must be a multiple of Hk.
        causal: attend to j <= i only.
        kernel: "csq", "softmax", "linear", "taylor" or "rebased" (see the module docstring).
        shift: CSQ's c (kernel "csq"), a float; with ``learnable_shift`` the initial value of
            a per-head parameter of shape (num_heads,).
        learnable_shift: make c a trainable per-head parameter (kernel "csq" only).
        center, normalize, eps, tile_size: passed to ``csq_ext.attention``. ``normalize`` and
            ``eps`` also apply to "linear", "taylor" and "rebased"; ``center`` and ``shift``
            only to "csq" ("rebased" is fixed at center=False, shift=0.0). ``tile_size`` is
            also the block of the plain-PyTorch "linear"/"taylor" forms (default 64 / 256).
        scale: score scale tau, default 1 / sqrt(head size) (unused by "linear").
        bias: biases in the four projections.
        penalty_window: window W of ``negativity_penalty`` for ``forward(x, return_penalty=True)``.
        process_group: a ``torch.distributed`` group for context parallelism (kernels "csq" and
            "rebased"): every rank of it passes its contiguous shard of the sequences, in rank
            order, and gets its shard of the output (``csq_ext.distributed.attention``).
        chunk_size: deprecated alias of tile_size (a DeprecationWarning; not both).

    Under autocast the projections may come out in a lower precision than the parameters;
    the layer casts q, k, v to one dtype before calling ``csq_ext.attention`` (which computes
    half precision with float32 accumulation). "linear" and "taylor" compute in float32 when
    their inputs are half precision; "softmax" is left to SDPA.
    """

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int | None = None, *,
                 causal: bool = True, kernel: str = "csq", shift: float = 1.0,
                 learnable_shift: bool = False, center: bool = True, normalize: bool = True,
                 eps: float = 1e-6, scale: float | None = None, bias: bool = True,
                 tile_size: int | None = None, penalty_window: int = 64,
                 process_group=None, device=None, dtype=None, chunk_size: int | None = None):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads <= 0 or embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim = {embed_dim} must be a positive multiple of "
                             f"num_heads = {num_heads}")
        if num_kv_heads <= 0 or num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads = {num_heads} must be a multiple of num_kv_heads = "
                             f"{num_kv_heads}")
        if learnable_shift and kernel != "csq":
            raise ValueError(f"learnable_shift applies to kernel='csq' only, got {kernel!r}")
        if kernel == "softmax" and not normalize:
            raise ValueError("kernel='softmax' is always normalized; normalize=False is "
                             "not supported")
        if process_group is not None and kernel not in ("csq", "rebased"):
            raise ValueError(f"process_group (context parallelism) applies to kernels 'csq' and "
                             f"'rebased', not {kernel!r}")
        self.process_group = process_group
        fk = dict(device=device, dtype=dtype)
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.causal, self.kernel = causal, kernel
        self.center, self.normalize, self.eps = center, normalize, eps
        self.scale = self.head_dim ** -0.5 if scale is None else float(scale)
        self.tile_size = _args.tile_size(tile_size, chunk_size) or None
        self.penalty_window = penalty_window
        self.q_proj = nn.Linear(embed_dim, num_heads * self.head_dim, bias=bias, **fk)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, bias=bias, **fk)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, bias=bias, **fk)
        self.out_proj = nn.Linear(num_heads * self.head_dim, embed_dim, bias=bias, **fk)
        if learnable_shift:
            self.shift = nn.Parameter(torch.full((num_heads,), float(shift), **fk))
        else:
            self.shift = float(shift)

    @property
    def chunk_size(self) -> int | None:
        """Deprecated alias of ``tile_size``."""
        return self.tile_size

    def extra_repr(self) -> str:
        shift = "learnable" if isinstance(self.shift, torch.Tensor) else self.shift
        return (f"kernel={self.kernel!r}, embed_dim={self.embed_dim}, "
                f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"causal={self.causal}, shift={shift}, center={self.center}, "
                f"normalize={self.normalize}")

    def _project(self, x: torch.Tensor):
        B, N, _ = x.shape
        q = self.q_proj(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, N, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, N, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def _kernel_args(self):
        """(shift, center) that the CSQ-family kernels use."""
        if self.kernel == "rebased":
            return 0.0, False
        return self.shift, self.center

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The similarity step alone: q (B, Hq, N, D), k, v (B, Hk, N, D) -> (B, Hq, N, D)."""
        if self.kernel in ("csq", "rebased"):
            dt = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
            shift, center = self._kernel_args()
            q, k, v = (t.to(dt) for t in (q, k, v))  # autocast may leave them mixed
            cp = {} if self.process_group is None else dict(group=self.process_group)
            return (cp_attention if cp else csq_attention)(
                q, k, v, causal=self.causal, scale=self.scale, shift=shift, center=center,
                normalize=self.normalize, eps=self.eps, tile_size=self.tile_size, **cp)
        if self.kernel == "softmax":
            dt = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
            q, k, v = q.to(dt), k.to(dt), v.to(dt)
            if self.num_kv_heads != self.num_heads:
                g = self.num_heads // self.num_kv_heads
                k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
            return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal,
                                                  scale=self.scale)
        return feature_kernel_attention(q, k, v, self.kernel, causal=self.causal,
                                        scale=self.scale, normalize=self.normalize,
                                        eps=self.eps, tile_size=self.tile_size)

    def forward(self, x: torch.Tensor, *, return_penalty: bool = False):
        """x: (B, N, embed_dim) -> (B, N, embed_dim).

        With ``return_penalty=True`` (kernels "csq" and "rebased") also returns
        ``csq_ext.negativity_penalty`` of this layer's q and k with its own scale, shift and
        centering: ``(out, penalty)``.
        """
        B, N, _ = x.shape
        q, k, v = self._project(x)
        y = self.attend(q, k, v)
        # The projections' dtype (the autocast dtype under autocast, else the parameters').
        y = y.to(q.dtype).transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        out = self.out_proj(y)
        if not return_penalty:
            return out
        if self.kernel not in ("csq", "rebased"):
            raise ValueError(f"return_penalty applies to the CSQ kernels ('csq', 'rebased'), "
                             f"not {self.kernel!r}")
        if self.process_group is not None:  # its windows would stop at the shard's edges
            raise ValueError("return_penalty is not available with a process_group")
        shift, center = self._kernel_args()
        penalty = negativity_penalty(q, k, window=self.penalty_window, scale=self.scale,
                                     shift=shift, center=center)
        return out, penalty
