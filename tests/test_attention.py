"""`gqa_jax.dot_product_attention` on the XLA path against the float64 oracle and jax.nn."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.test_util import check_grads

import gqa_jax
from tests.kernel_cases import FlashKernelCases, assert_close
from tests.reference import reference_attention


def _normal(rng, shape, dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal(shape), dtype)


class TestXlaPath(FlashKernelCases):
    """The shared kernel cases (every mask kind, offsets, lengths, dtypes) on the XLA path."""

    def flash(self, q, k, v, bias=None, **rules):
        return gqa_jax.dot_product_attention(q, k, v, bias=bias, implementation="xla", **rules)

    @pytest.mark.parametrize("rules", [
        dict(is_causal=True),
        dict(is_causal=True, T=3, S=7),
        dict(is_causal=True, local_window_size=(2, 0), logits_soft_cap=2.0, segments=True),
        dict(query_seq_lengths=np.array([4, 0], np.int32), key_value_seq_lengths=np.array([6, 2], np.int32)),
        dict(bias=True),
    ], ids=["causal", "bottom_right", "window_softcap_segments", "lengths_with_zero", "bias"])
    def test_gradients(self, rules):
        """Numerical gradients of the XLA path, which the kernels' gradients are compared against."""
        rules = dict(rules)
        rng = np.random.default_rng(11)
        T, S = rules.pop("T", 6), rules.pop("S", 6)
        q, k, v = _normal(rng, (2, T, 4, 8)), _normal(rng, (2, S, 2, 8)), _normal(rng, (2, S, 2, 8))
        args = [q, k, v]
        if rules.pop("segments", False):
            rules["q_segment_ids"] = rules["kv_segment_ids"] = np.array([[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 2, 2]])
        if rules.pop("bias", False):
            args.append(_normal(rng, (2, 4, T, S)))

        def f(q, k, v, bias=None):
            return gqa_jax.dot_product_attention(q, k, v, bias, implementation="xla", **rules)

        check_grads(f, tuple(args), order=1, modes=("rev",), atol=1e-2, rtol=1e-2, eps=1e-2)


# ---------------------------------------------------------------------------
# Agreement with jax.nn.dot_product_attention where both apply.

JAX_NN_CASES = [
    dict(testcase_name="mha", N=4, K=4),
    dict(testcase_name="gqa", N=8, K=2),
    dict(testcase_name="mqa", N=4, K=1),
    dict(testcase_name="causal", N=8, K=2, is_causal=True),
    dict(testcase_name="causal_lengths", N=4, K=2, is_causal=True, lengths=True),
    dict(testcase_name="kv_lengths", N=4, K=2, kv_lengths=True),
    dict(testcase_name="window", N=4, K=2, local_window_size=(3, 2)),
    dict(testcase_name="window_causal", N=4, K=2, is_causal=True, local_window_size=(4, 0)),
    dict(testcase_name="bias_mask_scale", N=4, K=2, bias=True, mask=True, scale=0.2),
]


class JaxNnAgreementTest(chex.TestCase, parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*JAX_NN_CASES)
    def test_agrees_with_jax_nn(self, N, K, is_causal=False, lengths=False, kv_lengths=False,
                                local_window_size=None, bias=False, mask=False, scale=None):
        rng = np.random.default_rng(abs(hash((N, K, is_causal, lengths))) % 2**31)
        B, T, H = 2, 12, 16
        q, k, v = _normal(rng, (B, T, N, H)), _normal(rng, (B, T, K, H)), _normal(rng, (B, T, K, H))
        kw = dict(is_causal=is_causal, local_window_size=local_window_size, scale=scale)
        if lengths:
            kw["query_seq_lengths"] = jnp.array([12, 7], jnp.int32)
            kw["key_value_seq_lengths"] = jnp.array([12, 7], jnp.int32)
        if kv_lengths:
            kw["key_value_seq_lengths"] = jnp.array([12, 5], jnp.int32)
        bias_arr = _normal(rng, (B, N, T, T)) if bias else None
        mask_arr = None
        if mask:
            mask_arr = jnp.asarray(rng.random((B, N, T, T)) < 0.7).at[..., 0].set(True)  # no empty row
        ours = self.variant(lambda q, k, v: gqa_jax.dot_product_attention(q, k, v, bias_arr, mask_arr, **kw))(q, k, v)
        theirs = jax.nn.dot_product_attention(q, k, v, bias_arr, mask_arr, implementation="xla", **kw)
        chex.assert_shape(ours, (B, T, N, H))
        chex.assert_trees_all_close(ours, theirs, atol=2e-5, rtol=2e-5)


# ---------------------------------------------------------------------------
# Semantics users trip on.


