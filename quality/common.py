"""Helpers the quality scripts share: config <-> command line, schedule, environment, JSON."""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import subprocess
import sys

import torch


def add_config_args(parser: argparse.ArgumentParser, cls, skip=()) -> None:
    """One ``--field-name`` option per dataclass field, typed by its default."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        name = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_ = f.metadata.get("help", "") + f" (default: {default})"
        if isinstance(default, bool):
            # "--flag" alone means true; "--flag 0" / "--flag 1" set it explicitly.
            parser.add_argument(name, type=_parse_bool, nargs="?", const=True, default=default,
                                metavar="{0,1}", help=help_)
        elif default is None:
            parser.add_argument(name, type=f.metadata.get("type", float), default=None,
                                help=help_)
        else:
            parser.add_argument(name, type=type(default), default=default, help=help_)


def config_from_args(cls, args: argparse.Namespace, **override):
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    kw.update(override)
    return cls(**kw)


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected 0/1 or true/false, got {text!r}")


def parse_list(text: str, kind=str) -> list:
    """'a,b,c' -> [kind(a), kind(b), kind(c)]."""
    return [kind(x) for x in text.split(",") if x.strip()]


def lr_at(step: int, *, lr: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warmup to ``lr`` over ``warmup`` steps, then cosine decay to ``min_ratio * lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float):
    """AdamW; weight decay on matrices only (not on biases, norms, shifts or embeddings)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98))


def environment(device: str = "cpu") -> dict:
    """What every result file names: machine, versions, threads, when."""
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "argv": sys.argv,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
            timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    return env


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=_json_default)
    os.replace(tmp, path)


def _json_default(o):
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    raise TypeError(f"not JSON serializable: {type(o)}")


def finite_or_none(x: float):
    """JSON has no NaN: write non-finite numbers as None."""
    return x if math.isfinite(x) else None
