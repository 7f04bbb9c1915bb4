"""The cache invariant for the layers: decoding through a cache equals one causal pass.

keras-hub caches (`GroupedQueryAttention` and `CachedMultiHeadAttention` with
``cache`` / ``cache_update_index``, scalar and per-row indices) and Flax's
decode mode (``decode=True``, the ``"cache"`` collection), token by token, in
chunks and ragged, under ``jax.jit``, ``nn.scan`` and ``nn.remat``. Tests
that take the ``api`` fixture run for the linen and the NNX layers (the NNX
decode cache as ``nnx.Cache`` state; see `tests.layer_apis`). The uncached
causal pass is itself checked against Keras in
``test_modules_keras_parity.py``.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gqa_jax
from tests.kernel_cases import TOLERANCE_TF32
from tests.layer_apis import LINEN

B, S, D, N, K, H = 2, 8, 8, 4, 2, 4
# Compiled float32 on a GPU/TPU may run its matrix products at lower precision (TF32, bfloat16 passes).
TOL = dict(rtol=2e-5, atol=2e-5) if jax.default_backend() == "cpu" else dict(rtol=TOLERANCE_TF32, atol=TOLERANCE_TF32)
GQA = dict(head_dim=H, num_query_heads=N, num_key_value_heads=K)


@pytest.fixture(scope="module")
def x():
    return jnp.asarray(np.random.default_rng(0).standard_normal((B, S, D)), jnp.float32)


@pytest.fixture
def gqa_params(x, random_params):
    return random_params(gqa_jax.GroupedQueryAttention(**GQA), x, x, seed=1)


@functools.partial(jax.jit, static_argnums=0)
def _causal_pass(api, params, x):
    return api.GroupedQueryAttention(**GQA).apply({"params": params}, x, x, use_causal_mask=True)


@pytest.fixture
def full(x, gqa_params):
    """The uncached causal pass [B, S, D] of the linen layer."""
    return _causal_pass(LINEN, gqa_params, x)


@pytest.fixture
def causal_pass(api, x, gqa_params):
    """The uncached causal pass [B, S, D] of ``api``'s layer."""
    return _causal_pass(api, gqa_params, x)


@functools.partial(jax.jit, static_argnums=0)
def _gqa_cache_step(api, params, cache, tokens, index):
    return api.GroupedQueryAttention(**GQA).apply(
        {"params": params}, tokens, tokens, cache=cache, cache_update_index=index, use_causal_mask=True
    )


@pytest.mark.parametrize("chunks", [(1,) * S, (3, 2, 1, 2)], ids=["token_by_token", "chunks"])
def test_gqa_keras_hub_cache_equals_causal_pass(api, x, gqa_params, causal_pass, chunks):
    full = causal_pass
    cache = jnp.zeros((B, 2, S, K, H))
    outputs, start = [], 0
    for size in chunks:
        out, cache = _gqa_cache_step(api, gqa_params, cache, x[:, start : start + size], start)
        outputs.append(out)
        start += size
    np.testing.assert_allclose(jnp.concatenate(outputs, axis=1), full, **TOL)
    assert cache.shape == (B, 2, S, K, H)


def test_gqa_keras_hub_cache_ragged_per_row_index(api, x, gqa_params, causal_pass):
    """Rows at different positions: prompts of 5 and 3 tokens (the second padded), then one token per step."""
    full = causal_pass
    lengths = np.array([5, 3])
    pad = jnp.asarray(np.random.default_rng(2).standard_normal((2, D)), jnp.float32)
    prompt = jnp.stack([x[0, :5], jnp.concatenate([x[1, :3], pad])])
    cache = jnp.zeros((B, 2, S, K, H))
    out, cache = _gqa_cache_step(api, gqa_params, cache, prompt, jnp.zeros(B, jnp.int32))
    np.testing.assert_allclose(out[0], full[0, :5], **TOL)
    np.testing.assert_allclose(out[1, :3], full[1, :3], **TOL)
    for _ in range(3):
        tokens = jnp.stack([x[0, lengths[0]], x[1, lengths[1]]])[:, None]
        out, cache = _gqa_cache_step(api, gqa_params, cache, tokens, jnp.asarray(lengths, jnp.int32))
        np.testing.assert_allclose(out[:, 0], full[np.arange(B), lengths], **TOL)
        lengths = lengths + 1


