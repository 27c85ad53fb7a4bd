"""Generation through transformers: CSQCache beside transformers' DynamicCache + SDPA.

The same tiny randomly initialised Llama-style model (same weights) generates greedily with
``model.generate``, once with csq attention and a ``csq_ext.hf.CSQCache``, once with SDPA and
a ``DynamicCache``. A logits processor records the clock and the cache's bytes at every
generated token; the table gives, at each checkpoint (100 ... 2000 generated tokens), the
median time per token over the window of tokens before it and the cache memory at that point.
CSQ's time and memory per token stay flat in the length; the KV cache grows linearly.

    python bench/bench_hf_generate.py                        # cuda if present, else cpu
    python bench/bench_hf_generate.py --device cpu --tokens 2000 --json out.json --md out.md
    python bench/bench_hf_generate.py --device cpu --threads 1   # tiny matrices: one thread
    python bench/bench_hf_generate.py --quick                # a few seconds, a smoke run
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, LogitsProcessor  # noqa: E402

from csq_ext import hf  # noqa: E402
from csq_ext._timing import device_description, synchronize  # noqa: E402

CHECKPOINTS = [100, 250, 500, 1000, 1500, 2000]


class StepRecorder(LogitsProcessor):
    """Called once per generated token: records the time and the cache's bytes."""

    def __init__(self, device, cache_bytes):
        self.device, self.cache_bytes, self.times, self.bytes = device, cache_bytes, [], []

    def __call__(self, input_ids, scores):
        synchronize(self.device)
        self.times.append(time.perf_counter())
        self.bytes.append(self.cache_bytes())
        return scores


def dynamic_cache_bytes(cache: DynamicCache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers
               if getattr(layer, "keys", None) is not None)


def run(model, cache, cache_bytes, prompt, tokens, device):
    recorder = StepRecorder(device, lambda: cache_bytes(cache))
    with torch.no_grad():
        model.generate(prompt, past_key_values=cache, max_new_tokens=tokens,
                       min_new_tokens=tokens, do_sample=False, pad_token_id=0,
                       logits_processor=[recorder])
    # times[t] is taken after token t + 1's logits: the step time of token t + 1 is
    # times[t] - times[t - 1] (the first token, the prefill, has no step time).
    steps = [b - a for a, b in zip(recorder.times, recorder.times[1:])]
    return steps, recorder.bytes


def window(steps, end, width):
    """Median seconds per token over the `width` tokens ending at generated token `end`."""
    part = steps[max(0, end - 1 - width):end - 1]
    return statistics.median(part)


def build(args, attn, device, dtype):
    hf.register()
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                      intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                      max_position_embeddings=args.prompt + args.tokens + 8, pad_token_id=0,
                      eos_token_id=None, bos_token_id=None)
    torch.manual_seed(0)  # the same weights for both attention implementations
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=dtype).to(device).eval()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--tokens", type=int, default=2000)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--window", type=int, default=50, help="tokens per median")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's); 1 suits these tiny matrices")
    p.add_argument("--quick", action="store_true", help="60 tokens, a smoke run")
    p.add_argument("--json", default=None)
    p.add_argument("--md", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.window = 60, 10
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    checkpoints = [c for c in CHECKPOINTS if c <= args.tokens] or [args.tokens]
    if args.quick:
        checkpoints = [20, 60]

    prompt = torch.randint(1, args.vocab, (args.batch, args.prompt),
                           generator=torch.Generator().manual_seed(1)).to(device)
    results = {}
    for name, attn, make_cache, cache_bytes in (
            ("csq", "csq", lambda m: hf.CSQCache(m.config), lambda c: c.nbytes),
            ("sdpa", "sdpa", lambda m: DynamicCache(config=m.config), dynamic_cache_bytes)):
        model = build(args, attn, device, dtype)
        run(model, make_cache(model), cache_bytes, prompt, min(args.tokens, 32), device)  # warm-up
        steps, sizes = run(model, make_cache(model), cache_bytes, prompt, args.tokens, device)
        results[name] = {"ms_per_token": [1e3 * window(steps, c, args.window) for c in checkpoints],
                         "cache_bytes": [sizes[c - 1] for c in checkpoints]}

    rows = [{"tokens": c, **{f"{n}_ms": results[n]["ms_per_token"][i] for n in results},
             **{f"{n}_cache_mb": results[n]["cache_bytes"][i] / 2**20 for n in results}}
            for i, c in enumerate(checkpoints)]
    out = {"benchmark": "hf_generate", "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "device": device_description(device), "transformers": transformers.__version__,
           "config": {k: getattr(args, k) for k in ("dtype", "batch", "prompt", "hidden", "layers",
                                                     "heads", "kv_heads", "vocab", "window")},
           "rows": rows}
    lines = [f"Generation with transformers {transformers.__version__} on "
             f"{out['device'].get('name', device.type)}, {args.dtype}, batch {args.batch}, "
             f"{args.layers} layers, {args.heads} heads of {args.hidden // args.heads} "
             f"({args.kv_heads} kv), median ms/token over the {args.window} tokens before each row",
             "", "| generated | CSQCache ms/token | CSQCache MiB | SDPA+DynamicCache ms/token | "
             "DynamicCache MiB |", "|---|---|---|---|---|"]
    lines += [f"| {r['tokens']} | {r['csq_ms']:.3f} | {r['csq_cache_mb']:.3f} | {r['sdpa_ms']:.3f} | "
              f"{r['sdpa_cache_mb']:.3f} |" for r in rows]
    table = "\n".join(lines)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(table + "\n")
    print(table)
    return out


if __name__ == "__main__":
    main()
