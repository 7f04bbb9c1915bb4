"""One-argument self-attention, as flax's layers take it: ``layer(x)`` is ``layer(x, x)``, for both APIs.

Also runs the `GroupedQueryAttention` class docstring example, which calls the
layer with one argument, and checks that ``flax.linen.Sequential`` can hold it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import gqa_jax

X = jnp.asarray(np.random.default_rng(3).standard_normal((2, 6, 16)), jnp.float32)
LAYERS = {
    "GroupedQueryAttention": dict(head_dim=8, num_query_heads=4, num_key_value_heads=2),
    "MultiHeadAttention": dict(num_heads=2, key_dim=8),
    "CachedMultiHeadAttention": dict(num_heads=2, key_dim=8),
}


def test_one_argument_is_self_attention(api, random_params):
    for name, config in LAYERS.items():
        layer = getattr(api, name)(**config)
        params = random_params(layer, X, X, seed=1)
        one = layer.apply({"params": params}, X)
        two = layer.apply({"params": params}, X, X)
        np.testing.assert_array_equal(np.asarray(one), np.asarray(two), err_msg=f"{api.name} {name}")
        assert one.shape == X.shape


def test_the_class_docstring_example_runs():
    key, x = jax.random.key(0), X
    layer = gqa_jax.GroupedQueryAttention(head_dim=16, num_query_heads=8, num_key_value_heads=2)
    params = layer.init(key, x)["params"]                      # x: [B, T, D]
    y = layer.apply({"params": params}, x, use_causal_mask=True)  # [B, T, D]
    assert y.shape == x.shape
    ref = layer.apply({"params": params}, x, x, use_causal_mask=True)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(ref))


def test_the_layer_works_in_sequential():
    model = nn.Sequential([gqa_jax.GroupedQueryAttention(head_dim=8, num_query_heads=4, num_key_value_heads=2),
                           nn.Dense(3)])
    params = model.init(jax.random.key(1), X)
    assert model.apply(params, X).shape == (2, 6, 3)
