"""Paged key/value pools shared by the paged decode kernels (GPU Triton and TPU Mosaic).

A pool ``key_pages [P, page_size, K, H]`` / ``value_pages [P, page_size, K,
Hv]`` holds every row's keys and values; key ``s`` of row ``b`` sits in page
``page_table[b, s // page_size]`` at slot ``s % page_size``; a quantized pool
(int8 or float8_e4m3fn pages, read by both paged kernels) has scale pages ``[P,
page_size, K]`` beside. Here: the checks and rules both kernels' wrappers
start from (`paged_request`), and the dense view of a row's pages
(`gather_pages`) their backward passes and the XLA path use.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.arguments import KERNEL_DTYPES, row_vector
from pallas_kernels.quantized import check_tensors
from pallas_kernels.rules import Rules, check_int32_range, concrete_value


def paged_request(query, key_pages, value_pages, page_table, lengths, *, scale, is_causal, query_offset,
                  local_window_size, logits_soft_cap, key_scale_pages=None, value_scale_pages=None):
    """Checked ``(query, key_pages, value_pages, page_table int32, rules, key_scale_pages, value_scale_pages)`` of a
    paged decode call; the scale pages float32, or None for float pages.

    The rules are those of the dense cache the pages stand for, ``[B, M *
    page_size, K, H]`` with key lengths ``lengths``. A quantized pool (int8 or
    float8_e4m3fn pages) needs both scale pages, floating ``[P, page_size,
    K]``; the caller takes them as float32. Float pages take none.

    Raises:
      ValueError: for inconsistent shapes or rules, a pool of ``P * page_size
        >= 2**31`` slots, a known page id outside ``[0, P)`` for a page that
        holds valid keys, or a missing scale.
      TypeError: for dtypes that differ or are not served.
    """
    query, key_pages, value_pages = jnp.asarray(query), jnp.asarray(key_pages), jnp.asarray(value_pages)
    for name, pages, letters in (("key_pages", key_pages, "P,page_size,K,H"),
                                 ("value_pages", value_pages, "P,page_size,K,Hv")):
        if pages.ndim != 4:
            raise ValueError(f"{name} must have rank 4 [{letters}], got {name}.shape={tuple(pages.shape)}")
    if value_pages.shape[:3] != key_pages.shape[:3]:
        raise ValueError(f"value_pages [P,page_size,K,Hv] must match key_pages [P,page_size,K,H] on P, page_size "
                         f"and K, got {key_pages.shape=}, {value_pages.shape=}")
    if query.ndim != 4:
        raise ValueError(f"query must have rank 4 [B,T,N,H], got query.shape={tuple(query.shape)}")
    B = query.shape[0]
    P, page_size, K, H = key_pages.shape
    page_table = check_page_table(page_table, B)
    if P * page_size >= 2**31:
        raise ValueError(f"the pool must have < 2**31 slots (int32 row ids), got num_pages P={P} * {page_size=}")
    # The tensor checks see the pool as a cache of P rows of page_size keys (and a query of P rows: the batch is
    # the page table's), so the scale pages are checked as [B,S,K] = [P,page_size,K] scales.
    key_scale_pages, value_scale_pages = check_tensors(
        jax.ShapeDtypeStruct((P, *query.shape[1:]), query.dtype), key_pages, value_pages, key_scale_pages,
        value_scale_pages, names=("query", "key_pages", "value_pages"), dtypes=KERNEL_DTYPES)
    # The rules see the rows as dense caches [B, M * page_size, K, H].
    dense_key = jax.ShapeDtypeStruct((B, page_table.shape[1] * page_size, K, H), key_pages.dtype)
    rules = Rules.create(
        query, dense_key, scale=scale, is_causal=is_causal, query_offset=query_offset,
        key_value_seq_lengths=row_vector("lengths", lengths, B), local_window_size=local_window_size,
        logits_soft_cap=logits_soft_cap,
    )
    check_page_ids(page_table, rules.kv_len, P, page_size)
    return query, key_pages, value_pages, page_table, rules, key_scale_pages, value_scale_pages


def gather_pages(pages, page_table):
    """Each row's pages in order, as a dense cache: ``pages[page_table]`` reshaped to ``[B, M * page_size, ...]``.

    Args:
      pages: ``[P, page_size, ...]``.
      page_table: int ``[B, M]``; entries are clamped into ``[0, P)`` (unused
        entries, e.g. -1, read some page that lengths then mask).

    Returns:
      ``[B, M * page_size, ...]`` in the pages' dtype.
    """
    B, M = page_table.shape
    rows = pages[jnp.clip(page_table, 0, pages.shape[0] - 1)]
    return rows.reshape(B, M * pages.shape[1], *pages.shape[2:])


def check_page_table(page_table, batch: int) -> jax.Array:
    """``page_table`` as int32 ``[B, M]`` after checking its rank, batch size and dtype.

    Raises:
      ValueError: for a shape other than ``[B, M]`` with ``M >= 1``, or host
        values outside int32.
      TypeError: for a non-integer dtype.
    """
    check_int32_range("page_table", page_table)
    page_table = jnp.asarray(page_table)
    if not jnp.issubdtype(page_table.dtype, jnp.integer):
        raise TypeError(f"page_table must be an integer array, got page_table.dtype={page_table.dtype}")
    if page_table.ndim != 2 or page_table.shape[0] != batch or page_table.shape[1] < 1:
        raise ValueError(f"page_table must have shape [B, M]=({batch}, M >= 1), got "
                         f"page_table.shape={tuple(page_table.shape)}")
    return page_table.astype(jnp.int32)




def check_page_ids(page_table, lengths, num_pages: int, page_size: int) -> None:
    """Raises ``ValueError`` for a known page id outside ``[0, P)`` among the pages that hold valid keys."""
    table, known = concrete_value(page_table), concrete_value(lengths)
    if table is None or known is None:
        return
    used = np.arange(table.shape[1])[None, :] * page_size < known[:, None]
    bad = used & ((table < 0) | (table >= num_pages))
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"page_table entries of pages that hold keys must be in [0, P={num_pages}), got "
                         f"page_table[{row}, {col}]={int(table[row, col])} with lengths[{row}]={int(known[row])}")
