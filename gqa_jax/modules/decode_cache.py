"""Flax's decode mode over a `gqa_jax.KVCache`: append any number of tokens per row, attend over the cache.

The linen layers keep the cache in the ``"cache"`` collection, the NNX layers
as ``nnx.Cache`` state; both hold the same three arrays, ``cached_key [B, S,
K, H]``, ``cached_value [B, S, K, Hv]`` and ``cache_index`` int32 ``[B]``, and
call `decode_attention` between reading and writing them.
"""

from __future__ import annotations

import jax

from gqa_jax.kv_cache import KVCache

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
