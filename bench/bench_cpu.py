"""CPU benchmark: csq_ext.attention against SDPA and against CSQ written by hand.

float32, B x H heads, Dk = Dv = D, causal and not (--masks). For every (mask, D, N) it times
the forward and the forward + backward of each implementation, round-robin within each
repetition, on fresh N(0, 1) inputs. Prints a table last, writes JSON with every raw time and
a PNG.

    python bench/bench_cpu.py                    # the full sweep (15-25 minutes on 2 cores)
    python bench/bench_cpu.py --quick            # a smoke test, a few seconds
    python bench/bench_cpu.py --lengths 1024 4096 --dims 64 --max-seconds 5

Implementations: ``csq_ext`` (this package, path="auto": the cost model's choice),
``direct`` and ``chunked`` (this package with each path forced), ``sdpa``
(torch.nn.functional.scaled_dot_product_attention: softmax attention, the cost to beat),
``flex_csq`` (bench/flex_csq.py: CSQ as a user would write it with FlexAttention) and
``chunked_torch`` (bench/chunked_torch.py: the chunked CSQ math written in plain PyTorch).

Roofline: the float32 GEMM peak of the BLAS (SDPA's products) and of oneDNN (csq_ext's
microkernel) is measured at the start and the end of the run, and every time becomes GFLOP/s
and a fraction of the better peak (bench/roofline.py: FLOP counts, forward + backward as 3.5x
the forward). auto's rates on this machine are measured first (csq_ext.calibrate; the JSON
keeps them) unless CSQ_CALIBRATE=0. `python bench/profile_cpu.py` says where one point's time
goes.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

import csq_ext
from csq_ext import _calibrate
from csq_ext._cost import choose_path
from csq_ext._timing import device_description, interleaved_times, summarize
from chunked_torch import csq_attention_chunked
from flex_csq import csq_attention_flex
from roofline import attention_flops, gemm_peak
from plot_colors import color

CPU = torch.device("cpu")
# Each takes (q, k, v, causal).
IMPLS = {
    "csq_ext": lambda q, k, v, c: csq_ext.attention(q, k, v, causal=c),
    "direct": lambda q, k, v, c: csq_ext.attention(q, k, v, causal=c, path="direct"),
    "chunked": lambda q, k, v, c: csq_ext.attention(q, k, v, causal=c, path="chunked"),
    "sdpa": lambda q, k, v, c: F.scaled_dot_product_attention(q, k, v, is_causal=c),
    "flex_csq": lambda q, k, v, c: csq_attention_flex(q, k, v, causal=c),
    "chunked_torch": lambda q, k, v, c: csq_attention_chunked(q, k, v, causal=c),
}
MASKS = {"causal": True, "full": False}
MODES = ("fwd", "fwd+bwd")
# What the default sweep leaves out: the plain-PyTorch baseline's forward + backward at 65536.
# Autograd keeps every chunk's D^2 features: one run at N = 16384, D = 64, H = 4 took 8 s and
# 5 GB on 2 cores, and both grow linearly, so 65536 would need about 20 GB. SDPA's quadratic
# forward + backward (about 25 s a run at 65536) is measured once there and fits the budget.
# FlexAttention has no backward on the CPU (torch 2.13 raises NotImplementedError): its
# forward + backward column stays null.
DEFAULT_SKIPS = ("chunked_torch:fwd+bwd=32768", "flex_csq:fwd+bwd=0")
QUICK = dict(lengths=[256, 512], dims=[32], heads=2, max_seconds=0.5, warmup=1,
             max_repeats=5, masks=["causal"])


def parse_skip(text: str) -> tuple[str, str | None, int]:
    """'IMPL[:MODE]=N' -> (impl, mode or None for both modes, N)."""
    try:
        target, n = text.split("=")
        impl, _, mode = target.partition(":")
        if impl not in IMPLS or (mode and mode not in MODES):
            raise ValueError
        return impl, mode or None, int(n)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--skip-above wants IMPL[:MODE]=N with IMPL in {list(IMPLS)} and MODE in "
            f"{list(MODES)}, got {text!r}") from None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+",
                   default=[256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536])
    p.add_argument("--dims", type=int, nargs="+", default=[32, 64, 128, 256], help="Dk = Dv")
    p.add_argument("--masks", nargs="+", choices=list(MASKS), default=list(MASKS),
                   help="causal, full (not causal), or both (default)")
    p.add_argument("--impls", nargs="+", choices=list(IMPLS), default=list(IMPLS),
                   help="implementations to time (sdpa is always timed: the ratios need it)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--max-seconds", type=float, default=20.0,
                   help="measured seconds per implementation per point (default 20); at "
                        "least 3 runs unless one run alone exceeds it")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-repeats", type=int, default=30)
    p.add_argument("--skip-above", type=parse_skip, action="append", metavar="IMPL[:MODE]=N",
                   help="do not run IMPL (in MODE, or both modes) at lengths above N; recorded "
                        f"as null. Repeatable; adds to the default {' '.join(DEFAULT_SKIPS)}")
    p.add_argument("--no-default-skips", action="store_true",
                   help="run every implementation at every length")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: {QUICK}, output to bench/out/cpu_quick.*")
    p.add_argument("--out", default=None, help="JSON path (default bench/out/cpu.json; the "
                   "committed results are written only when named, e.g. bench/results/cpu.json)")
    p.add_argument("--plot", default=None, help="PNG path (default: the JSON path, .png)")
    if p.parse_known_args(argv)[0].quick:
        p.set_defaults(**QUICK)  # options given on the command line still win
    args = p.parse_args(argv)
    out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")  # ignored by git
    args.out = args.out or os.path.join(out_dir, "cpu_quick.json" if args.quick else "cpu.json")
    args.plot = args.plot or os.path.splitext(args.out)[0] + ".png"
    skips = [] if args.no_default_skips else [parse_skip(s) for s in DEFAULT_SKIPS]
    args.skips = skips + (args.skip_above or [])
    return args


def skipped(skips, impl: str, mode: str, n: int) -> bool:
    return any(i == impl and m in (None, mode) and n > limit for i, m, limit in skips)


def make_inputs(args, n: int, d: int, requires_grad: bool):
    shape = (args.batch, args.heads, n, d)
    q, k, v = (torch.randn(shape).requires_grad_(requires_grad) for _ in range(3))
    return q, k, v


def timed_calls(args, n: int, d: int, causal: bool, mode: str, impls: list[str]):
    """One closure per implementation that runs it once on shared inputs in this mode."""
    if mode == "fwd":
        q, k, v = make_inputs(args, n, d, requires_grad=False)
        return {name: (lambda f=IMPLS[name]: f(q, k, v, causal)) for name in impls}
    q, k, v = make_inputs(args, n, d, requires_grad=True)
    dy = torch.randn(args.batch, args.heads, n, d)

    def fwd_bwd(f):
        # autograd.grad rather than .backward(): nothing accumulates into q.grad across runs.
        return torch.autograd.grad(f(q, k, v, causal), (q, k, v), dy)

    return {name: (lambda f=IMPLS[name]: fwd_bwd(f)) for name in impls}


def measure_point(args, n: int, d: int, causal: bool, mode: str) -> dict:
    impls = [name for name in IMPLS if (name in args.impls or name == "sdpa")
             and not skipped(args.skips, name, mode, n)]
    times = interleaved_times(timed_calls(args, n, d, causal, mode, impls), CPU,
                              budget_s=args.max_seconds, warmup=args.warmup,
                              max_repeats=args.max_repeats)
    gc.collect()  # free the inputs and autograd buffers before the next, larger point
    out = {}
    for name in IMPLS:
        if name not in times:
            out[name] = None
            continue
        out[name] = summarize(times[name])
        if len(times[name]) == 1 and times[name][0] > args.max_seconds:
            out[name]["note"] = "one run only: a single run exceeded --max-seconds"
    return out


def check_agreement(args) -> dict:
    """Before timing anything: every CSQ implementation must compute CSQ (SDPA computes
    softmax attention, a different function, and is only timed)."""
    n, d = 300, max(args.dims)
    q, k, v = (t.double() for t in make_inputs(args, n, d, requires_grad=False))
    errs = {}
    for mask, causal in MASKS.items():
        ref = csq_ext.csq_attention_reference(q, k, v, causal=causal)
        for name in IMPLS:
            if name != "sdpa" and name in args.impls:
                y = IMPLS[name](q.float(), k.float(), v.float(), causal).double()
                errs[f"{name}:{mask}"] = ((y - ref).norm() / ref.norm()).item()
    print(f"float32 relative error vs the float64 reference at N={n}, D={d}: "
          + ", ".join(f"{name} {e:.1e}" for name, e in errs.items()))
    if max(errs.values()) > 1e-4:
        raise SystemExit("the implementations disagree; not timing them")
    return errs


def ratio(result: dict, impl: str, mode: str):
    """SDPA's median time over impl's: above 1, impl is faster than SDPA."""
    mine, sdpa = result[mode][impl], result[mode]["sdpa"]
    return sdpa["median_s"] / mine["median_s"] if mine and sdpa else None


def _flop_path(impl: str, pt: dict, mode: str) -> str:
    """Whose FLOP count an implementation's time is divided by (bench/roofline.py)."""
    if impl == "csq_ext":
        return pt["auto_path"] if mode == "fwd" else pt["auto_path_fwd_bwd"]
    return {"direct": "direct", "flex_csq": "direct", "chunked": "chunked",
            "chunked_torch": "chunked", "sdpa": "sdpa"}[impl]


