"""The quantized (int8 / float8_e4m3fn) PagedKVCache.

Ragged writes (prefills of different lengths, then 1-2 tokens per step) into
a pool whose free stack is shuffled, so the rows' pages interleave in no
order: the pages hold exactly what `gqa_jax.quantization.quantize` gives for
each row's tokens (read back page by page through the page table, in NumPy)
and what a quantized dense `gqa_jax.KVCache` fed the same tokens holds;
``attend`` equals the dense cache's and the float64 oracle's on the values
dequantized in float64. Eager and under jit, freeing and page reuse, the
default path on a GPU (the dense one: the paged kernels take no scales), bad
inputs, and greedy `generate` with the reference decoder on an int8 paged
cache against an int8 dense cache.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gqa_jax.paged_kv_cache
from gqa_jax import KVCache, PagedKVCache
from gqa_jax.decoding import generate
from gqa_jax.implementations import pallas_triton
from gqa_jax.models import Decoder, DecoderConfig, params_from_hf
from gqa_jax.quantization import quantize
from tests.kernel_cases import assert_close
from tests.reference import reference_attention
from tests.test_models import random_hf_weights

DTYPES = [jnp.int8, jnp.float8_e4m3fn]
DTYPE_IDS = ["int8", "fp8"]
B, N, K, H = 3, 4, 2, 8
NUM_PAGES, PAGE_SIZE, MAX_PAGES = 16, 4, 6
CAPACITY = MAX_PAGES * PAGE_SIZE  # the dense cache has the paged rows' capacity: the same attention shapes
# Prefills of different lengths, then 1-2 tokens per step (0: the row waits); rows grow in turn.
STEPS = [[5, 3, 9], [1, 2, 0], [2, 1, 1], [0, 2, 1], [1, 1, 2], [2, 0, 1]]


def _normal(rng, shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _step_inputs(rng, num_new):
    T = max(num_new)
    return _normal(rng, (B, T, N, H)), _normal(rng, (B, T, K, H)), _normal(rng, (B, T, K, H)), jnp.asarray(
        num_new, jnp.int32)


def _caches(dtype, rng):
    """An empty quantized paged cache whose free stack is a random permutation of the pages, and its dense twin."""
    paged = PagedKVCache.init(batch_size=B, num_pages=NUM_PAGES, page_size=PAGE_SIZE, num_kv_heads=K, head_dim=H,
                              max_pages_per_row=MAX_PAGES, dtype=dtype)
    paged = dataclasses.replace(paged, free_pages=jnp.asarray(rng.permutation(NUM_PAGES), jnp.int32))
    return paged, KVCache.init(B, CAPACITY, K, H, dtype=dtype)


def _row_tokens(pages, cache: PagedKVCache, row: int) -> np.ndarray:
    """Row ``row``'s stored tokens ``[n, ...]``, read page by page through its page table (NumPy)."""
    pages, table = np.asarray(pages.astype(jnp.float32)), np.asarray(cache.page_table)[row]
    n = int(cache.stored_lengths[row])
    return np.concatenate([pages[table[j]] for j in range(-(-n // cache.page_size))])[:n]


def _dequantized64(cache: PagedKVCache) -> tuple[np.ndarray, np.ndarray]:
    """float64 ``[B, CAPACITY, K, H]`` keys and values: each row's stored tokens times their scales, zeros after."""
    out = []
    for values, scales in ((cache.key_pages, cache.key_scale_pages), (cache.value_pages, cache.value_scale_pages)):
        dense = np.zeros((B, CAPACITY, K, H))
        for b in range(B):
            x = _row_tokens(values, cache, b).astype(np.float64) * _row_tokens(scales, cache, b)[..., None]
            dense[b, :len(x)] = x
        out.append(dense)
    return out[0], out[1]


def _assert_stores(paged: PagedKVCache, dense: KVCache, history) -> None:
    """Each row holds ``quantize`` of its tokens (``history[b] = (keys, values)`` ``[n, K, H]``), as the dense cache."""
    stored = ((paged.key_pages, paged.key_scale_pages, dense.key, dense.key_scale),
              (paged.value_pages, paged.value_scale_pages, dense.value, dense.value_scale))
    for b in range(B):
        n = int(paged.lengths[b])
        for (pages, scale_pages, dense_values, dense_scales), tokens in zip(stored, history[b]):
            values, scales = quantize(tokens, paged.key_pages.dtype)
            got_values, got_scales = _row_tokens(pages, paged, b), _row_tokens(scale_pages, paged, b)
            np.testing.assert_array_equal(got_values, np.asarray(values.astype(jnp.float32)), err_msg=f"row {b}")
            np.testing.assert_array_equal(got_scales, np.asarray(scales), err_msg=f"row {b} scales")
            np.testing.assert_array_equal(got_values, np.asarray(dense_values[b, :n].astype(jnp.float32)))
            np.testing.assert_array_equal(got_scales, np.asarray(dense_scales[b, :n]))


def _assert_attends(out, dense_out, paged: PagedKVCache, q, n) -> None:
    """``out`` equals the dense cache's ``attend`` and the float64 oracle on the dequantized pages."""
    np.testing.assert_allclose(out, dense_out, rtol=1e-6, atol=1e-6)
    k64, v64 = _dequantized64(paged)
    lengths = np.asarray(paged.lengths)
    ref, _ = reference_attention(q, k64, v64, is_causal=True, query_offset=lengths - np.asarray(n),
                                 query_seq_lengths=n, key_value_seq_lengths=lengths)
    assert_close(out, ref, "float32")


def _step(paged, dense, q, k, v, n):
    paged, dense = paged.update(k, v, num_new=n), dense.update(k, v, num_new=n)
    return paged, dense, paged.attend(q, num_new=n), dense.attend(q, num_new=n)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_ragged_writes_store_quantized_tokens_and_attend_like_the_dense_cache(dtype, jit):
    rng = np.random.default_rng(0)
    paged, dense = _caches(dtype, rng)
    assert paged.is_quantized and paged.key_pages.dtype == dtype
    assert paged.key_scale_pages.shape == (NUM_PAGES, PAGE_SIZE, K) and paged.key_scale_pages.dtype == jnp.float32
    step = jax.jit(lambda *args: _step(*args)) if jit else _step  # a new function: its own compilation cache
    history = [(np.zeros((0, K, H), np.float32),) * 2 for _ in range(B)]
    for num_new in STEPS:
        q, k, v, n = _step_inputs(rng, num_new)
        paged, dense, out, dense_out = step(paged, dense, q, k, v, n)
        history = [(np.concatenate([hk, k[b, :c]]), np.concatenate([hv, v[b, :c]]))
                   for b, ((hk, hv), c) in enumerate(zip(history, num_new))]
        _assert_attends(out, dense_out, paged, q, n)
    _assert_stores(paged, dense, history)
    np.testing.assert_array_equal(paged.lengths, [sum(c) for c in zip(*STEPS)])
    table = np.asarray(paged.page_table)
    pages = [row[row >= 0] for row in table]
    assert any(np.any(np.diff(row) != 1) for row in pages), f"no row's pages are out of order: {table}"
    assert any(pages[0].min() < page < pages[0].max() for page in np.concatenate(pages[1:])), table
    if jit:
        assert step._cache_size() == 2  # T = 9, then T = 2


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_free_then_reuse_pages(dtype):
    rng = np.random.default_rng(1)
    paged, dense = _caches(dtype, rng)
    q, k, v, n = _step_inputs(rng, [7, 9, 4])
    paged, dense, *_ = _step(paged, dense, q, k, v, n)
    freed = set(np.asarray(paged.page_table)[1].tolist()) - {-1}
    paged = jax.jit(lambda c: c.free(1))(paged)
    dense = dataclasses.replace(dense, lengths=dense.lengths.at[1].set(0))  # the dense cache's row 1, emptied
    assert int(paged.lengths[1]) == 0 and int(paged.num_free) == NUM_PAGES - 2 - 1
    # Row 1 takes pages again, the freed ones first (they are on top of the stack): stale values and scales are
    # overwritten where the new tokens go and masked after them.
    q, k2, v2, n = _step_inputs(rng, [1, 6, 2])
    paged, dense, out, dense_out = _step(paged, dense, q, k2, v2, n)
    assert set(np.asarray(paged.page_table)[1].tolist()) - {-1} <= freed
    _assert_attends(out, dense_out, paged, q, n)
    history = [(np.concatenate([k[b, :c0], k2[b, :c1]]), np.concatenate([v[b, :c0], v2[b, :c1]]))
               for b, c0, c1 in zip(range(B), [7, 0, 4], [1, 6, 2])]
    _assert_stores(paged, dense, history)


def test_default_path_on_a_gpu_is_the_dense_one(monkeypatch):
    """On a GPU, ``paged_kernel=None`` sends a quantized cache's decode step to `gqa_jax.dot_product_attention` with
    its scales (the Triton decode kernel in interpret mode here), never to the paged kernel."""
    def refuse(*args, **kwargs):
        raise AssertionError("the paged decode kernel was called on a quantized cache")

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(pallas_triton, "interpret", True)
    monkeypatch.setattr(gqa_jax.paged_kv_cache, "paged_decode_attention", refuse)
    rng = np.random.default_rng(2)
    paged, _ = _caches(jnp.int8, rng)
    for num_new in ([6, 2, 9], [1, 1, 1]):
        q, k, v, n = _step_inputs(rng, num_new)
        paged = paged.update(k, v, num_new=n)
    out = paged.attend(q)
    k64, v64 = _dequantized64(paged)
    lengths = np.asarray(paged.lengths)
    ref, _ = reference_attention(q, k64, v64, is_causal=True, query_offset=lengths - 1, key_value_seq_lengths=lengths)
    assert_close(out, ref, "float32")


def _bad_calls():
    rng = np.random.default_rng(3)
    paged, _ = _caches(jnp.int8, rng)
    q, k, v, n = _step_inputs(rng, [2, 2, 2])
    written = paged.update(k, v, num_new=n)
    return [
        ("int8_keys", lambda: paged.update(k.astype(jnp.int8), v.astype(jnp.int8)), TypeError,
         r"a quantized cache takes floating key_new and value_new, got key_new.dtype=int8, value_new.dtype=int8 "
         r"for cache.key_pages.dtype=int8"),
        ("mixed_kinds", lambda: paged.update(k, v.astype(jnp.int32)), TypeError,
         "key_new.dtype=float32, value_new.dtype=int32"),
        ("value_heads", lambda: paged.update(k, v[:, :, :1]), ValueError,
         r"value_new must have shape \[B,T,K,Hv\]=\(3, T, 2, 8\)"),
        ("paged_kernel", lambda: written.attend(q, paged_kernel=True), ValueError,
         r"take no scales, got paged_kernel=True on a quantized cache \(key_pages.dtype=int8\)"),
        ("int16_cache", lambda: PagedKVCache.init(batch_size=1, num_pages=2, page_size=4, num_kv_heads=1, head_dim=4,
                                                  max_pages_per_row=2, dtype=jnp.int16), TypeError,
         "or int8 / float8_e4m3fn .*got dtype=int16"),
    ]


BAD_CALLS = _bad_calls()


@pytest.mark.parametrize("name, call, error, match", BAD_CALLS, ids=[call[0] for call in BAD_CALLS])
def test_bad_inputs(name, call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_generate_on_an_int8_paged_cache_equals_an_int8_dense_cache():
    """Greedy decoding with the reference decoder, ragged prompts: the same tokens, the same stored cache."""
    cfg = DecoderConfig(vocab_size=64, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2, mlp_dim=64,
                        dtype=jnp.bfloat16)
    rng = np.random.default_rng(4)
    params = params_from_hf(random_hf_weights(cfg, rng), cfg)
    batch, prompt_length, new_tokens, page_size = 4, 7, 9, 4
    prompt = rng.integers(0, cfg.vocab_size, (batch, prompt_length)).astype(np.int32)
    lengths = np.array([7, 2, 5, 4], np.int32)
    max_pages = -(-(prompt_length + new_tokens) // page_size)
    paged = tuple(PagedKVCache.init(batch_size=batch, num_pages=batch * max_pages, page_size=page_size,
                                    num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, max_pages_per_row=max_pages,
                                    dtype=jnp.int8) for _ in range(cfg.num_layers))
    dense = tuple(KVCache.init(batch, max_pages * page_size, cfg.num_kv_heads, cfg.head_dim, dtype=jnp.int8)
                  for _ in range(cfg.num_layers))
    model = Decoder(cfg)
    on_pages = generate(model, params, prompt, lengths, max_new_tokens=new_tokens, cache=paged)
    on_dense = generate(model, params, prompt, lengths, max_new_tokens=new_tokens, cache=dense)
    np.testing.assert_array_equal(on_pages.tokens, on_dense.tokens)
    for layer_paged, layer_dense in zip(on_pages.cache, on_dense.cache):
        np.testing.assert_array_equal(layer_paged.lengths, layer_dense.lengths)
        for b in range(batch):
            n = int(layer_paged.lengths[b])
            np.testing.assert_array_equal(_row_tokens(layer_paged.key_pages, layer_paged, b),
                                          np.asarray(layer_dense.key[b, :n].astype(jnp.float32)))
            np.testing.assert_array_equal(_row_tokens(layer_paged.value_scale_pages, layer_paged, b),
                                          np.asarray(layer_dense.value_scale[b, :n]))
