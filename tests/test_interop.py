"""`keras_params`: Keras weights land in our params tree by name, with our shapes."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import gqa_jax

keras = pytest.importorskip("keras")


def _built(layer, rng, *shapes):
    layer.build(*shapes)
    layer.set_weights([rng.standard_normal(w.shape).astype(np.float32) for w in layer.weights])
    return layer


def _expected(layer):
    """Keras' own variables by path, e.g. {"query/kernel": array}."""
    return {"/".join(w.path.split("/")[-2:]): np.asarray(w.value) for w in layer.weights}


CASES = {
    "gqa_gate": (
        lambda: keras.layers.GroupQueryAttention(
            head_dim=4, num_query_heads=4, num_key_value_heads=2, use_gate=True, kernel_initializer="zeros"
        ),
        lambda: gqa_jax.GroupedQueryAttention(head_dim=4, num_query_heads=4, num_key_value_heads=2, use_gate=True),
        ((2, 3, 8), (2, 5, 6)),
    ),
    "gqa_no_bias": (
        lambda: keras.layers.GroupQueryAttention(
            head_dim=4, num_query_heads=2, num_key_value_heads=1, use_bias=False, kernel_initializer="zeros"
        ),
        lambda: gqa_jax.GroupedQueryAttention(head_dim=4, num_query_heads=2, num_key_value_heads=1, use_bias=False),
        ((2, 3, 8), (2, 5, 8)),
    ),
    "mha_rank4_output_shape": (
        lambda: keras.layers.MultiHeadAttention(
            num_heads=2, key_dim=3, value_dim=5, output_shape=(2, 4), attention_axes=(1, 2), kernel_initializer="zeros"
        ),
        lambda: gqa_jax.MultiHeadAttention(
            num_heads=2, key_dim=3, value_dim=5, output_shape=(2, 4), attention_axes=(1, 2)
        ),
        ((2, 3, 4, 6), (2, 3, 4, 7)),
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_keras_params_names_shapes_and_values(name):
    make_keras, make_ours, shapes = CASES[name]
    keras_layer = _built(make_keras(), np.random.default_rng(0), *shapes)
    params = gqa_jax.keras_params(keras_layer)
    inputs = [jax.ShapeDtypeStruct(s, np.float32) for s in shapes]
    ours = jax.eval_shape(lambda *x: make_ours().init(jax.random.key(0), *x), *inputs)["params"]
    assert jax.tree.map(lambda a: a.shape, params) == jax.tree.map(lambda a: a.shape, ours)
    flat = {f"{layer}/{var}": value for layer, variables in params.items() for var, value in variables.items()}
    expected = _expected(keras_layer)
    assert sorted(flat) == sorted(expected)
    for path, value in flat.items():
        np.testing.assert_array_equal(value, expected[path])


def test_keras_params_needs_a_built_attention_layer():
    with pytest.raises(ValueError, match="build the Keras layer first"):
        gqa_jax.keras_params(keras.layers.MultiHeadAttention(num_heads=2, key_dim=4))
    dense = keras.layers.Dense(3, kernel_initializer="zeros")
    dense.build((2, 4))
    with pytest.raises(TypeError, match="Dense has no _query_dense"):
        gqa_jax.keras_params(dense)
