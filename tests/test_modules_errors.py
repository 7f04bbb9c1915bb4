"""Bad configurations and calls of the layers raise clear errors that name the values.

Tests that take the ``api`` fixture run for the linen and the NNX layers (`tests.layer_apis`).
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gqa_jax.modules.initializers import keras_initializer

GQA = dict(head_dim=4, num_query_heads=4, num_key_value_heads=2)


def _x(*shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _trace(layer, *args, params=None, **kwargs):
    """Runs ``layer`` abstractly (init if no params, else apply): shape errors surface without compiling."""
    if params is None:
        return jax.eval_shape(lambda: layer.init(jax.random.key(0), *args, **kwargs))
    return jax.eval_shape(lambda p: layer.apply({"params": p}, *args, **kwargs), params)


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda api: api.GroupedQueryAttention(head_dim=4, num_query_heads=6, num_key_value_heads=4),
            "num_query_heads=6 must be a multiple of num_key_value_heads=4",
        ),
        (
            lambda api: api.GroupedQueryAttention(head_dim=0, num_query_heads=4, num_key_value_heads=2),
            "head_dim must be a positive int, got head_dim=0",
        ),
        (lambda api: api.GroupedQueryAttention(**GQA, dropout=1.0), "dropout must be a float in"),
        (lambda api: api.GroupedQueryAttention(**GQA, sliding_window=0), "sliding_window must be a positive int"),
        (
            lambda api: api.MultiHeadAttention(num_heads=2, key_dim=4, flash_attention=True, implementation="xla"),
            "give flash_attention or implementation, not both",
        ),
        (
            lambda api: api.MultiHeadAttention(num_heads=2, key_dim=4, flash_attention="yes"),
            "flash_attention must be None, True or False",
        ),
        (lambda api: api.MultiQueryAttention(dim=10, heads=4), "dim=10 must be a multiple of heads=4"),
        (lambda api: api.MultiQueryAttention(dim=8, heads=2, clip_qkv=-1.0), "clip_qkv must be None or positive"),
    ],
)
def test_bad_configurations(api, make, match):
    with pytest.raises(ValueError, match=match):
        make(api)


def test_mismatched_inputs(api):
    layer = api.GroupedQueryAttention(**GQA)
    with pytest.raises(ValueError, match="key and value lengths S differ"):
        _trace(layer, _x(2, 3, 8), _x(2, 5, 8), _x(2, 6, 8))
    with pytest.raises(ValueError, match="batch sizes differ"):
        _trace(layer, _x(2, 3, 8), _x(3, 5, 8))
    with pytest.raises(ValueError, match="query must have rank 3"):
        _trace(layer, _x(2, 3, 4, 8), _x(2, 5, 8))
    params = _trace(layer, _x(2, 3, 8), _x(2, 5, 8))["params"]
    if api.name == "linen":
        error = flax.errors.ScopeParamShapeError
        features_differ = (
            r"expected to generate shape \(6, 4, 4\), but the existing parameter it received has shape \(8, 4, 4\)"
        )
    else:
        error, features_differ = ValueError, r"trailing dims must be in_shape=\(8,\), got x.shape=\(2, 3, 6\)"
    with pytest.raises(error, match=features_differ):
        _trace(layer, _x(2, 3, 6), _x(2, 5, 8), params=params)


def test_multi_head_attention_axes_and_ranks(api):
    with pytest.raises(ValueError, match="attention_axes must be distinct axes among"):
        _trace(api.MultiHeadAttention(num_heads=2, key_dim=4, attention_axes=(3,)), _x(2, 3, 4, 8), _x(2, 3, 4, 8))
    with pytest.raises(ValueError, match="use_causal_mask and sliding_window need one attention axis"):
        _trace(api.MultiHeadAttention(num_heads=2, key_dim=4), _x(2, 3, 4, 8), _x(2, 3, 4, 8), use_causal_mask=True)
    with pytest.raises(ValueError, match="must have one rank >= 3"):
        _trace(api.MultiHeadAttention(num_heads=2, key_dim=4), _x(2, 3, 8), _x(2, 3, 4, 8))
    with pytest.raises(
        ValueError, match=r"query_mask must have the input's shape without its feature axis, \(2, 3, 4\)"
    ):
        _trace(
            api.MultiHeadAttention(num_heads=2, key_dim=4),
            _x(2, 3, 4, 8),
            _x(2, 3, 4, 8),
            query_mask=jnp.ones((2, 12), bool),
        )
    with pytest.raises(ValueError, match="must agree on the batch axes"):
        _trace(api.MultiHeadAttention(num_heads=2, key_dim=4, attention_axes=2), _x(2, 3, 4, 8), _x(2, 5, 4, 8))


def test_cache_errors(api):
    layer = api.GroupedQueryAttention(**GQA)
    x = _x(2, 3, 8)
    params = _trace(layer, x, x)["params"]
    with pytest.raises(
        ValueError, match=r"cache must have shape \[B,2,S,K,H\]=\(2, 2, S, 2, 4\), got cache.shape=\(2, 2, 8, 4, 4\)"
    ):
        _trace(layer, x, x, params=params, cache=jnp.zeros((2, 2, 8, 4, 4)), cache_update_index=0)
    with pytest.raises(ValueError, match="query must have rank 3"):  # attending to a cache as is
        _trace(layer, _x(2, 1, 3, 8), None, params=params, cache=jnp.zeros((2, 2, 8, 2, 4)))
    with pytest.raises(ValueError, match="cache_update_index needs a cache"):
        _trace(layer, x, x, params=params, cache_update_index=0)
    with pytest.raises(ValueError, match="num_new is for decode=True"):
        _trace(layer, x, x, params=params, num_new=jnp.array([3, 3]))
    with pytest.raises(ValueError, match="decode=True keeps its own cache"):
        _trace(api.GroupedQueryAttention(**GQA, decode=True), x, x, params=params, cache=jnp.zeros((2, 2, 8, 2, 4)))
    cached = api.CachedMultiHeadAttention(num_heads=2, key_dim=4, value_dim=3)
    with pytest.raises(ValueError, match="a cache needs value_dim == key_dim"):
        _trace(
            cached, x, x, params=_trace(cached, x, x)["params"], cache=jnp.zeros((2, 2, 8, 2, 4)), cache_update_index=0
        )


def test_cache_index_out_of_range(api):
    """Concrete indices that write past the capacity raise (eagerly); under jit the extra tokens are dropped."""
    layer = api.GroupedQueryAttention(head_dim=2, num_query_heads=2, num_key_value_heads=1, use_bias=False)
    x = _x(1, 3, 4)
    params = {
        name: {"kernel": _x(*shape, seed=i)}
        for i, (name, shape) in enumerate(
            [("query", (4, 2, 2)), ("key", (4, 1, 2)), ("value", (4, 1, 2)), ("attention_output", (2, 2, 4))]
        )
    }
    with pytest.raises(ValueError, match=r"writing \[3\] tokens at index=\[6\] exceeds the cache capacity S=8"):
        layer.apply({"params": params}, x, x, cache=jnp.zeros((1, 2, 8, 1, 2)), cache_update_index=6)
    decode = api.GroupedQueryAttention(
        head_dim=2, num_query_heads=2, num_key_value_heads=1, use_bias=False, decode=True
    )
    cache = {
        "cached_key": jnp.zeros((1, 4, 1, 2)),
        "cached_value": jnp.zeros((1, 4, 1, 2)),
        "cache_index": jnp.array([2], jnp.int32),
    }
    with pytest.raises(ValueError, match="exceeds the cache capacity S=4"):
        decode.apply({"params": params, "cache": cache}, x, x, mutable=["cache"])


def test_multi_query_attention_call_errors(api):
    layer = api.MultiQueryAttention(dim=8, heads=2)
    x = _x(2, 3, 8)
    params = _trace(layer, x)["params"]
    with pytest.raises(ValueError, match=r"x must be \[B,T,dim\] with dim=8"):
        _trace(layer, _x(2, 3, 6), params=params)
    with pytest.raises(ValueError, match=r"mask \(key padding\) must have shape \[B,S\]=\(2, 3\)"):
        _trace(layer, x, params=params, mask=jnp.ones((2, 4), bool))
    with pytest.raises(ValueError, match="past_key_value must be"):
        _trace(layer, x, params=params, past_key_value=(jnp.zeros((2, 1, 1, 4)),))


def test_initializer_type_error():
    with pytest.raises(TypeError, match="an initializer must be callable or a Keras name"):
        keras_initializer(3)
