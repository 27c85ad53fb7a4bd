"""The direct path's carried-state work, measured and fitted: the constants of
csq_ext/_cost.py's state_cost (_STATE_GEMM_GFLOPS, _STATE_FEATURE_NS).

A direct-path call that returns a state builds it from every key (one pass); one that also
reads a carried state reads it for every query (a second pass). Both are work the chunked path
does inside its scan anyway, so auto adds state_cost to the direct path's estimate. This script
times, interleaved, the forced direct forward (float32, causal, B = 1, H heads, Dk = Dv = D)
plain, returning a state, and reading one as well; the difference per pass, per position and
task, on the threads the op spreads tasks over (min(threads, tasks): csrc/cpu/
csq_direct_state_cpu.h parallelizes over (sequence, head) tasks), is fitted as
F * (2 (Dv + 1) / GFLOPS + FEATURE_NS), F = num_features(D).

    python bench/fit_state_cost.py
    python bench/fit_state_cost.py --dims 32 64 128 --lengths 1024 4096 --out bench/out/x.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics

import torch

import csq_ext
from csq_ext import _cost
from csq_ext._timing import device_description, interleaved_times
from csq_ext.state import num_features

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "state_cost.json")


def measure(n: int, d: int, heads: int, budget: float) -> dict:
    g = torch.Generator().manual_seed(n * 1000 + d)
    q, k, v = (torch.randn(1, heads, n, d, generator=g) for _ in range(3))
    with torch.no_grad():
        _, state = csq_ext.attention(q, k, v, path="direct", return_state=True)

    def plain():
        with torch.no_grad():
            csq_ext.attention(q, k, v, path="direct")

    def returns():
        with torch.no_grad():
            csq_ext.attention(q, k, v, path="direct", return_state=True)

    def reads_and_returns():
        with torch.no_grad():
            csq_ext.attention(q, k, v, path="direct", initial_state=state, return_state=True)

    times = interleaved_times({"plain": plain, "returns": returns, "both": reads_and_returns},
                              torch.device("cpu"), budget_s=budget, max_repeats=40)
    med = {name: statistics.median(t) for name, t in times.items()}
    # Seconds of one pass: the returned state alone, and the two passes' mean.
    one = med["returns"] - med["plain"]
    two = (med["both"] - med["plain"]) / 2
    return {"n": n, "d": d, "median_s": med, "pass_s": [one, two]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dims", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--budget", type=float, default=6.0, help="seconds per point")
    p.add_argument("--out", default=OUT)
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    spread = max(1, min(threads, args.heads))
    rows = []
    for d in args.dims:
        for n in args.lengths:
            r = measure(n, d, args.heads, args.budget)
            # ns per pass, position and task on one thread: what state_cost counts.
            per_pass = statistics.mean(r["pass_s"]) * 1e9 * spread / (args.heads * n)
            r["per_pass_ns"] = per_pass
            r["per_feature_ns"] = per_pass / num_features(d)
            rows.append(r)
            print(f"D={d:4d} N={n:6d}: plain {r['median_s']['plain'] * 1e3:8.2f} ms, "
                  f"+state {r['median_s']['returns'] * 1e3:8.2f} ms, "
                  f"+read+state {r['median_s']['both'] * 1e3:8.2f} ms; "
                  f"{per_pass:9.1f} ns per pass, position and task", flush=True)
    # Least squares of per_feature_ns = a * 2 (Dv + 1) + b: a = 1 / GFLOPS, b = FEATURE_NS.
    xs = [2 * (r["d"] + 1) for r in rows]
    ys = [r["per_feature_ns"] for r in rows]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    a = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 0 else float("nan")
    b = my - a * mx
    fit = {"gemm_gflops": (1.0 / a) if a > 0 else None, "feature_ns": b}
    print(f"fit: _STATE_GEMM_GFLOPS = {fit['gemm_gflops']}, _STATE_FEATURE_NS = {b:.3f} "
          f"(shipped: {_cost._STATE_GEMM_GFLOPS}, {_cost._STATE_FEATURE_NS})")
    for r in rows:
        model = _cost.state_cost(r["n"], r["d"], r["d"], 1, args.heads) / 1e9
        measured = statistics.mean(r["pass_s"]) * 1e3
        print(f"D={r['d']:4d} N={r['n']:6d}: one pass measured {measured:7.2f} ms, "
              f"state_cost's estimate {model * 1e3:7.2f} ms")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                   "device": device_description(torch.device("cpu")), "threads": threads,
                   "heads": args.heads, "rows": rows, "fit": fit}, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
