"""CPU benchmark of calls that carry a state: the direct path (the op carries it in C++)
against the chunked one, and what auto picks.

float32, causal, B x H heads, Dk = Dv = D, forward only (serving) or forward + backward
(training with truncated backpropagation), interleaved medians. Two kinds of call:

* ``prefill``: N positions from nothing, returning the state (``return_state=True``), beside
  SDPA over the same N positions (softmax would keep a KV cache instead);
* ``continue``: N positions continuing a state of P = N earlier positions and returning the
  next (``initial_state=..., return_state=True``), beside SDPA with the N queries against
  the P + N keys (a KV cache), bottom-right causal.

    python bench/bench_state.py --lengths 256 1024 4096 --dims 64 128
    python bench/bench_state.py --quick
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os

import torch
import torch.nn.functional as F

import csq_ext
from csq_ext._cost import choose_path
from csq_ext._timing import device_description, interleaved_times, summarize

CPU = torch.device("cpu")
PATHS = ("auto", "direct", "chunked")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--kinds", nargs="+", choices=["prefill", "continue"],
                   default=["prefill", "continue"])
    p.add_argument("--modes", nargs="+", choices=["fwd", "fwd+bwd"], default=["fwd"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--max-seconds", type=float, default=10.0)
    p.add_argument("--max-repeats", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="a smoke test, a few seconds")
    p.add_argument("--out", default=None, help="JSON path (none: print only)")
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.dims, args.max_seconds, args.max_repeats = [128], [16], 0.3, 3
    return args


def _calls(args, kind, mode, n, d):
    """One closure per implementation, on shared inputs."""
    grad = mode == "fwd+bwd"
    B, H = args.batch, args.heads
    q, k, v = (torch.randn(B, H, n, d, requires_grad=grad) for _ in range(3))
    dy = torch.randn(B, H, n, d)
    state, kc, vc, mask = None, k, v, None
    if kind == "continue":
        pk, pv = torch.randn(B, H, n, d), torch.randn(B, H, n, d)
        _, state = csq_ext.attention(torch.randn(B, H, n, d), pk, pv, return_state=True)
        kc, vc = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
        mask = torch.ones(n, 2 * n, dtype=torch.bool).tril(n)  # query i sees keys <= n + i

    def run(f):
        y = f()
        return torch.autograd.grad(y, (q, k, v), dy) if grad else y

    calls = {p: (lambda p=p: run(lambda: csq_ext.attention(
        q, k, v, initial_state=state, return_state=True, path=p)[0])) for p in PATHS}
    if mask is None:
        calls["sdpa"] = lambda: run(lambda: F.scaled_dot_product_attention(q, k, v,
                                                                           is_causal=True))
    else:
        calls["sdpa"] = lambda: run(lambda: F.scaled_dot_product_attention(q, kc, vc,
                                                                           attn_mask=mask))
    return calls


def main(argv=None):
    args = parse_args(argv)
    meta = dict(benchmark="bench/bench_state.py", device=device_description(CPU),
                date=datetime.date.today().isoformat(), torch=torch.__version__,
                threads=torch.get_num_threads(), batch=args.batch, heads=args.heads)
    print(meta, flush=True)
    rows = []
    for kind in args.kinds:
        for mode in args.modes:
            for d in args.dims:
                for n in args.lengths:
                    times = interleaved_times(_calls(args, kind, mode, n, d), CPU,
                                              budget_s=args.max_seconds,
                                              max_repeats=args.max_repeats)
                    gc.collect()
                    med = {name: 1e3 * summarize(t)["median_s"] for name, t in times.items()}
                    chosen = choose_path(n, d, d, True, "cpu", torch.get_num_threads(),
                                         args.batch * args.heads,
                                         reads_state=kind == "continue", returns_state=True)
                    row = dict(kind=kind, mode=mode, d=d, n=n, auto_picks=chosen,
                               median_ms=med)
                    rows.append(row)
                    print(f"{kind:8s} {mode:7s} D={d:<4d} N={n:<6d} auto->{chosen:8s} " +
                          " ".join(f"{k}={v:.2f}ms" for k, v in med.items()) +
                          f"  chunked/direct={med['chunked'] / med['direct']:.2f}"
                          f"  sdpa/auto={med['sdpa'] / med['auto']:.2f}", flush=True)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(dict(meta, points=rows), f, indent=1)
        print("wrote", args.out)


if __name__ == "__main__":
    main()
