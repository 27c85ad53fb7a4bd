"""Peak process memory of csq_ext.attention's forward + backward at a long length.

    python bench/mem_peak.py                     # N = 131072, Dk = Dv = 32, B = H = 1, float32
    python bench/mem_peak.py --n 65536 --dim 64

The measurement runs in a fresh Python process, so the peak (getrusage ru_maxrss) belongs to
this computation alone and not to whatever the parent process touched before. An N x N
float32 matrix at N = 131072 would take 64 GiB; the kernels should need a few times the
inputs' size above the baseline left by the imports.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

MB = 2**20


def max_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB


def measure(n: int, dim: int) -> dict:
    """Forward + backward once, here; returns memory figures in MB."""
    import time

    import torch

    import csq_ext
    from csq_ext._timing import device_description

    after_imports = max_rss_mb()
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, n, dim, requires_grad=True) for _ in range(3))
    dy = torch.randn(1, 1, n, dim)
    after_inputs = max_rss_mb()

    t0 = time.perf_counter()
    y = csq_ext.attention(q, k, v, causal=True)
    dq, dk, dv = torch.autograd.grad(y, (q, k, v), dy)
    seconds = time.perf_counter() - t0
    peak = max_rss_mb()

    finite = all(bool(t.isfinite().all()) for t in (y, dq, dk, dv))
    tensor_mb = n * dim * 4 / MB  # one (1, 1, n, dim) float32 tensor
    return {
        "device": device_description(torch.device("cpu")),
        "settings": {"n": n, "dim": dim, "batch": 1, "heads": 1, "dtype": "float32",
                     "causal": True},
        "baseline_rss_after_imports_mb": round(after_imports, 1),
        "rss_after_inputs_mb": round(after_inputs, 1),
        "peak_rss_mb": round(peak, 1),
        "peak_above_baseline_mb": round(peak - after_imports, 1),
        # q, k, v, dy, y, dq, dk, dv: what any implementation must hold at the end.
        "inputs_outputs_grads_mb": round(8 * tensor_mb, 1),
        "n_by_n_float32_mb": round(n * n * 4 / MB, 1),
        "fwd_bwd_seconds": round(seconds, 3),
        "outputs_finite": finite,
    }


def run_fresh(n: int, dim: int) -> dict:
    """Runs measure() in a new interpreter and reads its JSON from the last line of stdout."""
    cmd = [sys.executable, os.path.abspath(__file__), "--n", str(n), "--dim", str(dim),
           "--in-process"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"the measuring process failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=131072)
    p.add_argument("--dim", type=int, default=32, help="Dk = Dv")
    p.add_argument("--in-process", action="store_true",
                   help="measure in this process and print JSON only (the default starts a "
                        "fresh process, whose peak is not inflated by the caller's)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                 "out", "mem_peak.json"),
                   help="JSON path (default bench/out/mem_peak.json, ignored by git; the "
                        "committed one: bench/results/mem_peak.json); empty: do not write")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)

    if args.in_process:
        print(json.dumps(measure(args.n, args.dim)))
        return
    r = run_fresh(args.n, args.dim)
    r["date"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    print(f"csq_ext.attention forward + backward, N={args.n}, Dk=Dv={args.dim}, B=H=1, "
          f"float32, causal, on {r['device']['name']} ({r['device']['torch_threads']} threads)")
    print(f"  RSS after imports      {r['baseline_rss_after_imports_mb']:>9.1f} MB")
    print(f"  RSS after inputs       {r['rss_after_inputs_mb']:>9.1f} MB")
    print(f"  peak RSS               {r['peak_rss_mb']:>9.1f} MB  "
          f"({r['peak_above_baseline_mb']:.1f} MB above the imports)")
    print(f"  q,k,v,dy,y,dq,dk,dv    {r['inputs_outputs_grads_mb']:>9.1f} MB  "
          f"(an N x N float32 matrix: {r['n_by_n_float32_mb']:.0f} MB)")
    print(f"  time {r['fwd_bwd_seconds']:.2f} s, outputs finite: {r['outputs_finite']}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(r, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
