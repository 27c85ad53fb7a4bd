"""Timing helpers shared by ``python -m csq_ext`` and ``bench/bench_cpu.py``, and the
description of the device that the times were taken on (every result names its device)."""
from __future__ import annotations

import functools
import os
import platform
import statistics
import time
from typing import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds taken by one call of fn: CUDA events on a GPU (kernels run asynchronously),
    the wall clock between two synchronizations elsewhere."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        synchronize(device)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved_times(fns: dict[str, Callable[[], object]], device: torch.device, *,
                      budget_s: float, warmup: int = 2, min_repeats: int = 3,
                      max_repeats: int = 30) -> dict[str, list[float]]:
    """Times every fn in fns, round-robin: each repetition runs each fn once in turn, so a
    change in machine load (other processes, clock speed) reaches all of them alike.

    Each fn is first warmed up (``warmup`` calls, fewer if they eat a quarter of the budget).
    It is then repeated until ``budget_s`` seconds of measured runs are spent, at least
    ``min_repeats`` and at most ``max_repeats`` times; a fn whose first measured run alone
    exceeds the budget is measured once. Returns the measured seconds of each fn.
    """
    for fn in fns.values():
        spent = 0.0
        for _ in range(warmup):
            spent += time_once(fn, device)
            if spent > budget_s / 4:
                break

    times: dict[str, list[float]] = {name: [] for name in fns}

    def wants_more(runs: list[float]) -> bool:
        if not runs:
            return True
        if len(runs) >= max_repeats or (len(runs) == 1 and runs[0] > budget_s):
            return False
        return len(runs) < min_repeats or sum(runs) < budget_s

    while any(wants_more(runs) for runs in times.values()):
        for name, fn in fns.items():
            if wants_more(times[name]):
                times[name].append(time_once(fn, device))
    return times


def best_seconds(fn: Callable[[], object], repeats: int = 3) -> float:
    """The fastest of `repeats` timed calls of fn after one warm-up call (allocations, the
    OpenMP pool, caches): a machine's capability, for rates that a model divides by."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def summarize(runs: list[float]) -> dict:
    """Median and min of measured seconds, with the raw runs kept."""
    return {"median_s": statistics.median(runs), "min_s": min(runs), "runs": len(runs),
            "times_s": runs}


@functools.lru_cache(maxsize=None)
def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or what the platform module knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_description(device: torch.device) -> dict:
    """What a result was measured on: the device model and what torch may use of it."""
    info = {"type": device.type, "torch": torch.__version__, "torch_cuda": torch.version.cuda}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count)
    else:
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        info.update(name=cpu_model(), logical_cores=os.cpu_count(), usable_cores=usable,
                    torch_threads=torch.get_num_threads())
    return info
