"""keras-hub backbones through `gqa_jax.models.keras_hub.params_from_keras_hub`, against keras-hub itself.

Tiny random backbones built offline, one per family: Llama (untied LM head),
Llama 3.1's rotary scaling, Mistral's sliding window (and its own head dim),
Qwen2's q/k/v biases and tied embeddings with a linear rotary scaling, Gemma's
multi-query attention with a head dim apart from ``D / N``, and Gemma 2's
sandwich norms, soft-caps and alternating local/global layers. Our
`gqa_jax.models.Decoder` logits must equal the backbone's hidden states
projected by its token embedding (what keras-hub's ``*CausalLM`` returns), in
float32, in one pass and (the windowed families) through the decoder's cache;
settings the decoder does not compute are refused by name.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from gqa_jax.models import Decoder, init_cache

keras = pytest.importorskip("keras")
if keras.backend.backend() != "jax":
    pytest.skip(f"keras-hub tests need KERAS_BACKEND=jax, got {keras.backend.backend()}", allow_module_level=True)
keras_hub = pytest.importorskip("keras_hub", reason="keras-hub is not installed (it is in the test extra)")
from gqa_jax.models.keras_hub import params_from_keras_hub  # noqa: E402

SIZES = dict(vocabulary_size=64, num_layers=2, num_query_heads=4, num_key_value_heads=2, hidden_dim=32,
             intermediate_dim=48)
FAMILIES = {
    "llama": ("LlamaBackbone", dict(layer_norm_epsilon=1e-5)),
    # Wavelengths 6.3, 167, 4443, 1.2e5 of the 8-wide heads against 512 / 4 and 512 / 1: kept, blended, divided.
    "llama3_scaling_tied": ("Llama3Backbone", dict(
        rope_max_wavelength=500000, rope_frequency_adjustment_factor=8.0, rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0, rope_pretraining_sequence_length=512, tie_word_embeddings=True)),
    "mistral_window": ("MistralBackbone", dict(sliding_window=3, head_dim=16)),
    "qwen2_biases_linear_rope": ("QwenBackbone", dict(rope_scaling_factor=2.0)),
    "gemma_mqa": ("GemmaBackbone", dict(num_key_value_heads=1, head_dim=16, intermediate_dim=64)),
    "gemma2": ("GemmaBackbone", dict(
        head_dim=8, intermediate_dim=64, use_post_ffw_norm=True, use_post_attention_norm=True,
        attention_logit_soft_cap=5.0, final_logit_soft_cap=3.0, use_sliding_window_attention=True,
        sliding_window_size=3)),
}
B, T = 2, 9  # longer than the sliding windows


def _backbone(cls_name: str, seed: int, **fields):
    """A keras-hub backbone with seeded weights that make every term matter (norms and biases away from 1 and 0)."""
    backbone = getattr(keras_hub.models, cls_name)(**{**SIZES, **fields})
    rng = np.random.default_rng(seed)
    for weight in backbone.weights:
        noise = rng.standard_normal(weight.shape).astype(np.float32)
        if "norm" in weight.path:  # Gemma's (1 + w) norms are initialized to 0, the others to 1
            weight.assign(keras.ops.convert_to_numpy(weight.value) + 0.2 * noise)
        elif weight.path.endswith("bias"):
            weight.assign(0.3 * noise)
        elif "embedding" in weight.path:
            weight.assign(noise)
        else:
            weight.assign(noise / np.sqrt(backbone.hidden_dim))
    return backbone


def _keras_hub_logits(backbone, tokens):
    """keras-hub's causal-LM logits: the backbone's hidden states through its (reversed) token embedding."""

    def forward(tokens, padding_mask):
        hidden = backbone({"token_ids": tokens, "padding_mask": padding_mask})
        return backbone.token_embedding(hidden, reverse=True)

    return jax.jit(forward)(tokens, np.ones(tokens.shape, np.int32))


@functools.lru_cache(maxsize=None)
def _ported(family: str):
    """``(config, params, tokens, keras-hub logits)`` for the family's backbone, built once per test process."""
    cls_name, fields = FAMILIES[family]
    seed = sum(map(ord, family))
    backbone = _backbone(cls_name, seed, **fields)
    tokens = np.random.default_rng(seed).integers(0, SIZES["vocabulary_size"], (B, T), dtype=np.int32)
    config, params = params_from_keras_hub(backbone)
    return config, params, tokens, np.asarray(_keras_hub_logits(backbone, tokens))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_decoder_logits_match_keras_hub(family):
    config, params, tokens, expected = _ported(family)
    logits = jax.jit(lambda p, t: Decoder(config).apply({"params": p}, t))(params, tokens)
    assert logits.shape == (B, T, SIZES["vocabulary_size"])
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["gemma2", "mistral_window"])
def test_cached_prefill_and_steps_match_keras_hub(family):
    """A 5-token prefill into the decoder's cache, then two 2-token steps: keras-hub's full-pass logits."""
    config, params, tokens, expected = _ported(family)
    cached = jax.jit(lambda p, t, c: Decoder(config).apply({"params": p}, t, c))
    cache = init_cache(config, B, T)
    for start, stop in ((0, 5), (5, 7), (7, 9)):
        logits, cache = cached(params, tokens[:, start:stop], cache)
        np.testing.assert_allclose(logits, expected[:, start:stop], rtol=1e-4, atol=1e-4)


def test_gemma2_config_reads_the_layers():
    """The settings that keras-hub's Gemma 2 runs: windows on the even layers, caps, (1 + w) sandwich norms."""
    config, *_ = _ported("gemma2")
    assert config.layer_types == ("sliding_attention", "full_attention") and config.sliding_window == 3
    assert (config.attn_logit_soft_cap, config.final_logit_soft_cap) == (5.0, 3.0)
    assert config.sandwich_norms and config.norm_offset == 1.0 and config.tie_embeddings
    assert (config.mlp_dim, config.head_dim, config.activation) == (32, 8, "gelu_tanh")


REFUSED = {
    "rope_position_scaling_factor": ("LlamaBackbone", dict(rope_position_scaling_factor=2.0)),
    "use_sliding_window_attention": ("QwenBackbone", dict(use_sliding_window_attention=True)),
    "use_post_attention_norm": ("GemmaBackbone", dict(head_dim=8, use_post_attention_norm=True)),
    "layer_norm_epsilon": ("GemmaBackbone", dict(head_dim=8, layer_norm_epsilon=1e-5)),
    "Qwen3Backbone": ("Qwen3Backbone", dict(head_dim=8)),
}


@pytest.mark.parametrize("field", sorted(REFUSED))
def test_unsupported_backbones_are_refused_by_name(field):
    cls_name, fields = REFUSED[field]
    backbone = getattr(keras_hub.models, cls_name)(**{**SIZES, "num_layers": 1, **fields})
    with pytest.raises(ValueError, match=field):
        params_from_keras_hub(backbone)


def test_not_a_backbone_is_a_type_error():
    with pytest.raises(TypeError, match="keras_hub.models.Backbone, got dict"):
        params_from_keras_hub({})
