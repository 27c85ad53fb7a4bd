"""The small language model the quality scripts train: every kernel gets the same network.

    tokens -> embedding (+ learned positions, optional)
           -> n_layers x [ x += ShortConv(LN(x))   (optional, shared by every kernel)
                           x += CSQAttention(LN(x)) (kernel= switch: the only difference)
                           x += MLP(LN(x)) ]
           -> LN -> tied head (the embedding matrix)

The short causal depthwise convolution (``short_conv`` taps, Based/H3-style) gives every
kernel the same cheap access to the previous few tokens. Without it (``short_conv=0``) a
kernel must build a "previous token" head out of attention alone, which softmax can do with
position information and the feature-map kernels hardly can; the recall study would then
measure that instead of the similarity. Both settings are available; the scripts default
to 4 taps and record the choice.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from csq_ext.nn import CSQAttention


class ShortConv(nn.Module):
    """Causal depthwise 1-D convolution over time: (B, N, D) -> (B, N, D)."""

    def __init__(self, dim: int, taps: int):
        super().__init__()
        self.taps = taps
        self.conv = nn.Conv1d(dim, dim, taps, groups=dim, padding=taps - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N = x.shape[1]
        return self.conv(x.transpose(1, 2))[..., :N].transpose(1, 2)


class Block(nn.Module):
    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int | None, kernel: str,
                 mlp_ratio: int, short_conv: int, attn_kwargs: dict):
        super().__init__()
        self.conv_norm = nn.LayerNorm(d_model) if short_conv > 0 else None
        self.conv = ShortConv(d_model, short_conv) if short_conv > 0 else None
        self.attn_norm = nn.LayerNorm(d_model)
        self.attn = CSQAttention(d_model, num_heads, num_kv_heads, kernel=kernel, causal=True,
                                 **attn_kwargs)
        self.mlp_norm = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(),
                                 nn.Linear(mlp_ratio * d_model, d_model))

    def forward(self, x: torch.Tensor, return_penalty: bool = False):
        if self.conv is not None:
            x = x + self.conv(self.conv_norm(x))
        penalty = None
        if return_penalty:
            a, penalty = self.attn(self.attn_norm(x), return_penalty=True)
        else:
            a = self.attn(self.attn_norm(x))
        x = x + a
        x = x + self.mlp(self.mlp_norm(x))
        return x, penalty


class TinyLM(nn.Module):
    """A pre-norm decoder with a tied output head.

    Args:
        vocab_size, d_model, n_layers, num_heads, num_kv_heads: sizes.
        kernel: the attention kernel of every layer (see ``csq_ext.nn``).
        mlp_ratio: hidden width of the MLP in units of d_model.
        short_conv: taps of the short causal convolution in each block (0: none).
        max_seq_len: > 0 adds learned absolute position embeddings for that many positions.
        attn_kwargs: passed to ``CSQAttention`` (shift, learnable_shift, center, normalize,
            eps, tile_size, penalty_window, bias, ...).
    """

    def __init__(self, vocab_size: int, d_model: int = 64, n_layers: int = 2,
                 num_heads: int = 2, num_kv_heads: int | None = None, kernel: str = "csq",
                 mlp_ratio: int = 4, short_conv: int = 4, max_seq_len: int = 0,
                 **attn_kwargs):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos_embed = nn.Embedding(max_seq_len, d_model) if max_seq_len > 0 else None
        self.blocks = nn.ModuleList(
            Block(d_model, num_heads, num_kv_heads, kernel, mlp_ratio, short_conv, attn_kwargs)
            for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, *, return_penalty: bool = False):
        """idx (B, N) int64 -> final hidden states (B, N, d_model), after the last norm;
        with ``return_penalty`` also the mean over layers of the attention layers'
        ``negativity_penalty``. Apply ``head`` to the positions you need logits for."""
        x = self.embed(idx)
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(idx.shape[1], device=idx.device))
        penalties = []
        for block in self.blocks:
            x, p = block(x, return_penalty)
            penalties.append(p)
        h = self.norm(x)
        if return_penalty:
            return h, torch.stack(penalties).mean()
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Tied output projection: hidden (..., d_model) -> logits (..., vocab_size)."""
        return F.linear(h, self.embed.weight)
