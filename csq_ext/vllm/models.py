"""vLLM model classes for CSQ checkpoints of Llama and Qwen2 (docs/saved_models.md).

Each is vLLM's own model class, built as vLLM builds it (weights, rotary embeddings, norms,
tensor parallelism), with every softmax attention layer (``self_attn.attn``, a KV-cache layer)
replaced by a CSQStateAttention before the weights load, and the checkpoint's trained CSQ
tensors added to the attention modules under their saved names:

* ``self_attn.csq_shift`` (Hq,): per-head shift (``learnable_shift``);
* ``self_attn.csq_head_scale`` (Hq,): per-head factor on the query (``head_scale``);
* ``self_attn.{q,k}_proj.csq_lora_{a,b}``: low-rank adapters (``adapter_rank``), which vLLM's
  weight mapping sends to the fused ``qkv_proj`` with shard id "q" / "k"; their term
  ``(x A^T) B^T`` is added to the projection's q and k outputs.

The classes declare no KV cache at all (IsAttentionFree) and a state per request
(HasInnerState): vLLM's cache manager then sizes every request's cache as one page of
states, whatever its length."""
from __future__ import annotations

import torch
from torch import nn
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.interfaces import HasInnerState, IsAttentionFree
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

from .layer import CSQStateAttention, state_dtypes, state_shapes
from .record import CSQRecord, read_record


def _text_config(vllm_config):
    return vllm_config.model_config.hf_config.get_text_config()


def _head_sharded_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    """A per-query-head tensor (Hq,) of the checkpoint into this rank's heads."""
    n, rank = param.shape[0], get_tensor_model_parallel_rank()
    if loaded.shape[0] != n * get_tensor_model_parallel_world_size():
        raise ValueError(f"a per-head CSQ tensor of {loaded.shape[0]} heads does not fit "
                         f"{n} heads per rank")
    param.data.copy_(loaded.narrow(0, rank * n, n))


def _head_parameter(n: int, value: float) -> nn.Parameter:
    p = nn.Parameter(torch.full((n,), value), requires_grad=False)
    p.weight_loader = _head_sharded_loader
    return p


class QKVAdapters:
    """The low-rank adapters of the query and key projections on vLLM's fused qkv_proj: its
    output gains (x A_q^T) B_q^T on the q columns and (x A_k^T) B_k^T on the k columns of
    this rank. Parameters live on qkv_proj (csq_lora_a (2, r, in): A_q, A_k; csq_lora_b
    (q_size + k_size, r): this rank's rows of B_q then B_k), loaded by shard id."""

    def __init__(self, qkv_proj: nn.Module, rank: int):
        tp_rank = get_tensor_model_parallel_rank()
        d = qkv_proj.head_size
        self.q_rows = qkv_proj.num_heads * d
        self.k_rows = qkv_proj.num_kv_heads * d
        self.q_start = tp_rank * self.q_rows
        kv_rank = tp_rank // qkv_proj.num_kv_head_replicas  # KV heads replicate when Hk < tp
        self.k_start = kv_rank * self.k_rows
        dtype = qkv_proj.weight.dtype if hasattr(qkv_proj, "weight") else None
        a = nn.Parameter(torch.zeros(2, rank, qkv_proj.input_size, dtype=dtype),
                         requires_grad=False)
        b = nn.Parameter(torch.zeros(self.q_rows + self.k_rows, rank, dtype=dtype),
                         requires_grad=False)
        a.weight_loader, b.weight_loader = self._load_a, self._load_b
        qkv_proj.register_parameter("csq_lora_a", a)
        qkv_proj.register_parameter("csq_lora_b", b)
        self.a, self.b = a, b  # plain references: the parameters are qkv_proj's
        qkv_proj.register_forward_hook(self._add)

    @staticmethod
    def _shard(loaded, shard_id):
        # vLLM passes the shard id ("q", "k", "v") as an argument or on the tensor.
        shard = shard_id if shard_id is not None else getattr(loaded, "shard_id", None)
        if shard not in ("q", "k"):
            raise ValueError(f"csq_lora tensors belong to q_proj or k_proj, got shard {shard!r}")
        return shard

    def _load_a(self, param, loaded, shard_id=None):
        param.data[0 if self._shard(loaded, shard_id) == "q" else 1].copy_(loaded)

    def _load_b(self, param, loaded, shard_id=None):
        if self._shard(loaded, shard_id) == "q":
            param.data[:self.q_rows].copy_(loaded.narrow(0, self.q_start, self.q_rows))
        else:
            param.data[self.q_rows:].copy_(loaded.narrow(0, self.k_start, self.k_rows))

    def _add(self, module, args, output):
        x = args[0]
        out, bias = output if isinstance(output, tuple) else (output, None)
        q = (x @ self.a[0].t().to(x.dtype)) @ self.b[:self.q_rows].t().to(x.dtype)
        k = (x @ self.a[1].t().to(x.dtype)) @ self.b[self.q_rows:].t().to(x.dtype)
        out = out.clone()
        out[..., :self.q_rows] += q
        out[..., self.q_rows:self.q_rows + self.k_rows] += k
        return (out, bias) if isinstance(output, tuple) else out


