"""Hugging Face ports against ``transformers`` itself: tiny random models built offline from a config.

For each family (Llama 2 with attention biases, Llama 3 with its rotary
scaling, Mistral's sliding window, Qwen2's q/k/v biases and tied embeddings,
Gemma 2's soft-caps, alternating local/global layers, (1 + w) sandwich norms,
embedding scale, ``query_pre_attn_scalar`` and GeGLU), the torch model's
weights go through `gqa_jax.models.params_from_hf`, and then

* full causal passes give transformers' logits (float32 tolerances),
* a ragged prefill into the cache plus single-token steps gives the logits of
  transformers' full pass over each row alone,
* `gqa_jax.decoding.generate` (a ragged batch) gives transformers'
  ``generate(do_sample=False)`` tokens, row by row.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

transformers = pytest.importorskip("transformers", reason="the Hugging Face ports are tested against transformers")
torch = pytest.importorskip("torch", reason="transformers' models need torch")

from gqa_jax import decoding  # noqa: E402
from gqa_jax.models import Decoder, config_from_hf, init_cache, params_from_hf  # noqa: E402

SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=64, rms_norm_eps=1e-6)
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)  # short: the 8-wide heads have low, blended and high bands
FAMILIES = {
    "llama2": ("LlamaConfig", dict(num_key_value_heads=4, attention_bias=True)),
    "llama3": ("LlamaConfig", dict(rope_parameters=LLAMA3_ROPE)),
    "mistral": ("MistralConfig", dict(sliding_window=3)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "gemma2": ("Gemma2Config", dict(sliding_window=3, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                                    query_pre_attn_scalar=16)),
}
T = 9  # longer than the sliding windows


def _randomize(model, seed: int) -> None:
    """Weights that make every term matter: norms and biases away from 1 and 0, unit-scale projections."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):  # Gemma's (1 + w) norms are initialized to 0, the others to 1
                p.copy_(p + 0.2 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.3 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / p.shape[1] ** 0.5)


@functools.lru_cache(maxsize=None)
def hf_model(family: str):
    """``(torch model, its config)`` for ``family``, random, in float32 with eager attention."""
    config_class, fields = FAMILIES[family]
    config = getattr(transformers, config_class)(**{**SIZES, **fields}, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    _randomize(model, seed=len(family))
    return model, config


@functools.lru_cache(maxsize=None)
def ported(family: str):
    """``(Decoder, params, jitted full pass, jitted cached call)`` from the torch model's config and state dict."""
    model, hf_config = hf_model(family)
    config = config_from_hf(hf_config)
    state = {name: value.detach().numpy() for name, value in model.state_dict().items()}
    decoder = Decoder(config)
    forward = jax.jit(lambda params, tokens: decoder.apply({"params": params}, tokens))
    cached = jax.jit(lambda params, tokens, cache, num_new: decoder.apply({"params": params}, tokens, cache,
                                                                          num_new=num_new))
    return decoder, params_from_hf(state, config), forward, cached


def hf_logits(family: str, tokens: np.ndarray) -> np.ndarray:
    """transformers' float32 logits ``[B, T, V]``."""
    with torch.no_grad():
        return hf_model(family)[0](torch.as_tensor(tokens)).logits.numpy()


def _tokens(seed: int, shape) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, SIZES["vocab_size"], shape)


def test_configs_read_the_family_options():
    assert config_from_hf(hf_model("llama2")[1]).output_bias
    assert config_from_hf(hf_model("llama3")[1]).rope_scaling.original_max_position_embeddings == 16
    assert config_from_hf(hf_model("mistral")[1]).window(1) == 3
    qwen2 = config_from_hf(hf_model("qwen2")[1])
    assert qwen2.attention_bias and not qwen2.output_bias and qwen2.tie_embeddings
    gemma2 = config_from_hf(hf_model("gemma2")[1])
    assert (gemma2.window(0), gemma2.window(1)) == (3, None)
    assert gemma2.query_scale == 16**-0.5 and gemma2.activation == "gelu_tanh" and gemma2.sandwich_norms


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_full_pass_logits_equal_transformers(family):
    tokens = _tokens(1, (2, T))
    _, params, forward, _ = ported(family)
    np.testing.assert_allclose(forward(params, tokens), hf_logits(family, tokens), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cached_ragged_prefill_and_steps_equal_transformers_per_row(family):
    decoder, params, _, cached = ported(family)
    lengths, steps = np.array([T, 4, 1]), 2
    sequence = _tokens(2, (3, T + steps))
    cache = init_cache(decoder.config, 3, T + steps)
    prompt = np.where(np.arange(T)[None, :] < lengths[:, None], sequence[:, :T], 0)
    logits, cache = cached(params, prompt, cache, lengths)
    got = [np.asarray(logits)]
    rows = np.arange(3)
    for step in range(steps):
        logits, cache = cached(params, sequence[rows, lengths + step][:, None], cache, None)
        got.append(np.asarray(logits))
    for b, n in enumerate(lengths):
        expected = hf_logits(family, sequence[b : b + 1, : n + steps])[0]
        np.testing.assert_allclose(got[0][b, :n], expected[:n], rtol=1e-4, atol=1e-4)
        for step in range(steps):
            np.testing.assert_allclose(got[1 + step][b, 0], expected[n + step], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_generation_is_token_equal_to_transformers(family):
    decoder, params, _, _ = ported(family)
    lengths, new = np.array([6, 3]), 6
    prompt = _tokens(3, (2, 6))
    out = decoding.generate(decoder, params, prompt, lengths, max_new_tokens=new)
    model = hf_model(family)[0]
    for b, n in enumerate(lengths):
        with torch.no_grad():
            expected = model.generate(torch.as_tensor(prompt[b : b + 1, :n]), do_sample=False, max_new_tokens=new,
                                      min_new_tokens=new, eos_token_id=None, pad_token_id=0)
        np.testing.assert_array_equal(out.tokens[b], expected[0, n:].numpy())


@pytest.mark.parametrize("config_class, fields, field", [
    ("LlamaConfig", dict(mlp_bias=True), "mlp_bias=True"),
    ("LlamaConfig", dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0)), "rope_parameters="),
    ("LlamaConfig", dict(hidden_act="gelu"), "hidden_act='gelu'"),
    ("Gemma2Config", dict(use_bidirectional_attention=True), "use_bidirectional_attention=True"),
    ("Gemma2Config", dict(hidden_activation="silu"), "hidden_activation='silu'"),
    ("Gemma3TextConfig", {}, "model_type='gemma3_text'"),
])
def test_unsupported_configs_name_the_field(config_class, fields, field):
    config = getattr(transformers, config_class)(**{**SIZES, **fields})
    with pytest.raises(ValueError, match=f"{field}.* is not supported"):
        config_from_hf(config)
