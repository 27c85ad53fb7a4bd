"""Where a CPU call's time goes: samples one configuration with Linux `perf` and groups them.

    python bench/profile_cpu.py --n 4096 --d 128 --mask causal --path direct --mode fwd
    python bench/profile_cpu.py --n 16384 --d 128 --path chunked --mode fwd+bwd --calls 5

A child process warms the call up, then `perf record` samples only the timed calls (perf's
control fifo switches sampling on after the warm-up), and the samples are grouped:

* ``gemm microkernel``: oneDNN's JIT-generated code (`[JIT]` in perf: the tile and state
  products of csrc/cpu/csq_gemm.h; SDPA's products when --path sdpa);
* ``blas``: MKL / OpenBLAS (the products csq_gemm.h leaves to BLAS);
* ``csq kernels``: csq_ext's own C++ (conversion and packing, shifts and centering, squares and
  row sums, masking, features), listed function by function below the groups; code inlined
  into a tile loop is counted in that loop's function;
* ``threads``: OpenMP (libgomp / libiomp: waiting at barriers, waking threads);
* ``torch``: ATen and the dispatcher (allocation, copies, autograd);
* ``python``: the interpreter (argument checks, the cost model, autograd's Python wrappers);
* ``os``: the kernel (page faults of fresh allocations) and libc (memset, malloc).

Needs `perf` (Debian: linux-perf) with sampling allowed (kernel.perf_event_paranoid <= 2 for a
process's own samples) and a csq_ext build with symbols (an unstripped build: see docs/build.md's
build switches); otherwise csq_ext's functions show as addresses. Prints the table and writes
JSON where --out says (nothing is written by default).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

CHILD = r"""
import sys, torch, csq_ext
import torch.nn.functional as F
n, d, causal, path, mode, calls, threads, ctl = sys.argv[1:9]
n, d, calls, causal = int(n), int(d), int(calls), causal == "causal"
if int(threads) > 0:
    torch.set_num_threads(int(threads))
torch.manual_seed(0)
grad = mode != "fwd"
q, k, v = (torch.randn(1, 4, n, d, requires_grad=grad) for _ in range(3))
dy = torch.randn(1, 4, n, d)
def call():
    if path == "sdpa":
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    else:
        y = csq_ext.attention(q, k, v, causal=causal, path=path)
    if grad:
        torch.autograd.grad(y, (q, k, v), dy)
with torch.set_grad_enabled(grad):
    for _ in range(2):
        call()
    with open(ctl, "w") as f:
        f.write("enable\n")
    for _ in range(calls):
        call()
    with open(ctl, "w") as f:
        f.write("disable\n")
"""

GROUPS = [  # (group, dso pattern), first match wins
    ("gemm microkernel", r"^\[JIT\]"),
    ("blas", r"mkl|openblas|libblas"),
    ("csq kernels", r"^_C\.|csq_ext"),
    ("threads", r"gomp|iomp|libpthread"),
    ("torch", r"libtorch|libc10"),
    ("python", r"python"),
    ("os", r"kernel|libc\.|ld-linux|libm\."),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--d", type=int, default=128, help="Dk = Dv")
    p.add_argument("--mask", choices=("causal", "full"), default="causal")
    p.add_argument("--path", choices=("auto", "direct", "chunked", "sdpa"), default="auto")
    p.add_argument("--mode", choices=("fwd", "fwd+bwd"), default="fwd")
    p.add_argument("--calls", type=int, default=10, help="timed calls sampled")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--freq", type=int, default=2000, help="samples per second")
    p.add_argument("--top", type=int, default=12, help="csq_ext functions listed")
    p.add_argument("--out", default=None, help="JSON path (default: print only)")
    return p.parse_args(argv)


def record(args, workdir: str) -> str:
    if shutil.which("perf") is None:
        raise SystemExit("perf not found (Debian: apt install linux-perf)")
    ctl, ack, data = (os.path.join(workdir, name) for name in ("ctl", "ack", "perf.data"))
    os.mkfifo(ctl)
    os.mkfifo(ack)
    child = os.path.join(workdir, "child.py")
    with open(child, "w") as f:
        f.write(CHILD)
    cmd = ["perf", "record", "-F", str(args.freq), "-D", "-1", "--control",
           f"fifo:{ctl},{ack}", "-o", data, "--", sys.executable, child, str(args.n),
           str(args.d), args.mask, args.path, args.mode, str(args.calls), str(args.threads),
           ctl]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return data


def report(data: str) -> list[tuple[float, str, str]]:
    """(percent, dso, symbol) for every sampled symbol."""
    out = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", "dso,symbol",
                          "--stdio", "--percent-limit", "0"],
                         check=True, capture_output=True, text=True).stdout
    rows = []
    for line in out.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\S+(?: tid \d+)?)\s+\[[.k]\]\s+(.*)$", line)
        if m:
            rows.append((float(m.group(1)), m.group(2), m.group(3).strip()))
    return rows


def _collapse_templates(symbol: str) -> str:
    """'f<a, g<b>(c)::{lambda}>(d)' -> 'f<...>': the function, templates and arguments elided
    (a tile loop inlined into a lambda keeps the name of the function that made it)."""
    name = re.sub(r"\(anonymous namespace\)::", "", symbol)
    while True:
        shorter = re.sub(r"<[^<>]*>", "<>", name)
        shorter = re.sub(r"\([^()]*\)", "()", shorter)
        if shorter == name:
            return name
        name = shorter


def group(rows):
    groups: dict[str, float] = {name: 0.0 for name, _ in GROUPS}
    groups["other"] = 0.0
    ours: dict[str, float] = {}
    for pct, dso, sym in rows:
        name = next((g for g, pat in GROUPS if re.search(pat, dso)), "other")
        groups[name] += pct
        if name == "csq kernels":
            short = _collapse_templates(sym)[:110]
            ours[short] = ours.get(short, 0.0) + pct
    return groups, sorted(ours.items(), key=lambda kv: -kv[1])


def main(argv=None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        rows = report(record(args, workdir))
    groups, ours = group(rows)
    title = (f"{args.path} {args.mode}, {args.mask}, N={args.n}, Dk=Dv={args.d}, B=1, H=4, "
             f"float32, {args.calls} calls")
    print(title)
    for name, pct in groups.items():
        print(f"  {name:<18} {pct:6.1f}%")
    print("  csq_ext functions:")
    for name, pct in ours[:args.top]:
        print(f"    {pct:6.1f}%  {name}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": vars(args), "groups": groups, "csq_functions": ours}, f,
                      indent=1)


if __name__ == "__main__":
    main()
