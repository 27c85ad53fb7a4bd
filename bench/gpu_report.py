"""The reports of bench_gpu.py: the speed-up against SDPA, the crossover N and the issue's
targets from the measured points, and the markdown table, the printed table, the PNG plot and
the JSON file."""
from __future__ import annotations

import json

from gpu_gate import GATE_TOL
from plot_colors import color  # bench/, beside this script

MODES = ("fwd", "fwd+bwd")
GROUPS = ("target", "causal", "full")  # in the order they are measured
TARGET_RATIO = 3.0   # the issue: SDPA / csq_ext >= 3x, fwd+bwd, B=1 H=8 N=65536 causal
TARGET_CROSSOVER = 16384


def ratio(pt: dict, baseline: str) -> float | None:
    """Baseline SDPA median over csq_ext's: above 1, csq_ext is faster."""
    mine, base = pt["impls"].get("csq_ext"), pt["impls"].get(baseline)
    return base["median_s"] / mine["median_s"] if mine and base else None


def crossover(points: list[dict], group: str, mode: str, baseline: str) -> dict:
    pts = sorted((p for p in points if p["group"] == group and p["mode"] == mode
                  and ratio(p, baseline) is not None), key=lambda p: p["n"])
    faster = [p["n"] for p in pts if ratio(p, baseline) > 1]
    stable = None
    for p in reversed(pts):
        if ratio(p, baseline) <= 1:
            break
        stable = p["n"]
    return {"crossover_n": stable, "first_faster_n": min(faster) if faster else None,
            "measured_n": [p["n"] for p in pts],
            "faster_at_every_measured_n": bool(pts) and stable == pts[0]["n"]}


def summarize_targets(points: list[dict], baseline: str, target: list[int]) -> dict:
    out = {"baseline": baseline, "target_config": dict(zip(("B", "H", "N"), target)),
           "goal_ratio_fwd_bwd": TARGET_RATIO, "goal_crossover_n": TARGET_CROSSOVER}
    for mode in MODES:
        pt = next((p for p in points if p["group"] == "target" and p["mode"] == mode), None)
        out[f"target_ratio_{mode}"] = ratio(pt, baseline) if pt else None
    r = out["target_ratio_fwd+bwd"]
    out["target_ratio_met"] = None if r is None else r >= TARGET_RATIO
    out["crossover"] = {f"{g}/{m}": crossover(points, g, m, baseline)
                        for g in ("causal", "full") for m in MODES}
    c = out["crossover"]["causal/fwd+bwd"]
    out["crossover_met"] = (None if not c["measured_n"] else
                            c["crossover_n"] is not None and c["crossover_n"] <= TARGET_CROSSOVER)
    return out


def fmt_ms(entry) -> str:
    if not entry:
        return "null"
    return f"{entry['median_s'] * 1e3:.3f} ({entry['min_s'] * 1e3:.3f})" + \
        ("*" if entry["runs"] == 1 else "")


def fmt_x(r) -> str:
    return "-" if r is None else f"{r:.2f}x"


def fmt_tf(entry) -> str:
    return "-" if not entry else f"{entry['tflops_median']:.3g}"


def fmt_mem(pt, name) -> str:
    m = pt.get("memory", {}).get(name)
    return "-" if not m else f"{m['peak_bytes'] / 2**20:.0f} / {m['call_bytes'] / 2**20:.0f}"


def group_title(group: str, mode: str) -> str:
    what = {"target": "target configuration, causal", "causal": "causal sweep",
            "full": "non-causal sweep"}[group]
    return f"{what}, {mode}"


