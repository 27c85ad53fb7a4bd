"""The CPU cost model calibrated where it runs: a short measurement of each path's throughput at
the head sizes a program uses, cached per machine and torch build.

The cost model (``_cost.py``) divides each path's FLOP count by a throughput. The shipped
throughputs were measured on one machine; on another CPU (another vendor, another ISA, another
GEMM library behind torch) the paths' speeds move apart and the crossovers with them. So the
first ``path="auto"`` call on the CPU with a new (Dk, Dv) times both paths on that machine:
six short runs (chunked, direct causal, direct not causal; forward and forward + backward, about
0.3-2 s in all on 2 cores) at sizes where each takes a few tens of milliseconds, and stores the
rates in a JSON file keyed by the machine (CPU model and ISA), the torch build, csq_ext's version
and the GEMM backend. Later calls and later processes read the file.

Switches (environment variables, read at each lookup):

* ``CSQ_CALIBRATE``: ``1`` (default) measure at first use; ``0`` never measure and use the
  shipped rates (cached measurements are ignored too); ``cached`` use cached measurements but
  never measure.
* ``CSQ_CACHE_DIR``: where the file lives (default ``$XDG_CACHE_HOME/csq_ext``, else
  ``~/.cache/csq_ext``).

The six runs are timed interleaved (each run once per round, the fastest of three rounds
kept), so that a change in load reaches every path alike. A measurement whose every rate is
below a fifth of the shipped rate at its head size (from Dk = 32 on, where the shipped table
holds) was taken on a busy machine: it is used by this process only, never written, and a
cached entry like that (written by an earlier version) is measured again.

A calibration that cannot run (an error while timing, an unwritable cache directory, a corrupt
file) falls back to the shipped rates or keeps its result in memory, with one warning; it never
fails the call that triggered it. Nothing is measured while torch.compile traces, nor from
inside a measurement. ``csq_ext.calibrate()`` runs it on request and returns the rates.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import threading
import time
import warnings

import torch

from ._timing import cpu_model

# (path, mode) pairs the cost model reads; path names as in _cost._CPU_RATES.
PATHS = ("chunked", "direct causal", "direct full")
MODES = ("fwd", "fwd+bwd")
FORMAT = "csq_ext.calibration/1"

_lock = threading.RLock()
_memory: dict[str, dict] = {}      # file key -> {"entries": {...}} loaded or measured
_found: dict[tuple, dict] = {}     # (mkldnn on, threads, dk, dv) -> rates, this machine's
_measuring = threading.local()
_warned: set[str] = set()
# Bumped whenever the rates this process knows change (measured, loaded, forgotten), so that
# memos of choices made from them (_cost._CHOICES) do not outlive them.
generation = 0


def mode() -> str:
    """'on', 'off' or 'cached', from CSQ_CALIBRATE (read at every call; parsed when it
    changes)."""
    raw = os.environ.get("CSQ_CALIBRATE")
    if raw != _mode_seen[0]:
        value = (raw or "1").strip().lower()
        _mode_seen[:] = [raw, "off" if value in ("0", "off", "false", "no")
                         else "cached" if value == "cached" else "on"]
    return _mode_seen[1]


_mode_seen = [None, "on"]  # (the raw value last parsed, its meaning)


def cache_dir() -> str:
    explicit = os.environ.get("CSQ_CACHE_DIR")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "csq_ext")


@functools.lru_cache(maxsize=None)
def _cpu_isa() -> str:
    """The ISA level torch's CPU kernels dispatch to (DEFAULT, AVX2, AVX512, ...)."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # older torch
        return "unknown"


def machine() -> dict:
    """What the rates depend on: the CPU, its ISA level, the torch build, csq_ext, and the
    GEMM backend of our kernels (oneDNN's microkernel unless torch.backends.mkldnn is off)."""
    from . import __version__
    return {"cpu": cpu_model(), "isa": _cpu_isa(), "machine": platform.machine(),
            "torch": torch.__version__, "csq_ext": __version__, "gemm": _gemm_backend()}


