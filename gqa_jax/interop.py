"""Weights from Keras layers into the parameters of the `gqa_jax.modules` layers.

The `gqa_jax.nnx` layers have the same parameter tree: load the same dict
with `gqa_jax.nnx.load_linen_params(nnx_layer, keras_params(keras_layer))`.

Example::

    import keras  # on its JAX backend: KERAS_BACKEND=jax
    import gqa_jax

    x = np.random.default_rng(0).standard_normal((2, 5, 32)).astype(np.float32)  # [B, T, D]
    keras_layer = keras.layers.GroupQueryAttention(head_dim=16, num_query_heads=8, num_key_value_heads=2)
    want = keras_layer(x, x)  # builds it
    params = keras_params(keras_layer)
    ours = gqa_jax.GroupedQueryAttention(head_dim=16, num_query_heads=8, num_key_value_heads=2)
    y = ours.apply({"params": params}, x, x)  # == want
"""

from __future__ import annotations

import jax.numpy as jnp

# Our parameter names and the Keras attributes of the matching sublayers: Keras'
# private names, then keras-hub's public ones (Gemma's attention).
_SUBLAYERS = {
    "query": ("_query_dense", "query_dense"),
    "key": ("_key_dense", "key_dense"),
    "value": ("_value_dense", "value_dense"),
    "attention_output": ("_output_dense", "output_dense"),
    "gate": ("_gate_dense", "gate_dense"),
}


def _sublayer(keras_layer, attributes):
    for attribute in attributes:
        sublayer = getattr(keras_layer, attribute, None)
        if sublayer is not None:
            return sublayer
    return None


def _kernel_order(equation: str) -> tuple[int, ...] | None:
    """The transpose of a Keras ``EinsumDense`` kernel into ours: contracted input axes first, then output axes.

    ``"btd,ndh->btnh"`` (keras-hub Gemma's ``[N, D, H]`` query kernel) gives
    ``(1, 0, 2)``; Keras' own equations are already in our order (None).
    """
    inputs, output = equation.replace(" ", "").split("->")
    x, kernel = inputs.split(",")
    target = [c for c in x if c in kernel] + [c for c in output if c in kernel]
    if sorted(target) != sorted(kernel):
        raise ValueError(f"cannot map the EinsumDense kernel of equation={equation!r} onto [inputs..., outputs...]")
    order = tuple(kernel.index(c) for c in target)
    return None if order == tuple(range(len(kernel))) else order


def _array(variable) -> jnp.ndarray:
    """A Keras variable as a JAX array, whatever the Keras backend."""
    import keras  # the caller has a Keras layer, so Keras is installed

    return jnp.asarray(keras.ops.convert_to_numpy(variable.value))


def keras_params(keras_layer) -> dict:
    """The params tree of our layer from a built Keras attention layer.

    Works for ``keras.layers.GroupQueryAttention``, ``keras.layers.MultiHeadAttention``
    and subclasses (keras-hub's ``CachedMultiHeadAttention``), and keras-hub's
    Llama / Gemma attention (``_query_dense`` or public ``query_dense``
    names). Kernels whose ``EinsumDense`` equation orders the axes otherwise
    (Gemma's ``[N, D, H]`` query) are transposed into ours (``[D, N, H]``).
    Keras is imported only when this is called.

    Args:
      keras_layer: a built layer (called once, or ``build()`` run).

    Returns:
      ``{"query": {"kernel", "bias"?}, "key": ..., "value": ...,
      "attention_output": ..., "gate"?: ...}`` as float arrays; use it as
      ``{"params": keras_params(layer)}``.

    Raises:
      ValueError: the layer is not built.
      TypeError: the layer has no query/key/value/output sublayers.
      ValueError: a kernel equation that does not map onto our layout.
    """
    if not getattr(keras_layer, "built", False):
        raise ValueError(f"build the Keras layer first (call it once), got built=False for {keras_layer!r}")
    params = {}
    for name, attributes in _SUBLAYERS.items():
        sublayer = _sublayer(keras_layer, attributes)
        if sublayer is None:
            if name == "gate":
                continue
            raise TypeError(
                f"{type(keras_layer).__name__} has no {attributes[0]} sublayer (nor {attributes[1]}); expected a Keras "
                "GroupQueryAttention or MultiHeadAttention, or a keras-hub attention layer"
            )
        kernel = _array(sublayer.kernel)
        order = _kernel_order(sublayer.equation) if hasattr(sublayer, "equation") else None
        params[name] = {"kernel": kernel if order is None else jnp.transpose(kernel, order)}
        if getattr(sublayer, "bias", None) is not None:
            params[name]["bias"] = _array(sublayer.bias)
    return params
