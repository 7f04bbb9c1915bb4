"""Flax linen layers that reproduce the attention layers people port from.

- `GroupedQueryAttention` (alias `GroupQueryAttention`): Keras ``GroupQueryAttention``,
  plus keras-hub caches and Flax ``decode=True`` with multi-token writes.
- `MultiHeadAttention`: Keras ``MultiHeadAttention`` (any rank, ``attention_axes``).
- `CachedMultiHeadAttention`: keras-hub ``CachedMultiHeadAttention``.
- `MultiQueryAttention`: zeta / llm-foundry ``MultiQueryAttention``.

All of them call `gqa_jax.dot_product_attention`, so every implementation
(kernels included) serves every layer.
"""

from gqa_jax.modules.cached_multi_head_attention import CachedMultiHeadAttention
from gqa_jax.modules.einsum_dense import EinsumDense
from gqa_jax.modules.grouped_query_attention import GroupedQueryAttention, GroupQueryAttention
from gqa_jax.modules.initializers import keras_initializer
from gqa_jax.modules.multi_head_attention import MultiHeadAttention
from gqa_jax.modules.multi_query_attention import MultiQueryAttention

__all__ = [
    "CachedMultiHeadAttention",
    "EinsumDense",
    "GroupQueryAttention",
    "GroupedQueryAttention",
    "MultiHeadAttention",
    "MultiQueryAttention",
    "keras_initializer",
]