def _gemm_backend() -> str:
    """'microkernel' or 'blas': what the CPU kernels' float32 products run on here
    (csrc/cpu/csq_gemm_choice.cpp measures it once per process)."""
    if not torch.backends.mkldnn.enabled:
        return "blas"
    from ._ops import ops
    return ops.cpu_gemm_backend().split()[0]


def _file_key(desc: dict) -> str:
    text = json.dumps(desc, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _path_for(key: str) -> str:
    return os.path.join(cache_dir(), f"calibration-{key}.json")


def _warn_once(tag: str, message: str) -> None:
    if tag not in _warned:
        _warned.add(tag)
        warnings.warn(f"csq_ext: {message}", RuntimeWarning, stacklevel=4)


def _load(key: str, desc: dict) -> dict:
    """The cached entries for this machine: memory first, then the file (read once)."""
    if key in _memory:
        return _memory[key]
    record = {"format": FORMAT, "machine": desc, "entries": {}}
    path = _path_for(key)
    try:
        with open(path) as f:
            stored = json.load(f)
        if stored.get("format") == FORMAT and stored.get("machine") == desc:
            record["entries"] = {k: v for k, v in stored.get("entries", {}).items()
                                 if _valid_entry(v) and not _looks_busy(k, v)}
    except (FileNotFoundError, NotADirectoryError):
        pass
    except (OSError, ValueError, AttributeError) as e:
        _warn_once("read:" + path, f"ignoring the calibration cache {path} ({e}); "
                   "it will be measured again")
    _memory[key] = record
    return record


def _valid_entry(entry) -> bool:
    try:
        return all(float(entry["rates"][m][p]) > 0 for m in MODES for p in PATHS)
    except (KeyError, TypeError, ValueError):
        return False


# A measurement whose every rate is below this fraction of the shipped rate was taken while
# other work shared the cores (seen: 0.06-0.13 under a test suite on 2 cores, where an idle
# run of the same machine gives 0.5-1.1; issue 25's Intel Xeon 0.75).
_BUSY_FRACTION = 0.2


def _looks_busy(name: str, entry: dict) -> bool:
    """Whether a cache entry (its key name gives Dk) was measured on a busy machine: every
    rate below _BUSY_FRACTION of the shipped one. Head sizes below the shipped table's (32)
    run slower for real and are never judged."""
    from ._cost import _shipped_rate
    try:
        dk = int(name.split("dk=")[1].split(",")[0])
    except (IndexError, ValueError):
        return False
    if dk < 32:
        return False
    return all(float(entry["rates"][m][p]) < _BUSY_FRACTION * _shipped_rate(m, p, dk)
               for m in MODES for p in PATHS)


def _save(key: str, record: dict) -> None:
    path = _path_for(key)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:  # keep entries another process wrote meanwhile
            with open(path) as f:
                stored = json.load(f)
            if stored.get("format") == FORMAT and stored.get("machine") == record["machine"]:
                for k, v in stored.get("entries", {}).items():
                    if _valid_entry(v):
                        record["entries"].setdefault(k, v)
        except (OSError, ValueError, AttributeError):
            pass
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:
        _warn_once("write:" + path, f"cannot write the calibration cache {path} ({e}); the "
                   "measured rates are kept for this process only (set CSQ_CACHE_DIR)")


def _entry_key(threads: int, dk: int, dv: int) -> str:
    return f"threads={threads},dk={dk},dv={dv}"


def rates(dk: int, dv: int, threads: int, *, measure: bool) -> dict | None:
    """{mode: {path: GFLOP/s per thread}} for these head sizes, or None (use the shipped
    rates). Measures them first when allowed (``measure``, CSQ_CALIBRATE, not tracing, not
    already measuring) and this process runs on ``threads`` threads; otherwise returns what
    is cached (for ``threads``, else for any thread count: rates are per thread)."""
    if torch.compiler.is_compiling():
        # Sizes may be symbolic: match them against the known entries (a guard on the head
        # sizes, never on N).
        for edk, edv, found in _table_while_tracing(threads):
            if dk == edk and dv == edv:
                return found
        return None
    return _lookup(dk, dv, threads, measure)


def _lookup(dk: int, dv: int, threads: int, measure: bool) -> dict | None:
    state = mode()
    if state == "off":
        return None
    fast_key = (torch.backends.mkldnn.enabled, threads, dk, dv)
    found = _found.get(fast_key)
    if found is not None:  # measured or loaded before: the per-call cost of auto
        return found
    desc = machine()
    key = _file_key(desc)
    with _lock:
        record = _load(key, desc)
        entry = record["entries"].get(_entry_key(threads, dk, dv))
        if entry is not None:
            _found[fast_key] = entry["rates"]
            return entry["rates"]
        can_measure = (measure and state == "on" and threads == torch.get_num_threads()
                       and not getattr(_measuring, "active", False))
        if can_measure:
            entry = _measure_entry(dk, dv, threads)
            if entry is not None:
                name = _entry_key(threads, dk, dv)
                if _looks_busy(name, entry):
                    _warn_once(f"busy:{name}", f"the calibration at Dk={dk}, Dv={dv} ran below "
                               f"{_BUSY_FRACTION:.0%} of the shipped rates: the machine looks "
                               "busy; its rates serve this process only and are not cached")
                else:
                    record["entries"][name] = entry
                    _save(key, record)
                _found[fast_key] = entry["rates"]
                return entry["rates"]
        for name, other in record["entries"].items():  # another thread count: per-thread rates
            if name.endswith(f",dk={dk},dv={dv}"):
                return other["rates"]
    return None


@torch.compiler.assume_constant_result
def _table_while_tracing(threads: int) -> tuple:
    # torch.compile does not trace the lookup (files, locks): a graph takes the rates known
    # when it is traced, as constants ((Dk, Dv, rates by MODES x PATHS), ...), and never
    # measures.
    if mode() == "off":
        return ()
    desc = machine()
    with _lock:
        entries = _load(_file_key(desc), desc)["entries"]
    prefix = f"threads={threads},"
    table = []
    for name, entry in sorted(entries.items()):
        if name.startswith(prefix):
            dk, dv = (int(part.split("=")[1]) for part in name.split(",")[1:])
            table.append((dk, dv, tuple(tuple(entry["rates"][m][p] for p in PATHS)
                                        for m in MODES)))
    return tuple(table)


def calibrate(dims=((32, 32), (64, 64), (128, 128), (256, 256)), *, force: bool = False,
              save: bool = True) -> dict:
    """Measures the cost model's rates for each (Dk, Dv) in ``dims`` on this machine with the
    current number of threads, caches them (unless ``save=False``) and returns
    {"machine": ..., "file": path, "entries": {key: {"rates": ..., ...}}}. ``force`` measures
    again even where a cached entry exists. Runs whatever CSQ_CALIBRATE says."""
    desc = machine()
    key = _file_key(desc)
    threads = torch.get_num_threads()
    with _lock:
        record = _load(key, desc)
        for dk, dv in dims:
            name = _entry_key(threads, int(dk), int(dv))
            if force or name not in record["entries"]:
                entry = _measure_entry(int(dk), int(dv), threads)
                if entry is None:
                    raise RuntimeError(f"csq_ext: calibration at Dk={dk}, Dv={dv} failed")
                record["entries"][name] = entry
        _found.clear()
        global generation
        generation += 1
        if save:
            _save(key, record)
        return {"machine": desc, "file": _path_for(key),
                "entries": {k: v for k, v in record["entries"].items()
                            if k.startswith(f"threads={threads},")}}


def forget() -> None:
    """Drops what this process holds in memory (the files stay): for tests."""
    global generation
    with _lock:
        generation += 1
        _memory.clear()
        _found.clear()
        _warned.clear()


# ----------------------------------------------------------------------------------------------
# The measurement
# ----------------------------------------------------------------------------------------------
# Each run's FLOPs are the cost model's own count, so that a measured rate put back into the model
# predicts the measured time. Work per run: about this many forward FLOPs per thread.
_TARGET_FLOPS = 2.5e9


def _lengths(dk: int, dv: int, threads: int) -> tuple[int, int]:
    """(N for the direct runs, N for the chunked runs): the direct path at N = 4096 where the
    model's crossovers sit (down to 1024 for large heads), the chunked one at a length whose
    forward takes about _TARGET_FLOPS per thread (its rate hardly depends on N)."""
    from ._cost import chunked_flops, direct_flops
    n_direct = 4096
    while n_direct > 1024 and direct_flops(n_direct, dk, dv, True, threads) > 4 * _TARGET_FLOPS * threads:
        n_direct //= 2
    n_chunked = 4096
    while n_chunked > 128 and chunked_flops(n_chunked, dk, dv, True, threads) > _TARGET_FLOPS * threads:
        n_chunked //= 2
    return n_direct, n_chunked


def _measure_entry(dk: int, dv: int, threads: int) -> dict | None:
    """Times the six runs; returns {"rates": {mode: {path: GFLOP/s per thread}}, ...} or None
    (with a warning) when they cannot run."""
    from ._cost import chunked_flops, direct_flops
    from .attention import attention
    _measuring.active = True
    t_start = time.perf_counter()
    try:
        n_direct, n_chunked = _lengths(dk, dv, threads)
        gen = torch.Generator().manual_seed(0)
        runs = []  # (mode, path, flops, fn)
        for path in PATHS:
            causal = path != "direct full"
            forced = "chunked" if path == "chunked" else "direct"
            n = n_chunked if forced == "chunked" else n_direct
            # One head per thread: both paths fill the threads (the chunked one runs one
            # (sequence, head) per thread), as the model's parallelism assumes.
            q, k = (torch.randn(1, threads, n, dk, generator=gen) for _ in range(2))
            v = torch.randn(1, threads, n, dv, generator=gen)
            dy = torch.randn(1, threads, n, dv, generator=gen)
            flops = (chunked_flops if forced == "chunked" else direct_flops)(
                n, dk, dv, causal, threads)

            def fwd(q=q, k=k, v=v, causal=causal, forced=forced):
                with torch.no_grad():
                    attention(q, k, v, causal=causal, path=forced)

            leaves = [t.requires_grad_() for t in (q.clone(), k.clone(), v.clone())]

            def fwd_bwd(leaves=leaves, dy=dy, causal=causal, forced=forced):
                with torch.enable_grad():
                    y = attention(*leaves, causal=causal, path=forced)
                    torch.autograd.grad(y, leaves, dy)

            runs += [("fwd", path, flops, fwd), ("fwd+bwd", path, flops, fwd_bwd)]
        for _, _, _, fn in runs:  # warm-up: allocations, the thread pool, caches
            fn()
        best = [float("inf")] * len(runs)
        for _ in range(3):  # interleaved rounds: load changes reach every run alike
            for i, (_, _, _, fn) in enumerate(runs):
                t0 = time.perf_counter()
                fn()
                best[i] = min(best[i], time.perf_counter() - t0)
        result: dict = {m: {} for m in MODES}
        parallel = threads  # tasks == threads for both paths here
        for (m, path, flops, _), seconds in zip(runs, best):
            result[m][path] = flops / (seconds * 1e9 * parallel)
        entry = {"rates": result, "lengths": {"direct": n_direct, "chunked": n_chunked},
                 "seconds": round(time.perf_counter() - t_start, 3),
                 "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
        return entry
    except Exception as e:  # a calibration must never fail the call that triggered it
        _warn_once(f"measure:{dk}:{dv}", f"calibration at Dk={dk}, Dv={dv} failed "
                   f"({type(e).__name__}: {e}); using the shipped rates")
        return None
    finally:
        _measuring.active = False
