"""Key/value head repetition (the Keras reference) and query grouping (the hot path).

Grouped-query attention shares each of the ``K`` key/value heads among
``G = N // K`` query heads. Query head ``n`` reads key/value head ``n // G``,
which is the order `repeat_kv` produces and the order `group_queries` splits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def repeat_kv(x_BSKH: Array, num_groups: int) -> Array:
    """Repeats each key/value head ``num_groups`` times, as Keras does.

    Args:
      x_BSKH: ``[B, S, K, H]``.
      num_groups: ``G = N // K``.

    Returns:
      ``[B, S, K * G, H]`` where head ``n`` is a copy of head ``n // G``.
    """
    if x_BSKH.ndim != 4:
        raise ValueError(f"x_BSKH must have rank 4 [B,S,K,H], got x_BSKH.shape={tuple(x_BSKH.shape)}")
    if not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive int, got {num_groups=}")
    return jnp.repeat(x_BSKH, num_groups, axis=2)


def group_queries(q_BTNH: Array, num_kv_heads: int) -> Array:
    """Splits the query heads into ``[K, G]`` groups.

    Args:
      q_BTNH: ``[B, T, N, H]``.
      num_kv_heads: ``K``; must divide ``N``.

    Returns:
      ``[B, T, K, G, H]`` with ``G = N // K``.
    """
    if q_BTNH.ndim != 4:
        raise ValueError(f"q_BTNH must have rank 4 [B,T,N,H], got q_BTNH.shape={tuple(q_BTNH.shape)}")
    B, T, N, H = q_BTNH.shape
    if num_kv_heads < 1 or N % num_kv_heads:
        raise ValueError(f"num_heads N={N} must be a multiple of {num_kv_heads=}")
    return q_BTNH.reshape(B, T, num_kv_heads, N // num_kv_heads, H)


def ungroup_queries(x_BTKGH: Array) -> Array:
    """Inverse of `group_queries`: ``[B, T, K, G, H] -> [B, T, K * G, H]``."""
    if x_BTKGH.ndim != 5:
        raise ValueError(f"x_BTKGH must have rank 5 [B,T,K,G,H], got x_BTKGH.shape={tuple(x_BTKGH.shape)}")
    B, T, K, G, H = x_BTKGH.shape
    return x_BTKGH.reshape(B, T, K * G, H)
