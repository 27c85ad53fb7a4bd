"""The automatic choice between CSQ's two exact algorithms, per call.

* chunked (the state scan): about ``4 F (Dv + 1)`` multiply-adds per query and head, whatever N,
  with F = Dk (Dk + 1) / 2 + Dk + 1 features (plus the C x C blocks inside each chunk);
  parallel over (sequence, key/value head) only.
* direct (tiles of q against tiles of k): about ``2 n (Dk + Dv + 1)`` per query and head, n the
  keys it sees (N, or N / 2 on average when causal); parallel over query tiles too, so one
  head uses every core.

Each estimate is divided by a throughput measured by bench/bench_cpu.py (bench/NOTES.md,
"direct path"); the cheaper one runs. The README's crossover table is this function's output.

On CUDA the same counts are divided by the share of the GPU each path's grid can fill (thread
blocks against _CUDA_SMS) and by per-path rates that are an UNCALIBRATED ESTIMATE: no GPU run
has measured the direct kernels yet (bench/bench_gpu.py's direct / chunked / auto columns are
meant to calibrate them; bench/NOTES.md).
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


# CUDA: uncalibrated estimates, to be replaced by measured values after the first GPU run.
# _CUDA_SMS: thread blocks that run at once (an A100 has 108 SMs, an H100 / H200 132; both
# paths' blocks are 256 threads and one or two fit per SM, so one per SM is the estimate).
# The rates are equal until measured: both paths run their float32 / float64 products on the
# CUDA cores (the chunked path's half-precision state products use 3xTF32 tensor cores, the
# direct path's half-precision tile products mma.sync: for half inputs both are faster alike).
_CUDA_SMS = 108
_CUDA_DIRECT_RATE = 1.0
_CUDA_CHUNKED_RATE = 1.0
_CUDA_TILE = 64  # kDirectTile and kChunk (csrc/cuda/csq_direct_launch.h, csq_launch.h)
_CUDA_CHUNKED_MAX_HEAD = 256  # kMaxHeadDim of the chunked CUDA kernels (direct: 256 too)


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def cuda_chunked_cost(n: int, dk: int, dv: int, causal: bool, tasks: int) -> float:
    per_query = 4 * num_features(dk) * (dv + 1)
    if causal:
        per_query += min(_CUDA_TILE, n) * (dk + dv + 1)
    # The state scan's grid: (sequence, key/value head) x tiles of 64 of the (Dk + 1)(Dk + 2)/2
    # extended features.
    blocks = max(1, tasks) * _ceil((dk + 1) * (dk + 2) // 2, 64)
    return n * per_query / (_CUDA_CHUNKED_RATE * min(1.0, blocks / _CUDA_SMS))


def cuda_direct_cost(n: int, dk: int, dv: int, causal: bool, tasks: int) -> float:
    seen = (n + 1) / 2 if causal else n
    vblocks = _ceil(dv, 64)  # each block of 64 value columns recomputes the scores
    per_query = 2 * seen * (dk * vblocks + dv + 1)
    blocks = max(1, tasks) * _ceil(max(n, 1), _CUDA_TILE) * vblocks
    return n * per_query / (_CUDA_DIRECT_RATE * min(1.0, blocks / _CUDA_SMS))


# The direct path's carried-state work (csq_ext/_direct_state.py) is torch: per position and
# pass, F feature elements built (measured ~1.3 ns each on one CI core, the price of ~64
# multiply-adds at the rates above) and a 2 F (Dv + 1) GEMM at about the direct kernels' rate.
# Fitted to forced-path runs at N = 1024-4096, D = 32-128, one thread (bench/NOTES.md, "Direct
# path" 11): measured 24-62 GFLOP/s for the state against the chunked scan's 42-86.
_STATE_GEMM_RATE = 0.93
_STATE_FEATURE_COST = 127


def state_cost(n: int, dk: int, dv: int, passes: int) -> float:
    """The direct path's state work: `passes` of reading the carried state (each query) and
    building the returned one (each key). Whatever the threads: on two it ran no faster than
    on one (bench/results/cpu_state.json: the D = 128, N = 1024 prefill's state work took
    ~85 ms on two threads, ~72 ms on one)."""
    per_pass = num_features(dk) * (2 * (dv + 1) / _STATE_GEMM_RATE + _STATE_FEATURE_COST)
    return n * passes * per_pass


def choose_path(n: int, dk: int, dv: int, causal: bool, device_type: str, threads: int,
                tasks: int, reads_state: bool = False, returns_state: bool = False,
                packed: bool = False) -> str:
    """'direct' or 'chunked' for one call: n positions per sequence (with cu_seqlens the packed
    total, which overstates the direct path's cost: packed calls lean chunked),
    tasks = sequences x key/value heads. A device without a direct kernel (only CPU and CUDA
    have one) takes the chunked path. A carried or returned state costs the direct path an
    extra O(N Dk^2 Dv) each (state_cost; the chunked path reads and builds the state in its
    scan anyway, at a better rate); packed sequences with a state stay chunked (the direct
    path handles their states one sequence at a time, in Python). `threads` matters on the
    CPU only."""
    if device_type not in ("cpu", "cuda"):
        return "chunked"
    passes = int(reads_state) + int(returns_state)
    if passes and packed:
        return "chunked"
    if device_type == "cuda":
        if max(dk, dv) > _CUDA_CHUNKED_MAX_HEAD:  # beyond both CUDA paths: the direct op refuses
            return "direct"
        extra = passes * 2 * num_features(dk) * (dv + 1) * n / _CUDA_DIRECT_RATE
        return ("direct" if cuda_direct_cost(n, dk, dv, causal, tasks) + extra
                <= cuda_chunked_cost(n, dk, dv, causal, tasks) else "chunked")
    if (direct_cost(n, dk, dv, causal, threads, tasks) + state_cost(n, dk, dv, passes)
            <= chunked_cost(n, dk, dv, causal, threads, tasks)):
        return "direct"
    return "chunked"