def test_gqa_static_cache_attends_to_the_cache_as_is(x, gqa_params):
    """Without an index the layer attends to the cached keys/values and ignores new ones."""
    rng = np.random.default_rng(3)
    query = jnp.asarray(rng.standard_normal((B, 3, D)), jnp.float32)
    mask = jnp.asarray(rng.random((B, 3, S)) < 0.7).at[:, :, 0].set(True)

    @jax.jit
    def run(params):
        layer = gqa_jax.GroupedQueryAttention(**GQA).bind({"params": params})
        _, cache = layer(x, x, cache=jnp.zeros((B, 2, S, K, H)), cache_update_index=0)
        out, returned = layer(query, None, cache=cache, attention_mask=mask)
        return out, layer(query, x, attention_mask=mask), returned, cache

    out, expected, returned, cache = run(gqa_params)
    np.testing.assert_allclose(out, expected, **TOL)
    np.testing.assert_array_equal(returned, cache)


def test_cached_multi_head_attention_keras_hub_loop_under_jit_scan(api, x, random_params):
    """keras-hub's usage: a [B, 1, S] causal attention_mask built by the caller, scalar index, lax.scan in jit."""
    config = dict(num_heads=N, key_dim=H)
    params = random_params(gqa_jax.MultiHeadAttention(**config), x, x, seed=4)
    full = jax.jit(lambda p: api.MultiHeadAttention(**config).apply(p, x, x, use_causal_mask=True))(
        {"params": params}
    )
    layer = api.CachedMultiHeadAttention(**config)

    def step(cache, t):
        token = jax.lax.dynamic_slice_in_dim(x, t, 1, axis=1)
        mask = jnp.broadcast_to(jnp.arange(S) <= t, (B, 1, S))
        out, cache = layer.apply(
            {"params": params}, token, token, attention_mask=mask, cache=cache, cache_update_index=t
        )
        return cache, out[:, 0]

    cache, outs = jax.jit(lambda c: jax.lax.scan(step, c, jnp.arange(S)))(jnp.zeros((B, 2, S, N, H)))
    np.testing.assert_allclose(jnp.swapaxes(outs, 0, 1), full, **TOL)
    assert cache[:, 0].any(axis=(0, 2, 3)).all()  # every position written
    assert isinstance(jax.eval_shape(layer.apply, {"params": params}, x, x), jax.ShapeDtypeStruct)  # output alone


def _decode_layer(api=LINEN):
    return api.GroupedQueryAttention(**GQA, decode=True)


@functools.partial(jax.jit, static_argnums=0)
def _decode_step(api, params, cache, tokens, num_new):
    out, variables = _decode_layer(api).apply(
        {"params": params, "cache": cache}, tokens, tokens, use_causal_mask=True, num_new=num_new, mutable=["cache"]
    )
    return out, variables["cache"]


def _empty_cache(params, x, api=LINEN):
    """The decode cache of capacity ``x.shape[1]``: what ``init`` allocates, without compiling the initializers."""
    _, variables = jax.jit(lambda p: _decode_layer(api).apply({"params": p}, x, x, mutable=["cache"]))(params)
    return variables["cache"]


def test_decode_mode_prompt_then_tokens_equals_causal_pass(api, x, gqa_params, causal_pass):
    """Flax decode: allocate with the max length, a 3-token prompt, a 2-token chunk, then single tokens."""
    full = causal_pass
    allocated = jax.eval_shape(_decode_layer(api).init, jax.random.key(0), x, x)["cache"]
    assert allocated["cached_key"].shape == (B, S, K, H) and allocated["cache_index"].shape == (B,)
    cache = _empty_cache(gqa_params, x, api)
    assert not cache["cache_index"].any() and not cache["cached_key"].any()
    outputs, start = [], 0
    for size in (3, 2, 1, 1, 1):
        out, cache = _decode_step(api, gqa_params, cache, x[:, start : start + size], None)
        outputs.append(out)
        start += size
    np.testing.assert_allclose(jnp.concatenate(outputs, axis=1), full, **TOL)
    np.testing.assert_array_equal(cache["cache_index"], [S, S])


