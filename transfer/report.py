"""Tables and plots of bench/results/transfer/ from eval.json, speed.json and the trained
parameters' loss curves: rewrites the generated part of bench/results/transfer.md (between
its markers) and writes embeddings.png, layers.png, curves.png and speed.png.

    python -m transfer.report
"""
from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from . import minilm  # noqa: E402

RESULTS = os.path.join("bench", "results", "transfer")
DOC = os.path.join("bench", "results", "transfer.md")
BEGIN, END = "<!-- begin generated: python -m transfer.report -->", "<!-- end generated -->"


def _load(name):
    path = os.path.join(RESULTS, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _params_meta(variant, folder=minilm.SHIPPED_PARAMS):
    return (_load(os.path.join(folder, f"{variant}.json")) or {}).get("meta")


def embedding_table(results, folder=minilm.SHIPPED_PARAMS) -> list[str]:
    lines = ["| variant | run | cos mean | cos p5 | NN agreement | attention error (mean over "
             "layers) | hidden error, last layer | training s |", "|---|---|---|---|---|---|---|---|"]
    for variant in minilm.VARIANTS:
        for run, r in results.get(variant, {}).items():
            meta = _params_meta(variant, folder) if run == "transferred" else None
            secs = f"{meta['train_seconds']:.0f}" if meta else "-"
            att = sum(r["attention_error"]) / len(r["attention_error"])
            lines.append(f"| {variant} | {run.replace('_', '-')} | {r['cos_mean']:.4f} | "
                         f"{r['cos_p5']:.4f} | {r['nn_agreement']:.3f} | {att:.4f} | "
                         f"{r['hidden_error'][-1]:.4f} | {secs} |")
    return lines


def layer_table(results, key) -> list[str]:
    lines = ["| variant | run | " + " | ".join(f"layer {i}" for i in range(6)) + " |",
             "|---|---|" + "---|" * 6]
    for variant in minilm.VARIANTS:
        for run, r in results.get(variant, {}).items():
            lines.append(f"| {variant} | {run.replace('_', '-')} | "
                         + " | ".join(f"{e:.3f}" for e in r[key]) + " |")
    return lines


def speed_table(rows) -> list[str]:
    lengths = sorted({r["n"] for r in rows})
    models = list(dict.fromkeys(r["model"] for r in rows))
    lines = ["| model | " + " | ".join(f"N = {n}" for n in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for m in models:
        cells = {r["n"]: r for r in rows if r["model"] == m}
        lines.append(f"| {m} | " + " | ".join(
            f"{cells[n]['median_s'] * 1e3:.0f} ms, {cells[n]['peak_rss_above_model_mb']:.0f} MB"
            if n in cells else "-" for n in lengths) + " |")
    return lines


def plots(results, speed):
    variants = [v for v in minilm.VARIANTS if v in results]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, key, title in ((axes[0], "cos_mean", "cosine with original (mean)"),
                           (axes[1], "nn_agreement", "nearest-neighbour agreement")):
        for i, run in enumerate(("zero_shot", "transferred")):
            xs = [j + 0.4 * i for j, v in enumerate(variants) if run in results[v]]
            ys = [results[v][run][key] for v in variants if run in results[v]]
            ax.bar(xs, ys, width=0.4, label=run.replace("_", "-"))
        ax.set_xticks([j + 0.2 for j in range(len(variants))], variants, rotation=30)
        ax.set_title(title)
        ax.set_ylim(0, 1)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "embeddings.png"), dpi=110)

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, v in enumerate(variants):
        for run, style in (("zero_shot", ":"), ("transferred", "-")):
            if run in results[v]:
                ax.plot(range(6), results[v][run]["hidden_error"], style, color=f"C{i}",
                        label=f"{v} ({run.replace('_', '-')})")
    ax.set_xlabel("layer")
    ax.set_ylabel("hidden-state relative squared error")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "layers.png"), dpi=110)

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, v in enumerate(variants):
        meta = _params_meta(v)
        if meta:
            losses = [loss for _, stage, loss in meta["curve"] if stage == "layer"]
            w = 10  # one batch is noisy: a running mean over the last w steps
            smooth = [sum(losses[max(0, j - w + 1):j + 1]) / len(losses[max(0, j - w + 1):j + 1])
                      for j in range(len(losses))]
            ax.plot(range(len(losses)), smooth, color=f"C{i}", label=v,
                    linestyle="--" if v == "csq" else "-")
    ax.set_xlabel("stage-1 step")
    ax.set_ylabel("mean layer attention error\n(training batches, running mean of 10)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "curves.png"), dpi=110)

    if speed:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        for m in dict.fromkeys(r["model"] for r in speed["rows"]):
            rows = [r for r in speed["rows"] if r["model"] == m]
            axes[0].loglog([r["n"] for r in rows], [r["median_s"] for r in rows], "o-", label=m)
            axes[1].semilogx([r["n"] for r in rows],
                             [r["peak_rss_above_model_mb"] for r in rows], "o-", label=m)
        axes[0].set_ylabel("forward seconds (batch 1)")
        axes[1].set_ylabel("peak RSS above loaded model (MB)")
        for ax in axes:
            ax.set_xlabel("sequence length")
        axes[0].legend()
        fig.tight_layout()
        fig.savefig(os.path.join(RESULTS, "speed.png"), dpi=110)


def main():
    ev, speed = _load("eval.json"), _load("speed.json")
    results = ev["results"] if ev else {}
    parts = []
    if ev:
        env = ev["environment"]
        parts += [f"Held-out: {ev['num_sentences']} sentences, {ev['num_passages']} passages "
                  f"(Python {env['python']} stdlib, torch {env['torch']}, commit "
                  f"{(env.get('git_commit') or '')[:10]}).", "",
                  "### Sentence embeddings and layer errors", ""] + embedding_table(results)
        parts += ["", "### Attention error per layer (teacher-forced; the stage-1 objective)", ""]
        parts += layer_table(results, "attention_error")
        parts += ["", "### Hidden-state error per layer (the whole converted model)", ""]
        parts += layer_table(results, "hidden_error")
    stage1 = _load("eval_stage1_only.json")
    if stage1:  # the same training without its end-to-end stage (params in stage1_only/)
        parts += ["", "### Stage 1 alone (no end-to-end steps), same held-out data", ""]
        parts += [line.replace("| transferred |", "| stage 1 only |")
                  for line in embedding_table(stage1["results"], "stage1_only")
                  if "zero-shot" not in line]
    if speed:
        env = speed["environment"]
        parts += ["", f"### Forward time (median of {speed['settings']['reps']}) and peak "
                  f"memory, batch 1, {speed['settings']['threads']} thread(s), "
                  f"{env['cpu']} x {env['cpu_count']}", ""]
        parts += speed_table(speed["rows"])
    plots(results, speed)
    with open(DOC) as f:
        doc = f.read()
    head, rest = doc.split(BEGIN)
    _, tail = rest.split(END)
    with open(DOC, "w") as f:
        f.write(head + BEGIN + "\n" + "\n".join(parts) + "\n" + END + tail)
    print("\n".join(parts))


if __name__ == "__main__":
    main()
