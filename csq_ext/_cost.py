"""The automatic choice between CSQ's two exact algorithms, per call.

* chunked (the state scan): about ``4 F (Dv + 1)`` multiply-adds per query and head, whatever N,
  with F = Dk (Dk + 1) / 2 + Dk + 1 features (plus the C x C blocks inside each chunk);
  parallel over (sequence, key/value head) only.
* direct (tiles of q against tiles of k): about ``2 n (Dk + Dv + 1)`` per query and head, n the
  keys it sees (N, or N / 2 on average when causal); parallel over query tiles too, so one
  head uses every core.

Each estimate is divided by a throughput measured by bench/bench_cpu.py (bench/NOTES.md,
"direct path"), per head size, for a forward or a forward + backward; the cheaper one runs.
The crossover table of docs/performance.md is crossover_table()'s output.

On CUDA the same counts are divided by the share of the GPU each path's grid can fill (thread
blocks against _CUDA_SMS) and by per-path rates that are an UNCALIBRATED ESTIMATE: no GPU run
has measured the direct kernels yet (bench/bench_gpu.py's direct / chunked / auto columns are
meant to calibrate them; bench/NOTES.md).
"""
from __future__ import annotations

import math

import torch

from . import _calibrate
from .state import num_features

# Per-thread throughput (GFLOP/s, in the forward's FLOPs as counted below) of each path's float32
# kernels on the 2-core CI machine (AMD EPYC, Zen 5, AVX-512; torch 2.13), by Dk, for a
# forward alone and for a forward + backward. Fitted from interleaved runs of both forced paths
# at N = 4096, B = 1, H = 4, Dk = Dv = 32-256 (bench/results/cpu_calibration.json,
# bench/NOTES.md "Direct path" 13) and interpolated in log Dk between those sizes (the end
# values outside them). The chunked path's rate depends on Dk: its state (F x (Dv + 1)) leaves
# the caches at Dk = 256, and its products are small at Dk = 32; the direct path's hardly
# does, but its causal tiles run slower (half-empty diagonal tiles, per-pair shifts).
_RATE_DIMS = (32, 64, 128, 256)
_CPU_RATES = {
    # mode -> path -> GFLOP/s per thread at _RATE_DIMS
    "fwd": {
        "chunked": (104.2, 151.7, 183.5, 123.2),
        "direct causal": (159.1, 175.0, 175.2, 150.5),
        "direct full": (182.0, 200.8, 211.3, 214.5),
    },
    "fwd+bwd": {
        "chunked": (29.3, 45.3, 54.2, 37.1),
        "direct causal": (42.6, 49.2, 47.9, 44.2),
        "direct full": (47.6, 52.4, 55.1, 57.6),
    },
}


def _shipped_rate(mode: str, path: str, dk: int) -> float:
    """GFLOP/s per thread of the shipped table, geometric interpolation in Dk."""
    rates = _CPU_RATES[mode][path]
    x = math.log2(min(max(dk, _RATE_DIMS[0]), _RATE_DIMS[-1]))
    i = min(int(x) - 5, len(_RATE_DIMS) - 2)  # _RATE_DIMS are 2^5 .. 2^8
    f = x - (i + 5)
    return rates[i] ** (1 - f) * rates[i + 1] ** f


def _rate(mode: str, path: str, dk: int, measured: dict | None) -> float:
    """GFLOP/s per thread: this machine's measured rate (csq_ext/_calibrate.py) where there
    is one, else the shipped table's."""
    if measured is not None:
        if isinstance(measured, tuple):  # as torch.compile's constant (_calibrate.py)
            return measured[_calibrate.MODES.index(mode)][_calibrate.PATHS.index(path)]
        return measured[mode][path]
    return _shipped_rate(mode, path, dk)


