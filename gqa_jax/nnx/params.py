"""Parameters between the linen and NNX layers: one tree, the same names and shapes.

An NNX layer's ``nnx.Param`` state, as a pure dict, is the linen layer's
``params`` collection (``{"query": {"kernel": [D, N, H], "bias": [N, H]},
...}``), so `gqa_jax.keras_params` and `gqa_jax.models.params_from_hf` output
loads into either. `linen_params` reads it from an NNX module,
`load_linen_params` writes it into one (checking names and shapes).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import flax
import flax.linen as nn
from flax import nnx, traverse_util

Array = jax.Array


def linen_params(module: nnx.Module) -> dict:
    """The linen ``params`` collection of an NNX layer or decoder: nested dicts of arrays.

    Use it as ``linen_layer.apply({"params": linen_params(module)}, ...)``.
    The arrays are the module's own (no copy).
    """
    return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def load_linen_params(module: nnx.Module, params: Mapping) -> nnx.Module:
    """Writes a linen ``params`` collection into an NNX layer or decoder, in place.

    Args:
      module: the NNX module (built with the matching sizes, e.g. under
        ``nnx.eval_shape`` to skip the initializers).
      params: ``{"query": {"kernel": ...}, ...}`` as from ``linen.init(...)["params"]``,
        `gqa_jax.keras_params` or `gqa_jax.models.params_from_hf` (a
        ``FrozenDict``, or with linen's partitioning boxes, too).

    Returns:
      ``module``.

    Raises:
      ValueError: names missing from ``params`` or unknown to ``module``, or a
        parameter whose shape differs (both shapes named).
    """
    state = nnx.state(module, nnx.Param)
    expected = traverse_util.flatten_dict(nnx.to_pure_dict(state), sep="/")
    given = traverse_util.flatten_dict(flax.core.unfreeze(nn.meta.unbox(params)), sep="/")
    missing, unknown = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    if missing or unknown:
        raise ValueError(
            f"params do not match {type(module).__name__}: missing {missing}, unknown {unknown}"
        )
    for name, value in given.items():
        if tuple(jnp.shape(value)) != tuple(expected[name].shape):
            raise ValueError(
                f"{name} must have shape {tuple(expected[name].shape)} for this module, got {tuple(jnp.shape(value))}"
            )
    nested = traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(v) for k, v in given.items()})
    nnx.replace_by_pure_dict(state, nested)
    nnx.update(module, state)
    return module