def add_roofline(pt: dict, heads: int, peak: float) -> None:
    """GFLOP/s of every timed implementation at this point, and its fraction of the peak."""
    pt["gflops"], pt["peak_fraction"] = {}, {}
    for impl in IMPLS:
        for mode in MODES:
            entry = pt[mode][impl]
            if entry is None:
                continue
            flops = attention_flops(_flop_path(impl, pt, mode), pt["n"], pt["d"],
                                    pt["mask"] == "causal", heads, mode)
            rate = flops / entry["median_s"] / 1e9
            pt["gflops"].setdefault(impl, {})[mode] = rate
            pt["peak_fraction"].setdefault(impl, {})[mode] = rate / peak


def print_roofline(points: list[dict], peak: float) -> None:
    impls = ("sdpa", "csq_ext", "direct", "chunked")
    print(f"\nGFLOP/s and fraction of the measured float32 GEMM peak ({peak:.0f} GFLOP/s; "
          "forward + backward counted as 3.5x the forward's FLOPs, bench/roofline.py)")
    head = f"{'mask':<6} {'N':>6} {'D':>3} " + " ".join(f"{i + ' fwd':>15} {'fwd+bwd':>13}"
                                                           for i in impls)
    print(head + "\n" + "-" * len(head))
    for pt in points:
        cells = []
        for impl in impls:
            for mode in MODES:
                g = pt["gflops"].get(impl, {}).get(mode)
                cells.append(f"{'-':>13}" if g is None else
                             f"{g:7.0f} {pt['peak_fraction'][impl][mode]:4.0%}")
        print(f"{pt['mask']:<6} {pt['n']:>6} {pt['d']:>3} " + "  ".join(cells))


