"""The NNX reference decoder: the linen decoder's parameter tree and numbers, and `gqa_jax.decoding.generate` for both.

Weights come from a random Hugging Face state dict through
`gqa_jax.models.params_from_hf`, so the HF port loads into either API.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gqa_jax.nnx
from gqa_jax import decoding, models
from tests.test_models import random_hf_weights

CONFIG = dict(vocab_size=16, num_layers=2, model_dim=16, num_heads=4, num_kv_heads=2, mlp_dim=24)


# Every option of the other families at once: biases, a sliding layer, soft-caps, Gemma's norms, GeGLU.
OPTIONS = dict(attention_bias=True, output_bias=True, sliding_window=3, layer_types=("sliding_attention",
               "full_attention"), query_scale=0.3, attn_logit_soft_cap=2.0, final_logit_soft_cap=3.0,
               activation="gelu_tanh", norm_offset=1.0, sandwich_norms=True, scale_embeddings=True)


def _perturbed(params, seed: int):
    """``params`` plus seeded noise: zero biases and norm scales become nonzero."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [w + 0.3 * jax.random.normal(k, w.shape, w.dtype) for w, k in zip(leaves, keys)])


def _models(tie_embeddings: bool, seed: int, options: bool = False):
    """The linen decoder with HF-ported params (or, with every option, perturbed init params), and the NNX one."""
    config = models.DecoderConfig(**CONFIG, tie_embeddings=tie_embeddings, **(OPTIONS if options else {}))
    if options:
        params = _perturbed(models.Decoder(config).init(jax.random.key(seed), jnp.zeros((1, 2), jnp.int32))["params"],
                            seed)
    else:
        params = models.params_from_hf(random_hf_weights(config, np.random.default_rng(seed)), config)
    nnx_model = nnx.eval_shape(lambda: gqa_jax.nnx.Decoder(config, rngs=nnx.Rngs(0)))
    return models.Decoder(config), params, gqa_jax.nnx.load_linen_params(nnx_model, params)


@pytest.mark.parametrize("tie_embeddings, options", [(False, False), (True, False), (True, True)],
                         ids=["lm_head", "tied", "every_option"])
def test_nnx_decoder_equals_linen_full_pass_and_cached_ragged_prefill(tie_embeddings, options):
    linen_model, params, nnx_model = _models(tie_embeddings, seed=1, options=options)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, CONFIG["vocab_size"], (2, 6)), jnp.int32)
    num_new = jnp.array([6, 4])

    def run(apply):  # one program per API: the same code compiles to the same numbers
        cache = models.init_cache(linen_model.config, 2, 8)
        logits, cache = apply(tokens, cache, num_new)
        step_logits, cache = apply(tokens[:, :1], cache, None)
        return apply(tokens, None, None), logits, step_logits, cache

    def linen_apply(params):
        return lambda t, c, n: linen_model.apply({"params": params}, t, c, **({} if c is None else {"num_new": n}))

    def nnx_apply(model):
        return lambda t, c, n: model(t, c, **({} if c is None else {"num_new": n}))

    expected = jax.jit(lambda p: run(linen_apply(p)))(params)
    got = nnx.jit(lambda m: run(nnx_apply(m)))(nnx_model)
    jax.tree.map(np.testing.assert_array_equal, got, expected)
    jax.tree.map(np.testing.assert_array_equal, gqa_jax.nnx.linen_params(nnx_model), params)


def test_generate_accepts_the_nnx_decoder():
    linen_model, params, nnx_model = _models(False, seed=3)
    prompt = jnp.asarray(np.random.default_rng(4).integers(0, CONFIG["vocab_size"], (2, 5)), jnp.int32)
    lengths = jnp.array([5, 2])
    expected = decoding.generate(linen_model, params, prompt, lengths, max_new_tokens=4)
    got = decoding.generate(nnx_model, None, prompt, lengths, max_new_tokens=4)
    np.testing.assert_array_equal(got.tokens, expected.tokens)
    np.testing.assert_array_equal(got.num_generated, expected.num_generated)
    with pytest.raises(TypeError, match="an NNX Decoder carries its own parameters: pass params=None"):
        decoding.generate(nnx_model, params, prompt, lengths, max_new_tokens=4)
