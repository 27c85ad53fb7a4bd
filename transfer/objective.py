"""What attention transfer minimizes and what the study measures per layer: each converted
attention module run on the *original* model's input to that layer (teacher forcing, as in
LoLCATs' first stage), compared with the original module's output on real tokens."""
from __future__ import annotations

import torch

from csq_ext.hf.convert import attention_modules


@torch.no_grad()
def capture(teacher, batch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(input hidden states, attention output)] of every attention module of ``teacher`` on
    ``batch``, and the teacher's last hidden state appended as ``(None, last_hidden)``."""
    seen, hooks = [], []

    def hook(module, args, kwargs, output):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        seen.append((hidden.detach(), output[0].detach()))

    for module in attention_modules(teacher):
        hooks.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        out = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      token_type_ids=batch.get("token_type_ids"))
    finally:
        for h in hooks:
            h.remove()
    return seen + [(None, out.last_hidden_state)]


def key_mask(batch) -> torch.Tensor | None:
    """The (B, N) real-token mask csq attention takes (None when no token is padding)."""
    keep = batch["attention_mask"].to(torch.bool)
    return None if bool(keep.all()) else keep


def layer_errors(student, captured, batch) -> torch.Tensor:
    """(L,) relative squared error ||y - y_softmax||^2 / ||y_softmax||^2 of each converted
    attention module on the original module's input, over real tokens (differentiable)."""
    keep = key_mask(batch)
    real = batch["attention_mask"][..., None].to(captured[0][1].dtype)
    errs = []
    for module, (hidden, target) in zip(attention_modules(student), captured):
        y = module(hidden, attention_mask=keep)[0]
        errs.append((((y - target) * real) ** 2).sum() / ((target * real) ** 2).sum())
    return torch.stack(errs)
