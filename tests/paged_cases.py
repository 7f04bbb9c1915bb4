"""Cases shared by the paged decode kernels' tests (GPU Triton, TPU Mosaic): sizes, rules and a shuffled pool
(float, or quantized for the GPU kernel)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from gqa_jax.quantization import quantize
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
    dense = [rows64(x, table) for x in (key_pages, value_pages)]
    return q, key_pages, value_pages, jnp.asarray(table), np.array(case.lengths, np.int32), dense


def rows64(pages, table, scale_pages=None) -> np.ndarray:
    """Each row's pages in order, in float64 by NumPy indexing: ``[B, M * page_size, ...]`` (times the scale pages
    ``[P, page_size, K]`` when given: the dequantized values)."""
    pages = np.asarray(jnp.asarray(pages, jnp.float32), np.float64)
    if scale_pages is not None:
        pages = pages * np.asarray(scale_pages, np.float64)[..., None]
    table = np.maximum(np.asarray(table), 0)
    return pages[table].reshape(*table.shape[:1], -1, *pages.shape[2:])


def quantized_paged_case_inputs(case: PagedCase, dtype, seed: int = 0):
    """`paged_case_inputs` with the pools quantized to ``dtype`` (`gqa_jax.quantization.quantize`).

    Returns:
      ``(q, key_pages, value_pages, key_scale_pages, value_scale_pages,
      page_table, lengths, [key, value])``, the last the rows' dense caches
      dequantized in float64.
    """
    q, key_pages, value_pages, table, lengths, _ = paged_case_inputs(case, seed)
    (kq, ks), (vq, vs) = quantize(key_pages, dtype), quantize(value_pages, dtype)
    return q, kq, vq, ks, vs, table, lengths, [rows64(kq, table, ks), rows64(vq, table, vs)]


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


def _small_inputs() -> dict:
    """Valid float32 paged inputs: ``query [2, 1, 4, 16]``, 6 pages of 16 tokens x K=2 heads of 16, page table
    ``[[0, 1], [2, -1]]``, lengths ``[20, 3]``."""
    rng = np.random.default_rng(7)
    q = jnp.asarray(rng.standard_normal((2, 1, 4, 16)), jnp.float32)
    pages = jnp.asarray(rng.standard_normal((6, 16, 2, 16)), jnp.float32)
    return dict(query=q, key_pages=pages, value_pages=pages, page_table=jnp.array([[0, 1], [2, -1]], jnp.int32),
                lengths=jnp.array([20, 3], jnp.int32))


def paged_call(kernel, **statics):
    """``call(**changes)``: a thunk calling ``kernel`` on `_small_inputs` with ``changes`` (and ``statics``)."""
    inputs = dict(_small_inputs(), **statics)
    return lambda **changes: lambda: kernel(**dict(inputs, **changes))


def paged_bad_calls(kernel, **statics):
    """``(name, call, error, match)`` for bad inputs every paged decode kernel refuses (`pallas_kernels.paging`).

    Args:
      kernel: ``paged_decode_attention`` of a backend.
      **statics: keywords every call takes (e.g. ``interpret=True``).
    """
    call = paged_call(kernel, **statics)
    inputs = _small_inputs()
    q, pages, table = inputs["query"], inputs["key_pages"], inputs["page_table"]
    return [
        ("table_float", call(page_table=table.astype(jnp.float32)), TypeError, "page_table must be an integer"),
        ("table_shape", call(page_table=table[:1]), ValueError, r"page_table must have shape \[B, M\]=\(2, M >= 1\)"),
        ("page_id", call(page_table=table.at[0, 1].set(6)), ValueError,
         r"page_table\[0, 1\]=6 with lengths\[0\]=20"),
        ("unused_entry_ok_but_length", call(lengths=jnp.array([20, 17])), ValueError, r"page_table\[1, 1\]=-1"),
        ("pages_rank", call(key_pages=pages[0]), ValueError, r"key_pages must have rank 4 \[P,page_size,K,H\]"),
        ("value_page_size", call(value_pages=pages[:, :8]), ValueError, "value_pages .* must match key_pages"),
        ("query_rank", call(query=q[0]), ValueError, r"query must have rank 4 \[B,T,N,H\]"),
        ("head_dim", call(query=q[..., :8]), ValueError,
         r"query and key_pages head dims differ: query.shape\[3\]=8, key_pages.shape\[3\]=16"),
        ("heads", call(query=q[:, :, :3]), ValueError, "num_heads N=3 must be a multiple of num_kv_heads K=2"),
        ("dtype", call(query=q.astype(jnp.bfloat16)), TypeError, "query.dtype=bfloat16, key_pages.dtype=float32"),
        ("int_pages", call(query=q.astype(jnp.int32), key_pages=pages.astype(jnp.int32),
                           value_pages=pages.astype(jnp.int32)), TypeError, "query.dtype=int32"),
        ("lengths_above_capacity", call(lengths=jnp.array([33, 0])), ValueError,
         r"key_value_seq_lengths must be <= S=32, got key_value_seq_lengths=\[33, 0\]"),
        ("lengths_shape", call(lengths=jnp.array([1, 2, 3])), ValueError, r"lengths must be a scalar or have shape"),
        ("lengths_none", call(lengths=None), ValueError, "lengths is required"),
        ("window", call(local_window_size=-1), ValueError, "local_window_size must be non-negative"),
    ]
