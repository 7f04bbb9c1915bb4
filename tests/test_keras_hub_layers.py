"""keras-hub's Llama and Gemma attention layers reproduced by `gqa_jax.modules.GroupedQueryAttention`.

The keras-hub layer is the oracle: same random weights (read with
`gqa_jax.keras_params`), same inputs and masks (built as keras-hub's decoder
blocks build them: causal, with padding, offset by the cache index); outputs
and written caches must match in float32. Llama's rotary embedding maps onto
``rope=gqa_jax.RotaryEmbedding(...)`` (with Llama 3.1's frequency scaling);
Gemma's onto the same rotary embedding, its ``logit_soft_cap``, sliding window
and query scale onto ``logits_soft_cap``, ``local_window_size`` and
``scale``. Gemma stores its rotated keys with the two halves interleaved
(``[x1_0, x2_0, x1_1, ...]``), which leaves the attention unchanged; the cache
cases reproduce that layout with ``qk_transform``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gqa_jax
from tests.kernel_cases import TOLERANCE_TF32

keras = pytest.importorskip("keras")
if keras.backend.backend() != "jax":
    pytest.skip(f"keras-hub tests need KERAS_BACKEND=jax, got {keras.backend.backend()}", allow_module_level=True)
keras_hub = pytest.importorskip("keras_hub", reason="keras-hub is not installed (it is in the test extra)")
from keras_hub.src.models.gemma.gemma_attention import CachedGemmaAttention  # noqa: E402
from keras_hub.src.models.llama.llama_attention import LlamaAttention  # noqa: E402

TOL = dict(rtol=2e-5, atol=2e-5) if jax.default_backend() == "cpu" else dict(rtol=TOLERANCE_TF32, atol=TOLERANCE_TF32)


def _random_weights(layer, rng, input_shape):
    """Builds ``layer`` and draws every weight from a seeded normal, ``1 / sqrt(shape[0])``."""
    layer.build(input_shape)
    layer.set_weights([rng.standard_normal(w.shape).astype(np.float32) / np.sqrt(w.shape[0]) for w in layer.weights])
    return layer


def _decoder_mask(padding_BS, T, S, index=0):
    """keras-hub's decoder mask: query ``t`` (at ``index + t``) sees keys ``s <= index + t`` that are not padding."""
    causal_TS = np.arange(S)[None, :] <= index + np.arange(T)[:, None]
    return causal_TS[None] & padding_BS[:, None, :].astype(bool)


def _interleave_halves(x):
    """Gemma's layout of a rotated head vector: ``[x1, x2] -> [x1_0, x2_0, x1_1, x2_1, ...]``."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.stack([x1, x2], axis=-1).reshape(x.shape)


def _gemma_layout(q, k, q_positions, k_positions):
    return _interleave_halves(q), None if k is None else _interleave_halves(k)


CACHE_ARGUMENTS = ("cache", "cache_update_index")


def _keras_hub(keras_layer, x, mask, *cache_and_index):
    """keras-hub's output (and updated cache, given ``cache, index``), jitted (op by op is slow on a CPU)."""
    def call(*c):
        return keras_layer(x, attention_mask=mask, **dict(zip(CACHE_ARGUMENTS, c)))

    return jax.jit(call)(*cache_and_index)


def _ours(ours, keras_layer, x, mask, *cache_and_index):
    """Our output (and updated cache) on ``keras_layer``'s weights, jitted."""
    def call(params, *c):
        return ours.apply({"params": params}, x, attention_mask=mask, **dict(zip(CACHE_ARGUMENTS, c)))

    return jax.jit(call)(gqa_jax.keras_params(keras_layer), *cache_and_index)


LLAMA_CASES = {
    "gqa2": dict(heads=(4, 2), theta=10000.0),
    "mqa_right_padding": dict(heads=(4, 1), theta=10000.0, padding=True),
    # Wavelengths 6.3, 167, 4443, 1.2e5 against 512 / 4 and 512 / 1: kept, blended, divided, divided.
    "mha_llama3_scaling": dict(heads=(4, 4), theta=500000.0, llama3=(8.0, 1.0, 4.0, 512)),
}


def _llama_pair(case, D):
    N, K = case["heads"]
    keras_fields, scaling = dict(rope_max_wavelength=case["theta"]), None
    if "llama3" in case:
        factor, low, high, context = case["llama3"]
        keras_fields.update(
            rope_frequency_adjustment_factor=factor,
            rope_low_freq_factor=low,
            rope_high_freq_factor=high,
            rope_pretraining_sequence_length=context,
        )
        scaling = gqa_jax.rope.Llama3RopeScaling(factor, low, high, context)
    keras_layer = LlamaAttention(num_query_heads=N, num_key_value_heads=K, **keras_fields)
    ours = gqa_jax.modules.GroupedQueryAttention(
        head_dim=D // N,
        num_query_heads=N,
        num_key_value_heads=K,
        use_bias=False,
        rope=gqa_jax.RotaryEmbedding(theta=case["theta"], scaling=scaling),
    )
    return keras_layer, ours


