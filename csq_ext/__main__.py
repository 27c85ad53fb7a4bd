"""``python -m csq_ext``: what was built, whether it computes CSQ correctly on every device
here, and how fast it is next to SDPA. Exits non-zero when a check fails.
``python -m csq_ext --help`` lists the options."""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import csq_ext
from csq_ext._ops import ops
from csq_ext._timing import device_description, interleaved_times, summarize
from csq_ext.reference import csq_attention_reference

# Relative Frobenius error bars of docs/SPEC.md, against a float64 reference.
BARS = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}
SHAPE = dict(B=2, Hq=4, Hk=2, N=37, Dk=8, Dv=12)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm()).item()


def random_inputs(device, dtype, B, Hq, Hk, N, Dk, Dv, requires_grad=False):
    """Fresh N(0, 1) inputs drawn in float64 and rounded to dtype, so that the float64
    reference sees exactly the values the kernel sees."""
    shapes = ((B, Hq, N, Dk), (B, Hk, N, Dk), (B, Hk, N, Dv))
    return [torch.randn(s, dtype=torch.float64, device=device).to(dtype)
            .requires_grad_(requires_grad) for s in shapes]


def print_build() -> None:
    print(f"csq_ext {csq_ext.__version__}: {ops.build_info()}")
    print(f"CPU float32 products: {ops.cpu_gemm_backend()}")
    cuda = torch.cuda.is_available()
    print(f"torch {torch.__version__}, torch.version.cuda {torch.version.cuda}, "
          f"CUDA available: {cuda}"
          + (f" ({torch.cuda.get_device_name()})" if cuda else ""))


def check_outputs(device) -> bool:
    print(f"\nOutputs on {device} against the float64 reference, "
          + ", ".join(f"{k}={v}" for k, v in SHAPE.items()))
    ok = True
    for dtype, bar in BARS.items():
        for causal in (True, False):
            q, k, v = random_inputs(device, dtype, **SHAPE)
            label = f"  {dtype_name(dtype):<9} {'causal' if causal else 'full':<7}"
            try:
                y = csq_ext.attention(q, k, v, causal=causal)
                ref = csq_attention_reference(q.double(), k.double(), v.double(), causal=causal)
                err = rel_err(y, ref)
            except Exception as e:  # a failure to run is reported like a wrong number
                print(f"{label} ERROR {type(e).__name__}: {e}")
                ok = False
                continue
            passed = err <= bar  # False for NaN too
            ok &= passed
            print(f"{label} rel err {err:.1e}  bar {bar:.0e}  {'PASS' if passed else 'FAIL'}")
    return ok


def check_gradients(device) -> bool:
    """Gradients of q, k, v and of a per-head shift tensor against the reference's autograd
    gradients, in float64 on a tiny case."""
    shape = dict(B=1, Hq=2, Hk=1, N=9, Dk=3, Dv=2)
    print(f"\nGradients on {device}, float64, against the reference's autograd, "
          + ", ".join(f"{k}={v}" for k, v in shape.items()))
    bar, ok = BARS[torch.float64], True
    for causal in (True, False):
        q, k, v = random_inputs(device, torch.float64, requires_grad=True, **shape)
        shift = (0.5 + torch.rand(shape["Hq"], dtype=torch.float64, device=device))
        shift.requires_grad_()
        inputs = (q, k, v, shift)
        label = f"  {'causal' if causal else 'full':<7}"
        try:
            y = csq_ext.attention(q, k, v, causal=causal, shift=shift)
            dy = torch.randn_like(y)
            grads = torch.autograd.grad(y, inputs, dy)
            y_ref = csq_attention_reference(q, k, v, causal=causal, shift=shift)
            grads_ref = torch.autograd.grad(y_ref, inputs, dy)
            errs = [rel_err(g, r) for g, r in zip(grads, grads_ref)]
        except Exception as e:
            print(f"{label} ERROR {type(e).__name__}: {e}")
            ok = False
            continue
        passed = max(errs) <= bar and all(e == e for e in errs)  # e != e: NaN
        ok &= passed
        print(f"{label} rel err dq {errs[0]:.1e}, dk {errs[1]:.1e}, dv {errs[2]:.1e}, "
              f"dshift {errs[3]:.1e}  bar {bar:.0e}  {'PASS' if passed else 'FAIL'}")
    return ok


def speed_table(device) -> None:
    """Forward only, causal, against SDPA; about half a minute on a 2-core CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lengths = (1024, 4096, 16384, 65536) if device.type == "cuda" else (1024, 4096, 16384)
    B, H, D = 1, 4, 64
    desc = device_description(device)
    print(f"\nSpeed on {device} ({desc['name']}), forward, causal, {dtype_name(dtype)}, "
          f"B={B}, H={H}, Dk=Dv={D}, median of a few runs")
    print(f"  {'N':>6} {'csq_ext ms':>11} {'SDPA ms':>9} {'SDPA/csq':>9}")
    for n in lengths:
        q, k, v = (torch.randn(B, H, n, D, device=device, dtype=dtype) for _ in range(3))
        times = interleaved_times(
            {"csq": lambda: csq_ext.attention(q, k, v, causal=True),
             "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)},
            device, budget_s=1.0, warmup=1, min_repeats=3, max_repeats=20)
        csq, sdpa = (summarize(times[name])["median_s"] for name in ("csq", "sdpa"))
        print(f"  {n:>6} {csq * 1e3:>11.2f} {sdpa * 1e3:>9.2f} {sdpa / csq:>8.2f}x")


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m csq_ext",
        description="Print what csq_ext was built with, check its outputs and gradients against "
                    "the float64 reference on each device, then time it against PyTorch's "
                    "scaled_dot_product_attention. Exits with 1 when a check fails.")
    parser.add_argument("--version", action="version",
                        version=f"csq_ext {csq_ext.__version__} (torch {torch.__version__})")
    parser.add_argument("--device", action="append", choices=("cpu", "cuda"),
                        help="check this device (repeat for several); default: every device "
                             "present")
    parser.add_argument("--no-bench", action="store_true",
                        help="skip the speed table (checks only, a few seconds)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    print_build()
    names = args.device or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    if "cuda" in names and not torch.cuda.is_available():
        print("\n--device cuda: no CUDA device is available to this torch "
              f"({torch.__version__}, CUDA {torch.version.cuda})")
        return 1
    devices = [torch.device(name) for name in dict.fromkeys(names)]
    torch.manual_seed(0)
    ok = True
    for device in devices:
        ok &= check_outputs(device)
        ok &= check_gradients(device)
    if not ok:
        print("\nno speed table: the kernels failed a check, their times would mean nothing")
    elif not args.no_bench:
        for device in devices:
            speed_table(device)
    print("\nself-check: " + ("PASS" if ok else "FAIL"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
