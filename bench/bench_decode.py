"""Bandwidth of the in-place decode step, csq_ext.decode_, against the device's own copy
bandwidth and a softmax KV-cache step (torch SDPA), all measured in the same run.

A decode step reads and writes each head's state once: the sums (B, Hk, F, Dv + 1) with
F = Dk (Dk + 1) / 2 + Dk + 1, in float32 for float32/bfloat16/float16 inputs. The bytes it must
move are therefore

    state_bytes = 2 * 4 * B * Hk * F * (Dv + 1)      (+ ref, q, k, v and y: counted, small)

and the achieved bandwidth is bytes / median step time. The reference bandwidth is a large
device-to-device copy (`dst.copy_(src)`: 2 x its size moved) timed in the same run. The last
level cache is flushed (a 256 MiB write) before every timed call so the state comes from DRAM,
as it would in a model whose other layers ran in between.

The softmax step is SDPA with one query against a KV cache of L positions (it reads
2 * B * Hk * L * Dk * itemsize bytes): CSQ's step costs the same at every position, softmax's
grows with L.

    python bench/bench_decode.py                     # cuda if present, else cpu
    python bench/bench_decode.py --json out.json --md out.md
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import csq_ext  # noqa: E402
from csq_ext._timing import device_description, synchronize  # noqa: E402

# (B, Hq, Hk, Dk = Dv): a single sequence, serving batches, grouped-query heads, Dk = 128.
GPU_CONFIGS = [(1, 8, 8, 64), (8, 8, 8, 64), (32, 8, 8, 64), (128, 8, 8, 64), (32, 32, 8, 64),
               (8, 8, 8, 128), (32, 8, 8, 128)]
CPU_CONFIGS = [(1, 8, 8, 64), (8, 8, 8, 64), (1, 8, 8, 128)]
QUICK_CONFIGS = [(2, 4, 2, 16)]
FLUSH_BYTES = 256 << 20
MAX_CACHE_BYTES = 24 << 30  # softmax KV caches larger than this are skipped


def timed(fn, device, flush, repeats):
    """Median seconds of fn over `repeats` calls, each after a cache flush (not timed)."""
    times = []
    for _ in range(repeats):
        flush.zero_()
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            import time
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device, flush, nbytes, repeats):
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * nbytes / timed(lambda: dst.copy_(src), device, flush, repeats)


def decode_row(cfg, dtype, device, flush, repeats, contexts, copy_bw):
    B, Hq, Hk, D = cfg
    torch.manual_seed(0)  # drawn on the device: the largest KV caches are gigabytes
    draw = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
    q, k, v = draw(B, Hq, 1, D), draw(B, Hk, 1, D), draw(B, Hk, 1, D)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    state = csq_ext.CSQState.empty(B, Hk, D, D, dtype=acc, device=device)
    shift = torch.ones(Hq, dtype=acc, device=device)  # a tensor of the state's dtype: no
    out = torch.empty(B, Hq, 1, D, dtype=dtype, device=device)  # allocation in the step
    step = lambda: csq_ext.decode_(q, k, v, state, out=out, shift=shift)  # noqa: E731
    for _ in range(3):
        step()
    synchronize(device)
    seconds = timed(step, device, flush, repeats)
    item = torch.finfo(dtype).bits // 8
    state_bytes = 2 * state.sums.numel() * state.sums.element_size()
    other = state.ref.numel() * state.ref.element_size() + (q.numel() + k.numel() + v.numel()
                                                            + out.numel()) * item
    row = dict(B=B, Hq=Hq, Hk=Hk, Dk=D, Dv=D, dtype=str(dtype).replace("torch.", ""),
               state_mib=state.sums.numel() * state.sums.element_size() / 2**20,
               csq_us=seconds * 1e6, bytes=state_bytes + other,
               csq_gbs=(state_bytes + other) / seconds / 1e9)
    row["frac_of_copy"] = row["csq_gbs"] * 1e9 / copy_bw
    for L in contexts:
        cache_bytes = 2 * B * Hk * L * D * item
        if cache_bytes > MAX_CACHE_BYTES:
            row[f"sdpa_us_L{L}"] = None
            continue
        kc, vc = draw(B, Hk, L, D), draw(B, Hk, L, D)
        kw = {"enable_gqa": True} if Hq != Hk else {}
        attn = lambda: F.scaled_dot_product_attention(q, kc, vc, **kw)  # noqa: E731
        attn()
        row[f"sdpa_us_L{L}"] = timed(attn, device, flush, repeats) * 1e6
        del kc, vc
    return row


def markdown(result):
    dev, rows, ctx = result["device"], result["rows"], result["contexts"]
    lines = [f"Decode step (`csq_ext.decode_`, in place) on {dev.get('name')} "
             f"(torch {dev['torch']}, CUDA {dev.get('torch_cuda')}), {result['date']}. "
             f"Copy bandwidth measured in the same run: {result['copy_gbs']:.0f} GB/s. "
             "Medians; cache flushed before every call.", "",
             "| B | Hq | Hk | Dk=Dv | dtype | state MiB | CSQ us/step | GB/s | of copy | "
             + " | ".join(f"SDPA us @ L={L}" for L in ctx) + " |",
             "|" + "---|" * (9 + len(ctx))]
    for r in rows:
        sdpa = " | ".join("-" if r[f"sdpa_us_L{L}"] is None else f"{r[f'sdpa_us_L{L}']:.1f}"
                          for L in ctx)
        lines.append(f"| {r['B']} | {r['Hq']} | {r['Hk']} | {r['Dk']} | {r['dtype']} | "
                     f"{r['state_mib']:.1f} | {r['csq_us']:.1f} | {r['csq_gbs']:.0f} | "
                     f"{100 * r['frac_of_copy']:.0f}% | {sdpa} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--md", help="write the markdown table here")
    ap.add_argument("--quick", action="store_true", help="one tiny case (a smoke test)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    configs = QUICK_CONFIGS if args.quick else GPU_CONFIGS if on_gpu else CPU_CONFIGS
    contexts = [64] if args.quick else [4096, 32768] if on_gpu else [4096]
    dtype = torch.bfloat16 if on_gpu else torch.float32
    repeats = 3 if args.quick else 50 if on_gpu else 20
    flush = torch.empty((1 << 20) if args.quick else FLUSH_BYTES // 4, device=device)
    copy_bw = copy_bandwidth(device, flush, (4 << 20) if args.quick else 1 << 30, repeats)
    rows = [decode_row(c, dtype, device, flush, repeats, contexts, copy_bw) for c in configs]
    result = dict(device=device_description(device), date=datetime.date.today().isoformat(),
                  copy_gbs=copy_bw / 1e9, contexts=contexts, rows=rows)
    table = markdown(result)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(table)
    return result


if __name__ == "__main__":
    main()
