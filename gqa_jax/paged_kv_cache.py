"""A paged key/value cache: rows take pages of one shared pool as they grow.

`PagedKVCache` is a pytree of a page pool (``key_pages``/``value_pages``
``[P, page_size, K, H]``), a page table per row (int32 ``[B, M]``, -1 where
no page is assigned), per-row ``lengths`` (int32 ``[B]``) and a stack of free
page ids (``free_pages`` int32 ``[P]``, the first ``num_free`` of them free).
Key ``s`` of row ``b`` sits in page ``page_table[b, s // page_size]`` at slot
``s % page_size``. It has `gqa_jax.KVCache`'s ``update`` / ``attend`` API
(writes of any number of tokens per row at each row's own length, ragged
``num_new``) and `PagedKVCache.free` to give a row's pages back; all of it
works under ``jit`` (the free stack is arrays, allocation a prefix sum).

Allocation: `PagedKVCache.update` gives each row the pages its new tokens
need, ``ceil(new length / page_size)`` in all, from the top of the free stack,
rows in batch order. Pages of rows that grow in turn interleave in the pool.

A model's layers each hold a cache and take the same writes, so layers built
alike hold the same pages for the same tokens: `gqa_jax.cache_bookkeeping`
lets them share one page allocation per step (`gqa_jax.decoding.generate`
does for a `gqa_jax.models.Decoder`).

Capacity: a row holds at most ``max_pages_per_row * page_size`` tokens, and
all rows share the pool's ``num_pages`` pages. A write never overwrites
another row's page or leaves a gap. When the tokens of a write cannot all be
stored (row capacity reached, or the pool out of pages for that row):

* known at trace time (eager code), the write raises ``ValueError`` naming
  the rows and the cause;
* under ``jit`` the tokens that fit in the pages the row could get are
  stored and the rest are dropped; ``lengths`` still counts them, so
  `PagedKVCache.overflowed` reports the rows that lost tokens. An overflowed
  row gets no more pages (later tokens are dropped too) until it is freed, and
  attention reads only its stored tokens (`PagedKVCache.stored_lengths`), as
  `gqa_jax.KVCache` reads at most its capacity.

Attention (`PagedKVCache.attend`): on a GPU or a TPU, decode-shaped calls
(``T <= 16`` queries and the rules the kernels have: scale, causal, window,
soft-cap) run the Pallas paged decode kernel of the backend
(`pallas_kernels.gpu.paged_decode_attention`,
`pallas_kernels.tpu.paged_decode_attention`), which follows the page table;
other calls, and every call on other backends, gather each row's pages into a
dense ``[B, M * page_size, K, H]`` cache and call
`gqa_jax.dot_product_attention`. ``paged_kernel=`` pins the choice.

Quantized caches: ``PagedKVCache.init(..., dtype=jnp.int8)`` (or
``jnp.float8_e4m3fn``) stores keys and values in that dtype with float32
scale pages ``[P, page_size, K]``, one scale per token per KV head in the
token's slot, as `gqa_jax.KVCache` does (`gqa_jax.quantization.quantize` on
`PagedKVCache.update`). `PagedKVCache.attend` hands the scale pages to the
paged decode kernel of the backend (the GPU one gathers each tile's scales
with its keys, the TPU one copies each block's scales beside its pages), or
(other calls) gathers the pages and the scale pages and hands both to
`gqa_jax.dot_product_attention` (``key_scale=`` / ``value_scale=``); neither
dequantizes the whole cache.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from gqa_jax.attention import dot_product_attention
from gqa_jax.implementations._common import MAX_DECODE_QUERIES
from gqa_jax.kv_cache import _host_row, check_cache_dtype, check_new_tokens, newest_queries
from gqa_jax.quantization import quantize
from gqa_jax.request import concrete_value
from pallas_kernels.arguments import KERNEL_DTYPES, positive_int, row_vector
from pallas_kernels.gpu.paged_decode_attention import paged_decode_attention
from pallas_kernels.paging import gather_pages
from pallas_kernels.tpu.paged_decode_attention import paged_decode_attention as tpu_paged_decode_attention

Array = jax.Array

# Keywords of `attend` that the paged decode kernel serves (besides is_causal and the cache's own lengths).
KERNEL_KEYWORDS = frozenset({"scale", "local_window_size", "logits_soft_cap"})
# The implementation names whose kernel family includes each backend's paged kernel.
PAGED_IMPLEMENTATIONS = {"gpu": "pallas_triton", "tpu": "pallas_tpu"}


def _is_neutral(name: str, value, backend: str) -> bool:
    """A keyword that asks nothing of the paged kernel: None, ``dropout_rate=0``, ``return_weights=False``, or the
    implementation whose kernels include it (``"pallas_triton"`` on a GPU, ``"pallas_tpu"`` on a TPU; first of a
    sequence of names) — what a layer passes on every call."""
    if value is None:
        return True
    if name == "dropout_rate":
        return isinstance(value, (int, float)) and value == 0
    if name == "return_weights":
        return value is False
    if name == "implementation":  # a name, or names tried in order: the first decides
        first = value if isinstance(value, str) else next(iter(value), None)
        return first == PAGED_IMPLEMENTATIONS.get(backend)
    return False


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
    """A key/value cache whose rows take fixed-size pages of one shared pool as they grow.

    Attributes:
      key_pages: ``[P, page_size, K, H]`` the key pool.
      value_pages: ``[P, page_size, K, Hv]`` the value pool.
      page_table: int32 ``[B, M]``: row ``b``'s ``j``-th page, -1 where none
        is assigned (a row's pages are a prefix of its table row).
      lengths: int32 ``[B]`` tokens written per row (may exceed the stored
        tokens after an overflow under jit; see the module docstring).
      free_pages: int32 ``[P]``: a stack of page ids, the first ``num_free``
        are free (the rest is stale).
      num_free: int32 ``[]`` free pages.
      key_scale_pages: float32 ``[P, page_size, K]`` for a quantized cache
        (int8 or float8_e4m3fn ``key_pages``): the scale of the key in the
        same slot; else None.
      value_scale_pages: float32 ``[P, page_size, K]`` for a quantized
        cache, else None.

    Example::

        rng = np.random.default_rng(0)
        k, v = (jnp.asarray(rng.standard_normal((2, 20, 2, 16)), jnp.float32) for _ in range(2))  # [B,T,K,H]
        q = jnp.asarray(rng.standard_normal((2, 20, 4, 16)), jnp.float32)                          # [B,T,N,H]
        prompt_lengths = jnp.array([20, 7])
        cache = PagedKVCache.init(batch_size=2, num_pages=8, page_size=16, num_kv_heads=2, head_dim=16,
                                  max_pages_per_row=4)
        cache = cache.update(k, v, num_new=prompt_lengths)  # ragged prefill: rows take 2 and 1 pages
        out = cache.attend(q, num_new=prompt_lengths)       # [2, 20, 4, 16], causal over the cache
        cache = cache.free(jnp.array([True, False]))        # row 0's pages back to the pool
        int8 = PagedKVCache.init(batch_size=2, num_pages=8, page_size=16, num_kv_heads=2, head_dim=16,
                                 max_pages_per_row=4, dtype=jnp.int8)  # quantized on update
    """

    key_pages: Array
    value_pages: Array
    page_table: Array
    lengths: Array
    free_pages: Array
    num_free: Array
    key_scale_pages: Array | None = None
    value_scale_pages: Array | None = None

    # Which pages hold which tokens, and what layers sharing it must have alike (`gqa_jax.cache_bookkeeping`).
    BOOKKEEPING: ClassVar[tuple[str, ...]] = ("page_table", "lengths", "free_pages", "num_free")
    GEOMETRY: ClassVar[str] = "(B, P, page_size, M)"

    @classmethod
    def init(
        cls,
        *,
        batch_size: int,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        max_pages_per_row: int,
        dtype=jnp.float32,
        value_head_dim: int | None = None,
    ) -> "PagedKVCache":
        """An empty cache: every page free, every row of length 0.

        Args:
          batch_size: ``B`` rows.
          num_pages: ``P`` pages in the pool, shared by all rows.
          page_size: tokens per page.
          num_kv_heads, head_dim: ``K, H``.
          max_pages_per_row: ``M``, the most pages one row holds (its
            capacity is ``M * page_size`` tokens).
          dtype: a floating dtype, or ``jnp.int8`` / ``jnp.float8_e4m3fn`` for
            a quantized cache (float32 scale pages ``[P, page_size, K]``).
          value_head_dim: ``Hv``; default ``H``.

        Raises:
          TypeError: for sizes that are not ints (bools included), or a dtype
            that is neither floating nor int8 / float8_e4m3fn.
          ValueError: for sizes below 1, or a pool of ``P * page_size >=
            2**31`` token slots.
        """
        B, P, L, K, H, M = (positive_int(name, v) for name, v in (
            ("batch_size", batch_size), ("num_pages", num_pages), ("page_size", page_size),
            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim), ("max_pages_per_row", max_pages_per_row)))
        Hv = H if value_head_dim is None else positive_int("value_head_dim", value_head_dim)
        quantized = check_cache_dtype(dtype)
        if P * L >= 2**31:
            raise ValueError(f"num_pages * page_size must be < 2**31 (int32 slot ids), got {num_pages=}, {page_size=}")
        return cls(
            key_pages=jnp.zeros((P, L, K, H), dtype),
            value_pages=jnp.zeros((P, L, K, Hv), dtype),
            page_table=jnp.full((B, M), -1, jnp.int32),
            lengths=jnp.zeros((B,), jnp.int32),
            free_pages=jnp.arange(P - 1, -1, -1, dtype=jnp.int32),  # page 0 on top: taken first
            num_free=jnp.asarray(P, jnp.int32),
            key_scale_pages=jnp.zeros((P, L, K), jnp.float32) if quantized else None,
            value_scale_pages=jnp.zeros((P, L, K), jnp.float32) if quantized else None,
        )

    # -- sizes and state ---------------------------------------------------------

    @property
    def batch_size(self) -> int:
        """``B``."""
        return self.page_table.shape[0]

    @property
    def num_pages(self) -> int:
        """``P``, pages in the pool."""
        return self.key_pages.shape[0]

    @property
    def page_size(self) -> int:
        """Tokens per page."""
        return self.key_pages.shape[1]

    @property
    def is_quantized(self) -> bool:
        """Keys and values stored in int8 or float8_e4m3fn with per-token scales."""
        return self.key_scale_pages is not None

    @property
    def max_pages_per_row(self) -> int:
        """``M``."""
        return self.page_table.shape[1]

    @property
    def capacity(self) -> int:
        """The most tokens a row can hold, ``M * page_size`` (if the pool has the pages)."""
        return self.max_pages_per_row * self.page_size

    @property
    def pages_per_row(self) -> Array:
        """int32 ``[B]``: pages each row holds."""
        return jnp.sum(self.page_table >= 0, axis=1, dtype=jnp.int32)

    @property
    def stored_lengths(self) -> Array:
        """int32 ``[B]``: tokens each row holds, ``lengths`` less the ones an overflow dropped."""
        return jnp.minimum(self.lengths, self.pages_per_row * self.page_size)

    @property
    def overflowed(self) -> Array:
        """bool ``[B]``: rows that lost tokens (row capacity or pool exhausted under jit)."""
        return self.lengths > self.pages_per_row * self.page_size

    def pages_needed(self, num_new) -> Array:
        """int32 ``[B]``: the pages each row must get to store ``num_new`` (int or int ``[B]``) more tokens.

        An admission check for a serving loop: the write fits the pool when
        the sum is at most ``num_free`` and every row's length stays within
        `capacity`.
        """
        count = row_vector("num_new", num_new, self.batch_size)
        total = -(-(self.lengths + count) // self.page_size)
        return jnp.maximum(total - self.pages_per_row, 0)

    @property
    def geometry(self) -> tuple[int, int, int, int]:
        """``(B, P, page_size, M)``: what caches that share their page bookkeeping must have alike
        (`gqa_jax.cache_bookkeeping`)."""
        return self.batch_size, self.num_pages, self.page_size, self.max_pages_per_row

    # -- writes ------------------------------------------------------------------

    def update(self, key_new, value_new, *, num_new=None) -> "PagedKVCache":
        """Appends ``T`` tokens per row at each row's current length, taking pages as needed.

        Args:
          key_new: ``[B, T, K, H]``.
          value_new: ``[B, T, K, Hv]``.
          num_new: optional int ``[B]`` valid tokens per row (right padding is
            not written); default ``T``.

        Returns:
          The new cache; ``lengths`` advanced by ``num_new``; new pages taken
          from the free stack. A quantized cache stores the new tokens
          quantized (`gqa_jax.quantization.quantize`), their scales in the
          same slots of the scale pages.

        Raises:
          ValueError: for shapes that do not match the cache's, ``num_new``
            outside ``[0, T]``, or (when the cache and ``num_new`` are
            concrete) a write that cannot be stored whole: past a row's
            capacity, out of free pages, or into a row that overflowed earlier.
          TypeError: for dtypes of another kind than the cache's (floating
            for a quantized cache).
        """
        B = self.batch_size
        key_new, value_new = check_new_tokens(key_new, value_new, ("cache.key_pages", self.key_pages),
                                              self.value_pages, batch_size=B)
        T = key_new.shape[1]
        count_value = np.full((B,), T) if num_new is None else _host_row(num_new, B)
        count = jnp.full((B,), T, jnp.int32) if num_new is None else row_vector("num_new", num_new, B)
        if count_value is not None and ((count_value < 0) | (count_value > T)).any():
            raise ValueError(f"num_new must be in [0, T={T}], got num_new={count_value.tolist()}")
        new = self._allocate(count, T)._write(key_new, value_new, count)
        new._check_stored(self, count)
        return new

    def _allocate(self, count: Array, T: int) -> "PagedKVCache":
        """Gives each row the pages for ``count`` more tokens (rows in batch order, while the pool lasts)."""
        L, M, P = self.page_size, self.max_pages_per_row, self.num_pages
        held = self.pages_per_row
        wanted = jnp.minimum(-(-(self.lengths + count) // L), M) - held
        need = jnp.where(self.overflowed, 0, jnp.maximum(wanted, 0))  # an overflowed row would get a gap
        before = jnp.cumsum(need) - need  # pages taken by earlier rows
        grant = jnp.clip(self.num_free - before, 0, need)
        j = jnp.arange(min(M, -(-T // L)), dtype=jnp.int32)[None, :]  # a write of T tokens needs <= ceil(T/L) pages
        taken = self.free_pages[jnp.clip(self.num_free - 1 - (before[:, None] + j), 0, P - 1)]
        slots = jnp.where(j < grant[:, None], held[:, None] + j, M)  # M is out of range: dropped
        page_table = jax.vmap(lambda row, s, ids: row.at[s].set(ids, mode="drop"))(self.page_table, slots, taken)
        return dataclasses.replace(self, page_table=page_table, num_free=self.num_free - jnp.sum(grant))

    def _write(self, key_new: Array, value_new: Array, count: Array) -> "PagedKVCache":
        """Scatters the first ``count`` new tokens of each row into its pages (quantized, with their scales, in a
        quantized cache); tokens without a page are dropped."""
        B, T = key_new.shape[:2]
        L, M, P = self.page_size, self.max_pages_per_row, self.num_pages
        t = jnp.arange(T, dtype=jnp.int32)[None, :]
        pos = self.lengths[:, None] + t
        page = jnp.take_along_axis(self.page_table, jnp.clip(pos // L, 0, M - 1), axis=1)
        stored = (t < count[:, None]) & (pos < self.pages_per_row[:, None] * L)
        slot = jnp.where(stored, page * L + pos % L, P * L).reshape(-1)  # P * L is out of range: dropped

        def write(pages, new):
            flat = pages.reshape(P * L, *pages.shape[2:])
            flat = flat.at[slot].set(new.reshape(B * T, *new.shape[2:]).astype(pages.dtype), mode="drop")
            return flat.reshape(pages.shape)

        if not self.is_quantized:
            return dataclasses.replace(self, key_pages=write(self.key_pages, key_new),
                                       value_pages=write(self.value_pages, value_new), lengths=self.lengths + count)
        (key_q, key_scale), (value_q, value_scale) = (quantize(x, self.key_pages.dtype) for x in (key_new, value_new))
        return dataclasses.replace(
            self,
            key_pages=write(self.key_pages, key_q),
            value_pages=write(self.value_pages, value_q),
            lengths=self.lengths + count,
            key_scale_pages=write(self.key_scale_pages, key_scale),
            value_scale_pages=write(self.value_scale_pages, value_scale),
        )

    def _check_stored(self, before: "PagedKVCache", count: Array) -> None:
        """Raises ``ValueError`` when this cache (after a write of ``count``) is concrete and a row lost tokens."""
        lost = concrete_value(self.overflowed & (count > 0))
        if lost is None or not lost.any():
            return
        rows = np.flatnonzero(lost).tolist()
        lengths, old, free = (np.asarray(x) for x in (self.lengths, before.overflowed, before.num_free))
        if old[rows].any():
            cause = "it overflowed earlier (free it with PagedKVCache.free)"
        elif (lengths[rows] > self.capacity).any():
            cause = f"past the row capacity max_pages_per_row * page_size = {self.capacity}"
        else:
            cause = (f"the pool ran out of pages: {int(free)} free before the write, "
                     f"{int(np.asarray(before.pages_needed(count)).sum())} needed")
        raise ValueError(f"rows {rows} cannot store their new tokens (lengths would be "
                         f"{lengths[rows].tolist()}): {cause}")

    def free(self, rows) -> "PagedKVCache":
        """Gives the pages of ``rows`` back to the pool and empties those rows (length 0).

        Args:
          rows: bool ``[B]`` (True: free the row), or int row indices (a
            scalar or ``[R]``, repeats allowed). Under ``jit`` indices outside
            ``[0, B)`` are ignored.

        Returns:
          The new cache; the rows' overflow flags are cleared.

        Raises:
          ValueError: for a bool mask not of shape ``[B]``, indices of rank
            above 1, or known indices outside ``[0, B)``.
          TypeError: for a dtype that is neither bool nor integer.
        """
        mask = self._row_mask(rows)
        release = (mask[:, None] & (self.page_table >= 0)).reshape(-1)
        position = jnp.where(release, self.num_free + jnp.cumsum(release) - 1, self.num_pages)
        free_pages = self.free_pages.at[position].set(self.page_table.reshape(-1), mode="drop")
        return dataclasses.replace(
            self,
            page_table=jnp.where(mask[:, None], -1, self.page_table),
            lengths=jnp.where(mask, 0, self.lengths),
            free_pages=free_pages,
            num_free=self.num_free + jnp.sum(release, dtype=jnp.int32),
        )

    def _row_mask(self, rows) -> Array:
        """bool ``[B]`` from a mask or row indices (see `free`)."""
        B = self.batch_size
        rows = jnp.asarray(rows)
        if rows.dtype == jnp.bool_:
            if rows.shape != (B,):
                raise ValueError(f"rows as a bool mask must have shape [B]=({B},), got rows.shape={rows.shape}")
            return rows
        if not jnp.issubdtype(rows.dtype, jnp.integer):
            raise TypeError(f"rows must be a bool mask [B] or int row indices, got rows.dtype={rows.dtype}")
        if rows.ndim > 1:
            raise ValueError(f"rows as indices must be a scalar or 1-D, got rows.shape={rows.shape}")
        known = concrete_value(rows)
        if known is not None and ((known < 0) | (known >= B)).any():
            raise ValueError(f"row indices must be in [0, B={B}), got rows={known.tolist()}")
        return jnp.zeros((B,), bool).at[jnp.where(rows >= 0, rows, B)].set(True, mode="drop")  # B: dropped

    # -- attention ---------------------------------------------------------------

    def attend(self, query, *, num_new=None, is_causal: bool = True, paged_kernel: bool | None = None, **kwargs):
        """Attention of the newest ``T`` tokens' queries over the cache.

        Call it after `update` with the same ``num_new``: query ``t`` of row
        ``b`` sits at position ``lengths[b] - num_new[b] + t``, and sees the
        row's stored keys (causally by default), as `gqa_jax.KVCache.attend`.

        Args:
          query: ``[B, T, N, H]``.
          num_new: optional int ``[B]`` valid queries per row; default ``T``.
          is_causal: the causal rule (default True).
          paged_kernel: True: the Pallas paged decode kernel (compiled on a
            GPU, the TPU one compiled on a TPU, the GPU one in the Pallas
            interpreter elsewhere: slow, for tests), with the scale pages of
            a quantized cache; False: gather the pages to a dense cache and
            call `gqa_jax.dot_product_attention` (with the gathered scale
            pages as ``key_scale`` / ``value_scale`` for a quantized cache);
            None (default): the kernel on a GPU or a TPU when ``T <= 16``,
            the query dtype is bfloat16, float16 or float32 and ``kwargs``
            sets only ``scale``,
            ``local_window_size`` and ``logits_soft_cap``, else the dense
            path. Keywords that ask nothing of the kernel count as unset
            (None, ``dropout_rate=0``, ``return_weights=False``, and
            ``implementation="pallas_triton"`` on a GPU or ``"pallas_tpu"``
            on a TPU, alone or first of several: the paged kernel is of
            that family), so a layer that passes them still gets the kernel.
          **kwargs: any other keyword of `gqa_jax.dot_product_attention`
            (``implementation``, ``local_window_size``, ``logits_soft_cap``
            ...); the kernel takes the three above.

        Returns:
          ``[B, T, N, Hv]``; padded queries give zeros.

        Raises:
          ValueError: for a query that does not fit the cache, (when
            concrete) ``num_new`` above the tokens written (`update` first),
            or ``paged_kernel=True`` with keywords the kernel does not take.
          TypeError: as `gqa_jax.dot_product_attention`, or a
            ``paged_kernel`` that is not a bool or None.
        """
        query = jnp.asarray(query)
        count, offset = newest_queries(query, self.lengths, num_new, is_causal or kwargs.get("local_window_size")
                                       is not None)
        if paged_kernel is not None and not isinstance(paged_kernel, (bool, np.bool_)):
            raise TypeError(f"paged_kernel must be True, False or None, got {paged_kernel=}")
        T = query.shape[1]
        backend = jax.default_backend()
        given = {name: value for name, value in kwargs.items() if not _is_neutral(name, value, backend)}
        other = sorted(set(given) - KERNEL_KEYWORDS)
        if paged_kernel is None:
            paged_kernel = (backend in ("gpu", "tpu") and T <= MAX_DECODE_QUERIES and not other
                            and query.dtype in KERNEL_DTYPES)
        if not paged_kernel:
            def dense(pages):  # [P, page_size, ...] -> [B, M * page_size, ...]; None (no scales) stays None
                return None if pages is None else gather_pages(pages, self.page_table)

            return dot_product_attention(
                query, dense(self.key_pages), dense(self.value_pages), is_causal=is_causal, query_offset=offset,
                query_seq_lengths=None if num_new is None else count, key_value_seq_lengths=self.stored_lengths,
                key_scale=dense(self.key_scale_pages), value_scale=dense(self.value_scale_pages), **kwargs,
            )
        if other:
            raise ValueError(f"the paged decode kernel takes only {sorted(KERNEL_KEYWORDS)} besides is_causal, got "
                             f"{other}; use paged_kernel=False or None")
        kernel = tpu_paged_decode_attention if backend == "tpu" else paged_decode_attention
        out = kernel(query, self.key_pages, self.value_pages, self.page_table, self.stored_lengths,
                     is_causal=is_causal, query_offset=offset, key_scale_pages=self.key_scale_pages,
                     value_scale_pages=self.value_scale_pages, interpret=backend not in ("gpu", "tpu"), **given)
        if num_new is None:
            return out
        return jnp.where((jnp.arange(T) < count[:, None])[:, :, None, None], out, jnp.zeros((), out.dtype))
