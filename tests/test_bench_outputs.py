"""Benchmark hygiene: the benches write into bench/out/ (ignored by git) unless told where,
never over the committed bench/results/; every plot gives an implementation one colour in
every panel (bench/plot_colors.py)."""
import os
import sys

import pytest

from conftest import repository_folder

BENCH = repository_folder("bench")
sys.path.insert(0, BENCH)

import bench_cpu  # noqa: E402
import bench_gpu  # noqa: E402
import mem_peak  # noqa: E402
from plot_colors import COLORS, color  # noqa: E402

OUT = os.path.join(BENCH, "out") + os.sep


def test_default_outputs_are_in_bench_out():
    for argv in ([], ["--quick"]):
        args = bench_cpu.parse_args(argv)
        assert args.out.startswith(OUT) and args.plot.startswith(OUT), (argv, args.out)
    assert mem_peak.parse_args([]).out.startswith(OUT)
    meta = {"device": {"name": "Some GPU", "torch": "2.13.0", "torch_version_cuda": "13.0"},
            "date": "2026-12-07T10:00:00"}
    for path in bench_gpu.output_paths(bench_gpu.parse_args([]), meta):
        assert path.startswith(OUT), path
    # An explicit path is where the committed results are written.
    committed = os.path.join("bench", "results", "cpu.json")
    assert bench_cpu.parse_args(["--out", committed]).out == committed
    assert mem_peak.parse_args(["--out", committed]).out == committed


def test_one_colour_per_implementation_in_every_panel(tmp_path, monkeypatch):
    """bench_cpu's figure with an implementation missing from some panels (skipped at long
    lengths, or not run at all for one head size): each label keeps its colour everywhere."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure
    figures = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: figures.append(self))
    impls = list(bench_cpu.IMPLS)
    points = []
    for d in (32, 64):
        for n in (256, 1024):
            run = [i for i in impls if not (i == "chunked_torch" and d == 32)
                   and not (i == "flex_csq" and n == 1024)]
            timing = {i: ({"median_s": 1e-3 * (1 + impls.index(i))} if i in run else None)
                      for i in impls}
            points.append({"d": d, "n": n, "mask": "causal", "fwd": timing,
                           "fwd+bwd": dict(timing)})
    meta = {"device": {"name": "cpu", "torch_threads": 2, "torch": "2.13.0"},
            "settings": {"batch": 1, "heads": 4}, "date": "2026-12-07"}
    assert bench_cpu.plot(points, meta, str(tmp_path / "p.png"))
    (fig,) = figures
    seen = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            seen.setdefault(line.get_label(), set()).add(line.get_color())
    assert set(seen) == set(impls)
    assert all(len(c) == 1 for c in seen.values()), seen
    assert len({next(iter(c)) for c in seen.values()}) == len(impls)  # distinct colours


def test_every_known_implementation_has_its_own_colour():
    from csq_ext.nn import KERNELS
    names = list(bench_cpu.IMPLS) + list(bench_gpu.make_impls(["flash", "cudnn"], None))
    assert all(n in COLORS for n in names + list(KERNELS)), [n for n in names if n not in COLORS]
    for group in (bench_cpu.IMPLS, bench_gpu.make_impls(["flash", "cudnn", "math"], None),
                  [k for k in KERNELS if k != "csq"] + ["csq"]):
        assert len({color(n) for n in group}) == len(group), group
    assert color("some_new_impl") == color("some_new_impl")  # stable for unknown names
