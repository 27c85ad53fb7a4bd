"""CSQCache: a transformers ``Cache`` that holds one ``CSQState`` per layer instead of keys and
values, so generation carries a state of constant size whatever the generated length.

transformers updates the cache *before* it calls the attention function, and the attention
function only sees what ``update`` returns. So ``update`` keeps nothing: it returns the new
keys and values as they are, tagged with their cache layer, and the "csq" attention function
(csq_ext.hf.attention) hands them back to :meth:`CSQCacheLayer.attend`, which prefills with
``csq_ext.attention(..., return_state=True)`` and decodes one token with the in-place
``csq_ext.decode_``. A layer whose update was not followed by csq attention raises at its next
update, so a model running another attention function cannot silently drop the past.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..attention import attention, decode_
from ..packing import run_packed
from .attention import runs_csq


class CSQCacheLayer(CacheLayerMixin):
    """One layer's CSQ state: ``state`` is a ``csq_ext.CSQState`` with one entry per batch row
    (None before the prefill); ``length`` counts the positions seen, padding included."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, **kwargs):
        super().__init__()
        self.state = None
        self.length = 0
        self.layer_idx = None
        self._pending = False  # update() ran, attend() not yet
        self._out = None       # decode_'s output buffer, reused every step

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if self._pending:
            raise RuntimeError(
                f"CSQCache layer {self.layer_idx}: the keys and values of the previous forward "
                "never reached csq attention. A CSQCache keeps no keys or values; run the model "
                "with attn_implementation='csq' (csq_ext.hf.register(), then "
                "model.set_attn_implementation('csq'))")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._pending = True
        key_states._csq_cache_layer = self  # read by csq_attention_forward
        return key_states, value_states

    def attend(self, query, key, value, keep, options) -> torch.Tensor:
        """CSQ attention of the new tokens over the past and themselves; updates the state.
        ``keep``: None or the (B, N) bool mask of real tokens (padding joins no state).
        Returns (B, N, Hq, Dv)."""
        self._pending = False
        n = key.shape[2]
        grad = torch.is_grad_enabled() and any(
            isinstance(t, torch.Tensor) and t.requires_grad
            for t in (query, key, value, options["shift"]))
        if self.state is not None and n == 1 and keep is None and not grad:
            want = (query.shape[0], query.shape[1], 1, value.shape[3])
            if self._out is None or tuple(self._out.shape) != want or self._out.dtype != query.dtype:
                self._out = query.new_empty(want)
            y = decode_(query, key, value, self.state, out=self._out, **options).transpose(1, 2)
        else:
            options = dict(options, causal=True, initial_state=self.state, return_state=True)
            if keep is None:
                y, self.state = attention(query, key, value, **options)
                y = y.transpose(1, 2)
            else:
                y, self.state = run_packed(query, key, value, keep, None, **options)
        self.length += n
        return y

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The attention function sees only the new tokens as keys; the past is in the state.
        return query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state, self.length, self._pending, self._out = None, 0, False, None
        self.is_initialized = False

    def _select(self, index: torch.Tensor) -> None:
        if self.state is not None:
            index = index.to(self.state.sums.device)
            self.state = type(self.state)(self.state.sums.index_select(0, index),
                                          self.state.ref.index_select(0, index))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i takes the state of row beam_idx[i]."""
        self._select(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            rows = torch.arange(self.state.sums.shape[0], device=self.state.sums.device)
            self._select(rows.repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.state is not None:
            rows = torch.arange(self.state.sums.shape[0], device=self.state.sums.device)
            self._select(rows[indices])

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise NotImplementedError(
                "CSQCache cannot remove tokens: its state is a sum over all past tokens, the "
                "tokens themselves are not kept (assisted / speculative decoding needs crop)")

    @property
    def nbytes(self) -> int:
        s = self.state
        return 0 if s is None else s.sums.nbytes + s.ref.nbytes


class CSQCache(Cache):
    """A transformers Cache for CSQ attention: per layer a ``CSQState`` of
    ``Hk * (F * (Dv + 1) + Dk)`` numbers per sequence (``F = Dk (Dk + 1) / 2 + Dk + 1``),
    constant in the sequence length, instead of a growing KV cache.

    ``model.generate(..., past_key_values=CSQCache(model.config))``. The model must run csq
    attention (``attn_implementation="csq"``). Beam search (``reorder_cache``), batch expansion
    and selection work; ``crop`` (assisted decoding) is refused. Prompts of different lengths
    in a batch: left or right padding is exact (padded positions join no state).
    """

    def __init__(self, config=None, **kwargs):
        num_layers = None
        if config is not None:
            num_layers = config.get_text_config(decoder=True).num_hidden_layers
        if num_layers:
            super().__init__(layers=[CSQCacheLayer() for _ in range(num_layers)], **kwargs)
        else:
            super().__init__(layer_class_to_replicate=CSQCacheLayer, **kwargs)
        self.config = config

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if self.config is not None and not runs_csq(self.config):
            raise RuntimeError(
                f"CSQCache needs csq attention, but the model runs "
                f"{getattr(self.config, '_attn_implementation', None)!r}: call "
                "csq_ext.hf.register() and model.set_attn_implementation('csq')")
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        self.layers[layer_idx].layer_idx = layer_idx
        return keys, values

    @property
    def nbytes(self) -> int:
        """Bytes held by the states of all layers."""
        return sum(layer.nbytes for layer in self.layers)