def test_decode_mode_ragged_rows(api, x, gqa_params, causal_pass):
    """Per-row valid counts: prompts of 5 and 3 tokens in one padded batch, then one token per row per step."""
    full = causal_pass
    cache = _empty_cache(gqa_params, x, api)
    pad = jnp.asarray(np.random.default_rng(5).standard_normal((2, D)), jnp.float32)
    prompt = jnp.stack([x[0, :5], jnp.concatenate([x[1, :3], pad])])
    out, cache = _decode_step(api, gqa_params, cache, prompt, jnp.array([5, 3]))
    np.testing.assert_allclose(out[0], full[0, :5], **TOL)
    np.testing.assert_allclose(out[1, :3], full[1, :3], **TOL)
    np.testing.assert_array_equal(out[1, 3:], 0.0 * out[1, 3:] + gqa_params["attention_output"]["bias"])
    lengths = np.array([5, 3])
    for _ in range(3):
        tokens = jnp.stack([x[0, lengths[0]], x[1, lengths[1]]])[:, None]
        out, cache = _decode_step(api, gqa_params, cache, tokens, None)
        np.testing.assert_allclose(out[:, 0], full[np.arange(B), lengths], **TOL)
        lengths = lengths + 1
    np.testing.assert_array_equal(cache["cache_index"], lengths)


class _ScanStep(nn.Module):
    @nn.compact
    def __call__(self, carry, token):
        out = gqa_jax.GroupedQueryAttention(**GQA, decode=True, name="attention")(
            token[:, None], token[:, None], use_causal_mask=True
        )
        return carry, out[:, 0]


class _ScanDecoder(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        scan = nn.scan(
            _ScanStep,
            variable_broadcast="params",
            variable_carry="cache",
            split_rngs={"params": False},
            in_axes=1,
            out_axes=1,
        )
        return scan(name="scan")(None, tokens)[1]


def test_decode_mode_under_nn_scan(x, gqa_params, full):
    cache = _empty_cache(gqa_params, x)
    variables = {"params": {"scan": {"attention": gqa_params}}, "cache": {"scan": {"attention": cache}}}
    out, updated = jax.jit(lambda v: _ScanDecoder().apply(v, x, mutable=["cache"]))(variables)
    np.testing.assert_allclose(out, full, **TOL)
    np.testing.assert_array_equal(updated["cache"]["scan"]["attention"]["cache_index"], [S, S])


class _CausalBlock(nn.Module):
    """The Flax way to remat a layer whose call takes static flags: remat the block that passes them."""

    @nn.compact
    def __call__(self, x):
        return gqa_jax.GroupedQueryAttention(**GQA, name="attention")(x, x, use_causal_mask=True)


def test_remat_gives_the_same_gradients(x, gqa_params):
    plain_layer = gqa_jax.GroupedQueryAttention(**GQA)
    remat_layer = nn.remat(gqa_jax.GroupedQueryAttention)(**GQA)  # default flags: remat the layer itself

    def loss(block, params):
        return jnp.sum(block.apply({"params": {"attention": params}}, x) ** 2)

    @jax.jit
    def run(params):
        grads = [
            jax.grad(functools.partial(loss, block))(params) for block in (_CausalBlock(), nn.remat(_CausalBlock)())
        ]
        outs = [layer.apply({"params": params}, x, x) for layer in (plain_layer, remat_layer)]
        return grads, outs

    (expected, got), (plain_out, remat_out) = run(gqa_params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, expected)
    np.testing.assert_allclose(remat_out, plain_out, **TOL)
