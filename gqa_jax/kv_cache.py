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

Quantized caches: ``KVCache.init(..., dtype=jnp.int8)`` (or
``jnp.float8_e4m3fn``) stores keys and values in that dtype with float32
scales ``[B, S, K]``, one per token per KV head (symmetric absmax,
`gqa_jax.quantization.quantize`); `KVCache.update` quantizes the new tokens and
`KVCache.attend` hands values and scales to `gqa_jax.dot_product_attention`,
which never dequantizes the whole cache (the Triton and TPU decode kernels
dequantize tiles in registers; XLA in its products).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from gqa_jax.attention import dot_product_attention
from gqa_jax.quantization import is_quantized_dtype, quantize
from gqa_jax.request import concrete_value
from pallas_kernels.arguments import positive_int, row_vector

Array = jax.Array


def check_same_kind(*named_arrays) -> None:
    """Raises ``TypeError`` unless every ``(name, array)`` is floating, or every one is integer.

    Writes cast to the cache's dtype (a float32 key into a bfloat16 cache is
    rounded); a float into an integer cache, or integers into a float one,
    would change the values silently and is refused.
    """
    kinds = {name: "floating" if jnp.issubdtype(x.dtype, jnp.floating) else
             "integer" if jnp.issubdtype(x.dtype, jnp.integer) else str(x.dtype) for name, x in named_arrays}
    if len(set(kinds.values())) > 1 or not set(kinds.values()) <= {"floating", "integer"}:
        got = ", ".join(f"{name}.dtype={x.dtype}" for name, x in named_arrays)
        raise TypeError(f"cache writes need floating (or integer) arrays on both sides, got {got}")


def check_cache_dtype(dtype) -> bool:
    """Whether a cache of ``dtype`` is quantized (int8, float8_e4m3fn); raises ``TypeError`` unless it is that or
    floating."""
    quantized = is_quantized_dtype(dtype)
    if not (quantized or jnp.issubdtype(dtype, jnp.floating)):
        raise TypeError(f"dtype must be a floating dtype or int8 / float8_e4m3fn (quantized), got "
                        f"dtype={jnp.dtype(dtype)}")
    return quantized


def check_new_tokens(key_new, value_new, stored_key: tuple[str, Array], stored_value: Array, *,
                     batch_size: int) -> tuple[Array, Array]:
    """Checks the new tokens of a cache write against the cache's storage; returns them as arrays.

    The storage is a dense cache (``[B, S, K, H]``) or a page pool (``[P,
    page_size, K, H]``); only its trailing ``K, H`` and its dtype matter. A
    quantized storage dtype (int8, float8_e4m3fn) takes floating tokens (they
    are quantized on the write); any other takes tokens of its own kind
    (`check_same_kind`).

    Args:
      key_new: ``[B, T, K, H]``.
      value_new: ``[B, T, K, Hv]``.
      stored_key: ``(name, array)``: how errors name the key storage (e.g.
        ``"cache.key"``) and the storage ``[..., ..., K, H]``.
      stored_value: the value storage ``[..., ..., K, Hv]``.
      batch_size: ``B``.

    Returns:
      ``(key_new, value_new)`` as arrays.

    Raises:
      TypeError: for dtypes of another kind than the storage's (integer
        tokens for a quantized cache, floating and integer mixed).
      ValueError: for shapes other than ``[B, T, K, H]`` / ``[B, T, K, Hv]``,
        or a ``T`` that differs between the two.
    """
    key_new, value_new = jnp.asarray(key_new), jnp.asarray(value_new)
    key_name, key = stored_key
    if is_quantized_dtype(key.dtype):
        check_same_kind(("key_new", key_new), ("value_new", value_new))
        if not jnp.issubdtype(key_new.dtype, jnp.floating):
            raise TypeError(f"a quantized cache takes floating key_new and value_new, got "
                            f"key_new.dtype={key_new.dtype}, value_new.dtype={value_new.dtype} for "
                            f"{key_name}.dtype={key.dtype}")
    else:
        check_same_kind((key_name, key), ("key_new", key_new), ("value_new", value_new))
    for name, new, stored, letters in (("key_new", key_new, key, "B,T,K,H"),
                                       ("value_new", value_new, stored_value, "B,T,K,Hv")):
        if new.ndim != 4 or new.shape[0] != batch_size or new.shape[2:] != stored.shape[2:]:
            raise ValueError(
                f"{name} must have shape [{letters}]=({batch_size}, T, {stored.shape[2]}, {stored.shape[3]}) for this "
                f"cache, got {name}.shape={tuple(new.shape)}"
            )
    if key_new.shape[1] != value_new.shape[1]:
        raise ValueError(f"key_new and value_new [B,T,...] differ: {key_new.shape=}, {value_new.shape=}")
    return key_new, value_new


