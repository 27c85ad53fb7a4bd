"""The correctness gate of bench_gpu.py, run before any timing: csq_ext in the benchmark's dtype
against the float64 reference (csq_ext.reference) on B = 2, H = 4, N = 1000, causal and not;
output and dq, dk, dv must all be finite with relative Frobenius error <= GATE_TOL (the
spec's bar for bfloat16 / float16)."""
from __future__ import annotations

import torch

import csq_ext
from csq_ext.reference import csq_attention_reference

GATE_TOL = 2e-2      # the spec's bar for bfloat16 / float16


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    return ((x - ref).norm() / ref.norm()).item()


def correctness_gate(args, device, dtype) -> dict:
    B, H, N = (1, 2, 100) if args.dry_run else (2, 4, 1000)
    D = args.dim
    result = {"shape": dict(B=B, H=H, N=N, Dk=D, Dv=D), "dtype": str(dtype), "tol": GATE_TOL,
              "errors": {}, "passed": True}
    for causal in (True, False):
        name = "causal" if causal else "full"
        try:
            q, k, v = (torch.randn(B, H, N, D, device=device, dtype=torch.float64).to(dtype)
                       .requires_grad_() for _ in range(3))
            dy = torch.randn(B, H, N, D, device=device, dtype=torch.float64).to(dtype)
            y = csq_ext.attention(q, k, v, causal=causal)
            grads = torch.autograd.grad(y, (q, k, v), dy)
            q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
            y64 = csq_attention_reference(q64, k64, v64, causal=causal)
            grads64 = torch.autograd.grad(y64, (q64, k64, v64), dy.double())
            errs = {"y": rel_err(y, y64)}
            errs.update({f"d{n}": rel_err(g, r) for n, g, r in zip("qkv", grads, grads64)})
            finite = all(bool(torch.isfinite(t).all()) for t in (y, *grads))
            ok = finite and all(e <= GATE_TOL for e in errs.values())  # NaN fails
            result["errors"][name] = {**errs, "finite": finite, "passed": ok}
        except Exception as e:  # noqa: BLE001 - a crash fails the gate
            ok = False
            result["errors"][name] = {"error": f"{type(e).__name__}: {str(e)[:500]}",
                                      "passed": False}
        result["passed"] &= ok
        shown = ", ".join(f"{k} {v:.1e}" for k, v in result["errors"][name].items()
                          if isinstance(v, float))
        print(f"gate {name:<6} {str(dtype)[6:]} vs float64 reference, B={B} H={H} N={N} D={D}: "
              f"{shown or result['errors'][name].get('error')}  "
              f"{'PASS' if ok else 'FAIL'} (bar {GATE_TOL:g})")
    return result
