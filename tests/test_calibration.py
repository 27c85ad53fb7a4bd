"""The cost model calibrated on the machine it runs on (csq_ext/_calibrate.py): measured at the
first auto call with new head sizes, cached per machine and torch build, switchable off, and
never failing the call that triggered it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import csq_ext
from csq_ext import _calibrate, _cost

from conftest import randn


@pytest.fixture
def calib(tmp_path, monkeypatch):
    """Calibration on, into an empty cache directory, with nothing held in memory."""
    monkeypatch.setenv("CSQ_CALIBRATE", "1")
    monkeypatch.setenv("CSQ_CACHE_DIR", str(tmp_path))
    _calibrate.forget()
    yield tmp_path
    _calibrate.forget()


def _cache_files(path):
    return sorted(p for p in os.listdir(path) if p.startswith("calibration-"))


def _fake_rates(direct: float, chunked: float) -> dict:
    return {m: {"chunked": chunked, "direct causal": direct, "direct full": direct}
            for m in _calibrate.MODES}


def test_first_auto_call_measures_and_caches(calib, gen):
    """One auto call at new head sizes measures six positive rates and writes them; the
    choice then uses them, and a second call measures nothing."""
    q, k, v = (randn(gen, 1, 2, 40, 8, dtype=torch.float32) for _ in range(3))
    csq_ext.attention(q, k, v)
    files = _cache_files(calib)
    assert len(files) == 1
    with open(calib / files[0]) as f:
        stored = json.load(f)
    assert stored["format"] == _calibrate.FORMAT
    assert stored["machine"] == _calibrate.machine()
    key = f"threads={torch.get_num_threads()},dk=8,dv=8"
    rates = stored["entries"][key]["rates"]
    assert all(rates[m][p] > 0 for m in _calibrate.MODES for p in _calibrate.PATHS)
    # The model now reads the measured rates: equal costs to the model's own formula.
    n = 3000
    expect = _cost.direct_flops(n, 8, 8, True, 2) / (rates["fwd"]["direct causal"] * 2)
    got = _cost.direct_cost(n, 8, 8, True, 2, 2, measured=_calibrate.rates(8, 8, 2,
                                                                            measure=False))
    if torch.get_num_threads() == 2:
        assert got == pytest.approx(expect)
    # No second measurement: a measurement now would raise.
    mtime = os.path.getmtime(calib / files[0])
    _calibrate._measure_entry, saved = None, _calibrate._measure_entry
    try:
        csq_ext.attention(q, k, v)
    finally:
        _calibrate._measure_entry = saved
    assert os.path.getmtime(calib / files[0]) == mtime


def test_cached_rates_are_read_by_a_new_process(calib):
    """Another process on the same machine reads the file instead of measuring."""
    entry = {"rates": _fake_rates(direct=1e-6, chunked=1e6)}
    desc = _calibrate.machine()
    threads = torch.get_num_threads()
    record = {"format": _calibrate.FORMAT, "machine": desc,
              "entries": {f"threads={threads},dk=64,dv=64": entry}}
    with open(_calibrate._path_for(_calibrate._file_key(desc)), "w") as f:
        json.dump(record, f)
    code = ("import torch, csq_ext._calibrate as c, csq_ext._cost as m\n"
            "c._measure_entry = None\n"  # a measurement would fail
            f"print(m.choose_path(1024, 64, 64, True, 'cpu', {threads}, 4, measure=True))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ), check=True).stdout.strip()
    # The shipped rates run N = 1024, D = 64 direct; the cached (absurd) ones say chunked.
    assert _cost.choose_path(1024, 64, 64, True, "cpu", threads, 4) == "chunked"
    assert out == "chunked"
    os.environ["CSQ_CALIBRATE"] = "0"
    try:
        assert _cost.choose_path(1024, 64, 64, True, "cpu", threads, 4) == "direct"
    finally:
        os.environ["CSQ_CALIBRATE"] = "1"


def test_switched_off_measures_nothing(calib, monkeypatch, gen):
    monkeypatch.setenv("CSQ_CALIBRATE", "0")
    monkeypatch.setattr(_calibrate, "_measure_entry", None)
    q, k, v = (randn(gen, 1, 2, 40, 8, dtype=torch.float32) for _ in range(3))
    csq_ext.attention(q, k, v)
    assert _cache_files(calib) == []
    assert _calibrate.rates(8, 8, torch.get_num_threads(), measure=True) is None


def test_cached_mode_reads_but_never_measures(calib, monkeypatch):
    monkeypatch.setenv("CSQ_CALIBRATE", "cached")
    monkeypatch.setattr(_calibrate, "_measure_entry", None)
    assert _calibrate.rates(8, 8, torch.get_num_threads(), measure=True) is None
    assert _cache_files(calib) == []


def test_a_failing_measurement_falls_back_with_one_warning(calib, monkeypatch, gen):
    def broken(*args):
        raise RuntimeError("timer exploded")
    monkeypatch.setattr(_calibrate, "_lengths", broken)
    q, k, v = (randn(gen, 1, 2, 40, 8, dtype=torch.float32) for _ in range(3))
    with pytest.warns(RuntimeWarning, match="timer exploded"):
        y = csq_ext.attention(q, k, v)
    assert torch.isfinite(y).all()
    assert _calibrate.rates(8, 8, torch.get_num_threads(), measure=False) is None
    assert _cache_files(calib) == []


def test_unwritable_cache_keeps_rates_in_memory(tmp_path, monkeypatch, gen):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setenv("CSQ_CALIBRATE", "1")
    monkeypatch.setenv("CSQ_CACHE_DIR", str(blocker / "csq"))
    _calibrate.forget()
    try:
        q, k, v = (randn(gen, 1, 2, 40, 8, dtype=torch.float32) for _ in range(3))
        with pytest.warns(RuntimeWarning, match="cannot write the calibration cache"):
            csq_ext.attention(q, k, v)
        assert _calibrate.rates(8, 8, torch.get_num_threads(), measure=False) is not None
    finally:
        _calibrate.forget()


def test_corrupt_cache_file_is_measured_again(calib, gen):
    desc = _calibrate.machine()
    path = _calibrate._path_for(_calibrate._file_key(desc))
    with open(path, "w") as f:
        f.write("{not json")
    q, k, v = (randn(gen, 1, 2, 40, 8, dtype=torch.float32) for _ in range(3))
    with pytest.warns(RuntimeWarning, match="ignoring the calibration cache"):
        csq_ext.attention(q, k, v)
    with open(path) as f:
        stored = json.load(f)
    assert f"threads={torch.get_num_threads()},dk=8,dv=8" in stored["entries"]


def test_forced_paths_and_compile_never_measure(calib, monkeypatch, gen):
    monkeypatch.setattr(_calibrate, "_measure_entry", None)
    q, k, v = (randn(gen, 1, 2, 40, 8, dtype=torch.float32) for _ in range(3))
    csq_ext.attention(q, k, v, path="direct")
    csq_ext.attention(q, k, v, path="chunked")
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b, c: csq_ext.attention(a, b, c), fullgraph=True)
    y = compiled(q, k, v)
    torch.testing.assert_close(y, csq_ext.attention(q, k, v, path="chunked"), rtol=1e-5,
                               atol=1e-6)
    assert _cache_files(calib) == []


def test_calibrate_function_measures_the_given_head_sizes(calib):
    info = csq_ext.calibrate(dims=[(8, 4)])
    key = f"threads={torch.get_num_threads()},dk=8,dv=4"
    assert set(info["entries"]) == {key}
    assert os.path.exists(info["file"])
    rates = info["entries"][key]["rates"]
    assert all(rates[m][p] > 0 for m in _calibrate.MODES for p in _calibrate.PATHS)
    # The measured rates predict the measured forward times (the model's own FLOP count).
    assert info["entries"][key]["lengths"]["direct"] >= 1024


def test_a_different_machine_does_not_read_another_machines_rates(calib, monkeypatch):
    entry = {"rates": _fake_rates(direct=1.0, chunked=1.0)}
    desc = dict(_calibrate.machine(), cpu="some other CPU")
    record = {"format": _calibrate.FORMAT, "machine": desc,
              "entries": {f"threads={torch.get_num_threads()},dk=64,dv=64": entry}}
    with open(_calibrate._path_for(_calibrate._file_key(desc)), "w") as f:
        json.dump(record, f)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _calibrate.rates(64, 64, torch.get_num_threads(), measure=False) is None


def test_compiled_graphs_use_the_cached_rates(calib, gen):
    """A graph traced by torch.compile takes the rates cached for this machine (as constants)
    and picks the path they say, for static and dynamic shapes."""
    threads = torch.get_num_threads()
    desc = _calibrate.machine()
    record = {"format": _calibrate.FORMAT, "machine": desc, "entries": {
        f"threads={threads},dk=8,dv=8": {"rates": _fake_rates(direct=1e-6, chunked=1e6)}}}
    with open(_calibrate._path_for(_calibrate._file_key(desc)), "w") as f:
        json.dump(record, f)
    q, k, v = (randn(gen, 1, 2, 40, 8, dtype=torch.float32) for _ in range(3))

    def traced_ops(dynamic):
        seen = []

        def backend(gm, example_inputs):
            seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
            return gm.forward
        torch._dynamo.reset()
        torch.compile(lambda a, b, c: csq_ext.attention(a, b, c), backend=backend,
                      fullgraph=True, dynamic=dynamic)(q, k, v)
        torch._dynamo.reset()
        return [o for o in seen if "csq_ext" in o]

    # The graph holds the automatic choice itself (csq_ext::auto_fwd, one graph for every N);
    # the operator picks the path when the graph runs, from the cached rates.
    def runtime_choice():
        shift = torch.ones(2)
        path = torch.ops.csq_ext.auto_fwd(q, k, v, shift, None, True, 8 ** -0.5, True, True,
                                          1e-6, 0, False)[4]
        return "direct" if int(path) else "chunked"

    for dynamic in (False, True):
        ops_seen = traced_ops(dynamic)
        assert any("auto_fwd" in o for o in ops_seen), ops_seen
    assert runtime_choice() == "chunked"
    os.environ["CSQ_CALIBRATE"] = "0"  # the shipped rates run this call direct
    try:
        assert runtime_choice() == "direct"
    finally:
        os.environ["CSQ_CALIBRATE"] = "1"


def _shipped_times(fraction: float, dk: int) -> dict:
    return {m: {p: fraction * _cost._shipped_rate(m, p, dk) for p in _calibrate.PATHS}
            for m in _calibrate.MODES}


def test_a_busy_machines_measurement_is_not_cached(calib, monkeypatch):
    """Rates all far below the shipped ones (a measurement while other work shared the cores)
    serve this process, with one warning, and are never written; plausible ones are."""
    threads = torch.get_num_threads()
    busy = {"rates": _shipped_times(0.1, 64)}
    monkeypatch.setattr(_calibrate, "_measure_entry", lambda dk, dv, t: busy)
    with pytest.warns(RuntimeWarning, match="looks busy"):
        got = _calibrate.rates(64, 64, threads, measure=True)
    assert got == busy["rates"]
    assert _cache_files(calib) == []
    plausible = {"rates": _shipped_times(0.1, 64)}
    plausible["rates"]["fwd"]["direct causal"] = _cost._shipped_rate("fwd", "direct causal", 64)
    monkeypatch.setattr(_calibrate, "_measure_entry", lambda dk, dv, t: plausible)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _calibrate.rates(128, 128, threads, measure=True) == plausible["rates"]
    assert len(_cache_files(calib)) == 1


def test_a_cached_busy_entry_is_measured_again(calib, monkeypatch):
    """A cache written before the busy rule (rates a tenth of the shipped ones at Dk = 64) is
    not read: the next auto call measures again. Small heads are never judged (below the
    shipped table's Dk = 32 the rates are low for real)."""
    threads = torch.get_num_threads()
    desc = _calibrate.machine()
    record = {"format": _calibrate.FORMAT, "machine": desc, "entries": {
        f"threads={threads},dk=64,dv=64": {"rates": _shipped_times(0.1, 64)},
        f"threads={threads},dk=8,dv=8": {"rates": _shipped_times(0.01, 32)}}}
    with open(_calibrate._path_for(_calibrate._file_key(desc)), "w") as f:
        json.dump(record, f)
    fresh = {"rates": _shipped_times(0.8, 64)}
    calls = []
    monkeypatch.setattr(_calibrate, "_measure_entry",
                        lambda dk, dv, t: calls.append((dk, dv)) or fresh)
    assert _calibrate.rates(8, 8, threads, measure=True) == record["entries"][
        f"threads={threads},dk=8,dv=8"]["rates"]
    assert _calibrate.rates(64, 64, threads, measure=True) == fresh["rates"]
    assert calls == [(64, 64)]


def test_the_measurement_interleaves_its_runs(calib, monkeypatch):
    """Every one of the six runs is timed once per round, in turn (a load change reaches all
    paths alike), after one warm-up call each."""
    order = []
    module = sys.modules["csq_ext.attention"]  # the package's name `attention` is the function
    real = module.attention

    def spy(q, k, v, *, causal, path, **kw):
        order.append((path, causal, q.requires_grad))
        return real(q, k, v, causal=causal, path=path, **kw)
    monkeypatch.setattr(module, "attention", spy)
    monkeypatch.setattr(_calibrate, "_lengths", lambda dk, dv, t: (64, 64))
    entry = _calibrate._measure_entry(8, 8, torch.get_num_threads())
    assert entry is not None
    runs = order[:6]
    assert len(set(runs)) == 6
    assert order == runs * 4  # warm-up, then three rounds in the same order
