"""The gqa-jax layers and reference decoder in Flax NNX, with the linen parameter layout.

- `GroupedQueryAttention` (alias `GroupQueryAttention`), `MultiHeadAttention`,
  `CachedMultiHeadAttention`, `MultiQueryAttention`: ``nnx.Module`` versions
  of the `gqa_jax.modules` layers, built eagerly (``in_features=``,
  ``rngs=nnx.Rngs(...)``), with the same Keras/zeta arguments, the same
  checks and body, and the same parameters.
- `Decoder`: the Llama-style `gqa_jax.models.Decoder` in NNX;
  `gqa_jax.decoding.generate` takes either.
- `linen_params` / `load_linen_params`: one parameter tree for both APIs.

Parameters carry logical axis names (``embed``, ``q_heads``, ``kv_heads``,
``head_dim``, ``mlp``, ``vocab``) for ``nnx.get_partition_spec``.
"""

from gqa_jax.nnx.decoder import Decoder
from gqa_jax.nnx.einsum_dense import EinsumDense
from gqa_jax.nnx.grouped_query_attention import GroupedQueryAttention
from gqa_jax.nnx.multi_head_attention import CachedMultiHeadAttention, MultiHeadAttention
from gqa_jax.nnx.multi_query_attention import MultiQueryAttention
from gqa_jax.nnx.params import linen_params, load_linen_params

GroupQueryAttention = GroupedQueryAttention

__all__ = [
    "CachedMultiHeadAttention",
    "Decoder",
    "EinsumDense",
    "GroupQueryAttention",
    "GroupedQueryAttention",
    "MultiHeadAttention",
    "MultiQueryAttention",
    "linen_params",
    "load_linen_params",
]
