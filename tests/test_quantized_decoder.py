"""The end-to-end effect of a quantized KV cache on the reference decoder (`gqa_jax.models`).

A random bfloat16 Llama-style model decodes eight seeded prompts through a
bfloat16 cache, and the same token sequences are fed (teacher-forced: prefill,
then one token per step) through int8 and float8_e4m3fn caches. The logits
of each step must stay close to the bfloat16 cache's and their argmax (the
greedy token) must agree almost everywhere; free-running greedy generation on
the quantized cache must start the same way. The bounds are about three
times the errors measured on three seeds (int8: at most 0.047, fp8: 0.13;
argmax agreement at least 0.98 and 0.96).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gqa_jax import KVCache
from gqa_jax.decoding import generate
from gqa_jax.models import Decoder, DecoderConfig, init_cache, params_from_hf
from tests.test_models import random_hf_weights

CFG = DecoderConfig(vocab_size=64, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, mlp_dim=96,
                    dtype=jnp.bfloat16)
MODEL = Decoder(CFG)
B, P, M = 8, 8, 12  # prompts, prompt length, new tokens
# Bounds per cache dtype: max |logit - bf16-cache logit| (logits have std ~1), and teacher-forced argmax agreement.
BOUNDS = {"int8": (0.15, 0.95), "fp8": (0.4, 0.9)}


def _cache(dtype):
    if dtype is None:
        return init_cache(CFG, B, P + M)
    return tuple(KVCache.init(B, P + M, CFG.num_kv_heads, CFG.head_dim, dtype=dtype) for _ in range(CFG.num_layers))


@jax.jit
def _step(params, tokens, cache):
    return MODEL.apply({"params": params}, tokens, cache)


def _forced_logits(params, sequence, dtype) -> np.ndarray:
    """float64 ``[B, M, V]``: the logits predicting each new token, the sequence fed through a cache of ``dtype``."""
    cache = _cache(dtype)
    logits, cache = _step(params, sequence[:, :P], cache)
    out = [logits[:, -1]]
    for i in range(P, P + M - 1):
        logits, cache = _step(params, sequence[:, i:i + 1], cache)
        out.append(logits[:, 0])
    return np.asarray(jnp.stack(out, axis=1), np.float64)


@pytest.fixture(scope="module")
def bf16_run():
    rng = np.random.default_rng(0)
    params = params_from_hf(random_hf_weights(CFG, rng), CFG)
    prompt = rng.integers(0, CFG.vocab_size, (B, P)).astype(np.int32)
    tokens = np.asarray(generate(MODEL, params, prompt, max_new_tokens=M, cache=_cache(None)).tokens)
    sequence = np.concatenate([prompt, tokens], axis=1)
    return params, prompt, tokens, _forced_logits(params, sequence, None), sequence


@pytest.mark.slow  # ~25 s on one CPU core: compiling the decoder's steps for three caches
@pytest.mark.parametrize("dtype", [jnp.int8, jnp.float8_e4m3fn], ids=["int8", "fp8"])
def test_quantized_cache_decodes_like_the_bf16_cache(bf16_run, dtype, request):
    params, prompt, tokens, reference, sequence = bf16_run
    max_error, min_agreement = BOUNDS[request.node.callspec.id]
    logits = _forced_logits(params, sequence, dtype)
    assert np.isfinite(logits).all()
    error = np.abs(logits - reference).max()
    assert error <= max_error, f"max logit error {error:.3f} > {max_error}"
    agreement = (logits.argmax(-1) == reference.argmax(-1)).mean()
    assert agreement >= min_agreement, f"greedy tokens agree at {agreement:.3f} < {min_agreement} of the steps"
    free = np.asarray(generate(MODEL, params, prompt, max_new_tokens=M, cache=_cache(dtype)).tokens)
    np.testing.assert_array_equal(free[:, 0], tokens[:, 0], err_msg="the first greedy token after the prompt")
