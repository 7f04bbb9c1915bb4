"""Cases shared by the paged decode kernels' tests (GPU Triton, TPU Mosaic): sizes, rules and a shuffled pool."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from tests.reference import reference_attention_grads


@dataclasses.dataclass(frozen=True)
class PagedCase:
    """One paged decode call: ``T`` queries of ``N`` heads per row over ``K`` KV heads of dim ``H``.

    ``lengths`` gives each row's keys (``B = len(lengths)``); ``block_sizes``
    is the kernel's own tiling object (None: its defaults); ``rules`` extra
    keywords as ``(name, value)`` pairs.
    """

    name: str
    T: int
    N: int
    K: int
    H: int
    page_size: int
    lengths: tuple[int, ...]
    dtype: str = "float32"
    block_sizes: object = None
    rules: tuple = ()

    def __str__(self):
        return self.name


def paged_case_inputs(case: PagedCase, seed: int = 0):
    """A pool with spare pages, each row's pages at random places in it (-1 past its length).

    Returns:
      ``(q, key_pages, value_pages, page_table, lengths, [key, value])``, the
      last the rows' dense caches in float64 by NumPy indexing (``[B, M *
      page_size, K, H]``).
    """
    rng = np.random.default_rng(seed)
    L, B = case.page_size, len(case.lengths)
    M = max(-(-n // L) for n in case.lengths) + 1
    P = B * M + 3
    table = rng.permutation(P)[:B * M].reshape(B, M).astype(np.int32)
    for b, n in enumerate(case.lengths):
        table[b, -(-n // L):] = -1
    dtype = jnp.dtype(case.dtype)
    q = jnp.asarray(rng.standard_normal((B, case.T, case.N, case.H)), dtype)
    key_pages, value_pages = (jnp.asarray(rng.standard_normal((P, L, case.K, case.H)), dtype) for _ in range(2))
    dense = [np.asarray(x, np.float64)[np.maximum(table, 0)].reshape(B, M * L, case.K, case.H)
             for x in (key_pages, value_pages)]
    return q, key_pages, value_pages, jnp.asarray(table), np.array(case.lengths, np.int32), dense


def reference_page_grads(case: PagedCase, q, key_pages, value_pages, table, lengths, dense, d_out):
    """Float64 gradients ``(d_query, d_key_pages, d_value_pages)`` of ``sum(out * d_out)`` for a causal paged call.

    The oracle's gradients of the rows' dense caches (``dense`` from
    `paged_case_inputs`), summed back into the pages they came from.
    """
    ref_q, ref_k, ref_v = reference_attention_grads(q, *dense, d_out, is_causal=True, query_offset=lengths - case.T,
                                                    key_value_seq_lengths=lengths)
    L = case.page_size
    ref_pages = [np.zeros(key_pages.shape), np.zeros(value_pages.shape)]
    for b, row in enumerate(np.asarray(table)):
        for j, page in enumerate(row):
            if page >= 0:
                for ref, grad in zip(ref_pages, (ref_k, ref_v)):
                    ref[page] += grad[b, j * L:(j + 1) * L]
    return ref_q, *ref_pages
