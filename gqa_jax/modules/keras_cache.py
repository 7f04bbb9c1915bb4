"""keras-hub's key/value cache ``[B, 2, S, heads, H]`` and its three modes.

``cache=None``: no cache. ``cache`` without ``cache_update_index``: attend to
the cached keys/values as they are (new keys/values are not computed).
``cache`` with ``cache_update_index``: splice the new keys/values into the
cache at the index (a scalar, or one per row ``[B]`` for ragged batches) with
`gqa_jax.splice_cache`, then attend to the whole cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gqa_jax.kv_cache import splice_cache

Array = jax.Array


def check_cache(cache, *, batch_size: int, num_heads: int, head_dim: int, heads_letter: str) -> Array:
    """``cache`` as an array after checking it is ``[B, 2, S, heads, H]``."""
    cache = jnp.asarray(cache)
    if cache.ndim != 5 or cache.shape[:2] != (batch_size, 2) or cache.shape[3:] != (num_heads, head_dim):
        raise ValueError(
            f"cache must have shape [B,2,S,{heads_letter},H]=({batch_size}, 2, S, {num_heads}, {head_dim}), "
            f"got cache.shape={tuple(cache.shape)}"
        )
    return cache


def cached_key_value(cache: Array, cache_update_index, key_new: Array | None, value_new: Array | None):
    """Keys and values to attend to, and the cache to return.

    Args:
      cache: ``[B, 2, S, heads, H]`` (keys at ``[:, 0]``, values at ``[:, 1]``).
      cache_update_index: None (attend to the cache as is), or an int scalar /
        int ``[B]`` where the new tokens go.
      key_new, value_new: ``[B, T, heads, H]`` (ignored without an index).

    Returns:
      ``(key [B,S,heads,H], value [B,S,heads,H], cache [B,2,S,heads,H])``.

    Raises:
      ValueError: a concrete index that writes outside ``[0, S)``.
    """
    if cache_update_index is None:
        return cache[:, 0], cache[:, 1], cache
    key = splice_cache(cache[:, 0], key_new, cache_update_index)
    value = splice_cache(cache[:, 1], value_new, cache_update_index)
    return key, value, jnp.stack([key, value], axis=1)
