"""Serving speed in vLLM: a CSQ model (csq_ext.vllm) against the same architecture with
softmax attention, both served by vLLM on this machine: prefill and decode tokens/s and the
per-token decode latency, at contexts of 1K, 4K, 16K and 32K tokens with 1, 8 and 32
concurrent requests.

The models are random-weight Llamas of one size (--layers, --hidden, --heads, --kv-heads,
--head-dim, --intermediate), saved once as a softmax checkpoint and, converted by
csq_ext.hf.convert, as a CSQ checkpoint with the same weights. Each model runs in its own
engine (a subprocess). For every (context N, concurrency C):

C new random prompts of N tokens are submitted together and the engine is stepped by hand
(its core in the same process, so that one step() is one scheduler step): vLLM prefills them
in chunks of --batch-tokens (requests whose prompt is done decode meanwhile), then all C
decode together; the next T = --decode-tokens steps are timed and the requests aborted.

    prefill tok/s = C N / (time until the last request's first token)
    decode tok/s  = C T / (time of the T steps in which all C requests decode)
    per-token latency = median time of those steps (each gives every request one token)

Prefix caching is off for both models (a softmax prompt seen before would come from the
cache; CSQ has none). One warm-up run per concurrency at the smallest context precedes the
sweep; up to --repeats runs per point (fewer where they take over --repeat-within-s),
medians reported. A point whose cache (KV blocks or CSQ state pages) does not fit
--cache-gib is recorded as skipped, with the numbers. Results (JSON, with the machine, torch
and vLLM versions), a Markdown table and a plot go to --out (default bench/out/vllm; refuses
bench/results unless --force).

    python bench/bench_vllm.py --smoke          # a tiny model: a check, minutes
    python bench/bench_vllm.py                  # the sweep: hours on 2 cores (docs/vllm.md)
    python bench/bench_vllm.py --contexts 1024 8192 --concurrency 1 8 --repeats 1
                                                # the target's point (>= 8K): ~10 minutes

Run it in the vLLM environment (docs/vllm.md). The machine must be otherwise idle.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTEXTS = [1024, 4096, 16384, 32768]
CONCURRENCY = [1, 8, 32]
# vLLM's CPU softmax attention needs head sizes of 32 or more.
SMOKE = dict(contexts=[64, 200], concurrency=[1, 3], decode_tokens=4, repeats=1, layers=2,
             hidden=128, heads=4, kv_heads=2, head_dim=32, intermediate=256, vocab=256,
             cache_gib=0.25)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "vllm"))
    p.add_argument("--force", action="store_true", help="allow --out under bench/results")
    p.add_argument("--smoke", action="store_true", help="a tiny model and sweep (a check)")
    p.add_argument("--contexts", type=int, nargs="+", default=CONTEXTS)
    p.add_argument("--concurrency", type=int, nargs="+", default=CONCURRENCY)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="runs per point, at most")
    p.add_argument("--repeat-within-s", type=float, default=120.0,
                   help="no further run of a point once its runs took this long (a run at "
                   "32K tokens and 32 requests takes far longer than its noise)")
    p.add_argument("--batch-tokens", type=int, default=4096,
                   help="vLLM's max_num_batched_tokens (the prefill chunk; its CPU default)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    # The softmax model's KV cache at 32 requests of 32K tokens: 8.7 GB (float32).
    p.add_argument("--cache-gib", type=float, default=10.0,
                   help="vLLM cache memory of each engine (KV cache or CSQ states)")
    p.add_argument("--models", nargs="+", default=["softmax", "csq"],
                   choices=["softmax", "csq"])
    # internal: run one model's engine (--engine DIR), write its rows to --engine-out FILE
    p.add_argument("--engine", default=None, help=argparse.SUPPRESS)
    p.add_argument("--engine-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    return args


def build_checkpoints(args, folder):
    """The softmax checkpoint and its CSQ conversion, same weights (random, seeded); made
    anew each run (a few seconds), so that they always have this run's shape."""
    import torch
    import transformers

    import csq_ext.hf

    shutil.rmtree(folder, ignore_errors=True)  # no file of an earlier run's shape stays
    paths = {m: os.path.join(folder, m) for m in ("softmax", "csq")}
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
        max_position_embeddings=max_model_len(args),
        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(paths["softmax"])
    csq_ext.hf.convert(model)
    model.save_pretrained(paths["csq"])
    config_file = os.path.join(paths["csq"], "config.json")
    with open(config_file) as f:
        config = json.load(f)
    if "csq_attention" not in config:  # a csq_ext from before convert() recorded itself
        config["csq_attention"] = {  # convert()'s defaults (docs/saved_models.md)
            "format": "csq_ext.hf/1", "kernel": "csq", "shift": 1.0, "learnable_shift": False,
            "center": True, "eps": 1e-6, "head_scale": False, "adapter_rank": 0}
        with open(config_file, "w") as f:
            json.dump(config, f, indent=2)
    return paths


