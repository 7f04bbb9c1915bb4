"""Rotary embeddings against a NumPy implementation written from the formula (complex rotation)."""

from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from gqa_jax import apply_rope, rope_frequencies


def numpy_rope(x, positions, theta):
    """Pair ``i`` of a head vector, ``x[i] + 1j * x[i + H/2]``, times ``exp(1j * p * theta ** (-2i / H))``."""
    x = np.asarray(x, np.float64)
    H = x.shape[-1]
    pairs = x[..., : H // 2] + 1j * x[..., H // 2 :]
    freqs = theta ** (-np.arange(0, H, 2) / H)
    angles = np.asarray(positions, np.float64)[..., None, None] * freqs  # [B, T, 1, H/2]
    rotated = pairs * np.exp(1j * angles)
    return np.concatenate([rotated.real, rotated.imag], axis=-1)


def _rel_err(out, ref):
    out = np.asarray(out, np.float64)
    assert np.isfinite(out).all()
    return np.linalg.norm(out - ref) / np.linalg.norm(ref)


class RopeTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_formula_per_row_positions(self):
        rng = np.random.default_rng(11)
        for shape, theta in (((2, 7, 4, 16), 10000.0), ((3, 5, 1, 8), 500000.0)):  # [B,T,N,H] and [B,T,K,H]
            x = rng.standard_normal(shape).astype(np.float32)
            positions = rng.integers(0, 4096, shape[:2]).astype(np.int32)
            out = self.variant(lambda x, p: apply_rope(x, p, theta=theta))(x, positions)
            chex.assert_shape(out, shape)
            assert out.dtype == jnp.float32
            # float32 angles at positions up to 4096 round by up to 4096 * 2**-24 ~ 2.4e-4 rad.
            assert _rel_err(out, numpy_rope(x, positions, theta)) < 5e-4

    def test_bfloat16_in_bfloat16_out(self):
        x = np.random.default_rng(12).standard_normal((2, 6, 2, 32)).astype(np.float32)
        positions = np.arange(6)[None].repeat(2, 0) + np.array([[0], [100]])
        out = apply_rope(jnp.asarray(x, jnp.bfloat16), positions)
        assert out.dtype == jnp.bfloat16
        ref = numpy_rope(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32), positions, 10000.0)
        assert _rel_err(out, ref) < 1e-2

    def test_shared_positions_broadcast_over_rows(self):
        x = np.random.default_rng(13).standard_normal((3, 5, 2, 8)).astype(np.float32)
        positions = np.array([3, 9, 4, 0, 7], np.int32)
        chex.assert_trees_all_close(apply_rope(x, positions), apply_rope(x, np.tile(positions, (3, 1))))
        assert _rel_err(apply_rope(x, positions), numpy_rope(x, np.tile(positions, (3, 1)), 10000.0)) < 1e-5

    def test_scores_depend_only_on_position_difference(self):
        rng = np.random.default_rng(14)
        q = rng.standard_normal((1, 1, 1, 64)).astype(np.float32)
        k = rng.standard_normal((1, 1, 1, 64)).astype(np.float32)

        def score(m, n):
            qm = apply_rope(q, np.array([[m]]))
            kn = apply_rope(k, np.array([[n]]))
            return float(jnp.sum(qm * kn))

        base = score(5, 2)
        for shift in (1, 17, 300):
            np.testing.assert_allclose(score(5 + shift, 2 + shift), base, rtol=1e-4, atol=1e-4)
        assert abs(score(5, 3) - base) > 1e-3  # a different difference changes the score
        # the rotation keeps norms, and position 0 is the identity
        np.testing.assert_allclose(jnp.linalg.norm(apply_rope(q, np.array([[77]]))), np.linalg.norm(q), rtol=1e-5)
        np.testing.assert_allclose(apply_rope(q, np.array([[0]])), q, rtol=1e-6)

    def test_frequencies(self):
        np.testing.assert_allclose(rope_frequencies(8, 100.0), 100.0 ** (-np.arange(0, 8, 2) / 8), rtol=1e-6)

    def test_bad_inputs(self):
        x = jnp.ones((2, 3, 4, 8))
        cases = [
            (ValueError, "head_dim", lambda: apply_rope(jnp.ones((2, 3, 4, 7)), jnp.zeros((2, 3), int))),
            (ValueError, "rank 4", lambda: apply_rope(jnp.ones((2, 3, 8)), jnp.zeros((2, 3), int))),
            (ValueError, "positions.shape=(2, 4)", lambda: apply_rope(x, jnp.zeros((2, 4), int))),
            (ValueError, "positions.shape=(3, 3)", lambda: apply_rope(x, jnp.zeros((3, 3), int))),
            (TypeError, "float32", lambda: apply_rope(x, jnp.zeros((2, 3)))),
            (ValueError, "theta=1.0", lambda: apply_rope(x, jnp.zeros((2, 3), int), theta=1.0)),
        ]
        for error, message, call in cases:
            with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
                call()