def print_table(points: list[dict]) -> None:
    def ms(entry):
        if entry is None:
            return "skipped"
        mark = "*" if entry["runs"] == 1 else ""
        return f"{entry['median_s'] * 1e3:.2f} ({entry['min_s'] * 1e3:.2f}){mark}"

    def x(r):
        return "-" if r is None else f"{r:.2f}x"

    head = (f"{'mask':<6} {'N':>6} {'D':>3} {'impl':<14} {'fwd ms med (min)':>22} "
            f"{'fwd+bwd ms med (min)':>24} {'SDPA/impl fwd':>14} {'fwd+bwd':>8}")
    print("\n" + head + "\n" + "-" * len(head))
    for pt in points:
        for impl in IMPLS:
            fwd, both = pt["fwd"][impl], pt["fwd+bwd"][impl]
            if fwd is None and both is None:
                continue
            print(f"{pt['mask']:<6} {pt['n']:>6} {pt['d']:>3} {impl:<14} {ms(fwd):>22} {ms(both):>24} "
                  f"{x(ratio(pt, impl, 'fwd')):>14} {x(ratio(pt, impl, 'fwd+bwd')):>8}")
    print("median (min) over the measured runs; * one run only; SDPA/impl > 1: faster than "
          "SDPA; skipped: not run at this length (--skip-above), null in the JSON")


