"""What vLLM must be configured like to serve a CSQ model, checked (and the state cache set
up) when vLLM finalizes its config, in every process."""
from __future__ import annotations

from vllm.model_executor.models.config import MambaModelConfig, VerifyAndUpdateConfig


class CSQModelConfig(VerifyAndUpdateConfig):
    @classmethod
    def verify_and_update_config(cls, vllm_config) -> None:
        cache = vllm_config.cache_config
        if cache.enable_prefix_caching:
            raise ValueError(
                "csq_ext.vllm: prefix caching is not supported for CSQ models (a request's "
                "state is a sum over all its tokens; a shared prefix's state is not kept): "
                "drop --enable-prefix-caching")
        if vllm_config.num_speculative_tokens:
            raise ValueError("csq_ext.vllm: speculative decoding is not supported for CSQ "
                             "models (a state cannot be rewound after rejected tokens)")
        text = vllm_config.model_config.hf_config.get_text_config()
        window = getattr(text, "sliding_window", None)
        layer_types = getattr(text, "layer_types", None) or []
        if (window and getattr(text, "use_sliding_window", True)) or \
                any(t != "full_attention" for t in layer_types):
            raise ValueError("csq_ext.vllm: CSQ attention is full causal attention; this "
                             f"config asks for sliding windows ({window}, {layer_types})")
        # One page of states per request, for any length (mamba_block_size = max_model_len).
        MambaModelConfig.verify_and_update_config(vllm_config)