def max_new_tokens(args, n, c):
    """New tokens asked of each of c requests of n prompt tokens: enough that all c are still
    decoding after the last prompt is prefilled (each request decodes one token per step from
    its first token on, while later prompts are prefilled in chunks of --batch-tokens), plus
    the --decode-tokens measured steps; the requests are aborted after those steps."""
    prefill_steps = -(-c * n // args.batch_tokens) + c
    return prefill_steps + args.decode_tokens + 2


def max_model_len(args):
    return max(n + max_new_tokens(args, n, max(args.concurrency)) for n in args.contexts)


def run_engine(args, model_dir):
    """One model's measurements (in this process: an engine of its own, its core in this
    process too (VLLM_ENABLE_V1_MULTIPROCESSING=0, set by main), so that every step() is one
    scheduler step and its wall time is that step's time)."""
    import time

    import torch
    import vllm

    llm = vllm.LLM(model=model_dir, skip_tokenizer_init=True, dtype=args.dtype,
                   max_model_len=max_model_len(args), max_num_seqs=max(args.concurrency),
                   max_num_batched_tokens=args.batch_tokens,
                   # Prefix caching would serve a softmax prompt seen before from its cache;
                   # CSQ cannot have it (docs/vllm.md). Off for both, and every run's prompts
                   # are new anyway.
                   enable_prefix_caching=False,
                   kv_cache_memory_bytes=int(args.cache_gib * (1 << 30)), seed=0)
    engine = llm.llm_engine
    cache = engine.vllm_config.cache_config
    gen = torch.Generator().manual_seed(1)
    run_id = iter(range(1 << 30))

    def blocks_needed(n, c):
        size = cache.block_size  # CSQ: one page of max_model_len tokens per request
        return c * -(-(n + max_new_tokens(args, n, c)) // size)

    def measure(n, c):
        """One run: c new prompts of n tokens submitted together; the prefill time (until
        the last request's first token) and the times of the next --decode-tokens steps, in
        which every request decodes (checked)."""
        params = vllm.SamplingParams(max_tokens=max_new_tokens(args, n, c), temperature=0.0,
                                     ignore_eos=True)
        ids = []
        for _ in range(c):
            prompt = torch.randint(1, args.vocab, (n,), generator=gen).tolist()
            ids.append(f"r{next(run_id)}")
            engine.add_request(ids[-1], {"prompt_token_ids": prompt}, params)
        started, done, steps = set(), 0, []
        t0 = time.perf_counter()
        prefill_s = None
        while len(steps) < args.decode_tokens:
            t = time.perf_counter()
            outs = engine.step()
            dt = time.perf_counter() - t
            if any(o.finished for o in outs):
                raise RuntimeError("a request finished before the measured decode steps "
                                   "(max_new_tokens too small)")
            if prefill_s is None:
                started |= {o.request_id for o in outs if o.outputs[0].token_ids}
                if len(started) == c:
                    prefill_s = time.perf_counter() - t0
            elif outs:  # a step of c decodes, one token each
                if len(outs) != c:
                    raise RuntimeError(f"a decode step served {len(outs)} of {c} requests")
                steps.append(dt)
        engine.abort_request(ids)
        while engine.has_unfinished_requests():
            engine.step()
        return dict(prefill_s=prefill_s, decode_s=sum(steps),
                    token_latency_s=statistics.median(steps))

    for c in args.concurrency:  # warm-up: compilation and first-touch of each batch size
        if blocks_needed(min(args.contexts), c) < (cache.num_gpu_blocks or 1 << 62):
            measure(min(args.contexts), c)
    rows = []
    for n in args.contexts:
        for c in args.concurrency:
            row = dict(context=n, concurrency=c)
            need = blocks_needed(n, c)
            if cache.num_gpu_blocks is not None and need >= cache.num_gpu_blocks:
                row["skipped"] = (f"the cache holds {cache.num_gpu_blocks} blocks of "
                                  f"{cache.block_size} tokens, {need} needed (--cache-gib)")
                print(json.dumps(row), file=sys.stderr, flush=True)
                rows.append(row)
                continue
            t = time.perf_counter()
            runs = [measure(n, c)]
            while (len(runs) < args.repeats
                   and time.perf_counter() - t < args.repeat_within_s):
                runs.append(measure(n, c))
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            row.update(runs=len(runs), prefill_s=med["prefill_s"], decode_s=med["decode_s"],
                       prefill_tok_s=c * n / med["prefill_s"],
                       decode_tok_s=c * args.decode_tokens / med["decode_s"],
                       token_latency_ms=1e3 * med["token_latency_s"])
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "decode_tok_s", "decode tokens/s"),
                           (axes[1], "prefill_tok_s", "prefill tokens/s")):
        for model, rows in results["models"].items():
            for c in sorted({r["concurrency"] for r in rows}):
                pts = [(r["context"], r[key]) for r in rows
                       if r["concurrency"] == c and key in r]
                if pts:
                    ax.plot(*zip(*pts), marker="o", ls="-" if model == "csq" else "--",
                            label=f"{model}, {c} requests")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"vLLM serving, CSQ vs softmax: {results['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(results) -> str:
    rows = {(m, r["context"], r["concurrency"]): r for m, rs in results["models"].items()
            for r in rs}
    lines = ["| context | requests | decode tok/s softmax | CSQ | ratio | token latency ms "
             "softmax | CSQ | prefill tok/s softmax | CSQ |", "|" + "---|" * 9]
    for n in results["contexts"]:
        for c in results["concurrency"]:
            s, q = rows.get(("softmax", n, c), {}), rows.get(("csq", n, c), {})
            f = lambda r, k: f"{r[k]:.1f}" if k in r else "-"  # noqa: E731
            ratio = (f"{q['decode_tok_s'] / s['decode_tok_s']:.2f}x"
                     if "decode_tok_s" in s and "decode_tok_s" in q else "-")
            lines.append(f"| {n} | {c} | {f(s, 'decode_tok_s')} | {f(q, 'decode_tok_s')} | "
                         f"{ratio} | {f(s, 'token_latency_ms')} | {f(q, 'token_latency_ms')} "
                         f"| {f(s, 'prefill_tok_s')} | {f(q, 'prefill_tok_s')} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.engine:  # a child: one model (vLLM logs to stdout, so rows go to a file)
        rows = run_engine(args, args.engine)
        with open(args.engine_out, "w") as f:
            json.dump(rows, f)
        return
    out = os.path.abspath(args.out)
    if os.path.commonpath([out, os.path.join(ROOT, "bench", "results")]) == \
            os.path.join(ROOT, "bench", "results") and not args.force:
        sys.exit(f"--out {out} is under bench/results (committed results): pass --force")
    try:  # needed at the end, checked before hours of measurements
        import matplotlib  # noqa: F401
    except ImportError:
        sys.exit("bench_vllm.py plots its results: pip install matplotlib")
    os.makedirs(out, exist_ok=True)
    paths = build_checkpoints(args, os.path.join(out, "checkpoints"))
    import torch
    import vllm

    from csq_ext._timing import device_description

    results = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        device=device_description(torch.device("cpu")), torch=torch.__version__,
        vllm=vllm.__version__, dtype=args.dtype, contexts=args.contexts,
        concurrency=args.concurrency, decode_tokens=args.decode_tokens, repeats=args.repeats,
        batch_tokens=args.batch_tokens,
        model=(f"Llama {args.layers} layers, hidden {args.hidden}, {args.heads} heads / "
               f"{args.kv_heads} kv heads of {args.head_dim}, {args.dtype}"),
        command=" ".join(sys.argv), models={})
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
    # The engine core in the child's own process: its step() is then one scheduler step.
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    for model in args.models:
        print(f"== {model}", file=sys.stderr, flush=True)
        rows_file = os.path.join(out, f"{model}.rows.json")
        child = subprocess.run([sys.executable, os.path.abspath(__file__), *forwarded,
                                "--engine", paths[model], "--engine-out", rows_file], env=env)
        if child.returncode != 0:
            sys.exit(f"the {model} engine failed ({child.returncode})")
        with open(rows_file) as f:
            results["models"][model] = json.load(f)
        os.remove(rows_file)
    with open(os.path.join(out, "vllm.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(results, os.path.join(out, "vllm.png"))
    text = table(results)
    with open(os.path.join(out, "vllm.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
