"""Key/value head repetition (the Keras reference) and query grouping (the hot path).

Grouped-query attention shares each of the ``K`` key/value heads among
``G = N // K`` query heads. Query head ``n`` reads key/value head ``n // G``,
which is the order `repeat_kv` produces and the order `group_queries` splits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def repeat_kv(x: Array, num_groups: int) -> Array:
    """Repeats each key/value head ``num_groups`` times, as Keras does.

    Args:
      x: keys or values ``[B, S, K, H]``.
      num_groups: ``G = N // K``.

    Returns:
      ``[B, S, K * G, H]`` where head ``n`` is a copy of head ``n // G``.
    """
    if x.ndim != 4:
        raise ValueError(f"x must have rank 4 [B,S,K,H], got x.shape={tuple(x.shape)}")
    if not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive int, got {num_groups=}")
    return jnp.repeat(x, num_groups, axis=2)


def group_queries(query: Array, num_kv_heads: int) -> Array:
    """Splits the query heads into ``[K, G]`` groups.

    Args:
      query: ``[B, T, N, H]``.
      num_kv_heads: ``K``; must divide ``N``.

    Returns:
      ``[B, T, K, G, H]`` with ``G = N // K``.
    """
    if query.ndim != 4:
        raise ValueError(f"query must have rank 4 [B,T,N,H], got query.shape={tuple(query.shape)}")
    B, T, N, H = query.shape
    if num_kv_heads < 1 or N % num_kv_heads:
        raise ValueError(f"num_heads N={N} must be a multiple of {num_kv_heads=}")
    return query.reshape(B, T, num_kv_heads, N // num_kv_heads, H)


def ungroup_queries(x: Array) -> Array:
    """Inverse of `group_queries`: ``[B, T, K, G, H] -> [B, T, K * G, H]``."""
    if x.ndim != 5:
        raise ValueError(f"x must have rank 5 [B,T,K,G,H], got x.shape={tuple(x.shape)}")
    B, T, K, G, H = x.shape
    return x.reshape(B, T, K * G, H)