def chunked_flops(n: int, dk: int, dv: int, causal: bool, tasks: int) -> float:
    """The chunked path's forward FLOPs for one call (the unit its rates are counted in)."""
    chunk = 128 if dk <= 32 or dk > 128 else 64  # csrc/csq_host.cpp, default_chunk
    per_query = 2 * 2 * num_features(dk) * (dv + 1)  # the state's read and update
    if causal:
        per_query += min(chunk, n) * (dk + dv + 1)  # the in-chunk block, half of it masked
    return max(1, tasks) * n * per_query


def direct_flops(n: int, dk: int, dv: int, causal: bool, tasks: int) -> float:
    """The direct path's forward FLOPs for one call."""
    seen = (n + 1) / 2 if causal else n
    return max(1, tasks) * n * 2 * seen * (dk + dv + 1)


def chunked_cost(n: int, dk: int, dv: int, causal: bool, threads: int, tasks: int,
                 grad: bool = False, measured: dict | None = None) -> float:
    """Estimated nanoseconds of the chunked path for one call: parallel over the
    (sequence, key/value head) tasks only."""
    rate = _rate("fwd+bwd" if grad else "fwd", "chunked", dk, measured)
    return chunked_flops(n, dk, dv, causal, tasks) / (rate * max(1, min(threads, tasks)))


def direct_cost(n: int, dk: int, dv: int, causal: bool, threads: int, tasks: int,
                grad: bool = False, measured: dict | None = None) -> float:
    """Estimated nanoseconds of the direct path for one call: parallel over query tiles too."""
    rate = _rate("fwd+bwd" if grad else "fwd", "direct causal" if causal else "direct full", dk,
                 measured)
    return direct_flops(n, dk, dv, causal, tasks) / (rate * max(1, threads))


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


# The direct path's carried-state work: per position and pass, F feature elements built
# (_STATE_FEATURE_NS each) and a 2 F (Dv + 1) product (_STATE_GEMM_GFLOPS), counted per thread
# and spread over min(threads, tasks) (csrc/cpu/csq_direct_state_cpu.h: the state is built per
# (sequence, head) task; the carried state is read inside the query tiles). Fitted by
# bench/fit_state_cost.py (forced direct forwards with and without a state, interleaved;
# D = 32-128, N = 1K and 4K, H = 4, 2 threads) on an AMD EPYC Zen 4 (2026-12-07): 80 GFLOP/s
# and 0.64 ns per feature; the fit predicts the measured passes within 3-26% (D = 32-128)
# (bench/NOTES.md 15).
_STATE_GEMM_GFLOPS = 80.0
_STATE_FEATURE_NS = 0.64


def state_cost(n: int, dk: int, dv: int, passes: int, tasks: int, threads: int = 1) -> float:
    """Estimated nanoseconds of the direct path's state work: `passes` of reading the carried
    state (each query) and building the returned one (each key)."""
    per_pass = num_features(dk) * (2 * (dv + 1) / _STATE_GEMM_GFLOPS + _STATE_FEATURE_NS)
    return max(1, tasks) * n * passes * per_pass / max(1, min(threads, tasks))


def choose_path(n: int, dk: int, dv: int, causal: bool, device_type: str, threads: int,
                tasks: int, reads_state: bool = False, returns_state: bool = False,
                packed: bool = False, grad: bool = False, measure: bool = False) -> str:
    """'direct' or 'chunked' for one call: n positions per sequence (with cu_seqlens the packed
    total, which overstates the direct path's cost: packed calls lean chunked),
    tasks = sequences x key/value heads. A device without a direct kernel (only CPU and CUDA
    have one) takes the chunked path. A carried or returned state costs the direct path an
    extra O(N Dk^2 Dv) each (state_cost; the chunked path reads and builds the state in its
    scan anyway, at a better rate); packed sequences with a state stay chunked (the direct
    path's state work was measured without packing), and so do CUDA calls with a state.
    `threads` matters on the CPU only; so does `grad` (a backward will follow: the paths'
    forward + backward rates, whose ratio differs from the forwards'; with a state, whose
    backward was not measured, the forward rates). On the CPU the rates are this machine's
    where they were measured (csq_ext/_calibrate.py; ``measure``: measure them now if they
    were not)."""
    args = (n, dk, dv, causal, device_type, threads, tasks, reads_state, returns_state, packed,
            grad, measure)
    if device_type != "cpu" or torch.compiler.is_compiling():
        return "direct" if prefers_direct(*args) else "chunked"
    measured = _calibrate.rates(dk, dv, threads, measure=measure)
    key = (n, dk, dv, causal, threads, tasks, reads_state, returns_state, packed, grad,
           id(measured), _calibrate.generation)
    choice = _CHOICES.get(key)
    if choice is None:
        if len(_CHOICES) >= 4096:
            _CHOICES.clear()
        choice = _CHOICES[key] = "direct" if prefers_direct(*args) else "chunked"
    return choice


