"""PagedKVCache and the Pallas paged decode kernel.

The cache against the dense `gqa_jax.KVCache` over ragged multi-step decoding
(eager and jitted, gather path and kernel), page freeing and reuse, pool
exhaustion (eager errors; under jit dropped tokens that are reported and
never land in another row's pages), bad inputs, and `generate` on a paged
cache. The kernel against the float64 oracle on tiny shapes in interpret mode
(compiled too on a GPU), on page-aligned tiles (one page id read per tile)
and gathered ones, its gradients, and its lowering to Triton.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gqa_jax
from gqa_jax.decoding import generate, generate_without_cache
from gqa_jax.kv_cache import KVCache
from gqa_jax.paged_kv_cache import PagedKVCache
from pallas_kernels.gpu.decode_attention import DecodeBlockSizes
from pallas_kernels.gpu.paged_decode_attention import page_aligned_block_k, paged_decode_attention
from tests.devices import has_gpu
from tests.kernel_cases import GRAD_TOLERANCE, TOLERANCE, TOLERANCE_TF32, assert_close
from tests.paged_cases import PagedCase, paged_bad_calls, paged_case_inputs, reference_page_grads
from tests.reference import reference_attention

B, N, K, H = 3, 4, 2, 8
needs_gpu = pytest.mark.skipif(not has_gpu(), reason="needs an NVIDIA GPU")


def _normal(rng, shape, dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal(shape), dtype)


def _paged(num_pages=24, page_size=4, max_pages_per_row=6, **sizes):
    sizes = dict(dict(batch_size=B, num_kv_heads=K, head_dim=H), **sizes)
    return PagedKVCache.init(num_pages=num_pages, page_size=page_size, max_pages_per_row=max_pages_per_row, **sizes)


def _step_inputs(rng, num_new):
    T = max(max(num_new), 1)
    return (_normal(rng, (B, T, N, H)), _normal(rng, (B, T, K, H)), _normal(rng, (B, T, K, H)),
            jnp.asarray(num_new, jnp.int32))


def assert_pool_consistent(cache: PagedKVCache) -> None:
    """Every page is free or held by exactly one row; a row's pages are a prefix of its table row."""
    table = np.asarray(cache.page_table)
    free = np.asarray(cache.free_pages)[:int(cache.num_free)]
    assert sorted(table[table >= 0].tolist() + free.tolist()) == list(range(cache.num_pages))
    held = (table >= 0).sum(axis=1)
    assert all((row[:n] >= 0).all() and (row[n:] == -1).all() for row, n in zip(table, held))


# Ragged steps: rows grow in turn, so their pages interleave in the pool.
STEPS = [[5, 0, 9], [1, 2, 0], [0, 6, 1], [3, 1, 3], [1, 1, 1], [0, 4, 0]]


