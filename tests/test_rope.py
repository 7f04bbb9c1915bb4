"""Rotary embeddings against a NumPy implementation written from the formula (complex rotation)."""

from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from gqa_jax import apply_rope, rope_frequencies
from gqa_jax.rope import LinearRopeScaling, Llama3RopeScaling, RotaryEmbedding


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


def hf_inv_freq(rotary_dim, theta, rope_scaling=None):
    """transformers' ``ROPE_INIT_FUNCTIONS`` (default, linear, llama3) re-derived in float64 NumPy."""
    inv_freq = 1.0 / theta ** (np.arange(0, rotary_dim, 2) / rotary_dim)
    kind = (rope_scaling or {}).get("rope_type", "default")
    if kind == "linear":
        return inv_freq / rope_scaling["factor"]
    if kind == "llama3":
        factor, low, high = rope_scaling["factor"], rope_scaling["low_freq_factor"], rope_scaling["high_freq_factor"]
        old_context = rope_scaling["original_max_position_embeddings"]
        wavelen = 2 * np.pi / inv_freq
        out = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = ~(wavelen < old_context / high) & ~(wavelen > old_context / low)
        return np.where(medium, smoothed, out)
    return inv_freq


def hf_apply_rotary(x, positions, inv_freq):
    """transformers' ``apply_rotary_pos_emb`` with partial rotary (GPT-NeoX / Phi layout), float64."""
    x = np.asarray(x, np.float64)
    R = 2 * inv_freq.shape[0]
    freqs = np.asarray(positions, np.float64)[..., None] * inv_freq  # [B, T, R/2]
    emb = np.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    x_rot, x_pass = x[..., :R], x[..., R:]
    rotate_half = np.concatenate([-x_rot[..., R // 2 :], x_rot[..., : R // 2]], axis=-1)
    return np.concatenate([x_rot * np.cos(emb) + rotate_half * np.sin(emb), x_pass], axis=-1)


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


class RotaryEmbeddingTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_transformers_formulas(self):
        rng = np.random.default_rng(21)
        x = rng.standard_normal((2, 5, 3, 32)).astype(np.float32)
        positions = rng.integers(0, 300, (2, 5)).astype(np.int32)
        cases = [
            ({"rope_theta": 10000.0}, 32, None),
            ({"rope_theta": 500000.0, "rope_scaling": LLAMA3}, 32, LLAMA3),
            ({"rope_theta": 1000.0, "rope_scaling": {"type": "linear", "factor": 4.0}}, 32,
             {"rope_type": "linear", "factor": 4.0}),
            ({"rope_theta": 10000.0, "partial_rotary_factor": 0.25, "head_dim": 32}, 8, None),
            ({"rope_theta": 10000.0, "partial_rotary_factor": 0.5, "rope_scaling": LLAMA3,
              "hidden_size": 96, "num_attention_heads": 3}, 16, LLAMA3),
        ]
        for config, rotary_dim, scaling in cases:
            rope = RotaryEmbedding.from_hf(config)
            inv_freq = hf_inv_freq(rotary_dim, config["rope_theta"], scaling)
            np.testing.assert_allclose(rope.frequencies(32), inv_freq, rtol=2e-6, err_msg=str(config))
            out = self.variant(rope.apply)(x, positions)
            assert out.dtype == jnp.float32
            # float32 angles at positions < 300 round by ~300 * 2**-24 rad.
            assert _rel_err(out, hf_apply_rotary(x, positions, inv_freq)) < 1e-5, config
            if rotary_dim < 32:
                np.testing.assert_array_equal(out[..., rotary_dim:], x[..., rotary_dim:])

    def test_llama3_scaling_regions(self):
        """Short wavelengths kept, long ones divided by factor, the middle strictly between."""
        scaling = Llama3RopeScaling(8.0, 1.0, 4.0, 64)
        base = np.asarray(rope_frequencies(32, 500000.0), np.float64)
        scaled = np.asarray(scaling.scale_frequencies(rope_frequencies(32, 500000.0)), np.float64)
        wavelength = 2 * np.pi / base
        short, long = wavelength < 16, wavelength > 64
        assert short.any() and long.any() and (~short & ~long).any()
        np.testing.assert_allclose(scaled[short], base[short], rtol=1e-6)
        np.testing.assert_allclose(scaled[long], base[long] / 8, rtol=1e-6)
        middle = ~short & ~long
        assert ((scaled[middle] < base[middle]) & (scaled[middle] > base[middle] / 8)).all()

    def test_apply_rope_is_the_default_embedding(self):
        x = np.random.default_rng(22).standard_normal((1, 4, 2, 16)).astype(np.float32)
        positions = np.array([[0, 3, 9, 200]], np.int32)
        np.testing.assert_array_equal(apply_rope(x, positions, theta=777.0),
                                      RotaryEmbedding(777.0).apply(x, positions))
        assert RotaryEmbedding.from_hf({"rope_type": "default"}) == RotaryEmbedding()
        assert RotaryEmbedding.from_hf(LLAMA3).scaling == Llama3RopeScaling(8.0, 1.0, 4.0, 64)
        # transformers 5 keeps theta and the scaling in rope_parameters
        rope = RotaryEmbedding.from_hf({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 50.0}})
        assert rope == RotaryEmbedding(50.0, scaling=LinearRopeScaling(2.0))

    def test_against_transformers_rope_init_functions(self):
        transformers = pytest.importorskip("transformers")
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=2, rope_theta=500000.0,
                                          rope_scaling=dict(LLAMA3), max_position_embeddings=512)
        inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
        assert attention_factor == 1.0
        rope = RotaryEmbedding.from_hf(config)
        np.testing.assert_allclose(rope.frequencies(32), inv_freq.numpy(), rtol=2e-6)

        import torch
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

        rng = np.random.default_rng(23)
        q = rng.standard_normal((2, 5, 2, 32)).astype(np.float32)  # [B, T, N, H]
        positions = rng.integers(0, 300, (2, 5))
        cos, sin = LlamaRotaryEmbedding(config)(torch.from_numpy(q), torch.from_numpy(positions))
        q_BNTH = torch.from_numpy(q.transpose(0, 2, 1, 3))
        expected, _ = apply_rotary_pos_emb(q_BNTH, q_BNTH, cos, sin)
        np.testing.assert_allclose(rope.apply(q, positions), expected.numpy().transpose(0, 2, 1, 3), atol=2e-5)

    def test_bad_settings(self):
        cases = [
            (ValueError, "rope_type='yarn' is not supported", lambda: RotaryEmbedding.from_hf({"rope_type": "yarn"})),
            (ValueError, "lacks \\['factor', 'low_freq_factor'", lambda: RotaryEmbedding.from_hf({"rope_type": "llama3"})),
            (ValueError, "rotary_dim=3", lambda: RotaryEmbedding(rotary_dim=3)),
            (ValueError, "theta=0.5", lambda: RotaryEmbedding(theta=0.5)),
            (ValueError, "factor=0", lambda: LinearRopeScaling(0)),
            (ValueError, "high_freq_factor=1.0 and low_freq_factor=2.0", lambda: Llama3RopeScaling(8.0, 2.0, 1.0, 64)),
            (TypeError, "scaling must be", lambda: RotaryEmbedding(scaling={"factor": 2.0})),
            (
                ValueError,
                "rotary_dim=16 and head_dim=8",
                lambda: RotaryEmbedding(rotary_dim=16).apply(jnp.ones((1, 2, 1, 8)), jnp.arange(2)),
            ),
            (ValueError, "needs head_dim", lambda: RotaryEmbedding.from_hf({"partial_rotary_factor": 0.5})),
        ]
        for error, message, call in cases:
            with pytest.raises(error, match=message):
                call()
