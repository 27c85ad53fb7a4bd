"""Context parallelism on the CPU (gloo): time and bytes per rank against world size, and the
bytes per rank per layer of csq_ext.distributed.attention against ring attention.

Measured part: for each world size W, W spawned processes (gloo on 127.0.0.1) each hold
N / W positions of one causal sequence and run forward, and forward + backward, of
``csq_ext.distributed.attention``; median over repetitions, a barrier before each. Bytes per
rank are taken two ways: the module's count at its collectives (``comm_stats``, ring wire
sizes) and, where Linux provides it, the bytes this process wrote to its sockets
(``/proc/self/io`` wchar; gloo's TCP transport). Both are reported at two sequence lengths to
show they do not grow with N. World size 1 is ``csq_ext.attention`` itself; its overhead is
measured beside the plain call.

Computed part: bytes each rank sends per layer's forward, for 8 ranks and N up to 1M.
CSQ: (W - 1) x (the state, float32, 4 S Hk F (Dv + 1) bytes, + the reference keys and a
128-byte handshake). Ring attention: every rank's K and V shard travels the ring, W - 1
hops, (W - 1) / W x N x B x Hk x (Dk + Dv) x itemsize bytes per rank.

    python bench/bench_cp.py                                   # the lead's run (idle machine)
    python bench/bench_cp.py --n 512 --worlds 1,2 --reps 2     # quick check
    python bench/bench_cp.py --out bench/results/cp_cpu        # also writes .json and .md
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import csq_ext  # noqa: E402
from csq_ext import distributed as cd  # noqa: E402
from csq_ext.state import num_features  # noqa: E402


def _wchar() -> int | None:
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("wchar"))
    except (OSError, StopIteration):
        return None


def _inputs(n, args, grad):
    g = torch.Generator().manual_seed(n)
    shape = lambda d: (1, args.heads, n, d)  # noqa: E731
    return [torch.randn(*shape(d), generator=g).requires_grad_(grad)
            for d in (args.dim, args.dim, args.dim)]


def _median_ms(fn, reps, barrier):
    times = []
    for _ in range(reps):
        barrier()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _rank_main(rank, world, port, args, queue):
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    barrier = dist.barrier
    row = {"world": world}
    for label, n_total in (("", args.n), ("_2n", 2 * args.n)):
        n = n_total // world
        q, k, v = _inputs(n, args, True)

        def fwd():
            with torch.no_grad():
                cd.attention(q, k, v)

        def fwd_bwd():
            cd.attention(q, k, v).sum().backward()

        fwd(), fwd_bwd()  # warm-up
        cd.reset_comm_stats()
        w0 = _wchar()
        fwd()
        row[f"counted_fwd_bytes{label}"] = cd.comm_stats()["bytes"]
        w1 = _wchar()
        fwd_bwd()
        w2 = _wchar()
        row[f"counted_fwd_bwd_bytes{label}"] = cd.comm_stats()["bytes"] - \
            row[f"counted_fwd_bytes{label}"]
        if w0 is not None:
            row[f"wchar_fwd_bytes{label}"], row[f"wchar_fwd_bwd_bytes{label}"] = w1 - w0, w2 - w1
        if not label:
            row["fwd_ms"] = _median_ms(fwd, args.reps, barrier)
            row["fwd_bwd_ms"] = _median_ms(fwd_bwd, args.reps, barrier)
    queue.put((rank, row))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(world, args):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = mp.start_processes(_rank_main, args=(world, _free_port(), args, queue),
                               nprocs=world, join=False, start_method="spawn")
    rows = dict(queue.get(timeout=900) for _ in range(world))
    while not procs.join():
        pass
    # Time: the slowest rank; bytes: the largest (every rank sends the same state).
    out = {key: max(r[key] for r in rows.values()) for key in rows[0]}
    return out


def world1_overhead(args):
    """csq_ext.distributed.attention without a group against csq_ext.attention, interleaved."""
    torch.set_num_threads(args.threads)
    q, k, v = _inputs(args.n, args, False)
    plain, dist_ = [], []
    with torch.no_grad():
        for _ in range(args.reps * 3):
            for fn, acc in ((csq_ext.attention, plain), (cd.attention, dist_)):
                t0 = time.perf_counter()
                fn(q, k, v)
                acc.append(time.perf_counter() - t0)
    return statistics.median(dist_) / statistics.median(plain)


def ring_table(args, world=8):
    """Bytes per rank per layer forward, CSQ against ring attention (computed)."""
    B, Hk, D = 1, args.table_heads, args.table_dim
    F = num_features(D)
    csq = (world - 1) * (128 + 4 * B * Hk * (D + 1) + 4 * B * Hk * F * (D + 1))
    rows = []
    for n in [4096 * 2 ** i for i in range(9)]:  # 4K .. 1M
        ring = (world - 1) * (n // world) * B * Hk * 2 * D * 2  # bf16 K and V
        rows.append({"N": n, "ring_bytes": ring, "csq_bytes": csq, "ring_over_csq": ring / csq})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16384, help="total sequence length")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=32, help="Dk = Dv of the measured part")
    p.add_argument("--worlds", default="1,2,4")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--table-heads", type=int, default=8, help="Hk of the computed table")
    p.add_argument("--table-dim", type=int, default=64, help="Dk = Dv of the computed table")
    p.add_argument("--out", default="", help="write <out>.json and <out>.md")
    args = p.parse_args(argv)

    result = {"torch": torch.__version__, "cpu": os.cpu_count(), "args": vars(args),
              "worlds": [], "world1_overhead": world1_overhead(args), "ring_table": ring_table(args)}
    for w in [int(x) for x in args.worlds.split(",")]:
        result["worlds"].append(measure(w, args))

    lines = [f"## Measured (CPU, gloo, causal float32, B=1, H={args.heads}, Dk=Dv={args.dim}, "
             f"N={args.n}, {args.threads} thread(s) per rank; torch {torch.__version__})", "",
             "| ranks | fwd ms | fwd+bwd ms | bytes/rank fwd (counted) | fwd+bwd | at 2N | "
             "socket bytes fwd (wchar) | at 2N |", "|---|---|---|---|---|---|---|---|"]
    for r in result["worlds"]:
        lines.append(f"| {r['world']} | {r['fwd_ms']:.1f} | {r['fwd_bwd_ms']:.1f} | "
                     f"{r['counted_fwd_bytes']} | "
                     f"{r['counted_fwd_bytes'] + r['counted_fwd_bwd_bytes']} | "
                     f"{r['counted_fwd_bytes_2n']} | {r.get('wchar_fwd_bytes', 'n/a')} | "
                     f"{r.get('wchar_fwd_bytes_2n', 'n/a')} |")
    lines += ["", f"World size 1 (no group): distributed.attention / attention time = "
              f"{result['world1_overhead']:.3f}", "",
              f"## Computed: bytes per rank per layer forward, 8 ranks, B=1, Hk="
              f"{args.table_heads}, Dk=Dv={args.table_dim} (ring: bf16 K, V; CSQ: fp32 state)",
              "", "| N | ring attention | CSQ | ring / CSQ |", "|---|---|---|---|"]
    for r in result["ring_table"]:
        lines.append(f"| {r['N']} | {r['ring_bytes'] / 2**20:.1f} MiB | "
                     f"{r['csq_bytes'] / 2**20:.1f} MiB | {r['ring_over_csq']:.2f}x |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump(result, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
