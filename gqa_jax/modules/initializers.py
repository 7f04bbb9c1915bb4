"""Flax initializers for Keras initializer names ("glorot_uniform", "zeros", ...).

Keras' ``EinsumDense`` computes the fans of its variance-scaling initializers
from the kernel's input axes and output axes: ``fan_in = D`` and ``fan_out =
N * H`` for a ``[D, N, H]`` kernel, ``fan_in = N * H`` for ``[N, H, D]``. A
name resolved here with the same axes gives the same distribution as in Keras.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax.linen import initializers

Initializer = Callable[..., jax.Array]
Axes = int | Sequence[int]


def _keras_uniform(key, shape, dtype=jnp.float32):
    """Keras ``RandomUniform()``: uniform on ``[-0.05, 0.05)``."""
    return jax.random.uniform(key, shape, dtype, minval=-0.05, maxval=0.05)


def _scaling(scale: float, mode: str, distribution: str) -> Callable[[Axes, Axes], Initializer]:
    return lambda in_axis, out_axis: initializers.variance_scaling(
        scale, mode, distribution, in_axis=in_axis, out_axis=out_axis
    )


def _fixed(init: Initializer) -> Callable[[Axes, Axes], Initializer]:
    return lambda in_axis, out_axis: init


# Keras' definitions (keras.initializers), by snake-case name.
_BY_NAME: dict[str, Callable[[Axes, Axes], Initializer]] = {
    "glorot_uniform": _scaling(1.0, "fan_avg", "uniform"),
    "glorot_normal": _scaling(1.0, "fan_avg", "truncated_normal"),
    "he_uniform": _scaling(2.0, "fan_in", "uniform"),
    "he_normal": _scaling(2.0, "fan_in", "truncated_normal"),
    "lecun_uniform": _scaling(1.0, "fan_in", "uniform"),
    "lecun_normal": _scaling(1.0, "fan_in", "truncated_normal"),
    "variance_scaling": _scaling(1.0, "fan_in", "truncated_normal"),
    "orthogonal": _fixed(initializers.orthogonal()),
    "random_normal": _fixed(initializers.normal(0.05)),
    "normal": _fixed(initializers.normal(0.05)),
    "truncated_normal": _fixed(initializers.truncated_normal(0.05)),
    "random_uniform": _fixed(_keras_uniform),
    "uniform": _fixed(_keras_uniform),
    "zeros": _fixed(initializers.zeros),
    "ones": _fixed(initializers.ones),
}


def keras_initializer(init: Initializer | str, *, in_axis: Axes = -2, out_axis: Axes = -1) -> Initializer:
    """A Flax initializer from a Flax initializer or a Keras initializer name.

    Args:
      init: a callable ``init(key, shape, dtype)`` (returned as is), or a Keras
        name in snake or Camel case: ``"glorot_uniform"``, ``"GlorotUniform"``,
        ``"zeros"``, ``"he_normal"``, ``"truncated_normal"`` ... (Keras
        defaults for the parameterized ones: stddev 0.05, range +-0.05).
      in_axis, out_axis: the kernel's input and output axes, for the fans of
        the variance-scaling names.

    Returns:
      The initializer.

    Raises:
      ValueError: for an unknown name.
      TypeError: for anything else that is not callable.
    """
    if callable(init):
        return init
    if not isinstance(init, str):
        raise TypeError(f"an initializer must be callable or a Keras name, got {init=}")
    name = re.sub(r"(?<!^)(?=[A-Z])", "_", init).lower()
    if name not in _BY_NAME:
        raise ValueError(f"unknown Keras initializer name {init=}; known names: {sorted(_BY_NAME)}")
    return _BY_NAME[name](in_axis, out_axis)
