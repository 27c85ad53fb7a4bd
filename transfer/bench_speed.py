"""Time and peak memory of one forward of all-MiniLM-L6-v2 (batch 1, no gradients) at sequence
lengths 128 to 4096: the original (SDPA softmax) against each converted kernel.

The model's learned positions end at 512. Longer inputs repeat the position table (position
i uses embedding i mod 512) and the tokens of the held-out text; the output is meaningless
past 512, but the cost per length is what this measures.

Each model runs in its own fresh process, lengths in increasing order, so its peak resident
memory (getrusage) above the loaded model's is that of the largest forward so far. The model
is converted in place (no freed copy whose memory a forward could reuse unseen), and glibc's
mmap threshold is fixed at 128 KiB (MALLOC_MMAP_THRESHOLD_), so every tensor of the forward
is mapped and unmapped on its own and the resident peak follows the live tensors.

    python -m transfer.bench_speed --threads 1 --reps 5    # -> bench/results/transfer/speed.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MODELS = ["softmax", "csq", "rebased", "taylor", "linear"]


def max_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(kind: str, lengths, reps: int, threads: int) -> list[dict]:
    import torch

    from . import minilm, text
    torch.set_num_threads(threads)
    tokenizer, model = minilm.load()
    table = model.embeddings.position_embeddings.weight.data
    reps_needed = -(-max(lengths) // table.shape[0])
    model.embeddings.position_embeddings = torch.nn.Embedding.from_pretrained(
        table.repeat(reps_needed, 1))
    # BERT reads positions from this buffer (its token-type buffer stops at 512: pass zeros).
    model.embeddings.position_ids = torch.arange(reps_needed * table.shape[0])[None]
    if kind != "softmax":
        model = minilm.converted(model, kind, inplace=True)
    ids = tokenizer(" ".join(text.passages(heldout=True)[:2000]), return_tensors="pt",
                    add_special_tokens=False)["input_ids"][0]
    base = max_rss_mb()
    rows = []
    for n in lengths:
        x = ids[:n][None]
        times = []
        with torch.no_grad():
            for r in range(reps + 1):
                t0 = time.perf_counter()
                model(input_ids=x, attention_mask=torch.ones_like(x),
                      token_type_ids=torch.zeros_like(x))
                if r:  # the first run is a warm-up
                    times.append(time.perf_counter() - t0)
        rows.append({"model": kind, "n": n, "median_s": statistics.median(times),
                     "min_s": min(times), "peak_rss_above_model_mb": max_rss_mb() - base})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="128,256,512,1024,2048,4096")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join("bench", "out", "transfer", "speed.json"),
                    help="JSON path (the committed one: bench/results/transfer/speed.json)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: one model
    args = ap.parse_args(argv)
    lengths = [int(n) for n in args.lengths.split(",")]
    if args.one:
        measure(args.one, lengths, args.reps, args.threads)
        return
    rows = []
    for kind in args.models.split(","):
        proc = subprocess.run([sys.executable, "-m", "transfer.bench_speed", "--one", kind,
                               "--lengths", args.lengths, "--reps", str(args.reps),
                               "--threads", str(args.threads)],
                              capture_output=True, text=True, check=True,
                              env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
        rows += [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    from quality.common import environment, write_json
    write_json(args.out, {"settings": vars(args), "environment": environment(), "rows": rows})
    print(f"{'model':8s} " + " ".join(f"{n:>14d}" for n in lengths))
    for kind in args.models.split(","):
        cells = [r for r in rows if r["model"] == kind]
        print(f"{kind:8s} " + " ".join(f"{r['median_s'] * 1e3:8.0f}ms {r['peak_rss_above_model_mb']:4.0f}M"
                                       for r in cells))


if __name__ == "__main__":
    main()
