"""Tiny CSQ checkpoints and their transformers references, shared by the vLLM plugin's tests
(tests/test_vllm_*.py). Imported only where vLLM is installed (the tests skip otherwise).

A checkpoint is what a user has: a transformers model converted by csq_ext.hf.convert (with
trained CSQ tensors set to random values, so that every one matters), saved with
save_pretrained in the format of docs/saved_models.md. The reference is transformers'
greedy generate() with a CSQCache on the same in-memory model."""
from __future__ import annotations

import json
import os

import torch

VOCAB = 256
ENGINE_MEMORY = 64 << 20  # bytes of state cache: far more than the tests' requests need
# Memory the engine may claim on this shared machine (vLLM's CPU backend reserves a fraction).
GPU_MEMORY_UTILIZATION = 0.05


def tiny_model(arch: str, seed: int = 0):
    """A random float32 Llama or Qwen2 of 2 layers, 4 query and 2 key/value heads of 16."""
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
                  tie_word_embeddings=False,
                  # No end-of-sequence token: generate() would stop at it or, asked for a
                  # minimum length, suppress it, where vLLM (ignore_eos) keeps the argmax.
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    else:
        raise ValueError(arch)
    with torch.no_grad():  # larger logits: greedy choices far from ties
        model.lm_head.weight.mul_(8.0)
    return model.float().eval()


def converted(arch: str, *, learnable_shift=False, head_scale=False, adapter_rank=0,
              seed: int = 0, **options):
    """tiny_model(arch) converted to CSQ, its trained CSQ tensors set to random values."""
    from csq_ext.hf import convert
    from csq_ext.hf.transfer import add_transfer_parameters

    model = tiny_model(arch, seed)
    convert(model, learnable_shift=learnable_shift, **options)
    if head_scale or adapter_rank:
        add_transfer_parameters(model, head_scale=head_scale, adapter_rank=adapter_rank)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            last = name.rsplit(".", 1)[-1]
            if last == "csq_shift":
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif last == "csq_head_scale":
                p.copy_(0.75 + 0.5 * torch.rand(p.shape, generator=g))
            elif last == "csq_lora_b":
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def save_checkpoint(model, dirname: str) -> str:
    """save_pretrained, in the format of docs/saved_models.md. A csq_ext whose convert() does
    not record the conversion yet (before that format landed) gets the record written here
    from the modules' attributes, and parametrized q/k weights renamed to the format's
    names; with the format in place this is save_pretrained alone."""
    model.save_pretrained(dirname)
    path = os.path.join(dirname, "config.json")
    with open(path) as f:
        config = json.load(f)
    if "csq_attention" not in config:
        _write_record(model, config, dirname)
        with open(path, "w") as f:
            json.dump(config, f, indent=2)
    return dirname


def _write_record(model, config, dirname):
    from safetensors.torch import load_file, save_file

    from csq_ext.hf.convert import attention_modules

    m = attention_modules(model)[0]
    shift = getattr(m, "csq_shift", 1.0)
    learnable = isinstance(shift, torch.Tensor)
    rank = 0
    q = getattr(m, "q_proj", None)
    if q is not None and hasattr(q, "parametrizations"):
        rank = q.parametrizations.weight[0].csq_lora_a.shape[0]
    config["attn_implementation"] = "csq"
    config["csq_attention"] = {
        "format": "csq_ext.hf/1", "kernel": getattr(m, "csq_kernel", "csq"),
        "shift": 1.0 if learnable else float(shift), "learnable_shift": learnable,
        "center": bool(getattr(m, "csq_center", True)), "eps": float(getattr(m, "csq_eps", 1e-6)),
        "head_scale": hasattr(m, "csq_head_scale"), "adapter_rank": rank,
        "csq_ext_version": "0.1.0"}
    file = os.path.join(dirname, "model.safetensors")
    tensors = load_file(file)
    renamed = {}
    for name, t in tensors.items():
        name = name.replace(".parametrizations.weight.original", ".weight")
        name = name.replace(".parametrizations.weight.0.", ".")
        renamed[name] = t
    save_file(renamed, file, metadata={"format": "pt"})


def prompts(lengths, seed: int = 0):
    """Token id lists of the given lengths."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(model, prompt_ids, max_new_tokens) -> list[list[int]]:
    """transformers' greedy generate with a CSQCache, one prompt at a time: the new tokens."""
    from csq_ext.hf import CSQCache

    out = []
    for ids, n in zip(prompt_ids, max_new_tokens):
        with torch.no_grad():
            seq = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                 past_key_values=CSQCache(model.config))
        assert seq.shape[1] == len(ids) + n
        out.append(seq[0, len(ids):].tolist())
    return out


def engine(dirname: str, **kwargs):
    """vllm.LLM over a tiny checkpoint, small enough for a shared CPU machine."""
    import vllm

    args = dict(model=dirname, skip_tokenizer_init=True, dtype="float32", max_model_len=512,
                gpu_memory_utilization=GPU_MEMORY_UTILIZATION,
                kv_cache_memory_bytes=ENGINE_MEMORY, seed=0)
    args.update(kwargs)
    return vllm.LLM(**args)


def vllm_greedy(llm, prompt_ids, max_new_tokens) -> list[list[int]]:
    """Greedy tokens of all prompts submitted together (continuous batching)."""
    import vllm

    params = [vllm.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
              for n in max_new_tokens]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params)
    return [list(o.outputs[0].token_ids) for o in outs]