@pytest.mark.parametrize("name", sorted(LLAMA_CASES))
def test_llama_attention_matches_keras_hub(name):
    case = LLAMA_CASES[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    B, T, D = 2, 7, 32
    keras_layer, ours = _llama_pair(case, D)
    _random_weights(keras_layer, rng, (B, T, D))
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    padding = np.ones((B, T), bool)
    if case.get("padding"):
        padding[1, 4:] = False  # right padding: every query still sees its first key
    mask = _decoder_mask(padding, T, T)
    ref, got = _keras_hub(keras_layer, x, mask), _ours(ours, keras_layer, x, mask)
    assert got.shape == (B, T, D)
    np.testing.assert_allclose(got, ref, **TOL)


def test_llama_attention_cache_prefill_then_decode_matches_keras_hub():
    """A keras-hub cache ``[B, 2, S, K, H]``: prefill 4 tokens at index 0, then 2 at index 4; outputs and caches."""
    rng = np.random.default_rng(3)
    B, S, D, N, K = 2, 8, 32, 4, 2
    keras_layer, ours = _llama_pair(LLAMA_CASES["gqa2"], D)
    _random_weights(keras_layer, rng, (B, 4, D))
    ref_cache = got_cache = np.zeros((B, 2, S, K, D // N), np.float32)
    for index, T in ((0, 4), (4, 2)):
        x = rng.standard_normal((B, T, D)).astype(np.float32)
        mask = _decoder_mask(np.ones((B, S), bool), T, S, index)
        ref, ref_cache = _keras_hub(keras_layer, x, mask, ref_cache, index)
        got, got_cache = _ours(ours, keras_layer, x, mask, got_cache, index)
        np.testing.assert_allclose(got, ref, **TOL)
        np.testing.assert_allclose(got_cache, ref_cache, **TOL)
    assert np.abs(np.asarray(ref_cache)[:, :, :6]).min(axis=(0, 1, 3, 4)).max() > 0  # six positions written


GEMMA_CASES = {
    "mqa_left_padding": dict(heads=(4, 1), head_dim=8, D=32, padding=True),
    "gqa2_soft_cap_window": dict(heads=(4, 2), head_dim=8, D=32, soft_cap=2.0, window=3),
    "mha_head_dim_apart_from_model_dim": dict(heads=(2, 2), head_dim=16, D=24, query_head_dim_normalize=False),
}


def _gemma_pair(case, qk_transform=None):
    N, K = case["heads"]
    H, D, window = case["head_dim"], case["D"], case.get("window")
    keras_layer = CachedGemmaAttention(
        head_dim=H,
        num_query_heads=N,
        num_key_value_heads=K,
        logit_soft_cap=case.get("soft_cap"),
        use_sliding_window_attention=window is not None,
        sliding_window_size=window or 4096,
        query_head_dim_normalize=case.get("query_head_dim_normalize", True),
    )
    ours = gqa_jax.modules.GroupedQueryAttention(
        head_dim=H,
        num_query_heads=N,
        num_key_value_heads=K,
        use_bias=False,
        rope=gqa_jax.RotaryEmbedding(theta=10000.0),
        qk_transform=qk_transform,
        scale=None if case.get("query_head_dim_normalize", True) else (D // N) ** -0.5,
        logits_soft_cap=case.get("soft_cap"),
        local_window_size=None if window is None else (window - 1, 0),
    )
    return keras_layer, ours


@pytest.mark.parametrize("name", sorted(GEMMA_CASES))
def test_gemma_attention_matches_keras_hub(name):
    case = GEMMA_CASES[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    B, T = 2, 7
    keras_layer, ours = _gemma_pair(case)
    _random_weights(keras_layer, rng, (B, T, case["D"]))
    x = rng.standard_normal((B, T, case["D"])).astype(np.float32)
    padding = np.ones((B, T), bool)
    if case.get("padding"):
        padding[1, :2] = False  # left padding: row 1's first query sees no key (keras-hub and we give zeros)
    mask = _decoder_mask(padding, T, T)
    ref, got = _keras_hub(keras_layer, x, mask), _ours(ours, keras_layer, x, mask)
    assert got.shape == (B, T, case["D"])
    np.testing.assert_allclose(got, ref, **TOL)


def test_gemma_attention_cache_with_window_matches_keras_hub():
    """Prefill 5 tokens, then 1 and 2 through a window of 3; ``qk_transform`` stores keys in Gemma's layout."""
    rng = np.random.default_rng(4)
    case = dict(heads=(4, 2), head_dim=8, D=32, soft_cap=20.0, window=3)
    B, S, (N, K), H, D = 2, 8, case["heads"], case["head_dim"], case["D"]
    keras_layer, ours = _gemma_pair(case, qk_transform=_gemma_layout)
    _random_weights(keras_layer, rng, (B, 5, D))
    ref_cache = got_cache = np.zeros((B, 2, S, K, H), np.float32)
    for index, T in ((0, 5), (5, 1), (6, 2)):
        x = rng.standard_normal((B, T, D)).astype(np.float32)
        mask = _decoder_mask(np.ones((B, S), bool), T, S, index)
        ref, ref_cache = _keras_hub(keras_layer, x, mask, ref_cache, index)
        got, got_cache = _ours(ours, keras_layer, x, mask, got_cache, index)
        np.testing.assert_allclose(got, ref, **TOL)
        np.testing.assert_allclose(got_cache, ref_cache, **TOL)
