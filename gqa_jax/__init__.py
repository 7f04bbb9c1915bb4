"""gqa-jax: grouped-query attention for JAX and Flax.

Layout is BTNH everywhere: query ``[B, T, N, H]``, key/value ``[B, S, K, H]``
with ``N % K == 0``. See `dot_product_attention` for the semantics.
"""

from gqa_jax.attention import dot_product_attention
from gqa_jax.dispatch import current_platform, implementations, register_implementation
from gqa_jax.heads import group_queries, repeat_kv, ungroup_queries
from gqa_jax.interop import keras_params
from gqa_jax.kv_cache import KVCache, splice_cache
from gqa_jax.masks import causal_mask, combine_masks, padding_mask, segment_mask, sliding_window_mask
from gqa_jax.modules import (
    CachedMultiHeadAttention,
    GroupedQueryAttention,
    GroupQueryAttention,
    MultiHeadAttention,
    MultiQueryAttention,
)
from gqa_jax.paged_kv_cache import PagedKVCache
from gqa_jax.projection import project_heads, project_output
from gqa_jax.quantization import dequantize, quantize
from gqa_jax.request import AttentionRequest, make_request
from gqa_jax.rope import LinearRopeScaling, Llama3RopeScaling, RotaryEmbedding, apply_rope, rope_frequencies

__version__ = "0.1.0"

__all__ = [
    "AttentionRequest",
    "CachedMultiHeadAttention",
    "GroupQueryAttention",
    "GroupedQueryAttention",
    "KVCache",
    "LinearRopeScaling",
    "Llama3RopeScaling",
    "MultiHeadAttention",
    "MultiQueryAttention",
    "PagedKVCache",
    "RotaryEmbedding",
    "__version__",
    "apply_rope",
    "causal_mask",
    "combine_masks",
    "current_platform",
    "dequantize",
    "dot_product_attention",
    "group_queries",
    "implementations",
    "keras_params",
    "make_request",
    "padding_mask",
    "project_heads",
    "project_output",
    "quantize",
    "register_implementation",
    "repeat_kv",
    "rope_frequencies",
    "segment_mask",
    "sliding_window_mask",
    "splice_cache",
    "ungroup_queries",
]