def _host_row(x, batch: int) -> np.ndarray | None:
    """Known integers (a scalar or ``[B]``) as an int64 NumPy ``[B]``; None when traced or malformed (checked later)."""
    value = concrete_value(x)
    if value is None or value.dtype.kind not in "iu" or value.shape not in ((), (batch,)):
        return None
    return np.broadcast_to(value.astype(np.int64), (batch,))


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
      ValueError: if shapes differ, ``index`` or ``num_new`` do not fit in
        int32, or they are concrete and a write would fall outside ``[0, S)``.
      TypeError: for integer indices of the wrong dtype, or ``new`` of another
        kind of dtype than ``cache`` (floating into integer or the reverse).
    """
    cache, new = jnp.asarray(cache), jnp.asarray(new)
    check_same_kind(("cache", cache), ("new", new))
    if cache.ndim < 2 or new.ndim != cache.ndim:
        raise ValueError(f"cache [B,S,...] and new [B,T,...] must have one rank >= 2, got {cache.shape=}, {new.shape=}")
    if new.shape[0] != cache.shape[0] or new.shape[2:] != cache.shape[2:]:
        raise ValueError(
            f"new [B,T,...] must match cache [B,S,...] except on axis 1, got {cache.shape=}, {new.shape=}"
        )
    B, S = cache.shape[:2]
    T = new.shape[1]
    index_value = _host_row(index, B)  # before conversion: Python ints are known under jit too
    count_value = np.full((B,), T) if num_new is None else _host_row(num_new, B)
    index = row_vector("index", index, B)
    count = jnp.full((B,), T, jnp.int32) if num_new is None else row_vector("num_new", num_new, B)
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
    # One write per row (a scatter batched over B): a batch-sharded cache is written where it lives, with no
    # collective; indexing rows and positions together would make XLA gather the cache over the batch axis.
    return jax.vmap(lambda c, n, p: c.at[p].set(n, mode="drop"))(cache, new.astype(cache.dtype), pos)


def newest_queries(query, lengths, num_new, positional: bool) -> tuple[Array, Array | None]:
    """Checks an ``attend``'s ``query [B, T, N, H]`` and ``num_new`` against the cache's ``lengths [B]``.

    Returns:
      ``(count, offset)``: int ``[B]`` queries per row (``T`` without
      ``num_new``), and the position of each row's first query, the newest
      ``count`` tokens of the cache (None unless ``positional``).

    Raises:
      ValueError: for a query that is not rank 4, or more queries than tokens cached.
    """
    if query.ndim != 4:
        raise ValueError(f"query must have rank 4 [B,T,N,H], got query.shape={tuple(query.shape)}")
    B, T = query.shape[:2]
    count = jnp.full((B,), T, jnp.int32) if num_new is None else row_vector("num_new", num_new, B)
    count_value, lengths_value = concrete_value(count), concrete_value(lengths)
    if count_value is not None and lengths_value is not None and lengths_value.shape == count_value.shape:
        if (count_value > lengths_value).any():
            raise ValueError(
                f"the newest num_new={count_value.tolist()} queries must already be in the cache "
                f"(call update first), got cache lengths={lengths_value.tolist()}"
            )
    return count, (lengths - count if positional else None)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """A fixed-capacity key/value cache with per-row lengths.

    Attributes:
      key: ``[B, S, K, H]``.
      value: ``[B, S, K, Hv]``.
      lengths: int32 ``[B]`` tokens written per row (may exceed ``S`` after an
        overflow under jit; see the module docstring).
      key_scale: float32 ``[B, S, K]`` for a quantized cache (int8 or
        float8_e4m3fn ``key``), else None.
      value_scale: float32 ``[B, S, K]`` for a quantized cache, else None.

    Example::

        k_prompt = v_prompt = jnp.ones((2, 10, 2, 16))  # B=2 rows of up to 10 tokens, K=2, H=16
        q_prompt, prompt_lengths = jnp.ones((2, 10, 4, 16)), jnp.array([10, 3])
        cache = KVCache.init(batch_size=2, max_length=64, num_kv_heads=2, head_dim=16)
        cache = cache.update(k_prompt, v_prompt, num_new=prompt_lengths)  # ragged prefill
        out = cache.attend(q_prompt, num_new=prompt_lengths)              # causal over the cache
        int8 = KVCache.init(2, 64, 2, 16, dtype=jnp.int8)                 # quantized on update
    """

    key: Array
    value: Array
    lengths: Array
    key_scale: Array | None = None
    value_scale: Array | None = None

    # Which tokens each row holds, and what layers sharing it must have alike (`gqa_jax.cache_bookkeeping`).
    BOOKKEEPING: ClassVar[tuple[str, ...]] = ("lengths",)
    GEOMETRY: ClassVar[str] = "(B,)"

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
        """An empty cache of capacity ``max_length``.

        Args:
          batch_size, max_length, num_kv_heads, head_dim: ``B, S, K, H``.
          dtype: a floating dtype, or ``jnp.int8`` / ``jnp.float8_e4m3fn`` for
            a quantized cache (float32 scales per token per KV head).
          value_head_dim: ``Hv``; default ``H``.

        Raises:
          TypeError: for sizes that are not ints (bools included) or a dtype
            that is neither floating nor int8.
          ValueError: for sizes below 1.
        """
        B, S, K, H = (positive_int(name, v) for name, v in (
            ("batch_size", batch_size), ("max_length", max_length), ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim)))
        Hv = H if value_head_dim is None else positive_int("value_head_dim", value_head_dim)
        quantized = check_cache_dtype(dtype)
        return cls(
            key=jnp.zeros((B, S, K, H), dtype),
            value=jnp.zeros((B, S, K, Hv), dtype),
            lengths=jnp.zeros((B,), jnp.int32),
            key_scale=jnp.zeros((B, S, K), jnp.float32) if quantized else None,
            value_scale=jnp.zeros((B, S, K), jnp.float32) if quantized else None,
        )

    @property
    def capacity(self) -> int:
        """``S``, the most tokens a row can hold."""
        return self.key.shape[1]

    @property
    def geometry(self) -> tuple[int]:
        """``(B,)``: what caches that share their lengths must have alike (`gqa_jax.cache_bookkeeping`)."""
        return (self.lengths.shape[0],)

    @property
    def is_quantized(self) -> bool:
        """Keys and values stored in int8 or float8_e4m3fn with per-token scales."""
        return self.key_scale is not None

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
          The new cache; ``lengths`` advanced by ``num_new``. A quantized
          cache stores the new tokens quantized (`gqa_jax.quantization.quantize`).

        Raises:
          ValueError: for shapes that do not match the cache's, ``num_new``
            outside ``[0, T]``, or (when concrete) a write past capacity.
          TypeError: for dtypes of another kind than the cache's (floating
            for a quantized cache).
        """
        key_new, value_new = check_new_tokens(key_new, value_new, ("cache.key", self.key), self.value,
                                              batch_size=self.key.shape[0])
        B, T = key_new.shape[:2]
        count = jnp.full((B,), T, jnp.int32) if num_new is None else row_vector("num_new", num_new, B)
        write = functools.partial(splice_cache, index=self.lengths, num_new=count)
        if not self.is_quantized:
            return KVCache(key=write(self.key, key_new), value=write(self.value, value_new),
                           lengths=self.lengths + count)
        (key_q, key_scale), (value_q, value_scale) = (quantize(x, self.key.dtype) for x in (key_new, value_new))
        return KVCache(
            key=write(self.key, key_q),
            value=write(self.value, value_q),
            lengths=self.lengths + count,
            key_scale=write(self.key_scale, key_scale),
            value_scale=write(self.value_scale, value_scale),
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

        Raises:
          ValueError: for a query that does not fit the cache, or (when
            concrete) ``num_new`` above the tokens written (`update` first).
          TypeError: as `gqa_jax.dot_product_attention`.
        """
        query = jnp.asarray(query)
        count, offset = newest_queries(query, self.lengths, num_new, is_causal or kwargs.get("local_window_size")
                                       is not None)
        return dot_product_attention(
            query,
            self.key,
            self.value,
            is_causal=is_causal,
            query_offset=offset,
            query_seq_lengths=None if num_new is None else count,
            key_value_seq_lengths=jnp.minimum(self.lengths, self.capacity),
            key_scale=self.key_scale,
            value_scale=self.value_scale,
            **kwargs,
        )
