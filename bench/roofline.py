"""The roofline view of the CPU benchmarks: the machine's measured float32 GEMM peak (with the
GEMM libraries that SDPA and csq_ext use, in the same run), and each implementation's work in
FLOPs, so that every time becomes GFLOP/s and a fraction of that peak.

FLOPs counted (multiply-adds x 2, the useful work of the algorithm, forward):

* SDPA: ``4 N n D`` per head (Q K^T and P V; n = the keys a query sees, (N + 1) / 2 causal);
* csq_ext direct path: ``2 N n (Dk + Dv + 1)`` (scores, and the weighted sum with its
  denominator), ``csq_ext._cost.direct_flops``;
* csq_ext chunked path: ``N (4 F (Dv + 1) + C (Dk + Dv + 1))`` (the state's read and update, the
  in-chunk block when causal), ``csq_ext._cost.chunked_flops``.

A forward + backward counts 3.5x the forward (the convention of FlashAttention's papers: the
backward does 2.5x the forward's products), for every implementation alike, so that the
fractions of peak of a forward + backward are comparable between them.
"""
from __future__ import annotations

import torch

from csq_ext._cost import chunked_flops, direct_flops
from csq_ext._timing import best_seconds

FWD_BWD_FACTOR = 3.5
PEAK_SIZES = (1024, 2048, 4096)


def attention_flops(impl_path: str, n: int, d: int, causal: bool, heads: int,
                    mode: str) -> float:
    """FLOPs of one call: ``impl_path`` is "sdpa", "direct" or "chunked" (B x H = heads)."""
    if impl_path == "sdpa":
        seen = (n + 1) / 2 if causal else n
        fwd = heads * 4.0 * n * seen * d
    elif impl_path == "direct":
        fwd = direct_flops(n, d, d, causal, heads)
    elif impl_path == "chunked":
        fwd = chunked_flops(n, d, d, causal, heads)
    else:
        raise ValueError(f"no FLOP count for {impl_path!r}")
    return fwd * (FWD_BWD_FACTOR if mode == "fwd+bwd" else 1.0)


def gemm_peak(repeats: int = 5) -> dict:
    """Float32 square GEMMs at PEAK_SIZES with the current torch threads: ``blas`` is torch.mm
    (MKL or OpenBLAS: SDPA's CPU kernel's products), ``onednn`` oneDNN's matmul (the library
    whose microkernel csq_ext's CPU kernels call). Returns GFLOP/s per library and size, and
    ``peak``: the best of all, the roofline every fraction is taken against."""
    out = {"threads": torch.get_num_threads(), "blas": {}, "onednn": {}}
    for n in PEAK_SIZES:
        a, b = torch.randn(n, n), torch.randn(n, n)
        out["blas"][n] = 2.0 * n ** 3 / best_seconds(lambda: torch.mm(a, b), repeats) / 1e9
        if torch.backends.mkldnn.is_available():
            am, bm = a.to_mkldnn(), b.to_mkldnn()
            out["onednn"][n] = 2.0 * n ** 3 / best_seconds(
                lambda: torch._C._nn.mkldnn_linear(am, bm, None), repeats) / 1e9
    out["peak"] = max([*out["blas"].values(), *out["onednn"].values()])
    return out