def test_fully_masked_rows_are_zero_with_finite_gradients():
    rng = np.random.default_rng(3)
    q, k, v = _normal(rng, (2, 5, 4, 8)), _normal(rng, (2, 7, 2, 8)), _normal(rng, (2, 7, 2, 8))
    kv_len = jnp.array([0, 3], jnp.int32)
    bias = jnp.zeros((2, 4, 5, 7)).at[1, :, 2, :].set(-jnp.inf)  # row 2 of batch 1: every logit -inf

    def f(q, k, v):
        return gqa_jax.dot_product_attention(q, k, v, bias, key_value_seq_lengths=kv_len, implementation="xla")

    out = f(q, k, v)
    assert np.all(np.asarray(out[0]) == 0.0) and np.all(np.asarray(out[1, 2]) == 0.0)
    assert np.all(np.isfinite(np.asarray(out)))
    grads = jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2))(q, k, v)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
    assert np.all(np.asarray(grads[0][0]) == 0.0)


@pytest.mark.parametrize("T, S, lengths, expected", [
    (4, 4, None, [0, 0]),
    (3, 10, None, [7, 7]),
    (3, 10, (10, 6), [7, 3]),
])
def test_default_causal_offset_is_bottom_right(T, S, lengths, expected):
    """The last query sees exactly the keys up to the last valid key (T != S), top-left when T == S."""
    rng = np.random.default_rng(4)
    q, k, v = _normal(rng, (2, T, 2, 8)), _normal(rng, (2, S, 1, 8)), _normal(rng, (2, S, 1, 8))
    kv = None if lengths is None else jnp.array(lengths, jnp.int32)
    out = gqa_jax.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=kv)
    explicit = gqa_jax.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=kv,
                                             query_offset=jnp.array(expected, jnp.int32))
    ref, _ = reference_attention(q, k, v, is_causal=True, query_offset=np.array(expected),
                                 key_value_seq_lengths=None if kv is None else np.asarray(kv))
    np.testing.assert_allclose(np.asarray(out), np.asarray(explicit), atol=1e-6)
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 1.5e-2), (jnp.float16, 3e-3)])
def test_dtypes_keep_input_dtype(dtype, tol):
    rng = np.random.default_rng(5)
    q, k, v = _normal(rng, (2, 9, 6, 16), dtype), _normal(rng, (2, 11, 3, 16), dtype), _normal(rng, (2, 11, 3, 16), dtype)
    out = gqa_jax.dot_product_attention(q, k, v, is_causal=True)
    assert out.dtype == dtype
    ref, _ = reference_attention(q, k, v, is_causal=True)
    assert_close(out, ref, jnp.dtype(dtype).name, tol)


def test_return_weights_match_reference():
    rng = np.random.default_rng(6)
    q, k, v = _normal(rng, (2, 6, 4, 8)), _normal(rng, (2, 9, 2, 8)), _normal(rng, (2, 9, 2, 8))
    kv_len = jnp.array([9, 4], jnp.int32)
    out, weights = gqa_jax.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=kv_len,
                                                 return_weights=True)
    ref_out, ref_w = reference_attention(q, k, v, is_causal=True, key_value_seq_lengths=np.asarray(kv_len))
    chex.assert_shape(weights, (2, 4, 6, 9))
    np.testing.assert_allclose(np.asarray(weights), ref_w, atol=2e-6)
    np.testing.assert_allclose(np.asarray(out), ref_out, atol=2e-5)


def test_value_head_dim_may_differ():
    rng = np.random.default_rng(7)
    q, k, v = _normal(rng, (1, 5, 4, 8)), _normal(rng, (1, 7, 2, 8)), _normal(rng, (1, 7, 2, 24))
    out = gqa_jax.dot_product_attention(q, k, v)
    chex.assert_shape(out, (1, 5, 4, 24))
    np.testing.assert_allclose(np.asarray(out), reference_attention(q, k, v)[0], atol=2e-5)


def test_gqa_equals_mha_on_repeated_heads():
    rng = np.random.default_rng(8)
    q, k, v = _normal(rng, (2, 6, 8, 16)), _normal(rng, (2, 10, 2, 16)), _normal(rng, (2, 10, 2, 16))
    grouped = gqa_jax.dot_product_attention(q, k, v, is_causal=True)
    repeated = gqa_jax.dot_product_attention(q, gqa_jax.repeat_kv(k, 4), gqa_jax.repeat_kv(v, 4), is_causal=True)
    np.testing.assert_allclose(np.asarray(grouped), np.asarray(repeated), atol=1e-6)


def test_dropout_is_unbiased_and_keyed():
    rng = np.random.default_rng(9)
    q, k, v = _normal(rng, (1, 3, 2, 8)), _normal(rng, (1, 16, 1, 8)), _normal(rng, (1, 16, 1, 8))
    plain = gqa_jax.dot_product_attention(q, k, v)

    def dropped(key):
        return gqa_jax.dot_product_attention(q, k, v, dropout_rate=0.3, dropout_rng=key)

    a, b = dropped(jax.random.key(0)), dropped(jax.random.key(1))
    assert np.array_equal(np.asarray(a), np.asarray(dropped(jax.random.key(0))))
    assert not np.allclose(np.asarray(a), np.asarray(b))
    mean = jnp.mean(jax.vmap(dropped)(jax.random.split(jax.random.key(2), 4000)), axis=0)
    np.testing.assert_allclose(np.asarray(mean), np.asarray(plain), atol=0.03)