def plot(points: list[dict], meta: dict, path: str) -> bool:
    """Median time against N, log-log: one panel per (mode, D). False without matplotlib,
    which is optional (pip install .[bench]) so that CI can run --quick without it."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    dims = sorted({pt["d"] for pt in points})
    panels = [(mask, mode) for mask in MASKS for mode in MODES
              if any(pt["mask"] == mask for pt in points)]
    fig, axes = plt.subplots(len(panels), len(dims), figsize=(5.5 * len(dims), 4 * len(panels)),
                             squeeze=False)
    for row, (mask, mode) in enumerate(panels):
        for col, d in enumerate(dims):
            ax = axes[row][col]
            for impl in IMPLS:
                xy = [(pt["n"], pt[mode][impl]["median_s"] * 1e3) for pt in points
                      if pt["d"] == d and pt["mask"] == mask and pt[mode][impl]]
                if xy:
                    ax.plot(*zip(*xy), marker="o", label=impl, color=color(impl))
            lengths = sorted({pt["n"] for pt in points if pt["d"] == d})
            ax.set(xscale="log", yscale="log", xlabel="N", ylabel="median ms",
                   title=f"{mask} {mode}, Dk = Dv = {d}")
            ax.set_xticks(lengths, [f"{n // 1024}K" if n >= 1024 else str(n) for n in lengths])
            ax.xaxis.set_minor_locator(ticker.NullLocator())
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}"))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
    dev, st = meta["device"], meta["settings"]
    fig.suptitle(f"CSQ vs SDPA, float32, B={st['batch']}, H={st['heads']}\n"
                 f"{dev['name']}, {dev['torch_threads']} threads\ntorch {dev['torch']}, "
                 f"{meta['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_json(path: str, meta: dict, points: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({**meta, "points": points}, f, indent=1)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    settings = {k: v for k, v in vars(args).items() if k not in ("skips", "skip_above")}
    settings["skip_above"] = [f"{i}:{m or 'both'}={n}" for i, m, n in args.skips]
    meta = {"benchmark": "csq_ext CPU, float32",
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "device": device_description(CPU), "python": sys.version.split()[0],
            "settings": settings}
    print(f"{meta['device']['name']}: {meta['device']['torch_threads']} torch threads, "
          f"torch {torch.__version__}")
    meta["agreement_rel_err_float32"] = check_agreement(args)
    # auto's rates on this machine (csq_ext/_calibrate.py), measured before anything is timed
    # so that no timed warm-up pays for them; CSQ_CALIBRATE=0 keeps the shipped ones.
    meta["calibration"] = (None if _calibrate.mode() == "off" else
                           csq_ext.calibrate(dims=[(d, d) for d in args.dims]))
    meta["gemm_peak_start"] = gemm_peak()
    print(f"float32 GEMM peak: {meta['gemm_peak_start']['peak']:.0f} GFLOP/s "
          f"(blas {max(meta['gemm_peak_start']['blas'].values()):.0f}, onednn "
          f"{max(meta['gemm_peak_start']['onednn'].values(), default=0):.0f})", flush=True)

    start, points = time.perf_counter(), []
    for mask, d, n in ((m, d, n) for m in args.masks for d in args.dims for n in args.lengths):
        def auto(grad):
            return choose_path(n, d, d, MASKS[mask], "cpu", torch.get_num_threads(),
                               args.batch * args.heads, grad=grad)
        pt = {"mask": mask, "n": n, "d": d, "auto_path": auto(False),
              "auto_path_fwd_bwd": auto(True)}
        for mode in MODES:
            pt[mode] = measure_point(args, n, d, MASKS[mask], mode)
        points.append(pt)
        for impl in IMPLS:
            pt.setdefault("speedup_vs_sdpa", {})[impl] = {
                mode: ratio(pt, impl, mode) for mode in MODES}
        print(f"  {mask} N={n} D={d} done ({time.perf_counter() - start:.0f} s)", flush=True)
        meta["sweep_seconds"] = round(time.perf_counter() - start, 1)
        write_json(args.out, meta, points)  # after every point: a stopped sweep keeps data

    meta["gemm_peak_end"] = gemm_peak()
    peak = max(meta["gemm_peak_start"]["peak"], meta["gemm_peak_end"]["peak"])
    for pt in points:
        add_roofline(pt, args.batch * args.heads, peak)
    write_json(args.out, meta, points)
    print_table(points)
    print_roofline(points, peak)
    drawn = plot(points, meta, args.plot)
    print(f"wrote {args.out}" + (f" and {args.plot}" if drawn else " (no PNG: matplotlib is "
          "not installed)") + f"; the sweep took {meta['sweep_seconds']} s")


if __name__ == "__main__":
    main()
