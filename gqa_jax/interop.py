"""Weights from Keras layers into the parameters of the `gqa_jax.modules` layers.

The `gqa_jax.nnx` layers have the same parameter tree: load the same dict
with `gqa_jax.nnx.load_linen_params(nnx_layer, keras_params(keras_layer))`.

Example::

    keras_layer = keras.layers.GroupQueryAttention(head_dim=16, num_query_heads=8, num_key_value_heads=2)
    keras_layer(x, x)  # builds it
    params = keras_params(keras_layer)
    ours = gqa_jax.GroupedQueryAttention(head_dim=16, num_query_heads=8, num_key_value_heads=2)
    y = ours.apply({"params": params}, x, x)
"""

from __future__ import annotations

import jax.numpy as jnp

# Our parameter names and the Keras attributes of the matching sublayers.
_SUBLAYERS = {
    "query": "_query_dense",
    "key": "_key_dense",
    "value": "_value_dense",
    "attention_output": "_output_dense",
    "gate": "_gate_dense",
}


def _array(variable) -> jnp.ndarray:
    """A Keras variable as a JAX array, whatever the Keras backend."""
    import keras  # the caller has a Keras layer, so Keras is installed

    return jnp.asarray(keras.ops.convert_to_numpy(variable.value))


def keras_params(keras_layer) -> dict:
    """The params tree of our layer from a built Keras attention layer.

    Works for ``keras.layers.GroupQueryAttention``, ``keras.layers.MultiHeadAttention``
    and subclasses (keras-hub's ``CachedMultiHeadAttention``); their
    ``EinsumDense`` sublayers have our kernel shapes, so only names change
    hands. Keras is imported only when this is called.

    Args:
      keras_layer: a built layer (called once, or ``build()`` run).

    Returns:
      ``{"query": {"kernel", "bias"?}, "key": ..., "value": ...,
      "attention_output": ..., "gate"?: ...}`` as float arrays; use it as
      ``{"params": keras_params(layer)}``.

    Raises:
      ValueError: the layer is not built.
      TypeError: the layer has no query/key/value/output sublayers.
    """
    if not getattr(keras_layer, "built", False):
        raise ValueError(f"build the Keras layer first (call it once), got built=False for {keras_layer!r}")
    params = {}
    for name, attribute in _SUBLAYERS.items():
        sublayer = getattr(keras_layer, attribute, None)
        if sublayer is None:
            if name == "gate":
                continue
            raise TypeError(
                f"{type(keras_layer).__name__} has no {attribute} sublayer; expected a Keras "
                "GroupQueryAttention or MultiHeadAttention"
            )
        params[name] = {"kernel": _array(sublayer.kernel)}
        if getattr(sublayer, "bias", None) is not None:
            params[name]["bias"] = _array(sublayer.bias)
    return params
