"""Convert a softmax transformers model to CSQ attention, fine-tune it briefly, and generate
with a constant-size CSQCache. Everything is built from a config: no downloads.

1. A tiny Llama-style model with SDPA attention is trained on a toy language (arithmetic
   progressions modulo the vocabulary: each sequence has its own start and step, so the next
   token is predictable only by attending to earlier ones). It stands in for a pretrained model.
2. ``csq_ext.hf.convert`` switches it to CSQ in place, keeping every weight and adding a
   learnable per-head shift; the loss right after conversion shows what the swap costs.
3. A short fine-tune recovers it.
4. ``model.generate(..., past_key_values=CSQCache(model.config))`` continues held-out prompts.

    python examples/hf_convert.py                       # under a minute on 2 CPU cores
    python examples/hf_convert.py --pretrain-steps 50 --finetune-steps 20   # a quick run
"""
from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

from csq_ext import hf

VOCAB = 64


def progressions(batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """(batch, length) tokens: start + step * position (mod VOCAB), steps 1..4."""
    start = torch.randint(0, VOCAB, (batch, 1), generator=gen)
    step = torch.randint(1, 5, (batch, 1), generator=gen)
    return (start + step * torch.arange(length)) % VOCAB


def train(model, steps: int, lr: float, gen: torch.Generator, label: str) -> float:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for step in range(1, steps + 1):
        ids = progressions(32, 24, gen)
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, steps // 4) == 0 or step == steps:
            print(f"  {label} step {step:4d}: loss {loss.item():.3f}")
    model.eval()
    return loss.item()


@torch.no_grad()
def held_out_loss(model, gen: torch.Generator) -> float:
    ids = progressions(256, 24, gen)
    return model(ids, labels=ids).loss.item()


@torch.no_grad()
def continuation_accuracy(model, cache, prompt_len=6, new=40) -> float:
    """Greedy continuation of held-out prompts (the same ones at every call): the fraction of
    correct tokens."""
    ids = progressions(16, prompt_len + new, torch.Generator().manual_seed(1))
    out = model.generate(ids[:, :prompt_len], past_key_values=cache, max_new_tokens=new,
                         min_new_tokens=new, do_sample=False, pad_token_id=0)
    return (out[:, prompt_len:] == ids[:, prompt_len:]).float().mean().item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pretrain-steps", type=int, default=200)
    p.add_argument("--finetune-steps", type=int, default=100)
    p.add_argument("--shift", type=float, default=1.0)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, pad_token_id=0, bos_token_id=None,
                      eos_token_id=None)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")

    print("1. softmax (SDPA) model, trained as a stand-in for a pretrained one")
    train(model, args.pretrain_steps, 3e-3, gen, "softmax")
    print(f"  held-out loss: {held_out_loss(model, gen):.3f}; greedy continuation accuracy "
          f"(DynamicCache): {continuation_accuracy(model, DynamicCache()):.3f}")

    print("2. convert to CSQ in place (weights kept, learnable per-head shift)")
    hf.convert(model, shift=args.shift, learnable_shift=True)
    print(f"  attn_implementation = {model.config._attn_implementation!r}; "
          f"held-out loss right after conversion: {held_out_loss(model, gen):.3f}")

    print("3. fine-tune with CSQ attention")
    train(model, args.finetune_steps, 1e-3, gen, "csq")
    print(f"  held-out loss: {held_out_loss(model, gen):.3f}")
    shifts = [m.csq_shift.detach() for m in model.modules() if hasattr(m, "csq_shift")]
    print(f"  learned shifts, layer 0: {[round(x, 3) for x in shifts[0].tolist()]}")

    print("4. generate with CSQCache (prefill + in-place decode steps)")
    cache = hf.CSQCache(model.config)
    print(f"  greedy continuation accuracy: {continuation_accuracy(model, cache):.3f}")
    print(f"  CSQCache after {cache.get_seq_length()} positions: {cache.nbytes / 1024:.1f} KiB "
          "(the same at any length)")


if __name__ == "__main__":
    main()
