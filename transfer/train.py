"""Attention transfer of all-MiniLM-L6-v2 to one kernel: train only the transfer parameters
(csq_ext.hf.transfer: per-head scale, CSQ's per-head shift, optional q/k adapters) so that
each converted attention layer matches the softmax layer on stdlib prose (stage 1, layer by
layer on the original model's inputs), then optionally the final sentence embeddings (stage 2,
end to end, loss 1 - cosine). Every pretrained weight stays frozen.

    python -m transfer.train --variant csq --steps 1000 --e2e-steps 200 --max-tokens 128

Resumable: a checkpoint (``--ckpt``, default beside ``--out``) is written every
``--save-every`` steps and picked up on restart. Writes the parameters to ``--out``
(JSON, ``convert(model, params=...)`` loads it) with the loss curve in its "meta".
"""
from __future__ import annotations

import argparse
import os
import random
import time

import torch
from tqdm import tqdm

from csq_ext.hf.transfer import save_params, transfer_parameters
from quality.common import environment

from . import minilm, objective, text


def batches(tokenizer, passages, batch_size: int, max_tokens: int, seed: int):
    """An endless stream of tokenized batches of training passages, reshuffled every epoch."""
    rng = random.Random(seed)
    order = list(range(len(passages)))
    while True:
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield minilm.tokenize(tokenizer, [passages[j] for j in order[i:i + batch_size]],
                                  max_tokens)


def layer_step(teacher, student, batch, optimizer) -> float:
    """One stage-1 step: the mean relative squared error over layers."""
    loss = objective.layer_errors(student, objective.capture(teacher, batch), batch).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def e2e_step(teacher, student, batch, optimizer) -> float:
    """One stage-2 step: 1 - cosine between converted and original sentence embeddings."""
    with torch.no_grad():
        target = minilm.embed(teacher, batch)
    loss = 1.0 - (minilm.embed(student, batch) * target).sum(-1).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def make_optimizer(student, lr: float, adapter_lr: float):
    params = transfer_parameters(student)
    groups = [{"params": [p for n, p in params.items() if "lora" not in n], "lr": lr},
              {"params": [p for n, p in params.items() if "lora" in n], "lr": adapter_lr}]
    return torch.optim.Adam([g for g in groups if g["params"]])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", required=True, choices=list(minilm.VARIANTS))
    ap.add_argument("--steps", type=int, default=1000, help="stage-1 (layer-wise) steps")
    ap.add_argument("--e2e-steps", type=int, default=200, help="stage-2 (end-to-end) steps")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-2, help="per-head scale and shift")
    ap.add_argument("--adapter-lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 suits a shared machine; more on an idle one)")
    ap.add_argument("--save-every", type=int, default=25)
    ap.add_argument("--out", default=None, help="default bench/out/transfer/params/<variant>.json"
                    " (the shipped ones: csq_ext/hf/pretrained/all-MiniLM-L6-v2/<variant>.json)")
    ap.add_argument("--ckpt", default=None, help="default <out>.ckpt")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out or os.path.join(minilm.OUT, "params", f"{args.variant}.json")
    ckpt = args.ckpt or out + ".ckpt"
    os.makedirs(os.path.dirname(os.path.abspath(ckpt)), exist_ok=True)

    torch.manual_seed(args.seed)
    tokenizer, teacher = minilm.load()
    teacher.requires_grad_(False)
    options, rank = minilm.VARIANTS[args.variant]
    student = minilm.converted(teacher, args.variant)
    student.requires_grad_(False)
    for p in transfer_parameters(student).values():
        p.requires_grad_(True)
    optimizer = make_optimizer(student, args.lr, args.adapter_lr)
    stream = batches(tokenizer, text.passages(heldout=False), args.batch, args.max_tokens,
                     args.seed)
    step, curve, seconds = 0, [], 0.0
    if os.path.exists(ckpt):
        state = torch.load(ckpt, weights_only=False)
        student.load_state_dict(state["params"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        step, curve, seconds = state["step"], state["curve"], state["seconds"]
        for _ in range(step):  # the same data order as an uninterrupted run
            next(stream)
        print(f"resumed {args.variant} at step {step} from {ckpt}")

    total = args.steps + args.e2e_steps
    bar = tqdm(total=total, initial=step, desc=args.variant, mininterval=5)
    while step < total:
        t0 = time.perf_counter()
        stage = "layer" if step < args.steps else "e2e"
        loss = (layer_step if stage == "layer" else e2e_step)(teacher, student, next(stream),
                                                              optimizer)
        seconds += time.perf_counter() - t0
        curve.append([step, stage, loss])
        step += 1
        bar.update(1)
        bar.set_postfix(stage=stage, loss=f"{loss:.4f}", refresh=False)
        if step % args.save_every == 0 or step == total:
            torch.save({"params": transfer_parameters(student), "step": step, "curve": curve,
                        "optimizer": optimizer.state_dict(), "seconds": seconds},
                       ckpt + ".tmp")
            os.replace(ckpt + ".tmp", ckpt)
    bar.close()
    meta = {"variant": args.variant, "settings": vars(args), "train_seconds": round(seconds, 1),
            "curve": curve, "environment": environment()}
    save_params(student, out, convert_options=options, adapter_rank=rank, meta=meta)
    print(f"wrote {out} ({os.path.getsize(out)} bytes) after {seconds:.0f} s of training")


if __name__ == "__main__":
    main()
