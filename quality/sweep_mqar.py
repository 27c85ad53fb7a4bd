"""MQAR accuracy over kernels x sequence lengths x key-value pairs (x learning rates).

    python -m quality.sweep_mqar --out-dir quality/results/mqar
    python -m quality.sweep_mqar --kernels csq,softmax --seq-lens 64,128 --kv-pairs 4,8 \\
        --lrs 1e-3,3e-3 --steps 1000 --out-dir /tmp/mqar_small

Runs one configuration after another in this process (never in parallel), each through
``quality.train_mqar.run`` with every other option as given here (the same options as
train_mqar). Each run's JSON goes to ``OUT_DIR/runs/``; a run whose JSON exists is not run
again unless ``--overwrite 1``, so an interrupted sweep resumes where it stopped. With several
learning rates a cell reports the best final accuracy over them (as the Zoology study does).
Combinations with ``4 * kv > seq_len`` are skipped (MQAR needs room for the queries).

Writes ``OUT_DIR/summary.json`` (every cell, with the environment), ``OUT_DIR/table.md``
(accuracy, one table per sequence length) and ``OUT_DIR/accuracy.png`` (accuracy against
key-value pairs, one panel per sequence length, one line per kernel).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

from bench.plot_colors import color
from quality.common import (add_config_args, config_from_args, environment, parse_list,
                            write_json)
from quality.train_mqar import MQARConfig, run as run_mqar


def run_name(kernel: str, seq_len: int, kv: int, lr: float) -> str:
    return f"{kernel}_N{seq_len}_kv{kv}_lr{lr:g}"


def sweep(base: MQARConfig, kernels, seq_lens, kv_pairs, lrs, out_dir: str, *,
          overwrite: bool = False, verbose: bool = True) -> dict:
    os.makedirs(os.path.join(out_dir, "runs"), exist_ok=True)
    say = print if verbose else (lambda *a, **k: None)
    plan = [(k, n, kv, lr) for n in seq_lens for kv in kv_pairs for k in kernels for lr in lrs
            if 4 * kv <= n]
    say(f"sweep: {len(plan)} runs")
    runs = []
    t0 = time.perf_counter()
    for i, (k, n, kv, lr) in enumerate(plan):
        path = os.path.join(out_dir, "runs", run_name(k, n, kv, lr) + ".json")
        if os.path.exists(path) and not overwrite:
            with open(path) as f:
                res = json.load(f)
            say(f"[{i + 1}/{len(plan)}] {run_name(k, n, kv, lr)}: exists, "
                f"accuracy {res['accuracy']:.4f}")
        else:
            say(f"[{i + 1}/{len(plan)}] {run_name(k, n, kv, lr)} "
                f"({time.perf_counter() - t0:.0f} s into the sweep)")
            cfg = dataclasses.replace(base, kernel=k, seq_len=n, num_kv_pairs=kv, lr=lr,
                                      out=path)
            res = run_mqar(cfg, verbose=verbose)
        runs.append({"kernel": k, "seq_len": n, "num_kv_pairs": kv, "lr": lr,
                     "accuracy": res["accuracy"], "best_accuracy": res["best_accuracy"],
                     "diverged_at": res["diverged_at"], "params": res["params"],
                     "sec_per_step": res["sec_per_step"], "file": os.path.relpath(path, out_dir)})

    cells = {}
    for r in runs:  # best final accuracy over learning rates
        key = (r["kernel"], r["seq_len"], r["num_kv_pairs"])
        if key not in cells or r["accuracy"] > cells[key]["accuracy"]:
            cells[key] = r
    summary = {"task": "mqar-sweep", "base_config": dataclasses.asdict(base),
               "kernels": kernels, "seq_lens": seq_lens, "kv_pairs": kv_pairs, "lrs": lrs,
               "environment": environment(base.device), "runs": runs,
               "best": list(cells.values())}
    write_json(os.path.join(out_dir, "summary.json"), summary)
    md = markdown(cells, kernels, seq_lens, kv_pairs, base, lrs)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(md)
    plot(cells, kernels, seq_lens, kv_pairs, os.path.join(out_dir, "accuracy.png"), base)
    say(md)
    say(f"wrote {out_dir}/summary.json, table.md, accuracy.png")
    return summary


def markdown(cells, kernels, seq_lens, kv_pairs, base: MQARConfig, lrs) -> str:
    env = environment(base.device)
    out = [f"MQAR test accuracy (final step; best over learning rates {lrs}). "
           f"d_model={base.d_model}, {base.n_layers} layers, {base.num_heads} heads, "
           f"short_conv={base.short_conv}, vocab={base.vocab_size}, steps={base.steps}, "
           f"batch={base.batch_size}, seed={base.seed}. torch {env['torch']}, "
           f"device {base.device}.", ""]
    for n in seq_lens:
        kvs = [kv for kv in kv_pairs if 4 * kv <= n]
        if not kvs:
            continue
        out.append(f"seq_len = {n}")
        out.append("")
        out.append("| kernel | " + " | ".join(f"kv={kv}" for kv in kvs) + " |")
        out.append("|---|" + "---|" * len(kvs))
        for k in kernels:
            vals = []
            for kv in kvs:
                c = cells.get((k, n, kv))
                vals.append("-" if c is None else f"{c['accuracy']:.3f}"
                            + (" (diverged)" if c["diverged_at"] is not None else ""))
            out.append(f"| {k} | " + " | ".join(vals) + " |")
        out.append("")
    return "\n".join(out)


def plot(cells, kernels, seq_lens, kv_pairs, path: str, base: MQARConfig) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ns = [n for n in seq_lens if any(4 * kv <= n for kv in kv_pairs)]
    fig, axes = plt.subplots(1, max(1, len(ns)), figsize=(4 * max(1, len(ns)), 3.4),
                             squeeze=False, sharey=True)
    for ax, n in zip(axes[0], ns):
        for k in kernels:
            pts = [(kv, cells[(k, n, kv)]["accuracy"]) for kv in kv_pairs
                   if (k, n, kv) in cells]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=k, color=color(k))
        ax.set_xscale("log", base=2)
        ax.set_title(f"seq_len {n}", fontsize=9)
        ax.set_xlabel("key-value pairs")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"MQAR, d_model {base.d_model}, {base.n_layers} layers, {base.steps} steps",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernels", default="csq,softmax,linear,taylor,rebased")
    parser.add_argument("--seq-lens", default="64,128,256")
    parser.add_argument("--kv-pairs", default="4,8,16")
    parser.add_argument("--lrs", default="3e-3", help="comma-separated learning rates")
    parser.add_argument("--out-dir", default="quality/results/mqar")
    parser.add_argument("--overwrite", type=int, default=0)
    add_config_args(parser, MQARConfig, skip=("kernel", "seq_len", "num_kv_pairs", "lr", "out"))
    args = parser.parse_args(argv)
    base = config_from_args(MQARConfig, args)
    return sweep(base, parse_list(args.kernels), parse_list(args.seq_lens, int),
                 parse_list(args.kv_pairs, int), parse_list(args.lrs, float), args.out_dir,
                 overwrite=bool(args.overwrite))


if __name__ == "__main__":
    main()
