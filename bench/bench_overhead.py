"""Per-call overhead at small N: what a call of csq_ext.attention costs beyond its arithmetic,
against SDPA's call on the same inputs (issue 25: at most 2x SDPA).

For each N it times, interleaved, on fresh N(0, 1) float32 inputs (B = 1, H = 4, Dk = Dv = D,
causal), forward only, without autograd (torch.no_grad) and with inputs that require grad
(the autograd wrapper's cost; forward only):

* ``sdpa``: torch.nn.functional.scaled_dot_product_attention(is_causal=True);
* ``csq auto``: csq_ext.attention (argument checks, the cost model's choice, the op);
* ``csq direct`` / ``csq chunked``: the same with the path forced;
* ``op direct``: the registered operator alone (no Python checks): the C++ host layer and
  kernel, the floor the Python layer adds to.

Prints medians in microseconds and the ratios to SDPA; writes JSON where --out says (default:
the ignored bench/out/overhead_cpu.json).

    python bench/bench_overhead.py
    python bench/bench_overhead.py --lengths 16 64 256 --threads 1
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
import torch.nn.functional as F

import csq_ext
from csq_ext._ops import ops
from csq_ext._timing import device_description

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "overhead_cpu.json")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1, 16, 64, 256])
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--calls", type=int, default=200, help="calls per timed batch")
    p.add_argument("--rounds", type=int, default=15, help="interleaved batches per impl")
    p.add_argument("--out", default=OUT)
    return p.parse_args(argv)


def impls(n: int, d: int, heads: int, grad: bool) -> dict:
    q, k, v = (torch.randn(1, heads, n, d, requires_grad=grad) for _ in range(3))
    shift = torch.ones(heads)
    scale = d ** -0.5
    return {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "csq auto": lambda: csq_ext.attention(q, k, v),
        "csq direct": lambda: csq_ext.attention(q, k, v, path="direct"),
        "csq chunked": lambda: csq_ext.attention(q, k, v, path="chunked"),
        "op direct": lambda: ops.csq_direct_fwd(q, k, v, shift, None, None, None, True, scale,
                                                True, True, 1e-6, 0, False),
    }


def time_interleaved(fns: dict, calls: int, rounds: int) -> dict:
    """Median microseconds per call: each round runs `calls` calls of every fn in turn."""
    for fn in fns.values():
        for _ in range(max(10, calls // 10)):
            fn()
    per_call = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            per_call[name].append((time.perf_counter() - t0) / calls * 1e6)
    return {name: statistics.median(ts) for name, ts in per_call.items()}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = device_description(torch.device("cpu"))
    print(f"{device['name']}, {device['torch_threads']} threads, torch {torch.__version__}, "
          f"B=1, H={args.heads}, D={args.dim}, causal, float32, forward")
    rows = []
    for grad in (False, True):
        for n in args.lengths:
            fns = impls(n, args.dim, args.heads, grad)
            if grad:
                with torch.enable_grad():
                    us = time_interleaved(fns, args.calls, args.rounds)
            else:
                with torch.no_grad():
                    us = time_interleaved(fns, args.calls, args.rounds)
            rows.append({"n": n, "requires_grad": grad, "us": us,
                         "ratio_to_sdpa": {k: v / us["sdpa"] for k, v in us.items()}})
    head = f"{'N':>5} {'grad':>5} " + " ".join(f"{name:>12}" for name in rows[0]["us"])
    print(head + "   (us per call; x = time / SDPA's)")
    for r in rows:
        cells = " ".join(f"{r['us'][k]:7.1f} {r['ratio_to_sdpa'][k]:3.1f}x" for k in r["us"])
        print(f"{r['n']:>5} {str(r['requires_grad']):>5} {cells}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"benchmark": "per-call overhead, CPU", "device": device,
                   "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                   "python": sys.version.split()[0], "settings": vars(args), "rows": rows}, f,
                  indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
