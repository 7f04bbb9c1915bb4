"""Key/value caches for autoregressive decoding.

`KVCache` is a fixed-capacity pytree (``key``/``value`` ``[B, S, K, H]`` and
``lengths`` int32 ``[B]``) that takes writes of any number of tokens per step,
at each row's own length, so ragged batches and chunked prefill work.
`splice_cache` is the same write for keras-hub-style caches indexed by the
caller.

Capacity: a write never wraps around or overwrites earlier tokens. Where the
write position and count are known at trace time (eager code, Python ints), a
write past capacity raises ``ValueError``. Under ``jit`` the tokens that do not
fit are dropped and ``KVCache.lengths`` still counts them, so
``KVCache.overflowed`` reports the rows that lost tokens; attention reads at
most ``capacity`` keys.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from gqa_jax.attention import dot_product_attention
from gqa_jax.request import concrete_value
from pallas_kernels.arguments import row_vector

Array = jax.Array


def splice_cache(cache, new, index, *, num_new=None) -> Array:
    """Writes ``new`` into ``cache`` along axis 1 at ``index`` (scalar or per row).

    Args:
      cache: ``[B, S, ...]``.
      new: ``[B, T, ...]`` with the same trailing dims.
      index: int scalar (every row) or int ``[B]``: where row ``b``'s first new
        token goes.
      num_new: optional int ``[B]`` (or scalar): how many of the ``T`` new tokens
        of each row to write (the rest are padding); default all ``T``.

    Returns:
      The updated cache (same shape and dtype). Positions outside ``[0, S)``
      are never written.

    Raises:
      ValueError: if shapes differ, or ``index``/``num_new`` are concrete and a
        write would fall outside ``[0, S)``.
    """
    cache, new = jnp.asarray(cache), jnp.asarray(new)
    if cache.ndim < 2 or new.ndim != cache.ndim:
        raise ValueError(f"cache [B,S,...] and new [B,T,...] must have one rank >= 2, got {cache.shape=}, {new.shape=}")
    if new.shape[0] != cache.shape[0] or new.shape[2:] != cache.shape[2:]:
        raise ValueError(
            f"new [B,T,...] must match cache [B,S,...] except on axis 1, got {cache.shape=}, {new.shape=}"
        )
    B, S = cache.shape[:2]
    T = new.shape[1]
    index = row_vector("index", index, B)
    count = jnp.full((B,), T, jnp.int32) if num_new is None else row_vector("num_new", num_new, B)
    index_value, count_value = concrete_value(index), concrete_value(count)
    if count_value is not None and ((count_value < 0) | (count_value > T)).any():
        raise ValueError(f"num_new must be in [0, T={T}], got num_new={count_value.tolist()}")
    if index_value is not None and count_value is not None:
        if (index_value < 0).any() or (index_value + count_value > S).any():
            raise ValueError(
                f"writing {count_value.tolist()} tokens at index={index_value.tolist()} exceeds the cache "
                f"capacity S={S}; positions must stay in [0, {S})"
            )
    t = jnp.arange(T, dtype=jnp.int32)[None, :]
    pos = index[:, None] + t
    pos = jnp.where((t < count[:, None]) & (pos >= 0), pos, S)  # S is out of range: dropped
    rows = jnp.arange(B)[:, None]
    return cache.at[rows, pos].set(new.astype(cache.dtype), mode="drop")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """A fixed-capacity key/value cache with per-row lengths.

    Attributes:
      key: ``[B, S, K, H]``.
      value: ``[B, S, K, Hv]``.
      lengths: int32 ``[B]`` tokens written per row (may exceed ``S`` after an
        overflow under jit; see the module docstring).

    Example::

        cache = KVCache.init(batch_size=2, max_length=64, num_kv_heads=2, head_dim=16)
        cache = cache.update(k_prompt, v_prompt, num_new=prompt_lengths)  # ragged prefill
        out = cache.attend(q_prompt, num_new=prompt_lengths)              # causal over the cache
    """

    key: Array
    value: Array
    lengths: Array

    @classmethod
    def init(
        cls,
        batch_size: int,
        max_length: int,
        num_kv_heads: int,
        head_dim: int,
        dtype=jnp.float32,
        *,
        value_head_dim: int | None = None,
    ) -> "KVCache":
        """An empty cache of capacity ``max_length``."""
        for name, v in (("batch_size", batch_size), ("max_length", max_length), ("num_kv_heads", num_kv_heads),
                        ("head_dim", head_dim)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {name}={v!r}")
        value_head_dim = head_dim if value_head_dim is None else value_head_dim
        return cls(
            key=jnp.zeros((batch_size, max_length, num_kv_heads, head_dim), dtype),
            value=jnp.zeros((batch_size, max_length, num_kv_heads, value_head_dim), dtype),
            lengths=jnp.zeros((batch_size,), jnp.int32),
        )

    @property
    def capacity(self) -> int:
        """``S``, the most tokens a row can hold."""
        return self.key.shape[1]

    @property
    def overflowed(self) -> Array:
        """bool ``[B]``: rows that were written past capacity (tokens dropped)."""
        return self.lengths > self.capacity

    def update(self, key_new, value_new, *, num_new=None) -> "KVCache":
        """Appends ``T`` tokens per row at each row's current length.

        Args:
          key_new: ``[B, T, K, H]``.
          value_new: ``[B, T, K, Hv]``.
          num_new: optional int ``[B]`` valid tokens per row (right padding is
            not written); default ``T``.

        Returns:
          The new cache; ``lengths`` advanced by ``num_new``.
        """
        key_new, value_new = jnp.asarray(key_new), jnp.asarray(value_new)
        if key_new.shape[:2] != value_new.shape[:2]:
            raise ValueError(f"key_new and value_new [B,T,...] differ: {key_new.shape=}, {value_new.shape=}")
        B, T = key_new.shape[:2]
        count = jnp.full((B,), T, jnp.int32) if num_new is None else row_vector("num_new", num_new, B)
        return KVCache(
            key=splice_cache(self.key, key_new, self.lengths, num_new=count),
            value=splice_cache(self.value, value_new, self.lengths, num_new=count),
            lengths=self.lengths + count,
        )

    def attend(self, query, *, num_new=None, is_causal: bool = True, **kwargs):
        """Attention of the newest ``T`` tokens' queries over the cache.

        Call it after `update` with the same ``num_new``: query ``t`` of row
        ``b`` sits at position ``lengths[b] - num_new[b] + t``, and sees the
        first ``lengths[b]`` keys (causally by default).

        Args:
          query: ``[B, T, N, H]``.
          num_new: optional int ``[B]`` valid queries per row; default ``T``.
          is_causal: the causal rule (default True).
          **kwargs: any other keyword of `gqa_jax.dot_product_attention`
            (``implementation``, ``local_window_size``, ``logits_soft_cap`` ...).

        Returns:
          ``[B, T, N, Hv]``; padded queries give zeros.
        """
        query = jnp.asarray(query)
        if query.ndim != 4:
            raise ValueError(f"query must have rank 4 [B,T,N,H], got query.shape={tuple(query.shape)}")
        B, T = query.shape[:2]
        count = jnp.full((B,), T, jnp.int32) if num_new is None else row_vector("num_new", num_new, B)
        positional = is_causal or kwargs.get("local_window_size") is not None
        return dot_product_attention(
            query,
            self.key,
            self.value,
            is_causal=is_causal,
            query_offset=self.lengths - count if positional else None,
            query_seq_lengths=None if num_new is None else count,
            key_value_seq_lengths=jnp.minimum(self.lengths, self.capacity),
            **kwargs,
        )
