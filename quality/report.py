"""Tables and a plot of the quality study from the JSON that the training scripts wrote.

    python -m quality.report --root bench/results/quality

Reads ``ROOT/mqar/runs/*.json`` (quality.sweep_mqar), ``ROOT/ablate_mqar/*.json``
(quality.ablate_csq) and ``ROOT/lm/lm_cpu.json`` (quality.train_lm); prints markdown tables
and writes ``ROOT/mqar_accuracy.png``. Whatever is missing is left out, never invented.
"""
from __future__ import annotations

import argparse
import glob
import json
import os

from bench.plot_colors import color

KERNELS = ["softmax", "csq", "rebased", "taylor", "linear"]


def load(pattern: str) -> list[dict]:
    runs = []
    for path in sorted(glob.glob(pattern)):
        with open(path) as f:
            run = json.load(f)
        if run.get("task") in ("mqar", "lm"):
            run["_name"] = os.path.splitext(os.path.basename(path))[0]
            runs.append(run)
    return runs


def mqar_table(runs: list[dict]) -> str:
    cells = {}
    for r in runs:
        c = r["config"]
        cells[(c["seq_len"], c["num_kv_pairs"], c["kernel"])] = r
    settings = sorted({(n, kv) for n, kv, _ in cells})
    kernels = [k for k in KERNELS if any(key[2] == k for key in cells)]
    head = "| N | kv pairs | " + " | ".join(kernels) + " |"
    lines = [head, "|" + "---|" * (2 + len(kernels))]
    for n, kv in settings:
        row = [f"{cells[(n, kv, k)]['accuracy']:.3f}" if (n, kv, k) in cells else "-"
               for k in kernels]
        lines.append(f"| {n} | {kv} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def ablation_table(runs: list[dict]) -> str:
    lines = ["| variant | center | shift c | normalize | penalty weight | learnable c | "
             "accuracy | test loss |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: -r["accuracy"]):
        c = r["config"]
        lines.append(f"| {r['_name']} | {c['center']} | {c['shift']} | {c['normalize']} | "
                     f"{c['penalty_weight']} | {c['learnable_shift']} | {r['accuracy']:.4f} | "
                     f"{r['test_loss']:.4f} |")
    return "\n".join(lines)


def lm_table(lm: dict) -> str:
    # No time column: these runs shared the CPU with other jobs, so their seconds say nothing.
    lines = ["| kernel | params | steps | final val loss (nats/byte) | bits/byte |",
             "|---|---|---|---|---|"]
    for kernel, run in lm["runs"].items():
        loss = run["final_val_loss"]
        bits = "-" if loss is None else f"{loss / 0.6931471805599453:.3f}"
        loss_s = "-" if loss is None else f"{loss:.4f}"
        lines.append(f"| {kernel} | {run['params']} | {run['steps_done']} | {loss_s} | {bits} |")
    return "\n".join(lines)


def plot_mqar(runs: list[dict], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(matplotlib missing: {path} not drawn)")
        return
    settings = sorted({(r["config"]["seq_len"], r["config"]["num_kv_pairs"]) for r in runs})
    kernels = [k for k in KERNELS if any(r["config"]["kernel"] == k for r in runs)]
    acc = {(r["config"]["seq_len"], r["config"]["num_kv_pairs"], r["config"]["kernel"]):
           r["accuracy"] for r in runs}
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(kernels)
    for i, k in enumerate(kernels):
        xs = [j + i * width for j in range(len(settings))]
        ax.bar(xs, [acc.get((n, kv, k), 0.0) for n, kv in settings], width, label=k,
               color=color(k))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(settings))])
    ax.set_xticklabels([f"N={n}, kv={kv}" for n, kv in settings])
    ax.set_ylabel("MQAR test accuracy")
    ax.set_ylim(0, 1.05)
    ax.legend(ncol=len(kernels), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    ax.set_title("MQAR, 2 layers, d_model 64, 2000 steps, one seed")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="bench/results/quality")
    args = parser.parse_args()
    mqar = load(os.path.join(args.root, "mqar", "runs", "*.json"))
    if mqar:
        print("## MQAR accuracy\n\n" + mqar_table(mqar) + "\n")
        plot_mqar(mqar, os.path.join(args.root, "mqar_accuracy.png"))
    ablations = load(os.path.join(args.root, "ablate_mqar", "*.json"))
    if ablations:
        print("\n## CSQ ablations (MQAR)\n\n" + ablation_table(ablations) + "\n")
    lm_path = os.path.join(args.root, "lm", "lm_cpu.json")
    if os.path.exists(lm_path):
        with open(lm_path) as f:
            print("\n## Byte-level language model\n\n" + lm_table(json.load(f)) + "\n")


if __name__ == "__main__":
    main()