def markdown(meta: dict, points: list[dict], impls: list[str], baseline: str) -> str:
    dev, st, gate = meta["device"], meta["settings"], meta.get("gate", {})
    lines = [f"# csq_ext vs torch SDPA on {dev.get('name')}", ""]
    if meta.get("invalid"):
        lines += [f"**INVALID: {meta['invalid']}**", ""]
    lines += [f"- date {meta['date']}; torch {dev.get('torch')}, torch.version.cuda "
              f"{dev.get('torch_version_cuda')}, driver {dev.get('driver')}, cuDNN "
              f"{dev.get('cudnn')}; csq_ext build `{dev.get('csq_build')}`; commit "
              f"{meta.get('git_commit')}{' (dirty tree)' if meta.get('git_dirty') else ''}",
              f"- {st['dtype']}, Dk = Dv = {st['dim']}; sweep sizes H = {st['heads']}, "
              f"B = max(1, {st['tokens']} // (H N)) (B H N = {st['tokens']} head-tokens); "
              f"target B, H, N = {st['target']}",
              f"- times: median (min) ms over interleaved repeats after warm-up, "
              f"{'wall clock (CPU dry run)' if meta['dry_run'] else 'CUDA events'}; "
              f"* = one run; SDPA/csq > 1: csq_ext faster; baseline `{baseline}`"
              + (f" ({meta['sdpa_notes'][baseline.removeprefix('sdpa_')]})"
                 if baseline.removeprefix("sdpa_") in meta.get("sdpa_notes", {}) else
                 " (backend forced with torch.nn.attention.sdpa_kernel)"),
              f"- TFLOP/s: SDPA by FlashAttention's convention (4 B H N^2 D forward, / 2 "
              f"causal, x 3.5 fwd+bwd), csq_ext by the chunked algorithm's useful FLOPs "
              f"(see bench/gpu_flops.py); peak MiB: torch.cuda.max_memory_allocated during "
              f"one call / the part allocated by the call (inputs excluded)",
              f"- correctness gate (bf16 vs float64 reference, bar {GATE_TOL:g}): "
              f"{'PASS' if gate.get('passed') else 'FAIL'} "
              + "; ".join(f"{k}: " + ", ".join(f"{n} {v:.1e}" for n, v in e.items()
                                                if isinstance(v, float))
                          for k, e in gate.get("errors", {}).items()), ""]
    t = meta.get("targets")
    if t:
        def met(flag):
            return "-" if flag is None else ("yes" if flag else "NO")
        lines += ["## Targets", "", "| measure | measured | goal | met |", "|---|---|---|---|",
                  f"| SDPA / csq_ext, fwd+bwd, B,H,N = {st['target']}, causal | "
                  f"{fmt_x(t['target_ratio_fwd+bwd'])} | >= {TARGET_RATIO:g}x | "
                  f"{met(t['target_ratio_met'])} |",
                  f"| SDPA / csq_ext, fwd, same | {fmt_x(t['target_ratio_fwd'])} | - | - |"]
        for key, c in t["crossover"].items():
            goal = f"<= {TARGET_CROSSOVER}" if key == "causal/fwd+bwd" else "-"
            flag = met(t["crossover_met"]) if key == "causal/fwd+bwd" else "-"
            shown = "none measured" if not c["measured_n"] else (
                f"{c['crossover_n']}" + (" (faster at every N)" if c["faster_at_every_measured_n"]
                                         else "") if c["crossover_n"] else "not reached")
            lines.append(f"| crossover N, {key} | {shown} | {goal} | {flag} |")
        lines.append("")
    for group in GROUPS:
        for mode in MODES:
            pts = [p for p in points if p["group"] == group and p["mode"] == mode]
            if not pts:
                continue
            lines += [f"## {group_title(group, mode)}", "",
                      "| N | B | H | " + " | ".join(f"{n} ms" for n in impls)
                      + " | SDPA/csq | " + " | ".join(f"{n} TFLOP/s" for n in impls)
                      + " | " + " | ".join(f"{n} peak MiB" for n in impls) + " |",
                      "|" + "---|" * (4 + 3 * len(impls))]
            for p in pts:
                lines.append(f"| {p['n']} | {p['batch']} | {p['heads']} | "
                             + " | ".join(fmt_ms(p["impls"][n]) for n in impls)
                             + f" | {fmt_x(ratio(p, baseline))} | "
                             + " | ".join(fmt_tf(p["impls"][n]) for n in impls) + " | "
                             + " | ".join(fmt_mem(p, n) for n in impls) + " |")
            notes = [f"N={p['n']} {n}: {msg}" for p in pts for n, msg in p["notes"].items()]
            if notes:
                lines += [""] + [f"- {x}" for x in notes]
            lines.append("")
    return "\n".join(lines)


