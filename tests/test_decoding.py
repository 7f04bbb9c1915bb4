"""Generation through the KV cache against a plain Python loop over full forward passes."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gqa_jax.decoding import Sampling, generate, generate_without_cache, sample_tokens
from gqa_jax.models import Decoder, DecoderConfig, init_cache, params_from_hf
from tests.test_models import random_hf_weights

# One layer: tests/test_models.py checks the cache through two layers; compiling is what takes time here.
CFG = DecoderConfig(vocab_size=29, num_layers=1, model_dim=32, num_heads=4, num_kv_heads=2, mlp_dim=48)
MODEL = Decoder(CFG)
B, P, M = 3, 6, 7  # batch, padded prompt length, max new tokens
CAPACITY = 2 * (P + M)  # one cache size (and one compiled loop) for all tests, continuation included
PAD = -1  # not a token id: a padding token must never reach the model


@functools.lru_cache(maxsize=None)
def _forward():
    return jax.jit(lambda params, tokens: Decoder(CFG).apply({"params": params}, tokens))


def _setup():
    rng = np.random.default_rng(107)
    params = params_from_hf(random_hf_weights(CFG, rng), CFG)
    lengths = np.array([6, 2, 4], np.int32)
    prompt = rng.integers(0, CFG.vocab_size, (B, P)).astype(np.int32)
    prompt[np.arange(P)[None, :] >= lengths[:, None]] = PAD
    return params, prompt, lengths


def greedy_oracle(params, prompt, lengths, max_new_tokens):
    """Greedy tokens ``[B, max_new_tokens]``: one full causal forward pass per step, in Python."""
    rows = np.arange(len(prompt))
    sequence = np.zeros((len(prompt), CAPACITY), np.int32)
    sequence[:, : prompt.shape[1]] = np.where(prompt == PAD, 0, prompt)
    position = np.array(lengths)
    out = []
    for _ in range(max_new_tokens):
        token = np.asarray(_forward()(params, sequence))[rows, position - 1].argmax(-1)
        sequence[rows, position] = token
        position += 1
        out.append(token)
    return np.stack(out, axis=1)


def _cache():
    return init_cache(CFG, B, CAPACITY)


def test_greedy_cached_equals_recomputing_with_ragged_prompts():
    params, prompt, lengths = _setup()
    expected = greedy_oracle(params, prompt, lengths, M)
    cached = generate(MODEL, params, prompt, lengths, max_new_tokens=M, cache=_cache(), pad_token=PAD)
    recomputed = generate_without_cache(MODEL, params, prompt, lengths, max_new_tokens=M, pad_token=PAD)
    np.testing.assert_array_equal(cached.tokens, expected)
    np.testing.assert_array_equal(recomputed.tokens, expected)
    np.testing.assert_array_equal(cached.num_generated, [M] * B)
    np.testing.assert_array_equal(cached.cache[0].lengths, lengths + M - 1)  # every new token but the last was fed


def test_rows_that_stop_early_stay_stopped():
    params, prompt, lengths = _setup()
    free = greedy_oracle(params, prompt, lengths, M)
    end = int(free[1, 1])  # row 1 stops at its second token at the latest
    for generate_fn in (generate, generate_without_cache):
        kwargs = dict(cache=_cache()) if generate_fn is generate else {}
        out = generate_fn(MODEL, params, prompt, lengths, max_new_tokens=M, end_token=end, pad_token=PAD, **kwargs)
        for b in range(B):
            hits = np.flatnonzero(free[b] == end)
            n = hits[0] + 1 if hits.size else M
            assert out.num_generated[b] == n
            np.testing.assert_array_equal(out.tokens[b, :n], free[b, :n])
            np.testing.assert_array_equal(out.tokens[b, n:], PAD)

    # identical rows stop together, at step 2 at the latest, and the loop ends there
    n = int(np.flatnonzero(free[1] == end)[0]) + 1
    same_prompt, same_lengths = np.tile(prompt[1], (B, 1)), np.tile(lengths[1], B)
    out = generate(MODEL, params, same_prompt, same_lengths, max_new_tokens=M, cache=_cache(), end_token=end,
                   pad_token=PAD)
    np.testing.assert_array_equal(out.tokens, np.tile(np.where(np.arange(M) < n, free[1], PAD), (B, 1)))
    np.testing.assert_array_equal(out.cache[0].lengths, same_lengths + n - 1)


def test_sampling_cached_equals_recomputing_for_the_same_key():
    params, prompt, lengths = _setup()
    sampling = Sampling(temperature=0.7, top_k=8, top_p=0.9)
    key = jax.random.key(np.random.default_rng(108).integers(2**31))
    cached = generate(MODEL, params, prompt, lengths, max_new_tokens=M, cache=_cache(), sampling=sampling, rng=key)
    recomputed = generate_without_cache(MODEL, params, prompt, lengths, max_new_tokens=M, sampling=sampling,
                                        rng=key)
    np.testing.assert_array_equal(cached.tokens, recomputed.tokens)


def test_prompts_continue_a_filled_cache():
    params, prompt, lengths = _setup()
    first = generate(MODEL, params, prompt, lengths, max_new_tokens=M, cache=_cache(), pad_token=PAD)
    # the cache holds each prompt and the new tokens but the last; new prompts continue from there
    second_prompt = np.roll(prompt, 1, axis=0)
    second_lengths = np.roll(lengths, 1)
    out = generate(MODEL, params, second_prompt, second_lengths, max_new_tokens=M, cache=first.cache, pad_token=PAD)
    joined = np.full((B, 2 * P + M - 1), PAD, np.int32)
    for b in range(B):
        row = np.concatenate([prompt[b, : lengths[b]], first.tokens[b, : M - 1], second_prompt[b, : second_lengths[b]]])
        joined[b, : len(row)] = row
    np.testing.assert_array_equal(out.tokens, greedy_oracle(params, joined, lengths + M - 1 + second_lengths, M))


def test_step_compiles_once_and_cache_is_donated():
    traces = []

    class CountingDecoder(Decoder):
        def __call__(self, tokens, cache=None, *, num_new=None):
            traces.append(tokens.shape)
            return super().__call__(tokens, cache, num_new=num_new)

    model = CountingDecoder(CFG)
    params, prompt, lengths = _setup()
    prompt = np.where(prompt == PAD, 0, prompt)  # the reversed lengths make some padding real tokens
    for new_lengths in (lengths, lengths[::-1]):
        cache = _cache()
        generate(model, params, prompt, new_lengths, max_new_tokens=M, cache=cache, end_token=3)
        assert all(layer.key.is_deleted() and layer.value.is_deleted() for layer in cache)
    assert traces == [(B, P), (B, 1)]  # one prefill and one step trace, none for the second call


@functools.lru_cache(maxsize=None)
def _sampler(sampling: Sampling):
    return jax.jit(lambda logits, key: sample_tokens(logits, key, sampling))


def _frequencies(probs, sampling, n=20000):
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(probs, jnp.float32)), (n, len(probs)))
    key = jax.random.key(np.random.default_rng(109).integers(2**31))
    tokens = np.asarray(_sampler(sampling)(logits, key))
    return np.bincount(tokens, minlength=len(probs)) / n


def test_sample_tokens_follows_the_rules():
    probs = np.array([0.1, 0.5, 0.05, 0.3, 0.05])
    logits = np.random.default_rng(110).standard_normal((4, 9)).astype(np.float32)
    np.testing.assert_array_equal(_sampler(Sampling())(logits, jax.random.key(0)), logits.argmax(-1))
    np.testing.assert_allclose(_frequencies(probs, Sampling(temperature=1.0)), probs, atol=0.015)
    tempered = probs**2 / np.sum(probs**2)
    np.testing.assert_allclose(_frequencies(probs, Sampling(temperature=0.5)), tempered, atol=0.015)
    top2 = np.array([0, 0.5, 0, 0.3, 0]) / 0.8
    np.testing.assert_allclose(_frequencies(probs, Sampling(temperature=1.0, top_k=2)), top2, atol=0.015)
    # top_p=0.7: 0.5 alone is short of 0.7, 0.5 + 0.3 reaches it
    np.testing.assert_allclose(_frequencies(probs, Sampling(temperature=1.0, top_p=0.7)), top2, atol=0.015)
    top3 = np.array([0.1, 0.5, 0, 0.3, 0]) / 0.9
    np.testing.assert_allclose(_frequencies(probs, Sampling(temperature=1.0, top_p=0.85)), top3, atol=0.015)


def test_bad_arguments():
    params, prompt, lengths = _setup()
    with pytest.raises(ValueError, match=r"capacity=10"):
        generate(MODEL, params, prompt, lengths, max_new_tokens=M, cache=init_cache(CFG, B, 10))
    with pytest.raises(ValueError, match=r"prompt_lengths=\[0, 2, 4\]"):
        generate(MODEL, params, prompt, np.array([0, 2, 4]), max_new_tokens=M)
    with pytest.raises(ValueError, match=r"prompt_lengths=\[7, 2, 4\]"):
        generate_without_cache(MODEL, params, prompt, np.array([7, 2, 4]), max_new_tokens=M)
    with pytest.raises(TypeError, match="prompt.dtype=float32"):
        generate(MODEL, params, prompt.astype(np.float32), lengths, max_new_tokens=M)
    with pytest.raises(ValueError, match=r"prompt_lengths.shape=\(2,\)"):
        generate(MODEL, params, prompt, lengths[:2], max_new_tokens=M)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        generate(MODEL, params, prompt, lengths, max_new_tokens=0)
    with pytest.raises(ValueError, match="needs an rng key"):
        generate(MODEL, params, prompt, lengths, max_new_tokens=M, sampling=Sampling(temperature=1.0))
    with pytest.raises(ValueError, match="top_k=40 must be <= the vocabulary size V=29"):
        jax.eval_shape(lambda: sample_tokens(jnp.zeros((2, 29)), jax.random.key(0), Sampling(1.0, top_k=40)))
    for bad, message in ((dict(temperature=-1.0), "temperature=-1.0"), (dict(temperature=1.0, top_k=0), "top_k=0"),
                         (dict(temperature=1.0, top_p=1.5), "top_p=1.5"), (dict(top_k=5), "top_k=5 .* temperature=0")):
        with pytest.raises(ValueError, match=message):
            Sampling(**bad)

