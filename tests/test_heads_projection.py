"""Head repetition/grouping and the einsum projections against NumPy."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gqa_jax import group_queries, project_heads, project_output, repeat_kv, ungroup_queries

rng = np.random.default_rng(0)


class HeadsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_repeat_kv_matches_numpy_repeat(self):
        x = jnp.asarray(rng.standard_normal((2, 5, 3, 4)), jnp.float32)
        out = self.variant(repeat_kv, static_argnums=1)(x, 4)
        chex.assert_shape(out, (2, 5, 12, 4))
        np.testing.assert_array_equal(np.asarray(out), np.repeat(np.asarray(x), 4, axis=2))

    @chex.variants(with_jit=True, without_jit=True)
    def test_group_then_ungroup_roundtrips_and_matches_repeat_order(self):
        q = jnp.asarray(rng.standard_normal((2, 3, 8, 4)), jnp.float32)
        grouped = self.variant(group_queries, static_argnums=1)(q, 2)
        chex.assert_shape(grouped, (2, 3, 2, 4, 4))
        # query head n = k * G + g reads KV head k, the head repeat_kv puts at n
        np.testing.assert_array_equal(np.asarray(grouped[:, :, 1, 3]), np.asarray(q[:, :, 7]))
        np.testing.assert_array_equal(np.asarray(ungroup_queries(grouped)), np.asarray(q))


def test_head_errors():
    with pytest.raises(ValueError, match=r"N=6 must be a multiple of num_kv_heads=4"):
        group_queries(jnp.zeros((1, 2, 6, 4)), 4)
    with pytest.raises(ValueError, match=r"num_groups must be a positive int, got num_groups=0"):
        repeat_kv(jnp.zeros((1, 2, 2, 4)), 0)
    with pytest.raises(ValueError, match=r"x.shape=\(2, 2, 4\)"):
        repeat_kv(jnp.zeros((2, 2, 4)), 2)


class ProjectionTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_projections_match_numpy(self):
        x = rng.standard_normal((2, 5, 12)).astype(np.float32)
        w_in, b_in = rng.standard_normal((12, 3, 4)).astype(np.float32), rng.standard_normal((3, 4)).astype(np.float32)
        w_out, b_out = rng.standard_normal((3, 4, 7)).astype(np.float32), rng.standard_normal((7,)).astype(np.float32)
        heads = self.variant(project_heads)(jnp.asarray(x), jnp.asarray(w_in), jnp.asarray(b_in))
        out = self.variant(project_output)(heads, jnp.asarray(w_out), jnp.asarray(b_out))
        expected_heads = np.einsum("btd,dnh->btnh", x, w_in) + b_in
        np.testing.assert_allclose(np.asarray(heads), expected_heads, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(out), np.einsum("btnh,nhd->btd", expected_heads, w_out) + b_out,
                                   rtol=1e-4, atol=1e-4)


def test_projection_gradients():
    x = jnp.asarray(rng.standard_normal((1, 3, 4)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((4, 2, 3)), jnp.float32)
    jax.test_util.check_grads(lambda x, w: project_heads(x, w), (x, w), order=1, modes=("rev",))


def test_projection_errors():
    with pytest.raises(ValueError, match=r"x.shape\[-1\]=5, kernel.shape\[0\]=4"):
        project_heads(jnp.zeros((1, 2, 5)), jnp.zeros((4, 2, 3)))
    with pytest.raises(ValueError, match=r"bias.shape=\(3,\) must equal kernel.shape\[1:\]=\(2, 3\)"):
        project_heads(jnp.zeros((1, 2, 4)), jnp.zeros((4, 2, 3)), jnp.zeros((3,)))
    with pytest.raises(ValueError, match=r"x.shape\[2:\]=\(2, 3\), kernel.shape\[:2\]=\(2, 4\)"):
        project_output(jnp.zeros((1, 2, 2, 3)), jnp.zeros((2, 4, 5)))
