"""Flax's decode mode over a `gqa_jax.KVCache`: append any number of tokens per row, attend over the cache.

The linen layers keep the cache in the ``"cache"`` collection, the NNX layers
as ``nnx.Cache`` state; both hold the same three arrays, ``cached_key [B, S,
K, H]``, ``cached_value [B, S, K, Hv]`` and ``cache_index`` int32 ``[B]``, and
call `decode_attention` between reading and writing them (`linen_decode`,
`nnx_decode`). A caller that keeps the cache itself (a model's generation
loop) passes a `gqa_jax.KVCache` to the layer's call instead
(`KVCacheAttend`), and gets the updated cache back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gqa_jax.attention import dot_product_attention
from gqa_jax.kv_cache import KVCache
from gqa_jax.paged_kv_cache import PagedKVCache
from gqa_jax.modules.checks import check_bool

Array = jax.Array


def decode_attention(cache: KVCache, q, k, v, *, num_new, mask, **options) -> tuple[Array, KVCache]:
    """Writes the new keys/values after each row's cached tokens, then attends the queries over the cache.

    Args:
      cache: the layer's cache (capacity ``S``).
      q: ``[B, T, N, H]``; query ``t`` of row ``b`` sits at ``cache.lengths[b] + t``.
      k, v: ``[B, T, K, H]``, ``[B, T, K, Hv]``: the new tokens.
      num_new: None (all ``T``) or int ``[B]``: valid new tokens per row; the
        rest is padding, neither written nor attending.
      mask: bool mask over the cache's ``S`` positions, or None.
      **options: keywords of `gqa_jax.dot_product_attention` (a
        ``query_offset`` among them is dropped: the cache knows the positions).

    Returns:
      ``(out [B, T, N, Hv], updated cache)``.
    """
    cache = cache.update(k, v, num_new=num_new)
    options = {name: value for name, value in options.items() if name != "query_offset"}
    return cache.attend(q, num_new=num_new, mask=mask, **options), cache


def check_decode_arguments(decode: bool, cache, num_new) -> None:
    """Raises for a ``cache=`` in decode mode, or ``num_new`` without decode mode or a `KVCache`.

    ``TypeError``: a non-bool ``decode``; ``ValueError`` otherwise.
    """
    check_bool("decode", decode)
    if decode and cache is not None:
        raise ValueError(
            "decode=True keeps its own cache (linen: the 'cache' collection, NNX: nnx.Cache state); do not pass cache="
        )
    if num_new is not None and not decode and not isinstance(cache, CACHE_TYPES):
        raise ValueError(
            f"num_new is for decode=True or a cache=KVCache, got decode=False, cache={type(cache).__name__} "
            f"and {num_new=}"
        )


# The caches a layer call takes as ``cache=`` and writes after their own lengths.
CACHE_TYPES = (KVCache, PagedKVCache)


def check_kv_cache(cache: KVCache | PagedKVCache, cache_update_index, *, batch_size: int, num_kv_heads: int, head_dim: int) -> None:
    """Raises ``ValueError`` for a `KVCache` that does not fit the layer's heads and the call's batch, or with an index.

    The cache knows where the new tokens go (after ``cache.lengths``), so a
    ``cache_update_index`` (keras-hub's array cache) is refused with it.
    """
    if cache_update_index is not None:
        raise ValueError(
            "a KVCache writes after its own lengths: got cache_update_index with it "
            f"({cache_update_index=}); use num_new for ragged rows"
        )
    B = cache.lengths.shape[0]
    K, H = (cache.key_pages if isinstance(cache, PagedKVCache) else cache.key).shape[2:]
    if (B, K, H) != (batch_size, num_kv_heads, head_dim):
        raise ValueError(
            f"the {type(cache).__name__} must have batch {batch_size}, {num_kv_heads} KV heads and head dim "
            f"{head_dim} for this layer and call, got batch {B}, {K} KV heads, head dim {H}"
        )


class KVCacheAttend:
    """The ``attend`` of a layer's call with a caller's `KVCache`: `decode_attention`, keeping the updated cache.

    Attributes:
      cache: the cache given to the call; after the call, the updated one
        (the new tokens written after each row's ``lengths``).
      num_new: None (all ``T``) or int ``[B]`` valid new tokens per row.
    """

    def __init__(self, cache: KVCache, num_new):
        self.cache, self.num_new = cache, num_new

    def __call__(self, q, k, v, *, mask, **options) -> Array:
        result, self.cache = decode_attention(self.cache, q, k, v, num_new=self.num_new, mask=mask, **options)
        return result


def linen_cache_index(module) -> Array | int:
    """Tokens already in a linen layer's ``"cache"`` collection (int32 ``[B]``), or 0 before it exists."""
    if module.has_variable("cache", "cache_index"):
        return module.get_variable("cache", "cache_index")
    return 0


def linen_decode(module, q, k, v, *, num_new, mask, **options) -> Array:
    """Decode mode of a linen layer: append to its ``"cache"`` collection, attend over it.

    ``init`` (no cache yet) allocates the cache with the inputs' length as
    capacity and attends without it. ``options``: keywords of
    `gqa_jax.dot_product_attention`.
    """
    initialized = module.has_variable("cache", "cached_key")
    cached_key = module.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
    cached_value = module.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
    cache_index = module.variable("cache", "cache_index", jnp.zeros, k.shape[:1], jnp.int32)
    if not initialized:
        return dot_product_attention(q, k, v, mask=mask, **options)
    cache = KVCache(cached_key.value, cached_value.value, cache_index.value)
    result, cache = decode_attention(cache, q, k, v, num_new=num_new, mask=mask, **options)
    cached_key.value, cached_value.value, cache_index.value = cache.key, cache.value, cache.lengths
    return result


def nnx_decode(layer, q, k, v, *, num_new, mask, **options) -> Array:
    """Decode mode of an NNX layer: append to its ``nnx.Cache`` state (after ``init_cache``), attend over it."""
    if layer.cached_key is None:
        raise ValueError("decode=True needs a cache: call init_cache(batch_size=..., max_length=...) first")
    if layer.cached_key.shape[0] != q.shape[0]:
        raise ValueError(
            f"the cache holds batch_size={layer.cached_key.shape[0]} rows, got query.shape[0]={q.shape[0]}"
        )
    cache = KVCache(layer.cached_key[...], layer.cached_value[...], layer.cache_index[...])
    result, cache = decode_attention(cache, q, k, v, num_new=num_new, mask=mask, **options)
    layer.cached_key[...], layer.cached_value[...], layer.cache_index[...] = cache.key, cache.value, cache.lengths
    return result


def nnx_cache_index(layer) -> Array | int:
    """Tokens already in an NNX layer's cache (int32 ``[B]``), or 0 without one."""
    return 0 if layer.cache_index is None else layer.cache_index[...]
