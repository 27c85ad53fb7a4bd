"""csq_ext: CSQ (Centered Shifted-Quadratic) attention as a PyTorch operator.

``csq_ext.attention(q, k, v, ...)`` is the public entry; ``csq_ext.scaled_dot_product_attention``
the same with the call of ``torch.nn.functional.scaled_dot_product_attention``;
``csq_ext.reference`` holds the O(N^2) definition it is tested against.
"""
from ._calibrate import calibrate
from .attention import attention, decode, decode_
from .nn import CSQAttention
from .penalty import negativity_penalty
from .pool import pool_decode_, pool_prefill_
from .reference import csq_attention_reference
from .sdpa import scaled_dot_product_attention
from .state import CSQState

__all__ = ["attention", "decode", "decode_", "CSQState", "csq_attention_reference",
           "CSQAttention", "negativity_penalty", "scaled_dot_product_attention", "calibrate",
           "pool_prefill_", "pool_decode_"]
__version__ = "0.1.0"
