"""Before/after: the same CPU points timed with two builds of csq_ext, interleaved.

A refactor must not slow anything down (issue 24). Each build lives in its own checkout with
its own built extension and Python; this script runs one short worker process per build per
round, alternating which build goes first, so that both see the same machine state (turbo,
other load, thermal). A worker times csq_ext.attention forward and forward + backward at each
point with the path forced (direct, chunked) and chosen (auto), on fresh N(0, 1) float32 inputs
(B = 1, H = 4, Dk = Dv = D), and prints its medians as JSON. The report is the median over
rounds of each build's median and the ratio after / before (above 1: the new build is slower).

    python bench/compare_builds.py --before /work/wt-before/.venv/bin/python:/work/wt-before \\
        --after .venv/bin/python:. --rounds 4 --out bench/out/compare_builds.json

Only the public API is used, so any two versions that have csq_ext.attention(path=...) compare.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys

POINTS = [("causal", 64, 1024), ("causal", 64, 4096), ("causal", 128, 4096),
          ("full", 64, 4096), ("causal", 64, 16384)]
PATHS = ["direct", "chunked", "auto"]


def _point(text):
    mask, dim, n = text.split(":")
    if mask not in ("causal", "full"):
        raise argparse.ArgumentTypeError(f"MASK must be causal or full, got {mask!r}")
    return (mask, int(dim), int(n))


def worker(points, seconds, paths=PATHS):
    """Runs inside one build's Python: times every point and path, prints JSON."""
    import time

    import torch

    import csq_ext
    torch.manual_seed(0)
    out = {}
    for mask, dim, n in points:
        q, k, v = (torch.randn(1, 4, n, dim) for _ in range(3))
        for path in paths:
            for mode in ("fwd", "fwd+bwd"):
                def call():
                    if mode == "fwd":
                        with torch.no_grad():
                            csq_ext.attention(q, k, v, causal=mask == "causal", path=path)
                    else:
                        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
                        y = csq_ext.attention(qq, kk, vv, causal=mask == "causal", path=path)
                        y.backward(torch.ones_like(y))
                call()  # warm-up: allocation, calibration, first-touch
                times, start = [], time.perf_counter()
                while len(times) < 3 or (time.perf_counter() - start < seconds
                                         and len(times) < 50):
                    t0 = time.perf_counter()
                    call()
                    times.append(time.perf_counter() - t0)
                out[f"{mask} D={dim} N={n} {path} {mode}"] = statistics.median(times)
    print(json.dumps(out))


def run_build(spec, points, seconds, paths=PATHS):
    python, folder = spec.split(":", 1)
    cmd = [python, os.path.abspath(__file__), "--worker", json.dumps([points, paths]),
           "--seconds", str(seconds)]
    env = dict(os.environ, PYTHONPATH=os.path.abspath(folder))
    res = subprocess.run(cmd, cwd=os.path.abspath(folder), env=env, capture_output=True,
                         text=True, check=False)
    if res.returncode != 0:
        sys.exit(f"worker for {spec} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--before", help="PYTHON:CHECKOUT of the old build")
    p.add_argument("--after", help="PYTHON:CHECKOUT of the new build")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--points", type=_point, nargs="+", default=POINTS,
                   help="MASK:D:N, e.g. causal:64:4096 (default: the five points above)")
    p.add_argument("--paths", nargs="+", choices=PATHS, default=PATHS)
    p.add_argument("--seconds", type=float, default=1.0, help="per point, path and mode")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                 "out", "compare_builds.json"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        points, paths = json.loads(args.worker)
        worker([tuple(x) for x in points], args.seconds, paths)
        return
    if not (args.before and args.after):
        p.error("--before and --after are required")
    runs = {"before": [], "after": []}
    for r in range(args.rounds):
        order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
        for name in order:
            runs[name].append(run_build(getattr(args, name), args.points, args.seconds,
                                        args.paths))
            print(f"round {r + 1}/{args.rounds}: {name} done", flush=True)
    keys = list(runs["before"][0])
    table = {}
    print(f"{'point':44s} {'before ms':>10s} {'after ms':>10s} {'after/before':>13s}")
    for key in keys:
        b = statistics.median(x[key] for x in runs["before"])
        a = statistics.median(x[key] for x in runs["after"])
        table[key] = {"before_s": b, "after_s": a, "ratio": a / b}
        print(f"{key:44s} {b * 1e3:10.2f} {a * 1e3:10.2f} {a / b:13.3f}")
    ratios = [v["ratio"] for v in table.values()]
    print(f"geometric mean after/before: {statistics.geometric_mean(ratios):.3f}; "
          f"worst {max(ratios):.3f}")
    import torch  # this script's own torch: only for naming the machine
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from csq_ext._timing import device_description
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                   "device": device_description(torch.device("cpu")),
                   "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "before": args.before, "after": args.after, "rounds": args.rounds,
                   "seconds": args.seconds,
                   "points": table, "raw": runs}, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
