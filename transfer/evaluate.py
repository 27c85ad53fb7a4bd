"""Held-out measurements of converted all-MiniLM-L6-v2 models against the original:

* sentence embeddings (mean-pooled, normalized) of ``--sentences`` held-out stdlib sentences:
  cosine with the original's (mean, 5th percentile) and nearest-neighbour agreement (for each
  sentence, is its nearest neighbour among the others the same under both models);
* per layer, on held-out passages (``--passages``, up to 128 tokens): the attention error
  (relative squared error of each converted attention module on the original's input to it,
  the stage-1 objective) and the hidden-state error (relative squared error of each layer's
  output when the whole converted model runs freely).

For each variant: the zero-shot swap (transfer parameters at their initial values) and, where
``<params-dir>/<variant>.json`` exists (default: the parameters csq_ext ships,
csq_ext/hf/pretrained/all-MiniLM-L6-v2), the transferred model.

    python -m transfer.evaluate                    # every variant -> bench/out/transfer/eval.json
    python -m transfer.evaluate --out bench/results/transfer/eval.json   # the committed one
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from quality.common import environment, write_json

from . import minilm, objective, text

RESULTS = os.path.join("bench", "results", "transfer")


def embedding_agreement(emb: torch.Tensor, ref: torch.Tensor) -> dict:
    cos = (emb * ref).sum(-1)

    def neighbours(e):
        sim = e @ e.T
        sim.fill_diagonal_(-float("inf"))
        return sim.argmax(-1)

    return {"cos_mean": cos.mean().item(), "cos_p5": torch.quantile(cos, 0.05).item(),
            "nn_agreement": (neighbours(emb) == neighbours(ref)).float().mean().item()}


@torch.no_grad()
def layer_metrics(teacher, student, batches) -> dict:
    """Per-layer attention error (teacher-forced) and hidden-state error (free-running),
    pooled over ``batches`` (sums of squares, then the ratio)."""
    hid_num = hid_den = 0.0
    att = []
    for batch in batches:
        captured = objective.capture(teacher, batch)
        att.append(objective.layer_errors(student, captured, batch))
        kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  token_type_ids=batch.get("token_type_ids"), output_hidden_states=True)
        real = batch["attention_mask"][..., None].float()
        ref = torch.stack(teacher(**kw).hidden_states[1:])
        got = torch.stack(student(**kw).hidden_states[1:])
        hid_num = hid_num + (((got - ref) * real) ** 2).sum((1, 2, 3))
        hid_den = hid_den + ((ref * real) ** 2).sum((1, 2, 3))
    return {"attention_error": torch.stack(att).mean(0).tolist(),
            "hidden_error": (hid_num / hid_den).tolist()}


def evaluate(teacher, student, tokenizer, sentences, ref_emb, batches) -> dict:
    emb = minilm.embed_texts(student, tokenizer, sentences)
    finite = bool(torch.isfinite(emb).all())
    return {"finite": finite, **embedding_agreement(emb, ref_emb),
            **layer_metrics(teacher, student, batches)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default=",".join(minilm.VARIANTS))
    ap.add_argument("--sentences", type=int, default=1000)
    ap.add_argument("--passages", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--params-dir", default=minilm.SHIPPED_PARAMS)
    ap.add_argument("--out", default=os.path.join(minilm.OUT, "eval.json"))
    ap.add_argument("--force", action="store_true", help="recompute entries already in --out")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer, teacher = minilm.load()
    sentences = text.sentences(heldout=True, count=args.sentences)
    passages = text.passages(heldout=True)[:args.passages]
    batches = [minilm.tokenize(tokenizer, passages[i:i + 16])
               for i in range(0, len(passages), 16)]
    ref_emb = minilm.embed_texts(teacher, tokenizer, sentences)
    results = {}
    if os.path.exists(args.out) and not args.force:
        with open(args.out) as f:
            results = json.load(f).get("results", {})
    for variant in args.variants.split(","):
        params = os.path.join(args.params_dir, f"{variant}.json")
        runs = {"zero_shot": None}
        if os.path.exists(params):
            runs["transferred"] = params
        for run, path in runs.items():
            entry = results.setdefault(variant, {})
            if run in entry and not args.force and entry[run].get("params_mtime") == (
                    path and os.path.getmtime(path)):
                continue
            student = minilm.converted(teacher, variant, params=path)
            entry[run] = evaluate(teacher, student, tokenizer, sentences, ref_emb, batches)
            entry[run]["params_mtime"] = path and os.path.getmtime(path)
            print(variant, run, {k: v for k, v in entry[run].items() if "error" not in k})
            write_json(args.out, {"settings": vars(args), "num_sentences": len(sentences),
                                  "num_passages": len(passages), "environment": environment(),
                                  "results": results})


if __name__ == "__main__":
    main()
