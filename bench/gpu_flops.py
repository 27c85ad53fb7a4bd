"""The FLOP model of bench_gpu.py: what each implementation's TFLOP/s counts.

FLOP conventions (FLOP = 2 x multiply-adds; TFLOP/s = FLOP / median seconds / 1e12)
-------------------------------------------------------------------------------------
SDPA, FlashAttention's convention (the one in flash-attention's benchmark scripts):
    forward      = 4 B H N^2 D           (QK^T and PV, 2 N^2 D each; in general
                                          2 B H N^2 (Dk + Dv)), halved when causal
    backward     = 2.5 x forward         (5 N^2 D matrix products instead of 2)
    fwd + bwd    = 3.5 x forward
  So causal fwd+bwd at B = 1, H = 8, N = 65536, D = 64 counts 3.5 * 4 * 8 * 65536^2 * 64 / 2
  = 1.54e13 FLOP. These are the FLOPs of the exact softmax computation, not of what flash
  recomputes.
csq_ext, the chunked algorithm of csrc/cuda/README.md ("Cost"), useful work only. With
    F  = Dk (Dk + 1) / 2 + Dk + 1 = (Dk + 1)(Dk + 2) / 2     features (2145 at Dk = 64)
    V1 = Dv + 1                                                value columns + the ones column
    P  = sum over chunks of c (c + 1) / 2                      causal in-chunk pairs j <= i
         (c = 64, the CUDA chunk; P ~ N (C + 1) / 2); P = 0 when not causal
  per batch element, with Hq query heads and Hk key/value heads (Hq = Hk = H here):
    forward   MAC = (Hq + Hk) N F V1                  state scan: each query head reads the
                                                      state (phi(Q) S), each kv head updates
                                                      it (S += psi(K)^T [V, 1])
                  + Hq P (Dk + 1 + V1)                in-chunk pairs: s_ij (Dk + 1) and
                                                      W [V, 1] (V1)
    backward  MAC = (2 Hq + 3 Hk) N F V1              pass 1: u = S g~ per query, S update
                                                      per key; pass 2: R update per query,
                                                      psi(K) R and R [V, 1] per key
                  + Hq P (3 Dk + 2 Dv + 3)            in-chunk: s (Dk+1), E (V1), dS K~
                                                      (Dk+1), dS^T Q (Dk), W^T dnum (Dv)
    fwd + bwd = forward + backward;  FLOP = 2 B MAC.
  At Dk = Dv = 64, causal: forward 2 B H N (2 F V1 + 32.5 * 130) = 5.66e5 B H N FLOP and
  fwd+bwd 1.98e6 B H N, the same as causal SDPA's (2 N D per head-token forward) at N = 4423;
  non-causal 5.58e5 B H N forward, SDPA's at N = 2179. Not counted:
  O(N F) feature construction and feature gradients (about 2 / V1, 3%), the O(N D) prefix
  sums and normalization, and the work the CUDA kernels spend on the masked half of each
  64 x 64 in-chunk block. The two TFLOP/s columns therefore measure different work: compare
  times (the ratio), and read TFLOP/s as how well each kernel uses the GPU.
"""
from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run from anywhere, without an installed csq_ext
    sys.path.insert(0, REPO)

from csq_ext.state import num_features  # noqa: E402

CUDA_CHUNK = 64      # csrc/cuda: kChunk, the in-chunk block length used in the FLOP count

# The conventions in words, recorded in every result file.
CONVENTIONS = {
    "sdpa": "FlashAttention: fwd 2 B H N^2 (Dk + Dv) (= 4 B H N^2 D), / 2 causal; "
            "fwd+bwd 3.5 x fwd",
    "csq_ext": "2 B [(Hq + Hk) N F V1 + Hq P (Dk + 1 + V1)] fwd; bwd adds "
               "2 B [(2 Hq + 3 Hk) N F V1 + Hq P (3 Dk + 2 Dv + 3)]; "
               "F = (Dk + 1)(Dk + 2) / 2, V1 = Dv + 1, P = causal in-chunk pairs "
               f"(chunk {CUDA_CHUNK}), 0 when not causal; for the path 'auto' "
               "picked (csq_chunked: always this; csq_direct: as sdpa with "
               "Dv + 1 value columns)"}


def sdpa_flops(b: int, hq: int, n: int, dk: int, dv: int, causal: bool, mode: str) -> float:
    """FlashAttention's convention: forward 2 B H N^2 (Dk + Dv) (= 4 B H N^2 D), halved when
    causal; backward 2.5x forward; forward + backward 3.5x forward."""
    fwd = 2.0 * b * hq * n * n * (dk + dv)
    if causal:
        fwd /= 2
    return fwd if mode == "fwd" else 3.5 * fwd


def direct_flops(b: int, hq: int, n: int, dk: int, dv: int, causal: bool, mode: str) -> float:
    """The direct path: SDPA's convention with Dv + 1 value columns (the denominator)."""
    return sdpa_flops(b, hq, n, dk, dv + 1, causal, mode)


def causal_chunk_pairs(n: int, chunk: int = CUDA_CHUNK) -> int:
    """Pairs j <= i inside the chunks of length `chunk` (the last one partial)."""
    full, rem = divmod(n, chunk)
    return full * chunk * (chunk + 1) // 2 + rem * (rem + 1) // 2


def csq_flops(b: int, hq: int, hk: int, n: int, dk: int, dv: int, causal: bool, mode: str,
              chunk: int = CUDA_CHUNK) -> float:
    """Useful FLOPs of the chunked CSQ algorithm (state scans + in-chunk pairs)."""
    f, v1 = num_features(dk), dv + 1
    pairs = causal_chunk_pairs(n, chunk) if causal else 0
    mac = (hq + hk) * n * f * v1 + hq * pairs * (dk + 1 + v1)
    if mode == "fwd+bwd":
        mac += (2 * hq + 3 * hk) * n * f * v1 + hq * pairs * (3 * dk + 2 * dv + 3)
    return 2.0 * b * mac
