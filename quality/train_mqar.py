"""Train the small model on MQAR with one attention kernel; report recall accuracy.

    python -m quality.train_mqar --kernel csq
    python -m quality.train_mqar --kernel softmax --seq-len 128 --num-kv-pairs 8 \\
        --steps 1500 --out quality/results/mqar/softmax_N128_kv8.json

Accuracy is the fraction of query positions (one per key-value pair, on a held-out test set
generated with another seed) whose argmax prediction is the right value token. It prints a
line per evaluation and a summary last; ``--out`` writes everything as JSON. The loss and the
head are computed at the query positions only (every other label is -100), which keeps the
8192-way output layer cheap.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from quality.common import (add_config_args, config_from_args, environment, finite_or_none,
                            lr_at, make_optimizer, write_json)
from quality.models import TinyLM
from quality.mqar import IGNORE, multiquery_ar


def _h(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass
class MQARConfig:
    kernel: str = _h("csq, softmax, linear, taylor or rebased", default="csq")
    seq_len: int = _h("tokens per sequence", default=256)
    num_kv_pairs: int = _h("key-value pairs per sequence", default=16)
    vocab_size: int = _h("vocabulary (keys: lower half, values: upper half)", default=8192)
    d_model: int = _h("model width", default=64)
    n_layers: int = _h("blocks", default=2)
    num_heads: int = _h("query heads", default=2)
    num_kv_heads: int = _h("key/value heads (0: num_heads)", default=0)
    mlp_ratio: int = _h("MLP width / d_model", default=4)
    short_conv: int = _h("taps of the short causal conv in each block (0: none)", default=4)
    pos_embed: bool = _h("learned absolute position embeddings", default=False)
    steps: int = _h("optimizer steps", default=1500)
    batch_size: int = _h("sequences per step", default=64)
    lr: float = _h("peak learning rate (AdamW)", default=3e-3)
    weight_decay: float = _h("AdamW weight decay on matrices", default=0.1)
    warmup: float = _h("warmup, as a fraction of the steps", default=0.05)
    grad_clip: float = _h("gradient norm clip (0: none)", default=1.0)
    num_train: int = _h("training sequences (cycled, reshuffled each epoch)", default=20000)
    num_test: int = _h("test sequences (another seed)", default=1000)
    power_a: float = _h("power law of the query gaps", default=0.01)
    eval_every: int = _h("steps between evaluations", default=250)
    log_every: int = _h("steps between training-loss lines", default=50)
    seed: int = _h("seed of the data and the initialization", default=0)
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
    out: str = _h("write the result JSON here ('' : do not write)", default="")


def build_model(cfg: MQARConfig) -> TinyLM:
    torch.manual_seed(cfg.seed)  # same initial weights for every kernel
    attn_kwargs = dict(tile_size=cfg.chunk_size or None, normalize=cfg.normalize)
    if cfg.kernel == "csq":
        attn_kwargs.update(shift=cfg.shift, learnable_shift=cfg.learnable_shift,
                           center=cfg.center, penalty_window=cfg.penalty_window)
    elif cfg.kernel == "rebased":
        attn_kwargs.update(penalty_window=cfg.penalty_window)
    return TinyLM(cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.num_heads,
                  cfg.num_kv_heads or None, cfg.kernel, cfg.mlp_ratio, cfg.short_conv,
                  cfg.seq_len if cfg.pos_embed else 0, **attn_kwargs)


def _loss_and_correct(model, x, y, penalty_weight: float):
    """Cross entropy at the query positions (+ penalty), and the number of right answers."""
    if penalty_weight > 0:
        h, penalty = model(x, return_penalty=True)
    else:
        h, penalty = model(x), None
    sel = y != IGNORE
    logits = model.head(h[sel]).float()
    target = y[sel]
    loss = F.cross_entropy(logits, target)
    correct = (logits.argmax(-1) == target).sum()
    return loss, penalty, correct, target.numel()


@torch.no_grad()
def evaluate(model, x_test, y_test, cfg: MQARConfig, autocast) -> tuple[float, float]:
    """(accuracy, loss) on the test set."""
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    for i in range(0, x_test.shape[0], cfg.batch_size):
        x = x_test[i:i + cfg.batch_size].to(cfg.device)
        y = y_test[i:i + cfg.batch_size].to(cfg.device)
        with autocast():
            loss, _, c, n = _loss_and_correct(model, x, y, 0.0)
        correct += int(c)
        total += n
        loss_sum += float(loss.detach()) * n
    model.train()
    return correct / total, loss_sum / total


def run(cfg: MQARConfig, *, verbose: bool = True) -> dict:
    """Train and evaluate one configuration; returns (and with ``cfg.out`` writes) the result."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    say = print if verbose else (lambda *a, **k: None)
    t_data = time.perf_counter()
    data = dict(seq_len=cfg.seq_len, num_kv_pairs=cfg.num_kv_pairs, vocab_size=cfg.vocab_size,
                power_a=cfg.power_a)
    x_train, y_train = multiquery_ar(num_examples=cfg.num_train, seed=cfg.seed, **data)
    x_test, y_test = multiquery_ar(num_examples=cfg.num_test, seed=cfg.seed + 10_000, **data)
    t_data = time.perf_counter() - t_data

    model = build_model(cfg).to(cfg.device)
    n_params = model.num_params()
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay)
    step_model = torch.compile(model) if cfg.compile else model
    device_type = torch.device(cfg.device).type

    def autocast():
        return torch.autocast(device_type, dtype=torch.bfloat16, enabled=cfg.bf16)

    say(f"mqar kernel={cfg.kernel} N={cfg.seq_len} kv={cfg.num_kv_pairs} "
        f"d={cfg.d_model} params={n_params} steps={cfg.steps} (data {t_data:.1f} s)")
    gen = torch.Generator().manual_seed(cfg.seed)
    perm, pos = torch.randperm(cfg.num_train, generator=gen), 0
    warmup = max(1, int(cfg.warmup * cfg.steps))
    history, train_log = [], []
    diverged_at = None
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        if pos + cfg.batch_size > cfg.num_train:
            perm, pos = torch.randperm(cfg.num_train, generator=gen), 0
        idx = perm[pos:pos + cfg.batch_size]
        pos += cfg.batch_size
        x, y = x_train[idx].to(cfg.device), y_train[idx].to(cfg.device)
        lr = lr_at(step, lr=cfg.lr, warmup=warmup, total=cfg.steps)
        for g in opt.param_groups:
            g["lr"] = lr
        with autocast():
            loss, penalty, _, _ = _loss_and_correct(step_model, x, y, cfg.penalty_weight)
            total = loss + cfg.penalty_weight * penalty if penalty is not None else loss
        if not math.isfinite(float(total.detach())):
            diverged_at = step
            say(f"step {step}: loss is {float(total.detach())}; stopping")
            break
        opt.zero_grad(set_to_none=True)
        total.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if (step + 1) % cfg.log_every == 0 or step == 0:
            entry = {"step": step + 1, "loss": float(loss.detach()), "lr": lr,
                     "time_s": time.perf_counter() - t0}
            if penalty is not None:
                entry["penalty"] = float(penalty.detach())
            train_log.append(entry)
            say(f"step {step + 1:5d}  loss {float(loss.detach()):.4f}  lr {lr:.2e}"
                + (f"  penalty {float(penalty.detach()):.4f}" if penalty is not None else "")
                + f"  {time.perf_counter() - t0:.0f} s")
        if (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            acc, test_loss = evaluate(model, x_test, y_test, cfg, autocast)
            history.append({"step": step + 1, "accuracy": acc,
                            "test_loss": finite_or_none(test_loss),
                            "time_s": time.perf_counter() - t0})
            say(f"step {step + 1:5d}  test accuracy {acc:.4f}  test loss {test_loss:.4f}")
    train_time = time.perf_counter() - t0
    steps_done = cfg.steps if diverged_at is None else diverged_at
    acc, test_loss = evaluate(model, x_test, y_test, cfg, autocast)
    history.append({"step": steps_done, "accuracy": acc, "test_loss": finite_or_none(test_loss),
                    "time_s": time.perf_counter() - t0})
    result = {
        "task": "mqar",
        "config": dataclasses.asdict(cfg),
        "params": n_params,
        "accuracy": acc,
        "best_accuracy": max(h["accuracy"] for h in history),
        "test_loss": finite_or_none(test_loss),
        "steps_done": steps_done,
        "diverged_at": diverged_at,
        "train_time_s": train_time,
        "sec_per_step": train_time / max(1, steps_done),
        "history": history,
        "train_log": train_log,
        "environment": environment(cfg.device),
    }
    say(f"RESULT kernel={cfg.kernel} N={cfg.seq_len} kv={cfg.num_kv_pairs} "
        f"accuracy={acc:.4f} test_loss={test_loss:.4f} steps={steps_done} "
        f"time={train_time:.0f} s ({result['sec_per_step'] * 1e3:.0f} ms/step)")
    if cfg.out:
        write_json(cfg.out, result)
        say(f"wrote {cfg.out}")
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, MQARConfig)
    args = parser.parse_args(argv)
    return run(config_from_args(MQARConfig, args))


if __name__ == "__main__":
    main()
