"""Ablations of CSQ's ingredients: centering, the shift c, normalization, the soft penalty.

    python -m quality.ablate_csq --task mqar --out-dir quality/results/ablate_mqar
    python -m quality.ablate_csq --task lm --steps 1000 --out-dir quality/results/ablate_lm
    python -m quality.ablate_csq --task mqar --variants base,no_center,penalty_0.1 \\
        --steps 500 --out-dir /tmp/ablate

Every variant trains kernel="csq" with the same network, data, initialization and steps as
the others; only the named CSQ option changes from the base (center on, c = 1, normalize on,
no penalty). Variants:

    base                  center=1, shift=1, normalize=1
    no_center             center=0
    shift_0, shift_0.5, shift_2   c in {0, 0.5, 2} (c = 1 is base)
    no_normalize          normalize=0 (outputs are unnormalized sums; may diverge: recorded)
    penalty_W             loss += W * csq_ext.negativity_penalty, per layer, mean over layers
                          (one variant per weight in --penalty-weights)
    learnable_shift       a trainable per-head c, initialized at 1

The task's other options are those of quality/train_mqar.py (``--task mqar``: reports test
accuracy) or quality/train_lm.py (``--task lm``: reports validation loss). Writes
``OUT_DIR/<variant>.json`` (skipped when present, unless ``--overwrite 1``),
``OUT_DIR/summary.json`` and ``OUT_DIR/table.md``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os

from quality.common import (add_config_args, config_from_args, environment, parse_list,
                            write_json)
from quality.train_lm import LMConfig, load_data, train_one
from quality.train_mqar import MQARConfig, run as run_mqar

BASE = dict(center=True, shift=1.0, normalize=True, penalty_weight=0.0, learnable_shift=False)


def variants(penalty_weights) -> dict:
    v = {"base": {}, "no_center": {"center": False}}
    for c in (0.0, 0.5, 2.0):
        v[f"shift_{c:g}"] = {"shift": c}
    v["no_normalize"] = {"normalize": False}
    for w in penalty_weights:
        v[f"penalty_{w:g}"] = {"penalty_weight": w}
    v["learnable_shift"] = {"learnable_shift": True}
    return v


def _summarize(task: str, res: dict) -> dict:
    if task == "mqar":
        return {"accuracy": res["accuracy"], "best_accuracy": res["best_accuracy"],
                "test_loss": res["test_loss"], "diverged_at": res["diverged_at"],
                "sec_per_step": res["sec_per_step"]}
    return {"final_val_loss": res["final_val_loss"], "best_val_loss": res["best_val_loss"],
            "diverged_at": res["diverged_at"], "sec_per_step": res["sec_per_step"]}


def ablate(task: str, base, names, penalty_weights, out_dir: str, *,
           overwrite: bool = False, verbose: bool = True) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    say = print if verbose else (lambda *a, **k: None)
    table = variants(penalty_weights)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; known: {list(table)}")
    data = None
    rows = {}
    for name in names:
        path = os.path.join(out_dir, f"{name}.json")
        override = {**BASE, **table[name]}
        if os.path.exists(path) and not overwrite:
            with open(path) as f:
                res = json.load(f)
            say(f"{name}: exists")
        elif task == "mqar":
            say(f"== {name}: {table[name] or 'base'}")
            cfg = dataclasses.replace(base, kernel="csq", out=path, **override)
            res = run_mqar(cfg, verbose=verbose)
        else:
            say(f"== {name}: {table[name] or 'base'}")
            cfg = dataclasses.replace(base, kernels="csq", out="", **override)
            data = data or load_data(cfg)
            res = train_one(cfg, "csq", data, verbose=verbose)
            res = {"task": "lm-ablation", "variant": name, "config": dataclasses.asdict(cfg),
                   "data": data["info"], "environment": environment(cfg.device), **res}
            write_json(path, res)
        rows[name] = {"override": table[name], **_summarize(task, res)}

    summary = {"task": f"ablate-csq-{task}", "base_config": dataclasses.asdict(base),
               "environment": environment(base.device), "variants": rows}
    write_json(os.path.join(out_dir, "summary.json"), summary)
    md = markdown(task, rows, base)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(md)
    say(md)
    say(f"wrote {out_dir}/summary.json and table.md")
    return summary


def markdown(task: str, rows: dict, base) -> str:
    env = environment(base.device)
    head = (f"CSQ ablation on {task}: kernel csq, d_model={base.d_model}, {base.n_layers} "
            f"layers, seq_len={base.seq_len}, steps={base.steps}, seed={base.seed}, "
            f"torch {env['torch']}, device {base.device}.\n")
    if task == "mqar":
        lines = [head, "| variant | change | accuracy | best accuracy | test loss | diverged at |",
                 "|---|---|---|---|---|---|"]
        for name, r in rows.items():
            tl = "n/a" if r["test_loss"] is None else f"{r['test_loss']:.4f}"
            lines.append(f"| {name} | {r['override'] or '-'} | {r['accuracy']:.4f} | "
                         f"{r['best_accuracy']:.4f} | {tl} | {r['diverged_at'] or '-'} |")
    else:
        lines = [head, "| variant | change | final val loss | best val loss | diverged at |",
                 "|---|---|---|---|---|"]
        for name, r in rows.items():
            fv = "n/a" if r["final_val_loss"] is None else f"{r['final_val_loss']:.4f}"
            bv = "n/a" if r["best_val_loss"] is None else f"{r['best_val_loss']:.4f}"
            lines.append(f"| {name} | {r['override'] or '-'} | {fv} | {bv} | "
                         f"{r['diverged_at'] or '-'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--task", choices=("mqar", "lm"), default="mqar")
    task = pre.parse_known_args(argv)[0].task
    cls = MQARConfig if task == "mqar" else LMConfig
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("mqar", "lm"), default="mqar")
    parser.add_argument("--variants", default="all",
                        help="comma-separated variant names, or 'all'")
    parser.add_argument("--penalty-weights", default="0.1,1",
                        help="one penalty_W variant per weight")
    parser.add_argument("--out-dir", default=f"quality/results/ablate_{task}")
    parser.add_argument("--overwrite", type=int, default=0)
    add_config_args(parser, cls, skip=("kernel", "kernels", "out", *BASE))
    args = parser.parse_args(argv)
    base = config_from_args(cls, args)
    weights = parse_list(args.penalty_weights, float)
    names = list(variants(weights)) if args.variants == "all" else parse_list(args.variants)
    return ablate(task, base, names, weights, args.out_dir, overwrite=bool(args.overwrite))


if __name__ == "__main__":
    main()
