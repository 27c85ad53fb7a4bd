"""CSQStateAttention: CSQ attention as a vLLM state layer (MambaBase), in place of a softmax
attention layer with its KV cache.

vLLM's hybrid cache manager gives every running request one page of each state layer's cache,
whatever its length: here a CSQState of (Hk, F, Dv + 1) sums and (Hk, Dk) ref per page, so
the cache of all pages is a state pool (csq_ext.pool). Each step, the layer runs the decoding
requests through csq_ext.pool_decode_ and the prefilling ones (new prompts, or the next piece
of a prompt split by chunked prefill) through csq_ext.pool_prefill_, both in place on the
requests' pages (CSQStateMetadata). A finished request's page goes back to vLLM and is reused
by a later request, which starts fresh (has_initial_state False) whatever the page holds."""
from __future__ import annotations

import torch
from torch import nn
from vllm.config import get_current_vllm_config
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.utils.torch_utils import direct_register_custom_op
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

from ..pool import pool_decode_, pool_prefill_
from ..state import CSQState, num_features
from .backend import NAME as BACKEND_NAME
from .record import CSQRecord


def state_shapes(heads_k: int, dim_k: int, dim_v: int):
    """The page layout of one request's state: sums (Hk, F, Dv + 1) and ref (Hk, Dk)."""
    return ((heads_k, num_features(dim_k), dim_v + 1), (heads_k, dim_k))


def state_dtypes(model_dtype: torch.dtype):
    """float32 states (float64 for a float64 model), whatever the model's dtype."""
    acc = torch.float64 if model_dtype == torch.float64 else torch.float32
    return (acc, acc)


class CSQStateAttention(MambaBase, nn.Module):
    """q (T, Hq * Dk), k (T, Hk * Dk), v (T, Hk * Dv) of a step -> (T, Hq * Dv): causal CSQ
    attention of each request's tokens after everything its state holds. ``shift`` and
    ``head_scale`` are the owning attention module's trained tensors (Hq,) of this rank's heads,
    or None (``record.shift``; no head scale)."""

    def __init__(self, num_heads: int, head_size: int, num_kv_heads: int, scale: float,
                 record: CSQRecord, prefix: str, shift: nn.Parameter | None = None,
                 head_scale: nn.Parameter | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_size = num_heads, num_kv_heads, head_size
        self.scale, self.record, self.prefix = float(scale), record, prefix
        # Not submodules' parameters: they belong to (and are loaded into) the attention module.
        self._shift, self._head_scale = [shift], [head_scale]
        vllm_config = get_current_vllm_config()
        self.model_dtype = vllm_config.model_config.dtype
        context = vllm_config.compilation_config.static_forward_context
        if prefix in context:
            raise ValueError(f"Duplicate layer name: {prefix}")
        context[prefix] = self
        self.kv_cache = (torch.tensor([]), torch.tensor([]))

    # ---- MambaBase: what the cache manager allocates per request
    def get_state_shape(self):
        return state_shapes(self.num_kv_heads, self.head_size, self.head_size)

    def get_state_dtype(self):
        return state_dtypes(self.model_dtype)

    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        return MambaAttentionBackendEnum[BACKEND_NAME]

    # ---- the computation
    def _options(self, acc: torch.dtype) -> dict:
        shift = self._shift[0]
        shift = self.record.attention_shift if shift is None else shift.to(acc).contiguous()
        return dict(scale=self.scale, shift=shift, center=self.record.attention_center,
                    eps=self.record.eps)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty(q.shape[0], self.num_heads * self.head_size, dtype=q.dtype,
                          device=q.device)
        # One opaque operator: torch.compile (vLLM's default) must not trace into attend(),
        # whose work depends on the step's metadata, and splits its graphs there.
        torch.ops.vllm.csq_state_attention(q, k, v, out, self.prefix)
        return out

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               out: torch.Tensor) -> None:
        T, H, Hk, D = q.shape[0], self.num_heads, self.num_kv_heads, self.head_size
        metadata = get_forward_context().attn_metadata
        md = metadata.get(self.prefix) if isinstance(metadata, dict) else None
        if md is None:  # a profiling run without requests: nothing to attend to
            out.zero_()
            return
        q, k, v = q.view(T, H, D), k.view(T, Hk, D), v.view(T, Hk, D)
        if self._head_scale[0] is not None:
            q = q * self._head_scale[0].to(q.dtype).view(1, H, 1)
        pool = CSQState(*self.kv_cache)
        options = self._options(pool.sums.dtype)
        nd, n = md.num_decode_tokens, md.num_decode_tokens + md.num_prefill_tokens
        if n < T:
            out[n:].zero_()  # padding tokens of the step
        if md.num_decodes:
            def rows(x):  # (B, H, 1, D) views
                return x[:nd].unsqueeze(2)
            pool_decode_(rows(q), rows(k), rows(v), pool, md.decode_slots,
                         has_initial_state=md.decode_has_initial_state,
                         out=out[:nd].view(nd, H, 1, D), **options)
        if md.num_prefills:
            def packed(x):  # (1, H, T_p, D) views
                return x[nd:n].transpose(0, 1).unsqueeze(0)
            y = pool_prefill_(packed(q), packed(k), packed(v), md.prefill_cu_seqlens, pool,
                              md.prefill_slots,
                              has_initial_state=md.prefill_has_initial_state, **options)
            out[nd:n].view(n - nd, H, D).copy_(y[0].transpose(0, 1))


def _csq_state_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                         layer_name: str) -> None:
    get_forward_context().no_compile_layers[layer_name].attend(q, k, v, out)


def _csq_state_attention_fake(q, k, v, out, layer_name) -> None:
    return None


# vllm::csq_state_attention, one of the ops vLLM's compiled graphs split at (plugin.py).
OP_NAME = "csq_state_attention"
direct_register_custom_op(op_name=OP_NAME, op_func=_csq_state_attention, mutates_args=["out"],
                          fake_impl=_csq_state_attention_fake)