@pytest.mark.parametrize("page_size", [4, 8])
def test_matches_dense_cache_over_ragged_decode(page_size):
    rng = np.random.default_rng(0)
    paged, dense = _paged(page_size=page_size, max_pages_per_row=24 // page_size), KVCache.init(B, 24, K, H)
    for num_new in STEPS:
        q, k, v, n = _step_inputs(rng, num_new)
        paged, dense = paged.update(k, v, num_new=n), dense.update(k, v, num_new=n)
        np.testing.assert_allclose(paged.attend(q, num_new=n), dense.attend(q, num_new=n), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(paged.lengths, dense.lengths)
        assert_pool_consistent(paged)
    assert not paged.overflowed.any()
    table = np.asarray(paged.page_table)
    rows_0_and_1 = table[0][table[0] >= 0], table[1][table[1] >= 0]
    assert any(rows_0_and_1[0].min() < page < rows_0_and_1[0].max() for page in rows_0_and_1[1]), table


def test_kernel_through_attend_matches_dense_cache():
    """`attend(paged_kernel=True)` (interpret mode here) over ragged steps, a window and a soft-cap (keywords given as
    None, as a model passes them, count as unset)."""
    rng = np.random.default_rng(1)
    paged, dense = _paged(page_size=4), KVCache.init(B, 24, K, H)
    options = dict(local_window_size=(6, 0), logits_soft_cap=3.0, scale=None, implementation=None)
    for num_new in STEPS[:4]:
        q, k, v, n = _step_inputs(rng, num_new)
        paged, dense = paged.update(k, v, num_new=n), dense.update(k, v, num_new=n)
        out = paged.attend(q, num_new=n, paged_kernel=True, **options)
        np.testing.assert_allclose(out, dense.attend(q, num_new=n, **options), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("paged_kernel", [False, True], ids=["gather", "kernel"])
def test_jit_of_update_and_attend(paged_kernel):
    rng = np.random.default_rng(2)

    @jax.jit
    def step(cache, q, k, v, n):
        cache = cache.update(k, v, num_new=n)
        return cache, cache.attend(q, num_new=n, paged_kernel=paged_kernel)

    paged, dense = _paged(), KVCache.init(B, 24, K, H)
    for num_new in ([4, 2, 3], [1, 0, 1], [1, 1, 1]):  # T = 4, then T = 1 twice (one compilation for both)
        q, k, v, n = _step_inputs(rng, num_new)
        paged, out = step(paged, q, k, v, n)
        dense = dense.update(k, v, num_new=n)
        np.testing.assert_allclose(out, dense.attend(q, num_new=n), rtol=2e-5, atol=2e-5)
    assert step._cache_size() == 2
    assert_pool_consistent(paged)


def test_free_and_reuse():
    rng = np.random.default_rng(3)
    paged, dense = _paged(num_pages=10, page_size=4), KVCache.init(B, 24, K, H)
    for num_new in ([9, 5, 7], [1, 4, 2]):
        q, k, v, n = _step_inputs(rng, num_new)
        paged, dense = paged.update(k, v, num_new=n), dense.update(k, v, num_new=n)
    assert int(paged.num_free) == 10 - (3 + 3 + 3)
    freed_pages = set(np.asarray(paged.page_table)[1].tolist()) - {-1}
    paged = paged.free(1)
    assert int(paged.num_free) == 4 and int(paged.lengths[1]) == 0 and int(paged.pages_per_row[1]) == 0
    assert_pool_consistent(paged)
    dense = dataclasses.replace(dense, lengths=dense.lengths.at[1].set(0))  # the dense cache's row 1, emptied
    available = set(np.asarray(paged.free_pages)[:4].tolist())
    assert freed_pages <= available
    q, k, v, n = _step_inputs(rng, [0, 12, 0])
    paged, dense = paged.update(k, v, num_new=n), dense.update(k, v, num_new=n)
    new_pages = set(np.asarray(paged.page_table)[1].tolist()) - {-1}
    assert len(new_pages) == 3 and new_pages <= available and new_pages & freed_pages
    np.testing.assert_allclose(paged.attend(q, num_new=n), dense.attend(q, num_new=n), rtol=1e-6, atol=1e-6)
    paged = paged.free(jnp.array([True, False, True]))
    assert int(paged.num_free) == 10 - 3 and np.asarray(paged.lengths).tolist() == [0, 12, 0]
    assert_pool_consistent(paged)
    # Under jit, with indices (repeats and an index outside [0, B) ignored).
    paged = jax.jit(lambda c, rows: c.free(rows))(paged, jnp.array([1, 1, 7]))
    assert int(paged.num_free) == 10 and not np.asarray(paged.lengths).any()
    assert_pool_consistent(paged)


def test_pool_exhaustion_raises_in_eager_code():
    rng = np.random.default_rng(4)
    paged = _paged(num_pages=5, page_size=4)
    q, k, v, n = _step_inputs(rng, [8, 8, 3])  # 2 + 2 + 1 pages
    paged = paged.update(k, v, num_new=n)
    assert int(paged.num_free) == 0
    q, k, v, n = _step_inputs(rng, [1, 0, 1])  # row 0 needs a new page; row 2 still has room
    with pytest.raises(ValueError, match=r"rows \[0\] cannot store .*pool ran out of pages: 0 free before the "
                                         r"write, 1 needed"):
        paged.update(k, v, num_new=n)
    q, k, v, n = _step_inputs(rng, [0, 0, 1])
    assert int(paged.update(k, v, num_new=n).lengths[2]) == 4  # a write that fits is fine
    big = _paged(num_pages=50, page_size=4, max_pages_per_row=2)
    q, k, v, n = _step_inputs(rng, [9, 0, 0])
    with pytest.raises(ValueError, match=r"rows \[0\] cannot store .*past the row capacity max_pages_per_row \* "
                                         r"page_size = 8"):
        big.update(k, v, num_new=n)


def test_pool_exhaustion_under_jit_drops_and_reports():
    """Rows in batch order get the pages left; a row that could not is flagged, stops growing, and no other row's
    pages or attention change; freeing it makes it usable again."""
    rng = np.random.default_rng(5)
    update = jax.jit(lambda c, k, v, n: c.update(k, v, num_new=n))
    paged, dense = _paged(num_pages=6, page_size=4), KVCache.init(B, 24, K, H)
    q, k, v, n = _step_inputs(rng, [6, 9, 9])  # needs 2 + 3 + 3 pages; 6 exist: row 2 gets 1
    paged, dense = update(paged, k, v, n), dense.update(k, v, num_new=n)
    assert np.asarray(paged.overflowed).tolist() == [False, False, True]
    assert np.asarray(paged.stored_lengths).tolist() == [6, 9, 4] and np.asarray(paged.lengths).tolist() == [6, 9, 9]
    assert_pool_consistent(paged)

    def check_attention(paged, dense, q, n):
        out = paged.attend(q, num_new=n)
        np.testing.assert_allclose(out[:2], dense.attend(q, num_new=n)[:2], rtol=1e-6, atol=1e-6)
        # The overflowed row sees its stored tokens only: dense keys [:stored], queries still at lengths - n.
        stored, lengths = int(paged.stored_lengths[2]), int(paged.lengths[2])
        ref, _ = reference_attention(q[2:], dense.key[2:, :stored], dense.value[2:, :stored], is_causal=True,
                                     query_offset=[lengths - int(n[2])], query_seq_lengths=n[2:])
        np.testing.assert_allclose(out[2:], ref, rtol=1e-5, atol=1e-5)

    check_attention(paged, dense, q, n)
    q, k, v, n = _step_inputs(rng, [2, 4, 1])  # row 0 fits in its pages; row 1 would need a page: none left
    paged, dense = update(paged, k, v, n), dense.update(k, v, num_new=n)
    assert np.asarray(paged.overflowed).tolist() == [False, True, True]
    assert np.asarray(paged.stored_lengths).tolist() == [8, 12, 4]
    np.testing.assert_allclose(paged.attend(q, num_new=n)[0], dense.attend(q, num_new=n)[0], rtol=1e-6, atol=1e-6)
    paged = paged.free(jnp.array([False, False, True]))  # one page back: row 1 stays overflowed, gets no gap
    q, k, v, n = _step_inputs(rng, [0, 1, 3])
    paged = update(paged, k, v, n)
    assert np.asarray(paged.overflowed).tolist() == [False, True, False]
    assert np.asarray(paged.pages_per_row).tolist() == [2, 3, 1] and int(paged.num_free) == 0
    assert_pool_consistent(paged)


def _bad_cache_calls():
    cache = _paged()
    rng = np.random.default_rng(6)
    q, k, v, n = _step_inputs(rng, [2, 2, 2])
    written = cache.update(k, v, num_new=n)
    sizes = dict(batch_size=2, num_pages=8, page_size=4, num_kv_heads=2, head_dim=8, max_pages_per_row=2)
    return [
        ("zero_batch", lambda: PagedKVCache.init(**dict(sizes, batch_size=0)), ValueError, "batch_size"),
        ("float_page_size", lambda: PagedKVCache.init(**dict(sizes, page_size=4.0)), TypeError, "page_size"),
        ("bool_max_pages", lambda: PagedKVCache.init(**dict(sizes, max_pages_per_row=True)), TypeError,
         "max_pages_per_row"),
        ("int32", lambda: PagedKVCache.init(**sizes, dtype=jnp.int32), TypeError,
         "dtype must be a floating dtype or int8 / float8_e4m3fn .*got dtype=int32"),
        ("huge_pool", lambda: PagedKVCache.init(**dict(sizes, num_pages=2**29, page_size=4)), ValueError,
         r"num_pages \* page_size must be < 2\*\*31"),
        ("key_heads", lambda: cache.update(k[:, :, :1], v, num_new=n), ValueError,
         r"key_new must have shape \[B,T,K,H\]=\(3, T, 2, 8\)"),
        ("value_length", lambda: cache.update(k, v[:, :1]), ValueError, "key_new and value_new"),
        ("num_new_above_T", lambda: cache.update(k, v, num_new=jnp.array([3, 0, 0])), ValueError,
         r"num_new must be in \[0, T=2\]"),
        ("num_new_float", lambda: cache.update(k, v, num_new=jnp.ones(3)), TypeError, "num_new"),
        ("int_keys", lambda: cache.update(k.astype(jnp.int32), v), TypeError, "key_new.dtype=int32"),
        ("query_rank", lambda: written.attend(q[0]), ValueError, "query must have rank 4"),
        ("attend_before_update", lambda: cache.attend(q, num_new=n), ValueError, "call update first"),
        ("paged_kernel_str", lambda: written.attend(q, paged_kernel="yes"), TypeError, "paged_kernel"),
        ("kernel_bias", lambda: written.attend(q, paged_kernel=True, bias=jnp.zeros((2, 24))), ValueError,
         r"takes only .* got \['bias'\]"),
        ("free_mask_shape", lambda: written.free(jnp.array([True, False])), ValueError, r"rows as a bool mask"),
        ("free_float", lambda: written.free(1.0), TypeError, "rows must be a bool mask"),
        ("free_rank", lambda: written.free(jnp.zeros((1, 1), jnp.int32)), ValueError, "rows as indices"),
        ("free_index", lambda: written.free(3), ValueError, r"row indices must be in \[0, B=3\), got rows=3"),
    ]


@pytest.mark.parametrize("name, call, error, match", _bad_cache_calls(), ids=lambda x: x if isinstance(x, str) else "")
def test_bad_cache_inputs(name, call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("name, call, error, match", paged_bad_calls(paged_decode_attention, interpret=True),
                         ids=lambda x: x if isinstance(x, str) else "")
def test_bad_kernel_inputs(name, call, error, match):
    with pytest.raises(error, match=match):
        call()


# ---------------------------------------------------------------------------
# The kernel against the float64 oracle.


PAGED_CASES = [
    PagedCase("G4_T1_page16_zero_length", 1, 8, 2, 32, 16, (40, 0, 17)),
    PagedCase("G2_T4_page32_split3", 4, 4, 2, 32, 32, (100, 5), block_sizes=DecodeBlockSizes(block_k=32, num_splits=3)),
    PagedCase("GN_T2_page16_tile_of_4_pages_padded_head", 2, 4, 1, 24, 16, (70, 33),
              block_sizes=DecodeBlockSizes(block_k=64)),
    PagedCase("G2_T1_page32_half_page_tiles", 1, 4, 2, 16, 32, (64, 45), block_sizes=DecodeBlockSizes(block_k=16)),
    PagedCase("G4_T2_page16_window_softcap_bf16", 2, 8, 2, 32, 16, (90, 31), dtype="bfloat16",
              rules=(("local_window_size", (20, 0)), ("logits_soft_cap", 5.0))),
    PagedCase("G2_T1_page24_not_a_power_of_two", 1, 4, 2, 16, 24, (50, 71), block_sizes=DecodeBlockSizes(block_k=16)),
    # Page-aligned tiles (page_size % block_k == 0: one page id per tile, contiguous rows) against gathered ones
    # (tiles of two pages): lengths 0 and mid-page, a padded head dim (24 of 32 columns), splits, bfloat16.
    PagedCase("G4_T1_page16_aligned_tile16_zero_mid_page_padded_head_bf16", 1, 8, 2, 24, 16, (0, 37, 16),
              dtype="bfloat16", block_sizes=DecodeBlockSizes(block_k=16, num_splits=2)),
    PagedCase("G2_T2_page16_gathered_tile32_zero_mid_page_padded_head", 2, 4, 2, 24, 16, (37, 0, 16),
              block_sizes=DecodeBlockSizes(block_k=32, num_splits=2)),
]


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=needs_gpu)], ids=["interpret", "compiled"])
@pytest.mark.parametrize("case", PAGED_CASES, ids=str)
def test_kernel_matches_float64_oracle(case, compiled):
    q, key_pages, value_pages, table, lengths, (k, v) = paged_case_inputs(case)
    rules = dict(case.rules)
    out = paged_decode_attention(q, key_pages, value_pages, table, jnp.asarray(lengths),
                                 block_sizes=case.block_sizes, interpret=not compiled, **rules)
    assert out.dtype == q.dtype
    ref, _ = reference_attention(q, k, v, is_causal=True, query_offset=lengths - case.T, key_value_seq_lengths=lengths,
                                 **rules)
    tol = TOLERANCE_TF32 if compiled and case.dtype == "float32" else TOLERANCE[case.dtype]
    assert_close(out, ref, case.dtype, tol)


@needs_gpu
def test_attend_picks_the_compiled_kernel_for_decode():
    rng = np.random.default_rng(10)
    paged, dense = _paged(page_size=16, max_pages_per_row=4), KVCache.init(B, 64, K, H)
    for num_new in ([40, 3, 17], [1, 1, 1]):
        q, k, v, n = _step_inputs(rng, num_new)
        paged, dense = paged.update(k, v, num_new=n), dense.update(k, v, num_new=n)
    attend = jax.jit(lambda cache, q: cache.attend(q))
    assert "gqa_paged_decode_attention" in attend.trace(paged, q).lower().as_text()
    assert_close(attend(paged, q), np.asarray(dense.attend(q, implementation="xla")), "float32", TOLERANCE_TF32)


def test_kernel_gradients_match_oracle():
    case = PagedCase("grads", 1, 4, 2, 16, 16, (20, 9))
    q, key_pages, value_pages, table, lengths, (k, v) = paged_case_inputs(case, seed=1)
    d_out = np.random.default_rng(2).standard_normal(q.shape)

    def loss(q, key_pages, value_pages):
        out = paged_decode_attention(q, key_pages, value_pages, table, jnp.asarray(lengths), interpret=True)
        return jnp.sum(out * d_out)

    grads = jax.grad(loss, argnums=(0, 1, 2))(q, key_pages, value_pages)
    refs = reference_page_grads(case, q, key_pages, value_pages, table, lengths, (k, v), d_out)
    for got, ref, what in zip(grads, refs, ("d_query", "d_key_pages", "d_value_pages")):
        assert_close(got, ref, "float32", GRAD_TOLERANCE["float32"], what)


def _eqns(jaxpr):
    """The equations of ``jaxpr`` and of its sub-jaxprs (jit, custom_vjp, loops ...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    sub = sub.jaxpr
                if isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _eqns(sub)


@pytest.mark.parametrize("block_k, page_ids", [(16, ()), (32, (32,))], ids=["aligned", "gathered"])
def test_page_aligned_tiles_read_one_page_id_per_tile(block_k, page_ids):
    """The int32 reads of the kernel: the row's length and offset, then per tile its page id (a scalar) when
    ``page_size % block_k == 0``, else the page ids of its ``block_k`` keys."""
    case = PagedCase("path", 1, 4, 2, 16, 16, (40, 9), block_sizes=DecodeBlockSizes(block_k=block_k))
    q, key_pages, value_pages, table, lengths, _ = paged_case_inputs(case)
    jaxpr = jax.make_jaxpr(lambda *args: paged_decode_attention(*args, block_sizes=case.block_sizes))(
        q, key_pages, value_pages, table, jnp.asarray(lengths))
    (call,) = [eqn for eqn in _eqns(jaxpr.jaxpr) if eqn.primitive.name == "pallas_call"]
    reads = [out.aval.shape for eqn in _eqns(call.params["jaxpr"]) if eqn.primitive.name in ("get", "masked_load")
             for out in eqn.outvars if out.aval.dtype == jnp.int32]
    assert reads == [(), (), page_ids]


def test_default_tiles_are_page_aligned_where_measured():
    # The table's tile of 128 keys (H=128 bf16) becomes 64 at pages of 64, stays 128 at 128 and 256; pages whose
    # common power of two with it is under 64 keep the gather at 128.
    assert [page_aligned_block_k(128, page) for page in (64, 128, 256, 192, 32, 16, 48, 24)] == [
        64, 128, 128, 64, 128, 128, 128, 128]
    case = PagedCase("default", 1, 4, 2, 128, 64, (200, 9), dtype="bfloat16")
    q, key_pages, value_pages, table, lengths, _ = paged_case_inputs(case)
    jaxpr = jax.make_jaxpr(paged_decode_attention)(q, key_pages, value_pages, table, jnp.asarray(lengths))
    (call,) = [eqn for eqn in _eqns(jaxpr.jaxpr) if eqn.primitive.name == "pallas_call"]
    reads = [out.aval.shape for eqn in _eqns(call.params["jaxpr"]) if eqn.primitive.name in ("get", "masked_load")
             for out in eqn.outvars if out.aval.dtype == jnp.int32]
    assert reads == [(), (), ()]  # one page id per tile: the page-aligned path


@pytest.mark.parametrize("case", [PAGED_CASES[1], PAGED_CASES[2]], ids=["aligned", "gathered"])
def test_kernel_lowers_to_triton(case):
    q, key_pages, value_pages, table, lengths, _ = paged_case_inputs(case)
    fn = jax.jit(lambda *args: paged_decode_attention(*args, block_sizes=case.block_sizes))
    text = fn.trace(q, key_pages, value_pages, table, jnp.asarray(lengths)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "gqa_paged_decode_attention" in text, "the Triton kernel is missing from the lowered module"


# ---------------------------------------------------------------------------
# generate on a paged cache.

V, D = 11, 16


@dataclasses.dataclass(frozen=True)
class OneLayer:
    """Embedding, one causal GQA attention layer with a residual, tied LM head; its cache is one cache in a tuple."""

    def apply(self, variables, tokens, cache=None, *, num_new=None):
        p = variables["params"]
        x = p["embed"][tokens]
        q, k, v = (jnp.einsum("btd,dnh->btnh", x, p[name]) for name in ("query", "key", "value"))
        if cache is None:
            out = gqa_jax.dot_product_attention(q, k, v, is_causal=True)
        else:
            (layer,) = cache
            layer = layer.update(k, v, num_new=num_new)
            out, cache = layer.attend(q, num_new=num_new), (layer,)
        logits = (x + jnp.einsum("btnh,nhd->btd", out, p["output"])) @ p["embed"].T
        return logits if cache is None else (logits, cache)


def _one_layer_params():
    rng = np.random.default_rng(8)
    shapes = dict(embed=(V, D), query=(D, N, H), key=(D, K, H), value=(D, K, H), output=(N, H, D))
    return {name: _normal(rng, shape) for name, shape in shapes.items()}


def test_generate_on_a_paged_cache_equals_the_uncached_pass():
    params, model = _one_layer_params(), OneLayer()
    prompt = np.random.default_rng(9).integers(0, V, (B, 6)).astype(np.int32)
    lengths = np.array([6, 2, 4], np.int32)
    expected = generate_without_cache(model, params, prompt, lengths, max_new_tokens=7)
    out = generate(model, params, prompt, lengths, max_new_tokens=7, cache=(_paged(num_pages=12, page_size=4),))
    np.testing.assert_array_equal(out.tokens, expected.tokens)
    assert not out.cache[0].overflowed.any()
    assert_pool_consistent(out.cache[0])
    with pytest.raises(ValueError, match=r"page pool cannot hold .* need 12 pages, num_free=11"):
        generate(model, params, prompt, lengths, max_new_tokens=7, cache=(_paged(num_pages=11, page_size=4),))
