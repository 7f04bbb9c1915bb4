"""Position and mask rules shared by every attention kernel (and by gqa_jax).

Positions: query ``t`` of batch row ``b`` sits at ``query_offset[b] + t``; key
``s`` sits at ``s``. A key is visible to a query when every rule that is on
agrees:

* causal: ``key_pos <= query_pos``;
* window ``(left, right)``: ``query_pos - left <= key_pos <= query_pos + right``;
* lengths: ``t < query_seq_lengths[b]`` and ``s < key_value_seq_lengths[b]``;
* segments: ``q_segment_ids[b, t] == kv_segment_ids[b, s]``.

The functions here take and return plain ``jax.numpy`` values so that the same
code runs in the XLA path, in Triton kernels and in Mosaic TPU kernels.
"""

from __future__ import annotations

import jax.numpy as jnp

# Finite stand-in for -inf in kernels: exp(MASK_VALUE - m) underflows to 0
# without the inf - inf = NaN hazard of a real -inf.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def default_query_offset(q_len, kv_len, query_seq_lengths=None, key_value_seq_lengths=None):
    """The query offset used when positions matter and none is given.

    With ``T == S`` queries and keys share positions (self-attention): offset 0,
    which is what ``jax.nn.dot_product_attention(is_causal=True)`` does. With
    ``T != S`` (chunked prefill, cached decoding) the last valid query is aligned
    with the last valid key: ``kv_len[b] - q_len[b]`` (bottom-right).

    Args:
      q_len: static query length T.
      kv_len: static key length S.
      query_seq_lengths: optional int32 ``[B]`` valid query counts.
      key_value_seq_lengths: optional int32 ``[B]`` valid key counts.

    Returns:
      An int32 scalar or ``[B]`` array of offsets.
    """
    if q_len == kv_len:
        return jnp.zeros((), jnp.int32)
    valid_q = q_len if query_seq_lengths is None else query_seq_lengths
    valid_kv = kv_len if key_value_seq_lengths is None else key_value_seq_lengths
    return (jnp.asarray(valid_kv, jnp.int32) - jnp.asarray(valid_q, jnp.int32)).astype(jnp.int32)


def visible(
    q_pos,
    k_pos,
    *,
    causal: bool,
    window: tuple[int, int] | None,
):
    """Positional visibility of keys at ``k_pos`` to queries at ``q_pos``.

    Args:
      q_pos: int array of query positions, broadcastable against ``k_pos``.
      k_pos: int array of key positions.
      causal: apply ``k_pos <= q_pos``.
      window: optional ``(left, right)`` window sizes.

    Returns:
      A boolean array, or ``None`` when no positional rule is on.
    """
    mask = None
    if causal:
        mask = k_pos <= q_pos
    if window is not None:
        left, right = window
        in_window = (k_pos >= q_pos - left) & (k_pos <= q_pos + right)
        mask = in_window if mask is None else mask & in_window
    return mask


def kv_range(q_first, q_last, *, causal: bool, window: tuple[int, int] | None, kv_len):
    """Half-open range ``[lo, hi)`` of key positions any query in a tile can see.

    Kernels use it to skip key tiles that are fully masked for a tile of
    queries whose positions run from ``q_first`` to ``q_last`` (inclusive).

    Args:
      q_first: position of the tile's first query (int scalar).
      q_last: position of the tile's last query (int scalar).
      causal: whether the causal rule is on.
      window: optional ``(left, right)`` window sizes.
      kv_len: number of valid keys (int scalar); keys at or past it are masked.

    Returns:
      ``(lo, hi)`` int32 scalars with ``0 <= lo`` and ``hi <= kv_len``; the
      range is empty when ``hi <= lo``.
    """
    lo = jnp.zeros((), jnp.int32)
    hi = jnp.asarray(kv_len, jnp.int32)
    if causal:
        hi = jnp.minimum(hi, q_last + 1)
    if window is not None:
        left, right = window
        lo = jnp.maximum(lo, q_first - left)
        hi = jnp.minimum(hi, q_last + right + 1)
    return lo.astype(jnp.int32), hi.astype(jnp.int32)


def q_range(k_first, k_last, *, causal: bool, window: tuple[int, int] | None, query_offset, q_len):
    """Half-open range ``[lo, hi)`` of query *indices* that can see any key in a tile.

    The backward's key/value-tile loops use it to skip query tiles that see no
    key of the tile whose positions run from ``k_first`` to ``k_last``.

    Args:
      k_first: position of the tile's first key (int scalar).
      k_last: position of the tile's last key (int scalar).
      causal: whether the causal rule is on.
      window: optional ``(left, right)`` window sizes.
      query_offset: position of query index 0 (int scalar).
      q_len: number of valid queries (int scalar).

    Returns:
      ``(lo, hi)`` int32 scalars, ``0 <= lo``, ``hi <= q_len``.
    """
    lo = jnp.zeros((), jnp.int32)
    hi = jnp.asarray(q_len, jnp.int32)
    if causal:
        lo = jnp.maximum(lo, k_first - query_offset)
    if window is not None:
        left, right = window
        lo = jnp.maximum(lo, k_first - right - query_offset)
        hi = jnp.minimum(hi, k_last + left + 1 - query_offset)
    return lo.astype(jnp.int32), hi.astype(jnp.int32)