def install_csq(model: nn.Module, vllm_config) -> int:
    """Replaces every softmax Attention of `model` (attribute ``attn`` of its attention
    modules) by a CSQStateAttention and adds the record's CSQ tensors; returns how many."""
    record: CSQRecord = read_record(_text_config(vllm_config))
    context = vllm_config.compilation_config.static_forward_context
    count = 0
    for module in list(model.modules()):
        attn = getattr(module, "attn", None)
        if not isinstance(attn, Attention):
            continue
        name = attn.layer_name
        context.pop(name, None)  # the softmax layer and its KV cache are gone
        heads = attn.num_heads
        shift = head_scale = None
        if record.learnable_shift:
            module.csq_shift = shift = _head_parameter(heads, record.shift)
        if record.head_scale:
            module.csq_head_scale = head_scale = _head_parameter(heads, 1.0)
        if record.adapter_rank:
            module.csq_adapters = QKVAdapters(module.qkv_proj, record.adapter_rank)
        scale = getattr(module, "scaling", None) or attn.impl.scale
        module.attn = CSQStateAttention(heads, attn.head_size, attn.num_kv_heads, scale, record,
                                        name, shift=shift, head_scale=head_scale)
        count += 1
    if count == 0:
        raise ValueError(f"{type(model).__name__}: no attention layer to replace by CSQ")
    return count


class CSQModelMixin(HasInnerState, IsAttentionFree):
    """What makes a vLLM decoder a CSQ model: no KV cache, one constant-size state per
    request (the classmethods give its page layout before the model is built)."""

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config):
        cfg = _text_config(vllm_config)
        tp = vllm_config.parallel_config.tensor_parallel_size
        heads = cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return state_shapes(max(1, kv // tp), dim, dim)

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config):
        return state_dtypes(vllm_config.model_config.dtype)


class CSQLlamaForCausalLM(LlamaForCausalLM, CSQModelMixin):
    """A Llama checkpoint converted to CSQ (csq_ext.hf.convert, then save_pretrained)."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        install_csq(self, vllm_config)


class CSQQwen2ForCausalLM(Qwen2ForCausalLM, CSQModelMixin):
    """A Qwen2 checkpoint converted to CSQ (csq_ext.hf.convert, then save_pretrained)."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        install_csq(self, vllm_config)


# The architectures transformers writes (config.json) -> the class serving its CSQ checkpoints.
ROUTES = {"LlamaForCausalLM": "CSQLlamaForCausalLM", "Qwen2ForCausalLM": "CSQQwen2ForCausalLM"}
CLASSES = {"CSQLlamaForCausalLM": CSQLlamaForCausalLM, "CSQQwen2ForCausalLM": CSQQwen2ForCausalLM}