def prefers_direct(n, dk: int, dv: int, causal: bool, device_type: str, threads: int,
                   tasks: int, reads_state: bool = False, returns_state: bool = False,
                   packed: bool = False, grad: bool = False, measure: bool = False):
    """choose_path's comparison itself: whether the direct path is the cheaper one. A bool, or
    under torch.compile with a symbolic n a SymBool."""
    if device_type not in ("cpu", "cuda"):
        return False
    passes = int(reads_state) + int(returns_state)
    if passes and packed:
        return False
    if device_type == "cuda":
        if max(dk, dv) > _CUDA_CHUNKED_MAX_HEAD:  # beyond both CUDA paths: the direct op refuses
            return True
        if passes:  # the CUDA direct kernels carry no states yet (csrc/cuda/csq_ops_cuda.cpp)
            return False
        return cuda_direct_cost(n, dk, dv, causal, tasks) <= cuda_chunked_cost(n, dk, dv, causal,
                                                                                 tasks)
    grad = grad and not passes
    measured = _calibrate.rates(dk, dv, threads, measure=measure)
    return (direct_cost(n, dk, dv, causal, threads, tasks, grad, measured)
            + state_cost(n, dk, dv, passes, tasks, threads)
            <= chunked_cost(n, dk, dv, causal, threads, tasks, grad, measured))


# choose_path's CPU answers by their arguments: a call at small N costs microseconds, and the
# model's arithmetic was a tenth of it. Keyed by the calibration's generation too.
_CHOICES: dict = {}


def crossover(dk: int, dv: int, causal: bool, threads: int, tasks: int, **kw) -> int | None:
    """The shortest sequence length (a multiple of 64, up to 2^22) that the CPU model runs
    chunked: the direct path runs below it. None: direct up to 2^22; 0: never direct."""
    def chunked(n):
        return choose_path(n, dk, dv, causal, "cpu", threads, tasks, **kw) == "chunked"
    if chunked(64):
        return 0
    lo, hi = 64, 1 << 22  # direct at lo; find the first chunked multiple of 64
    if not chunked(hi):
        return None
    while hi - lo > 64:
        mid = (lo + hi) // 2 // 64 * 64
        lo, hi = (lo, mid) if chunked(mid) else (mid, hi)
    return hi


def crossover_table(threads: int = 2, heads: int = 4) -> str:
    """docs/performance.md's table: crossovers (B = 1, `heads` heads, Dk = Dv) of the CPU model."""
    cols = [("causal", dict(causal=True)),
            ("not causal", dict(causal=False)),
            ("causal, fwd + bwd", dict(causal=True, grad=True)),
            ("not causal, fwd + bwd", dict(causal=False, grad=True)),
            ("causal, one head", dict(causal=True, tasks=1)),
            ("causal, returning a state, one thread",
             dict(causal=True, returns_state=True, threads=1))]
    lines = ["| Dk = Dv | " + " | ".join(name for name, _ in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for d in (32, 64, 128, 256):
        cells = []
        for _, kw in cols:
            kw = dict(kw)
            x = crossover(d, d, kw.pop("causal"), kw.pop("threads", threads),
                          kw.pop("tasks", heads), **kw)
            cells.append("never" if x == 0 else "always" if x is None else str(x))
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
