"""The per-step metadata of CSQ layers in vLLM: which requests decode one token and which
prefill (a prompt or a piece of one), the pool slot of each and whether it continues a state.

vLLM's hybrid cache manager gives every running request one block of each state layer's
cache: the block id is the request's slot in the pool. The builder runs once per step for all
CSQ layers (they share one cache spec); the layers only read the result."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.v1.attention.backend import (AttentionBackend, AttentionCGSupport,
                                       AttentionMetadataBuilder, CommonAttentionMetadata)
from vllm.v1.attention.backends.utils import (mamba_get_block_table_tensor,
                                              split_decodes_and_prefills)

NAME = "CSQ_STATE"


class CSQStateBackend(AttentionBackend):
    """The backend of csq_ext.vllm.layer.CSQStateAttention (a state layer: is_ssm)."""

    @staticmethod
    def get_name() -> str:
        return NAME

    @staticmethod
    def get_impl_cls():
        raise NotImplementedError("CSQ state layers compute in their own forward")

    @staticmethod
    def get_builder_cls() -> type["CSQStateMetadataBuilder"]:
        return CSQStateMetadataBuilder

    @classmethod
    def is_ssm(cls) -> bool:
        return True


@dataclass
class CSQStateMetadata:
    """One step of a batch that vLLM ordered decodes first: the first num_decode_tokens tokens
    are num_decodes requests of one token each, the next num_prefill_tokens tokens the
    num_prefills prefilling requests, packed by prefill_cu_seqlens (offsets from the first
    prefill token)."""

    num_decodes: int
    num_decode_tokens: int
    num_prefills: int
    num_prefill_tokens: int
    decode_slots: torch.Tensor | None           # (num_decodes,) int32
    decode_has_initial_state: torch.Tensor | None  # (num_decodes,) bool: False for a 1-token prompt
    prefill_slots: torch.Tensor | None          # (num_prefills,) int32
    prefill_has_initial_state: torch.Tensor | None  # False: a new prompt; True: chunked prefill
    prefill_cu_seqlens: torch.Tensor | None     # (num_prefills + 1,) int64, on the CPU


class CSQStateMetadataBuilder(AttentionMetadataBuilder[CSQStateMetadata]):
    # The pool ops check slot indices on the host: no CUDA-graph capture.
    _cudagraph_support = AttentionCGSupport.NEVER
    reorder_batch_threshold: int = 1

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_reorder_batch_threshold(1)
        self.cache_mode = vllm_config.cache_config.mamba_cache_mode

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False, **kwargs) -> CSQStateMetadata:
        m = common_attn_metadata
        slots = mamba_get_block_table_tensor(m.block_table_tensor, m.seq_lens,
                                             self.kv_cache_spec, self.cache_mode)[:, 0]
        nd, npf, nd_tok, np_tok = split_decodes_and_prefills(m, decode_threshold=1)
        # A request continues its slot's state unless it has computed no token yet (a new
        # prompt, or a one-token prompt that vLLM counts among the decodes).
        has_initial = m.compute_num_computed_tokens()[:nd + npf] > 0
        qsl = m.query_start_loc_cpu
        cu = (qsl[nd:nd + npf + 1] - qsl[nd]).to(torch.int64) if npf else None
        return CSQStateMetadata(
            num_decodes=nd, num_decode_tokens=nd_tok, num_prefills=npf,
            num_prefill_tokens=np_tok,
            decode_slots=slots[:nd] if nd else None,
            decode_has_initial_state=has_initial[:nd] if nd else None,
            prefill_slots=slots[nd:nd + npf] if npf else None,
            prefill_has_initial_state=has_initial[nd:nd + npf] if npf else None,
            prefill_cu_seqlens=cu)