def print_table(points: list[dict], impls: list[str], baseline: str) -> None:
    head = (f"{'group':<7} {'mode':<8} {'N':>7} {'B':>4} "
            + " ".join(f"{n + ' ms med (min)':>26}" for n in impls)
            + f" {'SDPA/csq':>9} " + " ".join(f"{n[:10] + ' TF/s':>15}" for n in impls))
    print("\n" + head + "\n" + "-" * len(head))
    for p in points:
        print(f"{p['group']:<7} {p['mode']:<8} {p['n']:>7} {p['batch']:>4} "
              + " ".join(f"{fmt_ms(p['impls'][n]):>26}" for n in impls)
              + f" {fmt_x(ratio(p, baseline)):>9} "
              + " ".join(f"{fmt_tf(p['impls'][n]):>15}" for n in impls))
    print("ms: median (min) of the measured runs, * one run; null: not measured (OOM, error or "
          "time budget, see the JSON notes); SDPA/csq > 1: csq_ext faster")


def plot(meta: dict, points: list[dict], impls: list[str], baseline: str, path: str) -> str:
    """Median time against N (log-log) for the causal and non-causal sweeps, and the ratio
    SDPA / csq_ext against N; one row per mode. Returns a message."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        return "no PNG: matplotlib is not installed"
    fig, axes = plt.subplots(len(MODES), 3, figsize=(16, 9), squeeze=False)
    for row, mode in enumerate(MODES):
        for col, group in enumerate(("causal", "full")):
            ax = axes[row][col]
            pts = [p for p in points if p["group"] == group and p["mode"] == mode]
            for name in impls:
                xy = [(p["n"], p["impls"][name]["median_s"] * 1e3) for p in pts
                      if p["impls"][name]]
                if xy:
                    ax.plot(*zip(*xy), marker="o", label=name, color=color(name))
            ax.set(xscale="log", yscale="log", xlabel="N (B H N constant)", ylabel="median ms",
                   title=f"{group}, {mode}")
            ax.grid(True, which="both", alpha=0.3)
            if ax.lines:
                ax.legend()
        ax = axes[row][2]
        for group, style in (("causal", "o-"), ("full", "s--")):
            xy = [(p["n"], ratio(p, baseline)) for p in points
                  if p["group"] == group and p["mode"] == mode and ratio(p, baseline)]
            if xy:
                ax.plot(*zip(*xy), style, label=group)
        ax.axhline(1.0, color="gray", lw=1)
        ax.axhline(TARGET_RATIO, color="red", lw=1, ls=":", label=f"{TARGET_RATIO:g}x goal")
        ax.set(xscale="log", yscale="log", xlabel="N", ylabel=f"{baseline} / csq_ext",
               title=f"speed-up, {mode} (> 1: csq_ext faster)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    lengths = sorted({p["n"] for p in points if p["group"] != "target"})
    for ax in axes.flat:
        if lengths:
            ax.set_xticks(lengths, [f"{n // 1024}K" if n >= 1024 else str(n) for n in lengths])
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    dev, st = meta["device"], meta["settings"]
    fig.suptitle(f"csq_ext vs {baseline}, {st['dtype']}, Dk=Dv={st['dim']}, H={st['heads']}, "
                 f"B*H*N={st['tokens']}{'  [CPU DRY RUN]' if meta['dry_run'] else ''}"
                 f"{'  [INVALID: gate failed]' if meta.get('invalid') else ''}\n"
                 f"{dev.get('name')}, torch {dev.get('torch')} (CUDA "
                 f"{dev.get('torch_version_cuda')}), driver {dev.get('driver')}, {meta['date']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"


def write_outputs(meta, points, impls, baseline, paths) -> None:
    json_path, md_path, _ = paths
    with open(json_path, "w") as f:
        json.dump({**meta, "points": points}, f, indent=1)
    with open(md_path, "w") as f:
        f.write(markdown(meta, points, impls, baseline) + "\n")
