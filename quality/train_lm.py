"""Byte-level language modelling on the Python standard library's own source files.

    python -m quality.train_lm --out quality/results/lm/lm.json
    python -m quality.train_lm --kernels csq,softmax --steps 3000 --d-model 256 \\
        --device cuda --bf16 1 --out quality/results/lm/lm_cuda_bf16.json

Every kernel trains the same network (same sizes, hence the same parameter count, same
initial weights, same batches, same steps); only the attention similarity differs. It prints
the validation loss as it goes and a table last, and writes JSON (every evaluation) and a PNG
(validation loss against steps, one line per kernel) beside it.

Data: every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]`` (site-packages and
__pycache__ left out), read as bytes (vocabulary 256), files joined by a 0 byte. A file goes
to validation when the MD5 of its path relative to the stdlib root, as an integer, is below
``val_percent`` modulo 100: a fixed split for a given Python version (which the JSON records,
with the file and byte counts). Training windows are drawn uniformly from the training bytes
with a seeded generator; validation uses ``val_windows`` fixed, evenly spaced windows.

``--bf16 1`` runs the forward under bfloat16 autocast (CUDA or CPU); a non-finite training
loss stops that kernel's run and is recorded as ``diverged_at``, and every validation loss is
checked as well, so a NaN in bf16 shows up in the table instead of in a crash.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import os
import sysconfig
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from bench.plot_colors import color
from quality.common import (add_config_args, config_from_args, environment, finite_or_none,
                            lr_at, make_optimizer, parse_list, write_json)
from quality.models import TinyLM

ALL_KERNELS = "csq,softmax,linear,taylor,rebased"


def _h(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass
class LMConfig:
    kernels: str = _h("comma-separated kernels to train, one after another",
                      default=ALL_KERNELS)
    seq_len: int = _h("bytes per training window", default=256)
    d_model: int = _h("model width", default=128)
    n_layers: int = _h("blocks", default=2)
    num_heads: int = _h("query heads", default=4)
    num_kv_heads: int = _h("key/value heads (0: num_heads)", default=0)
    mlp_ratio: int = _h("MLP width / d_model", default=4)
    short_conv: int = _h("taps of the short causal conv in each block (0: none)", default=4)
    pos_embed: bool = _h("learned absolute position embeddings", default=False)
    steps: int = _h("optimizer steps per kernel", default=1000)
    batch_size: int = _h("windows per step", default=16)
    lr: float = _h("peak learning rate (AdamW)", default=2e-3)
    weight_decay: float = _h("AdamW weight decay on matrices", default=0.1)
    warmup: float = _h("warmup, as a fraction of the steps", default=0.05)
    grad_clip: float = _h("gradient norm clip (0: none)", default=1.0)
    eval_every: int = _h("steps between validation evaluations", default=50)
    val_windows: int = _h("fixed validation windows", default=128)
    val_percent: int = _h("percent of files (by path hash) held out", default=5)
    max_files: int = _h("use only the first N files in path order (0: all)", default=0)
    seed: int = _h("seed of the initialization and the batches", default=0)
    device: str = _h("cpu or cuda", default="cpu")
    bf16: bool = _h("bfloat16 autocast", default=False)
    threads: int = _h("torch CPU threads (0: torch's default)", default=0)
    compile: bool = _h("torch.compile the model", default=False)
    shift: float = _h("CSQ shift c", default=1.0)
    learnable_shift: bool = _h("CSQ: per-head trainable shift", default=False)
    center: bool = _h("CSQ: center the keys", default=True)
    normalize: bool = _h("divide by the sum of weights", default=True)
    penalty_weight: float = _h("weight of csq_ext.negativity_penalty in the loss", default=0.0)
    penalty_window: int = _h("window of the penalty", default=64)
    chunk_size: int = _h("attention chunk length (0: default)", default=0)
    out: str = _h("write JSON here, and the PNG beside it ('': do not write)", default="")


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def stdlib_files(root: str | None = None) -> tuple[str, list[str]]:
    """(root, sorted paths relative to root) of the stdlib's .py files."""
    root = root or sysconfig.get_paths()["stdlib"]
    rel = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs
                         if x not in ("site-packages", "dist-packages", "__pycache__"))
        rel.extend(os.path.relpath(os.path.join(d, f), root) for f in files if f.endswith(".py"))
    return root, sorted(rel)


