"""GPU benchmark: csq_ext.attention against torch SDPA (FlashAttention backend), same run.

bfloat16, Dk = Dv = 64 by default, causal and non-causal, forward and forward + backward. For
every point it prints and records the median and minimum time over repeats (CUDA events,
warm-up first, implementations interleaved round-robin within each repetition), the achieved
TFLOP/s of each implementation (FLOP conventions below), the peak CUDA memory of each call,
and the ratio SDPA time / csq_ext time (above 1: csq_ext is faster). Then the crossover N and
the issue's targets. Writes JSON (every raw time), a markdown table and a PNG plot.

    python bench/bench_gpu.py --out-dir "$OUT"       # full sweep, about 1-4 minutes on an H100
    python bench/bench_gpu.py --quick --out-dir /tmp # 4 lengths, shorter repeats
    python bench/bench_gpu.py --dry-run              # the whole pipeline on the CPU, tiny sizes

Order of work, most important first (a run that meets --budget-s skips what is left, recorded
as null): (1) correctness gate, (2) the target configuration B = 1, H = 8, N = 65536, causal,
(3) the causal sweep over N, (4) the non-causal sweep over N.

Sizes: H = --heads (8, the minimum we use) query heads = key/value heads (no grouping), and
B = max(1, --tokens // (H N)) with --tokens = 2^20, i.e. B H N = 2^20 head-tokens for every
N <= 131072 (N = 1K: B = 128; N = 64K: B = 2; N = 128K: B = 1). A constant number of tokens
keeps the GPU equally full at every N: csq_ext's time is then flat in N (linear in tokens) and
SDPA's grows linearly with N (quadratic per sequence). The target configuration
(B = 1, H = 8, N = 65536, --target) is measured separately at its own size.

Correctness gate (before any timing): csq_ext in bfloat16 against the float64 reference
(csq_ext.reference) on B = 2, H = 4, N = 1000, causal and not: output and dq, dk, dv must all
be finite with relative Frobenius error <= 2e-2 (the spec's bar). Recorded in the JSON. A
failed gate stops the benchmark unless --keep-going (the GPU suite passes it: one lease is
precious, and the numbers are then marked INVALID).

FLOP conventions: bench/gpu_flops.py (SDPA by FlashAttention's convention, csq_ext by the
chunked algorithm's useful work).

Paths: "csq_ext" is csq_ext.attention with path="auto" (the per-call choice of
csq_ext/_cost.py, whose CUDA constants are an uncalibrated estimate until this benchmark has
run on a GPU); "csq_direct" and "csq_chunked" force each path (--no-paths leaves them out;
the direct path is skipped above --direct-max-n, recorded as null with a note). The direct
path's FLOPs follow SDPA's convention (it computes the same N x N products tile by tile, plus
the ones column of the denominator); "csq_ext" counts the FLOPs of the path "auto" picked.

Crossover N: the smallest measured N from which csq_ext's median is below SDPA's at that N
and at every larger measured N (null if csq_ext is slower at the largest N). Targets from the
issue: SDPA / csq_ext >= 3 for forward + backward at B = 1, H = 8, N = 65536 (causal), and a
causal crossover N <= 16384.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import os
import re
import subprocess
import sys
import time
import warnings

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script from anywhere, without an installed csq_ext
    sys.path.insert(0, REPO)

import csq_ext  # noqa: E402
from csq_ext._timing import device_description, interleaved_times, summarize  # noqa: E402
from gpu_flops import CONVENTIONS, csq_flops, direct_flops, sdpa_flops  # noqa: E402
from gpu_gate import correctness_gate  # noqa: E402
from gpu_report import (MODES, TARGET_CROSSOVER, TARGET_RATIO, fmt_ms, fmt_x,  # noqa: E402
                        plot, print_table, ratio, summarize_targets, write_outputs)

SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                 "efficient": "EFFICIENT_ATTENTION", "math": "MATH", "default": None}

DEFAULTS = dict(lengths=[1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072],
                full_lengths=None, tokens=2 ** 20, heads=8, dim=64, dtype="bfloat16",
                target=[1, 8, 65536], point_seconds=0.4, warmup=3, min_repeats=5,
                max_repeats=50, budget_s=240.0, direct_max_n=32768)
QUICK = dict(lengths=[1024, 4096, 16384, 65536], full_lengths=[4096, 65536],
             point_seconds=0.15, warmup=2, min_repeats=3, max_repeats=20, budget_s=90.0)
DRY_RUN = dict(lengths=[64, 128, 256], full_lengths=[64, 256], tokens=2 ** 12, heads=8, dim=16,
               target=[1, 8, 256], point_seconds=0.02, warmup=1, min_repeats=2,
               max_repeats=3, budget_s=60.0)


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", help="N of the causal sweep "
                   f"(default {DEFAULTS['lengths']})")
    p.add_argument("--full-lengths", type=int, nargs="+",
                   help="N of the non-causal sweep (default: --lengths)")
    p.add_argument("--no-full", action="store_true", help="skip the non-causal sweep")
    p.add_argument("--no-target", action="store_true", help="skip the target configuration")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--tokens", type=int, help="B x H x N per point (default 2^20): "
                   "B = max(1, tokens // (H N))")
    p.add_argument("--heads", type=int, help="H, query = key/value heads (default 8)")
    p.add_argument("--dim", type=int, help="Dk = Dv (default 64)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--target", type=int, nargs=3, metavar=("B", "H", "N"),
                   help="the target configuration, causal (default 1 8 65536)")
    p.add_argument("--sdpa", nargs="+", default=["flash"], choices=list(SDPA_BACKENDS),
                   help="SDPA backends to time; the first is the baseline of the ratios "
                        "(default flash; 'default' lets SDPA choose)")
    p.add_argument("--point-seconds", type=float,
                   help="measured seconds per implementation per point (default 0.4; lowered "
                        "automatically when the budget runs short)")
    p.add_argument("--warmup", type=int)
    p.add_argument("--min-repeats", type=int)
    p.add_argument("--max-repeats", type=int)
    p.add_argument("--budget-s", type=float, help="wall-clock budget of the timing sweep; "
                   "points past it are skipped and recorded as null (default 240)")
    p.add_argument("--no-paths", action="store_true",
                   help="time only csq_ext (path='auto'), not also each forced path")
    p.add_argument("--direct-max-n", type=int,
                   help="skip the forced direct path above this N (default 32768)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-going", action="store_true",
                   help="time even when the correctness gate fails (results marked INVALID)")
    p.add_argument("--out", help="JSON path; .md and .png beside it")
    p.add_argument("--out-dir", help="directory for gpu_<GPU>_torch<V>_cuda<V>_<date>.json/.md/"
                   ".png (default bench/out, ignored by git: name bench/results to commit; "
                   "/tmp/csq_gpu_dry_run with --dry-run)")
    p.add_argument("--quick", action="store_true", help=f"shorter sweep: {QUICK}")
    p.add_argument("--dry-run", action="store_true",
                   help=f"the whole pipeline on the CPU with tiny sizes: {DRY_RUN}")
    p.add_argument("--fake-oom-above", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    preset = dict(DEFAULTS)
    if args.quick:
        preset.update(QUICK)
    if args.dry_run:
        preset.update(DRY_RUN)
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.full_lengths is None:
        args.full_lengths = list(args.lengths)
    if args.heads < 1 or args.dim < 1 or args.tokens < 1:
        p.error("--heads, --dim and --tokens must be positive")
    return args


# --------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------
def run_quiet(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=15,
                              cwd=REPO).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def gpu_state() -> dict | None:
    """Clocks, temperature, power from nvidia-smi (read only), or None without it."""
    fields = "driver_version,clocks.sm,clocks.mem,clocks.max.sm,temperature.gpu,power.draw"
    out = run_quiet(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"])
    if not out:
        return None
    values = [v.strip() for v in out.splitlines()[0].split(",")]
    return dict(zip(fields.split(","), values))


def describe(device: torch.device) -> dict:
    info = device_description(device)
    info["torch_version_cuda"] = torch.version.cuda
    info["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    state = gpu_state() if device.type == "cuda" else None
    info["driver"] = state["driver_version"] if state else None
    try:
        info["csq_build"] = torch.ops.csq_ext.build_info()
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        info["csq_build"] = f"unknown ({type(e).__name__})"
    return info


def slug(text: str) -> str:
    return re.sub(r"-+", "-", re.sub(r"[^A-Za-z0-9.]+", "-", str(text))).strip("-.") or "x"


def output_paths(args, meta: dict) -> tuple[str, str, str]:
    if args.out:
        stem = os.path.splitext(os.path.abspath(args.out))[0]
    else:
        if args.dry_run:
            name = f"gpu_dryrun_cpu_torch{slug(torch.__version__)}_{meta['date'][:10]}"
        else:
            dev = meta["device"]
            name = (f"gpu_{slug(dev['name'])}_torch{slug(dev['torch'])}_"
                    f"cuda{slug(dev['torch_version_cuda'])}_{meta['date'][:10]}")
            name += "_quick" if args.quick else ""
        default_dir = ("/tmp/csq_gpu_dry_run" if args.dry_run
                       else os.path.join(REPO, "bench", "out"))
        stem = os.path.join(os.path.abspath(args.out_dir or default_dir), name)
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    return stem + ".json", stem + ".md", stem + ".png"


# --------------------------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------------------------
def sdpa_context(backend: str):
    attr = SDPA_BACKENDS[backend]
    if attr is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel(getattr(SDPBackend, attr))


def sdpa_call(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def probe_sdpa(args, device, dtype) -> tuple[list[str], dict]:
    """The SDPA backends that run here (forward + backward, causal and not, on a small input);
    flash falls back to SDPA's own choice ('default') with a note when it cannot run."""
    usable, notes = [], {}
    for backend in args.sdpa:
        try:
            q = torch.randn(1, args.heads, 256, args.dim, device=device, dtype=dtype,
                            requires_grad=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with sdpa_context(backend):
                    for causal in (True, False):
                        y = sdpa_call(q, q, q, causal)
                        torch.autograd.grad(y, q, torch.randn_like(y))
            usable.append(backend)
        except Exception as e:  # noqa: BLE001 - recorded
            notes[backend] = f"unavailable: {type(e).__name__}: {str(e)[:300]}"
            print(f"SDPA backend {backend!r} unavailable here: {notes[backend]}")
    if "flash" in notes and "default" not in usable:
        usable.insert(0 if args.sdpa[0] == "flash" else len(usable), "default")
        notes["default"] = "used instead of the flash backend, which could not run"
        print("falling back to SDPA's default backend selection (noted in the results)")
    if not usable:
        raise SystemExit("no SDPA backend runs here")
    return usable, notes


def make_impls(backends: list[str], fake_oom_above: int | None, paths: bool = True) -> dict:
    """name -> f(q, k, v, causal). With one SDPA backend its sdpa_kernel context is entered
    once around each whole measurement (the context costs ~10 us a call); with several, each
    call enters its own. With `paths`, also each forced csq_ext path."""
    def csq_path(path):
        def csq(q, k, v, causal):
            if fake_oom_above is not None and q.shape[2] > fake_oom_above:
                raise torch.cuda.OutOfMemoryError("fake OOM (--fake-oom-above, a test hook)")
            return csq_ext.attention(q, k, v, causal=causal, path=path)
        return csq

    impls = {"csq_ext": csq_path("auto")}
    if paths:
        impls["csq_direct"] = csq_path("direct")
        impls["csq_chunked"] = csq_path("chunked")
    for backend in backends:
        if len(backends) == 1:
            impls[f"sdpa_{backend}"] = sdpa_call
        else:
            def call(q, k, v, causal, _b=backend):
                with sdpa_context(_b):
                    return sdpa_call(q, k, v, causal)
            impls[f"sdpa_{backend}"] = call
    return impls


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------
def cuda_alive(device) -> bool:
    """False once an error has poisoned the CUDA context (illegal address and the like)."""
    if device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize(device)
        return torch.ones(1, device=device).add_(1).item() == 2.0
    except Exception:  # noqa: BLE001
        return False


def free_memory(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def plan(args) -> list[dict]:
    def shape(n):
        h = args.heads
        return dict(batch=max(1, args.tokens // (h * n)), heads=h, n=n)

    items = []
    if not args.no_target:
        b, h, n = args.target
        items += [dict(group="target", causal=True, mode=m, batch=b, heads=h, n=n)
                  for m in args.modes]
    for n in args.lengths:
        items += [dict(group="causal", causal=True, mode=m, **shape(n)) for m in args.modes]
    if not args.no_full:
        for n in args.full_lengths:
            items += [dict(group="full", causal=False, mode=m, **shape(n)) for m in args.modes]
    return items


def measure(args, item: dict, impls: dict, device, dtype, point_seconds: float) -> dict:
    B, H, N, D, causal, mode = (item["batch"], item["heads"], item["n"], args.dim,
                                item["causal"], item["mode"])
    from csq_ext._cost import choose_path
    auto = choose_path(N, D, D, causal, device.type, torch.get_num_threads(), B * H, False)
    auto_flops = (csq_flops(B, H, H, N, D, D, causal, mode) if auto == "chunked"
                  else direct_flops(B, H, N, D, D, causal, mode))
    flops = {name: (auto_flops if name == "csq_ext"
                    else csq_flops(B, H, H, N, D, D, causal, mode) if name == "csq_chunked"
                    else direct_flops(B, H, N, D, D, causal, mode) if name == "csq_direct"
                    else sdpa_flops(B, H, N, D, D, causal, mode)) for name in impls}
    res = {**item, "dk": D, "dv": D, "tokens": B * H * N, "impls": {n: None for n in impls},
           "notes": {}, "flops": flops, "point_seconds": round(point_seconds, 4),
           "auto_path": auto}
    t0 = time.perf_counter()
    try:
        grad = mode == "fwd+bwd"
        q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype).requires_grad_(grad)
                   for _ in range(3))
        dy = torch.randn(B, H, N, D, device=device, dtype=dtype) if grad else None
    except torch.cuda.OutOfMemoryError as e:
        res["notes"] = {n: f"OOM allocating the inputs: {str(e)[:200]}" for n in impls}
        free_memory(device)
        return res

    def closure(f):
        if mode == "fwd":
            return lambda: f(q, k, v, causal)
        # autograd.grad rather than .backward(): nothing accumulates into q.grad across runs
        return lambda: torch.autograd.grad(f(q, k, v, causal), (q, k, v), dy)

    fns = {}
    for name, f in impls.items():
        if name == "csq_direct" and N > args.direct_max_n:
            res["notes"][name] = f"skipped: N > --direct-max-n = {args.direct_max_n}"
            continue
        fn = closure(f)
        try:  # one call: it must run, and it gives the peak memory (and a first warm-up)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                peak = torch.cuda.max_memory_allocated(device)
                res.setdefault("memory", {})[name] = {"peak_bytes": peak,
                                                      "call_bytes": peak - base}
            del out
            fns[name] = fn
        except torch.cuda.OutOfMemoryError as e:
            res["notes"][name] = f"OOM: {str(e)[:200]}"
            free_memory(device)
        except Exception as e:  # noqa: BLE001 - recorded; the caller checks the context
            res["notes"][name] = f"error: {type(e).__name__}: {str(e)[:400]}"
            if not cuda_alive(device):
                res["cuda_context_lost"] = True
                return res
    if fns:
        try:
            times = interleaved_times(fns, device, budget_s=point_seconds,
                                      warmup=max(0, args.warmup - 1),
                                      min_repeats=args.min_repeats,
                                      max_repeats=args.max_repeats)
            for name, runs in times.items():
                s = summarize(runs)
                s["tflops_median"] = flops[name] / s["median_s"] / 1e12
                s["tflops_best"] = flops[name] / s["min_s"] / 1e12
                res["impls"][name] = s
        except torch.cuda.OutOfMemoryError as e:
            res["notes"]["all"] = f"OOM while timing: {str(e)[:200]}"
        except Exception as e:  # noqa: BLE001
            res["notes"]["all"] = f"error while timing: {type(e).__name__}: {str(e)[:400]}"
            if not cuda_alive(device):
                res["cuda_context_lost"] = True
    del q, k, v, dy, fns
    free_memory(device)
    res["wall_s"] = round(time.perf_counter() - t0, 2)
    return res


# --------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        device = torch.device("cpu")
        torch.set_num_threads(1)  # a smoke test: keep the CPU free
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        raise SystemExit("no CUDA device here; use --dry-run to run the pipeline on the CPU")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    meta = {"benchmark": "csq_ext vs torch SDPA, GPU", "dry_run": args.dry_run,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "device": describe(device), "python": sys.version.split()[0],
            "git_commit": run_quiet(["git", "rev-parse", "HEAD"]),
            "git_dirty": bool(run_quiet(["git", "status", "--porcelain", "--untracked-files=no"])),
            "settings": {k: v for k, v in vars(args).items() if k != "fake_oom_above"},
            # the half-precision state products: 3 = 3xTF32 tensor cores (default), 1 = TF32,
            # 0 = CUDA cores (csrc/cuda/README.md, "Tensor cores")
            "csq_cuda_tensor_cores": os.environ.get("CSQ_CUDA_TENSOR_CORES") or "3",
            "flop_conventions": CONVENTIONS,
            "gpu_state_before": gpu_state() if device.type == "cuda" else None}
    dev = meta["device"]
    print(f"{dev['name']}: torch {dev['torch']}, torch.version.cuda {dev['torch_version_cuda']},"
          f" driver {dev['driver']}, csq_ext {dev['csq_build']}"
          + ("  [CPU DRY RUN]" if args.dry_run else ""))
    paths = output_paths(args, meta)

    backends, meta["sdpa_notes"] = probe_sdpa(args, device, dtype)
    impls = make_impls(backends, args.fake_oom_above, paths=not args.no_paths)
    names, baseline = list(impls), f"sdpa_{backends[0]}"
    meta["implementations"], meta["baseline"] = names, baseline
    print(f"timing {names}; ratios against {baseline}")

    meta["gate"] = correctness_gate(args, device, dtype)
    points: list[dict] = []
    if not meta["gate"]["passed"]:
        meta["invalid"] = "the correctness gate failed: csq_ext computes wrong numbers here"
        if not args.keep_going or not cuda_alive(device):
            write_outputs(meta, points, names, baseline, paths)
            print(f"correctness gate FAILED: not timing (wrote {paths[0]})")
            return 2
        print("correctness gate FAILED: timing anyway (--keep-going); results marked INVALID")

    items = plan(args)
    outer = sdpa_context(backends[0]) if len(backends) == 1 else contextlib.nullcontext()
    sweep_start, lost = time.perf_counter(), False
    with outer:
        for i, item in enumerate(items):
            left = args.budget_s - (time.perf_counter() - sweep_start)
            label = f"{item['group']:<6} {item['mode']:<7} N={item['n']:<6} B={item['batch']:<3}"
            if lost or left <= 0:
                why = "CUDA context lost after an error" if lost else "time budget (--budget-s)"
                points.append({**item, "dk": args.dim, "dv": args.dim,
                               "impls": {n: None for n in names},
                               "notes": {"all": f"skipped: {why}"}})
                print(f"  {label} skipped: {why}")
                continue
            # Spread what is left over the points still to come (each costs a few budgets:
            # warm-up, the memory call, repeats of every implementation).
            point_s = min(args.point_seconds,
                          max(0.01, left / (len(items) - i) / (3 * len(names))))
            pt = measure(args, item, impls, device, dtype, point_s)
            pt["ratio_sdpa_over_csq"] = ratio(pt, baseline)
            points.append(pt)
            lost = bool(pt.get("cuda_context_lost"))
            meta["sweep_seconds"] = round(time.perf_counter() - sweep_start, 1)
            write_outputs(meta, points, names, baseline, paths)  # a killed run keeps its data
            print(f"  {label} " + "  ".join(f"{n} {fmt_ms(pt['impls'][n])}" for n in names)
                  + f"  SDPA/csq {fmt_x(ratio(pt, baseline))}"
                  + "".join(f"  [{n}: {m}]" for n, m in pt["notes"].items())
                  + f"  ({meta['sweep_seconds']:.0f} s)", flush=True)

    meta["targets"] = summarize_targets(points, baseline, args.target)
    meta["gpu_state_after"] = gpu_state() if device.type == "cuda" else None
    meta["total_seconds"] = round(time.perf_counter() - start, 1)
    write_outputs(meta, points, names, baseline, paths)
    print_table(points, names, baseline)
    print(plot(meta, points, names, baseline, paths[2]))
    print(f"wrote {paths[0]} and {paths[1]}")

    t = meta["targets"]
    print(f"\nSUMMARY ({'CPU dry run, tiny sizes' if args.dry_run else dev['name']}; "
          f"baseline {baseline})")
    print(f"  correctness gate: {'PASS' if meta['gate']['passed'] else 'FAIL (INVALID)'}")
    print(f"  target B,H,N={args.target} causal: SDPA/csq fwd {fmt_x(t['target_ratio_fwd'])}, "
          f"fwd+bwd {fmt_x(t['target_ratio_fwd+bwd'])} (goal >= {TARGET_RATIO:g}x: "
          f"{ {None: 'not measured', True: 'met', False: 'NOT met'}[t['target_ratio_met']] })")
    for key, c in t["crossover"].items():
        shown = ("none measured" if not c["measured_n"] else
                 c["crossover_n"] if c["crossover_n"] else "not reached")
        print(f"  crossover N {key:<14}: {shown} (first faster at {c['first_faster_n']}; "
              f"measured {c['measured_n']})")
    print(f"  causal fwd+bwd crossover goal <= {TARGET_CROSSOVER}: "
          f"{ {None: 'not measured', True: 'met', False: 'NOT met'}[t['crossover_met']] }")
    if lost:
        print("  the CUDA context was lost after an error: later points were skipped")
        return 3
    return 0 if meta["gate"]["passed"] else 2


if __name__ == "__main__":
    sys.exit(main())
