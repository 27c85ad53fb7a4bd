"""The CPU benchmark scripts run against the package as it is: each one, at a tiny size, end to
end (they call the public API and the registered operators, whose signatures change; a script
that no test runs breaks silently, as bench_overhead.py did when csq_direct_fwd gained
return_state). Times are not checked: only that every number is there and positive."""
import json
import os
import sys

import pytest

from conftest import repository_folder

BENCH = repository_folder("bench")
sys.path.insert(0, BENCH)

import bench_overhead  # noqa: E402
import compare_builds  # noqa: E402
import fit_state_cost  # noqa: E402


def test_bench_overhead_times_every_call(tmp_path):
    out = tmp_path / "overhead.json"
    bench_overhead.main(["--lengths", "8", "--dim", "16", "--heads", "2", "--calls", "2",
                         "--rounds", "1", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["n"], r["requires_grad"]) for r in rows] == [(8, False), (8, True)]
    for r in rows:
        assert set(r["us"]) == {"sdpa", "csq auto", "csq direct", "csq chunked", "op direct"}
        assert all(us > 0 for us in r["us"].values())


def test_fit_state_cost_fits_both_constants(tmp_path):
    out = tmp_path / "state.json"
    fit_state_cost.main(["--dims", "8", "16", "--lengths", "64", "--heads", "2", "--budget",
                         "0.05", "--out", str(out)])
    result = json.loads(out.read_text())
    assert [(r["d"], r["n"]) for r in result["rows"]] == [(8, 64), (16, 64)]
    for r in result["rows"]:
        assert set(r["median_s"]) == {"plain", "returns", "both"}
        assert all(t > 0 for t in r["median_s"].values())
    assert set(result["fit"]) == {"gemm_gflops", "feature_ns"}


def test_compare_builds_worker_times_every_path(capsys):
    compare_builds.main(["--worker",
                         json.dumps([[["causal", 16, 64], ["full", 8, 32]], compare_builds.PATHS]),
                         "--seconds", "0.01"])
    times = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = {f"{m} D={d} N={n} {path} {mode}" for m, d, n in (("causal", 16, 64),
                                                                  ("full", 8, 32))
                for path in compare_builds.PATHS for mode in ("fwd", "fwd+bwd")}
    assert set(times) == expected and all(t > 0 for t in times.values())


def test_compare_builds_points_are_parsed_and_checked():
    assert compare_builds._point("full:128:4096") == ("full", 128, 4096)
    with pytest.raises(SystemExit):
        compare_builds.main(["--points", "sideways:64:1024", "--before", "a:.", "--after", "b:."])


def test_compare_builds_needs_both_builds():
    with pytest.raises(SystemExit):
        compare_builds.main(["--before", "python:."])
