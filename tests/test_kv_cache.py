"""KVCache and splice_cache: ragged writes, capacity rules, and the cache invariant."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gqa_jax
from gqa_jax import KVCache, splice_cache
from tests.reference import reference_attention

B, N, K, H, CAP = 3, 4, 2, 8, 24


def _normal(rng, shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _sequence(seed=0, length=20):
    rng = np.random.default_rng(seed)
    return _normal(rng, (B, length, N, H)), _normal(rng, (B, length, K, H)), _normal(rng, (B, length, K, H))


def _full_causal_reference(q, k, v, lengths):
    """Row b: causal attention over its own first lengths[b] tokens (float64 oracle)."""
    out, _ = reference_attention(q, k, v, is_causal=True, query_seq_lengths=np.asarray(lengths),
                                 key_value_seq_lengths=np.asarray(lengths))
    return out


@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_chunked_decoding_equals_full_causal_pass(chunk, jit):
    """Ragged prompts prefilled in one pass, then `chunk` tokens per step: same as one causal pass."""
    q, k, v = _sequence()
    prompt = np.array([5, 1, 8], np.int32)
    total = prompt + 9  # every row then decodes 9 more tokens

    def step(cache, q_new, k_new, v_new, num_new):
        cache = cache.update(k_new, v_new, num_new=num_new)
        return cache, cache.attend(q_new, num_new=num_new)

    step = jax.jit(step) if jit else step
    cache = KVCache.init(B, CAP, K, H)
    T0 = int(prompt.max())
    cache, out = step(cache, q[:, :T0], k[:, :T0], v[:, :T0], jnp.asarray(prompt))
    outputs = np.zeros((B, 20, N, H), np.float32)
    for b in range(B):
        outputs[b, :prompt[b]] = np.asarray(out[b, :prompt[b]])
    pos = prompt.copy()
    while (pos < total).any():
        n = np.minimum(chunk, total - pos).astype(np.int32)
        take = lambda x: jnp.stack([x[b, pos[b]:pos[b] + chunk] if pos[b] + chunk <= 20 else
                                    jnp.pad(x[b, pos[b]:], ((0, pos[b] + chunk - 20), (0, 0), (0, 0)))
                                    for b in range(B)])
        cache, out = step(cache, take(q), take(k), take(v), jnp.asarray(n))
        for b in range(B):
            outputs[b, pos[b]:pos[b] + n[b]] = np.asarray(out[b, :n[b]])
        pos += n
    np.testing.assert_array_equal(np.asarray(cache.lengths), total)
    expected = _full_causal_reference(q, k, v, total)
    for b in range(B):
        np.testing.assert_allclose(outputs[b, :total[b]], expected[b, :total[b]], atol=3e-5)


def test_update_writes_at_each_rows_length_and_skips_padding():
    rng = np.random.default_rng(1)
    cache = KVCache.init(B, CAP, K, H)
    first = _normal(rng, (B, 4, K, H))
    cache = cache.update(first, first, num_new=jnp.array([4, 2, 0]))
    second = _normal(rng, (B, 3, K, H))
    cache = cache.update(second, second * 2, num_new=jnp.array([3, 3, 1]))
    np.testing.assert_array_equal(np.asarray(cache.lengths), [7, 5, 1])
    keys = np.asarray(cache.key)
    np.testing.assert_array_equal(keys[0, :4], first[0]); np.testing.assert_array_equal(keys[0, 4:7], second[0])
    np.testing.assert_array_equal(keys[1, :2], first[1, :2]); np.testing.assert_array_equal(keys[1, 2:5], second[1])
    np.testing.assert_array_equal(keys[2, :1], second[2, :1])
    assert not np.any(keys[2, 1:]) and not np.any(keys[1, 5:])  # padding never written
    np.testing.assert_array_equal(np.asarray(cache.value)[1, 2:5], 2 * second[1])


def test_cache_is_a_pytree_that_jits_and_scans():
    cache = KVCache.init(2, 8, 1, 4)
    leaves = jax.tree_util.tree_leaves(cache)
    assert len(leaves) == 3
    tokens = jnp.ones((5, 2, 1, 1, 4))

    def body(c, kv):
        c = c.update(kv, kv)
        return c, c.lengths

    final, lengths = jax.lax.scan(body, cache, tokens)
    np.testing.assert_array_equal(np.asarray(lengths[:, 0]), np.arange(1, 6))
    chex.assert_shape(final.key, (2, 8, 1, 4))


def test_overflow_raises_when_concrete():
    cache = KVCache.init(1, 4, 1, 2)
    cache = cache.update(jnp.ones((1, 3, 1, 2)), jnp.ones((1, 3, 1, 2)))
    with pytest.raises(ValueError, match=r"writing \[2\] tokens at index=\[3\] exceeds the cache capacity S=4"):
        cache.update(jnp.ones((1, 2, 1, 2)), jnp.ones((1, 2, 1, 2)))


def test_overflow_under_jit_drops_tokens_and_reports():
    cache = KVCache.init(2, 4, 1, 2)
    update = jax.jit(lambda c, x, n: c.update(x, x, num_new=n))
    cache = update(cache, jnp.arange(12.0).reshape(2, 3, 1, 2), jnp.array([3, 1]))
    before = np.asarray(cache.key)
    cache = update(cache, 100 + jnp.arange(12.0).reshape(2, 3, 1, 2), jnp.array([3, 3]))
    np.testing.assert_array_equal(np.asarray(cache.overflowed), [True, False])
    np.testing.assert_array_equal(np.asarray(cache.lengths), [6, 4])
    after = np.asarray(cache.key)
    np.testing.assert_array_equal(after[0, :3], before[0, :3])  # earlier tokens intact
    np.testing.assert_array_equal(after[0, 3], [[100.0, 101.0]])  # the one that fit
    np.testing.assert_array_equal(after[1, 1:4], 100 + np.arange(6, 12.0).reshape(3, 1, 2))
    q = jnp.ones((2, 1, 1, 2))
    assert np.all(np.isfinite(np.asarray(cache.attend(q))))  # attention reads at most capacity keys


@pytest.mark.parametrize("index", [2, (0, 3)], ids=["scalar", "per_row"])
def test_splice_cache(index):
    rng = np.random.default_rng(2)
    cache = _normal(rng, (2, 6, 3))
    new = _normal(rng, (2, 2, 3))
    out = np.asarray(splice_cache(cache, new, jnp.asarray(index)))
    starts = np.broadcast_to(np.asarray(index), (2,))
    expected = np.asarray(cache).copy()
    for b in range(2):
        expected[b, starts[b]:starts[b] + 2] = new[b]
    np.testing.assert_array_equal(out, expected)


def test_splice_cache_never_clamps_onto_earlier_tokens():
    cache = jnp.zeros((2, 4, 1))
    new = jnp.ones((2, 2, 1))
    with pytest.raises(ValueError, match=r"at index=\[3, 0\] exceeds the cache capacity S=4"):
        splice_cache(cache, new, jnp.array([3, 0]))
    out = np.asarray(jax.jit(splice_cache)(cache, new, jnp.array([3, 0])))
    np.testing.assert_array_equal(out[0, :, 0], [0, 0, 0, 1])  # position 4 dropped, not shifted back
    np.testing.assert_array_equal(out[1, :, 0], [1, 1, 0, 0])


def test_splice_cache_errors():
    with pytest.raises(ValueError, match=r"must match cache \[B,S,...\] except on axis 1"):
        splice_cache(jnp.zeros((2, 4, 3)), jnp.zeros((2, 1, 5)), 0)
    with pytest.raises(ValueError, match=r"index must be a scalar or have shape \[B\]=\(2,\)"):
        splice_cache(jnp.zeros((2, 4, 3)), jnp.zeros((2, 1, 3)), jnp.array([0, 1, 2]))
    with pytest.raises(TypeError, match=r"index.dtype=float32"):
        splice_cache(jnp.zeros((2, 4, 3)), jnp.zeros((2, 1, 3)), jnp.array(1.0))
    with pytest.raises(ValueError, match=r"max_length must be a positive int, got max_length=0"):
        KVCache.init(1, 0, 1, 4)


def test_attend_matches_explicit_dot_product_attention():
    q, k, v = _sequence(seed=3, length=6)
    cache = KVCache.init(B, CAP, K, H).update(k, v)
    via_cache = cache.attend(q, local_window_size=(2, 0))
    direct = gqa_jax.dot_product_attention(q, cache.key, cache.value, is_causal=True, local_window_size=(2, 0),
                                           query_offset=0, key_value_seq_lengths=jnp.full((B,), 6))
    np.testing.assert_allclose(np.asarray(via_cache), np.asarray(direct), atol=1e-6)