def is_validation(relpath: str, val_percent: int) -> bool:
    h = int(hashlib.md5(relpath.replace(os.sep, "/").encode()).hexdigest(), 16)
    return h % 100 < val_percent


def load_data(cfg: LMConfig, root: str | None = None) -> dict:
    """Train and validation byte streams (uint8 tensors) and a description of the split."""
    root, rel = stdlib_files(root)
    if cfg.max_files:
        rel = rel[:cfg.max_files]
    parts = {"train": [], "val": []}
    for r in rel:
        with open(os.path.join(root, r), "rb") as f:
            parts["val" if is_validation(r, cfg.val_percent) else "train"].append(f.read())
    streams, info = {}, {"stdlib": root}
    for name, chunks in parts.items():
        buf = b"\0".join(chunks)
        streams[name] = torch.from_numpy(np.frombuffer(buf, dtype=np.uint8).copy())
        info[f"{name}_files"] = len(chunks)
        info[f"{name}_bytes"] = len(buf)
    for name in ("train", "val"):
        if streams[name].numel() < cfg.seq_len + 2:
            raise ValueError(f"the {name} split has {streams[name].numel()} bytes, fewer than "
                             f"seq_len + 2 = {cfg.seq_len + 2}; use more files "
                             f"(--max-files) or a different --val-percent")
    n_val = streams["val"].numel() - cfg.seq_len - 1
    offsets = torch.linspace(0, n_val, cfg.val_windows).long().unique()
    streams["val_windows"] = torch.stack([streams["val"][o:o + cfg.seq_len + 1]
                                          for o in offsets.tolist()]).long()
    info["val_windows"] = int(offsets.numel())
    return {"streams": streams, "info": info}


# ----------------------------------------------------------------------------------------------
# Training one kernel
# ----------------------------------------------------------------------------------------------
def build_model(cfg: LMConfig, kernel: str) -> TinyLM:
    torch.manual_seed(cfg.seed)  # same initial weights for every kernel
    attn_kwargs = dict(tile_size=cfg.chunk_size or None, normalize=cfg.normalize)
    if kernel == "csq":
        attn_kwargs.update(shift=cfg.shift, learnable_shift=cfg.learnable_shift,
                           center=cfg.center, penalty_window=cfg.penalty_window)
    elif kernel == "rebased":
        attn_kwargs.update(penalty_window=cfg.penalty_window)
    return TinyLM(256, cfg.d_model, cfg.n_layers, cfg.num_heads, cfg.num_kv_heads or None,
                  kernel, cfg.mlp_ratio, cfg.short_conv, cfg.seq_len if cfg.pos_embed else 0,
                  **attn_kwargs)


@torch.no_grad()
def validation_loss(model, windows: torch.Tensor, cfg: LMConfig, autocast) -> float:
    """Mean cross entropy (nats per byte) over the fixed validation windows."""
    model.eval()
    total = 0.0
    for i in range(0, windows.shape[0], cfg.batch_size):
        w = windows[i:i + cfg.batch_size].to(cfg.device)
        with autocast():
            logits = model.head(model(w[:, :-1])).float()
        total += float(F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(),
                                       reduction="sum"))
    model.train()
    return total / (windows.shape[0] * cfg.seq_len)


