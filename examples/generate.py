"""Token-by-token generation with CSQ attention next to a softmax KV cache.

A tiny randomly initialised decoder (the numbers measure the serving path, not text quality)
prefills a prompt with csq_ext.attention(..., return_state=True), then generates one token at
a time with the in-place csq_ext.decode_. Beside it, the same model with softmax attention and
a growing KV cache. Every so many steps it prints the time per step and the attention memory
each carries: CSQ's stays flat in N, the KV cache grows.

    python examples/generate.py --steps 8192
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import csq_ext


class TinyDecoder(torch.nn.Module):
    def __init__(self, vocab=256, dim=128, heads=4, layers=2):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.embed = torch.nn.Embedding(vocab, dim)
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(dim, 3 * dim) for _ in range(layers))
        self.proj = torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in range(layers))
        self.mlp = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(),
                                torch.nn.Linear(4 * dim, dim)) for _ in range(layers))
        self.norm = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, vocab)

    def split(self, x, layer):
        B, N, _ = x.shape
        q, k, v = self.qkv[layer](x).view(B, N, 3, self.heads, self.head_dim).unbind(2)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def block(self, x, layer, attend):
        B, N, D = x.shape
        y = attend(*self.split(x, layer), layer).transpose(1, 2).reshape(B, N, D)
        x = x + self.proj[layer](y)
        return x + self.mlp[layer](x)

    def logits(self, x):
        return self.head(self.norm(x[:, -1]))


class CSQServer:
    """Carries one CSQState per layer; decoding updates them in place."""

    def __init__(self, model):
        self.model, self.states, self.out = model, [], None

    def prefill(self, tokens):
        def attend(q, k, v, layer):
            y, state = csq_ext.attention(q, k, v, return_state=True)
            self.states.append(state)
            return y
        return self.run(tokens, attend)

    def step(self, token):
        def attend(q, k, v, layer):
            if self.out is None:
                self.out = q.new_empty(q.shape[0], q.shape[1], 1, v.shape[-1])
            return csq_ext.decode_(q, k, v, self.states[layer], out=self.out)
        return self.run(token, attend)

    def run(self, tokens, attend):
        x = self.model.embed(tokens)
        for layer in range(len(self.model.qkv)):
            x = self.model.block(x, layer, attend)
        return self.model.logits(x)

    def attention_bytes(self):
        return sum(s.sums.nbytes + s.ref.nbytes for s in self.states)


class SoftmaxServer(CSQServer):
    """Softmax attention with a KV cache that grows by one row per token and layer."""

    def prefill(self, tokens):
        def attend(q, k, v, layer):
            self.states.append([k, v])
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.run(tokens, attend)

    def step(self, token):
        def attend(q, k, v, layer):
            cache = self.states[layer]
            cache[0], cache[1] = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
            return F.scaled_dot_product_attention(q, cache[0], cache[1])
        return self.run(token, attend)

    def attention_bytes(self):
        return sum(k.nbytes + v.nbytes for k, v in self.states)


def generate(server, prompt, steps, report_every):
    """Greedy generation; yields (position, median ms per step over the last window, bytes)."""
    token = server.prefill(prompt).argmax(-1, keepdim=True)
    times = []
    for i in range(1, steps + 1):
        t0 = time.perf_counter()
        token = server.step(token).argmax(-1, keepdim=True)
        times.append(time.perf_counter() - t0)
        if i % report_every == 0:
            yield prompt.shape[1] + i, 1e3 * statistics.median(times), server.attention_bytes()
            times = []


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8192)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--report-every", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    model = TinyDecoder().eval()
    prompt = torch.randint(0, 256, (1, args.prompt))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; tiny decoder: "
          f"2 layers, 4 heads of 32, float32, batch 1, prompt {args.prompt}")
    print(f"{'position':>9} {'CSQ ms/step':>12} {'CSQ state':>10} "
          f"{'softmax ms/step':>16} {'KV cache':>10}")
    with torch.inference_mode():
        rows = zip(generate(CSQServer(model), prompt, args.steps, args.report_every),
                   generate(SoftmaxServer(model), prompt, args.steps, args.report_every))
        for (n, t_csq, b_csq), (_, t_sm, b_sm) in rows:
            print(f"{n:>9} {t_csq:>12.3f} {b_csq / 2**20:>8.2f}MB "
                  f"{t_sm:>16.3f} {b_sm / 2**20:>8.2f}MB")


if __name__ == "__main__":
    main()
