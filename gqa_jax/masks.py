"""Boolean attention masks, ``[B|1, 1, T, S]``, True where a query may attend a key.

Positions follow `gqa_jax.dot_product_attention`: query ``t`` of row ``b`` sits
at ``query_offset[b] + t`` and key ``s`` at ``s``. Each builder returns a mask
that broadcasts against ``[B, N, T, S]``; `combine_masks` joins any of them.

Example::

    mask = combine_masks(
        causal_mask(4, 10, query_offset=jnp.array([6, 3])),
        padding_mask(4, 10, key_value_seq_lengths=jnp.array([10, 7])),
    )  # [2, 1, 4, 10]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.rules import Rules, default_query_offset, normalize_window

Array = jax.Array


def _query_positions(q_len: int, kv_len: int, query_offset) -> Array:
    """Query positions ``[B|1, T]``."""
    if query_offset is None:
        query_offset = default_query_offset(q_len, kv_len)
    offset = jnp.asarray(query_offset, jnp.int32).reshape(-1, 1)
    return offset + jnp.arange(q_len, dtype=jnp.int32)[None, :]


def causal_mask(q_len: int, kv_len: int, query_offset=None) -> Array:
    """Keys at positions up to the query's own.

    Args:
      q_len: query length T.
      kv_len: key length S.
      query_offset: int or int ``[B]`` position of the first query; defaults to
        0 when ``T == S`` and ``S - T`` otherwise (last query sees the last key).

    Returns:
      bool ``[B|1, 1, T, S]``.
    """
    q_pos = _query_positions(q_len, kv_len, query_offset)
    k_pos = jnp.arange(kv_len, dtype=jnp.int32)
    return Rules(q_offset=None, is_causal=True).visible(q_pos[:, :, None], k_pos[None, None, :])[:, None]


def sliding_window_mask(q_len: int, kv_len: int, window, query_offset=None) -> Array:
    """Keys within ``(left, right)`` positions of the query.

    Args:
      q_len: query length T.
      kv_len: key length S.
      window: int (symmetric) or ``(left, right)``: a query at position ``p``
        sees keys in ``[p - left, p + right]``.
      query_offset: as in `causal_mask`.

    Returns:
      bool ``[B|1, 1, T, S]``.
    """
    window = normalize_window(window)
    q_pos = _query_positions(q_len, kv_len, query_offset)
    k_pos = jnp.arange(kv_len, dtype=jnp.int32)
    return Rules(q_offset=None, window=window).visible(q_pos[:, :, None], k_pos[None, None, :])[:, None]


def padding_mask(q_len: int, kv_len: int, query_seq_lengths=None, key_value_seq_lengths=None) -> Array:
    """Valid queries (``t < query_seq_lengths[b]``) against valid keys (``s < key_value_seq_lengths[b]``).

    Args:
      q_len: query length T.
      kv_len: key length S.
      query_seq_lengths: optional int ``[B]``.
      key_value_seq_lengths: optional int ``[B]``.

    Returns:
      bool ``[B|1, 1, T, S]``.
    """
    q_ok = jnp.ones((1, q_len), bool)
    k_ok = jnp.ones((1, kv_len), bool)
    if query_seq_lengths is not None:
        q_ok = jnp.arange(q_len)[None, :] < jnp.asarray(query_seq_lengths)[:, None]
    if key_value_seq_lengths is not None:
        k_ok = jnp.arange(kv_len)[None, :] < jnp.asarray(key_value_seq_lengths)[:, None]
    return (q_ok[:, :, None] & k_ok[:, None, :])[:, None]


def segment_mask(q_segment_ids, kv_segment_ids) -> Array:
    """Queries and keys of the same packed sequence.

    Args:
      q_segment_ids: int ``[B, T]``.
      kv_segment_ids: int ``[B, S]``.

    Returns:
      bool ``[B, 1, T, S]``.
    """
    q_segment_ids = jnp.asarray(q_segment_ids)
    kv_segment_ids = jnp.asarray(kv_segment_ids)
    return (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]


def combine_masks(*masks) -> Array | None:
    """Logical AND of the masks that are not None (None when all are None)."""
    masks = [m for m in masks if m is not None]
    if not masks:
        return None
    out = masks[0]
    for m in masks[1:]:
        out = jnp.logical_and(out, m)
    return out
