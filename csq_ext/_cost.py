"""The automatic choice between CSQ's two exact algorithms, per call.

* chunked (the state scan): about ``4 F (Dv + 1)`` multiply-adds per query and head, whatever N,
  with F = Dk (Dk + 1) / 2 + Dk + 1 features (plus the C x C blocks inside each chunk);
  parallel over (sequence, key/value head) only.
* direct (tiles of q against tiles of k): about ``2 n (Dk + Dv + 1)`` per query and head, n the
  keys it sees (N, or N / 2 on average when causal); parallel over query tiles too, so one
  head uses every core.

Each estimate is divided by a throughput measured by bench/bench_cpu.py (bench/NOTES.md,
"direct path"); the cheaper one runs. The README's crossover table is this function's output.
"""
from __future__ import annotations

from .state import num_features

# Sustained multiply-add throughput of each path's kernels, relative units per thread, on the
# 2-core CI machine (float32, forward; the backwards scale alike). Calibrated from interleaved
# runs of both forced paths at N = 4096, B = 1, H = 4, D = 32-256, causal and not: the measured
# chunked/direct time ratio over the model's with equal rates was 1.0-1.2 (1.5 once), so the
# direct kernels get 1.1x the chunked ones' rate. See bench/NOTES.md, "Direct path".
_DIRECT_RATE = 1.0
_CHUNKED_RATE = 0.9


def chunked_cost(n: int, dk: int, dv: int, causal: bool, threads: int, tasks: int) -> float:
    chunk = 128 if dk <= 32 else 64  # csrc/csq_host.cpp, default_chunk
    per_query = 4 * num_features(dk) * (dv + 1)
    if causal:
        per_query += min(chunk, n) * (dk + dv + 1)
    return n * per_query / (_CHUNKED_RATE * max(1, min(threads, tasks)))


def direct_cost(n: int, dk: int, dv: int, causal: bool, threads: int, tasks: int) -> float:
    seen = (n + 1) / 2 if causal else n
    return n * 2 * seen * (dk + dv + 1) / (_DIRECT_RATE * max(1, threads))


def choose_path(n: int, dk: int, dv: int, causal: bool, device_type: str, threads: int,
                tasks: int, has_state: bool) -> str:
    """'direct' or 'chunked' for one call: n positions per sequence (with cu_seqlens the packed
    total, which overstates the direct path's cost: packed calls lean chunked),
    tasks = sequences x key/value heads. A carried or returned state needs the chunked path,
    and only the CPU has a direct kernel so far."""
    if has_state or device_type != "cpu":
        return "chunked"
    if direct_cost(n, dk, dv, causal, threads, tasks) <= chunked_cost(n, dk, dv, causal,
                                                                       threads, tasks):
        return "direct"
    return "chunked"
