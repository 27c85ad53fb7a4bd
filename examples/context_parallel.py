"""Context parallelism: train the tiny byte LM with every sequence split over the ranks.

    torchrun --nproc_per_node=2 examples/context_parallel.py --steps 20
    torchrun --nproc_per_node=2 examples/context_parallel.py --device cuda --backend nccl

Each rank holds a contiguous piece of every training window (its positions only: embeddings,
MLPs and the loss are per position); the attention layers, given the process group, carry the
CSQ state across ranks (``csq_ext.distributed.attention``). Parameters are replicated: the
gradients of the ranks' pieces are summed with one all-reduce per step, like data parallelism.

With ``--compare 1`` (default) rank 0 also trains the same model (same initial weights, same
batches) in one process on the whole windows, and prints both loss curves side by side: they
agree to float32 rounding. Without torchrun it runs as a single process.

The model is ``quality.models.TinyLM`` without the short convolution and without position
embeddings, both of which would need the neighbouring rank's positions.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from quality.common import lr_at, make_optimizer  # noqa: E402
from quality.models import TinyLM  # noqa: E402
from quality.train_lm import LMConfig, load_data  # noqa: E402


def build(args, group):
    torch.manual_seed(args.seed)  # the same initial weights on every rank and for the replica
    return TinyLM(256, args.d_model, args.n_layers, args.num_heads, short_conv=0, max_seq_len=0,
                  process_group=group).to(args.device)


def shard_bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    """Contiguous, nearly equal pieces of n positions (the last ones shorter when uneven)."""
    size = -(-n // world)
    return min(n, rank * size), min(n, (rank + 1) * size)


def step_loss(model, batch, a, b, n_total):
    """Summed cross entropy of positions [a, b) over all windows, divided by all positions."""
    h = model(batch[:, a:b])
    logits = model.head(h).float()
    return F.cross_entropy(logits.flatten(0, 1), batch[:, a + 1:b + 1].flatten(),
                           reduction="sum") / n_total


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--num-heads", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max-files", type=int, default=200, help="stdlib files to read")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="gloo", help="gloo (CPU) or nccl (GPUs)")
    p.add_argument("--compare", type=int, default=1, help="rank 0 also trains one process")
    args = p.parse_args(argv)

    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group(args.backend)
        if args.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            args.device = f"cuda:{torch.cuda.current_device()}"
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    group = dist.group.WORLD if distributed else None

    cfg = LMConfig(seq_len=args.seq_len, max_files=args.max_files, seed=args.seed)
    train = load_data(cfg)["streams"]["train"]
    model = build(args, group)
    opt = make_optimizer(model, args.lr, 0.1)
    replica = build(args, None) if args.compare and rank == 0 else None
    opt_r = make_optimizer(replica, args.lr, 0.1) if replica is not None else None

    a, b = shard_bounds(args.seq_len, world, rank)
    n_total = args.batch_size * args.seq_len
    gen = torch.Generator().manual_seed(args.seed)  # the same batches on every rank
    if rank == 0:
        print(f"world {world}: rank 0 holds positions [{a}, {b}) of {args.seq_len}")
        print(f"{'step':>5} {'loss, ' + str(world) + ' ranks':>16} {'loss, 1 process':>16} "
              f"{'difference':>11}")
    for step in range(args.steps):
        off = torch.randint(0, train.numel() - args.seq_len - 1, (args.batch_size,),
                            generator=gen)
        batch = torch.stack([train[o:o + args.seq_len + 1] for o in off.tolist()]).long()
        batch = batch.to(args.device)
        lr = lr_at(step, lr=args.lr, warmup=2, total=args.steps)
        for o in [opt] + ([opt_r] if opt_r else []):
            for g in o.param_groups:
                g["lr"] = lr

        loss = step_loss(model, batch, a, b, n_total)  # this rank's part of the mean
        opt.zero_grad(set_to_none=True)
        loss.backward()
        total = loss.detach().clone()
        if distributed:
            dist.all_reduce(total)
            for prm in model.parameters():  # the sum over the ranks' pieces
                if prm.grad is not None:
                    dist.all_reduce(prm.grad)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

        line = f"{step:5d} {float(total):16.6f}"
        if replica is not None:
            loss_r = step_loss(replica, batch, 0, args.seq_len, n_total)
            opt_r.zero_grad(set_to_none=True)
            loss_r.backward()
            torch.nn.utils.clip_grad_norm_(replica.parameters(), 1.0)
            opt_r.step()
            lr_loss = float(loss_r.detach())
            line += f" {lr_loss:16.6f} {abs(float(total) - lr_loss):11.2e}"
        if rank == 0:
            print(line, flush=True)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