def train_one(cfg: LMConfig, kernel: str, data: dict, *, verbose: bool = True) -> dict:
    say = print if verbose else (lambda *a, **k: None)
    train, windows = data["streams"]["train"], data["streams"]["val_windows"]
    model = build_model(cfg, kernel).to(cfg.device)
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay)
    step_model = torch.compile(model) if cfg.compile else model
    device_type = torch.device(cfg.device).type
    use_penalty = cfg.penalty_weight > 0 and kernel in ("csq", "rebased")

    def autocast():
        return torch.autocast(device_type, dtype=torch.bfloat16, enabled=cfg.bf16)

    gen = torch.Generator().manual_seed(cfg.seed)  # the same batches for every kernel
    warmup = max(1, int(cfg.warmup * cfg.steps))
    run = {"kernel": kernel, "params": model.num_params(), "steps": [], "val_loss": [],
           "train_log": [], "diverged_at": None, "nonfinite_val_at": None}
    say(f"lm kernel={kernel} params={run['params']} steps={cfg.steps}")
    t0 = time.perf_counter()
    steps_done = 0
    for step in range(cfg.steps):
        off = torch.randint(0, train.numel() - cfg.seq_len - 1, (cfg.batch_size,),
                            generator=gen)
        batch = torch.stack([train[o:o + cfg.seq_len + 1] for o in off.tolist()]).long()
        batch = batch.to(cfg.device)
        lr = lr_at(step, lr=cfg.lr, warmup=warmup, total=cfg.steps)
        for g in opt.param_groups:
            g["lr"] = lr
        with autocast():
            if use_penalty:
                h, penalty = step_model(batch[:, :-1], return_penalty=True)
            else:
                h, penalty = step_model(batch[:, :-1]), None
            logits = model.head(h).float()
            loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            total = loss + cfg.penalty_weight * penalty if penalty is not None else loss
        if not math.isfinite(float(total.detach())):
            run["diverged_at"] = step
            say(f"  step {step}: training loss is {float(total.detach())}; stopping this kernel")
            break
        opt.zero_grad(set_to_none=True)
        total.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        steps_done = step + 1
        if steps_done % cfg.eval_every == 0 or steps_done == cfg.steps:
            vl = validation_loss(model, windows, cfg, autocast)
            if not math.isfinite(vl) and run["nonfinite_val_at"] is None:
                run["nonfinite_val_at"] = steps_done
            run["steps"].append(steps_done)
            run["val_loss"].append(finite_or_none(vl))
            entry = {"step": steps_done, "loss": float(loss.detach()), "lr": lr,
                     "time_s": time.perf_counter() - t0}
            if penalty is not None:
                entry["penalty"] = float(penalty.detach())
            run["train_log"].append(entry)
            say(f"  step {steps_done:5d}  train {float(loss.detach()):.4f}  val {vl:.4f} nats/byte"
                f"  {time.perf_counter() - t0:.0f} s")
    run["steps_done"] = steps_done
    run["time_s"] = time.perf_counter() - t0
    run["sec_per_step"] = run["time_s"] / max(1, steps_done)
    finite = [v for v in run["val_loss"] if v is not None]
    run["final_val_loss"] = run["val_loss"][-1] if run["val_loss"] else None
    run["best_val_loss"] = min(finite) if finite else None
    return run


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------
def _fmt(x, spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def table(runs: dict) -> str:
    lines = ["| kernel | params | steps | final val loss (nats/byte) | bits/byte "
             "| best val loss | s/step | diverged at |",
             "|---|---|---|---|---|---|---|---|"]
    for k, r in runs.items():
        fv = r["final_val_loss"]
        bits = None if fv is None else fv / math.log(2)
        lines.append(f"| {k} | {r['params']} | {r['steps_done']} | {_fmt(fv)} | "
                     f"{_fmt(bits, '.3f')} | {_fmt(r['best_val_loss'])} | "
                     f"{r['sec_per_step']:.3f} | {r['diverged_at'] or '-'} |")
    return "\n".join(lines)


def plot(runs: dict, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for k, r in runs.items():
        pts = [(s, v) for s, v in zip(r["steps"], r["val_loss"]) if v is not None]
        if pts:
            ax.plot(*zip(*pts), marker=".", label=k, color=color(k))
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats / byte)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(cfg: LMConfig, *, verbose: bool = True, root: str | None = None) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    say = print if verbose else (lambda *a, **k: None)
    data = load_data(cfg, root)
    say(f"data: {data['info']}")
    result = {"task": "lm", "config": dataclasses.asdict(cfg), "data": data["info"],
              "environment": environment(cfg.device), "runs": {}}
    for kernel in parse_list(cfg.kernels):
        result["runs"][kernel] = train_one(cfg, kernel, data, verbose=verbose)
        if cfg.out:  # after every kernel, so a long run keeps what it has
            write_json(cfg.out, result)
    say(table(result["runs"]))
    if cfg.out:
        png = os.path.splitext(cfg.out)[0] + ".png"
        plot(result["runs"], png, f"byte LM on the stdlib, N={cfg.seq_len}, d={cfg.d_model}, "
             f"{cfg.n_layers} layers, {cfg.device}{' bf16' if cfg.bf16 else ''}")
        say(f"wrote {cfg.out} and {png}")
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, LMConfig)
    return run(config_from_args(LMConfig, parser.parse_args(argv)))


if __name__ == "__main__":
    main()
